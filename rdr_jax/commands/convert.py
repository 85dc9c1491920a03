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


def run(args) -> int:
    import rdr_jax
    from rdr_jax.convert.hf_io import copy_tokenizer_files, resolve_model_dir
    from rdr_jax.models import MODEL_CLASSES

    if args.as_class:
        if args.as_class not in MODEL_CLASSES:
            raise ValueError(f"--as {args.as_class}: unknown class; choose from {', '.join(sorted(MODEL_CLASSES))}")
        model = MODEL_CLASSES[args.as_class].from_pretrained(args.src)
    else:
        model = rdr_jax.from_pretrained(args.src)
    dst = Path(args.dst)
    if args.to == "hf":
        import numpy as np
        import ml_dtypes

        dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}.get(args.dtype)
        model.save_pretrained(dst, dtype=dtype)
    else:
        model.save_pretrained(dst, format="orbax")
    copy_tokenizer_files(resolve_model_dir(args.src), dst)
    print(f"wrote {type(model).__name__} ({args.to}) to {dst}")
    return 0
