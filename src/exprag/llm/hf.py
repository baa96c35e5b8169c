"""The transformers backend: greedy chat generation with KV reuse across the turns of an episode.

How a ``generate`` call runs (measured choices, see bench/bench_llm.py):

1. **Prefill, one sequence at a time, into that session's own cache.** With static retrieval each
   step's prompt is the previous prompt + reply + observation, so the session's cached token ids are
   compared with the new prompt's ids and only the tokens after the longest common prefix are run;
   a prompt that diverges (dynamic retrieval rewrote the system prompt) crops the cache to the common
   prefix, down to a full prefill. Prefilling rows separately needs no padding, so a new episode's
   2,000-token prompt never forces the other rows of the batch to be recomputed.
2. **Decode, batched with left padding.** Decoding is bound by reading the weights, so the rows share
   each step: their caches are copied once into one left-padded buffer (no holes, so positions and
   sliding windows stay exact) and decoded together; afterwards each row's new keys/values are
   appended to its session cache.

Caches are preallocated buffers written in place (:class:`_BufferLayer`): transformers'
``DynamicLayer`` concatenates, i.e. copies the whole cache for every generated token.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from exprag.checksums import check_adapter
from exprag.llm.base import (
    DEFAULT_MAX_NEW_TOKENS,
    Conversation,
    Generation,
    ModelError,
    check_batch,
)
from exprag.llm.models import ResolvedModel, quiet_transformers, resolve_model

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}
# End-of-turn markers of common chat templates; used when they occur in the model's template.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


class _BufferLayer(DynamicLayer):
    """A KV cache layer over a preallocated ``[batch, heads, capacity, dim]`` buffer, written in place
    and grown geometrically; ``keys``/``values`` are views of the filled part."""

    def __init__(self, reserve: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reserve = reserve
        self.length = 0

    @classmethod
    def wrap(cls, k: torch.Tensor, v: torch.Tensor, length: int) -> "_BufferLayer":
        layer = cls()
        layer._k, layer._v, layer.length = k, v, length
        layer.dtype, layer.device, layer.is_initialized = k.dtype, k.device, True
        layer._views()
        return layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, n, d = key_states.shape
        cap = n + self.reserve
        self._k = key_states.new_empty(b, h, cap, d)
        self._v = value_states.new_empty(b, value_states.shape[1], cap, value_states.shape[3])
        self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[-2]:
            self._grow(end + max(self.reserve, end // 2))
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def crop_to(self, length: int) -> None:
        self.length = min(length, self.length)
        self._views()

    def _grow(self, cap: int) -> None:
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], old.shape[1], cap, old.shape[3])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def _views(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0


@dataclass
class _Session:
    ids: list[int]  # the tokens whose keys/values the layers hold
    layers: list[_BufferLayer]


@dataclass
class _Row:
    index: int
    prompt: list[int]
    prefill: int
    cache: Cache
    first: int  # first generated token (from the prefill logits)
    out: list[int] = field(default_factory=list)
    finish: str = "length"
    text: str = ""


def _attention_backends(device: Any) -> contextlib.AbstractContextManager:
    """On CUDA, scaled-dot-product attention without the cuDNN backend. cuDNN builds an execution plan
    on the CPU for every new key/value length, and decoding meets a new length at every step: on an
    H200 that was ~60 ms of a 99 ms decode step (3.4 ms of GPU work) for a 30-layer model
    (scripts/profile_decode.py). Flash / memory-efficient kernels where they apply, else math."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # bf16 matmuls on CPU are slow and lossy
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r} (choose {', '.join(sorted(_DTYPES))})") from None


class HFChatModel:
    """A :class:`~exprag.llm.base.ChatModel` running a transformers causal LM in this process.

    ``max_batch_size`` bounds the rows decoded together; ``max_sessions`` the KV caches kept
    (least recently used are dropped); ``kv_reuse=False`` ignores sessions (the naive baseline).
    ``timing`` accumulates seconds spent in prefill, decode and cache copies (wall clock, exact on
    CPU). Thread-safe: calls are serialised.
    """

    def __init__(
        self,
        model: str | ResolvedModel,
        *,
        adapter: str | Path | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        max_batch_size: int = 8,
        max_sessions: int = 64,
        kv_reuse: bool = True,
        name: str | None = None,
    ) -> None:
        resolved = resolve_model(model) if isinstance(model, str) else model
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_batch_size = max(1, max_batch_size)
        self.max_sessions = max_sessions
        self.path = resolved.path
        with quiet_transformers():
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(resolved.path)
                net = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=self.dtype)
            except (OSError, ValueError) as e:
                raise ModelError(f"model {resolved.name!r}: cannot load {resolved.path}: {e}") from None
            if adapter is not None:
                net = _with_adapter(net, Path(adapter), resolved)
        self.model = net.to(self.device).eval()
        if not self.tokenizer.chat_template:
            raise ModelError(f"model {resolved.name!r} ({resolved.path}) has no chat template")
        self.name = name or (resolved.name if adapter is None else f"{resolved.name}+{Path(adapter).name}")
        self.eos_ids = self._end_of_turn_ids()
        layer_types = getattr(self.model.config.get_text_config(decoder=True), "layer_types", None) or []
        # Our in-place buffers cover attention layers; other layer kinds (linear attention, SSM) keep
        # transformers' own cache, one row at a time, without reuse.
        self.supports_reuse = all(t in ("full_attention", "sliding_attention") for t in layer_types)
        self.kv_reuse = kv_reuse and self.supports_reuse
        self._num_layers = self.model.config.get_text_config(decoder=True).num_hidden_layers
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._lock = threading.Lock()
        self.timing = {"prefill_s": 0.0, "decode_s": 0.0, "copy_s": 0.0}
        self._resolved = resolved
        self.adapters: dict[str, Path] = {}  # name -> directory, added by load_adapter

    # ---- LoRA adapters served by name (exprag serve --lora-modules) ---------------------------------
    def load_adapter(self, name: str, adapter: str | Path) -> None:
        """Add a LoRA adapter for this base model under ``name``, kept unmerged beside the others so
        that one copy of the base weights serves them all; ``generate(..., adapter=name)`` uses it."""
        path = Path(adapter)
        with self._lock, quiet_transformers():
            if name in self.adapters:
                if self.adapters[name] == path.resolve():
                    return
                raise ModelError(f"an adapter named {name!r} is already loaded from {self.adapters[name]}")
            check_adapter_base(path, self._resolved)
            from peft import PeftModel

            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(path), adapter_name=name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            except _weights_error() as e:
                raise _adapter_error(e, path) from None
            except (RuntimeError, ValueError, KeyError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ModelError(f"adapter {path} does not fit model {self._resolved.name!r}: {first}") from None
            self.model = self.model.to(self.device).eval()
            self.adapters[name] = path.resolve()

    def _using(self, adapter: str | None) -> contextlib.AbstractContextManager:
        """Run with ``adapter`` active, or with every added adapter off (None)."""
        if not self.adapters:
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    # ---- the protocol ----------------------------------------------------------------------------
    def generate(
        self,
        conversations: Sequence[Conversation],
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        stop: Sequence[str] | None = None,
        session_ids: Sequence[str | None] | None = None,
        adapter: str | None = None,
    ) -> list[Generation]:
        """``adapter``: the name of a LoRA adapter added with :meth:`load_adapter` (None: the model as
        loaded); its sessions are kept apart from the base model's (their keys/values differ)."""
        sids = check_batch(conversations, session_ids)
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if adapter is not None:
            if adapter not in self.adapters:
                raise ModelError(f"no adapter named {adapter!r} is loaded")
            sids = [None if s is None else f"{adapter}\x00{s}" for s in sids]
        stops = [s for s in (stop or []) if s]
        with self._lock, torch.inference_mode(), _attention_backends(self.device), self._using(adapter):
            start = time.perf_counter()
            prompts = [self.encode(c) for c in conversations]
            rows: list[_Row] = []
            # Similar lengths decode together: less padding.
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            size = self.max_batch_size if self.supports_reuse else 1
            for k in range(0, len(order), size):
                t0 = time.perf_counter()
                chunk = [self._prefill(i, prompts[i], sids[i], max_new_tokens) for i in order[k : k + size]]
                t1 = time.perf_counter()
                self._decode(chunk, max_new_tokens, stops)
                self.timing["prefill_s"] += t1 - t0
                self.timing["decode_s"] += time.perf_counter() - t1
                for row in chunk:
                    self._store(row, sids[row.index])
                rows.extend(chunk)
            seconds = time.perf_counter() - start
        rows.sort(key=lambda r: r.index)
        return [
            Generation(
                text=r.text,
                prompt_tokens=len(r.prompt),
                prefill_tokens=r.prefill,
                completion_tokens=len(r.out),
                seconds=seconds,
                finish_reason=r.finish,
            )
            for r in rows
        ]

    def end_session(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    @property
    def context_length(self) -> int | None:
        """The most tokens (prompt + reply) the model attends over; None when its config does not say."""
        n = getattr(self.model.config.get_text_config(decoder=True), "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    def encode(self, conversation: Conversation) -> list[int]:
        """Token ids of the prompt (chat template + generation prompt), as the model sees it."""
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    # ---- internals ---------------------------------------------------------------------------------
    def _end_of_turn_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = self.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        template = str(self.tokenizer.chat_template)
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in _END_OF_TURN if t in template and t in vocab)
        if not ids:
            raise ModelError(f"model {self.name!r}: no end-of-turn token found")
        return ids

    def _new_cache(self, reserve: int, layers: list[_BufferLayer] | None = None) -> Cache:
        if not self.supports_reuse:
            return DynamicCache(config=self.model.config)
        if layers is None:
            layers = [_BufferLayer(reserve=reserve) for _ in range(self._num_layers)]
        return Cache(layers=layers)

    def _prefill(self, index: int, prompt: list[int], sid: str | None, max_new_tokens: int) -> _Row:
        reserve = max_new_tokens + 256  # room for this reply and the next observation
        session = self._sessions.pop(sid, None) if (sid is not None and self.kv_reuse) else None
        reuse = 0
        if session is not None:
            # At least one prompt token must run to give the next-token logits.
            reuse = min(_common_prefix(session.ids, prompt), len(prompt) - 1)
        if reuse > 0:
            for layer in session.layers:
                layer.crop_to(reuse)
            cache = self._new_cache(reserve, session.layers)
        else:
            cache = self._new_cache(reserve)
        new = torch.tensor([prompt[reuse:]], device=self.device)
        positions = torch.arange(reuse, len(prompt), device=self.device)[None]
        logits = self.model(
            input_ids=new, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        ).logits
        return _Row(index, prompt, len(prompt) - reuse, cache, int(logits[0, -1].argmax()))

    def _decode(self, rows: list[_Row], max_new_tokens: int, stops: list[str]) -> None:
        """Greedy decoding of the rows together; leaves each row's ``out``, ``text``, ``finish``, and
        its cache holding the prompt plus the reply tokens that were fed back."""
        t0 = time.perf_counter()
        if len(rows) == 1:
            cache, mask, width = rows[0].cache, None, None
        else:
            cache, mask, width = self._assemble(rows, max_new_tokens)
        copy = time.perf_counter() - t0
        lengths = torch.tensor([len(r.prompt) for r in rows], device=self.device)
        tokens = [r.first for r in rows]
        done = [False] * len(rows)
        fed = 0
        for step in range(max_new_tokens):
            for b, row in enumerate(rows):
                if not done[b]:
                    done[b] = self._accept(row, tokens[b], stops)
            if all(done) or step == max_new_tokens - 1:
                break
            kwargs: dict[str, Any] = {}
            if mask is not None:
                mask[:, width + step] = True
                kwargs["attention_mask"] = mask[:, : width + step + 1]
            out = self.model(
                input_ids=torch.tensor(tokens, device=self.device)[:, None],
                position_ids=(lengths + step)[:, None],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                **kwargs,
            )
            fed += 1
            tokens = out.logits[:, -1].argmax(-1).tolist()
        t0 = time.perf_counter()
        for b, row in enumerate(rows):
            keep = len(row.prompt) + min(fed, len(row.out))  # tokens after a row's end are padding
            if mask is None:
                if isinstance(cache, Cache) and self.supports_reuse:
                    for layer in cache.layers:
                        layer.crop_to(keep)
            else:
                for own, batch in zip(row.cache.layers, cache.layers):
                    if not batch.is_initialized:
                        continue
                    own.update(
                        batch._k[b : b + 1, :, width : width + keep - len(row.prompt)],
                        batch._v[b : b + 1, :, width : width + keep - len(row.prompt)],
                    )
        self.timing["copy_s"] += copy + time.perf_counter() - t0

    def _assemble(self, rows: list[_Row], max_new_tokens: int) -> tuple[Cache, torch.Tensor, int]:
        """Copy the rows' caches into one left-padded batch buffer with room for the reply."""
        width = max(len(r.prompt) for r in rows)
        cap = width + max_new_tokens
        mask = torch.zeros(len(rows), cap, dtype=torch.bool, device=self.device)
        for b, r in enumerate(rows):
            mask[b, width - len(r.prompt) : width] = True
        layers = []
        for per_row in zip(*(r.cache.layers for r in rows)):
            if not per_row[0].is_initialized:  # a layer without its own cache (KV sharing)
                layers.append(_BufferLayer())
                continue
            k0, v0 = per_row[0].keys, per_row[0].values
            k = k0.new_empty(len(rows), k0.shape[1], cap, k0.shape[3])
            v = v0.new_empty(len(rows), v0.shape[1], cap, v0.shape[3])
            for b, layer in enumerate(per_row):
                pad = width - layer.length
                # Padding is masked, but must be finite: 0 * NaN would poison the attention output.
                k[b, :, :pad].zero_()
                v[b, :, :pad].zero_()
                k[b, :, pad:width] = layer.keys[0]
                v[b, :, pad:width] = layer.values[0]
            layers.append(_BufferLayer.wrap(k, v, width))
        return Cache(layers=layers), mask, width

    def _accept(self, row: _Row, token: int, stops: list[str]) -> bool:
        """Append a generated token to the row; True when the row's reply is finished."""
        row.out.append(token)
        if token in self.eos_ids:
            row.finish = "stop"
            return True
        row.text = self.tokenizer.decode(row.out, skip_special_tokens=True)
        for s in stops:
            at = row.text.find(s)
            if at >= 0:
                row.text, row.finish = row.text[:at], "stop"
                return True
        return False

    def _store(self, row: _Row, sid: str | None) -> None:
        if sid is None or not self.kv_reuse:
            return
        fed = row.cache.layers[0].length - len(row.prompt)
        self._sessions[sid] = _Session(row.prompt + row.out[:fed], list(row.cache.layers))
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)


# ---- LoRA adapters -------------------------------------------------------------------------------
def _weights_error() -> type[Exception]:
    from safetensors import SafetensorError

    return SafetensorError


def _adapter_error(e: Exception, adapter: Path) -> ModelError:
    """A weights file that safetensors cannot read (truncated, garbled, not safetensors at all)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ModelError(f"{Path(adapter) / 'adapter_model.safetensors'}: unreadable adapter weights ({first}); "
                      "the adapter is corrupt or not fully written")


def _with_adapter(model: Any, adapter: Path, resolved: ResolvedModel) -> Any:
    check_adapter_base(adapter, resolved)
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except _weights_error() as e:
        raise _adapter_error(e, adapter) from None
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"adapter {adapter} does not fit model {resolved.name!r} ({resolved.path}): {first}"
        ) from None


def check_adapter_base(adapter: Path, resolved: ResolvedModel) -> None:
    """A PEFT adapter directory trained on this base model, whose weights match the checksum exprag
    recorded when it wrote them (if it did), or a ModelError saying which it is not."""
    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.is_file():
        raise ModelError(f"adapter {adapter}: no adapter_config.json (not a PEFT adapter directory)")
    try:
        base = json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_file}: invalid JSON ({e.msg})") from None
    if base and not _same_base(str(base), resolved):
        raise ModelError(
            f"adapter {adapter} was trained on base model {base!r}, but the model is {resolved.name!r} "
            f"({resolved.path}); pass the adapter's base model with --model"
        )
    check_adapter(adapter, ModelError)


def _same_base(base: str, resolved: ResolvedModel) -> bool:
    """Loose name match (local copies of a hub model keep its name), exact when both are paths."""
    base_path = Path(base).expanduser()
    if base_path.exists():
        try:
            if base_path.resolve() == resolved.path.resolve():
                return True
        except OSError:
            pass
    names = {resolved.name, resolved.path.name, *resolved.aliases}
    key = base.rstrip("/").split("/")[-1].lower()
    return key in {n.rstrip("/").split("/")[-1].lower() for n in names}
