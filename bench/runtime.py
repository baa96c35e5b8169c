"""Set-up shared by the benchmarks: bundled models load offline, torch uses one thread (timings on a
shared 2-core machine), progress goes to stderr so that stdout stays the result."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def offline_one_thread() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_json(path: str | None, result: Any) -> None:
    """``--json OUT``: the benchmark's result as JSON (nothing when no path is given)."""
    if path:
        Path(path).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
