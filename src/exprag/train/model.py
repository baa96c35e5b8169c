"""The model side of training: precision, loading, LoRA targets, optimizer, merging an adapter."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from exprag.io import check_output_dir, replace_dir
from exprag.train.config import TrainConfig, TrainConfigError
from exprag.train.rundir import RunDirError

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


def peak_memory_mb() -> float:
    """Peak GPU memory allocated (CUDA), else the process's peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


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
