"""rdr-jax prepare-data: a task's raw training file -> a random-access dataset (array_record) built once."""

from __future__ import annotations

from pathlib import Path

HELP = """Convert a raw training file into a random-access dataset (NAME.arrayrecord + NAME.arrayrecord.json)
that training reads by index, per process and per batch, instead of holding the whole file. The source is
streamed (never read whole); only what training reads is kept. Point data.train_file (or data.dev_file) at
the output. A task given the raw file converts it once into WORKDIR/data_cache instead.

formats:
  dpr   DPR's bi-encoder JSON list (or JSONL) of {question, positive_ctxs, hard_negative_ctxs, negative_ctxs}:
        keeps the question, the first positive and the negative pool (hard negatives, else negatives);
        questions without a positive are skipped, as DPR does
  dgr   DGR's training data (candidate JSONL, re-ranked retriever results, or DPR bi-encoder JSON with
        --stand-in-teacher lexical_overlap): per question its candidate list, positive first, then the
        negatives by teacher score, as {passage_id, identifier or null, teacher_score}; --gold-file names the
        positives of re-ranked results (streamed: only the passage ids are kept); questions without a
        positive are skipped. --passages PSGS_TSV adds each candidate's line offset there (needed by
        data.identifier_kind: ngrams, which reads passages by it), and --pseudo-queries JSONL {id, queries}
        their pseudo-queries. Training on OUT does not read data.gold_file / data.stand_in_teacher /
        data.pseudo_queries_file: they were applied here

examples:
  rdr-jax prepare-data dpr biencoder-nq-train.json nq-train.arrayrecord
  rdr-jax prepare-data dgr reranked-nq-train.json dgr-nq-train.arrayrecord --gold-file biencoder-nq-train.json"""


def formats() -> dict:
    from rdr_jax.data.dgr_data import FORMAT as DGR, dgr_record
    from rdr_jax.data.dpr_data import FORMAT as DPR, dpr_record

    return {DPR: dpr_record, DGR: dgr_record}


def add_arguments(p):
    p.add_argument("format", choices=("dpr", "dgr"), help="the source file's layout (see formats above)")
    p.add_argument("src", help="the raw training file (.json list or .jsonl; .gz also read)")
    p.add_argument("out", help="the dataset to write; must end in .arrayrecord")
    p.add_argument("--gold-file", help="dgr: DPR bi-encoder JSON whose positive_ctxs name the gold passages of "
                                       "re-ranked results (matched by question text)")
    p.add_argument("--stand-in-teacher", choices=("none", "lexical_overlap"), default="none",
                   help="dgr: score DPR bi-encoder examples by lexical overlap (a smoke-run stand-in, not a teacher)")
    p.add_argument("--passages", help="dgr: the passages TSV the n-gram views (data.identifier_kind: ngrams) are read "
                                      "from: each candidate gets its passage's line offset")
    p.add_argument("--pseudo-queries", help="dgr, with --passages: JSONL {id, queries: [...]} of the passages' "
                                            "pseudo-queries (kept for the candidates only)")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
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
    if args.pseudo_queries and not args.passages:
        raise ValueError("--pseudo-queries are views of the passages: give --passages too")
    if args.format == "dgr":
        from rdr_jax.data.dgr_data import dgr_stream
        records = dgr_stream(src, stand_in_teacher=args.stand_in_teacher, gold_file=args.gold_file,
                             passages_file=args.passages, pseudo_queries_file=args.pseudo_queries)
    else:
        if args.gold_file or args.passages or args.pseudo_queries or args.stand_in_teacher != "none":
            raise ValueError(f"--gold-file, --passages, --pseudo-queries and --stand-in-teacher are dgr options, "
                             f"not {args.format}'s")
        records = stream_converted(src, formats()[args.format])
    count = write_records(records, out, args.format, str(src), progress=not args.no_progress)
    logging.getLogger(__name__).info("%s: %d %s records written", out, count, args.format)
    print(f"{out}: {count} {args.format} records")
    return 0
