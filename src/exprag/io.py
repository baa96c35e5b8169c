"""Atomic file writes: write beside the target, fsync, rename. A crash leaves the old file intact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a results file should read like any other
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def replace_dir(staging: Path, target: Path) -> None:
    """Swap a fully written staging directory into place; the previous target survives any failure
    before the final rename, and is removed only after it."""
    target = Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def iter_json_lines(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``(file:line, object)`` for each non-blank line of a JSONL file; a missing file or a bad line is
    a DataFormatError naming the file and line."""
    from exprag.errors import DataFormatError

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    with path.open("rb") as f:  # decoded line by line, so that bad bytes are reported with their line
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataFormatError(f"{where}: invalid JSON (nested too deeply)") from None
            yield where, obj


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one JSON line and fsync (results logs: a killed run keeps every finished line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_torn_tail(path: str | Path) -> bool:
    """Drop a last line left without its newline by a kill mid-append; True if something was cut."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return False
        f.truncate(data.rfind(b"\n") + 1)
    return True


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def staging_dir(target: str | Path, tag: str = "tmp") -> Path:
    """A temp dir beside ``target`` (same filesystem, so the final rename is atomic) with the
    permissions of a normal mkdir rather than mkdtemp's 0700."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}-", dir=target.parent))
    tmp.chmod(0o777 & ~_UMASK)
    return tmp
