"""rdr-jax read / teacher-scores: DPR reader inference over retriever results."""

from __future__ import annotations

import json
from pathlib import Path

READ_HELP = """Run a DPR reader over retriever results: the best span of the most relevant passages per question
(DPR's span selection), written as JSONL, with reader EM printed.

examples:
  rdr-jax read --model dpr-reader-single-nq-base/ --results nq-test.results.json --out answers.jsonl"""

TEACHER_HELP = """Score each question's retrieved passages with a DPR reader (relevance logit and best span score):
the teacher of RDR distillation. Writes a TFDS dataset (array_record) the training engine reads.

examples:
  rdr-jax teacher-scores --model reader/ --results nq-train.results.json --out data/ --name rdr_teacher_nq \\
      --split train --top-k 100"""


def _add_reader_arguments(p):
    p.add_argument("--model", required=True, help="DPR reader checkpoint directory (HF or native)")
    p.add_argument("--results", required=True, help="retriever-results JSON (DPR layout)")
    p.add_argument("--max-length", type=int, default=256, help="reader input length (default 256)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")


def add_read_arguments(p):
    _add_reader_arguments(p)
    p.add_argument("--out", required=True, help="output JSONL of answers")
    p.add_argument("--passages-per-question", type=int, default=50,
                   help="top passages the reader sees (default 50)")
    p.add_argument("--max-answer-length", type=int, default=10, help="max span length in tokens (default 10)")


def add_teacher_arguments(p):
    _add_reader_arguments(p)
    p.add_argument("--out", required=True, help="TFDS data directory to write into")
    p.add_argument("--name", default="rdr_teacher", help="dataset name (default rdr_teacher)")
    p.add_argument("--split", default="train", help="split name (default train)")
    p.add_argument("--top-k", type=int, default=100, help="passages scored per question (default 100)")


def _load(args, passages: int):
    import itertools

    from rdr_jax.data.readers import read_retriever_results
    from rdr_jax.data.tokenization import load_tokenizer
    from rdr_jax.models import DPRReader
    from rdr_jax.retrieval.reader import ReaderRunner

    model = DPRReader.from_pretrained(args.model)
    runner = ReaderRunner(model, load_tokenizer(args.model), passages_per_question=passages,
                          max_length=args.max_length,
                          max_answer_length=getattr(args, "max_answer_length", 10))
    results = list(itertools.islice(read_retriever_results(args.results), args.limit))
    if not results:
        raise ValueError(f"--results {args.results}: no questions")
    return runner, results


def run_read(args) -> int:
    from rdr_jax.retrieval.metrics import format_results_table
    from rdr_jax.retrieval.reader import read_answers

    runner, results = _load(args, args.passages_per_question)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = list(read_answers(runner, results, total=len(results)))
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    judged = [r["exact_match"] for r in rows if r["exact_match"] is not None]
    if judged:
        print(format_results_table({Path(args.results).name: {"EM": 100.0 * sum(judged) / len(judged)}}))
    print(f"wrote {len(rows)} answers to {out}")
    return 0


def run_teacher_scores(args) -> int:
    from rdr_jax.data.tfds_format import write_dataset
    from rdr_jax.retrieval.reader import teacher_score_rows, teacher_scores_features

    runner, results = _load(args, args.top_k)
    path = write_dataset(args.out, args.name, teacher_scores_features(),
                         {args.split: teacher_score_rows(runner, results, total=len(results))})
    print(f"wrote teacher scores for {len(results)} questions to {path}")
    return 0
