"""Training configs: YAML files, dotted ``--set key=value`` overrides, and typed sections that validate them.

A config is a mapping of sections plus ``workdir``. Each section is a frozen dataclass (a ``Section``) whose
fields are declared with ``option``: the engine's here (``train``, ``optim``, ``mesh``), the task's from
``task_cls.config_sections()`` (``task``, ``model``, ``data``). One validator walks the fields: every key a
user writes must exist (a typo is an error naming the key, not a silently ignored setting) and hold a value of
the field's type, within its ``min``/``max``/``choices``; ``REQUIRED`` fields must be set. Errors name the
dotted key and blame where the value came from: the file, or the ``--set`` override that set it.

Field types: ``bool``, ``int``, ``float`` (ints accepted, and YAML 1.1's ``1e-5``, which it reads as a string),
``str``, ``list[X]`` of those, ``dict`` (a free-form mapping, e.g. ``model.init``: not checked key by key), and
``X | None`` (null allowed). A section's ``check()`` does its cross-field checks; the task's
``validate_config(config)`` the cross-section ones.

(Longer than this project's ~400-line aim: the engine's three sections, with what each key means, are ~70 lines
of it, and reading YAML strictly another ~80.)

    @dataclasses.dataclass(frozen=True)
    class DPRData(Section):
        train_file: str = option(doc="DPR training JSON")
        hard_negatives: int = option(1, min=0)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from rdr_jax.errors import ConfigError  # noqa: F401  (re-exported: raised by config parsing)


class _Required:
    def __repr__(self):
        return "REQUIRED"


REQUIRED: Any = _Required()
"""The default of a key the user must set."""


def option(default: Any = REQUIRED, *, min: float | None = None, max: float | None = None,
           choices: Iterable[Any] | None = None, doc: str = "") -> Any:
    """A config field: its default (``REQUIRED``: the user must set it), bounds, allowed values (checked on
    each item of a list) and what it means. Lists and dicts get a fresh copy of the default per config."""
    metadata = {"min": min, "max": max, "choices": None if choices is None else tuple(choices), "doc": doc}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Section:
    """Base of the config sections: subclasses are ``@dataclasses.dataclass(frozen=True)`` with ``option``
    fields. ``Section`` itself is the empty section."""

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name) if name in _fields(type(self)) else default

    def __getitem__(self, name: str) -> Any:
        if name not in _fields(type(self)):
            raise KeyError(name)
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Cross-field checks: raise ConfigError naming the keys."""


@dataclasses.dataclass(frozen=True)
class TaskSection(Section):
    """The ``task`` section: a task's own subclass adds its keys."""
    name: str = option(doc="the task (rdr_jax/tasks/<name>.py)")


# ---- the engine's sections --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    steps: int = option(min=1)
    batch_size: int = option(min=1, doc="questions per optimizer step (global, all devices together)")
    grad_accum_steps: int = option(1, min=1, doc="the step's batch is split into this many micro-batches, each "
                                                 "with its own in-batch negatives")
    grad_cache_chunk: int | None = option(None, min=0, doc=(
        "GradCache (dpr, rdr): questions per chunk (global) whose embeddings are computed, then back-propagated, "
        "one chunk at a time, the loss being over ONE batch of train.batch_size with all its in-batch negatives; "
        "memory of one chunk. 0/null: off. Not with grad_accum_steps > 1 (training/grad_cache.py)"))
    seed: int = option(0)
    checkpoint_every: int = option(1000, min=1)
    keep_checkpoints: int = option(3, min=1, doc="the last N; plus the best one when best_metric is set")
    async_checkpointing: bool = option(True)
    log_every: int = option(1, min=1)
    eval_every: int = option(0, min=0, doc="0: no periodic dev evaluation")
    best_metric: str | None = option(None, doc='e.g. "dev_loss": also keep the best checkpoint by it')
    best_mode: str = option("min", choices=("min", "max"))
    export_final: bool = option(True, doc="write WORKDIR/final/<submodule>/ HF directories at the end")
    tensorboard: bool = option(True)
    nan_policy: str = option("stop", choices=("stop", "skip"), doc=(
        'NaN/Inf loss or gradients: "stop" (checkpoint the last good state, fail naming the step) or "skip" '
        "(leave the state unchanged for that batch, count it in metrics as skipped_steps). See training/faults.py."))
    min_free_gb: float = option(1.0, min=0, doc="refuse to start when the workdir's disk has less free space")
    peak_flops: float | None = option(None, doc="per-device peak FLOP/s for the logged MFU "
                                                "(default: known accelerators)")

    def check(self) -> None:
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(f"'train.batch_size' ({self.batch_size}) must be divisible by "
                              f"'train.grad_accum_steps' ({self.grad_accum_steps})")
        if self.grad_cache_chunk:
            if self.grad_accum_steps > 1:
                raise ConfigError(f"'train.grad_cache_chunk' ({self.grad_cache_chunk}) and 'train.grad_accum_steps' "
                                  f"({self.grad_accum_steps}) both split the batch: GradCache keeps one contrastive "
                                  "batch in the memory of a chunk, so set grad_accum_steps to 1")
            if self.batch_size % self.grad_cache_chunk:
                raise ConfigError(f"'train.batch_size' ({self.batch_size}) must be divisible by "
                                  f"'train.grad_cache_chunk' ({self.grad_cache_chunk})")


@dataclasses.dataclass(frozen=True)
class OptimConfig(Section):
    learning_rate: float = option(2e-5, doc="> 0")
    warmup_steps: int = option(0, min=0)
    decay_steps: int | None = option(None, min=1, doc=(
        "Length of the linear decay. None means train.steps; set it explicitly when a run may be extended with a "
        "larger train.steps, so the schedule (and the resumed parameters) do not change."))
    end_learning_rate_factor: float = option(0.0)
    weight_decay: float = option(0.0, min=0)
    adam_b1: float = option(0.9)
    adam_b2: float = option(0.999)
    adam_eps: float = option(1e-8)
    max_grad_norm: float | None = option(1.0, doc="0 or null: no clipping")

    def check(self) -> None:
        if self.learning_rate <= 0:
            raise ConfigError(f"'optim.learning_rate' must be > 0, got {self.learning_rate!r}")


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    """Device mesh axes; their product is the device count, and one axis may be -1: the devices the others
    leave."""
    data: int = option(-1, doc="data parallelism: the batch is split over it")
    fsdp: int = option(1, doc="parameters and optimizer state sharded over it (and the batch)")
    tensor: int = option(1, doc="tensor parallelism: layers' weights split over it")

    def check(self) -> None:
        axes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for key, value in axes.items():
            if value < 1 and value != -1:
                raise ConfigError(f"'mesh.{key}' must be a positive integer or -1, got {value!r}")
        if list(axes.values()).count(-1) > 1:
            raise ConfigError("only one of 'mesh.data', 'mesh.fsdp', 'mesh.tensor' may be -1")


ENGINE_SECTIONS: dict[str, type[Section]] = {"train": TrainConfig, "optim": OptimConfig, "mesh": MeshConfig}
_WORKDIR = option(doc="the run's directory: checkpoints, metrics, config.yaml, final/")


# ---- the validator ----------------------------------------------------------------------------------------------
_QUOTED_KEY = re.compile(r"'([\w.]+)'")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_A = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
_PLURAL = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _optional(kind: Any) -> tuple[bool, Any]:
    """(null allowed, the type without None)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return True, args[0]
    return False, kind


def _describe(kind: Any) -> str:
    """The type in words; TypeError for a type the validator does not handle."""
    origin, args = typing.get_origin(kind) or kind, typing.get_args(kind)
    if origin is list and len(args) == 1 and args[0] in _PLURAL:
        return f"a list of {_PLURAL[args[0]]}"
    if origin in _A and (origin is dict or not args):
        return _A[origin]
    raise TypeError(f"unsupported config field type {kind!r}")


@functools.cache
def _fields(cls: type[Section]) -> dict[str, tuple[Any, dataclasses.Field]]:
    """{name: (type, field)} of a section class, its types resolved and checked."""
    params = cls.__dict__.get("__dataclass_params__")
    if not (isinstance(cls, type) and issubclass(cls, Section) and params is not None and params.frozen):
        raise TypeError(f"{cls!r}: a config section is a Section subclass decorated "
                        "@dataclasses.dataclass(frozen=True)")
    hints = typing.get_type_hints(cls)
    out = {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}
    for kind, _ in out.values():
        _describe(_optional(kind)[1])
    return out


def _convert(kind: Any, value: Any) -> Any:
    """``value`` as ``kind`` (a copy for lists and dicts), or ValueError."""
    origin = typing.get_origin(kind) or kind
    if origin is float and isinstance(value, str) and _NUMBER.fullmatch(value):
        return float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list and isinstance(value, list):
        return [_convert(typing.get_args(kind)[0], v) for v in value]
    if origin is dict and isinstance(value, dict):
        return copy.deepcopy(value)
    if origin in (bool, int, float, str) and isinstance(value, origin) and (origin is bool) == isinstance(value, bool):
        return value
    raise ValueError(value)


@dataclasses.dataclass
class _Origins:
    """Where values came from: the file (``source``) unless a ``--set`` override (dotted key, item) set them."""
    source: str
    overrides: list[tuple[str, str]]

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.blame(key)}: {message}")

    def blame(self, *keys: str) -> str:
        """``--set ITEM`` of the last override of one of ``keys`` (or of a mapping above it), else the file."""
        for set_key, item in reversed(self.overrides):
            if any(key == set_key or key.startswith(set_key + ".") for key in keys):
                return f"--set {item}"
        return self.source

    def reraise(self, e: ConfigError) -> ConfigError:
        """A check's error, blamed on the override of a key it names (``'train.steps'``) or on the file."""
        return ConfigError(f"{self.blame(*_QUOTED_KEY.findall(str(e)))}: {e}")


def _check_value(kind: Any, field: dataclasses.Field, value: Any, key: str, origins: _Origins) -> Any:
    nullable, kind = _optional(kind)
    if value is None:
        if nullable:
            return None
        raise origins.error(key, f"{key!r} must be set to a value, got null")
    try:
        value = _convert(kind, value)
    except ValueError:
        raise origins.error(key, f"{key!r} must be {_describe(kind)}{' or null' if nullable else ''}, "
                                 f"got {value!r}") from None
    meta = field.metadata
    items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
    for name, v in items:
        if meta.get("choices") is not None and v not in meta["choices"]:
            choices = ", ".join(map(str, meta["choices"]))
            raise origins.error(key, f"{name!r} must be one of {choices}; got {v!r}")
        if meta.get("min") is not None and v < meta["min"]:
            raise origins.error(key, f"{name!r} must be >= {meta['min']}, got {v!r}")
        if meta.get("max") is not None and v > meta["max"]:
            raise origins.error(key, f"{name!r} must be <= {meta['max']}, got {v!r}")
    return value


def _check_mapping(kinds: dict[str, tuple[Any, dataclasses.Field | None]], values: Any, prefix: str,
                   origins: _Origins) -> dict[str, Any]:
    """The checked values of one level (sections built), by name; keys left unset are left out (defaults)."""
    if values is None:  # `data:` with nothing under it
        values = {}
    if not isinstance(values, dict):
        raise origins.error(prefix, f"{prefix!r} must be a mapping, got {values!r}")
    dotted = (lambda k: f"{prefix}.{k}") if prefix else str
    for key in values:
        if key not in kinds:
            known = ", ".join(dotted(k) for k in sorted(kinds))
            raise origins.error(dotted(key), f"unknown config key {dotted(key)!r} (known keys here: {known})")
    out = {}
    for name, (kind, field) in kinds.items():
        if field is None:  # a section
            out[name] = _build_section(kind, values.get(name), dotted(name), origins)
        elif name in values:
            out[name] = _check_value(kind, field, values[name], dotted(name), origins)
        elif field.default is REQUIRED or dataclasses.MISSING is field.default is field.default_factory:
            raise origins.error(dotted(name), f"missing required config key {dotted(name)!r}")
    return out


def _build_section(cls: type[Section], values: Any, prefix: str, origins: _Origins) -> Section:
    section = cls(**_check_mapping(_fields(cls), values, prefix, origins))
    try:
        section.check()
    except ConfigError as e:
        raise origins.reraise(e) from None
    return section


# ---- the config -------------------------------------------------------------------------------------------------
class Config:
    """A validated config: ``config.train.steps``, ``config["train"]``, ``config.get("train.peak_flops")``,
    ``config.workdir``, ``config.task_class`` (the task it was built for). Immutable."""

    __slots__ = ("workdir", "task_class", "_sections")
    __hash__ = None  # type: ignore[assignment]  (free-form dict values)

    def __init__(self, workdir: str, sections: dict[str, Section], task_class: type):
        object.__setattr__(self, "workdir", workdir)
        object.__setattr__(self, "task_class", task_class)
        object.__setattr__(self, "_sections", types.MappingProxyType(dict(sections)))

    def __setattr__(self, name: str, value: Any):
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}: a config is immutable")

    __delattr__ = __setattr__

    def __reduce__(self):  # pickle and deepcopy: through __init__
        return Config, (self.workdir, dict(self._sections), self.task_class)

    def __getattr__(self, name: str) -> Section:
        if not name.startswith("_") and name in self._sections:
            return self._sections[name]
        raise AttributeError(f"config has no section {name!r}")

    def __getitem__(self, name: str) -> Any:
        return self.workdir if name == "workdir" else self._sections[name]

    def get(self, dotted: str, default: Any = None) -> Any:
        """The value at a dotted key (``"train.peak_flops"``, ``"model.init.hidden_size"``), or ``default``."""
        node: Any = {"workdir": self.workdir, **self._sections}
        for part in dotted.split("."):
            if isinstance(node, Section):
                node = node.to_dict()
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists (what WORKDIR/config.yaml holds); not the task class."""
        return {"workdir": self.workdir, **{name: s.to_dict() for name, s in self._sections.items()}}

    def with_overrides(self, *overrides: str) -> Config:
        """A copy with ``key=value`` overrides applied, validated again."""
        return build_config(self.to_dict(), self.task_class, source="config", overrides=overrides)

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return self.task_class is other.task_class and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Config({getattr(self.task_class, '__name__', self.task_class)}, {self.to_dict()!r})"


def build_config(raw: dict, task_cls: type, *, source: str = "config", overrides: Iterable[str] = (),
                 workdir: str | None = None) -> Config:
    """Validate ``raw`` (+ overrides, + ``workdir`` when given) against the engine's sections and
    ``task_cls.config_sections()``, filling defaults; then ``task_cls.validate_config(config)``."""
    raw, set_keys = _apply_overrides(raw, overrides)
    if workdir is not None:
        raw["workdir"] = str(workdir)
    origins = _Origins(source, set_keys)
    task_sections = task_cls.config_sections()
    if "name" not in _fields(task_sections.get("task", Section)) or task_sections.keys() & ENGINE_SECTIONS.keys():
        raise TypeError(f"{task_cls.__name__}.config_sections() must give 'task' (with 'name') and no engine "
                        f"section ({', '.join(ENGINE_SECTIONS)})")
    sections = {**ENGINE_SECTIONS, **task_sections}
    kinds = {"workdir": (str, _WORKDIR), **{name: (cls, None) for name, cls in sections.items()}}
    values = _check_mapping(kinds, raw, "", origins)
    if not values["workdir"]:
        raise origins.error("workdir", "'workdir' must be a directory path, got ''")
    config = Config(values.pop("workdir"), values, task_cls)
    expected = getattr(task_cls, "name", None)
    if isinstance(expected, str) and config.task.name != expected:
        raise origins.error("task.name", f"'task.name' is {config.task.name!r}, but the config is validated "
                                         f"for task {expected!r}")
    if config.train.grad_cache_chunk and not getattr(task_cls, "supports_grad_cache", lambda: False)():
        raise origins.error("train.grad_cache_chunk", f"'train.grad_cache_chunk' needs a task whose loss is a "
                            f"function of embeddings (dpr, rdr); task {config.task.name!r} has none")
    try:
        task_cls.validate_config(config)
    except ConfigError as e:
        raise origins.reraise(e) from None
    return config


def load_config(path: str | Path, overrides: Iterable[str] = (), workdir: str | None = None, *,
                resolve_task: Callable[[str], type]) -> Config:
    """The config in a YAML file, with overrides; ``resolve_task(name)`` gives the class of ``task.name``
    (KeyError listing the known tasks when there is none)."""
    raw, overrides = read_yaml(path), list(overrides)
    applied, set_keys = _apply_overrides(raw, overrides)
    origins = _Origins(str(path), set_keys)
    task = applied.get("task")
    if not isinstance(task, dict) or task.get("name") is None:
        raise origins.error("task.name", "missing required config key 'task.name'")
    if not isinstance(task["name"], str):
        raise origins.error("task.name", f"'task.name' must be a string, got {task['name']!r}")
    try:
        task_cls = resolve_task(task["name"])
    except KeyError as e:
        raise origins.error("task.name", f"'task.name': {e.args[0] if e.args else e}") from None
    return build_config(raw, task_cls, source=str(path), overrides=overrides, workdir=workdir)


# ---- YAML and overrides -----------------------------------------------------------------------------------------
class _DuplicateKey(Exception):
    pass


class _Loader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first:
                    raise _DuplicateKey(f"{line}: duplicate key {key!r} (first at line {first[key]})")
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_error(where: str, e: Exception) -> str:
    """A YAML error in one line: ``WHERE:LINE:COL: invalid YAML: problem (context)``."""
    if isinstance(e, _DuplicateKey):
        return f"{where}:{e}"
    mark, context, start = (getattr(e, k, None) for k in ("problem_mark", "context", "context_mark"))
    if mark is not None:
        where += f":{mark.line + 1}:{mark.column + 1}"
    if context and start is not None:
        context += f" at {start.line + 1}:{start.column + 1}"
    text = f"{getattr(e, 'problem', None) or e}" + (f" ({context})" if context else "")
    return f"{where}: invalid YAML: {' '.join(text.split())}"


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = _load_yaml(path.read_text())
    except (yaml.YAMLError, _DuplicateKey) as e:
        raise ConfigError(_yaml_error(str(path), e)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.steps=10"`` -> (["train", "steps"], 10); the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: bad key {key!r}")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except (yaml.YAMLError, _DuplicateKey) as e:
        raise ConfigError(f"--set {item!r}: cannot parse value ({_yaml_error('value', e)})") from None
    return key.split("."), value


def _apply_overrides(raw: dict, overrides: Iterable[str]) -> tuple[dict, list[tuple[str, str]]]:
    """(a copy of ``raw`` with the overrides applied, [(dotted key, override)] in order)."""
    raw = copy.deepcopy(raw)
    set_keys = []
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a mapping")
            node = child
        node[parts[-1]] = value
        set_keys.append((".".join(parts), item))
    return raw, set_keys


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    return _apply_overrides(raw, overrides)[0]
