"""exprag: retrieval-augmented LLM agents that learn to learn from experience."""

import warnings as _warnings

__version__ = "0.1.0"

# peft (pinned) reads transformers' deprecated `is_gradient_checkpointing` alias on every adapter load;
# the FutureWarning is about the two libraries, not something a user of exprag can act on.
_warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
