"""``palimpsa eval MODEL``: lm-eval tasks (default: the paper's suite) and/or loss by token position."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    from palimpsa.eval.harness import DEFAULT_MAX_LENGTH, PAPER_TASKS

    parser = subparsers.add_parser("eval", help="evaluate a model with lm-eval and/or loss by token position",
                                   description=__doc__)
    parser.add_argument("model", help="Hugging Face model directory, or a 'palimpsa train' out_dir")
    parser.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the model's directory)")
    parser.add_argument("--tasks", nargs="*", default=list(PAPER_TASKS),
                        help="lm-eval task names (default: the paper's suite); none to skip the harness")
    parser.add_argument("--include-path", help="directory of extra lm-eval task YAML files")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's, 0 here)")
    parser.add_argument("--limit", type=float, help="examples per task (>= 1: count, < 1: fraction)")
    parser.add_argument("--batch-size", default="1", help="harness batch size or 'auto'")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                        help="harness context window (rolling log-likelihood windows)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--out", default="results/eval", help="directory for the JSON, markdown and plot")
    parser.add_argument("--position-loss-data", nargs="+",
                        help="local files/directories of long documents: also measure loss by token position")
    parser.add_argument("--position-length", type=int, default=4096, help="tokens per document window")
    parser.add_argument("--position-documents", type=int, default=64, help="documents to average over")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from palimpsa.eval.loading import load_model_and_tokenizer

    if not args.tasks and not args.position_loss_data:
        raise ValueError("nothing to do: give --tasks and/or --position-loss-data")
    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.device, args.dtype)
    written = {}
    if args.tasks:
        from palimpsa.eval.harness import evaluate_with_harness
        from palimpsa.eval.report import markdown_summary, write_report

        batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
        limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
        results = evaluate_with_harness(model, tokenizer, args.tasks, include_path=args.include_path,
                                        num_fewshot=args.num_fewshot, limit=limit, batch_size=batch_size,
                                        max_length=args.max_length)
        written["lm_eval"] = write_report(results, args.out)
        print(markdown_summary(results))
    if args.position_loss_data:
        from palimpsa.eval.position_loss import per_position_loss, write_position_loss
        from palimpsa.train.data import DocumentSource, make_encoder

        encode = make_encoder(tokenizer, append_eos=False)
        documents = (encode(text) for text in DocumentSource(args.position_loss_data).documents())
        result = per_position_loss(model, documents, args.position_length, max_documents=args.position_documents)
        written["position_loss"] = write_position_loss(result, args.out, label=args.model)
    print(json.dumps(written, indent=1))
    return 0
