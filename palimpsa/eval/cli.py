"""``palimpsa eval MODEL``: lm-eval tasks and/or loss by token position.

The default tasks (``--tasks local``) ship with the package and run offline; ``--tasks paper`` runs the paper's
zero-shot suite, whose data the harness downloads from the Hugging Face hub (or reads from its cache with
HF_DATASETS_OFFLINE=1); ``--tasks none`` skips the harness.  Results go to MODEL/eval unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os


def add_parser(subparsers) -> None:
    from palimpsa.eval.harness import DEFAULT_MAX_LENGTH, LOCAL_TASKS, PAPER_TASKS

    parser = subparsers.add_parser("eval", help="evaluate a model with lm-eval and/or loss by token position",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="Hugging Face model directory, or a 'palimpsa train' out_dir")
    parser.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the model's directory)")
    parser.add_argument("--tasks", nargs="+", default=["local"], metavar="TASK",
                        help="lm-eval task names or suites: 'local' (the shipped offline tasks: "
                             f"{', '.join(LOCAL_TASKS)}), 'paper' (downloads data: {', '.join(PAPER_TASKS)}); "
                             "'none' skips the harness (default: local)")
    parser.add_argument("--include-path", help="directory of extra lm-eval task YAML files (default: none)")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's, 0 here)")
    parser.add_argument("--limit", type=float,
                        help="examples per task (>= 1: count, < 1: fraction; default: all)")
    parser.add_argument("--batch-size", default="1", help="harness batch size or 'auto' (default: 1)")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                        help=f"harness context window (rolling log-likelihood windows; default: {DEFAULT_MAX_LENGTH})")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, ... (default: auto, the GPU when there is one, else the CPU)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="weights' dtype while evaluating (default: fp32)")
    parser.add_argument("--out", default=None,
                        help="directory for the JSON, markdown and plot (default: MODEL/eval)")
    parser.add_argument("--position-loss-data", nargs="+",
                        help="local files/directories of long documents: also measure loss by token position "
                             "(default: not measured)")
    parser.add_argument("--position-length", type=int, default=4096,
                        help="tokens per document window (default: 4096)")
    parser.add_argument("--position-documents", type=int, default=64,
                        help="documents to average over (default: 64)")
    parser.set_defaults(func=run)


def _positive_int(flag: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{flag} must be a positive integer or 'auto', got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    from palimpsa.eval.harness import expand_tasks
    from palimpsa.eval.loading import load_model_and_tokenizer, resolve_model_dir

    tasks = expand_tasks(args.tasks)
    if not tasks and not args.position_loss_data:
        raise ValueError("nothing to do: --tasks none needs --position-loss-data")
    resolve_model_dir(args.model)  # a bad MODEL fails first
    out = args.out if args.out is not None else os.path.join(args.model, "eval")
    batch_size = args.batch_size if args.batch_size == "auto" else _positive_int("--batch-size", args.batch_size)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    task_manager = None
    if tasks:  # unknown tasks or an unreachable hub fail here, before the model is loaded
        from palimpsa.eval.harness import task_manager_for

        task_manager = task_manager_for(tasks, args.include_path)
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.device, args.dtype)
    written = {}
    if tasks:
        from palimpsa.eval.harness import evaluate_with_harness
        from palimpsa.eval.report import markdown_summary, write_report

        results = evaluate_with_harness(model, tokenizer, tasks, task_manager=task_manager,
                                        num_fewshot=args.num_fewshot, limit=limit, batch_size=batch_size,
                                        max_length=args.max_length)
        written["lm_eval"] = write_report(results, out)
        print(markdown_summary(results))
    if args.position_loss_data:
        from palimpsa.eval.position_loss import per_position_loss, write_position_loss
        from palimpsa.train.data import DocumentSource, make_encoder

        encode = make_encoder(tokenizer, append_eos=False)
        documents = (encode(text) for text in DocumentSource(args.position_loss_data).documents())
        result = per_position_loss(model, documents, args.position_length, max_documents=args.position_documents)
        written["position_loss"] = write_position_loss(result, out, label=args.model)
    print(json.dumps(written, indent=1))
    return 0
