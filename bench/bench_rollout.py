"""Rollout speed: the naive loop vs exprag's backend, same model, same episodes, static K=2.

(a) naive: batch 1, the whole prompt (system + memory block + history) re-encoded every step;
(b) exprag: KV cache reused across the turns of an episode, several episodes batched.

Prints wall time per episode and prefill tokens per step for both, and their ratios (same run).
Greedy decoding makes both produce the same actions, so they play identical episodes.

    python bench/bench_rollout.py [--model smollm2-135m] [--episodes 4] [--steps 8] [--batch 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from runtime import write_json


def run_variant(model, bank, tasks, steps: int, batch: int) -> dict:
    from exprag.agent import Agent, AgentConfig
    from exprag.bank import Retriever
    from exprag.envs import make_env
    from exprag.memory_block import MemorySpec

    envs = [make_env("twx") for _ in range(batch)]
    try:
        agent = Agent(model, Retriever(bank), AgentConfig(memory=MemorySpec(k=2, mode="static"), max_steps=steps,
                                                          max_new_tokens=12))
        t0 = time.perf_counter()
        results = list(agent.run(envs, tasks))
        wall = time.perf_counter() - t0
    finally:
        for e in envs:
            e.close()
    n_steps = sum(r.stats["steps"] for r in results)
    return {
        "episodes": len(results),
        "wall_s": round(wall, 2),
        "wall_per_episode_s": round(wall / len(results), 3),
        "prefill_tokens_per_step": round(sum(r.stats["prefill_tokens"] for r in results) / n_steps, 1),
        "prompt_tokens_per_step": round(sum(r.stats["prompt_tokens"] for r in results) / n_steps, 1),
        "actions": {r.task.task_id: r.trajectory.actions() for r in results},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--episodes", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from exprag.bank import build_bank
    from exprag.envs import make_env
    from exprag.expert import collect
    from exprag.llm.hf import HFChatModel

    with make_env("twx") as env:
        bank_trajs = list(collect(env, [t for g in ("coin", "mapreader", "twc", "arithmetic")
                                        for t in env.tasks("train", [g])[:3]]))
        games = ["coin", "mapreader", "twc", "arithmetic"]
        tasks = [env.tasks("test", [games[i % len(games)]])[i // len(games)] for i in range(args.episodes)]
    with tempfile.TemporaryDirectory() as tmp:
        bank = build_bank(bank_trajs, Path(tmp) / "bank", "bm25")
        naive = HFChatModel(args.model, kv_reuse=False, max_batch_size=1)
        a = run_variant(naive, bank, tasks, args.steps, batch=1)
        del naive
        ours = HFChatModel(args.model, kv_reuse=True, max_batch_size=args.batch)
        b = run_variant(ours, bank, tasks, args.steps, batch=args.batch)
    same = a.pop("actions") == b.pop("actions")
    result = {
        "model": args.model, "episodes": args.episodes, "steps_cap": args.steps, "k": 2,
        "naive_batch1_no_reuse": a, "exprag_kv_reuse_batched": b,
        "speedup_per_episode": round(a["wall_per_episode_s"] / b["wall_per_episode_s"], 2),
        "prefill_reduction": round(a["prefill_tokens_per_step"] / b["prefill_tokens_per_step"], 2),
        "identical_actions": same,
    }
    from headlines import rollout_headline

    result["headline"] = rollout_headline(result)
    print("| variant | wall / episode (s) | prefill tokens / step | prompt tokens / step |")
    print("|---|---|---|---|")
    for name, r in (("naive (batch 1, full re-encode)", a), (f"exprag (KV reuse, batch {args.batch})", b)):
        print(f"| {name} | {r['wall_per_episode_s']:.2f} | {r['prefill_tokens_per_step']:.0f} | "
              f"{r['prompt_tokens_per_step']:.0f} |")
    print(f"speed-up per episode: {result['speedup_per_episode']}x; prefill tokens per step: "
          f"{result['prefill_reduction']}x fewer; identical actions: {same}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
