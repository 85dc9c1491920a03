"""rdr-jax encode / index / retrieve / evaluate: the retrieval pipeline, one step per command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rdr_jax.commands.args import (add_distributed_arguments, check_architecture, check_max_length,
                                   check_room_for_text, compute_dtype, input_file, model_config, nonnegative_int,
                                   output_dir, output_file, positive_int, start_distributed)

ENCODE_HELP = """Encode a passages TSV (DPR layout: id, text, title), or a corpus store made by `rdr-jax tokenize`,
with a DPR context encoder into embedding shards, data-parallel over this process's devices (rows sorted by
length and padded to multiples of 32 tokens; tokenisation on all cores ahead of the devices). Resumable:
rerunning the same command continues after the last complete shard. On several hosts, start the same command
on each with --coordinator/--num-processes/--process-id (or --distributed auto): each process encodes its
own shards (reading only its rows of a store) and process 0 marks the encoding complete when all are done.
Independent jobs can share a corpus with --process-index/--process-count instead.

examples:
  rdr-jax tokenize --passages psgs_w100.tsv --tokenizer ctx/ --out psgs_w100.store/   # once
  rdr-jax encode --model ctx/ --passages psgs_w100.store/ --out emb/ --fp16
  rdr-jax encode --model all-MiniLM-L6-v2/ --passages passages.tsv --out emb/   # a BERT dir works too
  rdr-jax encode --model ctx/ --passages psgs_w100.store/ --out emb/ --distributed auto   # every host of a slice
  rdr-jax encode --model ctx/ --passages psgs_w100.tsv --out emb/ --process-index 3 --process-count 8"""

INDEX_HELP = """Build a FAISS index (flat = exact inner product, hnsw, ivfpq) from embedding shards, for CPU-only
hosts and approximate search (`rdr-jax retrieve --index` also takes the encoding directory itself and searches
it exactly on the devices, without this step). Runs without rdr-jax's malloc settings (rdr_jax/runtime.py),
which would double the peak memory of the build.

examples:
  rdr-jax index --embeddings emb/ --out index/ --kind flat --passages psgs_w100.tsv
  rdr-jax index --embeddings emb/ --out index_hnsw/ --kind hnsw --hnsw-m 64
  rdr-jax index --embeddings emb/ --out index_ivf/ --kind ivfpq   # nlist ~4 sqrt(N), random training sample"""

RETRIEVE_HELP = """Encode questions with a DPR question encoder, search the passages, and write the results
streaming, one question at a time: JSONL (--out X.jsonl: qid, question, answers, passage_ids, scores,
has_answer) or DPR's retriever-results JSON (--out X.json: question, answers, ctxs with
id/title/text/score/has_answer), optionally a TREC run (--trec-out); prints top-k answer recall.

--index takes an encoding directory (`rdr-jax encode`): exact inner-product search on the local devices
(GPU/TPU/CPU), the vectors in their storage dtype split over devices and processes; or a FAISS index
directory (`rdr-jax index`), searched on the CPU by process 0.

examples:
  rdr-jax retrieve --model q_encoder/ --index emb/ --passages psgs_w100.tsv --qa nq-test.qa.csv \\
      --out nq-test.results.jsonl --trec-out nq-test.trec --k 100
  rdr-jax retrieve --model q_encoder/ --index index/ --passages psgs_w100.tsv --qa nq-test.qa.csv \\
      --out nq-test.results.json --k 100
  rdr-jax retrieve ... --index emb/ --distributed auto       # every host of a TPU slice holds 1/N of emb/"""

EVALUATE_HELP = """Evaluate retrieval: top-k answer recall from retriever results (JSONL or DPR JSON, both
read streaming), or MRR@10 / nDCG@10 / Recall@k from a TREC run file and qrels. Prints a table; --out writes JSON.

examples:
  rdr-jax evaluate --results nq-test.results.json --k 1 5 20 50 100
  rdr-jax evaluate --run run.trec --qrels qrels.dev.tsv --measures MRR@10 nDCG@10 R@1000"""


def _add_model_runtime(p, *, max_length: int, batch_size: int) -> None:
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help=f"rows per step (default {batch_size})")
    p.add_argument("--max-length", type=positive_int, default=max_length,
                   help=f"max tokens (default {max_length}; at most the model's max_position_embeddings)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype; auto (default): bfloat16 on GPU/TPU, float32 on CPU")


ENCODERS = ("DPRContextEncoder", "DPRQuestionEncoder", "BertModel")


def load_encoder(model_dir, cls_name: str, dtype: str, max_length: int | None = None):
    """A DPR encoder from a DPR or plain BERT checkpoint, with its tokenizer. Refuses another family or
    architecture, a directory without its tokenizer, and a ``max_length`` the model cannot take, before the
    weights are read."""
    from rdr_jax.data.tokenization import load_tokenizer
    from rdr_jax.models import DPRContextEncoder, DPRQuestionEncoder

    model_dir, config = model_config("--model", model_dir)
    check_architecture("--model", model_dir, config, ENCODERS, "a DPR encoder")
    if max_length is not None:
        check_max_length("--model", max_length, model_dir, config)
    tokenizer = load_tokenizer(model_dir)
    if max_length is not None:
        check_room_for_text(max_length, tokenizer, pair=cls_name == "ctx")
    cls = {"ctx": DPRContextEncoder, "question": DPRQuestionEncoder}[cls_name]
    return cls.from_pretrained(model_dir, dtype=compute_dtype(dtype), allow_fresh_heads=False), tokenizer


def embedding_dim(model) -> int:
    return getattr(model.config, "projection_dim", 0) or model.config.hidden_size


# ---- encode -------------------------------------------------------------------------------------------------

def add_encode_arguments(p):
    p.add_argument("--model", required=True, help="DPR context encoder (or BERT) checkpoint directory")
    p.add_argument("--passages", required=True,
                   help="passages TSV (id<TAB>text<TAB>title, header optional) or a store dir from `rdr-jax tokenize`")
    p.add_argument("--out", required=True, help="output directory for embedding shards")
    p.add_argument("--shard-size", type=positive_int, default=50_000, help="passages per shard file (default 50000)")
    p.add_argument("--fp16", action="store_true", help="store embeddings as float16 (half the disk)")
    p.add_argument("--process-index", type=nonnegative_int, default=0,
                   help="split the corpus over independent jobs: this job's index (default 0)")
    p.add_argument("--process-count", type=positive_int, default=1,
                   help="number of jobs sharing the corpus; each encodes every N-th shard (default 1)")
    _add_model_runtime(p, max_length=256, batch_size=128)
    add_distributed_arguments(p, "encoding")


def _encode_source(option: str, path: str):
    """(CorpusStore or TSV path, corpus fingerprint, row count or None) of ``--passages``."""
    from rdr_jax.data.corpus_store import CorpusStore, corpus_fingerprint

    source = Path(path)
    if source.is_dir():
        store = CorpusStore(source)
        return store, store.source, len(store)
    source = input_file(option, source)
    return source, corpus_fingerprint(source), None


def run_encode(args) -> int:
    import math

    from tqdm import tqdm

    from rdr_jax.data.readers import read_dpr_passages
    from rdr_jax.retrieval.encode import Encoder, check_encoding_dir, encode_corpus, finish_encoding
    from rdr_jax.training import distributed

    if args.process_index >= args.process_count:
        raise ValueError(f"--process-index {args.process_index} must be below --process-count {args.process_count}")
    source, corpus, total = _encode_source("--passages", args.passages)
    out = output_dir("--out", args.out, marker="meta.json", what="an encoding directory")
    multi = start_distributed(args)
    if multi and args.process_count > 1:
        raise ValueError("--process-index/--process-count split independent jobs; under --coordinator or "
                         "--distributed auto the processes split the corpus themselves: give one or the other")
    import jax

    index, count = (jax.process_index(), jax.process_count()) if multi else (args.process_index, args.process_count)
    check_encoding_dir(out, model_name=str(args.model), max_length=args.max_length, shard_size=args.shard_size,
                       fp16=args.fp16, shard_count=1 if multi else count, corpus=corpus)
    if total is None:
        # One reading pass before any work: a malformed row, bad UTF-8 or a duplicate id at row 20M fails now,
        # not hours into the encoding (and the count is the progress bar's total).
        total = sum(1 for _ in tqdm(read_dpr_passages(source), desc="checking passages", unit=" rows",
                                    mininterval=2.0, delay=2.0))
        if total == 0:
            raise ValueError(f"--passages {source}: no passages (empty or header-only file)")
        source = read_dpr_passages(source, check_duplicates=False)
    model, tokenizer = load_encoder(args.model, "ctx", args.dtype, args.max_length)
    encoder = Encoder(model, args.batch_size)
    encode_corpus(encoder, tokenizer, source, out, max_length=args.max_length, shard_size=args.shard_size,
                  fp16=args.fp16, total=total, model_name=str(args.model), shard_index=index, shard_count=count,
                  corpus=corpus, finalize=not multi)
    stats = encoder.runner.stats
    print(f"[encode] process {index}/{count}: {stats.rows} passages in {stats.batches} batches, "
          f"{stats.padding_share:.1%} padding, {encoder.runner.compilations} compiled shapes")
    if multi:
        distributed.barrier("rdr_jax:encode-done", timeout_s=24 * 3600)  # ranks may finish hours apart
        if index == 0:
            finish_encoding(out, math.ceil(total / args.shard_size))
        distributed.barrier("rdr_jax:encode-complete")
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
    p.add_argument("--hnsw-m", type=positive_int, default=32, help="HNSW neighbours per node (default 32)")
    p.add_argument("--nlist", type=positive_int, default=None,
                   help="IVF lists (default ~4 sqrt(passages), a power of two, at most passages/39)")
    p.add_argument("--train-size", type=positive_int, default=None,
                   help="IVF-PQ training vectors, drawn at random from the whole encoding (default 64 per list, "
                        "at least 65536)")
    p.add_argument("--pq-m", type=positive_int, default=16, help="PQ sub-quantizers (default 16)")


def run_index(args) -> int:
    from rdr_jax.data.readers import read_dpr_passages
    from rdr_jax.retrieval.encode import complete_encoding_meta, encoded_ids
    from rdr_jax.retrieval.index import PassageIndex, check_ids_against_corpus

    embeddings = Path(args.embeddings)
    if not embeddings.is_dir():
        raise FileNotFoundError(f"--embeddings {embeddings}: no such directory")
    out = output_dir("--out", args.out, marker="index.json", what="an index directory")
    meta = complete_encoding_meta(embeddings)
    if args.kind == "ivfpq" and meta["dim"] % args.pq_m:
        raise ValueError(f"--pq-m {args.pq_m}: must divide the embedding dim {meta['dim']}")
    if args.kind == "ivfpq" and args.nlist is not None and args.nlist > meta["num_passages"]:
        raise ValueError(f"--nlist {args.nlist}: more lists than the {meta['num_passages']} passages; lower --nlist")
    if args.passages:  # before building: an HNSW index of a large corpus takes hours
        check_ids_against_corpus(encoded_ids(embeddings), (p["id"] for p in read_dpr_passages(args.passages)),
                                 source=f"--passages {args.passages}", what="the encoding")
    options = {"flat": {}, "hnsw": {"hnsw_m": args.hnsw_m},
               "ivfpq": {"nlist": args.nlist, "pq_m": args.pq_m, "train_size": args.train_size}}
    index = PassageIndex.build(embeddings, args.kind, **options[args.kind])
    index.save(out)
    print(f"indexed {len(index.passage_ids)} passages ({args.kind}) into {out}")
    return 0


# ---- retrieve -----------------------------------------------------------------------------------------------

def add_retrieve_arguments(p):
    p.add_argument("--model", required=True, help="DPR question encoder (or BERT) checkpoint directory")
    p.add_argument("--index", required=True,
                   help="encoding directory (`rdr-jax encode`: exact search on the devices) or FAISS index "
                        "directory (`rdr-jax index`)")
    p.add_argument("--passages", required=True, help="the passages TSV the encoding/index was built from")
    p.add_argument("--qa", required=True, help="questions: DPR qa CSV/TSV (question<TAB>[answers]) or JSONL")
    p.add_argument("--out", required=True, help="results file: .jsonl -> JSONL, .json -> DPR retriever-results JSON")
    p.add_argument("--format", choices=("jsonl", "dpr"), default=None,
                   help="results layout (default: from --out's suffix, .json -> dpr, else jsonl)")
    p.add_argument("--text", action=argparse.BooleanOptionalAction, default=None,
                   help="write each passage's title and text (default: yes for dpr, no for jsonl; read by id "
                        "from --passages)")
    p.add_argument("--trec-out", default=None, help="also write a TREC run here (qid = question row, 0-based)")
    p.add_argument("--k", type=positive_int, default=100, help="passages per question (default 100)")
    p.add_argument("--match", choices=("string", "regex"), default="string",
                   help="has_answer rule: string (NQ, TriviaQA) or regex (CuratedTREC)")
    p.add_argument("--workers", type=nonnegative_int, default=None,
                   help="processes matching answers (default: the CPU count, at most 8; 0 or 1: in this process)")
    p.add_argument("--query-batch", type=positive_int, default=256,
                   help="questions per search step on the devices (default 256)")
    p.add_argument("--chunk-rows", type=positive_int, default=16384,
                   help="passages scored per matmul on a device (default 16384)")
    p.add_argument("--query-dtype", choices=("float32", "storage"), default="float32",
                   help="device search: float32 (exact, FAISS's numbers) or storage (questions cast to the "
                        "vectors' dtype: tensor cores, float32 accumulation)")
    _add_model_runtime(p, max_length=64, batch_size=128)
    add_distributed_arguments(p, "retrieval")


def run_retrieve(args) -> int:
    import os

    start_distributed(args)  # before anything touches the devices
    import jax

    from rdr_jax.data.readers import read_qa
    from rdr_jax.retrieval.device_search import DeviceSearch, is_encoding_dir, iter_encoded_ids
    from rdr_jax.retrieval.encode import Encoder, complete_encoding_meta, encode_texts
    from rdr_jax.retrieval.index import PassageIndex
    from rdr_jax.retrieval.metrics import answer_recall_from_ranks, format_results_table
    from rdr_jax.retrieval.results_io import PassageRows, write_results_stream

    out = output_file("--out", args.out)
    trec_out = output_file("--trec-out", args.trec_out)
    qa, passages = input_file("--qa", args.qa), input_file("--passages", args.passages)
    questions = list(read_qa(qa))
    if not questions:
        raise ValueError(f"--qa {qa}: no questions")
    index_dir = Path(args.index)
    if not index_dir.is_dir():
        raise FileNotFoundError(f"--index {index_dir}: no such directory")
    primary = jax.process_index() == 0
    source = f"--passages {passages}"
    if is_encoding_dir(index_dir):
        meta = complete_encoding_meta(index_dir)
        dim, count, what = meta["dim"], meta["num_passages"], "the encoding"
        expected, index = iter_encoded_ids(index_dir), None
    else:
        index = PassageIndex.load(index_dir)
        dim, count, what, expected = index.index.d, len(index.passage_ids), "the index", index.passage_ids
    model, tokenizer = load_encoder(args.model, "question", args.dtype, args.max_length)
    if embedding_dim(model) != dim:
        raise ValueError(f"--model {args.model}: embeddings of dim {embedding_dim(model)}, but --index "
                         f"{args.index} holds vectors of dim {dim}; use the question encoder paired "
                         "with the context encoder of the index")
    # Process 0 writes the results: it alone reads the TSV (row offsets, checked against the index's ids).
    rows = PassageRows.scan(passages, expected, count, source=source, what=what) if primary else None
    embeddings = encode_texts(Encoder(model, args.batch_size, devices=jax.local_devices()), tokenizer,
                              [q["question"] for q in questions], max_length=args.max_length, as_questions=True,
                              desc="encoding questions", progress=primary)
    if index is None:
        searcher = DeviceSearch(index_dir, chunk_rows=args.chunk_rows, query_batch=args.query_batch,
                                query_dtype=args.query_dtype, progress=primary)
        batches = searcher.iter_search(embeddings, args.k, progress=primary)
    elif primary:
        batches = index.search_rows(embeddings, args.k, progress=True)
    else:
        print(f"process {jax.process_index()}: a FAISS index is searched by process 0 alone; nothing to do here")
        return 0
    if not primary:
        for _ in batches:  # its share of every step's search; process 0 gathers and writes
            pass
        return 0
    workers = min(os.cpu_count() or 1, 8) if args.workers is None else args.workers
    first_hits = write_results_stream(batches, questions, rows, out, fmt=args.format, with_text=args.text,
                                      match_type=args.match, trec_out=trec_out, workers=workers)
    depth = min(args.k, count)
    ks = [k for k in (1, 5, 20, 50, 100) if k <= depth] or [depth]
    print(format_results_table({Path(args.qa).name: answer_recall_from_ranks(first_hits, ks)}))
    print(f"wrote {args.out}" + (f" and {args.trec_out}" if args.trec_out else ""))
    return 0


# ---- evaluate -----------------------------------------------------------------------------------------------

DEFAULT_KS = (1, 5, 20, 50, 100)


def add_evaluate_arguments(p):
    p.add_argument("--results", help="retriever results (JSONL or DPR JSON, streamed) -> top-k answer recall")
    p.add_argument("--run", help="TREC run file (qid Q0 docid rank score tag)")
    p.add_argument("--qrels", help="TREC qrels (qid 0 docid rel) for --run")
    p.add_argument("--k", type=positive_int, nargs="+", default=None,
                   help="k values for answer recall (default 1 5 20 50 100, those the results are deep enough "
                        "for); a k deeper than the results is left out with a warning")
    p.add_argument("--measures", nargs="+", default=["MRR@10", "nDCG@10", "R@100"], help="IR measures for --run")
    p.add_argument("--out", help="write the numbers as JSON here")


def usable_ks(requested, depth: int, *, explicit: bool) -> list[int]:
    """The k values a result list ``depth`` passages deep can report; a deeper k would count every question
    that has fewer passages as if the ranking went on (Top-100 = Top-20 on 20-deep results). Explicitly
    requested ones that are left out are named on stderr; none left is an error."""
    import sys

    ks = [k for k in requested if k <= depth]
    dropped = [k for k in requested if k > depth]
    if not ks:
        raise ValueError(f"--k {' '.join(map(str, requested))}: deeper than the results (at most {depth} "
                         "passages per question)")
    if dropped and explicit:
        print(f"warning: --k {' '.join(map(str, dropped))}: the results hold at most {depth} passages per "
              f"question; {', '.join(f'Top-{k}' for k in dropped)} left out", file=sys.stderr)
    return ks


def run_evaluate(args) -> int:
    from rdr_jax.retrieval.metrics import (answer_recall_from_ranks, evaluate_run, format_results_table,
                                           read_qrels, read_trec_run, write_results_json)
    from rdr_jax.retrieval.results_io import first_hit_ranks_of

    if bool(args.results) == bool(args.run):
        raise ValueError("give either --results (answer recall) or --run with --qrels (IR measures)")
    output_file("--out", args.out)
    if args.results:
        ranks, depth = first_hit_ranks_of(input_file("--results", args.results))
        if not len(ranks):
            raise ValueError(f"--results {args.results}: no questions")
        ks = usable_ks(args.k or DEFAULT_KS, depth, explicit=args.k is not None)
        table = {Path(args.results).name: answer_recall_from_ranks(ranks, ks)}
    else:
        if not args.qrels:
            raise ValueError("--run needs --qrels")
        table = {Path(args.run).name: evaluate_run(read_qrels(input_file("--qrels", args.qrels)),
                                                   read_trec_run(input_file("--run", args.run)), args.measures)}
    print(format_results_table(table))
    if args.out:
        write_results_json(args.out, table)
    return 0
