"""rdr-jax tokenize: a passages TSV into a tokenised corpus store (rdr_jax.data.corpus_store), built once."""

from __future__ import annotations

from rdr_jax.commands.args import check_room_for_text, input_file, output_dir, positive_int

HELP = """Tokenise a passages TSV (DPR layout: id, text, title) once into a corpus store: memory-mapped token ids,
passage ids, titles and texts keyed by row, which `rdr-jax encode --passages STORE/` reads instead of the TSV
(each process reads only its own rows; no tokenisation at encode time). Built on all cores; written into
OUT.partial and renamed when complete. The store is tied to the tokenizer and --max-length: encode with a
model of the same tokenizer and the same --max-length.

examples:
  rdr-jax tokenize --passages psgs_w100.tsv --tokenizer dpr-ctx_encoder-single-nq-base/ --out psgs_w100.store/
  rdr-jax encode --model dpr-ctx_encoder-single-nq-base/ --passages psgs_w100.store/ --out emb/"""


def add_arguments(p):
    p.add_argument("--passages", required=True, help="passages TSV: id<TAB>text<TAB>title (header optional)")
    p.add_argument("--tokenizer", required=True,
                   help="model directory whose tokenizer to use (the context encoder you will encode with)")
    p.add_argument("--out", required=True, help="output store directory")
    p.add_argument("--max-length", type=positive_int, default=256,
                   help="max tokens per passage, as `rdr-jax encode --max-length` (default 256)")
    p.add_argument("--workers", type=positive_int, default=None, help="tokenizer threads (default: one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from rdr_jax.data.corpus_store import build_corpus_store, is_corpus_store
    from rdr_jax.data.tokenization import load_tokenizer

    passages = input_file("--passages", args.passages)
    out = output_dir("--out", args.out, marker="meta.json", what="a corpus store")
    if (out / "meta.json").exists() and not is_corpus_store(out):
        raise ValueError(f"--out {out}: holds a meta.json that is not a corpus store's; give another directory")
    tokenizer = load_tokenizer(args.tokenizer)
    check_room_for_text(args.max_length, tokenizer, pair=True)
    build_corpus_store(passages, tokenizer, out, max_length=args.max_length, workers=args.workers,
                       progress=not args.no_progress)
    from rdr_jax.data.corpus_store import CorpusStore

    store = CorpusStore(out)
    print(f"tokenized {len(store)} passages ({store.meta['tokens']} tokens, max_length {store.max_length}) "
          f"into {out}")
    return 0
