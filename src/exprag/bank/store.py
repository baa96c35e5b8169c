"""The experience bank on disk: trajectories, static and dynamic key indexes, and a manifest.

Layout of BANK_DIR::

    CURRENT              the name of the version directory readers use (one line)
    v-<time>-<random>/   one complete bank version:
        manifest.json        format, schema version, encoder identity, retrieval (scoring) config,
                             counts, sources (path + sha256), and ``files``: the size and SHA-256 of every
                             file below, recorded at write time and checked on load
                             (``exprag.checksums``; ``exprag bank info --verify`` hashes every byte)
        trajectories.jsonl   the stored trajectories, in index order
        static/              index over task descriptions (static retrieval keys)
        dynamic/             index over task + action texts (dynamic retrieval keys)
        seg-000001/ ...      segments added by write-back (manifest ``segments``): each holds its own
                             trajectories.jsonl, static/ and dynamic/

An index directory holds what its scoring needs: ``embeddings.npy`` (dense), ``keys.json`` (BM25,
procedure), ``weights.json`` (procedure: term weights learned from the keys' task types at build),
and the indexes saved so that a load need not rebuild them: ``postings_*.npy`` (procedure),
``bm25/`` + ``bm25_vocab.json`` (BM25), ``faiss.index`` (dense banks of FAISS size); banks without
them rebuild them in memory. Keys and embeddings are per segment (a load joins them in order);
bank-wide files (weights, postings, bm25s, FAISS) are read from the last segment only: an append
writes them anew for the whole bank, and hard-links the older segments' files unchanged.
Banks written by older exprag hold the version's files directly in BANK_DIR (no CURRENT); they load
as they are, and a rebuild into them switches them to the versioned layout.

A build or an append (write-back) runs under BANK_DIR's lock: it writes a staging directory inside
BANK_DIR, renames it to a new version, then replaces CURRENT atomically. At every instant CURRENT
names a complete version (the old one until the replace, the new one after it), so a kill at any
point leaves a loadable bank; what a killed build left behind (staging, unused versions) is removed
by the next one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import secrets
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from exprag import __version__
from exprag.bank.encoders import Encoder, Index, make_encoder
from exprag.bank.labels import check_labels
from exprag.bank.scoring import ScoringConfig, build_index, extend_index, load_index, make_scoring_encoder
from exprag.checksums import check_file, mismatch, tree_records
from exprag.errors import BankError, DataFormatError
from exprag.io import (LOCK_FILE, atomic_write_json, atomic_write_text, check_output_dir, fsync_dir, naming,
                       pause_for_test, read_json_object, run_lock, sha256_file)
from exprag.envs.registry import rejections
from exprag.trajectory import (Trajectory, carried_out, check_unique_ids, history_text, iter_jsonl, read_jsonl,
                               write_jsonl)
from exprag.validate import read_json

BANK_FORMAT = "exprag-bank"
# 2: procedure-scored banks (a reader of version 1 would silently score them as plain dense / BM25);
# banks with plain scoring are still written as 1, so that older exprag reads them.
PROCEDURE_BANK_VERSION = 2
# 3: banks with appended segments (a reader of version 2 would see the first segment only).
SEGMENTED_BANK_VERSION = 3
BANK_VERSION = SEGMENTED_BANK_VERSION  # the newest this exprag reads
MODES = ("static", "dynamic")
CURRENT = "CURRENT"
_VERSION = re.compile(r"v-\d{8}T\d{6}-[0-9a-f]{6}")
_STAGING = ".exprag-build-"
_SEGMENT = re.compile(r"seg-\d{6}")
_FLAT_FILES = ("manifest.json", "trajectories.jsonl", "static", "dynamic")  # the pre-versioned layout
# the index files each segment holds for its own keys; the rest are bank-wide, read from the last segment
_PER_SEGMENT = ("embeddings.npy", "keys.json")


def static_key(t: Trajectory) -> str:
    return t.task


def dynamic_key(t: Trajectory) -> str:
    """The task and the actions the env carried out. Observations are left out: the first one (welcome
    banner, room listing) and the room descriptions that follow are mostly text every trajectory of
    the env shares, and they outweighed the task in the key (docs/retrieval-quality.md); so are
    actions the env rejected (a weak agent's non-actions, in a written-back trajectory)."""
    return history_text(t.task, carried_out(t.episode_messages(), rejections()))


@dataclass
class Bank:
    path: Path
    manifest: dict[str, Any]
    trajectories: list[Trajectory]
    encoder: Encoder
    _indexes: dict[str, Index] = field(default_factory=dict)
    data_dir: Path | None = None  # the version directory read (None: ``path`` itself)

    @property
    def files(self) -> Path:
        return self.data_dir or self.path

    def __len__(self) -> int:
        return len(self.trajectories)

    def index(self, mode: str) -> Index:
        if mode not in MODES:
            raise BankError(f"unknown retrieval mode {mode!r} (choose static or dynamic)")
        if mode not in self._indexes:
            verify_files(self.files, self.manifest, _read_set(self.manifest, mode))
            try:
                self._indexes[mode] = load_index(self.retrieval, self.encoder,
                                                 [d / mode for d in segment_dirs(self.files, self.manifest)])
            except (OSError, ValueError, EOFError, KeyError, TypeError, RecursionError) as e:
                # a truncated embeddings.npy, a garbled keys file: numpy / json say so in their own words
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise BankError(f"{self.files / mode}: unreadable index ({first}); the bank is corrupt, "
                                "rebuild it") from None
            if self._indexes[mode].size != len(self.trajectories):
                raise BankError(
                    f"{self.files / mode}: index holds {self._indexes[mode].size} keys but the bank "
                    f"has {len(self.trajectories)} trajectories; rebuild the bank"
                )
        return self._indexes[mode]

    @property
    def retrieval(self) -> ScoringConfig:
        """The scoring the bank was built with (plain dense / BM25 for banks older than the field)."""
        return ScoringConfig.from_manifest(self.manifest, str(self.files / "manifest.json"))

    @property
    def envs(self) -> list[str]:
        return list(self.manifest.get("envs", []))

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        d = {k: m[k] for k in ("count", "envs", "task_types", "success", "encoder", "created", "labels") if k in m}
        d["retrieval"] = self.retrieval.to_manifest()
        return d


def _summary(trajs: list[Trajectory]) -> dict[str, Any]:
    return {
        "count": len(trajs),
        "envs": sorted({t.env for t in trajs}),
        "splits": sorted({t.split for t in trajs}),
        "task_types": dict(sorted(Counter(t.task_type for t in trajs).items())),
        "success": {"successful": sum(t.success for t in trajs), "unsuccessful": sum(not t.success for t in trajs)},
        "sources": sorted({t.source for t in trajs}),
    }


def _scoring_labels(cfg: ScoringConfig, trajs: list[Trajectory]) -> tuple[list[str], dict[str, Any]]:
    """The labels ``procedure`` scoring learns its weights from, and the manifest's ``labels`` block.
    Labels that do not tell the procedures apart (one type, or unrelated to the task texts) are
    replaced by one shared label: uniform term weights instead of noise (``exprag.bank.labels``)."""
    labels = [t.task_type for t in trajs]
    if cfg.scoring != "procedure":
        return labels, {}
    check = check_labels([static_key(t) for t in trajs], labels)
    return (labels if check.useful else [""] * len(trajs)), {"labels": check.to_manifest()}


def build_bank(
    trajectories: Iterable[Trajectory],
    out: str | Path,
    encoder: str | Encoder = "minilm",
    *,
    sources: list[str | Path] = (),
    progress: bool = False,
    retrieval: ScoringConfig | str | None = None,
) -> Bank:
    """Encode static and dynamic keys and write a bank atomically to ``out``.

    ``retrieval``: how keys are scored (a ``ScoringConfig`` or a scoring name); default
    ``procedure``. The keys' task types are read here, at build time, by ``procedure`` scoring."""
    trajs = list(trajectories)
    if not trajs:  # name the inputs: they are what is empty
        raise BankError(f"{', '.join(map(str, sources)) or out}: no trajectories to build a bank from")
    check_unique_ids([(None, t) for t in trajs])
    cfg = retrieval if isinstance(retrieval, ScoringConfig) else ScoringConfig(retrieval or "procedure")
    cfg = cfg.installed()  # the manifest records the lexicon only if this build used it
    enc = make_scoring_encoder(encoder, cfg.scoring)
    cfg.check(enc)
    out = Path(out)
    check_output_dir(out, "bank", is_bank_dir)
    lock, staging = _begin(out)
    try:
        with naming(out):  # a full disk names the bank, whichever of its files met it
            write_jsonl(staging / "trajectories.jsonl", trajs)
            labels, label_check = _scoring_labels(cfg, trajs)
            indexes = {mode: build_index(cfg, enc, [key(t) for t in trajs], labels, mode, progress=progress)
                       for mode, key in (("static", static_key), ("dynamic", dynamic_key))}
            for mode, index in indexes.items():
                index.save(staging / mode)
            manifest = {
                "format": BANK_FORMAT,
                "bank_version": PROCEDURE_BANK_VERSION if cfg.scoring == "procedure" else 1,
                "exprag_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "encoder": enc.identity,
                "retrieval": cfg.to_manifest(),
                "keys": {"static": "task description", "dynamic": "task + the trajectory's actions"},
                **_summary(trajs),
                **label_check,
                "inputs": [{"path": str(p), "sha256": sha256_file(Path(p))} for p in sources],
                "files": tree_records(staging, ["trajectories.jsonl", *MODES]),
            }
            atomic_write_json(staging / "manifest.json", manifest)
            version = _publish(out, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        lock.close()
    return Bank(out, manifest, trajs, enc, dict(indexes), data_dir=version)


def segment_dirs(files: Path, manifest: dict[str, Any]) -> list[Path]:
    """The directories of a bank version's segments, in index order: the version itself (what the
    build wrote), then each append's ``seg-*`` directory named in the manifest's ``segments``."""
    names = manifest.get("segments", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and _SEGMENT.fullmatch(n) for n in names):
        raise BankError(f"{files / 'manifest.json'}: field 'segments' must be a list of seg-NNNNNN names")
    return [files] + [files / n for n in names]


def _read_set(manifest: dict[str, Any], what: str) -> list[str]:
    """The recorded files (manifest ``files``) a load of ``what`` reads: a mode's index (each segment's
    own keys, the last segment's bank-wide files) or ``trajectories.jsonl``. Older segments' copies of
    bank-wide files are not read, so not checked: with thousands of segments they would be most of
    the bytes."""
    names, recorded = manifest.get("segments") or [], manifest.get("files")
    if not isinstance(recorded, dict):  # none (an older bank), or malformed: verify_files says so
        return []
    last = names[-1] if isinstance(names, list) and names else ""
    out = []
    for rel in recorded:
        parts = str(rel).split("/")
        seg = parts[0] if _SEGMENT.fullmatch(parts[0]) else ""
        rest = parts[1:] if seg else parts
        if rest and rest[0] == what and (what == "trajectories.jsonl" or seg == last or rest[-1] in _PER_SEGMENT):
            out.append(rel)
    return out


def verify_files(files: Path, manifest: dict[str, Any], names: Iterable[str] | None = None,
                 full: bool = False) -> None:
    """Check the files the manifest recorded at write time (``names``; None: all of them) against their
    size and hash: every byte when ``full``, else cheaply (``exprag.checksums``). Banks written before
    the records (no ``files``) are not checked."""
    recorded = manifest.get("files")
    if recorded is None:
        return
    if not isinstance(recorded, dict):
        raise BankError(f"{files / 'manifest.json'}: field 'files' must be an object")
    fail = lambda p: BankError(mismatch(p, "bank", "the bank is corrupt: restore it, or rebuild it from "  # noqa: E731
                                                   "its sources"))
    for rel in (recorded if names is None else names):
        check_file(files / rel, recorded[rel], full, fail)


def check_bank_files(path: str | Path, verify: bool = False) -> dict[str, Any]:
    """The published version's manifest, after checking that the files it describes are there: each
    segment's trajectories (as many lines as the manifest's ``count``) and index directories, and the
    checksums a load checks (every recorded file, in full, with ``verify``). What ``bank info``
    reports, so that it never vouches for a bank a query would fail on."""
    files = bank_files(path)
    manifest = read_manifest(path, files)
    lines = 0
    for d in segment_dirs(files, manifest):
        for name in ("trajectories.jsonl", *MODES):
            p = d / name
            if p.is_symlink() or not (p.is_file() if name.endswith(".jsonl") else p.is_dir()):
                raise BankError(f"{p}: missing; the bank is incomplete (rebuild it from its sources, "
                                "or restore the directory)")
        with (d / "trajectories.jsonl").open("rb") as f:
            lines += sum(1 for line in f if line.strip())
    if lines != manifest.get("count"):
        raise BankError(f"{files / 'manifest.json'}: field 'count' is {manifest.get('count')} but the "
                        f"trajectory files hold {lines}; the bank is incomplete")
    if verify:
        verify_files(files, manifest, full=True)
    else:
        verify_files(files, manifest, [n for what in ("trajectories.jsonl", *MODES) for n in _read_set(manifest, what)])
    return manifest


def bank_trajectory_files(path: str | Path) -> list[Path]:
    """The ``trajectories.jsonl`` files of the bank's published version, in index order."""
    files = bank_files(path)
    return [d / "trajectories.jsonl" for d in segment_dirs(files, read_manifest(path, files))]


# ---- the versioned layout and its swap --------------------------------------------------------------
def _current(root: Path) -> str | None:
    pointer = root / CURRENT
    if pointer.is_symlink():  # never read (and print) a file elsewhere as if it were the pointer
        raise BankError(f"{pointer}: is a symbolic link, not the pointer exprag writes; remove it and "
                        "restore the bank")
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_bytes()[:256].decode("utf-8").strip()
    except UnicodeDecodeError:
        name = None
    if name is None or not _VERSION.fullmatch(name) or not (root / name).is_dir():
        shown = repr(name[:80]) if name is not None else "bytes that are not UTF-8 text"
        raise BankError(f"{pointer}: names {shown}, which is not a version of this bank (v-...); "
                        "point it at one, or rebuild the bank from its sources")
    return name


def bank_files(path: str | Path) -> Path:
    """The directory holding a bank's files: the version CURRENT names, or BANK_DIR itself for a bank
    written before versions."""
    path = Path(path)
    name = _current(path)
    return path / name if name else path


def _is_bank_entry(name: str) -> bool:
    return (name in (CURRENT, LOCK_FILE) or bool(_VERSION.fullmatch(name)) or name.startswith(_STAGING)
            or (name.startswith(f".{CURRENT}.") and name.endswith(".tmp")))


def is_bank_dir(path: str | Path) -> bool:
    """A directory exprag may replace with a new bank: a bank of either layout, or what a killed first
    build left (only names a build writes)."""
    path = Path(path)
    manifest = read_json_object(path / "manifest.json")
    if manifest is not None and manifest.get("format") == BANK_FORMAT:
        return True
    return path.is_dir() and all(_is_bank_entry(e) for e in os.listdir(path))


def _begin(root: Path, wait: float = 0.0) -> tuple[contextlib.ExitStack, Path]:
    """Lock the bank (held until the returned stack is closed; waiting up to ``wait`` seconds for
    another writer), remove what killed builds left, and make a staging directory inside it."""
    lock = contextlib.ExitStack()
    lock.enter_context(run_lock(root, "bank", wait=wait))
    try:
        _remove_unused(root)
        staging = root / f"{_STAGING}{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()
    except BaseException:
        lock.close()
        raise
    return lock, staging


def _remove_unused(root: Path) -> None:
    """Under the bank's lock: remove staging directories and versions CURRENT does not name (left by
    killed builds), and the files of the pre-versioned layout once CURRENT exists."""
    try:
        keep, drop_versions = _current(root), True
    except BankError:  # a broken pointer: keep every version until a new one is published
        keep, drop_versions = None, False
    for name in os.listdir(root):
        p = root / name
        if name.startswith(_STAGING) or (drop_versions and _VERSION.fullmatch(name) and name != keep) \
                or (keep and name in _FLAT_FILES):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        elif name.startswith(f".{CURRENT}.") and name.endswith(".tmp"):
            p.unlink(missing_ok=True)
    # Older exprag swapped banks through siblings; what a killed swap left there is a bank or a staging
    # directory (a moved-away plain file stays: it was the user's).
    for p in root.parent.glob(f".{root.name}.*-*"):
        kind = p.name[len(root.name) + 2:].split("-", 1)[0]
        if p.is_dir() and not p.is_symlink() and (kind in ("build", "append") or
                                                  (kind == "old" and is_bank_dir(p))):
            shutil.rmtree(p, ignore_errors=True)


def _publish(root: Path, staging: Path) -> Path:
    """Rename the complete staging directory to a new version, point CURRENT at it (one atomic
    replace: readers see the old version or the new one, never neither), then drop the old one."""
    pause_for_test("bank-staged")
    version = root / f"v-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
    os.rename(staging, version)
    fsync_dir(root)
    pause_for_test("bank-renamed")
    atomic_write_text(root / CURRENT, version.name + "\n")
    fsync_dir(root)
    pause_for_test("bank-switched")
    _remove_unused(root)
    return version


def build_bank_from_files(paths: list[str | Path], out: str | Path, encoder: str = "minilm",
                          progress: bool = False, retrieval: ScoringConfig | str | None = None) -> Bank:
    return build_bank(read_jsonl(*paths), out, encoder, sources=list(paths), progress=progress,
                      retrieval=retrieval)


def read_manifest(path: str | Path, files: Path | None = None) -> dict[str, Any]:
    """The bank's manifest, checked; ``files``: the version directory already resolved (``bank_files``),
    so that a caller reading more of the bank reads one version even while a rebuild switches CURRENT."""
    path = Path(path)
    if not path.is_dir():
        raise BankError(f"{path}: no bank directory here (build one with `exprag bank build`)")
    mf = (files or bank_files(path)) / "manifest.json"
    if not mf.is_file():
        raise BankError(f"{mf}: missing; {path} is not an exprag bank")
    manifest = read_json(mf, BankError)
    if not isinstance(manifest, dict):
        raise BankError(f"{mf}: expected a JSON object; {path} is not an exprag bank")
    if manifest.get("format") != BANK_FORMAT:
        raise BankError(f"{mf}: field 'format' is {manifest.get('format')!r}, not {BANK_FORMAT!r}")
    version = manifest.get("bank_version")
    if not isinstance(version, int):
        raise BankError(f"{mf}: field 'bank_version' missing or not an integer")
    if version > BANK_VERSION:
        raise BankError(
            f"{mf}: field 'bank_version' is {version}, newer than this exprag reads ({BANK_VERSION}); upgrade exprag"
        )
    return manifest


def reusable_manifest(path: str | Path, sources: list[Path], encoders: Iterable[str | None],
                      scoring: str) -> dict[str, Any] | None:
    """The manifest of the bank at ``path`` when that bank can serve as is: built from exactly
    ``sources`` (paths and contents), with one of ``encoders`` and with ``scoring``. None when it must
    be (re)built: absent, unreadable, or built from other inputs or settings."""
    want = [{"path": str(f), "sha256": sha256_file(f)} for f in sources]
    try:
        manifest = read_manifest(path)
        fresh = (manifest.get("inputs") == want and manifest["encoder"]["name"] in set(encoders)
                 and (manifest.get("retrieval") or {}).get("scoring", "dense") == scoring)
    except (BankError, KeyError, TypeError):
        return None
    return manifest if fresh else None


def load_bank(path: str | Path, encoder: str | None = None) -> Bank:
    """Open a bank. ``encoder``, when given, must match the one the bank was built with."""
    path = Path(path)
    files = bank_files(path)
    manifest = read_manifest(path, files)
    identity = manifest.get("encoder")
    if not isinstance(identity, dict):
        raise BankError(f"{files / 'manifest.json'}: field 'encoder' missing")
    if encoder is not None and encoder != identity.get("name"):
        raise BankError(
            f"{files / 'manifest.json'}: field 'encoder' is {identity.get('name')!r} but {encoder!r} was "
            "asked for; query with the bank's encoder or rebuild the bank"
        )
    verify_files(files, manifest, _read_set(manifest, "trajectories.jsonl"))
    trajs = [t for d in segment_dirs(files, manifest) for t in iter_jsonl(d / "trajectories.jsonl")]
    if len(trajs) != manifest.get("count"):
        raise BankError(
            f"{files / 'manifest.json'}: field 'count' is {manifest.get('count')} but "
            f"trajectories.jsonl holds {len(trajs)}; the bank is incomplete (restore it, or rebuild it "
            "from its sources)"
        )
    bank = Bank(path, manifest, trajs, make_encoder(identity), data_dir=files if files != path else None)
    bank.retrieval  # validate the retrieval block now, not at the first query
    return bank


# How long a write-back waits for another writer of the bank (an append, or a build of a large bank).
APPEND_LOCK_WAIT_S = 600.0


def append_to_bank(bank: Bank, new: list[Trajectory], *, skip_known: bool = False,
                   wait: float = APPEND_LOCK_WAIT_S) -> Bank:
    """Write-back memory: the new trajectories go to a new segment of a new version; the files of the
    old segments are hard-linked into it, not rewritten. Bank-wide files (procedure term weights and
    postings, the bm25s index, the FAISS graph) are written for the whole bank into the new segment,
    which readers take them from. Published atomically, as a build.

    The append holds the bank's lock (waiting up to ``wait`` seconds for another writer) and builds
    on the version published at that moment, not on the one ``bank`` was loaded from: another
    process may have appended or rebuilt since, and its version is what this one extends.
    ``skip_known``: trajectories whose id the bank already holds are left out (a resumed run
    re-offering what it wrote before); otherwise such an id is an error. Returns the bank as
    published (``bank`` itself when nothing was new)."""
    if not new:
        return bank
    lock, staging = _begin(bank.path, wait=wait)
    try:
        bank = _published(bank)
        known = {t.id for t in bank.trajectories}
        if skip_known:
            new = [t for t in new if t.id not in known]
        else:
            clash = next((t.id for t in new if t.id in known), None)
            if clash is not None:
                raise DataFormatError(f"field 'id': trajectory id {clash!r} is already in {bank.path}")
        check_unique_ids([(None, t) for t in new])
        if not new:
            shutil.rmtree(staging, ignore_errors=True)
            return bank
        trajs = bank.trajectories + list(new)
        enc = bank.encoder
        cfg = bank.retrieval
        labels, label_check = _scoring_labels(cfg, trajs)
        old_segments = list(bank.manifest.get("segments", []))
        segment = f"seg-{len(old_segments) + 1:06d}"
        with naming(bank.path):  # a full disk names the bank
            for src in segment_dirs(bank.files, bank.manifest):
                _link_segment(src, staging / src.relative_to(bank.files))
            write_jsonl(staging / segment / "trajectories.jsonl", list(new))
            indexes: dict[str, Index] = {}
            for mode, key in (("static", static_key), ("dynamic", dynamic_key)):
                prev = bank.index(mode)
                # the stored keys stay as they were built (the key rule may have changed since)
                kept = getattr(prev, "texts", None)
                keys = (list(kept) if kept is not None and len(kept) == len(bank.trajectories)
                        else [key(t) for t in bank.trajectories]) + [key(t) for t in new]
                indexes[mode] = extend_index(cfg, enc, prev, keys, labels, mode)
                indexes[mode].save(staging / segment / mode, start=len(bank.trajectories))
            manifest = dict(bank.manifest)
            manifest.update(_summary(trajs))
            manifest.update(label_check)
            manifest["segments"] = old_segments + [segment]
            # the linked segments keep their records (same bytes); a bank from before the field gets
            # records for the new segment only: what this append wrote is all it can vouch for
            manifest["files"] = {**(bank.manifest.get("files") or {}),
                                 **{f"{segment}/{k}": v for k, v in
                                    tree_records(staging / segment, ["trajectories.jsonl", *MODES]).items()}}
            manifest["bank_version"] = SEGMENTED_BANK_VERSION
            manifest["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            atomic_write_json(staging / "manifest.json", manifest)
            version = _publish(bank.path, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        lock.close()
    return Bank(bank.path, manifest, trajs, enc, indexes, data_dir=version)


def _published(bank: Bank) -> Bank:
    """Under the bank's lock: ``bank`` if it is the version CURRENT names, else that version, opened
    (with ``bank``'s encoder when the identity is the same, so that its model is not loaded again)."""
    if bank_files(bank.path) == bank.files:
        return bank
    current = load_bank(bank.path)
    if current.manifest.get("encoder") == bank.manifest.get("encoder"):
        current.encoder = bank.encoder
    return current


def _link_segment(src: Path, dst: Path) -> None:
    """Hard-link one segment's files (its trajectories and index directories, not the manifest or
    other segments) into ``dst``: the new version shares them, byte for byte, inode for inode."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("trajectories.jsonl", *MODES):
        p = src / name
        if p.is_symlink() or not p.exists():  # never publish a version that lacks a segment's files
            raise BankError(f"{p}: missing (or a link); the bank version being extended is incomplete")
        if p.is_dir():
            shutil.copytree(p, dst / name, copy_function=os.link)
        else:
            os.link(p, dst / name)
