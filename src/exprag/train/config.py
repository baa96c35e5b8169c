"""The training recipe as a typed config: defaults are the paper's LoRA recipe (docs/method.md#hyperparameters).

No ``from __future__ import annotations`` here on purpose: ``exprag.config.from_dict`` resolves
nested dataclass fields from real annotations, so YAML sections (``lora:``, ``retrieval:``,
``selection:``) load into their dataclasses.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exprag.config import RetrievalConfig, from_dict, load_yaml, set_fields
from exprag.config import to_dict as config_to_dict
from exprag.envs import LEAKAGE_SCOPES
from exprag.errors import ExpragError
from exprag.validate import BUDGET, COUNT, FIELD_RULES, FRACTION, NON_NEGATIVE, POSITIVE, SEED, Num, check_config

SERIALIZATIONS = ("trajectory", "step")
OVERLONG = ("trim", "drop")
PRECISIONS = ("auto", "bf16", "fp32")
OPTIMIZERS = ("auto", "paged_adamw_8bit", "adamw")
# report_to: accelerate's experiment trackers -> the packages that provide them (optional installs)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
            "aim": ("aim",), "comet_ml": ("comet_ml",), "clearml": ("clearml",), "dvclive": ("dvclive",),
            "swanlab": ("swanlab",), "trackio": ("trackio",)}
# Fields that change what is logged, never the adapter (resumable; an experiment's finished adapter stays done).
LOGGING_FIELDS = ("report_to",)


class TrainConfigError(ExpragError):
    """An invalid training configuration value; names the field."""


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    # None = the attention q/k/v/o projections of the architecture (see lora.attention_targets).
    target_modules: list[str] | None = None


@dataclass
class SelectionConfig:
    """Checkpoint selection by rollout success on held-out tasks, not by validation loss
    (docs/method.md#checkpoint-selection)."""

    every: int | None = None  # evaluate every N epochs (and after the last); None = no rollouts
    env: str | None = None  # None = the training trajectories' env
    split: str = "dev"  # never select on the split you report
    task_types: str = "hard"
    per_type: int | None = 5
    limit: int | None = None
    bank: str | None = None  # memory at evaluation; None = the training bank (none for plain LoRA)
    max_steps: int | None = None
    batch_size: int = 4


@dataclass
class TrainConfig:
    trajectories: list[str] = field(default_factory=list)
    val_trajectories: list[str] = field(default_factory=list)  # validation loss (plotted, not selected on)
    model: str = "smollm2-135m"
    out: str = "runs/train"
    # ExpRAG-LoRA when retrieval.bank is set: the same retrieval as inference (K=2, static, chat JSON).
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    # examples trained with an empty memory block (docs/method.md#d-empty-memory-mixing)
    empty_memory_fraction: float = 0.0
    # Memories never come from the example's own task (ALFWorld: every trial of its task folder);
    # "scene" also excludes every ALFWorld task of the same scene (see docs/memory.md)
    leakage: str = "task"
    only_successful: bool = True  # SFT imitates successes; failures are skipped and counted
    serialization: str = "trajectory"  # one example per trajectory | per step (benchmark baseline)
    max_length: int = 8192
    overlong: str = "trim"  # trim: drop lowest-ranked memory, then whole trailing turns | drop
    train_eot: bool = True  # also train the end-of-turn token, so the model learns to stop
    lora: LoraSettings = field(default_factory=LoraSettings)
    epochs: int = 9
    lr: float = 5e-5  # constant
    weight_decay: float = 0.0
    batch_size: int = 8  # examples per optimizer step (length-bucketed)
    # Examples per forward pass; None = auto: 1 on CPU (a padded batch forces PyTorch's quadratic-
    # memory attention kernel there), batch_size on GPU. Gradients accumulate over micro-batches.
    micro_batch_size: int | None = None
    max_batch_tokens: int | None = None  # cap on padded tokens per micro-batch
    precision: str = "auto"  # auto = bf16 on GPUs that support it, else fp32
    optimizer: str = "auto"  # auto = PagedAdamW8bit when bitsandbytes imports, else torch AdamW
    gradient_checkpointing: bool = False
    seed: int = 2025
    save_every_steps: int | None = None  # extra mid-epoch checkpoints (an epoch always ends with one)
    log_every_steps: int = 10
    keep_checkpoints: int | None = None  # adapters kept (latest N + best); None = all
    report_to: str = "none"  # "none" or accelerate trackers, comma-separated (e.g. tensorboard: RUN_DIR/tracking)
    selection: SelectionConfig = field(default_factory=SelectionConfig)

    def trackers(self) -> list[str]:
        return [t.strip() for t in self.report_to.split(",") if t.strip() not in ("", "none")]

    def validate(self) -> "TrainConfig":
        def bad(name: str, why: str) -> TrainConfigError:
            return TrainConfigError(f"train config field {name!r}: {why}")

        check_config(self, "train config", TrainConfigError)  # numbers: types and ranges
        if self.serialization not in SERIALIZATIONS:
            raise bad("serialization", f"{self.serialization!r} is not one of {', '.join(SERIALIZATIONS)}")
        if self.overlong not in OVERLONG:
            raise bad("overlong", f"{self.overlong!r} is not one of {', '.join(OVERLONG)}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"{self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        unknown = [t for t in self.report_to.split(",") if t.strip() not in ("none", *TRACKERS)]
        if unknown:
            raise bad("report_to", f"{unknown[0]!r} is not none or one of {', '.join(TRACKERS)}")
        if self.leakage not in LEAKAGE_SCOPES:
            raise bad("leakage", f"{self.leakage!r} is not one of {', '.join(LEAKAGE_SCOPES)}")
        if self.retrieval.memory.mode not in ("static", "dynamic"):
            raise bad("retrieval.mode", f"{self.retrieval.memory.mode!r} is not static or dynamic")
        if self.retrieval.memory.mode == "dynamic" and self.retrieval.bank and self.serialization != "step":
            # Dynamic retrieval changes the memory every step: one example per trajectory cannot
            # carry it; per-step examples can (each with the memory retrieved at that step).
            raise bad("retrieval.mode", "dynamic retrieval needs serialization: step")
        return self


FIELD_RULES[LoraSettings] = {"r": COUNT, "alpha": COUNT, "dropout": Num(float, min=0, max=0.99)}
FIELD_RULES[SelectionConfig] = {"every": COUNT, "per_type": COUNT, "limit": COUNT, "max_steps": COUNT,
                                "batch_size": COUNT}
FIELD_RULES[TrainConfig] = {
    "empty_memory_fraction": FRACTION, "max_length": BUDGET, "epochs": COUNT, "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE, "batch_size": COUNT, "micro_batch_size": COUNT, "max_batch_tokens": BUDGET,
    "seed": SEED, "save_every_steps": COUNT, "log_every_steps": COUNT, "keep_checkpoints": COUNT,
}


def load_train_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then ``overrides`` (dotted keys, e.g. ``retrieval.k``; None skipped)."""
    cfg = load_yaml(TrainConfig, path) if path else TrainConfig()
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return set_fields(cfg, given, TrainConfigError, "train config").validate()


def config_from_dict(data: dict[str, Any], where: str = "<train config>") -> TrainConfig:
    return from_dict(TrainConfig, data, where).validate()


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The file shape of a training config (``config.json``, ``train_config.yaml``). ``report_to`` is
    written only when set, so configs without trackers keep the bytes of runs made before the field."""
    d = config_to_dict(cfg)
    if d.get("report_to") == "none":
        del d["report_to"]
    return d
