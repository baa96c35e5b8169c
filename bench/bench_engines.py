"""Engines: episodes per hour through a vLLM server (the CPU build) vs the transformers backend.

Same model (the bundled SmolLM2-135M), same TWX test episodes, same concurrency: the transformers
backend steps ``--concurrency`` episodes together in-process (KV reuse, batched decoding); vLLM gets
``--concurrency`` requests in flight from exprag's OpenAI client (``eval --backend openai``). Greedy
decoding in both; no retrieval. vLLM's start-up is timed apart and not counted. Both run with
``--threads`` CPU threads (vLLM: OMP_NUM_THREADS, 1 GiB KV cache). Skips, with the reason, when vLLM
is not installed (``scripts/serve_vllm.sh --install-only``).

    python bench/bench_engines.py [--episodes 8] [--steps 6] [--concurrency 4] [--threads 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import time

from runtime import log, offline_one_thread, write_json

GAMES = ["coin", "mapreader", "twc", "arithmetic"]


def play(model, tasks, steps: int, concurrency: int) -> dict:
    from exprag.agent import Agent, AgentConfig
    from exprag.envs import make_env

    envs = [make_env("twx") for _ in range(concurrency)]
    try:
        agent = Agent(model, None, AgentConfig(max_steps=steps, max_new_tokens=12))
        t0 = time.perf_counter()
        results = list(agent.run(envs, tasks))
        wall = time.perf_counter() - t0
    finally:
        for e in envs:
            e.close()
    n_steps = sum(r.stats["steps"] for r in results)
    return {"episodes": len(results), "steps": n_steps, "wall_s": round(wall, 2),
            "episodes_per_hour": round(3600 * len(results) / wall, 1),
            "steps_per_s": round(n_steps / wall, 3),
            "actions": {r.task.task_id: r.trajectory.actions() for r in results}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    offline_one_thread()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from headlines import engines_headline

    from exprag.llm.vllm import vllm_python

    result: dict = {"model": args.model, "episodes": args.episodes, "steps_cap": args.steps,
                    "concurrency": args.concurrency, "threads": args.threads}
    if vllm_python() is None:
        result["skipped"] = ("vLLM is not installed: run scripts/serve_vllm.sh --install-only "
                             "(or set VLLM_PYTHON) to compare engines")
        result["headline"] = []
        print(f"skipped: {result['skipped']}")
        write_json(args.json, result)
        return result

    import torch

    torch.set_num_threads(args.threads)
    from exprag.envs import make_env
    from exprag.llm.hf import HFChatModel
    from exprag.llm.openai_client import OpenAIChatModel
    from exprag.llm.vllm import vllm_server

    with make_env("twx") as env:
        tasks = [env.tasks("test", [GAMES[i % len(GAMES)]])[i // len(GAMES)] for i in range(args.episodes)]
    log("transformers backend ...")
    hf = HFChatModel(args.model, max_batch_size=args.concurrency)
    base = play(hf, tasks, args.steps, args.concurrency)
    del hf
    log("vLLM server starting ...")
    t0 = time.perf_counter()
    with vllm_server(args.model, extra_args=["--max-num-seqs", str(max(args.concurrency, 1))]) as (url, key):
        start_s = time.perf_counter() - t0
        log(f"vLLM up in {start_s:.0f}s")
        client = OpenAIChatModel(args.model, url, api_key=key, timeout=600, concurrency=args.concurrency)
        ours = play(client, tasks, args.steps, args.concurrency)
    same = base.pop("actions") == ours.pop("actions")
    result.update({"transformers": base, "vllm_cpu": ours, "vllm_start_s": round(start_s, 1),
                   "speedup": round(ours["episodes_per_hour"] / base["episodes_per_hour"], 2),
                   "identical_actions": same})
    result["headline"] = engines_headline(result)
    print("| engine | episodes | steps | wall (s) | episodes / hour | steps / s |")
    print("|---|---|---|---|---|---|")
    for name, r in (("transformers (in-process, KV reuse)", base), ("vLLM CPU (HTTP, exprag client)", ours)):
        print(f"| {name} | {r['episodes']} | {r['steps']} | {r['wall_s']} | {r['episodes_per_hour']} | "
              f"{r['steps_per_s']} |")
    print(f"vLLM vs transformers: {result['speedup']}x episodes/hour; vLLM start-up {start_s:.0f}s (not counted); "
          f"identical actions: {same}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
