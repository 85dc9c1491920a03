"""rdr-jax encode / index / retrieve / evaluate: the retrieval pipeline, one step per command."""

from __future__ import annotations

import json
import os
from pathlib import Path

ENCODE_HELP = """Encode a passages TSV (DPR layout: id, text, title) with a DPR context encoder into embedding
shards, data-parallel over all local devices. Resumable: rerunning the same command continues after the
last complete shard. Several jobs (hosts) can share a corpus with --process-index/--process-count.

examples:
  rdr-jax encode --model dpr-ctx_encoder-single-nq-base/ --passages psgs_w100.tsv --out emb/ --fp16
  rdr-jax encode --model all-MiniLM-L6-v2/ --passages passages.tsv --out emb/   # a BERT dir works too
  rdr-jax encode --model ctx/ --passages psgs_w100.tsv --out emb/ --process-index 3 --process-count 8"""

INDEX_HELP = """Build a FAISS index (flat = exact inner product, hnsw, ivfpq) from embedding shards.

examples:
  rdr-jax index --embeddings emb/ --out index/ --kind flat --passages psgs_w100.tsv
  rdr-jax index --embeddings emb/ --out index_hnsw/ --kind hnsw --hnsw-m 64"""

RETRIEVE_HELP = """Encode questions with a DPR question encoder, search the index, and write DPR's
retriever-results JSON (question, answers, ctxs with id/title/text/score/has_answer); prints top-k recall.

examples:
  rdr-jax retrieve --model q_encoder/ --index index/ --passages psgs_w100.tsv --qa nq-test.qa.csv \\
      --out nq-test.results.json --k 100"""

EVALUATE_HELP = """Evaluate retrieval: top-k answer recall from retriever-results JSON, or MRR@10 / nDCG@10 /
Recall@k from a TREC run file and qrels. Prints a table; --out writes JSON.

examples:
  rdr-jax evaluate --results nq-test.results.json --k 1 5 20 50 100
  rdr-jax evaluate --run run.trec --qrels qrels.dev.tsv --measures MRR@10 nDCG@10 R@1000"""


def _add_model_runtime(p, *, max_length: int, batch_size: int) -> None:
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"rows per step (default {batch_size})")
    p.add_argument("--max-length", type=int, default=max_length, help=f"max tokens (default {max_length})")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (bfloat16 on accelerators)")


def _dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def load_encoder(model_dir, cls_name: str, dtype: str):
    """A DPR encoder from a DPR or plain BERT checkpoint, with its tokenizer."""
    from rdr_jax.convert.hf_io import resolve_model_dir
    from rdr_jax.data.tokenization import load_tokenizer
    from rdr_jax.models import DPRContextEncoder, DPRQuestionEncoder

    model_dir = resolve_model_dir(model_dir)
    cls = {"ctx": DPRContextEncoder, "question": DPRQuestionEncoder}[cls_name]
    return cls.from_pretrained(model_dir, dtype=_dtype(dtype)), load_tokenizer(model_dir)


def count_passages(path: Path) -> int | None:
    """Line count for the progress bar's total, for files small enough to scan quickly."""
    if path.suffix == ".gz" or path.stat().st_size > 2 << 30:
        return None
    with open(path, "rb") as f:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b""))
    with open(path, encoding="utf-8") as f:
        header = f.readline().lower().startswith("id\t")
    return lines - int(header)


# ---- encode -------------------------------------------------------------------------------------------------

def add_encode_arguments(p):
    p.add_argument("--model", required=True, help="DPR context encoder (or BERT) checkpoint directory")
    p.add_argument("--passages", required=True, help="passages TSV: id<TAB>text<TAB>title (header optional)")
    p.add_argument("--out", required=True, help="output directory for embedding shards")
    p.add_argument("--shard-size", type=int, default=50_000, help="passages per shard file (default 50000)")
    p.add_argument("--fp16", action="store_true", help="store embeddings as float16 (half the disk)")
    p.add_argument("--process-index", type=int, default=0,
                   help="split the corpus over independent jobs: this job's index (default 0)")
    p.add_argument("--process-count", type=int, default=1,
                   help="number of jobs sharing the corpus; each encodes every N-th shard (default 1)")
    _add_model_runtime(p, max_length=256, batch_size=128)


def run_encode(args) -> int:
    from rdr_jax.data.readers import read_dpr_passages
    from rdr_jax.retrieval.encode import Encoder, encode_corpus

    passages = Path(args.passages)
    if not passages.is_file():
        raise FileNotFoundError(f"--passages {passages}: no such file")
    model, tokenizer = load_encoder(args.model, "ctx", args.dtype)
    out = encode_corpus(Encoder(model, args.batch_size), tokenizer, read_dpr_passages(passages), args.out,
                        max_length=args.max_length, shard_size=args.shard_size, fp16=args.fp16,
                        total=count_passages(passages), model_name=str(args.model),
                        shard_index=args.process_index, shard_count=args.process_count)
    meta = json.loads((out / "meta.json").read_text())
    if not meta.get("complete"):
        print(f"encoded this job's shards into {out}; the encoding completes when every job has finished")
        return 0
    print(f"encoded {meta['num_passages']} passages (dim {meta['dim']}) into {out}")
    return 0


# ---- index --------------------------------------------------------------------------------------------------

def add_index_arguments(p):
    p.add_argument("--embeddings", required=True, help="directory written by `rdr-jax encode`")
    p.add_argument("--out", required=True, help="output index directory")
    p.add_argument("--kind", choices=("flat", "hnsw", "ivfpq"), default="flat",
                   help="flat: exact inner product; hnsw: graph; ivfpq: compressed (default flat)")
    p.add_argument("--passages", default=None, help="passages TSV to check the id mapping against")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node (default 32)")
    p.add_argument("--nlist", type=int, default=1024, help="IVF lists (default 1024)")
    p.add_argument("--pq-m", type=int, default=16, help="PQ sub-quantizers (default 16)")


def run_index(args) -> int:
    from rdr_jax.data.readers import read_dpr_passages
    from rdr_jax.retrieval.index import PassageIndex

    options = {"flat": {}, "hnsw": {"hnsw_m": args.hnsw_m}, "ivfpq": {"nlist": args.nlist, "pq_m": args.pq_m}}
    index = PassageIndex.build(args.embeddings, args.kind, **options[args.kind])
    if args.passages:
        index.check_against_corpus((p["id"] for p in read_dpr_passages(args.passages)), source=args.passages)
    index.save(args.out)
    print(f"indexed {len(index.passage_ids)} passages ({args.kind}) into {args.out}")
    return 0


# ---- retrieve -----------------------------------------------------------------------------------------------

def add_retrieve_arguments(p):
    p.add_argument("--model", required=True, help="DPR question encoder (or BERT) checkpoint directory")
    p.add_argument("--index", required=True, help="directory written by `rdr-jax index`")
    p.add_argument("--passages", required=True, help="the passages TSV the index was built from")
    p.add_argument("--qa", required=True, help="questions: DPR qa CSV/TSV (question<TAB>[answers]) or JSONL")
    p.add_argument("--out", required=True, help="output retriever-results JSON")
    p.add_argument("--k", type=int, default=100, help="passages per question (default 100)")
    p.add_argument("--match", choices=("string", "regex"), default="string",
                   help="has_answer rule: string (NQ, TriviaQA) or regex (CuratedTREC)")
    _add_model_runtime(p, max_length=64, batch_size=128)


def run_retrieve(args) -> int:
    from rdr_jax.data.readers import read_dpr_passages, read_qa
    from rdr_jax.retrieval.encode import Encoder, encode_texts
    from rdr_jax.retrieval.index import PassageIndex
    from rdr_jax.retrieval.metrics import format_results_table
    from rdr_jax.retrieval.retrieve import recall_of_results, retrieve, write_results

    questions = list(read_qa(args.qa))
    if not questions:
        raise ValueError(f"--qa {args.qa}: no questions")
    index = PassageIndex.load(args.index)
    index.check_against_corpus((p["id"] for p in read_dpr_passages(args.passages)), source=args.passages)
    model, tokenizer = load_encoder(args.model, "question", args.dtype)
    embeddings = encode_texts(Encoder(model, args.batch_size), tokenizer, [q["question"] for q in questions],
                              max_length=args.max_length, as_questions=True, desc="encoding questions")
    results = retrieve(embeddings, questions, index, read_dpr_passages(args.passages), args.k, args.match)
    write_results(args.out, results)
    ks = [k for k in (1, 5, 20, 50, 100) if k <= args.k]
    print(format_results_table({Path(args.qa).name: recall_of_results(results, ks)}))
    print(f"wrote {args.out}")
    return 0


# ---- evaluate -----------------------------------------------------------------------------------------------

def add_evaluate_arguments(p):
    p.add_argument("--results", help="retriever-results JSON (DPR layout) -> top-k answer recall")
    p.add_argument("--run", help="TREC run file (qid Q0 docid rank score tag)")
    p.add_argument("--qrels", help="TREC qrels (qid 0 docid rel) for --run")
    p.add_argument("--k", type=int, nargs="+", default=[1, 5, 20, 50, 100], help="k values for answer recall")
    p.add_argument("--measures", nargs="+", default=["MRR@10", "nDCG@10", "R@100"], help="IR measures for --run")
    p.add_argument("--out", help="write the numbers as JSON here")


def run_evaluate(args) -> int:
    from rdr_jax.data.readers import read_retriever_results
    from rdr_jax.retrieval.metrics import (evaluate_run, format_results_table, read_qrels, read_trec_run,
                                           top_k_answer_recall, write_results_json)

    if bool(args.results) == bool(args.run):
        raise ValueError("give either --results (answer recall) or --run with --qrels (IR measures)")
    if args.results:
        hits = [[c["has_answer"] for c in r["ctxs"]] for r in read_retriever_results(args.results)]
        table = {Path(args.results).name: top_k_answer_recall(hits, args.k)}
    else:
        if not args.qrels:
            raise ValueError("--run needs --qrels")
        table = {Path(args.run).name: evaluate_run(read_qrels(args.qrels), read_trec_run(args.run), args.measures)}
    print(format_results_table(table))
    if args.out:
        write_results_json(args.out, table)
    return 0
