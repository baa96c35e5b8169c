"""Checks of a run's inputs before its run directory is created.

A start that fails on a missing model, adapter, bank or data file must leave nothing behind:
otherwise the run directory it created holds a config.json, and the corrected command is refused as
a change of config. Every check here is cheap (no model weights are loaded, no simulator started).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exprag.validate import check_config, check_output


def check_model(spec: str, adapter: str | None = None, backend: str = "hf", base_url: str | None = None) -> None:
    """The model and adapter exist where the loader will look (a ModelError / ServerError otherwise)."""
    from exprag.llm.base import ModelError, ServerError

    if backend not in ("hf", "openai"):
        raise ModelError(f"unknown backend {backend!r} (choose hf or openai)")
    if backend == "openai":
        if adapter:  # served by the server under its own name (exprag.llm.adapters), read there by path
            from exprag.llm.adapters import adapter_path

            adapter_path(adapter)
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ServerError(f"the openai backend needs --base-url http://HOST:PORT/v1, got {base_url!r}")
        return
    if not isinstance(spec, str) or not spec.strip():
        raise ModelError("--model is empty")
    from exprag.llm.models import BUNDLED, bundled_gguf_path, resolve_model

    if spec in BUNDLED:
        bundled_gguf_path(spec)  # converted on first load; only its presence is checked here
    else:
        resolve_model(spec)
    if adapter:
        cfg = Path(adapter) / "adapter_config.json"
        if not Path(adapter).is_dir() or not cfg.is_file():
            raise ModelError(f"adapter {adapter}: no adapter_config.json (not a PEFT adapter directory)")
        from exprag.validate import read_json

        read_json(cfg, ModelError)


def check_bank(path: str, mode: str, env: str | None = None) -> Any:
    """The bank opened, with the index of ``mode`` read (a truncated index file fails here)."""
    from exprag.bank import load_bank
    from exprag.errors import BankError

    bank = load_bank(path)
    if env is not None and env not in bank.envs:
        raise BankError(f"{path}: bank holds {', '.join(bank.envs)} trajectories, not {env}; build a bank for this env")
    bank.index(mode)
    return bank


def check_eval_inputs(cfg: Any, *, check_model_spec: bool = True) -> tuple[list[str], Any]:
    """(task types, opened bank or None) for an EvalConfig, or the error a failed start would give."""
    from exprag.envs import check_env_args, env_spec
    from exprag.envs.splits import resolve_task_types
    from exprag.errors import DataFormatError

    spec = env_spec(cfg.env)
    types = resolve_task_types(cfg.env, cfg.task_types)
    check_config(cfg, "eval config")
    for name, value, choices in (("split", cfg.split, ("train", "dev", "test")),
                                 ("retrieval.mode", cfg.retrieval.memory.mode, ("static", "dynamic")),
                                 ("retrieval.memory_format", cfg.retrieval.memory.format, ("json", "text"))):
        if value not in choices:
            raise DataFormatError(f"eval config: field {name!r} is {value!r}, not one of {', '.join(choices)}")
    env_args = check_env_args(cfg.env, {**spec.agent_defaults, **cfg.env_args})
    check_output(cfg.out, "dir")
    if check_model_spec:
        check_model(cfg.model, cfg.adapter, cfg.backend, cfg.base_url)
    bank = check_bank(cfg.retrieval.bank, cfg.retrieval.memory.mode, cfg.env) if cfg.retrieval.bank else None
    if spec.cheap_construct:  # e.g. ALFWorld's constructor checks the game directory
        spec.make(**env_args).close()
    return types, bank


def check_train_inputs(cfg: Any) -> None:
    """Model, training and validation files, banks and the selection env of a TrainConfig."""
    from exprag.envs import check_env
    from exprag.envs.splits import resolve_task_types
    from exprag.train.config import TrainConfigError
    from exprag.train.data import load_trajectories

    check_output(cfg.out, "dir")
    check_model(cfg.model)
    trajs, rep = load_trajectories(cfg.trajectories, only_successful=cfg.only_successful)
    if not trajs:
        raise TrainConfigError(f"no trainable trajectories in {', '.join(cfg.trajectories)} "
                               f"({len(rep.skipped_unsuccessful)} unsuccessful skipped)")
    if cfg.val_trajectories:
        load_trajectories(cfg.val_trajectories, only_successful=cfg.only_successful)
    if cfg.retrieval.bank:
        check_bank(cfg.retrieval.bank, cfg.retrieval.memory.mode)
    sel = cfg.selection
    if sel.every is not None:
        env = sel.env or trajs[0].env
        check_env(env)
        resolve_task_types(env, sel.task_types)
        if sel.bank:
            check_bank(sel.bank, cfg.retrieval.memory.mode, env)
