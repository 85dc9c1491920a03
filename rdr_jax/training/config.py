"""Training configs: YAML files, dotted ``--set key=value`` overrides, and validation against a schema.

The schema is a nested dict of defaults: the engine's sections (``train``, ``optim``, ``mesh``) here, the
task's sections (``task``, ``model``, ``data``) from the task class. Every key a user writes must exist in
the schema (a typo is an error naming the key, not a silently ignored setting) and have a value of the
default's type. A few keys hold free-form mappings (``model.init``: a model config dict); they are listed
in ``OPEN_KEYS``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml


from rdr_jax.errors import ConfigError  # noqa: F401  (re-exported: raised by config parsing)


class Required:
    """Marks a key the user must set, with the type its value must have."""

    def __init__(self, kind: type = str):
        self.kind = kind

    def __repr__(self):
        return f"Required({self.kind.__name__})"


REQUIRED = Required(str)
REQUIRED_INT = Required(int)

ENGINE_DEFAULTS: dict[str, Any] = {
    "workdir": REQUIRED,
    "train": {
        "steps": REQUIRED_INT,
        "batch_size": REQUIRED_INT,         # questions per optimizer step (global, all devices together)
        "grad_accum_steps": 1,           # the step's batch is split into this many micro-batches
        "seed": 0,
        "checkpoint_every": 1000,
        "keep_checkpoints": 3,           # the last N; plus the best one when best_metric is set
        "async_checkpointing": True,
        "log_every": 1,
        "eval_every": 0,                 # 0: no periodic dev evaluation
        "best_metric": None,             # e.g. "dev_loss": also keep the best checkpoint by it
        "best_mode": "min",
        "export_final": True,            # write WORKDIR/final/<submodule>/ HF directories at the end
        "tensorboard": True,
        # NaN/Inf loss or gradients: "stop" (checkpoint the last good state, fail naming the step) or "skip"
        # (leave the state unchanged for that batch, count it in metrics as skipped_steps). See training/faults.py.
        "nan_policy": "stop",
        "min_free_gb": 1.0,              # refuse to start when the workdir's disk has less free space
        "peak_flops": None,              # per-device peak FLOP/s for the logged MFU (default: known accelerators)
    },
    "optim": {
        "learning_rate": 2e-5,
        "warmup_steps": 0,
        # Length of the linear decay. None means train.steps; set it explicitly when a run may be extended
        # with a larger train.steps, so the schedule (and the resumed parameters) do not change.
        "decay_steps": None,
        "end_learning_rate_factor": 0.0,
        "weight_decay": 0.0,
        "adam_b1": 0.9,
        "adam_b2": 0.999,
        "adam_eps": 1e-8,
        "max_grad_norm": 1.0,            # 0 or None: no clipping
    },
    "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
}

# Keys whose value is a free-form mapping (not validated key by key).
OPEN_KEYS = {"model.init"}

_NULLABLE = {"optim.max_grad_norm"}
_CHOICES = {"train.best_mode": ("min", "max"), "train.nan_policy": ("stop", "skip")}


def _type_ok(default: Any, value: Any) -> bool:
    if isinstance(default, Required):
        default = default.kind()
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    if isinstance(default, dict):
        return isinstance(value, dict)
    return True


def _coerce_float(default: Any, value: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` (no dot) as a string: accept it where a float is expected."""
    if isinstance(default, Required):
        default = default.kind()
    if isinstance(default, float) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _merge(schema: dict, values: dict, prefix: str, source: str) -> dict:
    out = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(f"{prefix}{k}" for k in sorted(schema))
            raise ConfigError(f"{source}: unknown config key {dotted!r} (known keys here: {known})")
        default = schema[key]
        if isinstance(default, dict) and dotted not in OPEN_KEYS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted!r} must be a mapping, got {value!r}")
            out[key] = _merge(default, value, f"{dotted}.", source)
            continue
        value = _coerce_float(default, value)
        if value is None and default is not None and dotted not in _NULLABLE:
            raise ConfigError(f"{source}: {dotted!r} must be set to a value, got null")
        if not _type_ok(default, value):
            raise ConfigError(f"{source}: {dotted!r} must be of type {type(default).__name__}, got {value!r}")
        if dotted in _CHOICES and value not in _CHOICES[dotted]:
            raise ConfigError(f"{source}: {dotted!r} must be one of {_CHOICES[dotted]}, got {value!r}")
        out[key] = value
    return out


def _fill_defaults(schema: dict, values: dict, prefix: str = "") -> dict:
    out = {}
    for key, default in schema.items():
        dotted = f"{prefix}{key}"
        if isinstance(default, dict) and dotted not in OPEN_KEYS:
            out[key] = _fill_defaults(default, values.get(key, {}), f"{dotted}.")
        elif key in values:
            out[key] = values[key]
        elif isinstance(default, Required):
            raise ConfigError(f"missing required config key {dotted!r}")
        else:
            out[key] = copy.deepcopy(default)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.steps=10"`` -> (["train", "steps"], 10); the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: cannot parse value ({e})") from None
    return key.split("."), value


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    raw = copy.deepcopy(raw)
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a mapping")
            node = child
        node[parts[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


class Config:
    """A validated config: attribute access by section (``config.train.steps``) and dotted ``get``."""

    def __init__(self, data: dict):
        self._data = data

    def __getattr__(self, name: str):
        try:
            value = self._data[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None
        return Config(value) if isinstance(value, dict) else value

    def __getitem__(self, name: str):
        return self.__getattr__(name)

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self._data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def to_dict(self) -> dict:
        return copy.deepcopy(self._data)

    def __repr__(self) -> str:
        return f"Config({self._data!r})"


def build_config(raw: dict, *, source: str = "config", overrides: Iterable[str] = (),
                 workdir: str | None = None) -> Config:
    """Validate ``raw`` (+ overrides) against the engine's and the task's schema, filling defaults."""
    from rdr_jax.tasks import get_task_class  # the task supplies its sections of the schema (until typed configs)

    raw = apply_overrides(raw, overrides)
    if workdir is not None:
        raw["workdir"] = str(workdir)
    task_section = raw.get("task")
    if not isinstance(task_section, dict) or "name" not in task_section:
        raise ConfigError(f"{source}: missing required config key 'task.name'")
    try:
        task_cls = get_task_class(task_section["name"])
    except KeyError as e:
        raise ConfigError(f"{source}: 'task.name': {e.args[0]}") from None
    schema = dict(ENGINE_DEFAULTS, **task_cls.config_schema())
    merged = _fill_defaults(schema, _merge(schema, raw, "", source))
    try:
        _check_values(merged)
        task_cls.validate_config(merged)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return Config(merged)


def load_config(path: str | Path, overrides: Iterable[str] = (), workdir: str | None = None) -> Config:
    return build_config(read_yaml(path), source=str(path), overrides=overrides, workdir=workdir)


def _check_values(c: dict) -> None:
    t, o, m = c["train"], c["optim"], c["mesh"]
    positive = {"train.steps": t["steps"], "train.batch_size": t["batch_size"],
                "train.grad_accum_steps": t["grad_accum_steps"], "train.checkpoint_every": t["checkpoint_every"],
                "train.log_every": t["log_every"], "train.keep_checkpoints": t["keep_checkpoints"]}
    for key, value in positive.items():
        if value is None or value < 1:
            raise ConfigError(f"{key!r} must be >= 1, got {value!r}")
    if t["batch_size"] % t["grad_accum_steps"]:
        raise ConfigError(f"'train.batch_size' ({t['batch_size']}) must be divisible by 'train.grad_accum_steps' "
                          f"({t['grad_accum_steps']})")
    for key in ("eval_every", "min_free_gb"):
        if t[key] < 0:
            raise ConfigError(f"'train.{key}' must be >= 0, got {t[key]!r}")
    if o["learning_rate"] <= 0:
        raise ConfigError(f"'optim.learning_rate' must be > 0, got {o['learning_rate']!r}")
    for key in ("warmup_steps", "weight_decay"):
        if o[key] < 0:
            raise ConfigError(f"'optim.{key}' must be >= 0, got {o[key]!r}")
    if o["decay_steps"] is not None and (not isinstance(o["decay_steps"], int) or o["decay_steps"] < 1):
        raise ConfigError(f"'optim.decay_steps' must be a positive integer or null, got {o['decay_steps']!r}")
    for key in ("data", "fsdp", "tensor"):
        if not isinstance(m[key], int) or (m[key] < 1 and m[key] != -1):
            raise ConfigError(f"'mesh.{key}' must be a positive integer or -1, got {m[key]!r}")
    if sum(1 for k in ("data", "fsdp", "tensor") if m[k] == -1) > 1:
        raise ConfigError("only one of 'mesh.data', 'mesh.fsdp', 'mesh.tensor' may be -1")
    if not isinstance(c["workdir"], str) or not c["workdir"]:
        raise ConfigError(f"'workdir' must be a directory path, got {c['workdir']!r}")
