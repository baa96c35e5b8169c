"""The LoRA recipe (docs/method.md#lora-recipe) and ExpRAG-LoRA (docs/method.md#exprag-lora): a plain
torch loop on transformers + peft.

Why not TRL's SFTTrainer: our examples are already tokenized with exact masks, and what we need
around the loop (length-bucketed batches, adapter-only checkpoints with optimizer state, rollout
selection between epochs) is short to write and measured faster here (bench/bench_train.py).

Multi-GPU without code changes: the loop runs under ``accelerate.Accelerator``; launched with
``accelerate launch -m exprag train ...`` or ``torchrun --nproc_per_node N -m exprag train ...``
each process trains on its share of the batches (DDP), the main process writes everything.

Run directory layout::

    train_config.yaml        the resolved config
    data_report.json         examples, tokens, trimmed / truncated / dropped, warnings, inputs (sha256)
    metrics.jsonl            {"event": "step" | "epoch" | "eval", ...}: loss, tokens/s, val loss, success
    checkpoints/epoch-003/   adapter (PEFT) + trainer_state.json; the latest also optimizer.pt, rng.pt
    checkpoints/step-000120/ mid-epoch checkpoints (save_every_steps)
    state.json               the latest checkpoint (resume point)
    selection.json/.png, best -> checkpoints/epoch-00N   with rollout selection (see select.py)
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
import time
import warnings
from datetime import timedelta
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from exprag.config import changed_fields
from exprag.errors import ExpragError
from exprag.io import (LOCK_FILE, append_jsonl, atomic_write_json, atomic_write_text, check_output_dir,
                       pause_for_test, replace_dir, run_lock, sha256_file)
from exprag.train.config import TrainConfig, TrainConfigError, to_dict
from exprag.train.data import (
    BuildReport,
    Example,
    build_examples,
    collate,
    length_batches,
    load_trajectories,
    split_micro,
)

Log = Callable[[str], None]

# Attention projection names by architecture family, tried in order (LoRA on q/k/v/o: docs/method.md#d-precision).
_ATTENTION_SETS = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # Llama, Qwen2/3, Mistral, Gemma, SmolLM, Phi-3.5-MoE
    ("q_proj", "k_proj", "v_proj", "out_proj"),  # OPT, BART-like
    ("qkv_proj", "o_proj"),  # Phi-3 (fused q/k/v)
    ("query_key_value", "dense"),  # GPT-NeoX, Falcon
    ("Wqkv", "out_proj"),  # MPT
    ("c_attn",),  # GPT-2 (fused; its c_proj name is shared with the MLP, so left out)
)
_NON_TEXT = ("vision", "visual", "image", "audio", "multi_modal_projector", "mm_projector")
CONFIG_FILE = "train_config.yaml"
# Fields that may change when resuming (more epochs, other logging / selection); anything else
# would make the resumed run a different experiment.
# Running sums a mid-epoch checkpoint carries (epoch totals, then the open logging window), so that
# a resumed epoch logs the same loss and token counts as an uninterrupted one. JSON keeps floats exact.
_SUMS = ("ep_loss", "ep_items", "ep_tokens", "ep_time", "ep_cpu", "win_loss", "win_items", "win_tokens", "win_time")
_RESUMABLE_CHANGES = {"epochs", "out", "save_every_steps", "log_every_steps", "keep_checkpoints",
                      "selection", "val_trajectories"}


class RunDirError(ExpragError):
    """An output directory that exists (without --resume / --overwrite) or cannot be resumed."""


@dataclass
class TrainResult:
    out: Path
    epochs_done: int
    steps: int
    last_checkpoint: Path | None
    best_checkpoint: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    tokens_per_s: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


# ---- model pieces ----------------------------------------------------------------------------------
def attention_targets(model: Any) -> list[str] | str:
    """LoRA target modules: the attention q/k/v/o projections of the text decoder. A regex that
    skips vision / audio towers when the model has them (e.g. Gemma-3's SigLIP tower also has
    q/k/v projections)."""
    names = [n for n, _ in model.named_modules()]
    for group in _ATTENTION_SETS:
        if all(any(n.endswith("." + g) for n in names) for g in group):
            if any(any(t in n for t in _NON_TEXT) for n in names):
                skip = "|".join(_NON_TEXT)
                return rf"^(?!.*({skip})).*\.({'|'.join(group)})$"
            return list(group)
    raise TrainConfigError(
        f"cannot find attention projections in {type(model).__name__}; set lora.target_modules in the config"
    )


def cpu_bf16_native() -> bool:
    """True on CPUs with bf16 matrix instructions (AVX512-BF16, AMX): there bf16 autocast trains
    ~1.5x faster than fp32 (measured on SmolLM2-135M); elsewhere bf16 is emulated and slow."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str) -> str:
    """'bf16' or 'fp32': ``auto`` = bf16 where the hardware supports it (docs/method.md#d-precision), else fp32."""
    import torch

    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_bf16_native() else "fp32"


def make_optimizer(params: list[Any], cfg: TrainConfig) -> tuple[Any, str]:
    import torch

    if cfg.optimizer in ("auto", "paged_adamw_8bit"):
        try:
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay), "PagedAdamW8bit"
        except Exception as e:  # not installed, or no CUDA build
            if cfg.optimizer == "paged_adamw_8bit":
                raise TrainConfigError(f"optimizer paged_adamw_8bit needs bitsandbytes: {e}") from None
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay), "AdamW"


def load_model(spec: str, *, dtype: Any = None, device: Any = None) -> tuple[Any, Any, Any]:
    """(tokenizer, model, resolved) through exprag.llm's model resolution (bundled alias, local
    directory or .gguf, cached hub id). A CUDA ``device`` loads the weights straight onto it (each
    process of a multi-GPU run onto its own GPU, without a copy in host memory first)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exprag.llm.models import quiet_transformers, resolve_model

    resolved = resolve_model(spec)
    place = {"device_map": {"": device}} if device is not None and torch.device(device).type == "cuda" else {}
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype or torch.float32, **place)
    if not tokenizer.chat_template:
        raise TrainConfigError(f"model {spec!r} ({resolved.path}) has no chat template to train with")
    return tokenizer, model, resolved


def add_lora(model: Any, cfg: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora.target_modules or attention_targets(model)
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft calls a transformers property deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, lcfg)


# ---- run directory ---------------------------------------------------------------------------------
def _inputs(cfg: TrainConfig) -> list[dict[str, str]]:
    return [{"path": str(p), "sha256": sha256_file(Path(p))} for p in cfg.trajectories]


def prepare_run_dir(cfg: TrainConfig, *, resume: bool, overwrite: bool, main: bool = True) -> Path | None:
    """Create or check ``cfg.out``. Returns the checkpoint to resume from (None = fresh start)."""
    out = Path(cfg.out)
    if resume and overwrite:
        raise RunDirError("choose one of --resume and --overwrite")
    exists = out.exists() and any(p.name != LOCK_FILE for p in out.iterdir())
    if exists and not (resume or overwrite):
        raise RunDirError(f"{out} exists; pass --resume to continue its training or --overwrite to "
                          "start over (which deletes it)")
    if exists and overwrite:
        if main:  # everything but the lock this process holds
            for p in out.iterdir():
                if p.name != LOCK_FILE:
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
        return None
    if not exists or not (out / "state.json").is_file():
        return None
    saved_file = out / CONFIG_FILE
    if saved_file.is_file():
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
        now = to_dict(cfg)
        changed = changed_fields(saved, now, _RESUMABLE_CHANGES)
        if changed:
            key = changed[0]
            raise RunDirError(
                f"{saved_file}: field {key!r} was {saved.get(key)!r}, now {now.get(key)!r}; a resumed "
                "run must keep its recipe (only epochs, logging and selection may change); use --overwrite"
            )
    report = out / "data_report.json"
    if report.is_file():
        before = json.loads(report.read_text(encoding="utf-8")).get("inputs", [])
        if before and before != _inputs(cfg):
            raise RunDirError(f"{report}: the training files changed since this run started; use --overwrite")
    state = json.loads((out / "state.json").read_text(encoding="utf-8"))
    ckpt = out / state["last"]
    if not (ckpt / "optimizer.pt").is_file():
        raise RunDirError(f"{ckpt}: missing optimizer.pt; this checkpoint cannot be resumed")
    return ckpt


def _save_checkpoint(model: Any, optimizer: Any, out: Path, name: str, state: dict[str, Any],
                     keep: int | None, protected: set[str]) -> Path:
    """Adapter + trainer state, written to a staging dir and swapped in; the optimizer state (and
    RNG) moves to the newest checkpoint only: older ones keep just their adapter."""
    import torch

    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    staging = ckpts / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    torch.save(_rng_state(), staging / "rng.pt")
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
                          key=lambda p: json.loads((p / "trainer_state.json").read_text())["global_step"])
        for old in adapters[:-keep]:
            if old.name not in protected:
                shutil.rmtree(old, ignore_errors=True)
    return target


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(st: dict[str, Any]) -> None:
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


def _resumed_step(ckpt: Path | None) -> int:
    if ckpt is None:
        return 0
    return int(json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])


def _trim_metrics(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(keep))


def peak_memory_mb() -> float:
    """Peak GPU memory allocated (CUDA), else the process's peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


# ---- data -------------------------------------------------------------------------------------------
def leakage_warnings(cfg: TrainConfig, bank: Any, trajs: list[Any]) -> list[str]:
    """Loud warnings: evaluation-split trajectories in the bank or the training data leak."""
    bad_splits = {"test"} | ({cfg.selection.split} if cfg.selection.every else set())
    out = []
    if bank is not None:
        for split in sorted(bad_splits):
            n = sum(1 for t in bank.trajectories if t.split == split)
            if n:
                out.append(f"WARNING: LEAKAGE: bank {cfg.retrieval.bank} holds {n} trajectories of the {split!r} split; "
                           f"training with it leaks evaluation data. Build the training bank from train-split "
                           f"trajectories only.")
    for split in sorted(bad_splits):
        n = sum(1 for t in trajs if t.split == split)
        if n:
            out.append(f"WARNING: LEAKAGE: {n} training trajectories are from the {split!r} split.")
    return out


def prepare_data(cfg: TrainConfig, tokenizer: Any, *, progress: bool = False,
                 log: Log | None = None) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """Training and validation examples, plus the data report (with leakage warnings)."""
    from exprag.bank import load_bank
    from exprag.progress import bar

    trajs, load_rep = load_trajectories(cfg.trajectories, only_successful=cfg.only_successful)
    if not trajs:
        raise TrainConfigError(f"no trainable trajectories in {', '.join(cfg.trajectories)} "
                               f"({len(load_rep.skipped_unsuccessful)} unsuccessful skipped)")
    bank = load_bank(cfg.retrieval.bank) if cfg.retrieval.bank else None
    warnings = leakage_warnings(cfg, bank, trajs)
    for w in warnings:
        if log:
            log(w)
    def build(ts: list[Any], desc: str) -> tuple[list[Example], BuildReport]:
        return build_examples(
            ts, tokenizer, bank=bank, memory=cfg.retrieval.memory, leakage=cfg.leakage,
            empty_memory_fraction=cfg.empty_memory_fraction,
            serialization=cfg.serialization, max_length=cfg.max_length, overlong=cfg.overlong,
            train_eot=cfg.train_eot, seed=cfg.seed,
            progress=(lambda it: bar(it, desc=desc, unit="ex", enabled=True)) if progress else None,
        )

    train_ex, rep = build(trajs, "tokenize")
    val_ex: list[Example] = []
    val_rep: BuildReport | None = None
    if cfg.val_trajectories:
        vtrajs, _ = load_trajectories(cfg.val_trajectories, only_successful=cfg.only_successful)
        val_ex, val_rep = build(vtrajs, "tokenize val")
    if not train_ex:
        raise TrainConfigError(f"every example is longer than max_length={cfg.max_length}; raise it")
    problems = len(rep.dropped_overlong) + len(rep.truncated) + len(rep.trimmed_memory)
    if problems and log:
        log(f"over max_length={cfg.max_length}: {len(rep.trimmed_memory)} examples lost memory trajectories, "
            f"{len(rep.truncated)} truncated after a whole turn, {len(rep.dropped_overlong)} dropped "
            "(ids in data_report.json)")
    report = {
        "inputs": _inputs(cfg),
        "load": {"read": load_rep.read, "skipped_unsuccessful": len(load_rep.skipped_unsuccessful),
                 "splits": load_rep.splits},
        "train": rep.summary(),
        "val": val_rep.summary() if val_rep else None,
        "warnings": warnings,
        "trimmed_memory": rep.trimmed_memory,
        "truncated": rep.truncated,
        "dropped_overlong": rep.dropped_overlong,
        "bank": bank.describe() if bank is not None and hasattr(bank, "describe") else cfg.retrieval.bank,
    }
    return train_ex, val_ex, report


# ---- the loss ---------------------------------------------------------------------------------------
def supports_logits_to_keep(model: Any) -> bool:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def lm_loss(model: Any, batch: dict[str, Any], n_items: int, keep_logits: bool = True) -> Any:
    """Sum of the token losses on trained positions / ``n_items``.

    Only a few percent of the tokens are actions, so with ``keep_logits`` the model computes logits
    only at positions whose next token is trained anywhere in the batch (``logits_to_keep`` with an
    index tensor; the model's own head, softcapping and scaling apply). The full logits tensor
    (tokens x vocabulary, fp32) is what dominates memory otherwise.
    """
    import torch.nn.functional as F

    labels = batch["labels"]
    if not keep_logits:
        return model(**batch, num_items_in_batch=max(n_items, 1), use_cache=False).loss
    target = labels[:, 1:]
    keep = (target != -100).any(0).nonzero().squeeze(1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=keep, use_cache=False).logits
    if logits.shape[1] == keep.numel():
        tgt = target[:, keep]
    else:  # a model that accepts logits_to_keep but only as a count: it returned every position
        logits, tgt = logits[:, :-1], target
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                           ignore_index=-100, reduction="sum") / max(n_items, 1)


# ---- the loop ---------------------------------------------------------------------------------------
def _loss_on(model: Any, examples: list[Example], batch_size: int, pad_id: int, device: Any) -> float:
    """Token-mean loss on ``examples`` (validation), no grad."""
    import torch

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b in length_batches([len(e) for e in examples], batch_size=batch_size, bucket=True):
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in b], pad_id).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(lm_loss(model, batch, n, supports_logits_to_keep(model))) * n
            count += n
    if was_training:
        model.train()
    return total / max(count, 1)


def is_train_run(path: Path) -> bool:
    """An exprag training run directory (what ``train`` writes first: its config, then state)."""
    return any((Path(path) / name).exists() for name in (CONFIG_FILE, "state.json", "data_report.json"))


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          rollout_eval: Callable[[Path], float] | None = None, progress: bool = False,
          log: Log | None = None) -> TrainResult:
    """Train a LoRA adapter (ExpRAG-LoRA when ``cfg.retrieval.bank`` is set) into ``cfg.out``.

    ``rollout_eval(adapter_dir) -> success rate`` scores checkpoints when ``cfg.selection.every``
    is set; None = ``exprag.evaluate`` on ``cfg.selection`` (see select.make_rollout_eval).
    ``cfg.out`` must be absent, empty or a training run; the main process locks it for the run.
    """
    from exprag.preflight import check_train_inputs

    kw = dict(resume=resume, overwrite=overwrite, rollout_eval=rollout_eval, progress=progress, log=log)
    cfg.validate()
    check_train_inputs(cfg)  # model, data and banks, before torch loads: a failed start creates no run directory
    if os.environ.get("RANK", "0") != "0":  # another process of a distributed run: the main one locks
        return _train(cfg, **kw)
    check_output_dir(cfg.out, "training run directory", is_train_run)
    with run_lock(cfg.out, "training run directory"):
        return _train(cfg, **kw)


def _train(cfg: TrainConfig, *, resume: bool, overwrite: bool, rollout_eval: Callable[[Path], float] | None,
           progress: bool, log: Log | None) -> TrainResult:
    import torch
    from accelerate import Accelerator, InitProcessGroupKwargs
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import set_seed

    from exprag.progress import bar
    from exprag.train.select import Selection, make_rollout_eval

    started = time.perf_counter()
    precision = resolve_precision(cfg.precision)
    # Autocast is ours, not Accelerator(mixed_precision=...): accelerate's state is a process-wide
    # singleton that refuses a second train() call with another precision.
    # A long timeout: with rollout selection the other processes wait while the main one evaluates.
    acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=12))])

    def autocast() -> Any:
        if precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=acc.device.type, dtype=torch.bfloat16)

    main = acc.is_main_process
    say: Log = (log if (log and main) else (lambda s: None))
    resume_from = prepare_run_dir(cfg, resume=resume, overwrite=overwrite, main=main)
    acc.wait_for_everyone()
    out = Path(cfg.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(to_dict(cfg), sort_keys=False))
        # Steps logged after the checkpoint we resume from will be redone: drop their lines.
        _trim_metrics(out / "metrics.jsonl", _resumed_step(resume_from))

    set_seed(cfg.seed)
    # bf16: bf16 base weights on GPU (the paper's recipe, half the memory); on CPU fp32 weights under
    # bf16 autocast (as fast, and exact master weights). LoRA weights stay fp32 (peft upcasts them).
    dtype = torch.bfloat16 if precision == "bf16" and torch.cuda.is_available() else torch.float32
    tokenizer, base, _ = load_model(cfg.model, dtype=dtype, device=acc.device)
    train_ex, val_ex, data_report = prepare_data(cfg, tokenizer, progress=progress and main, log=say)
    if main:
        atomic_write_json(out / "data_report.json", data_report)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(base, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, opt_name = make_optimizer(params, cfg)

    epoch0, batches_done, step = 0, 0, 0
    sums: dict[str, Any] = {}  # a mid-epoch checkpoint's running sums (see _SUMS)
    if resume_from is not None:
        set_peft_model_state_dict(model, load_file(str(resume_from / "adapter_model.safetensors")))
        optimizer.load_state_dict(load_checkpoint_file(resume_from / "optimizer.pt"))
        st = json.loads((resume_from / "trainer_state.json").read_text(encoding="utf-8"))
        epoch0, batches_done, step = st["epoch"], st["batches_done"], st["global_step"]
        sums = st.get("sums") or {}
        _set_rng_state(load_checkpoint_file(resume_from / "rng.pt", numpy_arrays=True))
        say(f"resuming from {resume_from} (epoch {epoch0 + batches_done / max(st['batches_in_epoch'], 1):.2f}, "
            f"step {step})")
    keep_logits = supports_logits_to_keep(model)
    model, optimizer = acc.prepare(model, optimizer)
    model.train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    lengths = [len(e) for e in train_ex]
    world, rank = acc.num_processes, acc.process_index

    def epoch_batches(epoch: int) -> list[list[int]]:
        bs = length_batches(lengths, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch)
        usable = len(bs) // world * world or len(bs)  # equal counts per rank: DDP never waits forever
        return bs[rank:usable:world]

    micro = cfg.micro_batch_size or (cfg.batch_size if acc.device.type == "cuda" else 1)
    steps_per_epoch = len(epoch_batches(0))
    selection = Selection(out) if main else None
    if cfg.selection.every and rollout_eval is None and main:
        rollout_eval = make_rollout_eval(cfg, out)
    say(f"{len(train_ex)} examples ({data_report['train']['tokens']} tokens, "
        f"{data_report['train']['trained_tokens']} trained), {steps_per_epoch} steps/epoch, "
        f"batch {cfg.batch_size} (micro {micro}), {opt_name}, {precision}, {world} process(es) on {acc.device}"
        + (f" ({torch.get_num_threads()} threads)" if acc.device.type == "cpu" else ""))

    pbar = bar(total=cfg.epochs * steps_per_epoch, desc="train", unit="step", enabled=progress and main)
    pbar.update(epoch0 * steps_per_epoch + batches_done)
    last_ckpt = resume_from
    tok_total, time_total = 0, 0.0
    best = selection.best() if selection else None

    def checkpoint(name: str, epoch: int, done: int, n_batches: int, running: dict[str, Any] | None = None) -> Path:
        state = {"epoch": epoch, "batches_done": done, "batches_in_epoch": n_batches, "global_step": step}
        if running:
            state["sums"] = running
        path = out / "checkpoints" / name
        if main:
            protected = {best.name} if best is not None else set()
            path = _save_checkpoint(acc.unwrap_model(model), optimizer, out, name, state,
                                    cfg.keep_checkpoints, protected)
        acc.wait_for_everyone()
        return path

    def select(epoch: int, ckpt: Path, val_loss: float | None, train_loss: float | None) -> None:
        nonlocal best
        assert selection is not None and rollout_eval is not None
        success = float(rollout_eval(ckpt))
        best = selection.add(epoch, ckpt, success, val_loss=val_loss, train_loss=train_loss)
        append_jsonl(out / "metrics.jsonl", {"event": "eval", "epoch": epoch, "success_rate": success,
                                             "checkpoint": str(ckpt.relative_to(out))})
        say(f"epoch {epoch}: rollout success {success:.3f} (best: {best.name})")

    every = cfg.selection.every
    if every and main:  # a run interrupted during an evaluation: score what it left unscored
        for e in range(1, epoch0 + 1):
            ckpt = out / "checkpoints" / f"epoch-{e:03d}"
            if (e % every == 0 or e == cfg.epochs) and ckpt.is_dir() and not selection.has(e):
                select(e, ckpt, None, None)

    for epoch in range(epoch0, cfg.epochs):
        mine = epoch_batches(epoch)
        skip = batches_done if epoch == epoch0 else 0
        ep_loss, ep_items, ep_tokens, ep_time, ep_cpu = 0.0, 0, 0, 0.0, 0.0
        win_loss, win_items, win_tokens, win_time = 0.0, 0, 0, 0.0
        if skip and sums:  # resumed mid-epoch: the epoch's record counts the batches done before too
            ep_loss, ep_items, ep_tokens, ep_time, ep_cpu, win_loss, win_items, win_tokens, win_time = (
                sums[k] for k in _SUMS)
        for i in range(skip, len(mine)):
            t0, c0 = time.perf_counter(), time.process_time()
            window = [collate([train_ex[j] for j in mb], pad_id)
                      for mb in split_micro(mine[i], lengths, micro, cfg.max_batch_tokens)]
            n_items = sum(int((w["labels"][:, 1:] != -100).sum()) for w in window)
            loss_sum = 0.0
            for k, batch in enumerate(window):
                batch = {key: v.to(acc.device) for key, v in batch.items()}
                sync = acc.no_sync(model) if k < len(window) - 1 else contextlib.nullcontext()
                with sync:
                    # Loss = sum over the window's trained tokens / their count: micro-batches of
                    # different sizes weigh by tokens, as one big batch would.
                    with autocast():
                        loss = lm_loss(model, batch, n_items, keep_logits)
                    acc.backward(loss)
                loss_sum += float(loss.detach())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            ep_cpu += time.process_time() - c0
            n_tok = sum(int(w["attention_mask"].sum()) for w in window)
            ep_loss += loss_sum * n_items
            ep_items += n_items
            ep_tokens += n_tok
            ep_time += dt
            win_loss += loss_sum * n_items
            win_items += n_items
            win_tokens += n_tok
            win_time += dt
            pbar.update(1)
            pbar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{n_tok * world / dt:.0f}")
            done = i + 1
            if main and step % cfg.log_every_steps == 0:
                append_jsonl(out / "metrics.jsonl", {
                    "event": "step", "epoch": round(epoch + done / len(mine), 4), "step": step,
                    "loss": win_loss / max(win_items, 1), "tokens_per_s": win_tokens * world / win_time,
                    "lr": cfg.lr, "elapsed_s": round(time.perf_counter() - started, 2),
                })
                win_loss, win_items, win_tokens, win_time = 0.0, 0, 0, 0.0
            if cfg.save_every_steps and step % cfg.save_every_steps == 0 and done < len(mine):
                running = dict(zip(_SUMS, (ep_loss, ep_items, ep_tokens, ep_time, ep_cpu,
                                           win_loss, win_items, win_tokens, win_time)))
                last_ckpt = checkpoint(f"step-{step:06d}", epoch, done, len(mine), running)
        batches_done = 0
        tok_total += ep_tokens
        time_total += ep_time
        # The unwrapped model: a DDP forward on one rank alone would wait for the others.
        with autocast():
            val_loss = (_loss_on(acc.unwrap_model(model), val_ex, micro, pad_id, acc.device)
                        if val_ex and main else None)
        name = f"epoch-{epoch + 1:03d}"
        last_ckpt = checkpoint(name, epoch + 1, 0, len(mine))
        train_loss = ep_loss / max(ep_items, 1) if ep_items else None
        record = {"event": "epoch", "epoch": epoch + 1, "step": step, "train_loss": train_loss,
                  "val_loss": val_loss, "tokens_per_s": (ep_tokens * world / ep_time) if ep_time else None,
                  # Training steps only; CPU time (all threads) is the steadier figure on a shared machine.
                  "tokens": ep_tokens, "train_s": round(ep_time, 3), "train_cpu_s": round(ep_cpu, 3),
                  "peak_memory_mb": round(peak_memory_mb(), 1), "checkpoint": f"checkpoints/{name}",
                  "elapsed_s": round(time.perf_counter() - started, 2)}
        if main:
            append_jsonl(out / "metrics.jsonl", record)
            say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss if train_loss is None else round(train_loss, 4)}"
                + (f", val loss {val_loss:.4f}" if val_loss is not None else "")
                + (f", {record['tokens_per_s']:.0f} tokens/s" if record["tokens_per_s"] else ""))
        if every and main and ((epoch + 1) % every == 0 or epoch + 1 == cfg.epochs) and not selection.has(epoch + 1):
            select(epoch + 1, last_ckpt, val_loss, train_loss)
        acc.wait_for_everyone()
        pause_for_test("train-epoch")
    pbar.close()
    history = selection.history if selection else []
    return TrainResult(
        out=out, epochs_done=cfg.epochs, steps=step, last_checkpoint=last_ckpt,
        best_checkpoint=(out / "best") if selection and selection.best() else None, history=history,
        wall_s=time.perf_counter() - started, tokens_per_s=(tok_total * world / time_total) if time_total else 0.0,
        data=data_report,
    )


# ---- merge --------------------------------------------------------------------------------------------
def merge_adapter(adapter: str | Path, out: str | Path, *, model: str | None = None,
                  overwrite: bool = False) -> Path:
    """Fold a LoRA adapter into its base model (merge_and_unload) and save a standalone checkpoint."""
    import torch
    from peft import PeftModel

    adapter, out = Path(adapter), Path(out)
    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.is_file():
        raise RunDirError(f"{adapter}: no adapter_config.json (not a PEFT adapter directory)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RunDirError(f"{out} exists; pass --overwrite to replace it")
    check_output_dir(out, "merged model directory", lambda p: (p / "config.json").is_file())
    base_spec = model or json.loads(cfg_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base_spec:
        raise RunDirError(f"{cfg_file}: no base_model_name_or_path; pass --model")
    tokenizer, base, _ = load_model(str(base_spec), dtype=torch.float32)
    with warnings.catch_warnings():  # peft calls a transformers property deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.merge-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    replace_dir(staging, out)
    return out
