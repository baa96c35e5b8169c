"""``exprag serve``: an OpenAI-compatible server around the transformers backend."""

from __future__ import annotations

import argparse
import os
import sys

from exprag.llm.server import DEFAULT_MAX_LORAS, DEFAULT_MAX_QUEUE
from exprag.validate import port, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions)",
        description="Serve a chat model at http://HOST:PORT/v1 (OpenAI chat completions, greedy, "
        "non-streaming). Concurrent requests are batched. Binds loopback unless --host says otherwise; "
        "a non-loopback address needs an API key (EXPRAG_API_KEY or --api-key) or --insecure.",
    )
    p.add_argument("--model", required=True, help="smollm2-135m, a checkpoint directory, a .gguf file, or a cached hub id")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory for the model")
    p.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=DIR",
                   help="LoRA adapters served as model NAME on the one loaded base model, as vLLM's flag "
                        "(`python -m exprag.llm.adapters DIR` prints the name exprag's client asks for)")
    p.add_argument("--runtime-lora", action="store_true",
                   help="let clients add adapters with POST /v1/load_lora_adapter (vLLM's runtime LoRA API; "
                        "an experiment's freshly trained adapters reach the server this way)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--name", default=None, help="model name clients use (default: the --model value)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--max-batch-size", type=positive_int, default=8, help="requests decoded together (default: 8)")
    p.add_argument("--max-tokens", type=positive_int, default=256, help="reply length when a request gives none (default: 256)")
    p.add_argument("--max-queue", type=positive_int, default=DEFAULT_MAX_QUEUE,
                   help=f"requests waiting for the model before new ones get 503 (default: {DEFAULT_MAX_QUEUE})")
    p.add_argument("--max-loras", type=positive_int, default=DEFAULT_MAX_LORAS,
                   help=f"LoRA adapters loaded at most, at start and at run time (default: {DEFAULT_MAX_LORAS})")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $EXPRAG_API_KEY; prefer the variable, "
                        "a flag is visible to other users in the process list)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key (anyone who can reach it may use it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from exprag.llm.hf import HFChatModel
    from exprag.llm.server import ChatServer, is_loopback

    adapters = {}
    for item in args.lora_modules:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"exprag serve: --lora-modules takes NAME=DIR, got {item!r}")
        adapters[name] = path
    api_key = args.api_key or os.environ.get("EXPRAG_API_KEY") or None
    if not api_key and not args.insecure and not is_loopback(args.host):
        # Checked before the model loads, and again by the server itself.
        ChatServer.refuse_open_bind(args.host, args.port)
    model = HFChatModel(
        args.model,
        adapter=args.adapter,
        device=args.device,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        name=args.name,
    )
    server = ChatServer(
        model,
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        default_max_tokens=args.max_tokens,
        api_key=api_key,
        insecure=args.insecure,
        adapters=adapters,
        runtime_lora=args.runtime_lora,
        max_queue=args.max_queue,
        max_loras=args.max_loras,
    )
    access = "API key required" if api_key else "no API key"
    if not api_key and not is_loopback(args.host):
        access += "; WARNING: open to anyone who can reach this address"
    if server.adapters:
        access += f"; LoRA adapters: {', '.join(server.adapters)}"
    print(f"exprag: serving {model.name} at {server.url} ({access}; Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0
