"""Expert collection to a file: an interrupted collection leaves the previous output as it was."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from exprag.trajectory import write_jsonl


def test_ctrl_c_keeps_the_previous_output(tmp_path, twx_trajs):
    """Ctrl-C reaches the whole process group, the TWX JVM included: the episodes after it fail at
    once, and that must not be written over a complete earlier output (exit 130, file untouched)."""
    out = tmp_path / "twx.jsonl"
    write_jsonl(out, twx_trajs[0])
    before = out.read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-m", "exprag", "collect", "--env", "twx", "--split", "train", "--task-types", "all",
         "--per-type", "200", "--out", str(out)],
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6)  # the JVM is up and episodes are being played (the whole collection takes ~40 s)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "exprag: interrupted", err
    assert out.read_bytes() == before
