"""Procedure-weighted keys: the bank learns which key terms name the procedure, and scores by them.

Why: a plain embedding (or BM25) of "cool some tomato and put it in diningtable" is dominated by the
object and the receptacle, so it retrieves "put a hot tomato in diningtable" — the wrong procedure.

At build time each term of the keys gets a weight from the bank's own ``task_type`` labels: how
concentrated the term's keys are in few task types, ``1 - H(type | term) / log(#types)``, with a
Dirichlet prior of ``alpha`` pseudo-keys spread over the types so that a rare term (an object seen in
three keys of one type) still counts as spread. Words that name the procedure ("hot", "cool", "two",
"unknown", "melting") get the highest weights; object, receptacle, colour and room names, which the
bank shows across many types, get weights near 0: a soft mask of the entities, learned, not listed.

Keys and queries become binary term vectors scaled by these weights (L2-normalised); the score is
their cosine, plus ``dense_weight`` x the dense encoder's dot product on the raw texts (it orders keys
of the same procedure by entity similarity and covers words the bank's vocabulary lacks).
Labels are read at build time only; a query is only text.

Words the bank never used (a user's "warm up", "rinse", "2" against the templates' "heat", "clean",
"two") borrow the weight of their nearest bank terms in the dense encoder's word-embedding space
(``expand``): an unknown query word whose best cosine to a bank term is at least ``EXPAND_MIN_SIM``
adds every bank term within ``EXPAND_MARGIN`` of that best match, at the term's weight x the cosine.
Near-ties are kept on purpose: MiniLM puts "cold" as close to "hot" as to "cool", and keeping all
three lets the learned weights decide. Known words keep their own weight, so templated queries score
exactly as before. Without a dense encoder (``--encoder bm25``) unknown words still weigh 0.

Diversity: two keys with the same template — the same text once entity-like words are masked
(``TermWeights.mask``: "put a hot something in something") — show the same procedure. When a key's
text repeats one ranked above it, the best-ranked key of the same template with a new text takes its
slot, and the copy moves one place down; so the K slots show different tasks of the same procedure.
A copy is only ever replaced by a key of its own template, so diversity does not trade a
same-procedure slot for variety.

Template term (``template_weight``, static keys): a second stage over the head of the ranking (the
best ``head_size(k)`` keys, a fixed number for any usual k, diversity's window too). The query with
its entity-like known words masked — words the bank never used are kept, they are what a paraphrase
names the procedure with ("get the something nice and cold") — is embedded by the dense encoder and
compared with each candidate key's template; ``template_weight`` x that similarity is added to the
candidate's score. The encoder reads the paraphrase's procedure words in context, where the word-by-word
expansion cannot (docs/retrieval-quality.md, "Paraphrases"). Template embeddings are computed on first
use and kept in memory (a bank has few templates: 14 in generated ALFWorld, 123 in ScienceWorld).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from exprag.bank.encoders import _STOP, _TOKEN, lexical_tokens
from exprag.bank.topk import ScoreBlock, chunked_top
from exprag.errors import BankError

TOKENIZER = "lower-alnum-stop-v1"
# procedure words: weight >= this fraction of the bank's top weight (the rest is masked as entities)
MASK_FRACTION = 0.5
# The second stage (template term) and diversity reorder a head of the ranking: the best
# max(HEAD, k + HEAD_MARGIN) keys. A head that does not depend on k keeps the first hits the same
# whatever k is asked (k <= HEAD - HEAD_MARGIN), and the retriever's full-scan fallback uses the
# same head. 256 was chosen on the dev paraphrases (k + 64 lost one ScienceWorld dev query).
HEAD = 256
HEAD_MARGIN = 64  # beyond k, so that diversity has copies to skip
# key-template embeddings kept in memory (384 floats each with MiniLM: 150 MB at the cap)
_TEMPLATE_CACHE = 100_000
# queries whose heads the template term scores at once (block x head templates at most)
_RERANK_BLOCK = 64
# query-word expansion (chosen on the dev paraphrase sets, see docs/retrieval-quality.md)
EXPAND_MIN_SIM = 0.5
EXPAND_MARGIN = 0.08
# lexicon expansion: a related bank term counts if its weight is >= this fraction of the bank's top weight
# (object and receptacle names are not what a paraphrase's verb means), at this similarity
LEXICON_HIT = 0.2
LEXICON_SIM = 0.7
TERM_EMBEDDINGS = "term_embeddings.npy"
# the inverted index, saved at build so that a load does not rebuild it (older banks lack it)
POSTINGS = ("postings_start.npy", "postings_keys.npy", "postings_vals.npy")


def procedure_tokens(text: str) -> set[str]:
    """Binary bag of words, less the stop list shared with BM25. Function words would otherwise be
    learned as procedure words from template artefacts (generated ALFWorld: "the" only in
    look-at-object tasks) and pull every paraphrase that uses them to that type."""
    return set(lexical_tokens(text))


def default_alpha(n_keys: int, mode: str = "static") -> float:
    """The prior's strength grows with the bank: more keys, more evidence needed to trust a term.
    Static keys (task descriptions): max(5, 1.5 sqrt(n)); dynamic keys (whole trajectories, whose
    procedure words also occur in observations): max(5, 0.5 sqrt(n)). Tuned on ALFWorld banks of
    30-432 keys and the ScienceWorld train split (3592); see docs/retrieval-quality.md."""
    return max(5.0, (1.5 if mode == "static" else 0.5) * math.sqrt(max(n_keys, 1)))


@dataclass(frozen=True)
class KeyTerms:
    """The terms each key holds, as term ids (CSR rows, one per key), and the vocabulary in first-seen
    order: what term weights and postings are computed from. Kept in memory with an index so that a
    write-back tokenizes only the new keys (at 1M keys a full re-tokenization took ~20 s per episode)."""

    vocab: dict[str, int]
    indptr: np.ndarray  # (n_keys + 1,) int64
    ids: np.ndarray  # (nnz,) int64: the term ids of key r are ids[indptr[r]:indptr[r + 1]]

    @classmethod
    def of(cls, texts: Sequence[str], base: "KeyTerms | None" = None) -> "KeyTerms":
        """The terms of ``texts``, after ``base``'s keys when given (its term ids stay as they are)."""
        vocab = dict(base.vocab) if base is not None else {}
        ids: list[int] = []
        lens = np.zeros(len(texts) + 1, np.int64)
        for r, text in enumerate(texts):
            row = [vocab.setdefault(w, len(vocab)) for w in procedure_tokens(text)]
            ids += row
            lens[r + 1] = len(row)
        ptr = np.cumsum(lens)
        new_ids = np.asarray(ids, np.int64)
        if base is None:
            return cls(vocab, ptr, new_ids)
        return cls(vocab, np.concatenate([base.indptr, base.indptr[-1] + ptr[1:]]), np.concatenate([base.ids, new_ids]))

    @classmethod
    def vocabulary(cls, weights: "TermWeights") -> "KeyTerms":
        """No keys, and term ids fixed in the order of ``weights`` (a saved bank's): keys tokenized on
        top of it give postings and term embeddings that line up with those weights."""
        return cls(dict(weights._vocab()), np.zeros(1, np.int64), np.zeros(0, np.int64))

    @property
    def n_keys(self) -> int:
        return len(self.indptr) - 1

    def rows(self) -> np.ndarray:
        """The key of every entry of ``ids``."""
        return np.repeat(np.arange(self.n_keys, dtype=np.int64), np.diff(self.indptr))


@dataclass
class TermWeights:
    """Per-term weight in [0, 1]: how much a term tells the procedure (task type) apart."""

    weights: dict[str, float]
    alpha: float
    source: str  # "task-type" (learned from labels) | "uniform" (no useful labels to learn from)
    n_keys: int
    n_types: int
    _vocab_cache: dict[str, int] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def learn(cls, texts: Sequence[str], labels: Sequence[str], alpha: float) -> "TermWeights":
        return cls.from_terms(KeyTerms.of(texts), labels, alpha)

    @classmethod
    def from_terms(cls, terms: KeyTerms, labels: Sequence[str], alpha: float) -> "TermWeights":
        if terms.n_keys != len(labels):
            raise ValueError("one label per key text")
        types = sorted(set(labels))
        tix = {t: i for i, t in enumerate(types)}
        names = list(terms.vocab)
        if not names:
            return cls({}, alpha, "task-type", terms.n_keys, len(types))
        if len(types) < 2:
            # No labels to learn from (one type, or labels the build-time check rejected): every word
            # weighs the same, a cosine of word sets. It beat IDF weights, which favour rare entity
            # names, on ScienceWorld (docs/retrieval-quality.md, "Banks whose labels do not help").
            return cls(dict.fromkeys(names, 1.0), alpha, "uniform", terms.n_keys, len(types))
        key_type = np.fromiter((tix[lab] for lab in labels), np.int64, len(labels))
        # df[t, c] = number of keys of type c holding term t (a key holds a term once)
        df = np.bincount(terms.ids * len(types) + key_type[terms.rows()],
                         minlength=len(names) * len(types)).reshape(len(names), len(types)).astype(np.float64)
        n_c = np.bincount(key_type, minlength=len(types)).astype(np.float64)
        prior = n_c / n_c.sum()
        p = (df + alpha * prior) / n_c  # P(term | type), smoothed toward the bank-wide rate
        q = p / p.sum(1, keepdims=True)  # P(type | term) under equal type priors
        ent = -(q * np.log(np.clip(q, 1e-300, None))).sum(1)
        w = np.clip(1.0 - ent / math.log(len(types)), 0.0, 1.0)
        return cls(dict(zip(names, w.round(6).tolist())), alpha, "task-type", terms.n_keys, len(types))

    def vectors(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text, (term ids, weights) of its known terms, L2-normalised; zero weights left out."""
        vocab = self._vocab()
        out = []
        for text in texts:
            row = sorted((vocab[w], self.weights[w]) for w in procedure_tokens(text)
                         if self.weights.get(w, 0.0) > 0.0)
            ids = np.fromiter((j for j, _ in row), np.int64, len(row))
            vals = np.fromiter((v for _, v in row), np.float32, len(row))
            norm = float(np.linalg.norm(vals))
            out.append((ids, vals / norm if norm > 0 else vals))
        return out

    def _vocab(self) -> dict[str, int]:
        if self._vocab_cache is None:
            self._vocab_cache = {w: i for i, w in enumerate(self.weights)}
        return self._vocab_cache

    @property
    def mask_threshold(self) -> float:
        """Weights below this mark entity-like words (weights shrink with the prior, so relative)."""
        return MASK_FRACTION * max(self.weights.values(), default=0.0)

    def mask(self, text: str, threshold: float | None = None, placeholder: str = "something",
             keep_unknown: bool = False) -> str:
        """The text with entity-like words (weight below ``threshold``, default ``mask_threshold``,
        or unknown to the bank unless ``keep_unknown``) replaced by ``placeholder``: a hard mask."""
        thr = self.mask_threshold if threshold is None else threshold
        w = self.weights
        return " ".join(t if t in _STOP or w.get(t, 0.0) >= thr or (keep_unknown and t not in w) else placeholder
                        for t in _TOKEN.findall(text.lower()))

    def to_json(self) -> dict[str, Any]:
        return {"tokenizer": TOKENIZER, "alpha": self.alpha, "source": self.source, "n_keys": self.n_keys,
                "n_types": self.n_types, "weights": self.weights}

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "TermWeights":
        if obj.get("tokenizer") != TOKENIZER:
            raise BankError(f"{where}: field 'tokenizer' is {obj.get('tokenizer')!r}, this exprag reads "
                            f"{TOKENIZER!r}; rebuild the bank")
        try:
            return cls({str(k): float(v) for k, v in obj["weights"].items()}, float(obj["alpha"]),
                       str(obj["source"]), int(obj["n_keys"]), int(obj["n_types"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BankError(f"{where}: malformed term weights ({type(e).__name__}: {e})") from None


@dataclass
class ProcedureIndex:
    """Procedure-weighted lexical cosine (+ a small dense term), with diversity among ties."""

    texts: list[str]
    weights: TermWeights
    dense: Any = None  # a DenseIndex over the same raw texts, or None (lexical only)
    dense_weight: float = 0.05
    diversity: bool = True
    expand: bool = False  # unknown query words borrow their nearest bank terms' weights
    lexicon: Any = None  # a WordNet (exprag.bank.lexicon) for the expansion, or None: the word space alone
    template_weight: float = 0.0  # second stage: + this x dense similarity of masked query and key template
    _postings: Any = field(default=None, repr=False)  # (term start offsets, key ids, values)
    _terms: KeyTerms | None = field(default=None, repr=False)  # the keys' terms, when this process has them
    _templates: list[str] | None = field(default=None, repr=False)  # masked keys, for diversity
    _text_keys: list[str] | None = field(default=None, repr=False)  # text_key of each key, for diversity
    _term_emb: np.ndarray | None = field(default=None, repr=False)  # (n_terms, d) bank-term embeddings
    _word_emb: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # unknown query words seen
    _template_emb: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # key templates seen

    def __post_init__(self) -> None:
        if self.dense is not None and self.dense.size != len(self.texts):
            raise BankError(f"dense index holds {self.dense.size} keys, the lexical one {len(self.texts)}")
        if self._postings is None:
            if self._terms is None or self._terms.n_keys != len(self.texts):
                self._terms = KeyTerms.of(self.texts, base=KeyTerms.vocabulary(self.weights))
            self._postings = postings_from_terms(self._terms, self.weights)

    @property
    def size(self) -> int:
        return len(self.texts)

    def lexical(self, queries: list[str]) -> np.ndarray:
        """(n_queries, size) cosine of the weighted term vectors, through the inverted index."""
        return self._lexical_block(self._query_vectors(queries), 0, self.size)

    def _query_vectors(self, queries: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        if self.expand and (self.dense is not None or self.lexicon is not None):
            return self._expanded(queries)
        return self.weights.vectors(queries)

    def _lexical_block(self, vecs: list[tuple[np.ndarray, np.ndarray]], a: int, b: int) -> np.ndarray:
        """The lexical cosine against keys ``[a, b)`` only: (n_queries, b - a)."""
        start, keys, vals = self._postings
        out = np.zeros((len(vecs), b - a), np.float32)
        whole = a == 0 and b == self.size
        for q, (ids, wq) in enumerate(vecs):
            for t, w in zip(ids.tolist(), wq.tolist()):
                lo, hi = int(start[t]), int(start[t + 1])
                if not whole:  # a term's keys are stored in ascending order: cut to the chunk
                    lo, hi = lo + np.searchsorted(keys[lo:hi], [a, b]).astype(np.int64)
                out[q, keys[lo:hi] - a] += w * vals[lo:hi]  # a key holds a term once: no repeated indices
        return out

    def term_embeddings(self) -> np.ndarray:
        """The bank terms (in weight order) embedded one word at a time; computed once, saved with the index."""
        if self._term_emb is None:
            self._term_emb = self.dense.encoder.encode(list(self.weights.weights))
        return self._term_emb

    def _expanded(self, queries: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Query term vectors with unknown words mapped onto bank terms (module docstring)."""
        w = self.weights.weights
        toks = [procedure_tokens(q) for q in queries]
        if not w:
            return self.weights.vectors(queries)
        dense = self.dense is not None
        new = sorted({t for ts in toks for t in ts if t not in w and t not in self._word_emb}) if dense else []
        if new:
            self._word_emb.update(zip(new, self.dense.encoder.encode(new)))
        vocab = self.weights._vocab()
        emb = self.term_embeddings() if dense else None
        wv = np.fromiter(w.values(), np.float32, len(w))
        hit_floor = LEXICON_HIT * float(wv.max())
        out = []
        for ts in toks:
            row: dict[int, float] = {vocab[t]: w[t] for t in ts if w.get(t, 0.0) > 0.0}
            for t in ts:
                if t in w:
                    continue
                rel = self.lexicon.relations(t) if self.lexicon is not None else None
                cand: dict[int, float] = {}
                if dense:
                    sim = emb @ self._word_emb[t]
                    if rel is not None:  # the word space puts antonyms close ("cold" ~ "hot"): drop them
                        sim[[vocab[a] for a in rel.antonyms if a in vocab]] = -1.0
                    best = float(sim.max())
                    if best >= EXPAND_MIN_SIM:
                        for j in np.flatnonzero(sim >= best - EXPAND_MARGIN).tolist():
                            cand[j] = float(wv[j] * sim[j])
                if rel is not None:  # the nearest ring that names a weighted bank term
                    for ring in rel.rings:
                        hits = [vocab[r] for r in ring if r in vocab and w[r] >= hit_floor]
                        if hits:
                            for j in hits:
                                cand[j] = max(cand.get(j, 0.0), float(wv[j]) * LEXICON_SIM)
                            break
                for j, val in cand.items():
                    if val > row.get(j, 0.0):
                        row[j] = val
            ids = np.fromiter(sorted(row), np.int64, len(row))
            vals = np.fromiter((row[j] for j in sorted(row)), np.float32, len(row))
            norm = float(np.linalg.norm(vals))
            out.append((ids, vals / norm if norm > 0 else vals))
        return out

    def scores(self, queries: list[str]) -> np.ndarray:
        return self._scorer(queries)(0, self.size)

    def _scorer(self, queries: list[str]) -> ScoreBlock:
        """Fused scores of ``queries`` against any chunk of keys; the queries are encoded once."""
        vecs = self._query_vectors(queries)
        if self.dense is None or self.dense_weight == 0:
            return lambda a, b: self._lexical_block(vecs, a, b)
        qv = self.dense.encoder.encode(queries)
        dw = np.float32(self.dense_weight)
        return lambda a, b: self._lexical_block(vecs, a, b) + dw * (qv @ self.dense.emb[a:b].T)

    def top(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        if not queries:
            return np.zeros((0, min(k, self.size)), np.float32), np.zeros((0, min(k, self.size)), np.int64)
        block = self._scorer(queries)
        if not self.diversity and not self.reranks:
            return chunked_top(block, len(queries), self.size, k)
        win_s, win_i = chunked_top(block, len(queries), self.size, min(self.size, head_size(k)))
        return self._reorder_head(queries, win_s, win_i, k)

    def _reorder_head(self, queries: list[str], scores: np.ndarray, ids: np.ndarray,
                      limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A head (per query, best first) after the template term and diversity, cut to ``limit``:
        what ``top`` returns and what ``rank_all`` puts before the rest of the bank."""
        if self.reranks:
            scores, ids = self._rerank(queries, scores, ids)
        if not self.diversity:
            return scores[:, :limit], ids[:, :limit]
        order, kept = [], []
        for row_s, row_i in zip(scores, ids):
            by_id = dict(zip(row_i.tolist(), row_s.tolist()))  # the chosen keys all come from the head
            sel = self._diverse(row_i, limit)
            order.append(sel)
            kept.append([by_id[i] for i in sel])
        n = len(queries)
        return np.asarray(kept, np.float32).reshape(n, -1), np.asarray(order, np.int64).reshape(n, -1)

    @property
    def reranks(self) -> bool:
        """Whether the template term applies: it needs the dense encoder, and templates need learned
        weights (uniform weights mask nothing)."""
        return self.template_weight > 0 and self.dense is not None and self.weights.source == "task-type"

    def _rerank(self, queries: list[str], scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window ``ids`` (best first, per query) rescored with the template term, best first again."""
        if not ids.shape[1]:
            return scores, ids
        enc = self.dense.encoder
        q = enc.encode([self.weights.mask(t, keep_unknown=True) for t in queries])
        q = np.asarray(q, np.float32)
        temps = self._key_templates()
        tw = np.float32(self.template_weight)
        out = np.empty(scores.shape, np.float32)
        # in blocks of queries: a block's heads hold at most block x head templates, so the
        # queries x templates product stays bounded on banks of mostly distinct templates
        for a in range(0, len(queries), _RERANK_BLOCK):
            b = min(len(queries), a + _RERANK_BLOCK)
            names = [temps[j] for j in ids[a:b].ravel().tolist()]
            distinct = list(dict.fromkeys(names))  # a head holds few templates: embed and score each once
            new = [t for t in distinct if t not in self._template_emb]
            if len(self._template_emb) + len(new) > _TEMPLATE_CACHE:  # a bank of mostly distinct templates
                self._template_emb.clear()  # and these heads' templates all embedded again, not only the new
                new = distinct
            if new:
                self._template_emb.update(zip(new, enc.encode(new)))
            where = {t: i for i, t in enumerate(distinct)}
            col = np.fromiter((where[t] for t in names), np.int64, len(names)).reshape(b - a, -1)
            sim = q[a:b] @ np.stack([self._template_emb[t] for t in distinct]).T  # block x templates
            out[a:b] = scores[a:b] + tw * np.take_along_axis(sim, col, 1)
        scores = out
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def rank_all(self, query: str, k: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Every key, best first, with its score (the retriever's fallback when filters reject the
        top window): the head is ordered and scored as ``top(query, k)`` orders and scores it."""
        s = self.scores([query])[0]
        order = np.argsort(-s, kind="stable")
        if not self.diversity and not self.reranks:
            return s[order], order
        head = order[:head_size(k)]  # the second stage and diversity reorder the head only, as in ``top``
        top_s, top = self._reorder_head([query], s[head][None, :], head[None, :])
        return np.concatenate([top_s[0], s[order[len(head):]]]), np.concatenate([top[0], order[len(head):]])

    def _key_templates(self) -> list[str]:
        if self._templates is None:
            self._templates = [self.weights.mask(t) for t in self.texts]
        return self._templates

    def _diverse(self, ids: Sequence[int], limit: int | None = None) -> list[int]:
        if self._text_keys is None or len(self._text_keys) != len(self.texts):
            self._text_keys = [text_key(t) for t in self.texts]
        return diverse_order(ids, self._text_keys, self._key_templates(), limit)

    def save(self, path: Path, start: int = 0) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "keys.json").write_text(json.dumps(self.texts[start:], ensure_ascii=False), encoding="utf-8")
        (path / "weights.json").write_text(json.dumps(self.weights.to_json(), ensure_ascii=False), encoding="utf-8")
        for name, arr in zip(POSTINGS, self._postings):
            np.save(path / name, np.ascontiguousarray(arr))
        if self.dense is not None:
            self.dense.save(path, start)
            if self.expand:
                np.save(path / TERM_EMBEDDINGS, self.term_embeddings())


def postings_from_terms(terms: KeyTerms, weights: TermWeights) -> tuple[np.ndarray, ...]:
    """The inverted index of ``weights.vectors`` over the keys of ``terms`` without tokenizing again:
    each key's positive-weight terms, L2-normalised, grouped by term with keys ascending."""
    names, vocab = list(weights.weights), list(terms.vocab)
    if names[: len(vocab)] != vocab[: len(names)]:
        raise ValueError("term weights and key terms disagree on the vocabulary")
    # a key word the weights lack weighs 0, as in ``vectors``
    wv = np.zeros(max(len(names), len(vocab)), np.float32)
    wv[: len(names)] = np.fromiter(weights.weights.values(), np.float32, len(names))
    rows, ids = terms.rows(), terms.ids
    keep = wv[ids] > 0.0
    rows, ids = rows[keep], ids[keep]
    w = wv[ids]
    norm = np.sqrt(np.bincount(rows, weights=(w * w).astype(np.float64), minlength=terms.n_keys)).astype(np.float32)
    vals = w / norm[rows]
    order = np.argsort(ids, kind="stable")  # entries are in key order: keys stay ascending within a term
    start = np.zeros(len(names) + 1, np.int64)
    np.cumsum(np.bincount(ids, minlength=len(names)), out=start[1:])
    return start, rows[order], vals[order]


def _load_postings(path: Path, n_terms: int, n_keys: int) -> tuple[np.ndarray, ...] | None:
    """The saved inverted index, memory-mapped; None when absent or not of these weights and keys."""
    if not all((path / name).is_file() for name in POSTINGS):
        return None
    start, keys, vals = (np.load(path / name, mmap_mode="r", allow_pickle=False) for name in POSTINGS)
    n = int(start[-1]) if len(start) else -1
    if start.shape != (n_terms + 1,) or keys.shape != (n,) or vals.shape != (n,) \
            or (n and int(keys.max()) >= n_keys):
        return None
    return start, keys, vals


def head_size(k: int) -> int:
    """How many of the best keys the second stage and diversity reorder when k are asked."""
    return max(HEAD, k + HEAD_MARGIN)


def diverse_order(ids: Sequence[int], keys: Sequence[str], templates: Sequence[str],
                  limit: int | None = None) -> list[int]:
    """``ids`` (best first) reordered so that a key whose text repeats an earlier one gives its slot
    to the best later key of the same template with a new text, if the window holds one; the first
    ``limit`` of that order (all by default).

    ``keys[i]`` is key i's ``text_key`` (the form in which two texts are the same). A copy stays in
    front while its template has keys with unseen texts left: they move ahead of it, best first.
    Linear in the window: each template's keys are walked once (a key skipped for a seen text stays
    skipped, since texts are only ever added to ``seen``), and grouped only once a copy shows up."""
    ids = [int(i) for i in ids]
    limit = len(ids) if limit is None else min(limit, len(ids))
    by_template: dict[str, list[int]] | None = None
    cursor: dict[str, int] = {}
    taken = [False] * len(ids)
    seen: set[str] = set()
    out: list[int] = []
    pos = 0
    while len(out) < limit:
        if taken[pos]:
            pos += 1
            continue
        i = ids[pos]
        if keys[i] in seen:  # a copy: the best untaken key of its template with a new text goes first
            if by_template is None:
                by_template = {}
                for p, j in enumerate(ids):
                    by_template.setdefault(templates[j], []).append(p)
            tpl = templates[i]
            run, c = by_template[tpl], cursor.get(tpl, 0)
            while c < len(run) and (taken[run[c]] or keys[ids[run[c]]] in seen):
                c += 1
            cursor[tpl] = c
            if c < len(run):
                taken[run[c]] = True
                out.append(ids[run[c]])
                seen.add(keys[ids[run[c]]])
                continue
        taken[pos] = True
        out.append(i)
        seen.add(keys[i])
        pos += 1
    return out


def text_key(text: str) -> str:
    """The form in which two task texts count as the same (a copy, a twin): lower case, whitespace collapsed."""
    return " ".join(text.lower().split())


def load_procedure_index(paths: list[Path], dense_encoder: Any, dense_weight: float, diversity: bool,
                         expand: bool = False, lexicon: Any = None, template_weight: float = 0.0) -> ProcedureIndex:
    """The index over the keys of ``paths`` (segments, in order); weights and postings are the last's."""
    path = paths[-1]
    wfile = path / "weights.json"
    for f in [p / "keys.json" for p in paths] + [wfile]:
        if not f.is_file():
            raise BankError(f"{f}: missing; the bank is incomplete, rebuild it")
    texts: list[str] = []
    try:
        for p in paths:
            texts += json.loads((p / "keys.json").read_text(encoding="utf-8"))
        wobj = json.loads(wfile.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BankError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
    dense = dense_encoder.load(paths) if dense_encoder is not None else None
    weights = TermWeights.from_json(wobj, str(wfile))
    index = ProcedureIndex(texts, weights, dense, dense_weight, diversity, expand, lexicon, template_weight,
                           _postings=_load_postings(path, len(weights.weights), len(texts)))
    temb = path / TERM_EMBEDDINGS
    if expand and dense is not None and temb.is_file():
        emb = np.load(temb)
        if emb.shape[0] == len(index.weights.weights):  # else stale: recomputed on first use
            index._term_emb = emb
    return index
