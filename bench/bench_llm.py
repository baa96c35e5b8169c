"""Chat-backend speed on one multi-turn conversation shape, all variants in the same run.

Each episode: a ~1500-token system prompt (standing in for a K=2 memory block), then ``--turns``
turns of a ~40-token observation and a short scripted action (what the episode loop records); the
model generates a reply at every turn (greedy, up to ``--max-new-tokens``).

Variants, on the same model and the same episodes:
  naive      transformers ``model.generate`` at batch 1, the whole prompt re-encoded every turn
  reuse-b1   exprag backend, KV reuse, one episode at a time (per-sequence caches, no batching)
  nocache-bN exprag backend, no KV reuse, N episodes batched (batching alone)
  exprag     exprag backend, KV reuse, N episodes batched (the default)
Prints wall time per episode, prefill tokens per turn and speed-ups against naive, plus a
micro-benchmark of the cache layer (transformers' concatenating DynamicLayer vs exprag's in-place
buffers). Replies must be identical across variants (greedy); the script says if they are not.

    python bench/bench_llm.py [--model smollm2-135m] [--episodes 4] [--turns 10] [--batch 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOMS = ["kitchen", "hallway", "bedroom", "bathroom", "garden", "study", "cellar", "attic"]
THINGS = ["apple", "mug", "knife", "book", "lamp", "towel", "key", "plate", "soap", "pen"]


def memory_block(target_tokens: int, count) -> str:
    """A deterministic stand-in for two retrieved trajectories rendered as chat JSON."""
    turns, i = [], 0
    text = "Successful trajectories of similar tasks:\n"
    while count(text) < target_tokens:
        room, thing = ROOMS[i % 8], THINGS[i % 10]
        turns.append({"role": "user", "content": f"You arrive at the {room}. On the counter you see a {thing} "
                                                 f"and a {THINGS[(i + 3) % 10]}."})
        turns.append({"role": "assistant", "content": f"take {thing} from counter"})
        text = "Successful trajectories of similar tasks:\n" + json.dumps(turns)
        i += 1
    return text


def observation(ep: int, turn: int) -> str:
    room, a, b = ROOMS[(ep + turn) % 8], THINGS[(ep * 3 + turn) % 10], THINGS[(ep + 2 * turn + 5) % 10]
    return (f"You arrive at the {room}. On the shelf 1, you see a {a}, a {b}, and a candle. "
            f"The drawer {turn + 1} is closed. Nothing else happens. Step {turn + 1} of the task.")


def episodes(n: int, system: str) -> list[list[dict]]:
    task = "Your task is to: put a clean {} in the {}."
    return [[{"role": "system", "content": system},
             {"role": "user", "content": task.format(THINGS[i % 10], ROOMS[(i + 2) % 8]) + " " + observation(i, -1)}]
            for i in range(n)]


def scripted_action(ep: int, turn: int) -> str:
    return f"go to {ROOMS[(ep + turn + 1) % 8]}"


def run_backend(model, n: int, turns: int, system: str, batch: int, max_new: int, reuse: bool) -> dict:
    model.timing = dict.fromkeys(model.timing, 0.0)
    convs = episodes(n, system)
    replies = [[] for _ in range(n)]
    prefill = prompt = 0
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        idx = list(range(start, min(n, start + batch)))
        for turn in range(turns):
            gens = model.generate([convs[i] for i in idx], max_new_tokens=max_new,
                                  session_ids=[f"ep{i}" for i in idx] if reuse else None)
            for i, g in zip(idx, gens):
                replies[i].append(g.text)
                prefill += g.prefill_tokens
                prompt += g.prompt_tokens
                convs[i] += [{"role": "assistant", "content": scripted_action(i, turn)},
                             {"role": "user", "content": observation(i, turn)}]
        for i in idx:
            model.end_session(f"ep{i}")
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "prefill": prefill, "prompt": prompt, "replies": replies, "timing": dict(model.timing)}


def run_naive(model, n: int, turns: int, system: str, max_new: int) -> dict:
    """What one writes without exprag: template, tokenize and ``generate`` the whole prompt each turn."""
    import torch

    hf, tok = model.model, model.tokenizer
    eos = sorted(model.eos_ids)
    convs = episodes(n, system)
    replies = [[] for _ in range(n)]
    prefill = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(n):
            for turn in range(turns):
                text = tok.apply_chat_template(convs[i], tokenize=False, add_generation_prompt=True)
                ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                  do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
                new = out[0, ids.shape[1]:].tolist()
                while new and new[-1] in eos:
                    new.pop()
                replies[i].append(tok.decode(new, skip_special_tokens=True))
                prefill += ids.shape[1]
                convs[i] += [{"role": "assistant", "content": scripted_action(i, turn)},
                             {"role": "user", "content": observation(i, turn)}]
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "prefill": prefill, "prompt": prefill, "replies": replies}


def cache_microbench(model, context: int, steps: int) -> dict:
    """Decode ``steps`` tokens after a ``context``-token prefill, batch 4: DynamicLayer vs buffers."""
    import torch
    from transformers.cache_utils import Cache, DynamicCache

    from exprag.llm.hf import _BufferLayer

    n_layers = model.model.config.num_hidden_layers
    ids = torch.randint(100, 1000, (4, context), device=model.device)
    out = {}
    for name, make in (("dynamic_layer", lambda: DynamicCache()),
                       ("exprag_buffer", lambda: Cache(layers=[_BufferLayer(reserve=steps) for _ in range(n_layers)]))):
        with torch.inference_mode():
            cache = make()
            model.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            tok = ids[:, -1:]
            t0 = time.perf_counter()
            for s in range(steps):
                pos = torch.full((4, 1), context + s, device=model.device)
                model.model(input_ids=tok, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
            out[name] = (time.perf_counter() - t0) / steps
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip", default="", help="comma-separated variants to skip (e.g. nocache-bN,reuse-b1)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from exprag.llm.hf import HFChatModel

    model = HFChatModel(args.model, max_batch_size=args.batch)
    system = memory_block(args.system_tokens, lambda s: len(model.tokenizer(s)["input_ids"]))
    n, T, B, M = args.episodes, args.turns, args.batch, args.max_new_tokens
    # Warm-up (allocator, kernels), not timed.
    run_backend(model, 1, 1, system, 1, 2, reuse=True)

    skip = set(filter(None, args.skip.split(",")))
    results = {"naive": run_naive(model, n, T, system, M)}
    if "reuse-b1" not in skip:
        results["reuse-b1"] = run_backend(model, n, T, system, 1, M, reuse=True)
    if "nocache-bN" not in skip:
        results[f"nocache-b{B}"] = run_backend(model, n, T, system, B, M, reuse=False)
    results["exprag"] = run_backend(model, n, T, system, B, M, reuse=True)
    micro = cache_microbench(model, context=args.system_tokens + 500, steps=16)

    base = results["naive"]
    rows = []
    for name, r in results.items():
        rows.append({
            "variant": name,
            "wall_per_episode_s": round(r["wall_s"] / n, 3),
            "prefill_tokens_per_turn": round(r["prefill"] / (n * T), 1),
            "prompt_tokens_per_turn": round(r["prompt"] / (n * T), 1),
            "speedup_vs_naive": round(base["wall_s"] / r["wall_s"], 2),
            "prefill_ratio_vs_naive": round(base["prefill"] / max(1, r["prefill"]), 1),
            "same_replies_as_naive": r["replies"] == base["replies"],
            # where the backend's time goes; copy = batch assembly + write-back of the KV caches
            "prefill_decode_copy_s": [round(r["timing"][k], 2) for k in ("prefill_s", "decode_s", "copy_s")]
            if "timing" in r else None,
        })
    report = {
        "model": args.model, "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "episodes": n, "turns": T, "batch": B,
        "system_tokens": len(model.tokenizer(system)["input_ids"]), "max_new_tokens": M,
        "variants": rows,
        "decode_step_s_batch4": {k: round(v, 4) for k, v in micro.items()},
    }
    print(f"model {args.model} on {report['device']} ({report['dtype']}, {report['threads']} threads); "
          f"{n} episodes x {T} turns, system prompt {report['system_tokens']} tokens, batch {B}")
    print(f"{'variant':<12} {'s/episode':>10} {'prefill/turn':>13} {'prompt/turn':>12} {'speed-up':>9} "
          f"{'prefill÷':>9}  same replies")
    for r in rows:
        print(f"{r['variant']:<12} {r['wall_per_episode_s']:>10.2f} {r['prefill_tokens_per_turn']:>13.1f} "
              f"{r['prompt_tokens_per_turn']:>12.1f} {r['speedup_vs_naive']:>8.2f}x "
              f"{r['prefill_ratio_vs_naive']:>8.1f}x  {r['same_replies_as_naive']}")
    for r in rows:
        if r["prefill_decode_copy_s"]:
            p, d, c = r["prefill_decode_copy_s"]
            print(f"  {r['variant']}: prefill {p:.1f}s, decode {d:.1f}s (of which KV copies {c:.2f}s = "
                  f"{100 * c / max(1e-9, p + d):.1f}% of backend time)")
    d, b = micro["dynamic_layer"], micro["exprag_buffer"]
    print(f"decode step at batch 4, {args.system_tokens + 500}-token context: DynamicLayer {d * 1e3:.1f} ms, "
          f"exprag buffers {b * 1e3:.1f} ms ({d / b:.2f}x)")
    from headlines import llm_headline

    report["headline"] = llm_headline(report)
    from runtime import write_json

    write_json(args.json, report)
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
