"""Cross-encoder checkpoints for training: a classifier directory as is, a plain BERT/DeBERTa body staged with a
fresh classification head, or a random classifier from ``model.init``; and which logit scores relevance."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from rdr_jax.convert.hf_io import resolve_model_dir
from rdr_jax.errors import ConfigError
from rdr_jax.models.base import from_pretrained, model_class_for_config
from rdr_jax.models.bert import BertForSequenceClassification
from rdr_jax.models.config import read_config_json
from rdr_jax.models.deberta_v2 import DebertaV2ForSequenceClassification
from rdr_jax.retrieval.rerank import default_label_index
from rdr_jax.tasks.model_setup import model_runtime_kwargs, random_model_dir

log = logging.getLogger(__name__)

CLASSIFIERS = {"bert": BertForSequenceClassification, "deberta_v2": DebertaV2ForSequenceClassification}
FAMILY_OF_MODEL_TYPE = {"bert": "bert", "deberta-v2": "deberta_v2"}


def classifier_dir(path: str, stage_dir: Path, num_labels: int) -> Path:
    """``path`` when it is a cross-encoder checkpoint; for a plain BertModel / DebertaV2Model checkpoint, a
    staged copy under ``stage_dir`` (its files linked, config.json naming the classifier with ``num_labels``)
    from which the classifier loads the body and initialises a fresh head."""
    model_dir = resolve_model_dir(path)
    raw = read_config_json(model_dir)
    cls = model_class_for_config(raw, str(model_dir / "config.json"))
    if cls in CLASSIFIERS.values():
        return model_dir
    family = FAMILY_OF_MODEL_TYPE.get(raw.get("model_type"))
    if family is None:
        raise ConfigError(f"'model.path' {model_dir}: a {cls.__name__} cannot be a cross-encoder "
                          f"(expected a BERT or DeBERTa-v2/v3 checkpoint)")
    stage_dir.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        link = stage_dir / f.name
        if f.name != "config.json" and not link.exists():
            os.symlink(f.resolve(), link)
    config = {k: v for k, v in raw.items() if k not in ("id2label", "label2id")}
    config.update(architectures=[CLASSIFIERS[family].hf_architecture], num_labels=num_labels)
    (stage_dir / "config.json").write_text(json.dumps(config, indent=2))
    log.info("%s is a %s: training a cross-encoder with a fresh %d-logit head (staged in %s)", model_dir,
             cls.__name__, num_labels, stage_dir)
    return stage_dir


def random_classifier_dir(model_cfg, out_dir: Path, seed: int) -> Path:
    """A random classifier of ``model.family`` from ``model.init`` (built once: a resumed run reuses it)."""
    return random_model_dir(CLASSIFIERS[model_cfg.family], model_cfg.init, out_dir, seed,
                            what="a random cross-encoder ('model.family')",
                            defaults={"num_labels": model_cfg.num_labels})


def load_classifier(model_dir: Path, model_cfg, mesh=None):
    kw = model_runtime_kwargs(model_cfg, mesh)
    if read_config_json(model_dir).get("model_type") == "deberta-v2":
        kw["relative_attention_impl"] = model_cfg.relative_attention_impl
    model = from_pretrained(model_dir, **kw)
    if type(model) not in CLASSIFIERS.values():
        raise ConfigError(f"{model_dir}: is a {type(model).__name__}, not a cross-encoder")
    return model


def label_index(model, configured: int | None, what: str) -> int:
    labels = int(model.config.labels)
    index = default_label_index(labels) if configured is None else configured
    if not 0 <= index < labels:
        raise ConfigError(f"'{what}' {index} is out of range for a classifier with {labels} labels")
    return index
