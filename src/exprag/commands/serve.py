"""``exprag serve``: an OpenAI-compatible server around the transformers backend."""

from __future__ import annotations

import argparse
import os
import sys

from exprag.llm.server import DEFAULT_MAX_LORAS, DEFAULT_MAX_QUEUE
from exprag.validate import non_negative_int, port, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions)",
        description="Serve a chat model at http://HOST:PORT/v1 (OpenAI chat completions, greedy, "
        "non-streaming). Concurrent requests are batched. Binds loopback unless --host says otherwise; "
        "a non-loopback address needs an API key (EXPRAG_API_KEY or --api-key) or --insecure.",
    )
    p.add_argument("--model", default=None,
                   help="smollm2-135m, a checkpoint directory, a .gguf file, or a cached hub id (or --upstream)")
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
    m = p.add_argument_group("memory proxy", "experience for any agent: with --bank, every chat request gets "
                             "the memory block exprag eval would show, in its system prompt (docs/serving.md)")
    m.add_argument("--bank", default=None, help="retrieve from this bank for every request")
    m.add_argument("--upstream", default=None, metavar="URL",
                   help="forward requests (memory added) to this OpenAI-compatible server, e.g. vLLM at "
                        "http://127.0.0.1:8001/v1, instead of loading --model; streaming passes through")
    m.add_argument("-k", type=non_negative_int, default=2, help="trajectories per memory block (default: 2)")
    m.add_argument("--mode", choices=("static", "dynamic"), default="static",
                   help="static: retrieve from the task; dynamic: from the conversation so far (default: static)")
    m.add_argument("--memory-format", choices=("json", "text"), default="json", help="default: json")
    m.add_argument("--token-budget", type=positive_int, default=None,
                   help="shorten the retrieved trajectories to fit this many tokens")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from exprag.errors import ExpragError
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
    if (args.model is None) == (args.upstream is None):
        raise ExpragError("give --model (serve it here) or --upstream URL (forward to that server), one of the two")
    if args.upstream and not args.bank:
        raise ExpragError("--upstream forwards with the memory of --bank; give --bank BANK")
    proxy = None
    if args.bank:  # opened before the model loads: a bad bank fails in a second
        from exprag.memory_block import MemorySpec
        from exprag.memory_proxy import MemoryProxy

        proxy = MemoryProxy(args.bank, MemorySpec(args.k, args.mode, args.memory_format, args.token_budget))
    model = None
    if args.model is not None:
        from exprag.llm.hf import HFChatModel

        model = HFChatModel(
            args.model,
            adapter=args.adapter,
            device=args.device,
            dtype=args.dtype,
            max_batch_size=args.max_batch_size,
            name=args.name,
        )
        if proxy is not None and args.token_budget is not None:
            from exprag.memory_block import token_counter

            proxy.count_tokens = token_counter(model.tokenizer)
    server = ChatServer(
        model,
        upstream=args.upstream,
        upstream_api_key=os.environ.get("EXPRAG_UPSTREAM_API_KEY") or None,
        rewrite=proxy.rewrite if proxy else None,
        routes=proxy.routes() if proxy else (),
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
    if proxy is not None:
        access += f"; memory from {args.bank} (k={args.k}, {args.mode})"
    print(f"exprag: serving {server.model.name} at {server.url} ({access}; Ctrl-C to stop)", file=sys.stderr,
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0
