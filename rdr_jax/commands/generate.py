"""rdr-jax generate: retrieve with a generative retriever (T5/BART + trie-constrained beam search)."""

from __future__ import annotations


from rdr_jax.commands.args import (check_architecture, check_max_length, input_file, int_at_least, model_config,
                                   output_file, positive_int)

SEQ2SEQ = ("T5ForConditionalGeneration", "BartForConditionalGeneration")

HELP = """Retrieve passages with a generative retriever: trie-constrained beam search over the passage
identifiers, each beam's identifier mapped to its passages (score = the beam's summed log-probability).
Writes DPR's retriever-results JSON (with has_answer) and prints top-k answer recall; --run-out also writes a
TREC run. With --gold (a DPR bi-encoder JSON of training questions) it writes DGR's distillation candidates
instead: each question's top passages plus its gold positives, marked is_positive, for `rdr-jax rerank`.

examples:
  rdr-jax generate --model runs/s2s/final/retriever --qa nq-test.qa.csv --passages psgs_w100.tsv \\
      --out nq-test.generated.json --num-beams 10 --run-out nq-test.generated.trec
  rdr-jax generate --model runs/s2s/final/retriever --identifiers ids.tsv --gold nq-train.json \\
      --passages psgs_w100.tsv --out nq-train.candidates.json --num-beams 20
  rdr-jax generate --model runs/minder/final/retriever --ngram-index ngrams/ --passages psgs_w100.tsv \\
      --qa nq-test.qa.csv --out nq-test.generated.json --num-beams 15

With --ngram-index every n-gram (up to --max-ngram tokens) of every passage's title and text (and of its
--pseudo-queries) is an identifier (MINDER): the beams are corpus n-grams and passages are ranked by SEAL's
intersective score of the n-grams they contain. The index is built into that directory on first use, in
sub-indexes of at most --ngram-part-positions token positions each (one for a small corpus; two for 21M
passages), each saved when done: a stopped build rerun keeps the finished ones."""


def add_arguments(p):
    p.add_argument("--model", required=True, help="T5/BART retriever directory (model + tokenizer, e.g. a "
                                                  "training run's final/retriever/)")
    p.add_argument("--identifiers", default=None,
                   help="passage_id<TAB>identifier TSV (default: MODEL/identifiers.tsv)")
    p.add_argument("--qa", default=None, help="questions: DPR qa CSV/TSV (question<TAB>[answers]) or JSONL")
    p.add_argument("--gold", default=None, help="DPR bi-encoder JSON (questions with positive passage_id): "
                                                "write distillation candidates instead of --qa results")
    p.add_argument("--passages", required=True, help="passages TSV: id<TAB>text<TAB>title (header optional)")
    p.add_argument("--out", required=True, help="output retriever-results JSON")
    p.add_argument("--run-out", default=None, help="also write a TREC run (qid = question's line number, from 0)")
    p.add_argument("--num-beams", type=positive_int, default=10, help="beams = identifiers per question (default 10)")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="most identifier tokens generated, EOS included (default: the longest identifier)")
    p.add_argument("--max-question-length", type=int_at_least(2), default=64, help="question tokens (default 64)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="questions per step (default 16)")
    p.add_argument("--k", type=positive_int, nargs="+", default=[1, 5, 10, 20, 100], help="k values of the printed recall")
    p.add_argument("--match", choices=("string", "regex"), default="string",
                   help="has_answer rule: string (NQ, TriviaQA) or regex (CuratedTREC)")
    p.add_argument("--ngram-index", default=None, metavar="DIR",
                   help="corpus n-gram identifiers (MINDER): the index in DIR, built there from --passages if absent")
    p.add_argument("--max-ngram", type=positive_int, default=10,
                   help="longest n-gram in tokens when building --ngram-index (default 10)")
    p.add_argument("--ngram-part-positions", type=int_at_least(64), default=None, metavar="N",
                   help="most token positions per sub-index when building --ngram-index (default and maximum: "
                        "2**31 - 2**20 - 1, what int32 offsets hold); smaller parts bound the build's host memory "
                        "and cost beam-search time per part")
    p.add_argument("--pseudo-queries", default=None,
                   help="JSONL {id, queries: [...]}: extra identifier views when building --ngram-index")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (bfloat16 on accelerators)")


def run(args) -> int:
    from rdr_jax.data.readers import read_dpr_passages, read_dpr_training, read_qa
    from rdr_jax.retrieval.generative import (candidates_for_distillation, generate_results,
                                              load_generative_retriever, results_to_run)
    from rdr_jax.retrieval.metrics import format_results_table, write_trec_run
    from rdr_jax.retrieval.retrieve import recall_of_results, write_results

    if bool(args.qa) == bool(args.gold):
        raise ValueError("give either --qa (questions to retrieve for) or --gold (training questions for "
                         "distillation candidates)")
    for option, path in (("--qa", args.qa), ("--gold", args.gold), ("--passages", args.passages),
                         ("--identifiers", args.identifiers)):
        input_file(option, path)
    output_file("--out", args.out)
    output_file("--run-out", args.run_out)
    model_dir, config = model_config("--model", args.model)
    check_architecture("--model", model_dir, config, SEQ2SEQ, "a T5/BART generation model")
    check_max_length("--model", args.max_question_length, model_dir, config, flag="--max-question-length")
    questions = list(read_dpr_training(args.gold)) if args.gold else list(read_qa(args.qa))
    if not questions:
        raise ValueError(f"{'--gold' if args.gold else '--qa'} {args.gold or args.qa}: no questions")
    if args.ngram_index and args.identifiers:
        raise ValueError("give --identifiers (whole identifiers) or --ngram-index (corpus n-grams), not both")
    if args.pseudo_queries and not args.ngram_index:
        raise ValueError("--pseudo-queries adds views to an n-gram index: give --ngram-index too")
    corpus = {p["id"]: p for p in read_dpr_passages(args.passages)} if args.ngram_index else None
    retriever = load_generative_retriever(
        args.model, args.identifiers, dtype=args.dtype, num_beams=args.num_beams, max_length=args.max_length,
        batch_size=args.batch_size, max_question_length=args.max_question_length, ngram_index=args.ngram_index,
        passages=corpus, max_ngram=args.max_ngram, pseudo_queries=_pseudo_queries(args.pseudo_queries),
        ngram_top_k=max(args.k), **({"ngram_part_positions": args.ngram_part_positions}
                                    if args.ngram_part_positions else {}))
    corpus = corpus if corpus is not None else read_dpr_passages(args.passages)
    if args.gold:
        results = candidates_for_distillation(retriever, questions, corpus, match_type=args.match)
    else:
        results = generate_results(retriever, questions, corpus, match_type=args.match)
    write_results(args.out, results)
    if args.run_out:
        write_trec_run(args.run_out, results_to_run(results), tag="rdr_jax_generate")
    depth = max(args.k) if args.ngram_index else args.num_beams   # n-grams name many passages each
    ks = [k for k in args.k if k <= depth] or [depth]
    recall = recall_of_results(results, ks)
    print(format_results_table({"generative": recall}))
    what = "distillation candidates" if args.gold else "results"
    print(f"wrote {what} for {len(results)} questions to {args.out}")
    return 0


def _pseudo_queries(path) -> dict[str, list[str]] | None:
    """``{passage id: [queries]}`` from a JSONL of ``{id, queries}`` rows."""
    if not path:
        return None
    from rdr_jax.data.files import iter_json_records

    out: dict[str, list[str]] = {}
    for line, row in iter_json_records(input_file("--pseudo-queries", path)):
        if "id" not in row or not isinstance(row.get("queries"), list):
            raise ValueError(f"{path}:{line}: not {{id, queries: [...]}}")
        out.setdefault(str(row["id"]), []).extend(map(str, row["queries"]))
    return out
