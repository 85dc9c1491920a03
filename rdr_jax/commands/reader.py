"""rdr-jax read / teacher-scores: DPR reader inference over retriever results."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rdr_jax.commands.args import (add_distributed_arguments, check_architecture, check_max_length,
                                   check_room_for_text, compute_dtype, input_file, model_config, output_dir,
                                   output_file, positive_int, start_distributed)

READ_HELP = """Run a DPR reader over retriever results: the best span of the most relevant passages per question
(DPR's span selection), written as JSONL, with reader EM printed.

Questions are split over this process's devices (and over processes when started on every host with
--coordinator/--num-processes/--process-id or --distributed auto); process 0 writes the one output.

examples:
  rdr-jax read --model dpr-reader-single-nq-base/ --results nq-test.results.json --out answers.jsonl"""

TEACHER_HELP = """Score each question's retrieved passages with a DPR reader (relevance logit and best span score):
the teacher of RDR distillation. Writes a TFDS dataset (array_record) the training engine reads. Several questions
per step (--questions-per-step), tokenised in threads ahead of the device, best spans computed on the device;
started on every host (--coordinator ... or --distributed auto) the processes split the questions and process 0
writes the dataset.

examples:
  rdr-jax teacher-scores --model reader/ --results nq-train.results.json --out data/ --name rdr_teacher_nq \\
      --split train --top-k 100"""


def _add_reader_arguments(p):
    p.add_argument("--model", required=True, help="DPR reader checkpoint directory (HF or native)")
    p.add_argument("--results", required=True,
                   help="retriever results: DPR JSON, or the JSONL `rdr-jax retrieve` writes")
    p.add_argument("--passages", default=None,
                   help="passages TSV or corpus store: the text of JSONL results written without it")
    p.add_argument("--max-length", type=positive_int, default=256, help="reader input length (default 256)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N questions")
    p.add_argument("--questions-per-step", type=positive_int, default=8,
                   help="questions per forward pass (rows = this x passages per question; default 8)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype; auto (default): bfloat16 on GPU/TPU, float32 on CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_distributed_arguments(p, "inference")


def add_read_arguments(p):
    _add_reader_arguments(p)
    p.add_argument("--out", required=True, help="output JSONL of answers")
    p.add_argument("--passages-per-question", type=positive_int, default=50,
                   help="top passages the reader sees (default 50)")
    p.add_argument("--max-answer-length", type=positive_int, default=10,
                   help="max span length in tokens (default 10)")


def add_teacher_arguments(p):
    _add_reader_arguments(p)
    p.add_argument("--out", required=True, help="TFDS data directory to write into")
    p.add_argument("--name", default="rdr_teacher", help="dataset name (default rdr_teacher)")
    p.add_argument("--split", default="train", help="split name (default train)")
    p.add_argument("--top-k", type=positive_int, default=100, help="passages scored per question (default 100)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset OUT/NAME (all its splits); without it that is an error")


def _with_passages(results, source):
    for i, r in enumerate(results):
        if not r["ctxs"]:
            raise ValueError(f"--results {source}: question {i + 1} ({r['question']!r:.60}) has no retrieved passages")
        yield r


def _load(args, passages_per_question: int):
    import itertools

    from rdr_jax.data.tokenization import load_tokenizer
    from rdr_jax.models import DPRReader
    from rdr_jax.retrieval.reader import ReaderRunner
    from rdr_jax.retrieval.results_io import iter_results

    results_path = input_file("--results", args.results)
    model_dir, config = model_config("--model", args.model)
    check_architecture("--model", model_dir, config, ("DPRReader",), "a DPR reader")
    check_max_length("--model", args.max_length, model_dir, config)
    corpus = input_file("--passages", args.passages) if args.passages else None
    # streamed: the questions are read as the runner gets to them, never all at once
    stream = itertools.islice(iter_results(results_path, corpus), args.limit)
    first = next(stream, None)
    if first is None:
        raise ValueError(f"--results {args.results}: no questions")
    results = _with_passages(itertools.chain([first], stream), args.results)
    tokenizer = load_tokenizer(model_dir)
    check_room_for_text(args.max_length, tokenizer, pair=True)
    model = DPRReader.from_pretrained(model_dir, dtype=compute_dtype(args.dtype), allow_fresh_heads=False)
    runner = ReaderRunner(model, tokenizer, passages_per_question=passages_per_question, max_length=args.max_length,
                          max_answer_length=getattr(args, "max_answer_length", 10),
                          questions_per_step=args.questions_per_step)
    return runner, results


def run_read(args) -> int:
    import jax

    from rdr_jax.retrieval.metrics import format_results_table
    from rdr_jax.retrieval.reader import read_answers

    out = output_file("--out", args.out)
    start_distributed(args)
    runner, results = _load(args, args.passages_per_question)
    rows = list(read_answers(runner, results, progress=not args.no_progress))
    if jax.process_index() != 0:   # process 0 writes the one output
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, out)
    judged = [r["exact_match"] for r in rows if r["exact_match"] is not None]
    if judged:
        print(format_results_table({Path(args.results).name: {"EM": 100.0 * sum(judged) / len(judged)}}))
    print(f"wrote {len(rows)} answers to {out}")
    return 0


def run_teacher_scores(args) -> int:
    import jax

    from rdr_jax.data.tfds_format import DEFAULT_VERSION, _DATASET_NAME, write_dataset
    from rdr_jax.retrieval.reader import teacher_score_rows, teacher_scores_features

    if not _DATASET_NAME.fullmatch(args.name):
        raise ValueError(f"--name {args.name!r}: not a TFDS dataset name (letters, digits and underscores, "
                         "starting with a letter)")
    out = output_dir("--out", args.out)
    dataset = out / args.name / DEFAULT_VERSION
    if dataset.exists() and not args.overwrite:
        raise ValueError(f"--out {out}: dataset {dataset} already exists; pass --overwrite to replace it "
                         "(or another --out / --name)")
    start_distributed(args)
    runner, results = _load(args, args.top_k)
    rows = teacher_score_rows(runner, results, progress=not args.no_progress)
    if jax.process_index() != 0:   # process 0 writes the one output
        for _ in rows:   # joins every step's gather; yields nothing here
            pass
        return 0
    written = [0]

    def counted():
        for row in rows:
            written[0] += 1
            yield row

    path = write_dataset(out, args.name, teacher_scores_features(), {args.split: counted()},
                         overwrite=args.overwrite)
    print(f"wrote teacher scores for {written[0]} questions to {path}")
    return 0
