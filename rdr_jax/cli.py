"""``rdr-jax``: one entry point, one module per group of subcommands (rdr_jax/commands/).

Every subcommand exits non-zero with a one-line reason on bad input (no traceback); ``--debug`` shows it.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rdr_jax.commands import COMMANDS  # noqa: E402

MAX_MESSAGE_CHARS = 600

EPILOG = """examples:
  rdr-jax demo --workdir runs/demo
  rdr-jax convert facebook-dpr-ctx_encoder-single-nq-base/ ctx_jax/ --to orbax
  rdr-jax encode --model ctx_enc/ --passages psgs_w100.tsv --out embeddings/
  rdr-jax index --embeddings embeddings/ --out index/ --kind hnsw
  rdr-jax retrieve --model q_enc/ --index index/ --passages psgs_w100.tsv --qa nq-test.qa.csv --out results.json
  rdr-jax evaluate --results results.json
  rdr-jax rerank --model cross-encoder/ --run bm25.trec --queries q.tsv --passages collection.tsv --out re.trec
  rdr-jax train configs/tiny/dpr.yaml --workdir runs/tiny_dpr

Run `rdr-jax COMMAND --help` for each command's options."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rdr-jax", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Retrieval models for open-domain QA and passage ranking in JAX: convert Hugging Face "
                    "checkpoints, encode and index corpora, retrieve, evaluate, train.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text.split("\n\n")[0].replace("\n", " "), description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show full tracebacks on errors")
        add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _, _, run = COMMANDS[args.command]
    try:
        return run(args) or 0
    except KeyboardInterrupt:
        print(f"rdr-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:
        if getattr(args, "debug", False):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if len(message) > MAX_MESSAGE_CHARS:  # e.g. a long list of checkpoint keys: --debug has it all
            message = message[:MAX_MESSAGE_CHARS] + " ... (--debug shows all)"
        print(f"rdr-jax {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
