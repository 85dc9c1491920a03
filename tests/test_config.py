"""Typed training configs: sections, the validator's messages, overrides, YAML errors (rdr_jax/training/config.py)."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import subprocess
import sys

import pytest
import yaml

from rdr_jax.training.config import (REQUIRED, Config, ConfigError, OptimConfig, Section, TaskSection, TrainConfig,
                                     build_config, load_config, option, read_yaml)


@dataclasses.dataclass(frozen=True)
class FakeTaskSection(TaskSection):
    temperature: float = option(1.0, min=0.5, max=4.0)
    loss: str = option("nll", choices=("nll", "margin"))


@dataclasses.dataclass(frozen=True)
class FakeModel(Section):
    path: str | None = option(None)
    init: dict | None = option(None, doc="a model config dict")
    remat: bool = option(False)


@dataclasses.dataclass(frozen=True)
class FakeData(Section):
    train_file: str = option(REQUIRED)
    max_length: int = option(256, min=4)
    dev_k: list[int] = option([1, 5, 20], min=1)
    splits: list[str] = option(["train"])


class FakeTask:
    name = "fake"

    @classmethod
    def config_sections(cls):
        return {"task": FakeTaskSection, "model": FakeModel, "data": FakeData}

    @classmethod
    def validate_config(cls, config):
        if config.model.path is None and config.model.init is None:
            raise ConfigError("set 'model.path' or 'model.init'")


TASKS = {"fake": FakeTask}


def resolve(name):
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def raw(**sections):
    base = {"workdir": "/tmp/run", "train": {"steps": 10, "batch_size": 8}, "task": {"name": "fake"},
            "model": {"path": "m"}, "data": {"train_file": "t.json"}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


def build(*overrides, source="x.yaml", **sections):
    return build_config(raw(**sections), FakeTask, source=source, overrides=overrides)


def error(*overrides, **sections) -> str:
    with pytest.raises(ConfigError) as e:
        build(*overrides, **sections)
    return str(e.value)


def test_defaults_filled_and_access():
    c = build()
    assert c.train.steps == 10 and c.train.grad_accum_steps == 1 and c.train.nan_policy == "stop"
    assert c.optim.learning_rate == 2e-5 and c.optim.decay_steps is None and c.optim.max_grad_norm == 1.0
    assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (-1, 1, 1)
    assert c.task.name == "fake" and c.task.temperature == 1.0 and c.data.dev_k == [1, 5, 20]
    assert c["train"] is c.train and c["workdir"] == c.workdir == "/tmp/run"
    assert c.get("train.peak_flops") is None and c.get("train.nope", 3) == 3 and c.get("optim.adam_b1") == 0.9
    assert c.model.get("init") is None and c.model.get("nope", 1) == 1 and c.data["max_length"] == 256
    assert c.task_class is FakeTask
    c = build("model.init={hidden_size: 8}")
    assert c.get("model.init.hidden_size") == 8 and c.get("model.init.nope") is None
    assert c.model.init == {"hidden_size": 8}
    d = c.to_dict()
    assert list(d) == ["workdir", "train", "optim", "mesh", "task", "model", "data"]
    assert d["train"]["min_free_gb"] == 1.0 and d["data"]["splits"] == ["train"]
    assert yaml.safe_load(yaml.safe_dump(d)) == d   # what WORKDIR/config.yaml holds
    with pytest.raises(AttributeError):
        c.nosection


def test_list_defaults_are_not_shared():
    a, b = build(), build()
    assert a.data.dev_k == b.data.dev_k and a.data.dev_k is not b.data.dev_k
    assert FakeData(train_file="x").dev_k is not FakeData(train_file="y").dev_k


def test_to_dict_round_trips_and_configs_compare_by_value():
    c = build("model.init={hidden_size: 8, layers: [1, 2]}", "optim.learning_rate=1e-3", "data.dev_k=[2]")
    again = build_config(c.to_dict(), FakeTask)
    assert again == c and again.to_dict() == c.to_dict()
    assert build() != c
    assert pickle.loads(pickle.dumps(c)) == c and copy.deepcopy(c) == c
    assert c.with_overrides("train.steps=3").train.steps == 3 and c.train.steps == 10


def test_config_is_immutable():
    c = build()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.train.steps = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.workdir = "/elsewhere"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.train = c.optim
    # the values are copies: changing the raw dict (or to_dict's) later does not reach the config
    r = raw(model={"init": {"a": 1}})
    c = build_config(r, FakeTask)
    r["model"]["init"]["a"] = 2
    c.to_dict()["model"]["init"]["a"] = 3
    assert c.model.init == {"a": 1}


def test_unknown_key_names_it_and_the_known_ones():
    msg = error(train={"stpes": 3})
    assert msg.startswith("x.yaml: unknown config key 'train.stpes' (known keys here: train.async_checkpointing, "
                          "train.batch_size,")
    assert "train.steps" in msg
    assert error("train.stpes=3").startswith("--set train.stpes=3: unknown config key 'train.stpes'")
    assert "unknown config key 'trian' (known keys here: data, mesh, model, optim, task, train, workdir)" in \
        error(trian={"steps": 1})


def test_missing_required_key():
    r = raw()
    del r["train"]["steps"]
    with pytest.raises(ConfigError, match=r"^cfg: missing required config key 'train\.steps'$"):
        build_config(r, FakeTask, source="cfg")
    r = raw()
    del r["data"]
    with pytest.raises(ConfigError, match=r"missing required config key 'data\.train_file'"):
        build_config(r, FakeTask)
    r = raw()
    del r["workdir"]
    with pytest.raises(ConfigError, match="missing required config key 'workdir'"):
        build_config(r, FakeTask)
    assert build_config(r, FakeTask, workdir="/w").workdir == "/w"


def test_wrong_type_blames_the_file_or_the_override():
    assert error(train={"steps": "abc"}) == "x.yaml: 'train.steps' must be an integer, got 'abc'"
    assert error("train.steps=abc") == "--set train.steps=abc: 'train.steps' must be an integer, got 'abc'"
    # the last override of the key (or of the section above it) is the one blamed
    assert error("train.steps=3", "train={steps: x, batch_size: 8}").startswith("--set train={steps: x")
    assert error("optim.adam_b1=yes") == "--set optim.adam_b1=yes: 'optim.adam_b1' must be a number, got True"
    assert error("task.loss=3") == "--set task.loss=3: 'task.loss' must be a string, got 3"
    assert error("model.remat=1") == "--set model.remat=1: 'model.remat' must be true or false, got 1"
    assert error("train.peak_flops=fast") == ("--set train.peak_flops=fast: 'train.peak_flops' must be a number or "
                                              "null, got 'fast'")
    assert error("data.dev_k=[1, x]") == ("--set data.dev_k=[1, x]: 'data.dev_k' must be a list of integers, "
                                          "got [1, 'x']")
    assert error("data.splits=train") == "--set data.splits=train: 'data.splits' must be a list of strings, got 'train'"
    assert error("model.init=[1]") == "--set model.init=[1]: 'model.init' must be a mapping or null, got [1]"
    r = raw()
    r["train"] = 3
    with pytest.raises(ConfigError, match=r"^cfg: 'train' must be a mapping, got 3$"):
        build_config(r, FakeTask, source="cfg")


def test_booleans_are_not_integers_and_ints_are_floats():
    assert error("train.steps=true") == "--set train.steps=true: 'train.steps' must be an integer, got True"
    assert error("data.dev_k=[1, false]").endswith("must be a list of integers, got [1, False]")
    c = build("optim.learning_rate=1", "train.min_free_gb=0")
    assert c.optim.learning_rate == 1.0 and isinstance(c.optim.learning_rate, float)
    assert isinstance(c.train.min_free_gb, float)


def test_float_from_yaml_1_1_exponent_string():
    assert yaml.safe_load("lr: 1e-5")["lr"] == "1e-5"   # why: YAML 1.1 wants a dot in a float
    c = build(optim={"learning_rate": "1e-5", "adam_eps": "1E-8"})
    assert c.optim.learning_rate == 1e-5 and c.optim.adam_eps == 1e-8
    assert build("optim.learning_rate=3e-4").optim.learning_rate == 3e-4
    assert error(optim={"learning_rate": "nan"}) == "x.yaml: 'optim.learning_rate' must be a number, got 'nan'"


def test_null_only_where_allowed():
    assert error("train.steps=null") == "--set train.steps=null: 'train.steps' must be set to a value, got null"
    assert error(train={"nan_policy": None}) == "x.yaml: 'train.nan_policy' must be set to a value, got null"
    c = build("optim.max_grad_norm=null", "optim.decay_steps=null", "train.best_metric=null")
    assert c.optim.max_grad_norm is None and c.optim.decay_steps is None


def test_choices_and_bounds():
    assert error("train.nan_policy=ignore") == ("--set train.nan_policy=ignore: 'train.nan_policy' must be one of "
                                                "stop, skip; got 'ignore'")
    assert error(task={"loss": "hinge"}) == "x.yaml: 'task.loss' must be one of nll, margin; got 'hinge'"
    assert error("train.steps=0") == "--set train.steps=0: 'train.steps' must be >= 1, got 0"
    assert error("train.eval_every=-1").endswith("'train.eval_every' must be >= 0, got -1")
    assert error("train.min_free_gb=-0.5").endswith("'train.min_free_gb' must be >= 0, got -0.5")
    assert error("task.temperature=5").endswith("'task.temperature' must be <= 4.0, got 5.0")
    assert error("data.dev_k=[1, 0]") == "--set data.dev_k=[1, 0]: 'data.dev_k[1]' must be >= 1, got 0"
    assert error("optim.decay_steps=0").endswith("'optim.decay_steps' must be >= 1, got 0")
    # a section's check() blames the override of a key its message names, else the file
    assert error("optim.learning_rate=0") == ("--set optim.learning_rate=0: 'optim.learning_rate' must be > 0, "
                                              "got 0.0")
    assert error(optim={"learning_rate": -1}) == "x.yaml: 'optim.learning_rate' must be > 0, got -1.0"
    assert error("optim.warmup_steps=-1").endswith("'optim.warmup_steps' must be >= 0, got -1")


def test_engine_cross_field_checks():
    assert error(train={"grad_accum_steps": 3}) == ("x.yaml: 'train.batch_size' (8) must be divisible by "
                                                    "'train.grad_accum_steps' (3)")
    assert error("train.grad_accum_steps=3").startswith("--set train.grad_accum_steps=3: 'train.batch_size' (8)")
    assert build("train.grad_accum_steps=4").train.grad_accum_steps == 4
    assert error(mesh={"fsdp": -1}) == "x.yaml: only one of 'mesh.data', 'mesh.fsdp', 'mesh.tensor' may be -1"
    assert error("mesh.tensor=0") == "--set mesh.tensor=0: 'mesh.tensor' must be a positive integer or -1, got 0"
    c = build("mesh.data=2", "mesh.fsdp=-1")
    assert (c.mesh.data, c.mesh.fsdp) == (2, -1)
    r = raw()
    r["workdir"] = ""
    with pytest.raises(ConfigError, match="'workdir' must be a directory path"):
        build_config(r, FakeTask)


def test_task_validate_config_gets_the_typed_config():
    seen = []

    class Task(FakeTask):
        @classmethod
        def validate_config(cls, config):
            seen.append(config)
            super().validate_config(config)

    c = build_config(raw(), Task)
    assert seen == [c] and isinstance(seen[0], Config) and seen[0].task_class is Task
    # its errors are blamed like a section's check(): on the override of a key they name, else the file
    with pytest.raises(ConfigError, match=r"^x\.yaml: set 'model\.path' or 'model\.init'$"):
        build(model={"path": None})
    with pytest.raises(ConfigError, match=r"^--set model\.path=null: set 'model\.path' or 'model\.init'$"):
        build("model.path=null")
    assert build("model.path=null", "model.init={a: 1}").model.init == {"a": 1}
    # the config of another task is refused
    with pytest.raises(ConfigError, match="'task.name' is 'other'"):
        build("task.name=other")


def test_a_section_must_be_a_frozen_dataclass():
    class Loose(Section):
        x: int = 1

    @dataclasses.dataclass(frozen=True)
    class Odd(Section):
        x: set = option(None)

    for sections in ({"data": Loose}, {"data": Odd}, {"task": Section}, {"train": FakeData}):
        class Task(FakeTask):
            @classmethod
            def config_sections(cls):
                return {**FakeTask.config_sections(), **sections}

        with pytest.raises(TypeError):
            build_config(raw(data={}), Task)


def test_a_plain_dataclass_field_without_default_is_required():
    @dataclasses.dataclass(frozen=True)
    class Data(Section):
        train_file: str
        n: int = 2

    class Task(FakeTask):
        @classmethod
        def config_sections(cls):
            return {**FakeTask.config_sections(), "data": Data}

    assert build_config(raw(), Task).data.n == 2
    with pytest.raises(ConfigError, match="missing required config key 'data.train_file'"):
        build_config({**raw(), "data": {"n": 3}}, Task)


def test_the_engine_does_not_import_the_tasks():
    code = "import sys, rdr_jax.training.config; print(any(m.startswith('rdr_jax.tasks') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def write(tmp_path, text, name="x.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


CONFIG = """\
workdir: /tmp/run
task:
  name: fake
train:
  steps: 10
  batch_size: 8
model:
  path: m
data:
  train_file: t.json
"""


def test_load_config_resolves_the_task(tmp_path):
    path = write(tmp_path, CONFIG)
    c = load_config(path, ["train.steps=2"], workdir=str(tmp_path), resolve_task=resolve)
    assert c.train.steps == 2 and c.workdir == str(tmp_path) and c.task_class is FakeTask
    assert load_config(path, iter(["train.steps=3"]), resolve_task=resolve).train.steps == 3
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.steps=abc"], resolve_task=resolve)
    assert str(e.value) == "--set train.steps=abc: 'train.steps' must be an integer, got 'abc'"
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, CONFIG.replace("steps: 10", "steps: abc"), "y.yaml"), resolve_task=resolve)
    assert str(e.value) == f"{tmp_path}/y.yaml: 'train.steps' must be an integer, got 'abc'"


def test_unknown_or_missing_task_name(tmp_path):
    path = write(tmp_path, CONFIG.replace("name: fake", "name: nosuch"))
    with pytest.raises(ConfigError) as e:
        load_config(path, resolve_task=resolve)
    assert str(e.value) == f"{path}: 'task.name': unknown task 'nosuch'; known tasks: fake"
    with pytest.raises(ConfigError, match=r"^--set task\.name=x: 'task\.name': unknown task 'x'; known tasks: fake"):
        load_config(write(tmp_path, CONFIG, "ok.yaml"), ["task.name=x"], resolve_task=resolve)
    path = write(tmp_path, CONFIG.replace("  name: fake\n", "  other: 1\n"), "noname.yaml")
    with pytest.raises(ConfigError, match=r"noname\.yaml: missing required config key 'task\.name'"):
        load_config(path, resolve_task=resolve)
    with pytest.raises(ConfigError, match=r"'task\.name' must be a string, got 3"):
        load_config(path, ["task.name=3"], resolve_task=resolve)


def test_yaml_syntax_error_has_line_column_and_the_whole_message_on_one_line(tmp_path):
    path = write(tmp_path, "train:\n  steps: 3\n  batch_size: 8: 9\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(path)
    assert str(e.value) == f"{path}:3:16: invalid YAML: mapping values are not allowed here"
    path = write(tmp_path, "train:\n  steps: [1, 2\nmodel: {}\n", "y.yaml")
    with pytest.raises(ConfigError) as e:
        read_yaml(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3:") and "invalid YAML: " in msg and "\n" not in msg
    assert "while parsing a flow sequence" in msg    # the context too, not only the first line


def test_duplicate_keys_are_refused_anywhere(tmp_path):
    text = "train:\n  steps: 3\n  batch_size: 8\n  steps: 4\n"
    with pytest.raises(ConfigError) as e:
        read_yaml(write(tmp_path, text))
    assert str(e.value) == f"{tmp_path}/x.yaml:4: duplicate key 'steps' (first at line 2)"
    with pytest.raises(ConfigError, match=r"y\.yaml:3: duplicate key 'train' \(first at line 1\)"):
        read_yaml(write(tmp_path, "train: {}\nmodel: {init: {a: 1, b: 2}}\ntrain: {}\n", "y.yaml"))
    with pytest.raises(ConfigError, match=r"z\.yaml:2: duplicate key 'a' \(first at line 2\)"):
        read_yaml(write(tmp_path, "model:\n  init: {a: 1, a: 2}\n", "z.yaml"))
    # merge keys are not duplicates
    assert read_yaml(write(tmp_path, "base: &b {x: 1}\nother:\n  <<: *b\n  y: 2\n", "m.yaml"))["other"] == \
        {"x": 1, "y": 2}


def test_read_yaml_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        read_yaml(write(tmp_path, "- 1\n- 2\n"))
    assert read_yaml(write(tmp_path, "", "empty.yaml")) == {}


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected key=value"):
        build("train.steps")
    with pytest.raises(ConfigError, match="bad key"):
        build("train..steps=1")
    with pytest.raises(ConfigError, match=r"cannot parse value .*invalid YAML"):
        build("model.init={a: [1}")
    with pytest.raises(ConfigError, match="'steps' is not a mapping"):
        build("train.steps.x=1")


def test_engine_sections_keep_their_docs():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert "micro-batches" in fields["grad_accum_steps"].metadata["doc"]
    assert "train.steps" in {f.name: f for f in dataclasses.fields(OptimConfig)}["decay_steps"].metadata["doc"]
