"""Checkpoints of a training run: adapter (PEFT) + trainer_state.json, and in the newest one only the
optimizer and RNG states to resume from. State files are read with ``weights_only=True``."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

from exprag.checksums import check_adapter, record_adapter
from exprag.io import atomic_write_json, replace_dir
from exprag.train.rundir import RunDirError


def epoch_checkpoint(epoch: int) -> str:
    """The checkpoint name after ``epoch`` epochs (1-based)."""
    return f"epoch-{epoch:03d}"


def step_checkpoint(step: int) -> str:
    """The name of a mid-epoch checkpoint after optimizer step ``step``."""
    return f"step-{step:06d}"


def save_checkpoint(model: Any, optimizer: Any, out: Path, name: str, state: dict[str, Any],
                    keep: int | None, protected: set[str]) -> Path:
    """Adapter + trainer state, written to a staging dir and swapped in; the optimizer state (and
    RNG) moves to the newest checkpoint only: older ones keep just their adapter. ``keep`` prunes
    the oldest adapters, never those named in ``protected`` (the best by rollout success)."""
    import torch

    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    staging = ckpts / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    record_adapter(staging)  # what eval, serve and a resume check the weights against
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    torch.save(rng_state(), staging / "rng.pt")
    atomic_write_json(staging / "trainer_state.json", state)
    target = ckpts / name
    replace_dir(staging, target)
    atomic_write_json(out / "state.json", {"last": f"checkpoints/{name}", **state})
    for old in sorted(ckpts.iterdir()):
        if old.name != name and not old.name.startswith("."):
            for f in ("optimizer.pt", "rng.pt"):
                (old / f).unlink(missing_ok=True)
    if keep is not None:
        adapters = sorted((p for p in ckpts.iterdir() if not p.name.startswith(".")),
                          key=lambda p: trainer_state(p)["global_step"])
        for old in adapters[:-keep]:
            if old.name not in protected:
                shutil.rmtree(old, ignore_errors=True)
    return target


def trainer_state(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json: epoch, batches_done, batches_in_epoch, global_step
    (+ ``sums`` in a mid-epoch checkpoint)."""
    return json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))


def resumed_step(ckpt: Path | None) -> int:
    """The optimizer step a run resumes after (0 = a fresh start)."""
    return 0 if ckpt is None else int(trainer_state(ckpt)["global_step"])


def load_checkpoint(ckpt: Path, model: Any, optimizer: Any) -> dict[str, Any]:
    """Restore adapter weights, optimizer state and every RNG from ``ckpt``; returns its trainer state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    check_adapter(ckpt, RunDirError)
    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
    optimizer.load_state_dict(load_checkpoint_file(ckpt / "optimizer.pt"))
    state = trainer_state(ckpt)
    set_rng_state(load_checkpoint_file(ckpt / "rng.pt", numpy_arrays=True))
    return state


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, ints, floats and strings only: what ``torch.load`` reads back
    with ``weights_only=True`` (numpy's key array becomes a tensor)."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    st = {"python": [version, torch.tensor(py_state, dtype=torch.int64), py_gauss],
          "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, py_state, py_gauss = st["python"]
    random.setstate((version, tuple(int(x) for x in py_state), py_gauss))
    kind, keys, pos, has_gauss, gauss = st["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys  # a numpy array: earlier versions
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def load_checkpoint_file(path: Path, *, numpy_arrays: bool = False) -> Any:
    """A checkpoint file (optimizer state, RNG state) read with ``weights_only=True``: tensors and
    plain containers only. A file that needs anything else (a crafted or foreign pickle could run
    code while loading) is refused, not loaded. ``numpy_arrays`` also admits plain numpy arrays
    (the RNG files of earlier versions held numpy's state as one); their contents still go
    through the same restricted unpickler."""
    import pickle

    import numpy as np
    import torch

    allowed = [np.ndarray, np.dtype, np.dtypes.UInt32DType, getattr(np, "_core", np.core).multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(allowed if numpy_arrays else []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError) as e:
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(e))
        why = f"it needs {found[1]}" if found else (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RunDirError(f"{path}: refused: not a checkpoint of plain tensors ({why}); exprag loads "
                          "checkpoint files with weights_only=True, which runs no code from the file") from None
