"""What the generative-retrieval tasks (``seq2seq_index``, ``dgr``) share: the model section (``model.path`` or a
tiny random T5/BART from ``model.init`` with a word-level tokenizer built from the data, since no pretrained
T5/BART tokenizer is available offline), the identifiers of the passages, and the export
(``WORKDIR/final/retriever/``: the model, its tokenizer and ``identifiers.tsv``, what ``rdr-jax generate`` needs).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path


from rdr_jax.data.files import resolve_data_path
from rdr_jax.data.seq2seq_inputs import build_word_tokenizer, load_seq2seq_tokenizer, read_passages
from rdr_jax.decoding.identifiers import atomic_identifiers, read_identifier_tsv, title_identifiers
from rdr_jax.models import BartForConditionalGeneration, T5ForConditionalGeneration, from_pretrained
from rdr_jax.models.seq2seq import Seq2SeqLM
from rdr_jax.tasks.model_setup import ModelSpec, model_runtime_kwargs, random_model_dir, resolve_path
from rdr_jax.training import model_flops as F
from rdr_jax.training.config import ConfigError, Section, option
from rdr_jax.training.task import FileDataTask, ModelBundle

log = logging.getLogger(__name__)

# The trained submodule's name (and the export directory WORKDIR/final/retriever/).
RETRIEVER = "retriever"
IDENTIFIERS_TSV = "identifiers.tsv"

FAMILIES = ("t5", "bart")
IDENTIFIER_KINDS = ("atomic", "title")


@dataclasses.dataclass(frozen=True)
class GeneratorModel(ModelSpec):
    """The ``model`` section of the generative tasks (``model.tokenizer`` defaults to model.path, or to one built
    from the data for model.init)."""
    path: str | None = option(None, doc="HF dir of a T5ForConditionalGeneration / BartForConditionalGeneration "
                                        "(t5-base, bart-large, or a trained base retriever)")
    family: str = option("t5", choices=FAMILIES, doc="with model.init: t5 | bart")


@dataclasses.dataclass(frozen=True)
class IdentifierData(Section):
    """How passages are named: an identifiers TSV, or identifiers built from the passages TSV."""
    passages_file: str | None = option(None, doc="DPR passages TSV (id, text, title)")
    identifiers_file: str | None = option(None, doc="passage_id<TAB>identifier TSV; else built from passages_file "
                                                    "by identifier_kind")
    identifier_kind: str = option("atomic", choices=IDENTIFIER_KINDS)
    max_identifier_length: int = option(0, min=0, doc="target tokens (EOS included); 0 = the longest identifier "
                                                      "in the data")


def build_random_generator(init: dict, family: str, out_dir: Path, seed: int, tokenizer) -> Path:
    """A random T5/BART from ``model.init`` saved (with its tokenizer) as an HF directory, once: a resumed run
    reuses it. Token ids come from the tokenizer; the vocabulary is rounded up to a multiple of 128 (as t5's
    32128) so it splits evenly over tensor-parallel devices."""
    defaults = {"vocab_size": -(-len(tokenizer) // 128) * 128, "pad_token_id": tokenizer.pad_token_id,
                "eos_token_id": tokenizer.eos_token_id}
    if family == "t5":
        defaults["decoder_start_token_id"] = tokenizer.pad_token_id
        cls = T5ForConditionalGeneration
    else:
        defaults.update(bos_token_id=tokenizer.bos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
                        forced_eos_token_id=tokenizer.eos_token_id)
        cls = BartForConditionalGeneration
    vocab_size = dict(init or {}).get("vocab_size", defaults["vocab_size"])
    if vocab_size < len(tokenizer):
        raise ConfigError(f"'model.init.vocab_size' {vocab_size} is smaller than the tokenizer's "
                          f"{len(tokenizer)} tokens")
    return random_model_dir(cls, init, out_dir, seed, what=f"a random {family}", defaults=defaults,
                            tokenizer=tokenizer)


def identifier_mapping(data_cfg, passages: list[dict] | None) -> dict[str, str]:
    """{passage_id: identifier string} from ``data.identifiers_file`` or, failing that, built from the passages
    by ``data.identifier_kind``."""
    if data_cfg.identifiers_file:
        path = resolve_data_path(data_cfg.identifiers_file)
        if not path.is_file():
            raise ConfigError(f"{path}: identifiers file ('data.identifiers_file') not found")
        return read_identifier_tsv(path)
    if passages is None:
        raise ConfigError("set 'data.identifiers_file' (passage_id<TAB>identifier) or 'data.passages_file' "
                          "(identifiers are then built by 'data.identifier_kind')")
    if data_cfg.identifier_kind == "atomic":
        return atomic_identifiers(p["id"] for p in passages)
    return title_identifiers([p["id"] for p in passages], [p["title"] for p in passages])


def write_identifier_tsv(mapping: dict[str, str], path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for pid, identifier in mapping.items():
            f.write(f"{pid}\t{identifier}\n")
    os.replace(tmp, path)
    return path


# ---- the shared task base --------------------------------------------------------------------------------------
class GenerativeTask(FileDataTask):
    """Model, tokenizer and identifiers of a generative retriever (one trained submodule, ``retriever``)."""

    def __init__(self, config, workdir):
        super().__init__(config, workdir)
        self._paths: tuple[str, str] | None = None
        self._tokenizer = None
        self._passages: list[dict] | None = None

    @classmethod
    def validate_config(cls, c):
        if not (c.model.path or c.model.init):
            raise ConfigError("set 'model.path' (a T5/BART directory) or 'model.init' (a config dict for a random model)")

    def tokenizer_texts(self) -> list[str]:
        """Texts a tokenizer for a random model is built from (only used with model.init)."""
        return [t for p in (self.passages or []) for t in (p["title"], p["text"])]

    @property
    def passages(self) -> list[dict] | None:
        if self._passages is None and self.config.data.passages_file:
            self._passages = read_passages(self.config.data.passages_file)
        return self._passages

    def paths(self) -> tuple[str, str]:
        """(model directory, tokenizer directory)."""
        if self._paths is None:
            m = self.config.model
            if m.path:
                model_dir = resolve_path(m.path)
            else:
                out = self.workdir / "init" / m.family
                if m.tokenizer:
                    tokenizer = load_seq2seq_tokenizer(resolve_path(m.tokenizer))
                elif (out / "config.json").is_file():
                    tokenizer = None
                else:
                    tokenizer = build_word_tokenizer(self.tokenizer_texts(), m.family)
                model_dir = str(out if tokenizer is None else
                                build_random_generator(m.init, m.family, out, self.config.train.seed, tokenizer))
            self._paths = (model_dir, resolve_path(m.tokenizer) or model_dir)
        return self._paths

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_seq2seq_tokenizer(self.paths()[1])
        return self._tokenizer

    def build_model(self) -> ModelBundle:
        model_dir = self.paths()[0]
        model = from_pretrained(model_dir, **model_runtime_kwargs(self.config.model, self.mesh))
        if not isinstance(model, Seq2SeqLM):
            raise ConfigError(f"'model.path' {model_dir}: is a {type(model).__name__}, not a T5/BART "
                              "conditional-generation model")
        if len(self.tokenizer) > model.config.vocab_size:
            raise ConfigError(f"{model_dir}: the tokenizer has {len(self.tokenizer)} tokens, more than the model's "
                              f"vocabulary of {model.config.vocab_size}")
        return self.bundle(**{RETRIEVER: model})

    def trainable_submodules(self):
        return (RETRIEVER,)

    def retriever_step_flops(self, encoder_rows: int, source_length: int, decoder_rows: int, target_length: int,
                             cross_rows: int | None = None) -> float:
        """The trained retriever, teacher forced (see :func:`rdr_jax.training.model_flops.seq2seq`)."""
        config, compute = self.model_specs[RETRIEVER]
        return F.train_flops(F.seq2seq(config, encoder_rows, source_length, decoder_rows, target_length,
                                       cross_rows=cross_rows), trained=True, remat=F.recomputes_layers(compute))

    def identifiers_tsv(self) -> Path | None:
        """The identifiers the run trained on, as a TSV (written once into the workdir when built here)."""
        d = self.config.data
        if d.identifiers_file:
            return resolve_data_path(d.identifiers_file)
        if not d.passages_file:
            return None
        path = self.workdir / IDENTIFIERS_TSV
        if not path.is_file():
            self.workdir.mkdir(parents=True, exist_ok=True)
            write_identifier_tsv(identifier_mapping(d, self.passages), path)
        return path

    def export(self, model: ModelBundle, out_dir) -> list[Path]:
        """``out_dir/retriever/``: the model (HF format), its tokenizer and ``identifiers.tsv``."""
        target = Path(out_dir) / RETRIEVER
        written = getattr(model, RETRIEVER).save_pretrained(target)
        self.tokenizer.save_pretrained(target)
        tsv = self.identifiers_tsv()
        if tsv is not None and tsv.is_file():
            shutil.copyfile(tsv, target / IDENTIFIERS_TSV)
        return [written]
