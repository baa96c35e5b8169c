"""The training loss on action tokens only, and the validation loss (pure functions of a model and batches)."""

from __future__ import annotations

from typing import Any

from exprag.train.data import Example, collate, length_batches


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


def validation_loss(model: Any, examples: list[Example], batch_size: int, pad_id: int, device: Any) -> float:
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
