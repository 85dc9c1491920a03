"""rdr-jax train: one engine for every objective, configured by YAML."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rdr_jax.commands.args import add_distributed_arguments, start_distributed

PACKAGE_DIR = Path(__file__).resolve().parents[1]   # rdr_jax/

HELP = """Train with a YAML config (task: dpr, rdr, reader, ...): sharded over a device mesh (mesh.data x
mesh.fsdp x mesh.tensor), orbax checkpoints every train.checkpoint_every steps, WORKDIR/metrics.jsonl,
TensorBoard events, and the trained models exported to WORKDIR/final/<model>/ in Hugging Face format.
Running the same config with a larger train.steps resumes from the last checkpoint.

examples:
  rdr-jax train configs/tiny/dpr.yaml --workdir runs/tiny_dpr
  rdr-jax train configs/rdr_nq.yaml --set train.steps=20000 mesh.data=8
  rdr-jax train configs/dpr_nq.yaml --coordinator 10.0.0.1:1234 --num-processes 4 --process-id 0
  srun rdr-jax train configs/rdr_nq.yaml --distributed auto      # SLURM / mpirun / TPU pod: from the environment

Multi-process launches (TPU pods, SLURM, CPU processes): docs/distributed.md.
SIGTERM (preemption) or Ctrl-C finishes the step in flight, checkpoints it and exits with code 75; rerun to
resume (a second Ctrl-C stops at once, exit 130). A workdir holding another task's or model's run is refused.
NaN/Inf losses: train.nan_policy stop (default: checkpoint the last good state, fail naming the step) or skip."""


class SetOverrides(argparse.Action):
    """``--set a=1 b=2 --set c=3``: every pair, in order, into one list. A value without ``=`` is refused here
    (it is most likely the config path written after ``--set``), not later as a missing positional."""

    def __call__(self, parser, namespace, values, option_string=None):
        for value in values:
            if "=" not in value:
                raise argparse.ArgumentError(self, f"{value!r} is not KEY=VALUE (write the config path before "
                                                   f"--set)")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), *values])


def add_arguments(parser):
    parser.add_argument("config", help="YAML experiment config (e.g. configs/tiny/dpr.yaml)")
    parser.add_argument("--workdir", help="output directory (overrides the config's 'workdir')")
    parser.add_argument("--set", dest="overrides", action=SetOverrides, nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config values by dotted key, e.g. --set train.steps=10 mesh.data=4 "
                             "(several pairs, and repeatable)")
    add_distributed_arguments(parser, "training")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given when it exists (relative to the current directory); else, for ``configs/...``, the
    copy shipped inside the package (``rdr_jax/configs/``), so ``configs/tiny/dpr.yaml`` works after a plain
    ``pip install``. Anything else comes back unchanged, for the error to name what was typed."""
    path = Path(path)
    if path.exists() or path.is_absolute() or not path.parts or path.parts[0] != "configs":
        return path
    packaged = PACKAGE_DIR / path
    return packaged if packaged.exists() else path


def run(args) -> int:
    from rdr_jax.tasks import load_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every metadata write at INFO
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # logs each CPU-specific build it tries
    config = load_config(resolve_config_path(args.config), args.overrides, workdir=args.workdir)
    from rdr_jax.training import faults

    start_distributed(args)
    from rdr_jax.training.loop import train

    result = train(config, progress=not args.no_progress)
    if result.get("preempted"):
        print(f"preempted at step {result['step']}: checkpoint saved in {result['workdir']}/checkpoints; rerun the "
              f"same command to resume (exit code {faults.PREEMPTED_EXIT_CODE})")
        return faults.PREEMPTED_EXIT_CODE
    print(f"trained to step {result['step']}; outputs in {result['workdir']}")
    return 0
