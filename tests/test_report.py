"""The report renderer on hand-written experiment run directories (the experiment runner's output format)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exprag.cli import main
from exprag.errors import DataFormatError
from exprag.evaluate import wilson
from exprag.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(model, method, split, s, n, *, bank="matched", k=4, mode="static", seed=None):
    """One results.jsonl row; per-type counts split the episodes in halves (pick first, then clean)."""
    pick = min(s, n // 2)
    per_type = {t: {"n": n // 2, "successes": ts, "success_rate": ts / (n // 2), "ci95": list(wilson(ts, n // 2)),
                    "mean_steps": 10.0} for t, ts in (("pick", pick), ("clean", s - pick))}
    return {"cell": f"{model}/{method}/{split}/{bank}/k{k}/{mode}/s{seed}", "model": model, "method": method,
            "method_label": method, "split": split, "bank": bank, "k": k, "mode": mode, "seed": seed,
            "adapter": None, "n": n, "successes": s, "success_rate": s / n, "ci95": list(wilson(s, n)),
            "mean_steps": 12.5, "valid_action_rate": 0.9, "per_type": per_type, "run_dir": "cells/x"}


def make_run(path, name, models, rows, training=None, main_k=4):
    path.mkdir(parents=True)
    meta = {"name": name, "env": "alfworld", "models": models, "command": f"exprag experiment {name}.yaml",
            "commit": "abc1234", "machine": {"platform": "Linux-x86_64", "cpus": 16, "gpu": "NVIDIA H100",
                                             "cpu_model": "Xeon 8480", "cpu_vector": ["avx2", "amx_bf16"],
                                             "torch_threads": 8},
            "started": "2025-01-02T03:04:05", "finished": "2025-01-02T05:34:05", "duration_s": 9000.0,
            "stages": {"data_s": 60.0, "banks_s": 30.0, "train_s": 6000.0, "eval_s": 2910.0},
            "config": {"data": {"train_per_type": 8, "test_per_type": 4, "split": "both"},
                       "eval": {"max_steps": 30}, "main_k": main_k}}
    (path / "experiment.json").write_text(json.dumps(meta))
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if training is not None:
        (path / "training.json").write_text(json.dumps(training))
    return path


M = "m-8b"
FULL_ROWS = [
    row(M, "no_retrieval", "easy", 1, 4, bank="none", k=None, mode=None),
    row(M, "no_retrieval", "hard", 0, 4, bank="none", k=None, mode=None),
    # K sweep (static) plus one dynamic cell; the main table reads static K=4.
    *(row(M, "exprag_frozen", sp, s, 4, k=k) for sp, k, s in
      (("easy", 1, 0), ("easy", 2, 1), ("easy", 4, 2), ("hard", 1, 0), ("hard", 2, 1), ("hard", 4, 1))),
    row(M, "exprag_frozen", "easy", 3, 4, k=4, mode="dynamic"),
    # Two seeds, pooled.
    row(M, "lora", "easy", 3, 4, bank="none", k=None, mode=None, seed=0),
    row(M, "lora", "easy", 4, 4, bank="none", k=None, mode=None, seed=1),
    row(M, "lora", "hard", 1, 4, bank="none", k=None, mode=None, seed=0),
    row(M, "lora", "hard", 0, 4, bank="none", k=None, mode=None, seed=1),
    row(M, "lora_retrieval", "easy", 3, 4, seed=0),  # its hard cell is missing
    row(M, "exprag_lora", "easy", 4, 4, seed=0),
    row(M, "exprag_lora", "easy", 3, 4, seed=1),
    row(M, "exprag_lora", "hard", 3, 4, seed=0),
    row(M, "exprag_lora", "hard", 2, 4, seed=1),
    # Robustness block on hard.
    row(M, "exprag_lora", "hard", 1, 4, bank="mismatched", seed=0),
    row(M, "exprag_lora", "hard", 0, 4, bank="empty", seed=0),
]
TRAINING = [
    {"model": M, "kind": "exprag_lora", "seed": 0, "dir": "train/x", "checkpoint": "train/x/best", "wall_s": 3000.0,
     "epochs": [{"epoch": e, "train_loss": tl, "val_loss": vl, "success_rate": sr}
                for e, tl, vl, sr in ((1, 1.25, 1.1, 0.5), (2, 0.8, 0.9, 0.75), (3, 0.5, 0.95, 0.625))]},
    {"model": M, "kind": "lora", "seed": 0, "dir": "train/y", "checkpoint": "train/y/best", "wall_s": 2400.0,
     "epochs": [{"epoch": e, "train_loss": 1.0 / e, "val_loss": None, "success_rate": None} for e in (1, 2, 3)]},
]


def section(md: str, heading: str) -> str:
    start = md.index(heading)
    nxt = md.find("\n## ", start + 1)
    return md[start: nxt if nxt >= 0 else None]


def table(text: str) -> list[list[str]]:
    """The first markdown table in ``text``, header included, as lists of stripped cells."""
    lines = text.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    block = []
    for ln in lines[first:]:
        if not ln.startswith("|"):
            break
        if not ln.startswith("|---"):
            block.append([c.strip() for c in ln.strip("|").split("|")])
    return block


def by_label(rows: list[list[str]]) -> dict[str, list[str]]:
    return {r[0]: r[1:] for r in rows[1:]}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("r") / "run", "paper-grid", [M], FULL_ROWS, TRAINING)
    res = write_report([run], run)
    return run, res, res.report.read_text()


def test_header_and_main_table(full):
    run, res, md = full
    assert res.report == run / "report.md"
    head = section(md, "## Experiments")
    for text in ("paper-grid", "alfworld", "`exprag experiment paper-grid.yaml`", "abc1234", "NVIDIA H100",
                 "16 CPUs (Xeon 8480; avx2, amx_bf16)", "duration (h:mm): 2:30", "2025-01-02T03:04:05", "train per type 8",
                 "test per type 4", "max steps 30"):
        assert text in head, text
    main_md = section(md, "## Success rate")
    rows = table(main_md)
    assert rows[0] == ["method", f"{M} (easy / hard)"]
    # Rows in METHODS order, each cell "success% (s/n)" for easy / hard.
    assert [r[0] for r in rows[1:]] == ["No retrieval, frozen model", "ExpRAG, frozen model", "LoRA",
                                        "LoRA, retrieval at inference only", "ExpRAG-LoRA"]
    t = by_label(rows)
    assert t["No retrieval, frozen model"] == ["25.0 (1/4) / 0.0 (0/4)"]
    assert t["ExpRAG, frozen model"] == ["50.0 (2/4) / 25.0 (1/4)"]  # static K=4, not dynamic, not K=1/2
    assert t["LoRA"] == ["87.5 (7/8) / 12.5 (1/8)"]  # two seeds pooled
    assert t["LoRA, retrieval at inference only"] == ["75.0 (3/4) / –"]
    assert t["ExpRAG-LoRA"] == ["87.5 (7/8) / 62.5 (5/8)"]  # the mismatched / empty banks stay out
    assert "LoRA on m-8b: 2 seeds" in main_md and "ExpRAG-LoRA on m-8b: 2 seeds" in main_md
    valid = main_md[main_md.index("Valid-action rate"):]
    assert "| ExpRAG-LoRA | 90.0 / 90.0 |" in valid and "| LoRA, retrieval at inference only | 90.0 / – |" in valid
    ci = by_label(table(main_md[main_md.index("95% Wilson"):]))
    lo, hi = wilson(7, 8)
    lo2, hi2 = wilson(1, 8)
    assert ci["LoRA"] == [f"[{100 * lo:.1f}, {100 * hi:.1f}] / [{100 * lo2:.1f}, {100 * hi2:.1f}]"]
    assert ci["LoRA, retrieval at inference only"][0].endswith(" / –")


def test_robustness_depth_per_type_training(full):
    _, _, md = full
    robust = table(section(md, "## Robustness"))
    assert robust[0] == ["model", "method", "bank", "easy", "hard"]
    assert robust[1:] == [[M, "ExpRAG-LoRA", "matched", "87.5 (7/8)", "62.5 (5/8)"],
                          [M, "ExpRAG-LoRA", "mismatched", "–", "25.0 (1/4)"],
                          [M, "ExpRAG-LoRA", "empty", "–", "0.0 (0/4)"]]
    depth = table(section(md, "## Retrieval depth"))
    assert depth[0] == ["model", "method", "split", "mode", "K=1", "K=2", "K=4"]
    assert [M, "ExpRAG, frozen model", "easy", "static", "0.0 (0/4)", "25.0 (1/4)", "50.0 (2/4)"] in depth
    assert [M, "ExpRAG, frozen model", "easy", "dynamic", "–", "–", "75.0 (3/4)"] in depth
    assert [M, "ExpRAG, frozen model", "hard", "static", "0.0 (0/4)", "25.0 (1/4)", "25.0 (1/4)"] in depth
    assert not any(r[1] == "ExpRAG-LoRA" for r in depth)  # not swept

    per_type = section(md, "## Per task type")
    easy = table(per_type[per_type.index(f"### {M}, easy"):])
    assert easy[0][0] == "task type" and easy[0][1:] == ["No retrieval, frozen model", "ExpRAG, frozen model",
                                                         "LoRA", "LoRA, retrieval at inference only", "ExpRAG-LoRA"]
    t = by_label(easy)
    assert t["pick"][2] == "100.0 (4/4)" and t["clean"][2] == "75.0 (3/4)"  # LoRA, seeds pooled
    hard = by_label(table(per_type[per_type.index(f"### {M}, hard"):]))
    assert len(hard["pick"]) == 4  # lora_retrieval has no hard cell: no column

    train = table(section(md, "## Training"))
    assert train[0] == ["adapter", "training steps (h:mm)", "epoch", "train loss", "val loss", "rollout success (%)"]
    assert train[1] == [f"{M} exprag_lora seed 0", "0:50", "1", "1.2500", "1.1000", "50.0"]
    assert train[3] == ["", "", "3", "0.5000", "0.9500", "62.5"]
    assert train[4][:5] == [f"{M} lora seed 0", "0:40", "1", "1.0000", "–"]


def test_pngs_written_and_linked(full):
    run, res, md = full
    names = [p.name for p in res.plots]
    assert names == ["success_by_method.png", "success_vs_k.png", "robustness.png", "training_curves.png"]
    for p in res.plots:
        data = p.read_bytes()
        assert p.parent == run and len(data) > 1000 and data.startswith(PNG_MAGIC)
        assert f"]({p.name})" in md


def test_merge_runs_missing_cells_and_optional_plots(tmp_path, full):
    run_a, _, _ = full
    # A second model with one method only, no sweep, no robustness, no training.
    run_b = make_run(tmp_path / "b", "small", ["m-4b"],
                     [row("m-4b", "no_retrieval", "easy", 1, 2, bank="none", k=None, mode=None)])
    res = write_report([run_b], run_b)
    md = res.report.read_text()
    assert [p.name for p in res.plots] == ["success_by_method.png"]
    for name in ("success_vs_k.png", "robustness.png", "training_curves.png"):
        assert name not in md and not (run_b / name).exists()
    assert "## Robustness" not in md and "## Retrieval depth" not in md and "## Training" not in md
    assert by_label(table(section(md, "## Success rate")))["No retrieval, frozen model"] == ["50.0 (1/2) / –"]

    out = tmp_path / "merged"
    md = write_report([run_a, run_b], out).report.read_text()
    rows = table(section(md, "## Success rate"))
    assert rows[0] == ["method", f"{M} (easy / hard)", "m-4b (easy / hard)"]
    t = by_label(rows)
    assert t["No retrieval, frozen model"] == ["25.0 (1/4) / 0.0 (0/4)", "50.0 (1/2) / –"]
    assert t["ExpRAG-LoRA"] == ["87.5 (7/8) / 62.5 (5/8)", "–"]
    assert "# Report: paper-grid, small" in md and (out / "robustness.png").is_file()


def test_stale_plot_removed(tmp_path):
    run = make_run(tmp_path / "r", "x", [M], FULL_ROWS, TRAINING)
    write_report([run], run)
    (run / "training.json").unlink()
    res = write_report([run], run)
    assert not (run / "training_curves.png").exists() and "training_curves" not in res.report.read_text()


def test_conclusion_kept_under_its_own_heading(tmp_path):
    run = make_run(tmp_path / "r", "x", [M], FULL_ROWS, TRAINING)
    (run / "conclusion.md").write_text("# Verdict\n\nH1 not supported (p = 0.0625).\n", encoding="utf-8")
    md = write_report([run], run).report.read_text()
    head = section(md, "## Experiments")
    assert "#### Conclusion of x (written after the run, from `conclusion.md`)" in head
    # its heading is demoted below the report's, and its text comes before the generated tables
    assert "### Verdict" in head and "\n# Verdict" not in md
    assert md.index("H1 not supported (p = 0.0625).") < md.index("## Success rate")
    (run / "conclusion.md").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataFormatError, match=r"conclusion.md: cannot read the conclusion"):
        write_report([run], run)


@pytest.mark.parametrize("mutate, expect", [
    (lambda rows: rows[2].pop("success_rate"), "results.jsonl:3: field 'success_rate' missing"),
    (lambda rows: rows[0].update(n="4"), "results.jsonl:1: field 'n' must be int, got str"),
    (lambda rows: rows[1].update(method="rag"), "results.jsonl:2: field 'method' is 'rag'"),
    (lambda rows: rows[1].update(successes=5), "results.jsonl:2: field 'successes' is 5"),
    (lambda rows: rows[0]["per_type"]["pick"].pop("n"), "results.jsonl:1: field 'per_type.pick.n' missing"),
])
def test_bad_row_names_file_line_field(tmp_path, mutate, expect):
    rows = json.loads(json.dumps(FULL_ROWS[:4]))
    mutate(rows)
    run = make_run(tmp_path / "r", "x", [M], rows)
    with pytest.raises(DataFormatError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        write_report([run], run)
    assert not (run / "report.md").exists()


def test_bad_files(tmp_path):
    run = make_run(tmp_path / "r", "x", [M], FULL_ROWS[:2])
    with (run / "results.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(DataFormatError, match=r"results.jsonl:3: invalid JSON"):
        write_report([run], run)
    (run / "results.jsonl").unlink()
    with pytest.raises(DataFormatError, match=r"results.jsonl: no such file"):
        write_report([run], run)
    meta = json.loads((run / "experiment.json").read_text())
    del meta["config"]["main_k"]
    (run / "experiment.json").write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match=r"experiment.json: field 'config.main_k' missing"):
        write_report([run], run)


def test_cli(tmp_path, capsys):
    a = make_run(tmp_path / "a", "a", [M], FULL_ROWS[:4])
    b = make_run(tmp_path / "b", "b", ["m-4b"],
                 [row("m-4b", "lora", "hard", 1, 4, bank="none", k=None, mode=None, seed=0)])
    assert main(["report", str(a)]) == 0
    out, _ = capsys.readouterr()
    assert f"wrote {a / 'report.md'}" in out and f"wrote {a / 'success_by_method.png'}" in out

    assert main(["report", str(a), str(b)]) == 2
    _, err = capsys.readouterr()
    assert "--out is required" in err and err.count("\n") == 1

    assert main(["report", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    assert "m-4b (easy / hard)" in (tmp_path / "m" / "report.md").read_text()
    capsys.readouterr()

    (b / "results.jsonl").write_text(json.dumps({"cell": "c"}) + "\n")
    assert main(["report", str(b)]) == 2
    _, err = capsys.readouterr()
    assert f"{b / 'results.jsonl'}:1: field 'model' missing" in err and err.count("\n") == 1


# ---- paired statistics, retrievers, hypotheses --------------------------------------------------

@pytest.mark.parametrize("b, c, p", [(1, 9, 0.021484375), (9, 1, 0.021484375), (0, 0, 1.0), (0, 1, 1.0),
                                     (3, 3, 1.0), (9, 0, 0.00390625), (0, 5, 0.0625), (2, 10, 0.0385742187)])
def test_mcnemar_exact_on_known_tables(b, c, p):
    from exprag.report import mcnemar_p

    assert mcnemar_p(b, c) == pytest.approx(p, abs=1e-10)
    scipy_stats = pytest.importorskip("scipy.stats")  # the same test by scipy's exact binomial, when installed
    if b + c:
        assert mcnemar_p(b, c) == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)


def outcomes(row_, wins, tasks):
    """``row_`` with per-episode outcomes: the tasks in ``wins`` succeeded, the other ``tasks`` failed."""
    row_["episodes"] = {t: t in wins for t in tasks}
    return row_


T12 = [f"t{i}" for i in range(12)]
PAIRED_ROWS = [
    # ExpRAG-LoRA vs LoRA, hard, seed 0: A wins t1..t9 (b = 9), B wins t0 only (c = 1), t10/t11 both fail.
    outcomes(row(M, "exprag_lora", "hard", 9, 12, seed=0), T12[1:10], T12),
    outcomes(row(M, "lora", "hard", 1, 12, bank="none", k=None, mode=None, seed=0), {"t0"}, T12),
    # Seed 1 of LoRA has no ExpRAG-LoRA partner: it must not be paired with seed 0.
    outcomes(row(M, "lora", "hard", 12, 12, bank="none", k=None, mode=None, seed=1), T12, T12),
    # LoRA + retrieval ran 6 of the 12 tasks: 6 pairs, the missing ones reported.
    outcomes(row(M, "lora_retrieval", "hard", 1, 6, seed=0), {"t5"}, T12[:6]),
    # Empty bank: every episode fails; matched vs empty -> b = 9, c = 0.
    outcomes(row(M, "exprag_lora", "hard", 0, 12, bank="empty", k=None, mode=None, seed=0), set(), T12),
    # Frozen, easy: both fail everywhere (b = c = 0, p = 1).
    outcomes(row(M, "no_retrieval", "easy", 0, 4, bank="none", k=None, mode=None), set(), T12[:4]),
    outcomes(row(M, "exprag_frozen", "easy", 0, 4), set(), T12[:4]),
    # Frozen, hard: rows from before rows carried outcomes; the cells' own episode files give them.
    dict(row(M, "no_retrieval", "hard", 0, 4, bank="none", k=None, mode=None), run_dir="cells/nr"),
    dict(row(M, "exprag_frozen", "hard", 2, 4), run_dir="cells/ef"),
    # ExpRAG-LoRA vs LoRA, easy: no outcomes anywhere (the cell directories are gone): 0 pairs, no test.
    row(M, "exprag_lora", "easy", 2, 4, seed=0),
    row(M, "lora", "easy", 1, 4, bank="none", k=None, mode=None, seed=0),
]


def cell_dir(run, name, wins, tasks):
    """A cell's episode file, as `exprag eval` writes it."""
    (run / "cells" / name).mkdir(parents=True)
    (run / "cells" / name / "results.jsonl").write_text("".join(
        json.dumps({"task_id": t, "task_type": "pick", "success": t in wins, "reward": 0.0}) + "\n" for t in tasks))


def test_paired_section_counts_and_p_values(tmp_path):
    run = make_run(tmp_path / "r", "paired", [M], PAIRED_ROWS)
    cell_dir(run, "nr", set(), T12[:4])
    cell_dir(run, "ef", {"t0", "t3"}, T12[:4])
    md = write_report([run], run).report.read_text()
    rows = table(section(md, "## Paired comparisons"))
    assert rows[0] == ["model", "A vs B", "split", "pairs", "b (A only)", "c (B only)", "McNemar p",
                       "A % [95% CI]", "B % [95% CI]"]
    got = {(r[1], r[2]): r[3:] for r in rows[1:]}
    lo, hi = wilson(9, 12)
    # LoRA's seed-1 episodes have no partner: 12 pairs of 12 / 24 episodes.
    assert got["ExpRAG-LoRA vs LoRA", "hard"][:4] == ["12 (of 12 / 24)", "9", "1", "0.0215"]
    assert got["ExpRAG-LoRA vs LoRA", "hard"][4] == f"75.0 (9/12) [{100 * lo:.1f}, {100 * hi:.1f}]"
    assert got["LoRA, retrieval at inference only vs LoRA", "hard"][:4] == ["6 (of 6 / 24)", "1", "1", "1.0000"]
    assert got["ExpRAG-LoRA: matched vs empty bank", "hard"][:4] == ["12", "9", "0", "0.0039"]
    assert got["ExpRAG, frozen model vs No retrieval, frozen model", "easy"][:4] == ["4", "0", "0", "1.0000"]
    assert got["ExpRAG, frozen model vs No retrieval, frozen model", "hard"][:4] == ["4", "2", "0", "0.5000"]
    assert got["ExpRAG-LoRA vs LoRA", "easy"] == ["0", "–", "–", "–", "–", "–"]
    assert ("LoRA, retrieval at inference only vs LoRA", "easy") not in got  # a side is missing: no row


def test_retrievers_labelled_and_hypotheses_in_header(tmp_path):
    dense = {"key": "dense-Qwen3-Embedding-0.6B", "scoring": "dense", "encoder": "Qwen/Qwen3-Embedding-0.6B",
             "encoder_used": "minilm", "fallback": True}
    proc = {"key": "procedure-minilm", "scoring": "procedure", "encoder": "minilm", "encoder_used": "minilm",
            "fallback": False}
    rows = [dict(row(M, "exprag_frozen", "hard", 1, 4), retriever=None, retriever_info=dense),
            dict(row(M, "exprag_frozen", "hard", 3, 4), cell="x-proc", retriever="procedure-minilm",
                 retriever_info=proc),
            row(M, "no_retrieval", "hard", 0, 4, bank="none", k=None, mode=None)]
    run = make_run(tmp_path / "r", "retr", [M], rows)
    meta = json.loads((run / "experiment.json").read_text())
    meta["config"]["hypotheses"] = [{"id": "H1", "text": "retrieval helps",
                                     "comparison": "exprag_frozen vs no_retrieval"}]
    (run / "experiment.json").write_text(json.dumps(meta))
    md = write_report([run], run).report.read_text()
    head = section(md, "## Experiments")
    assert ("- retriever: dense dot product over minilm (FALLBACK: Qwen/Qwen3-Embedding-0.6B could not be "
            "loaded)") in head
    assert "- retriever [procedure-minilm]: procedure-weighted lexical + dense over minilm" in head
    assert "  - H1: retrieval helps (comparison: exprag_frozen vs no_retrieval)" in head
    t = by_label(table(section(md, "## Success rate")))
    assert t["ExpRAG, frozen model"] == ["– / 25.0 (1/4)"]  # the two retrievers are not pooled
    assert t["ExpRAG, frozen model [procedure-minilm]"] == ["– / 75.0 (3/4)"]
    # Rows from before retrievers were recorded say so.
    old = make_run(tmp_path / "old", "old", [M], FULL_ROWS[:2])
    assert "- retriever: not recorded" in write_report([old], old).report.read_text()


def test_hypotheses_evaluated_and_oracle_kept_apart(tmp_path):
    """Pre-registered tests on the PAIRED_ROWS outcomes: H1 (b = 9, c = 1, p = 0.0215) is supported at
    0.05, not at 0.01; H2 (matched vs empty: b = 9, c = 0); a not-less test with A significantly worse is
    rejected. The oracle cell has its own section and never enters a method's table or test."""
    oracle = outcomes(row(M, "exprag_lora", "hard", 12, 12, bank="oracle", k=4, seed=0), T12, T12)
    oracle["expert_action_coverage"] = {"found": 30, "expert_actions": 30, "games": 12, "fraction": 1.0}
    matched = dict(PAIRED_ROWS[0], expert_action_coverage={"found": 10, "expert_actions": 40, "games": 12,
                                                           "fraction": 0.25})
    run = make_run(tmp_path / "r", "hyp", [M], [matched, *PAIRED_ROWS[1:], oracle])
    meta = json.loads((run / "experiment.json").read_text())
    meta["config"]["alpha"] = 0.05
    meta["config"]["hypotheses"] = [
        {"id": "H1", "text": "t", "a": "exprag_lora", "b": "lora", "split": "hard"},
        {"id": "H2", "text": "t", "a": "exprag_lora", "b": "exprag_lora/empty", "split": "hard"},
        {"id": "H9", "text": "t", "a": "lora", "b": "exprag_lora", "split": "hard", "alternative": "not_less"},
        {"id": "H0", "text": "free-form, not tested"},
    ]
    (run / "data").mkdir()
    (run / "data" / "ceiling.json").write_text(json.dumps({"expert_ceiling": 0.667, "groups": {"test-hard": {
        "kept": T12, "games": [{"task_id": t, "task_type": "pick", "cap": 30, "expert_steps": 12,
                                "expert_success": True} for t in T12]
        + [{"task_id": "long", "task_type": "pick", "cap": 30, "expert_steps": 25, "expert_success": True,
            "dropped": "the expert needs 25 steps > 0.667 x cap 30"}]}}}))
    (run / "experiment.json").write_text(json.dumps(meta))
    md = write_report([run], run).report.read_text()
    got = {r[1]: r[2:] for r in table(section(md, "## Hypotheses"))[1:]}
    assert got["H1"] == ["exprag_lora > lora, hard", M, "12", "9", "1", "0.0215", "supported"]
    assert got["H2"] == ["exprag_lora > exprag_lora/empty, hard", M, "12", "9", "0", "0.0039", "supported"]
    assert got["H9"][-1] == "not supported (A significantly worse)" and "H0" not in got
    meta["config"]["alpha"] = 0.01
    (run / "experiment.json").write_text(json.dumps(meta))
    md = write_report([run], run).report.read_text()
    assert {r[1]: r[-1] for r in table(section(md, "## Hypotheses"))[1:]}["H1"] == "not supported"
    assert "expert success within the cap on the 12 evaluated games: 12/12 (100%)" in md
    assert "1 games dropped" in md
    diag = by_label(table(section(md, "## Diagnostic: oracle memory")))
    assert diag[M][:2] == ["ExpRAG-LoRA", "oracle"] and diag[M][3].startswith("100.0 (12/12)")
    cov = table(section(md, "## Expert actions in the retrieved memory"))
    assert [r[2:] for r in cov[1:]] == [["matched", "hard", "25.0 (10/40)"],
                                         ["oracle (diagnostic)", "hard", "100.0 (30/30)"]]
    assert "oracle" not in section(md, "## Paired comparisons") + section(md, "## Robustness")


def test_machine_info_names_the_cpu():
    from exprag.experiment import machine_info

    info = machine_info()
    assert info["cpus"] >= 1 and isinstance(info["cpu_vector"], list)
    if Path("/proc/cpuinfo").is_file() and "model name" in Path("/proc/cpuinfo").read_text():
        assert info["cpu_model"]


def test_header_names_the_commit_the_hypotheses_were_written_at():
    from exprag.report import _hypothesis_lines

    hyps = [{"id": "H1c", "text": "A beats B"}]
    assert _hypothesis_lines(hyps, "abc1234")[0] == "- pre-registered hypotheses (written at commit abc1234):"
    assert _hypothesis_lines(hyps)[0] == "- pre-registered hypotheses:"


def test_confirm_analysis_pools_independent_seeds(tmp_path, capsys):
    """scripts/confirm_analysis.py on three one-seed experiments: the committed replication's 5 to 0
    (p = 0.0625), and two new seeds (6:1 and 3:0, pooled 9:1, p = 0.0215, supported)."""
    import importlib.util

    from exprag.report import paired_stratum, read_experiment

    root = Path(__file__).parent.parent
    spec = importlib.util.spec_from_file_location("confirm_analysis", root / "scripts" / "confirm_analysis.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    old = read_experiment(root / "results" / "replication-cpu")
    s = paired_stratum(old, "exprag_lora", "lora", "hard", "smollm2-135m")
    assert (s.n, s.a_successes, s.b_successes, s.b, s.c, s.p) == (50, 5, 0, 5, 0, 0.0625)

    def run(seed, a_wins, b_wins):
        tasks = [f"s{seed}-t{i}" for i in range(10)]  # each seed on its own games
        rows = [outcomes(row(M, "exprag_lora", "hard", len(a_wins), 10, seed=seed), {tasks[i] for i in a_wins}, tasks),
                outcomes(row(M, "lora", "hard", len(b_wins), 10, bank="none", k=None, mode=None, seed=seed),
                         {tasks[i] for i in b_wins}, tasks),
                outcomes(row(M, "exprag_lora", "hard", 0, 10, bank="empty", k=None, mode=None, seed=seed), set(), tasks)]
        return make_run(tmp_path / f"s{seed}", f"s{seed}", [M], rows)

    runs = [run(2026, range(6), [9]), run(2027, [0, 1, 2], [])]  # 2026: b = 6, c = 1; 2027: b = 3, c = 0
    assert script.main([*map(str, runs), "--earlier", str(run(2025, range(5), [])), "--model", M]) == 0
    out = capsys.readouterr().out
    h1, h2 = out.split("## H2c")
    assert "**Confirmatory:** 20 pairs, b = 9, c = 1, exact two-sided McNemar p = 0.02148: supported" in h1
    assert "| s2026 | 10 | 6/10 (60.0% [" in h1 and "| 6 | 1 | 0.125 |" in h1 and "| 3 | 0 | 0.25 |" in h1
    assert "| pooled | 30 | 14/30" in h1 and "| 14 | 1 | 0.0009766 |" in h1  # with seed 2025: the 250 pairs' analogue
    assert "b = 9, c = 0" in h2 and "p = 0.003906: supported" in h2
