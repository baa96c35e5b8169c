"""The main job end to end with the bundled SmolLM2-135M and MiniLM (small settings), replaying the
committed replication's adapters on two held-out ALFWorld games."""

import json

from exprag.cli import main


def test_quickstart_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "qs"
    argv = ["quickstart", "--out", str(out), "--per-type", "1", "--test-per-type", "1",
            "--games-per-type", "1", "--no-contrast", "--max-steps", "2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "[2/3] static retrieval" in text and "[3/3] what retrieval in training does" in text
    for label in ("| frozen model, no retrieval |", "| LoRA |", "| ExpRAG-LoRA (matched bank, K=2) |"):
        assert label in text
    assert "5/50 (10%) [4.3, 21.4]" in text  # the committed experiment's own ExpRAG-LoRA column
    assert "at commit 9508a9845938" in text and f"run directory: {out}" in text
    assert "one training seed's, exploratory" in text and "PREREGISTRATION.md; none of its cells has run" in text
    runs = sorted((out / "replay").iterdir())
    assert [r.name for r in runs] == ["smollm2-135m-exprag_lora-hard-matched-k2-static-s2025",
                                      "smollm2-135m-lora-hard-none-s2025", "smollm2-135m-no_retrieval-hard-none"]
    for run in runs:
        m = json.loads((run / "metrics.json").read_text())
        assert m["n"] == 2 and m["env"] == "alfworld" and m["model"] == "smollm2-135m"
        assert set(m["per_type"]) == {"pick_cool_then_place_in_recep", "pick_heat_then_place_in_recep"}
        assert (m["adapter"] is None) == run.name.startswith("smollm2-135m-no_retrieval")
    rows = [json.loads(line) for line in (runs[0] / "results.jsonl").read_text().splitlines()]
    assert all(len(r["memory_ids"]) == 2 and r["steps"] <= 2 for r in rows)
    # A rerun reuses the data, the bank and every finished episode.
    assert main(argv) == 0
    assert len((runs[0] / "results.jsonl").read_text().splitlines()) == 2
