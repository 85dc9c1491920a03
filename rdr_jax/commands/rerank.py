"""rdr-jax rerank: re-rank a first-stage run (TREC file) or DPR retriever results with a cross-encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rdr_jax.commands.args import (add_distributed_arguments, check_architecture, check_max_length,
                                   check_room_for_text, compute_dtype, input_file, model_config, nonnegative_int,
                                   output_file, positive_int, start_distributed)

RERANK_HELP = """Re-rank the top --depth passages of each query with a cross-encoder (BERT or DeBERTa-v2/v3
sequence classifier, e.g. cross-encoder/ms-marco-MiniLM-L-6-v2, xpmir/cross-encoder-DeBERTav3-DistillRankNET).
Input: a TREC run with MS MARCO queries and a passages TSV, writing a TREC run (MRR@10 / nDCG@10 before and
after with --qrels); or DPR retriever-results JSON, writing the same layout re-ordered (top-k answer recall
before and after). Passages below --depth keep their first-stage order after the re-ranked ones. Pairs are
tokenised on a thread pool ahead of the devices and sorted by length into batches padded to multiples of 32
tokens. Started on every host (--coordinator ... or --distributed auto) the processes split the queries and
process 0 writes the output.

examples:
  rdr-jax rerank --model ce-deberta-v3/ --run bm25.dev.trec --queries queries.dev.tsv \\
      --passages collection.tsv --out reranked.trec --depth 100 --qrels qrels.dev.tsv
  rdr-jax rerank --model ce-minilm/ --results nq-test.results.json --out nq-test.reranked.json"""

CROSS_ENCODERS = ("BertForSequenceClassification", "DebertaV2ForSequenceClassification")


def add_rerank_arguments(p):
    p.add_argument("--model", required=True, help="cross-encoder checkpoint directory (HF or native)")
    p.add_argument("--run", help="first-stage TREC run (qid Q0 docid rank score tag)")
    p.add_argument("--queries", help="queries TSV (qid<TAB>text) for --run")
    p.add_argument("--passages", help="passages for --run: MS MARCO collection.tsv (pid<TAB>text) or DPR "
                                      "psgs.tsv (id<TAB>text<TAB>title)")
    p.add_argument("--results", help="retriever results, DPR JSON or `rdr-jax retrieve`'s JSONL (instead of "
                                     "--run/--queries; --passages then gives the text of JSONL written without it)")
    p.add_argument("--out", required=True, help="output: TREC run for --run, results JSON for --results")
    p.add_argument("--depth", type=positive_int, default=100, help="passages re-ranked per query (default 100)")
    p.add_argument("--qrels", help="TREC qrels: print MRR@10 / nDCG@10 before and after (with --run)")
    p.add_argument("--k", type=positive_int, nargs="+", default=[1, 5, 20, 50, 100],
                   help="k values of the answer recall printed for --results")
    p.add_argument("--label-index", type=nonnegative_int, default=None,
                   help="logit that scores relevance (default: 0 for one logit, 1 for two labels)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="pairs per step (default 64)")
    p.add_argument("--max-length", type=positive_int, default=512, help="max tokens per pair (default 512)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype; auto (default): bfloat16 on GPU/TPU, float32 on CPU")
    p.add_argument("--tag", default="rdr_jax_rerank", help="run tag written in the TREC file")
    add_distributed_arguments(p, "inference")


def load_scorer(args):
    """The cross-encoder and its tokenizer as a CrossEncoderScorer; refuses other model classes."""
    from rdr_jax.data.tokenization import load_tokenizer
    from rdr_jax.models import from_pretrained
    from rdr_jax.models.base import model_class_for_config
    from rdr_jax.retrieval.rerank import CrossEncoderScorer

    model_dir, config = model_config("--model", args.model)
    cls = model_class_for_config(config, source=str(model_dir / "config.json"))
    check_architecture("--model", model_dir, {"architectures": [cls.__name__]}, CROSS_ENCODERS, "a cross-encoder")
    check_max_length("--model", args.max_length, model_dir, config)
    tokenizer = load_tokenizer(model_dir)
    check_room_for_text(args.max_length, tokenizer, pair=True)
    model = from_pretrained(model_dir, dtype=compute_dtype(args.dtype), allow_fresh_heads=False)
    return CrossEncoderScorer(model, tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                              label_index=args.label_index)


def _require_file(option: str, path) -> Path:
    return input_file(option, path)


def passages_reader(path: Path):
    """read_dpr_passages for a 3-column DPR TSV (header optional), read_msmarco_collection for pid<TAB>text."""
    from rdr_jax.data.readers import open_text, read_dpr_passages, read_msmarco_collection

    with open_text(path) as f:
        first = next((line for line in f if line.strip()), "")
    if not first:
        raise ValueError(f"--passages {path}: empty file")
    columns = len(first.rstrip("\r\n").split("\t"))
    if columns == 2:
        return read_msmarco_collection(path)
    if columns == 3:
        return read_dpr_passages(path)
    raise ValueError(f"--passages {path}: expected pid<TAB>text (MS MARCO) or id<TAB>text<TAB>title (DPR), "
                     f"found {columns} tab-separated fields on the first line")


def _rerank_trec(args) -> int:
    import jax

    from rdr_jax.data.files import select_by_id
    from rdr_jax.data.readers import read_msmarco_queries
    from rdr_jax.retrieval.metrics import (evaluate_run, format_results_table, rank_documents, read_qrels,
                                           read_trec_run, write_trec_run)
    from rdr_jax.retrieval.rerank import rerank_run

    if not (args.queries and args.passages):
        raise ValueError("--run needs --queries and --passages")
    run = read_trec_run(_require_file("--run", args.run))
    if not run:
        raise ValueError(f"--run {args.run}: no rows")
    queries_path, passages_path = _require_file("--queries", args.queries), _require_file("--passages", args.passages)
    qrels = read_qrels(_require_file("--qrels", args.qrels)) if args.qrels else None
    queries = select_by_id(read_msmarco_queries(queries_path), set(run), "queries", f"--queries {queries_path}")
    wanted = {docid for scores in run.values() for docid in rank_documents(scores)[:args.depth]}
    passages = select_by_id(passages_reader(passages_path), wanted, "passages", f"--passages {passages_path}")
    scorer = load_scorer(args)
    reranked = rerank_run(scorer, {qid: q["text"] for qid, q in queries.items()}, passages, run, args.depth)
    if jax.process_index() != 0:   # process 0 writes the one output
        return 0
    write_trec_run(args.out, reranked, tag=args.tag)
    if qrels is not None:
        measures = ("MRR@10", "nDCG@10")
        print(format_results_table({"first stage": evaluate_run(qrels, run, measures),
                                    "re-ranked": evaluate_run(qrels, reranked, measures)}))
    print(f"re-ranked {len(run)} queries (top {args.depth}); wrote {args.out}")
    return 0


def _rerank_results(args) -> int:
    import jax

    from rdr_jax.retrieval.metrics import answer_recall_from_ranks, format_results_table
    from rdr_jax.retrieval.rerank import iter_reranked_results
    from rdr_jax.retrieval.results_io import iter_results
    from rdr_jax.retrieval.retrieve import write_results

    passages = _require_file("--passages", args.passages) if args.passages else None
    results_path = _require_file("--results", args.results)
    first = next(iter_results(results_path, passages), None)
    if first is None:
        raise ValueError(f"--results {args.results}: no questions")
    scorer = load_scorer(args)
    before, after, depth = [], [], [0]   # first answer rank per question: all the recall needs

    def first_hit(ctxs) -> int:
        return next((i for i, c in enumerate(ctxs) if c.get("has_answer")), -1)

    def read():   # streamed: one round of questions in memory, never the whole file
        for r in iter_results(results_path, passages):
            before.append(first_hit(r["ctxs"]))
            depth[0] = max(depth[0], len(r["ctxs"]))
            yield r

    def reranked():
        for r in iter_reranked_results(scorer, read(), args.depth):
            after.append(first_hit(r["ctxs"]))
            yield r

    if jax.process_index() != 0:   # process 0 writes the one output; the others score their blocks
        for _ in reranked():
            pass
        return 0
    write_results(args.out, reranked())
    ks = [k for k in args.k if k <= depth[0]] or [depth[0]]
    if depth[0]:
        print(format_results_table({"retriever": answer_recall_from_ranks(np.array(before[:len(after)]), ks),
                                    "re-ranked": answer_recall_from_ranks(np.array(after), ks)}))
    print(f"re-ranked {len(after)} questions (top {args.depth}); wrote {args.out}")
    return 0


def run_rerank(args) -> int:
    if bool(args.results) == bool(args.run):
        raise ValueError("give either --run (with --queries and --passages) or --results")
    if args.depth < 1:
        raise ValueError(f"--depth must be >= 1, got {args.depth}")
    output_file("--out", args.out)
    start_distributed(args)
    return _rerank_results(args) if args.results else _rerank_trec(args)
