"""Training objectives, one module per task (``task.name`` in a config is the module's name), and the config
loading that knows them.

A task module registers its class with ``@rdr_jax.training.task.register_task`` when imported; the engine itself
never imports a task. Shared pieces live in modules named for them (``bi_encoder``, ``generative``,
``model_setup``, ``cross_encoder_models``), which register nothing.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Iterable

from rdr_jax.training import config
from rdr_jax.training.task import TASKS, Task


def get_task_class(name: str) -> type[Task]:
    """The task class registered as ``name``, importing ``rdr_jax.tasks.<name>`` when needed; a KeyError listing
    the known tasks otherwise."""
    if name not in TASKS and isinstance(name, str) and name.isidentifier():
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())}")
    return TASKS[name]


def known_tasks() -> list[str]:
    """Every registered task name, after importing every module of this package (each registers its own)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return sorted(TASKS)


def load_config(path: str | Path, overrides: Iterable[str] = (), workdir: str | None = None) -> config.Config:
    """The validated config of a YAML file (``--set`` overrides and ``--workdir`` applied), for its task."""
    return config.load_config(path, overrides, workdir=workdir, resolve_task=get_task_class)


def build_config(raw: dict, *, source: str = "config", overrides: Iterable[str] = (),
                 workdir: str | None = None) -> config.Config:
    """The validated config of a config mapping, for the task ``raw["task"]["name"]`` names."""
    name = (raw.get("task") or {}).get("name") if isinstance(raw.get("task"), dict) else None
    return config.build_config(raw, get_task_class(name), source=source, overrides=overrides, workdir=workdir)
