"""A vLLM server started by ``scripts/serve_vllm.sh`` for the time of a block (engine tests, benches).

vLLM is never a dependency of exprag: it lives in its own venv (``.venv-vllm``, created by
``scripts/serve_vllm.sh --install-only``) or is the user's (``$VLLM_PYTHON``). :func:`vllm_python`
says which, or None when neither is there (callers skip).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

from exprag.llm.base import ServerError

ROOT = Path(__file__).resolve().parents[3]  # the repository (the script is not installed with the package)
SCRIPT = ROOT / "scripts" / "serve_vllm.sh"


def vllm_python() -> Path | None:
    """The Python that imports vLLM: ``$VLLM_PYTHON``, else ``.venv-vllm``; None when neither does."""
    env = os.environ.get("VLLM_PYTHON")
    venv = Path(os.environ.get("VLLM_VENV") or ROOT / ".venv-vllm")
    for py in ([Path(env)] if env else []) + [venv / "bin" / "python"]:
        if py.is_file() and subprocess.run([str(py), "-c", "import vllm"], capture_output=True).returncode == 0:
            return py
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def vllm_server(model: str, *, lora_modules: Sequence[str] = (), runtime_lora: bool = False,
                startup_timeout: float = 900.0, log_path: Path | None = None,
                extra_args: Sequence[str] = ()) -> Iterator[tuple[str, str]]:
    """Start vLLM on a free loopback port; yields ``(base_url, api_key)`` once ``/health`` answers,
    and stops it (the process group) at the end. Its output goes to ``log_path`` (else discarded)."""
    py = vllm_python()
    if py is None:
        raise ServerError("vLLM is not installed: run `scripts/serve_vllm.sh --install-only` or set VLLM_PYTHON")
    port, key = free_port(), secrets.token_hex(8)
    env = {**os.environ, "EXPRAG_API_KEY": key}  # the script finds the same Python vllm_python() did
    if runtime_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    cmd = ["bash", str(SCRIPT), "--model", model, "--port", str(port)]
    if lora_modules:
        cmd += ["--lora-modules", *lora_modules]
    if extra_args:
        cmd += ["--", *extra_args]
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise ServerError(f"vLLM exited with status {proc.returncode} while starting"
                                  + (f" (log: {log_path})" if log_path else ""))
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"vLLM did not answer /health within {startup_timeout:.0f}s")
            time.sleep(2)
        yield url + "/v1", key
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
        if log_path:
            log.close()


def served_models(base_url: str, api_key: str) -> list[dict]:
    request = urllib.request.Request(base_url + "/models", headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)["data"]
