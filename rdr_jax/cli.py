"""``rdr-jax``: one entry point, one module per group of subcommands (rdr_jax/commands/).

Every subcommand exits non-zero with a one-line reason on bad input (no traceback); ``--debug`` shows it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# The Rust tokenizer's own thread pool stays off: the inference runner (rdr_jax.retrieval.runner.TokenizePool)
# and the corpus store build call it from a pool of threads of their own (it releases the GIL), which would
# otherwise each start a pool per core; it also keeps forked workers free of the "fork after parallelism" warning.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rdr_jax import __version__  # noqa: E402
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
    parser.add_argument("--version", action="version", version=f"rdr-jax {__version__}")
    parser.add_argument("--quiet", action="store_true", help="log only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text.split("\n\n")[0].replace("\n", " "), description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show full tracebacks on errors")
        add_arguments(p)
    return parser


class _NoBackendProbeNoise(logging.Filter):
    """Drops JAX's INFO line for each optional backend it probes and does not find ("Unable to initialize backend
    'tpu': ... libtpu.so ..." on every CPU/GPU host). Warnings pass: JAX itself warns when a TPU or GPU is present
    but its backend failed, and a backend asked for by JAX_PLATFORMS raises."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and str(record.msg).startswith("Unable to initialize backend"))


def _set_up_logging(quiet: bool) -> int:
    """Returns the logging.disable level to restore (``--quiet``: INFO and DEBUG off for this command only)."""
    probe_logger = logging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _NoBackendProbeNoise) for f in probe_logger.filters):
        probe_logger.addFilter(_NoBackendProbeNoise())
    previous = logging.root.manager.disable
    if quiet:
        logging.disable(logging.INFO)
    return previous


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _, _, run = COMMANDS[args.command]
    previous_disable = _set_up_logging(args.quiet)
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
    finally:
        logging.disable(previous_disable)


if __name__ == "__main__":
    sys.exit(main())
