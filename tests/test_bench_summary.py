"""`make bench`'s summary, from hand-written benchmark results (no benchmark runs here): the headline
lists each script derives from its JSON, the ratio table, the JSON summary, and that every argument
set run_all passes parses with the script's own argparse."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    """A bench/ script as a module (bench/ is not a package; its scripts import each other by name)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run_all():
    return _load("run_all")


@pytest.fixture(scope="module")
def hl():
    return _load("headlines")


# ---- the JSON shapes the scripts write (numbers made up) -------------------------------------------------
ENV_STEP = {"env": "scienceworld", "steps": 200, "fast_steps_per_s": 60.0, "package_steps_per_s": 6.0,
            "speedup": 10.0}
RETRIEVAL = {"retrieval": [{"size": 1000, "exact_p50_ms": 30.0, "faiss_p50_ms": 40.0},
                           {"size": 10000, "exact_p50_ms": 64.0, "faiss_p50_ms": 25.6}]}
ALFWORLD = {"generation": {"per_type": 1},
            "stepping": {"raw": {"steps": 50, "steps_per_s": 7.0, "errors": 0, "vs_raw": 1.0},
                         "gym": {"steps": 50, "steps_per_s": 5.0, "errors": 0, "vs_raw": 0.71},
                         "adapter": {"steps": 50, "steps_per_s": 70.0, "errors": 0, "vs_raw": 10.0}}}
LLM = {"batch": 4, "variants": [
    {"variant": "naive", "wall_per_episode_s": 10.0, "prefill_tokens_per_turn": 1800.0},
    {"variant": "exprag", "wall_per_episode_s": 1.25, "prefill_tokens_per_turn": 60.0}],
    "decode_step_s_batch4": {"dynamic_layer": 0.03, "exprag_buffer": 0.02}}
ROLLOUT = {"naive_batch1_no_reuse": {"wall_per_episode_s": 126.8, "prefill_tokens_per_step": 2681.0},
           "exprag_kv_reuse_batched": {"wall_per_episode_s": 27.8, "prefill_tokens_per_step": 452.0}}
TRAIN = {"results": {"trajectory": {"cpu_s": 10.0, "peak_mb": 900.0},
                     "trl": {"cpu_s": 22.0, "peak_mb": 1200.0}}}


def _quality_row(config, top1, all_k, nt_top1=None):
    nt = {"n": 3, "top1": nt_top1, "any_at_k": None, "all_at_k": None}
    return {"config": config, "overall": {"n": 40, "top1": top1, "any_at_k": 1.0, "all_at_k": all_k}, "no_twin": nt}


QUALITY = {"k": 2, "envs": [
    {"env": "twx", "judged_on": "overall",
     "rows": [_quality_row("dense (paper)", 0.8, 0.0), _quality_row("bm25", 0.9, 0.9),
              _quality_row("procedure + dense + diversity", 1.0, 1.0)]},
]}


def test_headline_entries(hl):
    (e,) = hl.env_step_headline(ENV_STEP)
    assert e["ratio"] == 10.0 and e["higher_is_better"] and e["baseline_value"] == 6.0 and e["ours_value"] == 60.0
    r = hl.retrieval_headline(RETRIEVAL)
    assert [x["ratio"] for x in r] == [0.75, 2.5] and not r[0]["higher_is_better"]  # exact / faiss
    a = hl.alfworld_headline(ALFWORLD)
    assert [(x["baseline_value"], x["ratio"]) for x in a] == [(7.0, 10.0), (5.0, 14.0)]
    assert [x["ratio"] for x in hl.llm_headline(LLM)] == [8.0, 30.0, 1.5]
    assert [x["ratio"] for x in hl.rollout_headline(ROLLOUT)] == [4.561, 5.931]
    assert [x["ratio"] for x in hl.train_headline(TRAIN)] == [2.2, 1.333]
    cw = {"env": "scienceworld", "split": "train", "serial": {"trajectories": 10, "trajectories_per_s": 1.0},
          "workers": {"workers": 2, "trajectories_per_s": 1.6}}
    (ap,) = hl.bank_append_headline({"runs": [{"size": 1000, "rebuild_s": 2.0, "extend_s": 0.1}]})
    assert ap["ratio"] == 20.0 and not ap["higher_is_better"]
    (tk,) = hl.topk_headline({"runs": [{"size": 1000, "k": 5, "baseline_ms": 2.0, "ours_ms": 0.5}]})
    assert tk["ratio"] == 4.0 and not tk["higher_is_better"] and "1,000-key" in tk["metric"]
    (c,) = hl.collect_workers_headline(cw)
    assert c["ratio"] == 1.6 and c["higher_is_better"] and "(10 tasks)" in c["metric"]
    q = hl.retrieval_quality_headline(QUALITY)
    assert [(x["baseline_value"], x["ours_value"], x["ratio"]) for x in q] == [(0.8, 1.0, 1.25), (0.0, 1.0, None)]
    assert all(set(x) == {"metric", "baseline", "baseline_value", "ours", "ours_value", "ratio", "higher_is_better"}
               for x in r + a + q)
    # ALFWorld is judged on its no-twin queries
    alf = {"k": 2, "envs": [dict(QUALITY["envs"][0], env="alfworld", judged_on="no_twin")]}
    assert hl.retrieval_quality_headline(alf)[0]["baseline_value"] is None
    assert "no-twin queries, n=3" in hl.retrieval_quality_headline(alf)[0]["metric"]
    # the paraphrase benchmark: test-set rates, default vs dense
    rate = lambda t1, a2: {"test": {"n": 72, "top1": t1, "all_at_k": a2}}  # noqa: E731
    para = {"k": 2, "envs": [], "paraphrases": [{"env": "alfworld", "rows": [
        {"config": "dense (paper)", **rate(0.5, 0.4)},
        {"config": hl.PARAPHRASE_OURS, **rate(0.75, 0.6)}]}]}
    p = hl.retrieval_quality_headline(para)
    assert [(x["ratio"], x["metric"]) for x in p] == [
        (1.5, "alfworld test paraphrases (n=72): top-1 same-type rate"),
        (1.5, "alfworld test paraphrases (n=72): all@2 same-type rate")]


def test_summary_table_and_json(run_all, hl):
    benchmarks = {
        "env_step": {"status": "ok", "seconds": 12.3, "result": dict(ENV_STEP, headline=hl.env_step_headline(ENV_STEP)),
                     "command": ["bench/bench_env_step.py", "--json", "x.json"]},
        "retrieval_quality": {"status": "ok", "seconds": 5.0,
                              "result": dict(QUALITY, headline=hl.retrieval_quality_headline(QUALITY))},
        "train": {"status": "failed (exit 1)", "seconds": 3.0},
        "llm": {"status": "ok", "seconds": 1.0, "result": {"variants": []}},  # ran, but no headline
    }
    machine = {"platform": "Linux-x", "processor": "x86_64", "cpu_count": 2, "torch_threads": 2, "python": "3.11",
               "cpu_model": "AMD EPYC", "cpu_vector": ["avx", "avx2"]}
    summary, md = run_all.build_summary(benchmarks, machine, "2025-01-01T00:00:00", "quick")
    assert "processor x86_64 (AMD EPYC; avx, avx2); 2 CPUs" in md
    lines = md.splitlines()
    head = lines.index("| benchmark | metric | baseline | ours | ratio |")
    assert lines[head + 1] == "|---|---|---|---|---|"
    rows = lines[head + 2: lines.index("", head)]
    assert rows == [
        "| env_step | ScienceWorld gold-replay steps/s (higher is better) | env.step (enumerates valid actions): 6 | "
        "fast path (simulator step + score): 60 | 10.00x |",
        "| retrieval_quality | twx (all queries, n=40): top-1 same-type rate (higher is better) | dense (paper): 0.8 | "
        "exprag default (procedure): 1 | 1.25x |",
        "| retrieval_quality | twx (all queries, n=40): all@2 same-type rate (higher is better) | dense (paper): 0 | "
        "exprag default (procedure): 1 | – |",
        "| train | **failed (exit 1)** | – | – | – |",
        "| llm | (no headline in the result) | – | – | – |",
    ]
    assert "| train | failed (exit 1) | 3 | – |" in lines and "| env_step | ok | 12.3 | env_step.json |" in lines
    assert "Linux-x" in md and "2 CPUs" in md and "torch threads 2" in md and "profile: quick" in md
    assert lines[-1] == "Failed: train."

    js = json.loads(json.dumps(summary))  # what summary.json holds
    assert js["failed"] == ["train"] and js["profile"] == "quick" and js["machine"]["cpu_count"] == 2
    assert js["benchmarks"]["train"] == {"status": "failed (exit 1)", "seconds": 3.0, "result_file": "train.json",
                                         "headline": []}
    (h,) = js["benchmarks"]["env_step"]["headline"]
    assert (h["baseline_value"], h["ours_value"], h["ratio"], h["higher_is_better"]) == (6.0, 60.0, 10.0, True)
    assert js["benchmarks"]["env_step"]["command"][0] == "bench/bench_env_step.py"
    assert [h["ratio"] for h in js["benchmarks"]["retrieval_quality"]["headline"]] == [1.25, None]


def test_summary_all_ok_has_no_failed_line(run_all):
    h = {"metric": "m | with pipe", "baseline": "b", "baseline_value": 2.0, "ours": "o", "ours_value": 1.0,
         "ratio": 2.0, "higher_is_better": False}
    summary, md = run_all.build_summary({"x": {"status": "ok", "seconds": 1.0, "result": {"headline": [h]}}})
    assert summary["failed"] == [] and "Failed" not in md
    assert "| x | m \\| with pipe (lower is better) | b: 2 | o: 1 | 2.00x |" in md.splitlines()


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("quick", [False, True])
def test_run_all_arguments_parse(run_all, monkeypatch, quick):
    """Each script's own argparse accepts what run_all passes (the script stops right after parsing)."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for name, b in run_all.BENCHES.items():
        mod = _load(b.script.removesuffix(".py"))
        argv = ["--json", "out.json", *b.args, *(b.quick if quick else [])]
        with pytest.raises(_Parsed) as exc:
            mod.main(argv)
        assert exc.value.args[0].json == "out.json", name
