"""exprag's Python API: thin entry points over the code the CLI runs (``import exprag``).

Every function here calls the project's own implementation (``exprag.bank``, ``exprag.memory_block``,
``exprag.evaluate``, ``exprag.train``, ``exprag.experiment``): a memory block built here is the one the
agent and the trainer build. The examples run from a clone's root (``tests/test_api.py`` runs them);
``TRAJ`` there is ``results/replication-cpu/data/train-easy.jsonl``, 48 committed ALFWorld expert
trajectories.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

from exprag.memory_block import FORMATS, MemorySpec, approx_tokens
from exprag.trajectory import Trajectory

if TYPE_CHECKING:
    from exprag.bank.retriever import Filters, Hit
    from exprag.bank.store import Bank
    from exprag.evaluate import EvalResult
    from exprag.experiment import ExperimentResult
    from exprag.llm.base import ChatModel
    from exprag.train.lora import TrainResult

PathLike = str | Path
Messages = Sequence[Mapping[str, str]]


# ---- trajectories ------------------------------------------------------------------------------
def read_trajectories(*paths: PathLike) -> list[Trajectory]:
    """Read and validate trajectory JSONL files (schema ``Trajectory``); duplicate ids are an error.

    Examples:
        >>> trajs = exprag.read_trajectories(TRAJ)
        >>> len(trajs), trajs[0].env, trajs[0].success
        (48, 'alfworld', True)
    """
    from exprag.trajectory import read_jsonl

    return read_jsonl(*paths)


def iter_trajectories(path: PathLike) -> Iterator[Trajectory]:
    """Stream one trajectory JSONL file, validating each line as it is read.

    Examples:
        >>> t = next(exprag.iter_trajectories(TRAJ))
        >>> t.task_type, t.actions()[0]
        ('look_at_obj_in_light', 'look')
    """
    from exprag.trajectory import iter_jsonl

    return iter_jsonl(path)


def write_trajectories(path: PathLike, trajectories: Iterable[Trajectory]) -> int:
    """Write trajectories as JSONL, atomically; returns how many were written.

    Examples:
        >>> exprag.write_trajectories(tmp / "two.jsonl", exprag.read_trajectories(TRAJ)[:2])
        2
    """
    from exprag.trajectory import write_jsonl

    return write_jsonl(path, trajectories)


# ---- banks -------------------------------------------------------------------------------------
def build_bank(trajectories: Iterable[Trajectory] | PathLike | Sequence[PathLike], out: PathLike,
               encoder: str = "minilm", *, scoring: str | None = None) -> Bank:
    """Build a bank at ``out`` (as ``exprag bank build``) from trajectories or JSONL paths.

    ``encoder``: ``minilm`` (bundled), ``bm25`` or a sentence-transformers id / local directory;
    ``scoring``: ``procedure`` (default), ``dense`` (the paper's dot product) or ``bm25``.

    Examples:
        >>> bank = exprag.build_bank(TRAJ, tmp / "bank", encoder="bm25", scoring="bm25")
        >>> len(bank)
        48
    """
    from exprag.bank.store import build_bank as _build, build_bank_from_files

    if isinstance(trajectories, (str, Path)):
        trajectories = [trajectories]
    items = list(trajectories)
    if items and all(isinstance(p, (str, Path)) for p in items):
        return build_bank_from_files(items, out, encoder, retrieval=scoring)
    return _build(items, out, encoder, retrieval=scoring)


def open_bank(path: PathLike) -> Bank:
    """Open a bank directory (its trajectories are ``bank.trajectories``).

    Examples:
        >>> bank = exprag.open_bank(BANK)
        >>> len(bank), bank.trajectories[0].env
        (48, 'alfworld')
    """
    from exprag.bank.store import load_bank

    return load_bank(path)


def append_to_bank(bank: Bank | PathLike, trajectories: Iterable[Trajectory]) -> Bank:
    """Write-back: add trajectories to a bank (a new version, published atomically, as
    ``exprag eval --write-back`` does); returns the bank that holds them.

    Examples:
        >>> bank = exprag.build_bank(exprag.read_trajectories(TRAJ)[:40], tmp / "grow", encoder="bm25", scoring="bm25")
        >>> len(exprag.append_to_bank(bank, exprag.read_trajectories(TRAJ)[40:]))
        48
    """
    from exprag.bank.store import append_to_bank as _append

    return _append(_bank(bank), list(trajectories))


# ---- retrieval and the memory block ------------------------------------------------------------
def retrieve(bank: Bank | PathLike, task: str, history: Messages | None = None, *, k: int = 2,
             mode: str = "static", filters: Filters | None = None, token_budget: int | None = None,
             memory_format: str = "json", count_tokens: Callable[[str], int] = approx_tokens) -> list[Hit]:
    """The top-``k`` trajectories for a task (static) or a partial episode (dynamic: ``history``
    holds its messages so far, user = observation, assistant = action), best first. Each ``Hit``
    has ``trajectory``, ``score``, ``position`` and ``steps`` (how many steps a token budget left).

    Examples:
        >>> hits = exprag.retrieve(BANK, "Your task is to: examine the book with the desklamp.", k=2)
        >>> [h.trajectory.task_type for h in hits]
        ['look_at_obj_in_light', 'look_at_obj_in_light']
    """
    from exprag.bank.retriever import Retriever

    spec = MemorySpec(k, mode, memory_format, token_budget)
    (hits,) = spec.retrieve(Retriever(_bank(bank)), [(task, history)], [filters], count_tokens)
    return hits


def render_memory(hits: Sequence[Hit], memory_format: str = "json") -> str:
    """The memory block of retrieved hits, as the agent's system prompt holds it ('' for no hits).

    Examples:
        >>> block = exprag.render_memory(exprag.retrieve(BANK, "Your task is to: examine the book with the desklamp."))
        >>> block.splitlines()[0]
        '# Memory: past episodes of similar tasks'
    """
    from exprag.memory_block import memory_block

    return memory_block(hits, memory_format)


def system_prompt(action_templates: Sequence[str], memory: str = "", admissible: Sequence[str] | None = None) -> str:
    """The agent's system prompt: instructions, the env's action templates, then the memory block.

    Examples:
        >>> print(exprag.system_prompt(["go to [receptacle]"]).splitlines()[-1])
        - go to [receptacle]
    """
    from exprag.prompt import system_prompt as _prompt

    return _prompt(list(action_templates), memory, list(admissible) if admissible else None)


class Memory:
    """Retrieval for your own agent loop: the memory block exprag's agent would show.

    ``bank``: a bank or its directory. ``mode="static"`` retrieves once per task; ``"dynamic"``
    re-retrieves from the task and the episode so far at every ``update``. ``token_budget`` shortens
    the retrieved trajectories to fit (counted by ``count_tokens``, e.g. ``len`` of your tokenizer's
    ids; default ~4 characters a token). ``filters`` (an ``exprag.bank.Filters``) limits the
    candidates.

    Examples:
        >>> mem = exprag.Memory(BANK, k=2, mode="dynamic")
        >>> block = mem.for_task("Your task is to: put a clean cloth in countertop.")
        >>> "## Successful trajectories" in block
        True
        >>> step = [{"role": "user", "content": "You are in the middle of a room."},
        ...         {"role": "assistant", "content": "go to sinkbasin 1"}]
        >>> mem.update(step) == mem.block
        True
        >>> [t.task_type for t in mem.trajectories]
        ['pick_clean_then_place_in_recep', 'pick_clean_then_place_in_recep']
    """

    def __init__(self, bank: Bank | PathLike, k: int = 2, mode: str = "static", *, memory_format: str = "json",
                 token_budget: int | None = None, filters: Filters | None = None,
                 count_tokens: Callable[[str], int] = approx_tokens):
        from exprag.bank.retriever import Retriever
        from exprag.errors import BankError

        if mode not in ("static", "dynamic"):
            raise BankError(f"unknown retrieval mode {mode!r} (choose static or dynamic)")
        if memory_format not in FORMATS:
            raise ValueError(f"unknown memory format {memory_format!r} (choose {' or '.join(FORMATS)})")
        self.bank = _bank(bank)
        self.spec = MemorySpec(k, mode, memory_format, token_budget)
        self.filters = filters
        self.count_tokens = count_tokens
        self._retriever = Retriever(self.bank)
        self.task: str | None = None
        self.hits: list[Hit] = []
        self.block = ""

    @property
    def trajectories(self) -> list[Trajectory]:
        """The trajectories in the current memory block, best first."""
        return [h.trajectory for h in self.hits]

    def _retrieve(self, history: Messages | None) -> str:
        (self.hits,) = self.spec.retrieve(self._retriever, [(self.task, history)], [self.filters], self.count_tokens)
        self.block = render_memory(self.hits, self.spec.format)
        return self.block

    def for_task(self, task: str) -> str:
        """Start a task: retrieve for its description and return the memory block.

        Examples:
            >>> exprag.Memory(BANK, k=1).for_task("Your task is to: examine the book with the desklamp.").count("### Trajectory")
            1
        """
        self.task = task
        return self._retrieve(None)

    def update(self, history: Messages) -> str:
        """The block after a step: dynamic mode retrieves again from the task and ``history`` (the
        episode's messages so far); static mode keeps the task's block, as the agent does.

        Examples:
            >>> mem = exprag.Memory(BANK, k=1)
            >>> first = mem.for_task("Your task is to: examine the book with the desklamp.")
            >>> mem.update([{"role": "assistant", "content": "go to desk 1"}]) == first
            True
        """
        if self.task is None:
            raise RuntimeError("Memory.update before Memory.for_task: no task to retrieve for")
        if self.spec.mode == "static":
            return self.block
        return self._retrieve(list(history))

    def add(self, trajectories: Trajectory | Iterable[Trajectory]) -> None:
        """Write-back: append finished episodes to the bank (``append_to_bank``); later retrievals
        see them.

        Examples:
            >>> mem = exprag.Memory(exprag.build_bank(exprag.read_trajectories(TRAJ)[:40], tmp / "wb", "bm25", scoring="bm25"))
            >>> mem.add(exprag.read_trajectories(TRAJ)[40:])
            >>> len(mem.bank)
            48
        """
        from exprag.bank.retriever import Retriever
        from exprag.bank.store import append_to_bank as _append

        new = [trajectories] if isinstance(trajectories, Trajectory) else list(trajectories)
        self.bank = _append(self.bank, new)
        self._retriever = Retriever(self.bank)


# ---- models, evaluation, training, experiments -------------------------------------------------
def load_chat_model(spec: PathLike = "smollm2-135m", *, adapter: PathLike | None = None, backend: str = "hf",
                    base_url: str | None = None, **options: Any) -> ChatModel:
    """A chat model: ``smollm2-135m`` (bundled), a local checkpoint, or with ``backend="openai"`` a
    served model at ``base_url``; ``adapter`` a LoRA directory. ``model.generate(conversations)``
    returns one generation (``.text``) per conversation.

    Examples:
        >>> model = exprag.load_chat_model(TINY)
        >>> [g.text for g in model.generate([[{"role": "user", "content": "hi"}]], max_new_tokens=2)] != []
        True
    """
    from exprag.llm import load_chat_model as _load

    return _load(str(spec), adapter=adapter, backend=backend, base_url=base_url, **options)


def tiny_model(out: PathLike) -> Path:
    """Write a small random model (the bundled SmolLM2 architecture and tokenizer, 2 layers) to
    ``out``: a fast stand-in for trying evaluation and training. Idempotent.

    Examples:
        >>> exprag.tiny_model(tmp / "tiny").joinpath("config.json").is_file()
        True
    """
    from exprag.llm.models import tiny_random_model

    return tiny_random_model(out)


def run_eval(config: Mapping[str, Any] | PathLike | Any, *, model: ChatModel | None = None,
             progress: bool = False) -> EvalResult:
    """Run (or resume) an evaluation, as ``exprag eval``. ``config``: an eval YAML path, a mapping of
    its fields (``env, split, task_types, per_type, model, retrieval: {bank, k, mode}, max_steps,
    out``, ...) or an ``EvalConfig``; ``model``: a loaded chat model to reuse. Returns ``.metrics``
    and ``.success_rate``; the run directory is ``config.out``.

    Examples:
        >>> res = exprag.run_eval({"env": "twx", "split": "test", "task_types": "coin", "per_type": 1,
        ...                        "model": str(TINY), "max_steps": 2, "max_new_tokens": 4, "out": str(tmp / "eval")})
        >>> res.metrics["n"], 0.0 <= res.success_rate <= 1.0
        (1, True)
    """
    from exprag.config import EvalConfig, from_dict, load_yaml
    from exprag.evaluate import evaluate

    cfg = _config(config, EvalConfig, lambda d: from_dict(EvalConfig, dict(d), "<eval config>"),
                  lambda p: load_yaml(EvalConfig, p))
    return evaluate(cfg, model=model, progress=progress)


def run_training(config: Mapping[str, Any] | PathLike | Any, *, resume: bool = False,
                 progress: bool = False) -> TrainResult:
    """Train a LoRA adapter, as ``exprag train``: ExpRAG-LoRA when ``retrieval: {bank: ...}`` is
    set (every example carries its leakage-free memory block), plain LoRA otherwise. ``config``: a
    train YAML path, a mapping of its fields or a ``TrainConfig``. Returns the run's ``out``,
    ``last_checkpoint`` and ``history``.

    Examples:
        >>> res = exprag.run_training({"trajectories": [str(TRAJ)], "model": str(TINY), "epochs": 1,
        ...                            "batch_size": 8, "max_length": 2048, "retrieval": {"bank": str(BANK), "k": 1},
        ...                            "out": str(tmp / "train")})
        >>> res.epochs_done, res.last_checkpoint.joinpath("adapter_config.json").is_file()
        (1, True)
    """
    from exprag.train.config import TrainConfig, config_from_dict, load_train_config
    from exprag.train.lora import train

    cfg = _config(config, TrainConfig, lambda d: config_from_dict(dict(d)), load_train_config)
    return train(cfg, resume=resume, progress=progress)


def run_experiment(config: Mapping[str, Any] | PathLike | Any, *, progress: bool = False) -> ExperimentResult:
    """Run (or resume) a method grid, as ``exprag experiment``: expert data, banks, adapters and
    every cell into ``config.out``. ``config``: an experiment YAML path, a mapping of its fields or
    an ``ExperimentConfig``. Returns one row per cell (``rows``).

    Examples:
        >>> res = exprag.run_experiment({"name": "api", "env": "twx", "models": [str(TINY)], "encoder": "bm25",
        ...     "main_k": 1, "out": str(tmp / "exp"),
        ...     "data": {"train_per_type": 1, "test_per_type": 1, "task_types": {"easy": ["twc"], "hard": ["coin"]}},
        ...     "eval": {"max_steps": 2, "max_new_tokens": 4},
        ...     "grid": [{"methods": ["no_retrieval", "exprag_frozen"], "groups": ["hard"]}]})
        >>> [(r["method"], r["n"]) for r in res.rows]
        [('no_retrieval', 1), ('exprag_frozen', 1)]
    """
    from exprag.experiment import ExperimentConfig, experiment_config_from_dict, load_experiment_config
    from exprag.experiment import run_experiment as _run

    cfg = _config(config, ExperimentConfig, lambda d: experiment_config_from_dict(dict(d)), load_experiment_config)
    return _run(cfg, progress=progress)


# ---- helpers -----------------------------------------------------------------------------------
def _bank(bank: Any) -> Bank:
    return open_bank(bank) if isinstance(bank, (str, Path)) else bank


def _config(config: Any, cls: type, from_mapping: Callable[[Mapping[str, Any]], Any],
            from_path: Callable[[PathLike], Any]) -> Any:
    if isinstance(config, cls):
        return config
    if isinstance(config, Mapping):
        return from_mapping(config)
    if isinstance(config, (str, Path)):
        return from_path(config)
    raise TypeError(f"expected a {cls.__name__}, a mapping of its fields or a YAML path, got {type(config).__name__}")
