"""rdr-jax convert: Hugging Face directory <-> native (orbax) checkpoint."""

from __future__ import annotations

from pathlib import Path

HELP = """Convert a checkpoint between Hugging Face format (config.json + safetensors/bin) and the native
orbax format. The class is picked from config.json.

examples:
  rdr-jax convert facebook-dpr-question_encoder-single-nq-base/ q_native/ --to orbax
  rdr-jax convert q_native/ q_hf/ --to hf
  rdr-jax convert all-MiniLM-L6-v2/ ctx_encoder/ --to hf --as DPRContextEncoder   # start DPR from BERT"""


def add_arguments(p):
    p.add_argument("src", help="HF model directory, hub name already in the local cache, or native checkpoint")
    p.add_argument("dst", help="output directory")
    p.add_argument("--to", choices=("hf", "orbax"), default="orbax", help="output format (default: orbax)")
    p.add_argument("--as", dest="as_class", default=None, metavar="CLASS",
                   help="load SRC as this class (e.g. DPRContextEncoder from a BertModel checkpoint)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="tensor dtype of the written HF weights (default: as loaded, float32)")


HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def destination_format(path: Path) -> str | None:
    """"hf" or "orbax" for a checkpoint directory written by save_pretrained, "empty", or None for anything
    else (an encoding, an index, other files)."""
    from rdr_jax.models.base import ORBAX_SUBDIR

    if not path.is_dir() or not any(path.iterdir()):
        return "empty"
    if not (path / "config.json").is_file():
        return None
    if (path / ORBAX_SUBDIR).is_dir():
        return None if any((path / name).exists() for name in HF_WEIGHTS) else "orbax"
    return "hf" if any((path / name).is_file() for name in HF_WEIGHTS) else None


def check_destination(dst: Path, to: str, src: Path | None = None) -> None:
    """Refuse a destination that would mix formats: a file, or a non-empty directory that is not a checkpoint
    of the format being written (an orbax checkpoint, an encoding, an index...)."""
    from rdr_jax.commands.args import output_dir

    output_dir("DST", dst)
    if src is not None and dst.exists() and src.resolve() == dst.resolve():
        raise ValueError(f"DST {dst}: is SRC itself; give another directory")
    found = destination_format(dst)
    if found not in ("empty", to):
        what = "a non-empty directory that is not a checkpoint" if found is None else f"an {found} checkpoint" if found == "orbax" else f"a {found} checkpoint"
        raise ValueError(f"DST {dst}: is {what}; writing --to {to} there would mix formats, give a new or empty "
                         "directory")


def run(args) -> int:
    import rdr_jax
    from rdr_jax.convert.hf_io import copy_tokenizer_files, resolve_model_dir
    from rdr_jax.models import MODEL_CLASSES

    check_destination(Path(args.dst), args.to, resolve_model_dir(args.src))
    if args.as_class:
        if args.as_class not in MODEL_CLASSES:
            raise ValueError(f"--as {args.as_class}: unknown class; choose from {', '.join(sorted(MODEL_CLASSES))}")
        model = MODEL_CLASSES[args.as_class].from_pretrained(args.src)
    else:
        model = rdr_jax.from_pretrained(args.src)
    dst = Path(args.dst)
    if args.to == "hf":
        from rdr_jax.models.config import dtype_from_name

        dtype = dtype_from_name(args.dtype, "--dtype") if args.dtype else None
        model.save_pretrained(dst, dtype=dtype)
    else:
        model.save_pretrained(dst, format="orbax")
    copy_tokenizer_files(resolve_model_dir(args.src), dst)
    print(f"wrote {type(model).__name__} ({args.to}) to {dst}")
    return 0
