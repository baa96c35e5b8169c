"""Training throughput and peak memory, every variant in the same run on the same data.

Variants (one epoch each over the same real TWX expert trajectories, same model, LoRA recipe,
precision, batch of ``--batch`` examples per optimizer step):
  trajectory  exprag trainer, one multi-turn example per trajectory (the default)
  step        exprag trainer, one example per step (each action with its whole history)
  trl         TRL SFTTrainer on exactly the trajectory examples (pre-tokenized input_ids +
              assistant_masks), one sequence per forward pass, gradient accumulation to ``--batch``,
              TRL's defaults otherwise (gradient checkpointing on)
  trl-nogc    the same with gradient checkpointing off, as our trainer runs by default
Each variant runs in a fresh subprocess, so peak memory (GPU allocated, else the process's peak
RSS) is its own. Printed: epoch time (training only, model loading and tokenization excluded) as
process CPU time (steady on a shared machine) and wall time, tokens per CPU-second, trained
(action) tokens per CPU-second, peak memory, and the ratios step/trajectory and exprag/TRL.
``--repeats R`` interleaves R rounds of all variants and keeps each variant's fastest round.

    python bench/bench_train.py [--model smollm2-135m] [--per-type 1] [--k 0] [--batch 4]
                                [--threads 1] [--repeats 1] [--only ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = ("trajectory", "step", "trl", "trl-nogc")


def peak_mb() -> float:
    from exprag.train.model import peak_memory_mb

    return round(peak_memory_mb(), 1)


def child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from exprag.train.config import TrainConfig
    from exprag.config import RetrievalConfig
    from exprag.memory_block import MemorySpec

    retrieval = RetrievalConfig(bank=args.bank, memory=MemorySpec(k=args.k)) if args.bank else RetrievalConfig()
    cfg = TrainConfig(trajectories=[args.data], model=args.model, out=args.run, epochs=1, lr=5e-5,
                      batch_size=args.batch, max_length=args.max_length, log_every_steps=1000,
                      retrieval=retrieval,
                      serialization="step" if args.variant == "step" else "trajectory").validate()
    if args.variant in ("trajectory", "step"):
        from exprag.train.lora import train

        res = train(cfg, overwrite=True)
        d = res.data["train"]
        ep = [json.loads(x) for x in (Path(args.run) / "metrics.jsonl").read_text().splitlines()]
        ep = [e for e in ep if e["event"] == "epoch"][-1]
        return {"variant": args.variant, "examples": d["examples"], "tokens": d["tokens"],
                "trained_tokens": d["trained_tokens"], "steps": res.steps, "train_s": ep["train_s"],
                "cpu_s": ep["train_cpu_s"], "peak_mb": peak_mb()}
    return trl_child(cfg, args)


def trl_child(cfg, args: argparse.Namespace) -> dict:
    import warnings

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from exprag.train.model import attention_targets, load_model, resolve_precision
    from exprag.train.prepare import prepare_data

    warnings.simplefilter("ignore")
    precision = resolve_precision(cfg.precision)
    dtype = torch.bfloat16 if precision == "bf16" and torch.cuda.is_available() else torch.float32
    tok, model, _ = load_model(cfg.model, dtype=dtype)
    examples, _, report = prepare_data(cfg, tok)
    ds = Dataset.from_dict({
        "input_ids": [e.input_ids for e in examples],
        "assistant_masks": [[int(x != -100) for x in e.labels] for e in examples],
    })
    micro = args.batch if torch.cuda.is_available() else 1  # as our trainer: unpadded on CPU
    sft = SFTConfig(
        output_dir=args.run, num_train_epochs=1, per_device_train_batch_size=micro,
        gradient_accumulation_steps=max(1, args.batch // micro), learning_rate=5e-5,
        lr_scheduler_type="constant", weight_decay=0.0, optim="adamw_torch", seed=2025,
        bf16=precision == "bf16", logging_steps=1000, save_strategy="no", report_to=[],
        max_length=None, dataloader_num_workers=0, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        **({"gradient_checkpointing": False} if args.variant == "trl-nogc" else {}),
    )
    peft_cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=attention_targets(model),
                          bias="none", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=sft, train_dataset=ds, processing_class=tok, peft_config=peft_cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    out = trainer.train()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    d = report["train"]
    return {"variant": args.variant, "examples": d["examples"], "tokens": d["tokens"],
            "trained_tokens": d["trained_tokens"], "steps": out.global_step, "train_s": round(seconds, 2),
            "cpu_s": round(cpu, 2), "peak_mb": peak_mb()}


def make_data(tmp: Path, per_type: int, k: int) -> tuple[str, str | None]:
    from exprag.bank import build_bank
    from exprag.envs import make_env
    from exprag.envs.splits import split_types
    from exprag.expert import collect
    from exprag.trajectory import write_jsonl

    with make_env("twx") as env:
        tasks = [t for g in split_types("twx", "easy") for t in env.tasks("train", [g])[:per_type]]
        trajs = [t for t in collect(env, tasks) if t.success]
    data = tmp / "train.jsonl"
    write_jsonl(data, trajs)
    bank = None
    if k:
        # A bank of other seeds of the same games, so that memory is never the example itself.
        with make_env("twx") as env:
            more = [t for g in split_types("twx", "easy")
                    for t in env.tasks("train", [g])[per_type:per_type + max(2, k)]]
            bank_trajs = trajs + list(collect(env, more))
        bank = str(tmp / "bank")
        build_bank(bank_trajs, bank, "bm25")
    return str(data), bank


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--per-type", type=int, default=1, help="TWX easy-game trajectories per game")
    ap.add_argument("--k", type=int, default=0, help="memory trajectories per example (0: plain LoRA)")
    ap.add_argument("--batch", type=int, default=4, help="examples per optimizer step")
    ap.add_argument("--max-length", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    ap.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds over all variants (interleaved); the fastest round of each counts")
    ap.add_argument("--json", default=None, metavar="OUT")
    # internal: one variant in this process
    ap.add_argument("--child", choices=VARIANTS, dest="variant")
    ap.add_argument("--data")
    ap.add_argument("--bank")
    ap.add_argument("--run")
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(child(args)))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data, bank = make_data(tmp, args.per_type, args.k)
    results: dict[str, dict] = {}
    for rnd in range(args.repeats):
        for v in args.only:
            cmd = [sys.executable, __file__, "--child", v, "--data", data, "--run", str(tmp / f"run-{v}"),
                   "--model", args.model, "--batch", str(args.batch), "--threads", str(args.threads),
                   "--max-length", str(args.max_length), "--k", str(args.k)] + (["--bank", bank] if bank else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-3000:])
                print(f"{v}: failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"[round {rnd + 1}] {v:>10}: {r['examples']:4d} examples {r['tokens']:7d} tokens "
                  f"({r['trained_tokens']} trained)  wall {r['train_s']:7.1f}s  cpu {r['cpu_s']:7.1f}s  "
                  f"peak {r['peak_mb']:.0f} MB", flush=True)
            best = results.get(v)
            if best is None or r["cpu_s"] < best["cpu_s"]:
                r["peak_mb"] = max(r["peak_mb"], best["peak_mb"]) if best else r["peak_mb"]
                results[v] = r
            else:
                best["peak_mb"] = max(best["peak_mb"], r["peak_mb"])
    for r in results.values():
        r["tokens_per_s"] = round(r["tokens"] / r["train_s"], 1)
        r["tokens_per_cpu_s"] = round(r["tokens"] / r["cpu_s"], 1)
        r["trained_tokens_per_cpu_s"] = round(r["trained_tokens"] / r["cpu_s"], 2)
    print(f"\n{'variant':>10}  {'tokens':>7}  {'trained':>7}  {'epoch cpu s':>11}  {'tok/cpu-s':>9}  "
          f"{'trained tok/cpu-s':>17}  {'epoch wall s':>12}  {'peak MB':>7}")
    for v, r in results.items():
        print(f"{v:>10}  {r['tokens']:7d}  {r['trained_tokens']:7d}  {r['cpu_s']:11.1f}  {r['tokens_per_cpu_s']:9.1f}  "
              f"{r['trained_tokens_per_cpu_s']:17.2f}  {r['train_s']:12.1f}  {r['peak_mb']:7.0f}")

    ratios: dict[str, float] = {}

    def ratio(name: str, a: str, b: str) -> None:
        if a in results and b in results:
            ra, rb = results[a], results[b]
            ratios[f"{name}: epoch time (cpu)"] = round(ra["cpu_s"] / rb["cpu_s"], 2)
            ratios[f"{name}: epoch time (wall)"] = round(ra["train_s"] / rb["train_s"], 2)
            ratios[f"{name}: tokens per cpu-second"] = round(ra["tokens_per_cpu_s"] / rb["tokens_per_cpu_s"], 2)
            ratios[f"{name}: peak memory"] = round(ra["peak_mb"] / rb["peak_mb"], 2)

    ratio("step / trajectory", "step", "trajectory")
    ratio("exprag / TRL SFTTrainer (defaults)", "trajectory", "trl")
    ratio("exprag / TRL SFTTrainer (no grad. checkpointing)", "trajectory", "trl-nogc")
    print()
    for k, v in ratios.items():
        print(f"{k:>72}: {v:.2f}x")
    if args.json:
        import torch

        from headlines import train_headline
        from runtime import write_json

        out = {
            "model": args.model, "per_type": args.per_type, "k": args.k, "batch": args.batch,
            "threads": args.threads, "repeats": args.repeats, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "results": results, "ratios": ratios,
        }
        out["headline"] = train_headline(out)
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
