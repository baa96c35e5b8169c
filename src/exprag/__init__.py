"""exprag: retrieval-augmented LLM agents that learn to learn from experience.

An implementation of ExpRAG and ExpRAG-LoRA (arXiv 2603.18272). The Python API (``import exprag``;
nothing heavy loads until a name is used):

Trajectories
    ``Trajectory``, ``read_trajectories``, ``iter_trajectories``, ``write_trajectories``
Banks
    ``build_bank``, ``open_bank``, ``append_to_bank``
Retrieval and the memory block (exactly as the agent and the trainer build them)
    ``retrieve``, ``render_memory``, ``system_prompt``, ``Filters``,
    ``Memory`` (your own agent loop: ``for_task``, ``update``, ``add``)
Models, evaluation, training, experiments
    ``load_chat_model``, ``tiny_model``, ``run_eval``, ``run_training``, ``run_experiment``

Everything else (submodules included) is internal and may change. Guide: docs/own-agent.md; reference: docs/api.md.
"""

import warnings as _warnings

__version__ = "0.1.0"

# peft (pinned) reads transformers' deprecated `is_gradient_checkpointing` alias on every adapter load;
# the FutureWarning is about the two libraries, not something a user of exprag can act on.
_warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# public name -> module that defines it; imported on first use (PEP 562), so `import exprag` stays light
_API = {
    "Trajectory": "exprag.trajectory",
    "Filters": "exprag.bank.retriever",
    **{name: "exprag.api" for name in (
        "read_trajectories", "iter_trajectories", "write_trajectories", "build_bank", "open_bank",
        "append_to_bank", "retrieve", "render_memory", "system_prompt", "Memory", "load_chat_model",
        "tiny_model", "run_eval", "run_training", "run_experiment")},
}

__all__ = sorted(_API)


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'exprag' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
