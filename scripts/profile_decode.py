"""Where does the time of a batched decode step go? One short profiling run of the transformers backend.

On a random model of SmolLM2-135M's shape (``--layers 30``, as ``gpu_check.py --big``), in bf16 on a GPU,
for a batch of ``--batch`` conversations with ``--prompt-len``-token prompts of slightly different lengths
(so decoding is left-padded, as in ``HFChatModel._decode``), it measures per decode step:

(a) ``HFChatModel.generate`` (our path), with its ``timing`` dict: (decode_s - copy_s) / decode forwards;
(b) a plain loop ``model(ids, cache=DynamicCache, use_cache=True)`` without attention mask (equal-length rows);
(c) the same with a 2D attention mask of growing length: (c1) all ones, (c2) left-padded rows;
(d) our decode loop (``_prefill``, ``_assemble``, the loop of ``_decode``), each part timed between
    ``torch.cuda.synchronize()`` calls: accept (``_accept``: tokenizer.decode per row), prep (mask column,
    input tensors), forward (``model(...)``), tolist (argmax ``.tolist()``);
(e) our decode loop (no syncs) under each SDPA backend (default, cuDNN, efficient, math, flash);
(f) ``torch.profiler`` over ``--profile-steps`` decode steps of (d) without syncs: the top ops by self CPU
    time, by CUDA time, and the GPU kernel time per step (what CUDA graphs could bring a step down to);
(g) a StaticCache decode step (left-padded, 2D mask over the whole static length), eager and replayed as one
    CUDA graph: the floor without per-step Python / launch overhead.

Mind the order of the passes: on a GPU where SDPA picks cuDNN (H100/H200 with torch 2.11), cuDNN builds an
execution plan (tens of ms of host time) for every new combination of q/k/v/mask shapes *and strides*, and
caches it. A decode step has a new K/V length every step, so a first pass over some lengths pays a build
per step and a second pass over the same lengths and strides does not. Hence every loop is timed twice
(first-seen / repeated shapes); (c1) makes exactly the SDPA calls of (b) (an all-ones mask is dropped), so
even its first pass hits (b)'s plans.

The full tables go to ``--out`` (``profile_*.txt``, ``trace.json``, ``summary.json``); the log ends with a
compact summary. CPU smoke test: ``CUDA_VISIBLE_DEVICES= python scripts/profile_decode.py --layers 2
--steps 2 --prompt-len 64 --batch 2`` (random weights: speed only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "src", ROOT / "scripts"):
    if p.is_dir() and str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from gpu_check import BIG_SHAPE, SYSTEM, WORDS  # noqa: E402

RESULTS: dict[str, Any] = {}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def section(name: str, fn: Callable[[], Any]) -> Any:
    print(f"\n== {name}", flush=True)
    try:
        return fn()
    except Exception as e:  # one failed measurement must not stop the others
        traceback.print_exc()
        RESULTS.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        return None


# ---- inputs ---------------------------------------------------------------------------------------
def conversations(m, batch: int, prompt_len: int) -> list[list[dict[str, str]]]:
    """``batch`` conversations of about ``prompt_len`` tokens, row i about 8*i tokens shorter."""

    def conv(i: int, words: int) -> list[dict[str, str]]:
        filler = " ".join(WORDS[(i + j) % 8] for j in range(words))
        return [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Task {i}: {filler}. You are in room {i}."}]

    base = len(m.encode(conv(0, 0)))
    per_word = max((len(m.encode(conv(0, 200))) - base) / 200, 0.5)
    return [conv(i, max(0, int((prompt_len - 8 * i - base) / per_word))) for i in range(batch)]


class DecodeCounter:
    """Counts the model's one-token (decode) forward calls."""

    def __init__(self, model) -> None:
        self.n = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] == 1:
            self.n += 1


# ---- (a) our path ---------------------------------------------------------------------------------
def our_generate(m, convs, steps: int, repeats: int) -> dict[str, Any]:
    counter = DecodeCounter(m.model)
    try:
        m.generate(convs, max_new_tokens=4)  # warm-up
        sync()
        m.timing = {k: 0.0 for k in m.timing}
        counter.n = 0
        t0 = time.perf_counter()
        for _ in range(repeats):
            gens = m.generate(convs, max_new_tokens=steps + 1)
        sync()
        wall = time.perf_counter() - t0
    finally:
        counter.handle.remove()
    t = m.timing
    res = {"timing_s": {k: round(v, 4) for k, v in t.items()}, "decode_forwards": counter.n,
           "wall_s": round(wall, 3), "prompt_tokens": [g.prompt_tokens for g in gens],
           "completion_tokens": [g.completion_tokens for g in gens],
           "ms_per_step_decode_loop": ms((t["decode_s"] - t["copy_s"]) / max(counter.n, 1)),
           "ms_per_step_decode_incl_copies": ms(t["decode_s"] / max(counter.n, 1))}
    print(f"  timing {res['timing_s']}; {counter.n} decode forwards; prompts {res['prompt_tokens']}")
    print(f"  (a) our path: {res['ms_per_step_decode_loop']} ms/step (decode loop), "
          f"{res['ms_per_step_decode_incl_copies']} ms/step with cache copies")
    return res


# ---- (b), (c) plain transformers loops ------------------------------------------------------------
def plain_loop(model, prompts: list[list[int]], steps: int, mode: str, pad_id: int) -> float:
    """ms per decode step of a DynamicCache loop. mode: 'none' (no mask, rows cut to equal length),
    'ones' (2D all-ones mask, equal lengths), 'padded' (2D mask, left-padded rows)."""
    from transformers.cache_utils import DynamicCache

    dev = model.device
    if mode == "padded":
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=dev)
        mask = torch.zeros(len(prompts), width + steps + 1, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            mask[b, width - len(p) : width] = 1
        pos = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
    else:
        width = min(len(p) for p in prompts)
        ids = torch.tensor([p[:width] for p in prompts], device=dev)
        mask = torch.ones(len(prompts), width + steps + 1, dtype=torch.long, device=dev)
        pos = torch.arange(width, device=dev).expand(len(prompts), -1)
        lengths = torch.full((len(prompts),), width, device=dev)
    cache = DynamicCache(config=model.config)
    kw = {} if mode == "none" else {"attention_mask": mask[:, :width]}
    out = model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1, **kw)
    nxt = out.logits[:, -1].argmax(-1)
    sync()
    t0 = time.perf_counter()
    for step in range(steps):
        kw = {} if mode == "none" else {"attention_mask": mask[:, : width + step + 1]}
        out = model(input_ids=nxt[:, None], position_ids=(lengths + step)[:, None], cache=cache, use_cache=True,
                    logits_to_keep=1, **kw)
        nxt = out.logits[:, -1].argmax(-1)  # stays on the device: no sync per step
    sync()
    return (time.perf_counter() - t0) / steps


# ---- (d), (e), (f) our decode loop, unrolled ------------------------------------------------------
@contextlib.contextmanager
def part(times: dict[str, float] | None, name: str) -> Iterator[None]:
    """Times a part of a step between syncs (when ``times`` is given); always labels it for the profiler."""
    with torch.profiler.record_function(f"## {name}"):
        if times is None:
            yield
            return
        sync()
        t0 = time.perf_counter()
        yield
        sync()
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def our_loop(m, prompts: list[list[int]], steps: int, times: dict[str, float] | None = None, *,
             reserve: int | None = None, around: Callable[[], Any] | None = None) -> float:
    """The loop of ``HFChatModel._decode`` on freshly prefilled rows (same calls, same order); returns
    seconds per step. Every step runs (a row that ended keeps decoding) so that the step count is fixed.
    ``reserve`` (default ``steps + 1``) sets the batch buffer's capacity, hence the K/V strides: cuDNN's
    SDPA plan cache is keyed on shapes and strides, so a new reserve gives first-seen shapes. ``around``
    (a context manager factory, e.g. a profiler) wraps the decode steps only, not the prefill."""
    rows = [m._prefill(i, p, None, steps + 1) for i, p in enumerate(prompts)]
    cache, mask, width = m._assemble(rows, max(reserve or 0, steps + 1))
    lengths = torch.tensor([len(r.prompt) for r in rows], device=m.device)
    tokens = [r.first for r in rows]
    sync()
    with (around or contextlib.nullcontext)():
        t0 = time.perf_counter()
        for step in range(steps):
            with part(times, "accept"):
                for b, row in enumerate(rows):
                    m._accept(row, tokens[b], [])
            with part(times, "prep"):
                mask[:, width + step] = True
                kwargs = {"attention_mask": mask[:, : width + step + 1]}
                ids = torch.tensor(tokens, device=m.device)[:, None]
                pos = (lengths + step)[:, None]
            with part(times, "forward"):
                out = m.model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1,
                              **kwargs)
            with part(times, "tolist"):
                tokens = out.logits[:, -1].argmax(-1).tolist()
        sync()
        return (time.perf_counter() - t0) / steps


def label_mask_building() -> None:
    """Label transformers' mask construction and SDPA call for the profiler (record_function wrappers)."""
    import transformers.integrations.sdpa_attention as sdpa_mod
    import transformers.masking_utils as mu
    import transformers.models.llama.modeling_llama as llama
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def labelled(name: str, fn: Callable) -> Callable:
        if getattr(fn, "_labelled", False):
            return fn

        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(f"## {name}"):
                return fn(*args, **kwargs)

        wrapper._labelled = True  # type: ignore[attr-defined]
        return wrapper

    llama.create_causal_mask = labelled("create_causal_mask", llama.create_causal_mask)
    mu._ignore_causal_mask_sdpa = labelled("_ignore_causal_mask_sdpa (fast_all: a sync)", mu._ignore_causal_mask_sdpa)
    ALL_ATTENTION_FUNCTIONS["sdpa"] = labelled("sdpa_attention_forward", sdpa_mod.sdpa_attention_forward)


def sdpa_backends(m, prompts, steps: int) -> dict[str, Any]:
    """Our loop under each SDPA backend: a first pass on first-seen shapes (a reserve no other pass used:
    cuDNN must build its plans) and a second pass on the same shapes (cuDNN plan-cache hits)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    res: dict[str, Any] = {}
    names = ("default", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH", "FLASH_ATTENTION")
    for k, name in enumerate(names):
        ctx = contextlib.nullcontext() if name == "default" else sdpa_kernel(getattr(SDPBackend, name))
        reserve = steps + 101 + 7 * k  # unused elsewhere
        try:
            with ctx:
                first = our_loop(m, prompts, steps, reserve=reserve)
                second = our_loop(m, prompts, steps, reserve=reserve)
            res[name] = {"first_seen_shapes": ms(first), "repeated_shapes": ms(second)}
        except Exception as e:
            res[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
        print(f"  (e) our loop, SDPA backend {name}: ms/step {res[name]}", flush=True)
    return res


def profile(m, prompts, steps: int, out: Path, trace: bool) -> dict[str, Any]:
    """torch.profiler over the decode steps of our loop (not its prefill), on first-seen shapes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = torch.profiler.profile(activities=acts)
    per_step = our_loop(m, prompts, steps, reserve=steps + 61, around=lambda: prof)
    ka = prof.key_averages()
    tables = {
        "self_cpu": ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70),
        "cuda_total": ka.table(sort_by="device_time_total", row_limit=25, max_name_column_width=70),
        "self_cuda": ka.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70),
    }
    for name, text in tables.items():
        (out / f"profile_{name}.txt").write_text(text)
        print(f"\n-- top 25 by {name}\n{text}", flush=True)
    if trace:
        prof.export_chrome_trace(str(out / "trace.json"))
    # A record_function label shows up twice: as a CPU range and as a GPU-side annotation (whose "self
    # device time" is the span it covers on the GPU timeline, gaps included): count kernels only.
    cpu_events = [e for e in ka if e.device_type == DeviceType.CPU]
    gpu_us = sum(e.self_device_time_total for e in cpu_events if not e.key.startswith("## "))
    labels = {e.key: {"cpu_total_ms_per_step": round(e.cpu_time_total / 1e3 / steps, 3),
                      "gpu_kernels_ms_per_step": round(e.device_time_total / 1e3 / steps, 3),
                      "count_per_step": round(e.count / steps, 2)}
              for e in cpu_events if e.key.startswith("## ")}
    hot = {e.key: {"self_cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
                   "count_per_step": round(e.count / steps, 2)}
           for e in sorted(cpu_events, key=lambda e: -e.self_cpu_time_total)[:12]}
    res = {"ms_per_step_under_profiler": ms(per_step), "gpu_kernel_ms_per_step": round(gpu_us / 1e3 / steps, 3),
           "labels": labels, "top_self_cpu": hot}
    print(f"\n  (f) under the profiler {res['ms_per_step_under_profiler']} ms/step; GPU kernels "
          f"{res['gpu_kernel_ms_per_step']} ms/step", flush=True)
    for k, v in labels.items():
        print(f"    {k}: {v}")
    return res


# ---- (g) StaticCache, eager and as a CUDA graph ---------------------------------------------------
def static_decode(m, prompts: list[list[int]], steps: int, pad_id: int) -> dict[str, Any]:
    from transformers.cache_utils import StaticCache

    model, dev = m.model, m.device
    width = max(len(p) for p in prompts)
    total = width + 3 * steps + 16  # eager steps, graph warm-up and replays all advance the cache

    def fresh():
        cache = StaticCache(config=model.config, max_cache_len=total)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=dev)
        mask = torch.ones(len(prompts), total, dtype=torch.long, device=dev)  # future slots: causality masks them
        for b, p in enumerate(prompts):
            mask[b, : width - len(p)] = 0
        pos = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, position_ids=pos, attention_mask=mask, cache=cache, use_cache=True,
                    logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1)[:, None].clone()
        return cache, mask, tok, torch.tensor([len(p) for p in prompts], device=dev)[:, None].clone()

    def step(cache, mask, tok, pos):
        out = model(input_ids=tok, position_ids=pos, attention_mask=mask, cache=cache, use_cache=True,
                    logits_to_keep=1)
        tok.copy_(out.logits[:, -1].argmax(-1)[:, None])
        pos.add_(1)

    res: dict[str, Any] = {}
    cache, mask, tok, pos = fresh()
    step(cache, mask, tok, pos)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(cache, mask, tok, pos)
    sync()
    res["eager_ms_per_step"] = ms((time.perf_counter() - t0) / steps)
    print(f"  (g) StaticCache eager: {res['eager_ms_per_step']} ms/step", flush=True)
    if not torch.cuda.is_available():
        return res
    cache, mask, tok, pos = fresh()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step(cache, mask, tok, pos)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(cache, mask, tok, pos)
    graph.replay()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    sync()
    res["cuda_graph_ms_per_step"] = ms((time.perf_counter() - t0) / steps)
    print(f"  (g) StaticCache as one CUDA graph: {res['cuda_graph_ms_per_step']} ms/step", flush=True)
    return res


# ---- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    ap.add_argument("--layers", type=int, default=BIG_SHAPE["num_layers"], help="layers of the random model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed loop")
    ap.add_argument("--repeats", type=int, default=2, help="generate() calls timed in (a)")
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--dtype", default=None, help="default: bf16 on a GPU, fp32 on CPU")
    ap.add_argument("--no-trace", action="store_true", help="skip the chrome trace")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: a,b,c,d,e,f,g")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="exprag-profile-decode-"))
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    from exprag.llm.hf import HFChatModel, default_device
    from exprag.llm.models import tiny_random_model

    device = default_device()
    shape = {**BIG_SHAPE, "num_layers": args.layers}
    model_dir = tiny_random_model(out / "models" / f"smollm2-shape-{args.layers}l", **shape)
    m = HFChatModel(str(model_dir), device=device, dtype=args.dtype, max_batch_size=args.batch)
    p = next(m.model.parameters())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    RESULTS.update(device=str(p.device), dtype=str(p.dtype), gpu=gpu, torch=torch.__version__,
                   transformers=transformers.__version__, layers=args.layers, batch=args.batch,
                   attn_implementation=m.model.config._attn_implementation,
                   params_m=round(sum(x.numel() for x in m.model.parameters()) / 1e6, 1))
    print(f"== setup: {RESULTS}", flush=True)
    label_mask_building()

    convs = conversations(m, args.batch, args.prompt_len)
    prompts = [m.encode(c) for c in convs]
    pad_id = m.tokenizer.pad_token_id if m.tokenizer.pad_token_id is not None else 0
    RESULTS["prompt_tokens"] = [len(x) for x in prompts]

    if "a" not in skip:
        RESULTS["a_generate"] = section("(a) HFChatModel.generate", lambda: our_generate(
            m, convs, args.steps, args.repeats))

    def plain() -> dict[str, Any]:
        res = {}
        for mode in ("none", "ones", "padded"):
            first = plain_loop(m.model, prompts, args.steps, mode, pad_id)
            second = plain_loop(m.model, prompts, args.steps, mode, pad_id)
            res[mode] = {"first_pass": ms(first), "second_pass": ms(second)}
            print(f"  ({'b' if mode == 'none' else 'c'}) plain DynamicCache loop, mask {mode}: ms/step {res[mode]}",
                  flush=True)
        return res

    if not {"b", "c"} <= skip:
        RESULTS["bc_plain_ms_per_step"] = section("(b, c) plain transformers loops", plain)

    def split() -> dict[str, Any]:
        first = our_loop(m, prompts, args.steps)  # first-seen shapes: cuDNN builds a plan per step
        second = our_loop(m, prompts, args.steps)  # the same shapes and strides: plan-cache hits
        times: dict[str, float] = {}
        synced = our_loop(m, prompts, args.steps, times)
        res = {"ms_per_step_first_seen_shapes": ms(first), "ms_per_step_repeated_shapes": ms(second),
               "ms_per_step_synced": ms(synced), "parts_ms_per_step": {k: ms(v / args.steps) for k, v in times.items()}}
        print(f"  (d) our loop: {res['ms_per_step_first_seen_shapes']} ms/step on first-seen shapes, "
              f"{res['ms_per_step_repeated_shapes']} on repeated ones; synced {res['ms_per_step_synced']} ms/step "
              f"= {res['parts_ms_per_step']}", flush=True)
        return res

    if "d" not in skip:
        RESULTS["d_split"] = section("(d) our decode loop, split", split)
    if "e" not in skip:
        RESULTS["e_sdpa_backends_ms_per_step"] = section("(e) SDPA backends", lambda: sdpa_backends(
            m, prompts, max(4, args.steps // 2)))
    if "f" not in skip:
        RESULTS["f_profile"] = section("(f) torch.profiler", lambda: profile(
            m, prompts, args.profile_steps, out, not args.no_trace))
    if "g" not in skip:  # last: a failed graph capture can leave CUDA in a bad state
        RESULTS["g_static"] = section("(g) StaticCache, eager and CUDA graph", lambda: static_decode(
            m, prompts, args.steps, pad_id))

    (out / "summary.json").write_text(json.dumps(RESULTS, indent=2, default=str) + "\n")
    print(f"\n== summary ({out / 'summary.json'})\n{json.dumps(RESULTS, indent=1, default=str)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
