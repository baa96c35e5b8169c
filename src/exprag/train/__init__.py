"""Training: the LoRA recipe and ExpRAG-LoRA (docs/method.md#lora-recipe, docs/method.md#exprag-lora).

``data``    trajectories -> tokenized examples with loss on the actions only (+ memory block)
``lora``    the training loop, checkpoints, resume, merge
``select``  checkpoint selection by rollout success
``config``  ``TrainConfig``: the paper's recipe as defaults

Submodules are imported on use: torch and transformers load only when training starts.
"""
