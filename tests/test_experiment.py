"""The experiment grid end to end on real TWX episodes with a tiny random model: data, banks, two
adapters, every cell, kill-and-resume, and the report."""

import json
from pathlib import Path

import pytest

from exprag.errors import DataFormatError, ExpragError
from exprag.experiment import Cell, expand, experiment_config_from_dict, run_experiment


def _grid(model: str, out: str) -> dict:
    return {
        "name": "tiny", "env": "twx", "models": [model], "encoder": "bm25", "out": out, "seeds": [7],
        "main_k": 1,
        "data": {"train_per_type": 1, "val_per_type": 1, "test_per_type": 1},
        "eval": {"max_steps": 2, "max_new_tokens": 4, "batch_size": 4, "token_budget": 300},
        "train": {"epochs": 2, "lr": 1e-3, "batch_size": 2, "max_length": 1024, "log_every_steps": 1,
                  "selection": {"every": 1, "split": "dev", "task_types": "hard", "per_type": 1,
                                "limit": 2, "max_steps": 2}},
        "grid": [
            {"methods": ["no_retrieval", "exprag_frozen", "lora", "lora_retrieval", "exprag_lora"]},
            {"methods": ["exprag_lora"], "splits": ["hard"], "banks": ["mismatched", "empty"]},
            {"methods": ["exprag_frozen"], "splits": ["hard"], "k": [1, 2], "modes": ["static", "dynamic"]},
        ],
    }


def test_expand_dedups_and_normalises():
    cfg = experiment_config_from_dict(_grid("m", "x"))
    cells = expand(cfg)
    ids = [c.id for c in cells]
    assert len(ids) == len(set(ids))
    # 10 main cells + 2 robustness + 3 new (k, mode) variants of the frozen hard cell (k1-static is a main cell)
    assert len(cells) == 15
    assert Cell("m", "no_retrieval", "easy", "none", None, None, None) in cells
    assert Cell("m", "exprag_lora", "hard", "empty", None, None, 7) in cells  # empty: no memory block
    assert "m/exprag_lora-hard-mismatched-k1-static-s7" in ids
    # Frozen cells first (one model load), then each adapter's cells together.
    kinds = [c.method for c in cells]
    assert kinds.index("lora") > max(i for i, k in enumerate(kinds) if k in ("no_retrieval", "exprag_frozen"))


@pytest.mark.parametrize("patch,match", [
    ({"grid": [{"methods": ["lora_plus"]}]}, r"grid\[0\].methods"),
    ({"grid": [{"methods": ["lora"], "banks": ["mine"]}]}, r"grid\[0\].banks"),
    ({"train": {"model": "other"}}, "train.model"),
    ({"train": {"epochs": 0}}, "epochs"),
    ({"colour": 1}, "unknown field 'colour'"),
    ({"grid": []}, "field 'grid'"),
    ({"grid": [{"methods": ["lora"], "models": ["not-in-models"]}]}, r"grid\[0\].models"),
    ({"retrieval": {"scoring": "cosine"}}, r"retrieval.scoring"),
    ({"retrieval": {"scoring": "dense", "encoder": "bm25"}}, r"retrieval.encoder.*dense encoder"),
    ({"encoder": "minilm", "retrieval": {"encoder": "other/model"}}, r"field 'encoder'"),
    ({"grid": [{"methods": ["exprag_frozen"], "retrieval": {"scorer": "dense"}}]}, r"grid\[0\].retrieval.scorer"),
    ({"grid": [{"methods": ["exprag_frozen"], "retrieval": {"scoring": "dense", "encoder": "a/enc"}},
               {"methods": ["exprag_frozen"], "retrieval": {"scoring": "dense", "encoder": "b/enc"}}]},
     r"grid\[1\].retrieval.*'dense-enc' would name two retrievers"),
    ({"hypotheses": [{"id": "H1"}]}, r"hypotheses\[0\].text"),
    ({"hypotheses": [{"id": "H1", "text": "t", "why": "x"}]}, r"hypotheses\[0\].why"),
    ({"hypotheses": [{"id": "H1", "text": "t", "a": "lora", "b": "lora/matched", "split": "hard"}]},
     r"hypotheses\[0\].b"),  # LoRA reads no bank
    ({"hypotheses": [{"id": "H1", "text": "t", "a": "exprag_lora/oracle", "b": "lora", "split": "hard"}]},
     r"hypotheses\[0\].a"),  # the oracle is a diagnostic, never tested
    ({"hypotheses": [{"id": "H1", "text": "t", "a": "exprag_lora", "b": "lora"}]}, r"hypotheses\[0\].split"),
    ({"hypotheses": [{"id": "H1", "text": "t", "a": "exprag_lora", "b": "lora", "split": "hard",
                      "alternative": "less"}]}, r"hypotheses\[0\].alternative"),
    ({"alpha": 1.5}, "field 'alpha'"),
    ({"data": {"expert_ceiling": 1.5}}, r"data.expert_ceiling"),
    ({"data": {"task_types": {"medium": ["coin"]}}}, r"data.task_types.medium"),
    ({"data": {"task_types": {"hard": ["coin", "nope"]}}}, r"data.task_types.hard"),
    ({"data": {"task_types": {"easy": ["twc", "coin"]}}}, r"data.task_types.*'coin' is in both splits"),
    ({"data": {"disjoint_from": ["results/x"]}}, r"data.disjoint_from.*generated ALFWorld games only"),
    ({"preregistered_at": "tomorrow"}, r"field 'preregistered_at'.*git commit id"),
])
def test_bad_configs_name_the_field(patch, match):
    with pytest.raises(ExpragError, match=match):
        experiment_config_from_dict({**_grid("m", "x"), **patch}, "cfg.yaml")


def test_bad_yaml_names_file_and_line(tmp_path):
    from exprag.experiment import load_experiment_config

    p = tmp_path / "e.yaml"
    p.write_text("name: x\ngrid: [\n")
    with pytest.raises(DataFormatError, match=r"e.yaml:\d+: invalid YAML"):
        load_experiment_config(p)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from exprag.llm.models import tiny_random_model

    return str(tiny_random_model(tmp_path_factory.mktemp("tiny") / "model"))


def test_grid_runs_resumes_and_reports(tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an experiment directory relative to the cwd, as users give it
    out = Path("exp")
    cfg = experiment_config_from_dict(_grid(tiny_model, str(out)))
    seen = []

    def kill_after_three(row):
        seen.append(row["cell"])
        if len(seen) == 3:
            raise KeyboardInterrupt  # a kill between cells

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, command="pytest", on_cell=kill_after_three)
    first = {json.loads(line)["cell"] for line in (out / "results.jsonl").read_text().splitlines()}
    assert first == set(seen)
    stamps = {c: (out / "cells" / c / "results.jsonl").stat().st_mtime_ns for c in seen}

    res = run_experiment(cfg, command="pytest")
    assert res.cells_reused == 3 and res.cells_run == 12
    assert all((out / "cells" / c / "results.jsonl").stat().st_mtime_ns == t for c, t in stamps.items())
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 15 and all(r["n"] == 4 for r in rows)  # 4 TWX types per split, 1 task each
    by = {r["cell"]: r for r in rows}
    lora = by["model/lora-hard-none-s7"]
    assert lora["adapter"].startswith("adapters/model/lora-s7/") and lora["method_label"] == "LoRA"
    assert by["model/exprag_lora-hard-matched-k1-static-s7"]["adapter"].startswith("adapters/model/exprag_lora-s7/")
    assert by["model/no_retrieval-easy-none"]["adapter"] is None
    cell_cfg = json.loads((out / "cells/model/exprag_lora-hard-mismatched-k1-static-s7/config.json").read_text())
    assert cell_cfg["retrieval"]["bank"].endswith("banks/procedure-bm25/easy")  # hard tests, easy bank
    assert "| LoRA | hard | none |" in (out / "results.md").read_text()

    training = json.loads((out / "training.json").read_text())
    assert [(t["kind"], len(t["epochs"])) for t in training] == [("exprag_lora", 2), ("lora", 2)]
    assert all(e["val_loss"] is not None and e["success_rate"] is not None for t in training for e in t["epochs"])
    # Cells evaluate the selected checkpoint itself (ties go to the later epoch), and it exists.
    assert all(t["checkpoint"].endswith("checkpoints/epoch-002") for t in training)
    assert all((out / r["adapter"] / "adapter_config.json").is_file() for r in rows if r["adapter"])
    info = json.loads((out / "experiment.json").read_text())
    assert info["finished"] and len(info["runs"]) == 2 and info["stages"]["train_s"] > 0

    again = run_experiment(cfg, command="pytest")
    assert again.cells_run == 0 and again.cells_reused == 15

    from exprag.cli import main

    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "ExpRAG-LoRA" in report and (out / "success_by_method.png").stat().st_size > 0
    assert "resumed: 3 invocations" in report  # killed, resumed, rerun: each start recorded
    assert "- retriever: procedure-weighted lexical (no dense model)" in report
    assert "| ExpRAG-LoRA vs LoRA | hard | 4 |" in report  # same seed, the 4 hard tasks paired


@pytest.mark.parametrize("name,cells", [("small-cpu", 16), ("paper-alfworld", 78), ("paper-scienceworld", 48)])
def test_shipped_configs_load(name, cells):
    from exprag.experiment import RetrieverSpec, load_experiment_config

    cfg = load_experiment_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml")
    assert len(expand(cfg)) == cells
    if name.startswith("paper-"):  # the paper's dense retriever, MiniLM only as a labelled fallback
        assert cfg.retriever == RetrieverSpec("dense", "Qwen/Qwen3-Embedding-0.6B", "minilm")
        assert "mistralai/Ministral-3-8B-Instruct-2512-BF16" in cfg.models
        extra = [c for c in expand(cfg) if c.retriever]
        assert extra and {c.retriever for c in extra} == {"procedure-Qwen3-Embedding-0.6B"}
    else:
        assert cfg.retriever.legacy  # banks stay where experiments made before retriever choice put them


def test_grid_reads_groups_and_sources_and_their_older_names():
    """`groups:` / `sources:` (and a hypothesis's `group:`) and the older `splits:` / `banks:` / `split:`
    make the same experiment, recorded in experiment.json under the older names; both in one place is refused."""
    from exprag.experiment import _config_record

    def cfg(block, hyp):
        h = {"id": "H1", "text": "t", "a": "exprag_lora", "b": "exprag_lora/empty", **hyp}
        return experiment_config_from_dict({**_grid("m", "x"), "grid": [{"methods": ["exprag_lora"], **block}],
                                            "hypotheses": [h]}, "cfg.yaml")

    old = cfg({"splits": ["hard"], "banks": ["matched", "empty"]}, {"split": "hard"})
    new = cfg({"groups": ["hard"], "sources": ["matched", "empty"]}, {"group": "hard"})
    assert [c.id for c in expand(old)] == [c.id for c in expand(new)] == [
        "m/exprag_lora-hard-matched-k1-static-s7", "m/exprag_lora-hard-empty-s7"]
    assert _config_record(old) == _config_record(new)
    record = _config_record(new)
    assert record["grid"][0]["splits"] == ["hard"] and record["hypotheses"][0]["split"] == "hard"
    with pytest.raises(DataFormatError, match=r"cfg.yaml: grid\[0\]: both 'groups' and 'splits'"):
        cfg({"groups": ["hard"], "splits": ["hard"]}, {"group": "hard"})
    with pytest.raises(DataFormatError, match=r"cfg.yaml: field 'hypotheses\[0\]': both 'group' and 'split'"):
        cfg({"groups": ["hard"]}, {"group": "hard", "split": "hard"})
    with pytest.raises(DataFormatError, match=r"grid\[0\].sources"):
        cfg({"sources": ["mine"]}, {"group": "hard"})


def test_block_retriever_adds_labelled_cells():
    base = {**_grid("m", "x"), "encoder": None, "retrieval": {"scoring": "dense", "encoder": "minilm"}}
    cfg = experiment_config_from_dict({**base, "grid": [
        {"methods": ["no_retrieval", "exprag_frozen"], "splits": ["hard"]},
        {"methods": ["exprag_frozen"], "splits": ["hard"], "retrieval": {"scoring": "procedure"}},
        {"methods": ["exprag_frozen"], "splits": ["hard"], "retrieval": {"scoring": "dense"}},  # = the default
        {"methods": ["exprag_frozen"], "splits": ["hard"], "banks": ["empty"], "retrieval": {"scoring": "bm25"}},
    ]})
    ids = [c.id for c in expand(cfg)]
    assert ids == ["m/no_retrieval-hard-none", "m/exprag_frozen-hard-matched-k1-static",
                   "m/exprag_frozen-hard-matched-k1-static-procedure-minilm",
                   "m/exprag_frozen-hard-empty"]  # an empty bank retrieves nothing: no retriever, no new cell


def test_cli_lists_the_grid(capsys):
    from exprag.cli import main

    assert main(["experiment", str(Path(__file__).parent.parent / "configs" / "small-cpu.yaml"), "--list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m/exprag_lora-hard-empty-s2025" in out and "16 cells" in out
    assert "retriever (unlabelled cells): procedure scoring, encoder minilm" in out


def test_grid_with_two_retrievers_and_encoder_fallback(tmp_path, tiny_model):
    """Frozen methods only: the paper's dense retriever (its encoder is not in the offline cache, so the
    config's MiniLM fallback is used and labelled) beside a block with procedure scoring."""
    from exprag.bank.store import read_manifest

    out = tmp_path / "exp"
    cfg = experiment_config_from_dict({
        "name": "retr", "env": "twx", "models": [tiny_model], "out": str(out), "main_k": 1,
        "retrieval": {"scoring": "dense", "encoder": "Qwen/Qwen3-Embedding-0.6B", "encoder_fallback": "minilm"},
        "data": {"train_per_type": 1, "test_per_type": 1},
        "eval": {"max_steps": 2, "max_new_tokens": 4, "batch_size": 4},
        "hypotheses": [{"id": "H1", "text": "retrieval helps the frozen model",
                        "comparison": "exprag_frozen vs no_retrieval, hard"}],
        "grid": [{"methods": ["no_retrieval", "exprag_frozen"], "splits": ["hard"]},
                 {"methods": ["exprag_frozen"], "splits": ["hard"], "retrieval": {"scoring": "procedure",
                                                                                  "encoder": "minilm"}}],
    })
    res = run_experiment(cfg, command="pytest")
    by = {r["cell"]: r for r in res.rows}
    assert sorted(by) == ["model/exprag_frozen-hard-matched-k1-static",
                          "model/exprag_frozen-hard-matched-k1-static-procedure-minilm", "model/no_retrieval-hard-none"]
    dense = by["model/exprag_frozen-hard-matched-k1-static"]
    proc = by["model/exprag_frozen-hard-matched-k1-static-procedure-minilm"]
    assert dense["retriever_info"]["fallback"] and dense["retriever_info"]["encoder_used"] == "minilm"
    assert proc["retriever_info"] == {"key": "procedure-minilm", "scoring": "procedure", "encoder": "minilm",
                                      "encoder_used": "minilm", "fallback": False, "fallback_reason": None}
    assert by["model/no_retrieval-hard-none"]["retriever_info"] is None
    assert all(len(r["episodes"]) == r["n"] == 4 for r in res.rows)  # 4 TWX hard types, 1 task each
    # Each retriever has its own banks, built with its scoring; the fallback is in the bank's manifest.
    cell_cfg = json.loads((out / "cells" / proc["cell"] / "config.json").read_text())
    assert cell_cfg["retrieval"]["bank"] == str(out / "banks" / "procedure-minilm" / "hard")
    m_dense = read_manifest(out / "banks/dense-Qwen3-Embedding-0.6B/hard")
    m_proc = read_manifest(out / "banks/procedure-minilm/hard")
    assert (m_dense["retrieval"]["scoring"], m_dense["encoder"]["name"]) == ("dense", "minilm")
    assert "Qwen/Qwen3-Embedding-0.6B" in m_dense["experiment"]["fallback_reason"]
    assert m_proc["retrieval"]["scoring"] == "procedure" and not (out / "banks/procedure-minilm/easy").exists()
    info = json.loads((out / "experiment.json").read_text())
    assert info["retrievers"]["default"]["fallback"] and "procedure-minilm" in info["retrievers"]

    again = run_experiment(cfg, command="pytest")  # the fallback sticks: same banks, every cell reused
    assert again.cells_reused == 3 and again.rows[1]["retriever_info"] == res.rows[1]["retriever_info"]

    from exprag.report import write_report

    md = write_report([out], out).report.read_text()
    assert "- retriever: dense dot product over minilm (FALLBACK: Qwen/Qwen3-Embedding-0.6B could not be loaded)" in md
    assert "- retriever [procedure-minilm]: procedure-weighted lexical + dense over minilm" in md
    assert "| ExpRAG, frozen model [procedure-minilm] | – / " in md
    assert "  - H1: retrieval helps the frozen model (comparison: exprag_frozen vs no_retrieval, hard)" in md
    paired = md[md.index("## Paired comparisons"):]
    assert "| ExpRAG, frozen model vs No retrieval, frozen model | hard | 4 |" in paired


def test_experiment_scorings_are_the_banks():
    from exprag.bank.scoring import SCORINGS
    from exprag.experiment import _SCORINGS

    assert set(_SCORINGS) == set(SCORINGS)  # the config check keeps its own list to avoid loading numpy


def test_expert_ceiling_oracle_cell_and_hypotheses(tmp_path, tiny_model):
    """TWX hard with a 12-step cap and a 0.75 ceiling (9 expert steps at most): games the expert needs
    longer for are dropped from test and selection, and recorded; the oracle cells' memory is the
    expert's own trajectory of each test game; the report evaluates the tested hypothesis, labels the
    oracle and prints the expert-action coverage of training and test memories."""
    out = tmp_path / "exp"
    cfg = experiment_config_from_dict({
        "name": "ceil", "env": "twx", "models": [tiny_model], "encoder": "bm25", "out": str(out), "main_k": 1,
        "data": {"train_per_type": 1, "test_per_type": 1, "expert_ceiling": 0.75},
        "eval": {"max_steps": 12, "max_new_tokens": 4, "batch_size": 4},
        "train": {"epochs": 1, "lr": 1e-3, "batch_size": 2, "max_length": 1024,
                  "selection": {"every": 1, "split": "dev", "task_types": "hard", "per_type": 1, "max_steps": 12}},
        "hypotheses": [{"id": "H3", "text": "retrieval does not hurt the frozen model", "a": "exprag_frozen",
                        "b": "no_retrieval", "split": "hard", "alternative": "not_less"}],
        "grid": [{"methods": ["no_retrieval", "exprag_frozen"], "splits": ["hard"], "banks": ["matched", "oracle"]},
                 {"methods": ["exprag_lora"], "splits": ["hard"], "banks": ["oracle"]}],
    })
    res = run_experiment(cfg, command="pytest")
    ceiling = json.loads((out / "data" / "ceiling.json").read_text())["groups"]["test-hard"]
    kept = ceiling["kept"]
    assert kept and not any(k.startswith("cookingworld/") for k in kept)  # its expert needs >= 36 steps
    assert all(g["expert_steps"] <= 9 for g in ceiling["games"] if g["task_id"] in kept)
    assert any("> 0.75 x cap 12" in g.get("dropped", "") for g in ceiling["games"])
    sel = json.loads((out / "data" / "ceiling.json").read_text())["groups"]["sel"]
    assert sel["split"] == "dev" and sel["kept"] and not any(k.startswith("cookingworld/") for k in sel["kept"])
    sel_run = next((out / "adapters" / "model").glob("exprag_lora-s*/eval/*/results.jsonl"))
    assert {json.loads(line)["task_id"] for line in sel_run.read_text().splitlines()} == set(sel["kept"])
    train_cov = json.loads((out / "data" / "train-coverage.json").read_text())
    assert train_cov["examples"] == 4 and 0 <= train_cov["found"] <= train_cov["expert_actions"]
    by = {r["cell"]: r for r in res.rows}
    oracle = by["model/exprag_frozen-hard-oracle-k1-static"]
    assert set(oracle["episodes"]) == set(kept) == set(by["model/no_retrieval-hard-none"]["episodes"])
    assert oracle["diagnostic"] and oracle["expert_action_coverage"]["fraction"] == 1.0
    from exprag.trajectory import read_jsonl

    experts = {t.id: t.task_id for t in read_jsonl(out / "data" / "test-hard.jsonl")}
    for cell in ("exprag_frozen-hard-oracle-k1-static", "exprag_lora-hard-oracle-k1-static-s2025"):
        for t in read_jsonl(out / "cells" / "model" / cell / "trajectories.jsonl"):
            assert [experts[i] for i in t.meta["memory_ids"]] == [t.task_id]  # the very game, nothing else
    matched = by["model/exprag_frozen-hard-matched-k1-static"]["expert_action_coverage"]
    assert matched["games"] == len(kept) and matched["fraction"] < 1.0

    from exprag.report import write_report

    report = write_report([out], out).report.read_text()
    n = len(kept)
    assert f"expert success within the cap on the {n} evaluated games: {n}/{n} (100%)" in report
    assert "## Diagnostic: oracle memory (not a method)" in report
    assert "| ExpRAG-LoRA | oracle |" in report.split("## Diagnostic")[1]
    assert "ExpRAG-LoRA training examples: " in report
    assert "## Hypotheses (pre-registered)" in report and "| H3 | exprag_frozen >= no_retrieval, hard |" in report
    hyp = report.split("## Hypotheses (pre-registered)")[1].split("##")[0]
    assert f"| {n} |" in hyp and "supported" in hyp
    main = report.split("## Success rate")[1].split("## Paired")[0]
    assert "oracle" not in main  # never pooled with the methods


def test_replication_config_lists_the_oracle_cell(capsys):
    from exprag.cli import main

    assert main(["experiment", str(Path(__file__).parent.parent / "configs" / "replication-cpu.yaml"), "--list"]) == 0
    out = capsys.readouterr().out
    assert "exprag_lora-hard-oracle-k2-static-s2025  (diagnostic: oracle memory, not a method)" in out
    assert "within 0.667 x the step cap" in out


@pytest.mark.parametrize("seed", [2026, 2027])
def test_confirm_configs_copy_the_replication_recipe(seed, capsys):
    """The confirmatory configs change only the training seed and the test games (issue 29's design): every
    other field equals configs/replication-cpu.yaml's."""
    from exprag.cli import main
    from exprag.config import read_yaml

    configs = Path(__file__).parent.parent / "configs"
    base = read_yaml(configs / "replication-cpu.yaml", "config")
    new = read_yaml(configs / f"replication-cpu-confirm-s{seed}.yaml", "config")
    other = 4053 - seed
    changed = {"name": f"replication-cpu-confirm-s{seed}", "out": f"results/replication-cpu-confirm/s{seed}",
               "seeds": [seed]}
    assert {k: new[k] for k in changed} == changed
    assert new["env_args"] == {"gen_per_type": {**base["env_args"]["gen_per_type"], "test": 100},
                               "gen_seed": {"test": seed}}  # train and dev: seed 0, the same games
    assert new["data"] == {**base["data"], "test_per_type": 50,
                           "disjoint_from": ["results/replication-cpu", f"configs/replication-cpu-confirm-s{other}.yaml"]}
    assert new["grid"] == [{"methods": ["lora", "exprag_lora"], "groups": ["hard"]},
                           {"methods": ["exprag_lora"], "groups": ["hard"], "sources": ["empty", "oracle"]}]
    assert [(h["id"], h["a"], h["b"], h["group"], h["alternative"]) for h in new["hypotheses"]] == [
        ("H1c", "exprag_lora", "lora", "hard", "greater"), ("H2c", "exprag_lora", "exprag_lora/empty", "hard", "greater")]
    rest = set(base) | set(new)
    rest -= {*changed, "env_args", "data", "grid", "hypotheses", "preregistered_at"}
    assert {k: new.get(k) for k in rest} == {k: base.get(k) for k in rest}
    assert main(["experiment", str(configs / f"replication-cpu-confirm-s{seed}.yaml"), "--list"]) == 0
    out = capsys.readouterr().out
    assert f"smollm2-135m/lora-hard-none-s{seed}" in out and "4 cells" in out and "H1c: ExpRAG-LoRA beats LoRA" in out
    assert "test games: disjoint from those of results/replication-cpu" in out
    assert f"written at commit {new['preregistered_at']}" in out and len(new["preregistered_at"]) == 40
