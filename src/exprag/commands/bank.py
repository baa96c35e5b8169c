"""`exprag bank build | query | info | eval-retrieval`."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from exprag.validate import non_negative_float, non_negative_int, positive_float, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bank", help="build, query and inspect experience banks")
    bsub = p.add_subparsers(dest="bank_command", metavar="SUBCOMMAND", required=True)

    b = bsub.add_parser("build", help="build a bank from trajectory JSONL files (atomic)")
    b.add_argument("--trajectories", nargs="+", required=True, metavar="F.jsonl")
    b.add_argument("--out", required=True, metavar="BANK_DIR")
    b.add_argument("--encoder", default="minilm",
                   help="minilm (bundled all-MiniLM-L6-v2) | bm25 | a sentence-transformers id or local path")
    b.add_argument("--scoring", default="procedure", choices=["procedure", "dense", "bm25"],
                   help="procedure (default): key terms weighted by how well they tell the bank's task types "
                        "apart (learned at build time from the stored task_type; object/receptacle names get "
                        "~0 weight) + a small dense term, diversity among ties; dense: the paper's plain "
                        "dot product of the encoder's embeddings; bm25: plain BM25, no model")
    b.add_argument("--dense-weight", type=non_negative_float, default=None, metavar="W",
                   help="procedure: weight of the dense dot product added to the lexical cosine (default 0.5; "
                        "0 = lexical only)")
    b.add_argument("--template-weight", type=non_negative_float, default=None, metavar="W",
                   help="procedure: weight of the template term, a second stage that compares the query with "
                        "its entity words masked to the candidates' masked keys in the dense encoder's space "
                        "(default 0.5; 0 = off)")
    b.add_argument("--no-expand", action="store_true",
                   help="procedure: query words unknown to the bank weigh 0 (default: they borrow the weight of "
                        "their nearest bank terms in the dense encoder's word space)")
    b.add_argument("--no-lexicon", action="store_true",
                   help="procedure: map unknown query words through the dense encoder's word space alone "
                        "(default: WordNet's synonyms, definitions and antonyms guide the mapping)")
    b.add_argument("--no-diversity", action="store_true",
                   help="procedure: keep exact-text copies where they rank (default: behind keys of equal score)")
    b.add_argument("--alpha", type=positive_float, default=None,
                   help="procedure: strength of the prior on term weights (default grows with the bank)")
    b.add_argument("--only-success", action="store_true", help="store successful trajectories only")
    b.set_defaults(func=run_build)

    q = bsub.add_parser("query", help="print the top-K trajectories for a task")
    q.add_argument("bank", metavar="BANK_DIR")
    q.add_argument("--task", required=True, help="task description (the static query)")
    q.add_argument("--history", metavar="FILE",
                   help="dynamic mode: a JSON file with the episode so far (a list of {role, content} "
                        "messages, or a trajectory record)")
    q.add_argument("-k", type=non_negative_int, default=2)
    q.add_argument("--mode", default="static", choices=["static", "dynamic"])
    q.add_argument("--encoder", default=None, help="fail unless the bank was built with this encoder")
    q.add_argument("--task-type", action="append", dest="task_types", help="filter (repeatable)")
    q.add_argument("--success-only", action="store_true")
    q.add_argument("--exclude-task-id", action="append", default=[], help="exclusion (repeatable)")
    q.add_argument("--token-budget", type=positive_int, default=None,
                   help="max tokens of the memory block, shortening its trajectories (counted by the "
                        "chars/4 estimate: no model here)")
    q.add_argument("--memory", action="store_true", help="print the rendered memory block")
    q.add_argument("--format", default="json", choices=["json", "text"], help="memory block format")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=run_query)

    i = bsub.add_parser("info", help="print a bank's manifest summary")
    i.add_argument("bank", metavar="BANK_DIR")
    i.add_argument("--verify", action="store_true",
                   help="hash every byte of every file against the checksums recorded at write time (a load "
                        "checks sizes, and hashes large files only in sampled blocks)")
    i.set_defaults(func=run_info)

    e = bsub.add_parser("eval-retrieval",
                        help="how often retrieval returns the query's task type (top-1, any/all of K), per "
                             "type, confusion, duplicates; overall and on queries with no exact-text twin")
    e.add_argument("bank", metavar="BANK_DIR")
    e.add_argument("--queries", nargs="+", required=True, metavar="F.jsonl",
                   help="held-out trajectories used as queries, or text queries (JSON lines with task_type "
                        "and text, e.g. the shipped paraphrase sets; static retrieval)")
    e.add_argument("-k", type=positive_int, default=2, help="slots per query (default 2, the training K)")
    e.add_argument("--mode", default="static", choices=["static", "dynamic"])
    e.add_argument("--out", default=None, metavar="PREFIX",
                   help="write PREFIX.json and PREFIX.md (default: print markdown)")
    e.set_defaults(func=run_eval_retrieval)


def run_build(args: argparse.Namespace) -> int:
    from exprag.bank import build_bank
    from exprag.errors import DataFormatError
    from exprag.trajectory import read_jsonl
    from exprag.validate import check_output

    check_output(args.out, "dir")
    trajs = read_jsonl(*args.trajectories)
    if args.only_success:
        trajs = [t for t in trajs if t.success]
    if not trajs:  # name the input, which is what the user must fix
        what = "successful trajectories" if args.only_success else "trajectories"
        raise DataFormatError(f"{', '.join(args.trajectories)}: no {what} to build a bank from")
    from exprag.bank.scoring import (DEFAULT_DENSE_WEIGHT, DEFAULT_LEXICON, DEFAULT_TEMPLATE_WEIGHT, LEXICON_INSTALL,
                                     ScoringConfig)

    cfg = ScoringConfig(scoring=args.scoring, alpha=args.alpha, diversity=not args.no_diversity,
                        expand=not args.no_expand, lexicon=None if args.no_lexicon else DEFAULT_LEXICON,
                        dense_weight=DEFAULT_DENSE_WEIGHT if args.dense_weight is None else args.dense_weight,
                        template_weight=DEFAULT_TEMPLATE_WEIGHT if args.template_weight is None
                        else args.template_weight)
    bank = build_bank(trajs, args.out, args.encoder, sources=args.trajectories, progress=sys.stderr.isatty(),
                      retrieval=cfg)
    d = bank.describe()
    print(f"built bank {args.out}: {d['count']} trajectories, envs {', '.join(d['envs'])}, "
          f"encoder {d['encoder']['name']}, scoring {d['retrieval']['scoring']}")
    note = _labels_note(d)
    if note:
        print(note)
    if cfg.scoring == "procedure" and cfg.lexicon and cfg.expand and d["retrieval"].get("lexicon") is None:
        print(f"lexicon not used: {cfg.lexicon} is not installed ({LEXICON_INSTALL}); unknown query words "
              "are mapped through the encoder's word space alone")
    return 0


def _labels_note(manifest: dict) -> str | None:
    """A sentence when the bank's labels were not used for its term weights (build and info say it)."""
    labels = manifest.get("labels")
    if not isinstance(labels, dict) or labels.get("useful", True):
        return None
    return (f"labels not used: {labels.get('reason')}; procedure term weights fall back to "
            f"{labels.get('fallback', 'uniform')} weights (label-free)")


def _load_history(path: str) -> list[dict]:
    from exprag.errors import DataFormatError
    from exprag.trajectory import Trajectory
    from exprag.validate import read_json

    p = Path(path)
    obj = read_json(p)
    if isinstance(obj, dict):
        return Trajectory.from_dict(obj, where=str(p)).episode_messages()
    if not isinstance(obj, list):
        raise DataFormatError(f"{p}: expected a list of messages or a trajectory object")
    for n, m in enumerate(obj):
        if not (isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
                and isinstance(m.get("content"), str)):
            raise DataFormatError(f"{p}: field '[{n}]' must be {{role: user|assistant|system, content: str}}")
    return obj


def run_query(args: argparse.Namespace) -> int:
    from exprag.bank import Filters, Retriever, load_bank
    from exprag.errors import ExpragError
    from exprag.memory_block import MemorySpec, memory_block

    if not args.task.strip():  # an empty query would score every key alike: arbitrary hits
        raise ExpragError("--task is empty; give the task description to retrieve for")
    bank = load_bank(args.bank, encoder=args.encoder)
    history = _load_history(args.history) if args.history else None
    filters = Filters(task_types=set(args.task_types) if args.task_types else None,
                      success=True if args.success_only else None,
                      exclude_task_ids=set(args.exclude_task_id))
    spec = MemorySpec(k=args.k, mode=args.mode, format=args.format, token_budget=args.token_budget)
    (hits,) = spec.retrieve(Retriever(bank), [(args.task, history)], [filters])
    if args.json:
        print(json.dumps([{"rank": r + 1, "score": h.score, "id": h.trajectory.id,
                           "task_type": h.trajectory.task_type, "task": h.trajectory.task,
                           "success": h.trajectory.success, "num_steps": h.trajectory.num_steps}
                          for r, h in enumerate(hits)], indent=2))
        return 0
    print(f"query ({args.mode}, k={args.k}, scoring {bank.retrieval.scoring}): {terminal_safe(args.task)}")
    for r, h in enumerate(hits, 1):
        t = h.trajectory
        print(terminal_safe(
            f"{r}. score {h.score:.4f}  [{t.task_type}] {'success' if t.success else 'failure'}, "
            f"{t.num_steps} steps  {t.id}\n   task: {t.task}\n   actions: {' | '.join(t.actions()[:8])}"
            + (" | ..." if len(t.actions()) > 8 else ""), keep="\n\t"))
    if not hits:
        print("(no trajectory matched)")
    if args.memory:
        print("\n" + terminal_safe(memory_block(hits, spec.format), keep="\n\t"))
    return 0


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def terminal_safe(text: str, keep: str = "") -> str:
    """Text from trajectories as the terminal should show it: control and escape characters (a
    stored ESC sequence could recolour, retitle or clear the user's terminal) written as escapes,
    e.g. ``\\x1b``; the characters in ``keep`` (the layout's own newlines) pass."""
    return _CONTROL.sub(lambda m: m.group() if m.group() in keep else m.group().encode("unicode_escape").decode(),
                        text)


def run_info(args: argparse.Namespace) -> int:
    from exprag.bank.scoring import ScoringConfig
    from exprag.bank.store import check_bank_files

    m = check_bank_files(args.bank, verify=args.verify)
    out = {k: v for k, v in m.items() if k not in ("inputs", "files")}  # one record per file: too long to print
    if "files" in m:
        out["checksums"] = {"files": len(m["files"]), "verified": "every byte" if args.verify else "cheap"}
    if "retrieval" not in out:  # a bank from before scoring options: say what it is read with
        out["retrieval"] = {**ScoringConfig.from_manifest(m).to_manifest(), "inferred": True}
    note = _labels_note(m)
    if note:  # beside the scoring it changes, so that a reader of the JSON sees it
        out["retrieval"] = {**out["retrieval"], "labels_fallback": note}
    print(json.dumps(out, indent=2))
    return 0


def run_eval_retrieval(args: argparse.Namespace) -> int:
    from exprag.bank import load_bank
    from exprag.bank.quality import (evaluate_retrieval, evaluate_text_queries, is_text_query_file,
                                     read_text_queries)
    from exprag.errors import DataFormatError
    from exprag.io import atomic_write_json, atomic_write_text, check_output_file, read_json_object
    from exprag.trajectory import read_jsonl

    if args.out:  # replaces only its own earlier report
        json_out = lambda p: {"k", "mode", "overall"} <= (read_json_object(p) or {}).keys()  # noqa: E731
        check_output_file(f"{args.out}.json", "retrieval report", json_out)
        check_output_file(f"{args.out}.md", "retrieval report", lambda p: json_out(Path(f"{args.out}.json")))
    bank = load_bank(args.bank)
    kinds = {is_text_query_file(f) for f in args.queries}
    if kinds == {True}:
        if args.mode != "static":
            raise DataFormatError("text queries have no episode history: use --mode static")
        report = evaluate_text_queries(bank, read_text_queries(*args.queries), k=args.k)
    elif len(kinds) > 1:
        raise DataFormatError("--queries mixes text-query files and trajectory files; evaluate them separately")
    else:
        report = evaluate_retrieval(bank, read_jsonl(*args.queries), k=args.k, mode=args.mode)
    md = report.markdown()
    if report.skipped_in_bank:
        md += (f"\n{report.skipped_in_bank} of the queries are stored in the bank and were skipped "
               "(they would retrieve themselves).\n")
    if args.out:
        atomic_write_json(f"{args.out}.json", report.as_dict())
        atomic_write_text(f"{args.out}.md", md)
        print(f"wrote {args.out}.json and {args.out}.md")
    print(md)
    return 0
