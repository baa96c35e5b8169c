"""The main job end to end with the bundled SmolLM2-135M and MiniLM (small settings)."""

import json

from exprag.cli import main


def test_quickstart_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "qs"
    argv = ["quickstart", "--out", str(out), "--per-type", "1", "--test-per-type", "1", "--max-steps", "2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "[2/3] static retrieval" in text and "| no bank |" in text and "| static k=2 |" in text
    assert f"run directory: {out}" in text
    for run in ("eval-no-bank", "eval-static-k2"):
        m = json.loads((out / run / "metrics.json").read_text())
        assert m["n"] == 4 and set(m["per_type"]) == {"cookingworld", "coin", "mapreader", "peckingorder"}
        assert m["model"] == "smollm2-135m"
    static = [json.loads(line) for line in (out / "eval-static-k2" / "results.jsonl").read_text().splitlines()]
    assert all(len(r["memory_ids"]) == 2 for r in static)
    # A rerun reuses the data, the bank and every finished episode.
    assert main(argv) == 0
    assert len((out / "eval-static-k2" / "results.jsonl").read_text().splitlines()) == 4
