"""rdr-jax mine-negatives: hard negatives for DPR's second round, mined with the first round's own index."""

from __future__ import annotations

from pathlib import Path

from rdr_jax.commands.args import (add_distributed_arguments, input_file, nonnegative_int, output_file,
                                   positive_int, start_distributed)
from rdr_jax.commands.pipeline import _add_model_runtime, embedding_dim, load_encoder

HELP = """Mine hard negatives with a trained retriever (DPR's two-round recipe, DPR-adv-hn): encode the
questions of a DPR training JSON with the question encoder, search the corpus encoding (`rdr-jax encode` with
the paired context encoder) exactly on the devices, drop the retrieved passages that contain an answer
(has_answer, the same rule as `rdr-jax retrieve`/`evaluate`) or are a gold positive (same passage id), and write
a new DPR training JSON whose hard_negative_ctxs are the first --negatives survivors in rank order. Positives
and negative_ctxs are kept as they are; --keep-original-negatives also keeps the input's own hard negatives
after the mined ones. Written to OUT.tmp and renamed when complete. Prints how many were kept.

examples:
  rdr-jax encode --model round1/final/context_encoder --passages psgs_w100.tsv --out emb1/
  rdr-jax mine-negatives --model round1/final/question_encoder --embeddings emb1/ --passages psgs_w100.tsv \\
      --train nq-train.json --out nq-train.adv-hn.json --k 100 --negatives 30
  rdr-jax mine-negatives ... --distributed auto   # every host holds 1/N of the vectors; process 0 writes"""


def add_arguments(p):
    p.add_argument("--model", required=True, help="trained DPR question encoder (or BERT) checkpoint directory")
    p.add_argument("--embeddings", required=True,
                   help="corpus encoding directory written by `rdr-jax encode` with the paired context encoder")
    p.add_argument("--passages", required=True, help="the passages TSV the encoding was built from (text, ids)")
    p.add_argument("--train", required=True, help="DPR training JSON whose questions are mined for")
    p.add_argument("--out", required=True, help="new DPR training JSON with the mined hard_negative_ctxs")
    p.add_argument("--k", type=positive_int, default=100, help="passages retrieved per question (default 100)")
    p.add_argument("--negatives", type=nonnegative_int, default=30,
                   help="mined hard negatives kept per question, best ranked first (default 30)")
    p.add_argument("--keep-original-negatives", action="store_true",
                   help="also keep the input's hard_negative_ctxs, after the mined ones")
    p.add_argument("--match", choices=("string", "regex"), default="string",
                   help="has_answer rule: string (NQ, TriviaQA) or regex (CuratedTREC)")
    p.add_argument("--query-batch", type=positive_int, default=256,
                   help="questions per search step on the devices (default 256)")
    p.add_argument("--chunk-rows", type=positive_int, default=16384,
                   help="passages scored per matmul on a device (default 16384)")
    _add_model_runtime(p, max_length=64, batch_size=128)
    add_distributed_arguments(p, "mining")


def run(args) -> int:
    start_distributed(args)  # before anything touches the devices
    import jax

    from rdr_jax.data.readers import read_dpr_training
    from rdr_jax.retrieval.device_search import DeviceSearch, is_encoding_dir, iter_encoded_ids
    from rdr_jax.retrieval.encode import Encoder, complete_encoding_meta, encode_texts
    from rdr_jax.retrieval.mining import mine_negatives
    from rdr_jax.retrieval.results_io import PassageRows

    out = output_file("--out", args.out)
    train, passages = input_file("--train", args.train), input_file("--passages", args.passages)
    if not is_encoding_dir(args.embeddings):
        raise FileNotFoundError(f"--embeddings {args.embeddings}: not an encoding directory (`rdr-jax encode`)")
    if Path(train).resolve() == out.resolve():
        raise ValueError(f"--out {out}: is the --train file; write the mined file elsewhere")
    meta = complete_encoding_meta(Path(args.embeddings))
    # One streaming pass for the questions; the records are read again while writing, never all held.
    questions = [e["question"] for e in read_dpr_training(train)]
    if not questions:
        raise ValueError(f"--train {train}: no examples")
    model, tokenizer = load_encoder(args.model, "question", args.dtype, args.max_length)
    if embedding_dim(model) != meta["dim"]:
        raise ValueError(f"--model {args.model}: embeddings of dim {embedding_dim(model)}, but --embeddings "
                         f"{args.embeddings} holds vectors of dim {meta['dim']}; use the question encoder paired "
                         "with the context encoder of the encoding")
    primary = jax.process_index() == 0
    rows = PassageRows.scan(passages, iter_encoded_ids(args.embeddings), meta["num_passages"],
                            source=f"--passages {passages}", what="the encoding") if primary else None
    embeddings = encode_texts(Encoder(model, args.batch_size, devices=jax.local_devices()), tokenizer, questions,
                              max_length=args.max_length, as_questions=True, desc="encoding questions",
                              progress=primary)
    searcher = DeviceSearch(args.embeddings, chunk_rows=args.chunk_rows, query_batch=args.query_batch,
                            progress=primary)
    batches = searcher.iter_search(embeddings, args.k, progress=primary)
    if not primary:
        for _ in batches:  # its share of every step's search; process 0 gathers and writes
            pass
        return 0
    stats = mine_negatives(read_dpr_training(train), batches, rows.reader(), out, negatives=args.negatives,
                           match_type=args.match, keep_original=args.keep_original_negatives)
    print(f"[mine-negatives] {stats.summary()}")
    print(f"wrote {out}")
    return 0
