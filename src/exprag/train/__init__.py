"""Training: the LoRA recipe and ExpRAG-LoRA (docs/method.md#lora-recipe, docs/method.md#exprag-lora).

``lora``        ``train()``: sets up a run (accelerate, model, data, resume) and runs the loop
``loop``        the optimizer loop, its per-run state and the events it emits to callbacks
``callbacks``   progress bar, metrics.jsonl, checkpoints, rollout selection (on the loop's events)
``loss``        the loss on action tokens, the validation loss
``model``       precision, model loading, LoRA targets, optimizer, merging an adapter
``prepare``     a run's examples and data report (trajectories, bank, leakage warnings)
``data``        trajectories -> tokenized examples with loss on the actions only (+ memory block)
``export``      a run's examples as ShareGPT / OpenAI chat records for other trainers
``rundir``      run directory: create, check for resume, trim metrics
``checkpoint``  checkpoint save / load (weights_only), RNG state
``select``      checkpoint selection by rollout success
``config``      ``TrainConfig``: the paper's recipe as defaults

Submodules are imported on use: torch and transformers load only when training starts.
"""
