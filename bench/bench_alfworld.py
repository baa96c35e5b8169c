"""ALFWorld: game generation time per game, and env steps/s through exprag's adapter vs the raw engine.

    python bench/bench_alfworld.py [--per-type 2] [--rounds 1] [--out DIR] [--json OUT]

Generation: fresh games of every task type (train split), seconds per game built (unsolvable
candidates included) and per solvable game kept.

Stepping: the expert walkthroughs of those games are replayed (resets and loads not timed) by
- ``raw``: alfworld's own stack (textworld PddlEnv + AlfredDemangler + AlfredInfos + AlfredExpert,
  the engine of ``alfworld-generate``), stock textworld, one game file at a time;
- ``gym``: ``AlfredTWEnv``'s batch machinery (``textworld.gym.register_games``, batch_size=1,
  the same wrappers), stock textworld;
- ``adapter``: ``ALFWorldEnv.step`` (action normalisation, step cap, memoised engine);
- ``adapter-stock``: ``ALFWorldEnv(fast=False)``: the adapter on stock textworld.
Each path runs in its own fresh process (the adapter's speedups are process-wide once installed);
paths alternate for ``--rounds`` rounds so drifts in machine load hit them all. The ratio to ``raw``
is what matters; absolute steps/s depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PATHS = ("raw", "gym", "adapter", "adapter-stock")


# ---- child: replay walkthroughs on one path -------------------------------------------------------
def _replays(games: list[str]) -> list[tuple[str, list[str]]]:
    return [(g, json.loads(Path(g).read_text())["walkthrough"]) for g in games]


def _child(path: str, games: list[str]) -> dict:
    replays = _replays(games)
    steps, secs, errors = 0, 0.0, 0
    if path == "raw":
        import textworld
        from textworld.envs import PddlEnv

        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos

        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile", "expert_plan"])
        env = AlfredExpert(AlfredInfos(AlfredDemangler(PddlEnv(infos), shuffle=False)), expert_type="handcoded")
        for game, actions in replays:
            env.load(game)
            env.reset()
            t0 = time.perf_counter()
            for a in actions:
                try:
                    env.step(a)
                except Exception:  # alfworld's expert may give up mid-replay (it raises from step)
                    errors += 1
            secs += time.perf_counter() - t0
            steps += len(actions)
    elif path == "gym":
        import textworld
        import textworld.gym

        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos

        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile", "expert_plan"])
        env_id = textworld.gym.register_games([g for g, _ in replays], infos, batch_size=1, asynchronous=True,
                                              max_episode_steps=50,
                                              wrappers=[AlfredDemangler(shuffle=False), AlfredInfos,
                                                        AlfredExpert("handcoded")])
        env = textworld.gym.make(env_id)
        walk = dict(replays)
        for _ in replays:
            _, info = env.reset()
            actions = walk[info["extra.gamefile"][0]]
            t0 = time.perf_counter()
            for a in actions:
                try:
                    env.step([a])
                except Exception:
                    errors += 1
            secs += time.perf_counter() - t0
            steps += len(actions)
        env.close()
    else:
        from exprag.envs.alfworld import ALFWorldEnv
        from exprag.envs.base import TaskSpec

        with ALFWorldEnv(data_dir=Path(games[0]).parents[4], fast=path == "adapter") as env:
            for game, actions in replays:
                tid = f"{Path(game).parent.parent.name}/{Path(game).parent.name}"
                task = TaskSpec("alfworld", "train", tid.split("-", 1)[0], tid, {"game_file": game})
                env.reset(task)
                t0 = time.perf_counter()
                for a in actions:
                    env.step(a)
                secs += time.perf_counter() - t0
                steps += len(actions)
    return {"path": path, "steps": steps, "seconds": secs, "errors": errors}


# ---- parent ---------------------------------------------------------------------------------------
def bench_generation(out: Path, per_type: int, seed: int) -> dict:
    from exprag.envs import alfworld_gen as gen

    t0 = time.perf_counter()
    report = gen.generate(out, split="train", per_type=per_type, seed=seed)
    wall = time.perf_counter() - t0
    rows = {}
    for tt, r in report.types.items():
        rows[tt] = {"kept": r.generated, "dropped": r.dropped, "built": r.built,
                    "s_per_built": round(r.seconds / r.built, 2) if r.built else None,
                    "reasons": dict(r.reasons)}
    built = sum(r.built for r in report.types.values())
    kept = sum(r.generated for r in report.types.values())
    return {"per_type": per_type, "wall_s": round(wall, 1), "built": built, "kept": kept,
            "s_per_built": round(wall / max(built, 1), 2), "s_per_kept": round(wall / max(kept, 1), 2),
            "types": rows, "games": [str(g) for g in report.games]}


def bench_steps(games: list[str], rounds: int, paths: tuple[str, ...] = PATHS) -> dict:
    totals = {p: {"steps": 0, "seconds": 0.0, "errors": 0} for p in paths}
    for _ in range(rounds):
        for p in paths:
            proc = subprocess.run([sys.executable, __file__, "--child", p, "--games", json.dumps(games)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{p} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            for k in ("steps", "seconds", "errors"):
                totals[p][k] += r[k]
    out = {p: {"steps": t["steps"], "steps_per_s": round(t["steps"] / t["seconds"], 1), "errors": t["errors"]}
           for p, t in totals.items()}
    for p in paths:
        out[p]["vs_raw"] = round(out[p]["steps_per_s"] / out["raw"]["steps_per_s"], 2)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-type", type=int, default=2, help="games per task type (default 2)")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds per stepping path")
    p.add_argument("--seed", type=int, default=101)
    p.add_argument("--out", default=None, help="keep the generated games here (default: a temp dir)")
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--games", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, json.loads(args.games))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        g = bench_generation(out, args.per_type, args.seed)
        print(f"alfworld generation: {g['kept']} games kept, {g['built'] - g['kept']} dropped, "
              f"{g['wall_s']}s -> {g['s_per_built']} s per game built, {g['s_per_kept']} s per game kept")
        for tt, r in g["types"].items():
            print(f"  {tt:32s} kept {r['kept']}  dropped {r['dropped']}  {r['s_per_built']} s/game  {r['reasons'] or ''}")
        s = bench_steps(g["games"], args.rounds, tuple(args.paths.split(",")))
        steps = next(iter(s.values()))["steps"]
        print(f"alfworld stepping: {steps} walkthrough steps per path ({args.rounds} rounds)")
        for path, r in s.items():
            err = f"  ({r['errors']} steps raised inside alfworld)" if r["errors"] else ""
            print(f"  {path:14s} {r['steps_per_s']:8.1f} steps/s   x{r['vs_raw']:.2f} vs raw{err}")
        if args.json:
            from headlines import alfworld_headline
            from runtime import write_json

            g.pop("games")
            result = {"generation": g, "stepping": s}
            result["headline"] = alfworld_headline(result)
            write_json(args.json, result)


if __name__ == "__main__":
    main()
