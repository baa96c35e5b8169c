"""Atomic file writes: write beside the target, fsync, rename. A crash leaves the old file intact.

Also the two guards of every output: ``check_output_dir`` / ``check_output_file`` (exprag writes only
where nothing of someone else's can be lost) and ``run_lock`` (one exprag process per run directory).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """An OSError of the block that names no file (a full disk, a quota, a read-only file system
    met by write() or fsync()) is raised again naming ``path``: the user must know which output."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None and not isinstance(e, (BrokenPipeError, ConnectionError)):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    with naming(path):
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


def not_a_file(path: Path) -> str:
    """Why ``path``, given as an input file, is not one: said as it is, not always "no such file"."""
    if path.is_dir():
        return "is a directory, not a file"
    if path.exists():
        return "is not a regular file (a FIFO, socket or device)"
    if path.is_symlink():
        return "is a symbolic link to nothing (broken, or a loop)"
    return "no such file"


def iter_json_lines(path: str | Path, *, torn_tail: bool = False) -> Iterator[tuple[str, Any]]:
    """``(file:line, object)`` for each non-blank line of a JSONL file; a missing file or a bad line is
    a DataFormatError naming the file and line. ``torn_tail``: a last line that is not JSON is left out
    instead (an append cut short by a kill; the episode it recorded is redone)."""
    from exprag.errors import DataFormatError

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: {not_a_file(path)}")
    with path.open("rb") as f:  # decoded line by line, so that bad bytes are reported with their line
        lines = enumerate(f, 1)
        nxt = next(lines, None)
        while nxt is not None:
            (lineno, raw), nxt = nxt, next(lines, None)
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                obj = json.loads(line)
            except UnicodeDecodeError as e:
                if torn_tail and nxt is None:
                    return
                raise DataFormatError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            except json.JSONDecodeError as e:
                if torn_tail and nxt is None:
                    return
                raise DataFormatError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataFormatError(f"{where}: invalid JSON (nested too deeply)") from None
            yield where, obj


def open_own(path: str | Path, flags: int, mode: int = 0o666) -> int:
    """``os.open`` of a file exprag writes in its own directories, never through a symlink planted
    there (O_NOFOLLOW): exprag runs as root on shared machines, and a link to another file would get
    that file truncated or appended to. OutputPathError naming the path when it is a link."""
    from exprag.errors import OutputPathError

    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode & ~_UMASK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputPathError(f"{path}: is a symbolic link; exprag writes only its own files here, "
                                  "remove the link") from None
        raise


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one JSON line and fsync (results logs: a killed run keeps every finished line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming(path), os.fdopen(open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_torn_tail(path: str | Path) -> bool:
    """Drop a last line left without its newline by a kill mid-append; True if something was cut."""
    path = Path(path)
    if not path.is_symlink() and (not path.is_file() or path.stat().st_size == 0):
        return False
    with os.fdopen(open_own(path, os.O_RDWR), "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
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


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (a power cut must not bring back the old entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- what exprag may write ------------------------------------------------------------------------
# The rule for every --out: a path is written only when it is absent, an empty directory, or
# something exprag made (recognised by its own files: a bank manifest, a run's config, a JSONL file of
# the kind the command writes). Anything else is refused before any work, and left untouched.

LOCK_FILE = ".exprag.lock"


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    return p


def refuse_unexpanded_home(path: str | Path, flag: str = "--out") -> None:
    """A path that begins with ``~`` reached exprag unexpanded (a config file, a quoted argument):
    written as it is, it would make a directory named ``~`` here. The user means their home."""
    from exprag.errors import OutputPathError

    if str(path).startswith("~"):
        raise OutputPathError(f"{path}: {flag} starts with '~', which only a shell expands; write the "
                              f"full path ({Path(str(path)).expanduser()} for your home)")


def check_writable(path: str | Path, flag: str = "--out") -> None:
    """``path`` (existing) or the nearest existing directory above it must be writable; checked before
    the work, so that a long run does not fail at its last write. Creates nothing."""
    from exprag.errors import OutputPathError

    refuse_unexpanded_home(path, flag)
    path = Path(path)
    where = path if path.is_dir() else _nearest_existing(path.parent)
    if not where.is_dir():
        raise OutputPathError(f"{path}: {flag} is not writable ({where} is not a directory)")
    if not os.access(where, os.W_OK | os.X_OK):
        raise OutputPathError(f"{path}: {flag} is not writable (no write permission on {where})")
    if path.is_file() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{path}: {flag} is not writable (the file is read-only)")


def check_output_dir(path: str | Path, what: str, owned: Callable[[Path], bool]) -> None:
    """Refuse (OutputPathError, nothing touched) unless ``path`` is absent, an empty directory (a lock
    file left by a killed exprag counts as empty), or an exprag ``what`` as told by ``owned(path)``."""
    from exprag.errors import OutputPathError

    refuse_unexpanded_home(path)
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise OutputPathError(f"{path}: a broken symbolic link; exprag writes its {what} only to an "
                              "absent or empty directory or to one of its own")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path}: exists and is not a directory; exprag writes its {what} only to an "
                              "absent or empty directory or to one of its own")
    if path.is_dir():
        if os.path.realpath(path) not in _held:
            refuse_if_locked(path, what)
        entries = sorted(e for e in os.listdir(path) if e != LOCK_FILE)
        if entries and not owned(path):
            raise OutputPathError(
                f"{path}: not empty and not an exprag {what} (it holds {entries[0]!r}"
                f"{f' and {len(entries) - 1} more' if len(entries) > 1 else ''}); exprag never replaces "
                "or writes into files it did not create: choose an absent or empty directory")
    check_writable(path)


def check_output_file(path: str | Path, what: str, owned: Callable[[Path], bool]) -> None:
    """Refuse (OutputPathError, nothing touched) unless ``path`` is absent, empty, or a file exprag
    wrote (``owned(path)``: the first record is of the kind the command writes)."""
    from exprag.errors import OutputPathError

    refuse_unexpanded_home(path)
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path}: --out is a directory; give a file path for the {what}")
    if path.exists() and path.stat().st_size > 0 and not owned(path):
        raise OutputPathError(f"{path}: exists and is not an exprag {what}; exprag never replaces files it "
                              "did not create: remove it or choose another path")
    check_writable(path)


def first_json_record(path: str | Path, limit: int = 1 << 24) -> Any:
    """The first non-blank line of a JSONL file, parsed; None when unreadable or not JSON."""
    try:
        with Path(path).open("rb") as f:
            for raw in f:
                if raw.strip():
                    return json.loads(raw[:limit].decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return None


def read_json_object(path: str | Path) -> dict[str, Any] | None:
    """A JSON file's top-level object; None when missing, unreadable, or not an object."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


# ---- one process per run directory ------------------------------------------------------------------
# An exclusive flock on RUN_DIR/.exprag.lock. The kernel drops it when its holder dies, however it dies
# (kill -9 included), so a killed run's lock is taken over by the next process without any staleness
# guess; the file records the holder's PID and host for the message a second process gets. Locks are
# re-entrant within a process (an experiment evaluates cells and trains adapters under its own lock).

_held: dict[str, list[Any]] = {}  # realpath of the run dir -> [fd, depth]


def _read_holder(fd: int) -> str:
    for _ in range(50):  # the holder writes its PID just after locking: give it that moment
        try:
            text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
        except OSError:
            return ""
        if text:
            return text.splitlines()[0]
        time.sleep(0.01)
    return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _locked_error(fd: int, lock: Path, directory: Path, what: str) -> Exception:
    from exprag.errors import RunLockedError

    pid, _, host = _read_holder(fd).partition(" ")
    host = host.split(" ")[0]
    here = not host or host == socket.gethostname()
    who = f"exprag process {pid}" + ("" if here else f" on {host}") if pid else "another exprag process"
    if pid.isdigit() and here and not _alive(int(pid)):
        who += " (no longer running: a process it started still holds the lock)"
    return RunLockedError(f"{directory}: {what} in use by {who} (lock {lock}); wait for it to finish or "
                          "stop it, or choose another --out")


def refuse_if_locked(directory: str | Path, what: str = "run directory") -> None:
    """RunLockedError when another process holds ``directory``'s lock; creates nothing (a running
    run's half-written files must not be judged as someone else's)."""
    import fcntl

    lock = Path(directory) / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _locked_error(fd, lock, Path(directory), what) from None
    finally:
        os.close(fd)


def _acquire(lock: Path, directory: Path, what: str, wait: float = 0.0) -> int:
    import fcntl

    deadline = time.monotonic() + wait
    while True:
        fd = open_own(lock, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() < deadline:  # a short critical section of another process: wait it out
                os.close(fd)
                time.sleep(0.05)
                continue
            err = _locked_error(fd, lock, directory, what)
            os.close(fd)
            raise err from None
        except BaseException:
            os.close(fd)
            raise
        # The holder we waited on may have removed the file between our open and our flock: then we
        # hold a lock on a dead inode, and must lock the file that is there now.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
                      .encode(), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def run_lock(directory: str | Path, what: str = "run directory", wait: float = 0.0) -> Iterator[Path]:
    """Hold the run directory's lock for the block (creating the directory when absent); a second
    exprag process gets RunLockedError naming this one's PID (after waiting up to ``wait`` seconds
    for it). A directory the lock created is removed again if nothing else was written into it."""
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(directory)
    if key in _held:
        _held[key][1] += 1
        try:
            yield directory
        finally:
            _held[key][1] -= 1
        return
    lock = directory / LOCK_FILE
    fd = _acquire(lock, directory, what, wait)
    _held[key] = [fd, 1]
    try:
        pause_for_test("locked")
        yield directory
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            lock.unlink()  # still holding it: a process that opened the old file re-locks the new one
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty


def pause_for_test(stage: str) -> None:
    """Test hook for kill tests: with EXPRAG_TEST_PAUSE_AT=<stage> and EXPRAG_TEST_PAUSE_FILE=<path>
    in the environment, create that file on reaching ``stage`` and wait there to be killed."""
    if os.environ.get("EXPRAG_TEST_PAUSE_AT") != stage:
        return
    Path(os.environ["EXPRAG_TEST_PAUSE_FILE"]).write_text(str(os.getpid()))
    while True:
        time.sleep(60)
