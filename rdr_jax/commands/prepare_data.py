"""rdr-jax prepare-data: a task's raw training file -> a random-access dataset (array_record) built once."""

from __future__ import annotations

from pathlib import Path

HELP = """Convert a raw training file into a random-access dataset (NAME.arrayrecord + NAME.arrayrecord.json)
that training reads by index, per process and per batch, instead of holding the whole file. The source is
streamed (never read whole); only what training reads is kept. Point data.train_file (or data.dev_file) at
the output. A task given the raw file converts it once into WORKDIR/data_cache instead.

formats:
  dpr         DPR's bi-encoder JSON list (or JSONL) of {question, positive_ctxs, hard_negative_ctxs,
              negative_ctxs}: keeps the question, the first positive and the negative pool (hard negatives,
              else negatives); questions without a positive are skipped, as DPR does
  reader      DPR's retriever-results JSON ({question, answers, ctxs: [{title, text, has_answer}]}: the positive
              is the first retrieved passage with the answer, the negatives the retrieved ones without it, as DPR
              trains its reader) or its bi-encoder JSON: keeps the question, the answers, the positive and the
              first --max-negatives negatives (hard ones first); questions without a positive or answers are
              skipped
  seq2seq_index
              DPR's bi-encoder JSON whose positive_ctxs carry passage_id: keeps the question and its positive
              passage ids (the retrieval examples of seq2seq_index training; the identifiers are looked up when
              training); questions without a positive passage_id are skipped
  ce-lists    cross-encoder query lists, from teacher-score JSONL {qid, pids, scores} (MS MARCO ids: needs
              --queries and --collection, --qrels adds labels; each list sorted by the teacher, best first),
              DPR bi-encoder JSON ([positive, hard negatives, negatives], labels positive first) or retriever
              results {question, ctxs: [{title, text, teacher_score?, has_answer?}]}: keeps per query its text,
              the candidates' texts, teacher scores and labels
  ce-triples  cross-encoder lists [positive, negative] from MS MARCO triples TSV: query<TAB>pos<TAB>neg texts,
              or qid<TAB>pid+<TAB>pid- ids (needs --queries and --collection)
  dgr         DGR's training data (candidate JSONL, re-ranked retriever results, or DPR bi-encoder JSON with
              --stand-in-teacher lexical_overlap): per question its candidate list, positive first, then the
              negatives by teacher score, as {passage_id, identifier or null, teacher_score}; --gold-file names
              the positives of re-ranked results (streamed: only the passage ids are kept); questions without a
              positive are skipped. --passages PSGS_TSV adds each candidate's line offset there (needed by
              data.identifier_kind: ngrams, which reads passages by it), and --pseudo-queries JSONL {id, queries}
              their pseudo-queries. Training on OUT does not read data.gold_file / data.stand_in_teacher /
              data.pseudo_queries_file: they were applied here
  Texts named by id are resolved into the records here, read from the collection by byte offset (an index of
  8 bytes per passage, not its text); training then holds no collection. --list-size keeps each list's first
  N candidates (data.list_size must not exceed it); --max-examples keeps the first N lists.

examples:
  rdr-jax prepare-data dpr biencoder-nq-train.json nq-train.arrayrecord
  rdr-jax prepare-data reader retriever-results-nq-train.json nq-reader-train.arrayrecord
  rdr-jax prepare-data seq2seq_index biencoder-nq-train.json nq-dsi-train.arrayrecord
  rdr-jax prepare-data dgr reranked-nq-train.json dgr-nq-train.arrayrecord --gold-file biencoder-nq-train.json
  rdr-jax prepare-data ce-triples triples.train.small.tsv --max-examples 1000000 marco-triples.arrayrecord
  rdr-jax prepare-data ce-lists teacher-top50.jsonl --queries queries.train.tsv --collection collection.tsv \\
      --list-size 32 marco-teacher.arrayrecord"""

FORMAT_NAMES = ("dpr", "reader", "seq2seq_index", "dgr", "ce-lists", "ce-triples")


def formats() -> dict:
    """{format: convert(raw JSON record, where) -> record | None}: formats made record by record."""
    from rdr_jax.data.dpr_data import FORMAT as DPR, dpr_record
    from rdr_jax.data.indexing_data import FORMAT as SEQ2SEQ_INDEX, query_record

    return {DPR: dpr_record, SEQ2SEQ_INDEX: query_record}   # the reader's, with its cap, is in streams()


def streams() -> dict:
    """{format: records(src, args, meta)}: formats whose conversion reads the source (and other files) itself;
    ``meta`` receives what the dataset's .json keeps besides the count."""
    from rdr_jax.data.cross_encoder_lists import CE_LISTS, CE_TRIPLES, ListSources, list_records

    def cross_encoder(src, args, meta):
        sources = ListSources(args.queries, args.collection, args.qrels, args.triples_form, args.list_size,
                              args.max_examples, keys=("--queries", "--collection", "--qrels"))
        return list_records(src, sources, meta, args.format)

    def dgr(src, args, meta):
        from rdr_jax.data.dgr_data import dgr_stream
        return dgr_stream(src, stand_in_teacher=args.stand_in_teacher, gold_file=args.gold_file,
                          passages_file=args.passages, pseudo_queries_file=args.pseudo_queries)

    def reader(src, args, meta):   # its cap, saved in the description: training checks it is enough
        import functools

        from rdr_jax.data.reader_data import MAX_NEGATIVES, reader_record
        from rdr_jax.data.records import stream_converted

        meta["max_negatives"] = cap = MAX_NEGATIVES if args.max_negatives is None else args.max_negatives
        return stream_converted(src, functools.partial(reader_record, max_negatives=cap))

    return {CE_LISTS: cross_encoder, CE_TRIPLES: cross_encoder, "dgr": dgr, "reader": reader}


def add_arguments(p):
    from rdr_jax.commands.args import nonnegative_int

    p.add_argument("format", choices=FORMAT_NAMES, help="the source file's layout (see formats above)")
    p.add_argument("src", help="the raw training file (.json list, .jsonl or .tsv; .gz also read)")
    p.add_argument("out", help="the dataset to write; must end in .arrayrecord")
    p.add_argument("--max-negatives", type=nonnegative_int, default=None, metavar="N",
                   help="reader: negatives kept per question (default 32, DPR's 24 passages and more); "
                        "training refuses a dataset with fewer than data.passages_per_question - 1")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    dgr = p.add_argument_group("dgr")
    dgr.add_argument("--gold-file", help="DPR bi-encoder JSON whose positive_ctxs name the gold passages of "
                                         "re-ranked results (matched by question text)")
    dgr.add_argument("--stand-in-teacher", choices=("none", "lexical_overlap"), default="none",
                     help="score DPR bi-encoder examples by lexical overlap (a smoke-run stand-in, not a teacher)")
    dgr.add_argument("--passages", help="the passages TSV the n-gram views (data.identifier_kind: ngrams) are read "
                                        "from: each candidate gets its passage's line offset")
    dgr.add_argument("--pseudo-queries", help="with --passages: JSONL {id, queries: [...]} of the passages' "
                                              "pseudo-queries (kept for the candidates only)")
    ce = p.add_argument_group("ce-lists / ce-triples")
    ce.add_argument("--queries", help="MS MARCO queries TSV (qid<TAB>text), for sources of ids")
    ce.add_argument("--collection", help="MS MARCO collection.tsv (pid<TAB>text, uncompressed), for sources of ids")
    ce.add_argument("--qrels", help="relevance judgements: labels for teacher-score lists")
    ce.add_argument("--triples-form", default="auto", choices=("auto", "text", "ids"),
                    help="ce-triples: texts or ids (auto: ids when the first row is three integers)")
    ce.add_argument("--list-size", type=nonnegative_int, default=0, help="keep each list's first N candidates (0: all)")
    ce.add_argument("--max-examples", type=nonnegative_int, default=0, help="keep the first N lists (0: all)")


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
    if args.format != "dgr" and (args.gold_file or args.passages or args.pseudo_queries
                                 or args.stand_in_teacher != "none"):
        raise ValueError(f"--gold-file, --passages, --pseudo-queries and --stand-in-teacher are dgr options, "
                         f"not {args.format}'s")
    if args.max_negatives is not None and args.format != "reader":
        raise ValueError(f"--max-negatives is a reader option, not {args.format}'s")
    meta: dict = {}
    stream = streams().get(args.format)
    records = stream(src, args, meta) if stream else stream_converted(src, formats()[args.format])
    count = write_records(records, out, args.format, str(src), progress=not args.no_progress, meta=meta)
    logging.getLogger(__name__).info("%s: %d %s records written", out, count, args.format)
    print(f"{out}: {count} {args.format} records")
    return 0
