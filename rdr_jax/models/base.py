"""Loading and saving for every model family: Hugging Face directories and native orbax checkpoints.

A model class declares ``config_class``, ``hf_architecture`` and ``hf_rules(config)`` (its name map);
everything else — building the module without random init, checking keys and shapes, writing
safetensors that transformers loads — is here once.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

from rdr_jax.convert import mapping
from rdr_jax.convert.hf_io import (VOCABULARY_FILES, CheckpointError, copy_tokenizer_files, has_tokenizer_files,
                                   resolve_model_dir, write_safetensors)
from rdr_jax.convert.slices import (as_source, close_handles, open_checkpoint, owned_copy, parameter_region,
                                    plain_transpose, read_parameter)
from rdr_jax.models.config import ModelConfig, read_config_json
from rdr_jax.models.layers import CHECKPOINTED
from rdr_jax.models.sharding import LOGICAL_AXIS_RULES, variable_sharding

log = logging.getLogger(__name__)

ORBAX_SUBDIR = "orbax"
# Threads reading parameters from a checkpoint (at most this many tensors are mapped at once).
LOAD_THREADS = min(8, os.cpu_count() or 1)
# Every loadable class, by its transformers architecture name.
MODEL_CLASSES: dict[str, type["PretrainedModel"]] = {}
# The class used when config.json names no architecture we know, by model_type.
DEFAULT_CLASS_FOR_MODEL_TYPE: dict[str, str] = {}


def register(cls=None, *, default_for_model_type: bool = False):
    def wrap(cls):
        MODEL_CLASSES[cls.hf_architecture] = cls
        if default_for_model_type:
            DEFAULT_CLASS_FOR_MODEL_TYPE[cls.config_class.model_type] = cls.hf_architecture
        return cls

    return wrap(cls) if cls is not None else wrap


def flat_params(model: nnx.Module) -> dict[str, Any]:
    """{dot.joined.path: array} of a module's parameters and buffers (everything a checkpoint holds)."""
    state = nnx.state(model, CHECKPOINTED)
    return {".".join(str(p) for p in path): leaf for path, leaf in nnx.to_flat_state(state)}


class PretrainedModel(nnx.Module):
    config_class: ClassVar[type[ModelConfig]]
    hf_architecture: ClassVar[str]
    # Glob patterns of HF keys that may be in a checkpoint and are not parameters of this class.
    hf_ignore_unexpected: ClassVar[tuple[str, ...]] = ("*position_ids",)
    # Glob patterns of JAX paths that keep their fresh initialisation when the checkpoint lacks them
    # (a task head on a pretrained body).
    initializable_heads: ClassVar[tuple[str, ...]] = ()
    # Whether ``__call__`` takes ``packing=`` (a :class:`rdr_jax.models.packing.TokenPacking`, to skip padding)
    # and ``cls_only=`` (compute only the [CLS] row in the last layer): the BERT-family bodies.
    supports_packing: ClassVar[bool] = False

    config: ModelConfig

    @classmethod
    def hf_rules(cls, config: ModelConfig) -> list[mapping.Rule]:
        raise NotImplementedError

    # ---- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ModelConfig | dict, *, seed: int = 0, **kwargs) -> "PretrainedModel":
        """A randomly initialised model."""
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config)
        return cls(config, rngs=nnx.Rngs(seed), **kwargs)

    @classmethod
    def adapt_state_dict(cls, state: dict[str, np.ndarray], config: ModelConfig,
                         source_config: dict) -> dict[str, np.ndarray]:
        """Hook for classes that accept another class's checkpoint (a DPR encoder from a BertModel)."""
        return state

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=jnp.float32,
                        seed: int = 0, allow_fresh_heads: bool = True, mesh: Mesh | None = None,
                        rules: dict[str, Any] | None = None, **kwargs) -> "PretrainedModel":
        """Load an HF directory (safetensors / pytorch_model.bin, sharded or not) or a directory saved with
        ``save_pretrained(..., format="orbax")``. ``dtype`` is the compute dtype, ``param_dtype`` the
        storage dtype of the parameters.

        ``mesh``: place every parameter straight onto the mesh, sharded by its logical axes through ``rules``
        (default :data:`rdr_jax.models.sharding.LOGICAL_AXIS_RULES`, the trainer's): each device's slice is read
        alone from the checkpoint, so no device and no host holds the whole model (multi-process: each process
        reads only its own devices' slices). Without it, parameters go to the default device.

        The checkpoint's ``model_type`` must be one this class reads: its own family or a related one (a DPR
        encoder from a BERT checkpoint, with a warning as transformers gives); another family (RoBERTa, T5,
        DeBERTa for a BERT class, ...) is refused with a CheckpointError. Heads the checkpoint lacks are
        initialised freshly with a warning, or refused with ``allow_fresh_heads=False`` (inference)."""
        model_dir = resolve_model_dir(name_or_path)
        raw_config = read_config_json(model_dir)
        own_type, source_type = cls.config_class.model_type, raw_config.get("model_type")
        if source_type is None:
            log.warning("%s: config.json has no model_type; reading it as %s (model_type %r)", model_dir,
                        cls.__name__, own_type)
        elif source_type != own_type:
            source_class = MODEL_CLASSES.get(DEFAULT_CLASS_FOR_MODEL_TYPE.get(source_type, ""))
            related = source_class is not None and (issubclass(cls.config_class, source_class.config_class)
                                                    or issubclass(source_class.config_class, cls.config_class))
            if not related:
                readable = sorted({own_type} | {c.config_class.model_type for c in MODEL_CLASSES.values()
                                                if issubclass(cls.config_class, c.config_class)
                                                or issubclass(c.config_class, cls.config_class)})
                raise CheckpointError(f"{model_dir}: is a {source_type!r} checkpoint "
                                      f"(architectures {raw_config.get('architectures')}); {cls.__name__} reads "
                                      f"model_type {' or '.join(map(repr, readable))}")
            log.warning("%s: a model of type %r is loaded as %s (model_type %r)", model_dir, source_type,
                        cls.__name__, own_type)
        config = cls.config_class.from_dict(cls.config_dict_for(raw_config))
        config = cls.config_for_checkpoint(config, model_dir)
        model = _abstract_model(cls, config, dtype=dtype, param_dtype=param_dtype, **kwargs)
        graphdef, params, rest = nnx.split(model, CHECKPOINTED, ...)
        flat = {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(params)}
        shardings = None if mesh is None else {
            k: variable_sharding(v, mesh, LOGICAL_AXIS_RULES if rules is None else rules) for k, v in flat.items()}
        if (model_dir / ORBAX_SUBDIR).is_dir():
            values = _restore_orbax(model_dir / ORBAX_SUBDIR, params, param_dtype, shardings)
            return nnx.merge(graphdef, values, rest)
        # Tensors are opened, not read: each parameter below reads only its own (or its devices') region.
        sources = mapping.normalize_legacy_names(open_checkpoint(model_dir))
        sources = {k: as_source(v) for k, v in cls.adapt_state_dict(sources, config, raw_config).items()}
        target_shapes = {k: tuple(v.get_value().shape) for k, v in flat.items()}
        plan = mapping.parameter_rules(
            mapping.stack_rules(cls.hf_rules(config), flat), sources, target_shapes, source=str(model_dir),
            ignore_unexpected=cls.hf_ignore_unexpected, allow_missing=cls.initializable_heads)
        # Parameters load in parallel: each is a read from the page cache and a copy (transposing) that release
        # the GIL; each thread maps and unmaps only its own tensor.
        with ThreadPoolExecutor(max_workers=LOAD_THREADS) as pool:
            loading = {k: pool.submit(_load_parameter, param_rules, sources, target_shapes[k], param_dtype,
                                      None if shardings is None else shardings[k])
                       for k, param_rules in plan.items()}
            for k, future in tqdm(loading.items(), desc=f"loading {model_dir.name}", unit="tensor", leave=False,
                                  disable=None if len(plan) > 100 else True):
                flat[k].set_value(future.result())
        del sources
        fresh = [k for k in flat if k not in plan]
        if fresh and not allow_fresh_heads:
            heads = sorted({k.rsplit(".", 1)[0] for k in fresh})
            raise CheckpointError(f"{model_dir}: has no trained {', '.join(heads)} (the checkpoint is a "
                                  f"{'/'.join(raw_config.get('architectures') or [str(source_type)])}, not a "
                                  f"trained {cls.__name__}); these would be random")
        if fresh:  # heads the checkpoint lacks: initialise them for real, in one compiled function
            log.warning("%s: initialising %s freshly (not in the checkpoint)", model_dir, ", ".join(sorted(fresh)))

            def init():  # returns only the fresh heads: XLA drops every other parameter's initializer
                state = nnx.state(cls(config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype, **kwargs),
                                  CHECKPOINTED)
                values = {".".join(str(p) for p in path): v.get_value() for path, v in nnx.to_flat_state(state)}
                return {k: values[k] for k in fresh}

            # Computed on this process's default device (every process gets the same numbers from the seed), then
            # split into shards locally: a jit over a mesh that spans processes would need them all, and only
            # process 0 builds the model first (training's main_process_first).
            for k, value in jax.jit(init)().items():
                if shardings is not None:
                    host = np.asarray(value)
                    value = jax.make_array_from_callback(host.shape, shardings[k], lambda index, h=host: h[index])
                flat[k].set_value(value)
        params = nnx.from_flat_state([(tuple(_path_key(p) for p in k.split(".")), v) for k, v in flat.items()])
        return nnx.merge(graphdef, params, rest)

    @classmethod
    def config_dict_for(cls, raw_config: dict) -> dict:
        """The config dict this class reads from a checkpoint's config.json (a hook for cross-class loading)."""
        return raw_config

    @classmethod
    def config_for_checkpoint(cls, config: ModelConfig, model_dir: Path) -> ModelConfig:
        """Hook for structure that config.json alone does not settle (whether a T5 checkpoint unties lm_head)."""
        return config

    # ---- saving --------------------------------------------------------------------------------------------
    def hf_config_dict(self) -> dict:
        config = self.config.to_dict()
        config["architectures"] = [self.hf_architecture]
        return config

    def to_hf_state_dict(self, dtype=None) -> dict[str, np.ndarray]:
        params = {k: np.asarray(jax.device_get(v.get_value() if hasattr(v, "get_value") else v))
                  for k, v in flat_params(self).items()}
        if dtype is not None:
            params = {k: v.astype(dtype) for k, v in params.items()}
        return mapping.apply_rules_to_hf(mapping.stack_rules(self.hf_rules(self.config), params), params)

    def save_pretrained(self, out_dir: str | os.PathLike, *, format: str = "hf", dtype=None,
                        max_shard_bytes: int | None = None, tokenizer=None) -> Path:
        """``format="hf"``: config.json + model.safetensors for transformers. ``format="orbax"``: config.json
        + a native orbax checkpoint that :meth:`from_pretrained` reads back.

        ``tokenizer``: a transformers tokenizer (saved with its ``save_pretrained``) or a directory whose
        tokenizer files are copied, so the output directory is self-contained: the inference commands refuse a
        model directory without its tokenizer."""
        if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
            if not has_tokenizer_files(tokenizer):
                raise ValueError(f"tokenizer={tokenizer}: no tokenizer files there "
                                 f"(none of {', '.join(VOCABULARY_FILES)})")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if format == "hf":
            write_safetensors(self.to_hf_state_dict(dtype), out_dir, max_shard_bytes)
        elif format == "orbax":
            _save_orbax(self, out_dir / ORBAX_SUBDIR)
        else:
            raise ValueError(f"format must be 'hf' or 'orbax', got {format!r}")
        tmp = out_dir / "config.json.tmp"
        tmp.write_text(json.dumps(self.hf_config_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, out_dir / "config.json")
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(out_dir))
        elif tokenizer is not None:
            copy_tokenizer_files(Path(tokenizer), out_dir)
        return out_dir


def _path_key(part: str):
    return int(part) if part.isdigit() else part


def _abstract_model(cls, config, **kwargs):
    """The module with shape-only parameters. Built without rngs (parameters start as zeros), so tracing does
    not go through every weight initializer for weights about to be loaded."""
    return nnx.eval_shape(lambda: cls(config, rngs=None, **kwargs))


def _save_orbax(model: nnx.Module, path: Path) -> None:
    import orbax.checkpoint as ocp

    params = nnx.state(model, CHECKPOINTED)
    path = path.absolute()
    if path.exists():
        import shutil
        shutil.rmtree(path)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, nnx.to_pure_dict(params))


def _load_parameter(rules: list[mapping.Rule], sources, shape: tuple[int, ...], param_dtype,
                    sharding: NamedSharding | None) -> jax.Array:
    """One parameter from its checkpoint tensor(s), one copy each: whole onto the default device (a kernel
    transposed by ``jnp.asarray`` from the file's memory map; anything else read into its own aligned host
    buffer, which the CPU backend adopts as the device buffer), or with ``sharding`` each addressable device's
    slice read and copied on its own."""
    handles: dict = {}
    try:
        if sharding is None and plain_transpose(rules, sources, param_dtype):
            return jnp.asarray(parameter_region(rules, sources, shape, None, handles), dtype=param_dtype)
        if sharding is None:
            return jax.device_put(read_parameter(rules, sources, shape, param_dtype))
        return jax.make_array_from_callback(
            shape, sharding, lambda index: owned_copy(parameter_region(rules, sources, shape, index, handles),
                                                      param_dtype))
    finally:
        close_handles(handles)


def _restore_orbax(path: Path, abstract_params, param_dtype, shardings: dict[str, NamedSharding] | None = None):
    import orbax.checkpoint as ocp

    for key, variable in nnx.to_flat_state(abstract_params):  # restored straight into each parameter's sharding
        sharding = None if shardings is None else shardings[".".join(str(p) for p in key)]
        variable.set_value(jax.ShapeDtypeStruct(variable.get_value().shape, param_dtype, sharding=sharding))
    target = nnx.to_pure_dict(abstract_params)
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            restored = checkpointer.restore(path.absolute(), target)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot restore orbax checkpoint ({type(e).__name__}: {e})") from None
    nnx.replace_by_pure_dict(abstract_params, restored)
    return abstract_params


def from_pretrained(name_or_path: str | os.PathLike, **kwargs) -> PretrainedModel:
    """Load any supported model, picking the class from config.json (``architectures``, then ``model_type``)."""
    model_dir = resolve_model_dir(name_or_path)
    raw = read_config_json(model_dir)
    cls = model_class_for_config(raw, source=str(model_dir / "config.json"))
    return cls.from_pretrained(model_dir, **kwargs)


def model_class_for_config(raw: dict, source: str = "config.json") -> type[PretrainedModel]:
    for arch in raw.get("architectures") or []:
        if arch in MODEL_CLASSES:
            return MODEL_CLASSES[arch]
    model_type = raw.get("model_type")
    if model_type in DEFAULT_CLASS_FOR_MODEL_TYPE:
        return MODEL_CLASSES[DEFAULT_CLASS_FOR_MODEL_TYPE[model_type]]
    raise CheckpointError(
        f"{source}: unsupported architecture {raw.get('architectures')} (model_type {model_type!r}); "
        f"supported architectures: {', '.join(sorted(MODEL_CLASSES))}")
