"""The ``rdr-jax`` console script: sets the process up for speed (:mod:`rdr_jax.runtime`), then runs the CLI.

Kept apart from :mod:`rdr_jax.cli` so that nothing heavy is imported before the process may restart itself;
``rdr_jax.cli.main`` stays the in-process entry (tests, notebooks) and never restarts anything.
"""

from rdr_jax import runtime


def main() -> int:
    runtime.tune_host_process()
    from rdr_jax.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
