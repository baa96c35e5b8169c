"""Environment stepping speed: ScienceWorld's fast path (simulator step + score) vs the package's
``env.step`` (which enumerates every valid action after each step), on the same gold replays.

    python bench/bench_env_step.py [--steps N] [--json OUT]

Both paths replay identical action sequences in one process and one JVM; the ratio is what matters
(absolute steps/s depend on the machine and its load). Resets are not timed.
"""

from __future__ import annotations

import argparse
import time

from headlines import env_step_headline
from runtime import write_json

# Deterministic worlds with gold sequences of 8-40 steps and a mix of room, device and thermal dynamics.
BENCH_TYPES = ("boil", "power-component", "chemistry-mix-paint-secondary-color", "use-thermometer",
               "identify-life-stages-2")


def _replay_seconds(env, task, actions: list[str]) -> float:
    env.reset(task)
    t0 = time.perf_counter()
    for a in actions:
        env.step(a)
    return time.perf_counter() - t0


def bench_scienceworld(n_steps: int = 200, task_types: tuple[str, ...] = BENCH_TYPES) -> dict:
    """Replay gold sequences (cycling over the task types' first train variations) until ``n_steps``
    steps were taken on each path; return steps/s of both paths and their ratio."""
    from exprag.envs.scienceworld import ScienceWorldEnv

    with ScienceWorldEnv(env_step_limit=10_000) as env:
        replays = []
        for tt in task_types:
            task = env.tasks("train", [tt])[0]
            env.reset(task)
            replays.append((task, env.gold_actions()))
        for task, actions in replays:  # untimed: the JVM compiles the simulator's hot paths first
            _replay_seconds(env, task, actions)
        secs = {"fast": 0.0, "package": 0.0}
        steps = 0
        i = 0
        while steps < n_steps:
            task, actions = replays[i % len(replays)]
            actions = actions[: n_steps - steps]
            # Interleaved, alternating which goes first, so drifts in machine load hit both paths.
            for path in ("fast", "package") if i % 2 == 0 else ("package", "fast"):
                env.fast_step = path == "fast"
                secs[path] += _replay_seconds(env, task, actions)
            steps += len(actions)
            i += 1
    fast, package = steps / secs["fast"], steps / secs["package"]
    return {"env": "scienceworld", "steps": steps, "fast_steps_per_s": round(fast, 1),
            "package_steps_per_s": round(package, 1), "speedup": round(fast / package, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON here")
    args = p.parse_args(argv)
    r = bench_scienceworld(args.steps)
    print(f"scienceworld: {r['steps']} gold-replay steps per path")
    print(f"  fast path (simulator step):   {r['fast_steps_per_s']:8.1f} steps/s")
    print(f"  package env.step (enumerates): {r['package_steps_per_s']:8.1f} steps/s")
    print(f"  speedup: {r['speedup']:.2f}x")
    if args.json:
        r["headline"] = env_step_headline(r)
        write_json(args.json, r)


if __name__ == "__main__":
    main()
