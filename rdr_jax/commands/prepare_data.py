"""rdr-jax prepare-data: a task's raw training file -> a random-access dataset (array_record) built once."""

from __future__ import annotations

from pathlib import Path

from rdr_jax.commands.args import nonnegative_int

HELP = """Convert a raw training file into a random-access dataset (NAME.arrayrecord + NAME.arrayrecord.json)
that training reads by index, per process and per batch, instead of holding the whole file. The source is
streamed (never read whole); only what training reads is kept. Point data.train_file (or data.dev_file) at
the output. A task given the raw file converts it once into WORKDIR/data_cache instead.

formats:
  dpr   DPR's bi-encoder JSON list (or JSONL) of {question, positive_ctxs, hard_negative_ctxs, negative_ctxs}:
        keeps the question, the first positive and the negative pool (hard negatives, else negatives);
        questions without a positive are skipped, as DPR does
  reader
        DPR's retriever-results JSON ({question, answers, ctxs: [{title, text, has_answer}]}: the positive is
        the first retrieved passage with the answer, the negatives the retrieved ones without it, as DPR
        trains its reader) or its bi-encoder JSON: keeps the question, the answers, the positive and the
        first --max-negatives negatives (hard ones first); questions without a positive or answers are skipped
  seq2seq_index
        DPR's bi-encoder JSON whose positive_ctxs carry passage_id: keeps the question and its positive
        passage ids (the retrieval examples of seq2seq_index training; the identifiers are looked up when
        training); questions without a positive passage_id are skipped

examples:
  rdr-jax prepare-data dpr biencoder-nq-train.json nq-train.arrayrecord
  rdr-jax prepare-data reader retriever-results-nq-train.json nq-reader-train.arrayrecord
  rdr-jax prepare-data seq2seq_index biencoder-nq-train.json nq-dsi-train.arrayrecord"""


def formats() -> dict:
    from rdr_jax.data.dpr_data import FORMAT as DPR, dpr_record
    from rdr_jax.data.indexing_data import FORMAT as SEQ2SEQ_INDEX, query_record
    from rdr_jax.data.reader_data import FORMAT as READER, reader_record

    return {DPR: dpr_record, READER: reader_record, SEQ2SEQ_INDEX: query_record}



def add_arguments(p):
    p.add_argument("format", choices=("dpr", "reader", "seq2seq_index"),
                   help="the source file's layout (see formats above)")
    p.add_argument("src", help="the raw training file (.json list or .jsonl; .gz also read)")
    p.add_argument("out", help="the dataset to write; must end in .arrayrecord")
    p.add_argument("--max-negatives", type=nonnegative_int, default=None, metavar="N",
                   help="reader: negatives kept per question (default 32, DPR's 24 passages and more); "
                        "training refuses a dataset with fewer than data.passages_per_question - 1")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import functools
    import logging

    from rdr_jax.data.files import resolve_data_path
    from rdr_jax.data.records import SUFFIX, stream_converted, write_records

    src, out = resolve_data_path(args.src), Path(args.out)
    if not src.is_file():
        raise ValueError(f"SRC {src}: file not found")
    if not out.name.endswith(SUFFIX):
        raise ValueError(f"OUT {out}: must end in {SUFFIX} (the tasks recognise a prepared dataset by it)")
    if out.exists() and not args.force:
        raise ValueError(f"OUT {out}: exists; pass --force to overwrite it")
    convert, meta = formats()[args.format], {}
    if args.format == "reader":   # its cap, saved in the description: training checks it is enough
        from rdr_jax.data.reader_data import MAX_NEGATIVES

        cap = MAX_NEGATIVES if args.max_negatives is None else args.max_negatives
        convert, meta = functools.partial(convert, max_negatives=cap), {"max_negatives": cap}
    count = write_records(stream_converted(src, convert), out, args.format, str(src),
                          progress=not args.no_progress, meta=meta)
    logging.getLogger(__name__).info("%s: %d %s records written", out, count, args.format)
    print(f"{out}: {count} {args.format} records")
    return 0
