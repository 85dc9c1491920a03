"""Test harness: tiny random models and data for runs of the engine, and the sharded-vs-one-device runner.

Nothing here downloads: the BERT is random (bert-base-uncased vocab size, so the MiniLM package's tokenizer
fits it), the RDR JSONL is made from the embedded bi-encoder data when it exists, else synthetic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from rdr_jax.tasks.model_setup import MINILM_PACKAGE

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
TINY_CONFIGS = REPO_ROOT / "rdr_jax" / "configs" / "tiny"
EMBEDDED_BIENCODER = REPO_ROOT / "rdr_jax" / "data" / "embedded" / "train.biencoder.json"

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=128, vocab_size=30522)


def tiny_bert_dir(out_dir: str | Path, seed: int = 0, dropout: float = 0.1) -> Path:
    """A random tiny BertModel saved in HF format (built once; a copy with other dropout rates is a
    config.json edit, not a rebuild)."""
    from rdr_jax.models.bert import BertModel
    from rdr_jax.tasks.model_setup import save_random_model

    out_dir = Path(out_dir)
    if not (out_dir / "config.json").is_file():
        save_random_model(BertModel, dict(TINY_BERT, hidden_dropout_prob=dropout,
                                          attention_probs_dropout_prob=dropout), out_dir, seed)
    return out_dir


def tiny_encoder_dir(out_dir: str | Path, minilm_dir: str | Path) -> Path:
    """:func:`tiny_bert_dir` with the MiniLM tokenizer beside it: a model directory `rdr-jax encode` accepts."""
    import shutil

    out_dir = tiny_bert_dir(out_dir)
    for f in Path(minilm_dir).iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, out_dir / f.name)
    return out_dir


def write_passages_tsv(path: str | Path, passages: list[dict]) -> Path:
    """A DPR passages TSV (id, text, title, with a header) of ``passages``."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "text", "title"])
        for p in passages:
            writer.writerow([p["id"], p["text"], p["title"]])
    return Path(path)


def with_dropout(src: str | Path, out_dir: str | Path, dropout: float) -> Path:
    """A copy of an HF model directory whose config sets every dropout rate to ``dropout``."""
    import shutil

    src, out_dir = Path(src), Path(out_dir)
    shutil.copytree(src, out_dir, dirs_exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir


def _synthetic_biencoder(n: int) -> list[dict]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        w = list(rng.choice(words, size=6))
        ctx = lambda j: {"title": f"{w[j % 6]} {j}", "text": " ".join(rng.choice(words, size=12))}
        out.append({"question": f"what is {w[0]} {w[1]} {i}?", "answers": [w[0]],
                    "positive_ctxs": [ctx(0)], "hard_negative_ctxs": [ctx(1)],
                    "negative_ctxs": [ctx(2), ctx(3)]})
    return out


def biencoder_examples(n: int) -> list[dict]:
    if EMBEDDED_BIENCODER.is_file():
        data = json.loads(EMBEDDED_BIENCODER.read_text())
        if len(data) >= n:
            return data[:n]
    return _synthetic_biencoder(n)


def write_biencoder_json(path: str | Path, n: int = 32) -> Path:
    path = Path(path)
    path.write_text(json.dumps(biencoder_examples(n)))
    return path


def write_rdr_jsonl(path: str | Path, n: int = 32, k: int = 4, seed: int = 0) -> Path:
    """{question, answers, ctxs: [{title, text, teacher_score, has_answer}]} per line, ``k`` passages per
    question (some questions get fewer, to exercise padding), pseudo-random teacher scores favouring the
    positive."""
    rng = np.random.default_rng(seed)
    lines = []
    for i, ex in enumerate(biencoder_examples(n)):
        ctxs = ([dict(c, has_answer=True) for c in ex["positive_ctxs"][:1]]
                + [dict(c, has_answer=False) for c in ex.get("hard_negative_ctxs", []) + ex.get("negative_ctxs", [])])
        ctxs = ctxs[:k - 1] if i % 2 else ctxs[:k]
        order = rng.permutation(len(ctxs))
        ctxs = [ctxs[j] for j in order]
        for c in ctxs:
            c["teacher_score"] = float(rng.normal() + (3.0 if c["has_answer"] else 0.0))
        lines.append(json.dumps({"question": ex["question"], "answers": ex.get("answers", []), "ctxs": ctxs}))
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def tiny_overrides(task: str, bert_dir: str | Path, data_file: str | Path) -> list[str]:
    """``--set`` overrides turning configs/tiny/<task>.yaml into a test run on given model and data."""
    out = [f"model.question_encoder={bert_dir}", f"model.tokenizer={MINILM_PACKAGE}", f"data.train_file={data_file}"]
    if task == "rdr":
        out.append("task.teacher_model=null")
    return out


# ---- sharded vs one device ---------------------------------------------------------------------------------
def steps_on_meshes(config, meshes: dict, batch_size: int, steps: int, ignore=lambda key: False) -> dict:
    """Train ``steps`` steps from the same start on the same batches on each mesh (``name -> (make_mesh
    shape, devices or None)``); the first mesh is the reference.

    Per mesh: the losses, every parameter's sharding spec and the most shards of one parameter; against the
    reference, the largest relative loss difference, the largest parameter difference relative to
    max(|tensor|, 0.02 = the init scale: biases start at zero), leaving out parameters ``ignore(key)``, the
    worst parameter, and the largest absolute move.
    """
    import jax
    from rdr_jax.training.checkpoints import flatten_state
    from rdr_jax.training.loop import prepare
    from rdr_jax.training.partitioning import make_mesh, shard_batch

    out, ref, batches = {}, None, None
    for name, (shape, devices) in meshes.items():
        trainer = prepare(config, mesh=make_mesh(*shape, devices=devices))
        if batches is None:
            it = trainer.task.train_iterator(batch_size, 0)
            batches = [next(it) for _ in range(steps)]
        losses = []
        for batch in batches:
            trainer.setup.state, metrics = trainer.train_step(trainer.setup.state, trainer.setup.frozen,
                                                              shard_batch(batch, trainer.mesh), jax.random.PRNGKey(0))
            losses.append(float(metrics["loss"]))
        flat, _ = flatten_state(trainer.setup.state["params"])
        params = {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}
        result = {"losses": losses, "specs": {k: str(v.sharding.spec) for k, v in flat.items()},
                  "max_shards": max(len({str(s.index) for s in v.addressable_shards}) for v in flat.values())}
        if ref is None:
            ref = (losses, params)
        else:
            result["loss_rel_diff"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, ref[0]))
            rel = {k: float(np.max(np.abs(params[k] - ref[1][k])) / max(np.max(np.abs(ref[1][k])), 0.02))
                   for k in params if not ignore(k)}
            result["param_rel_diff"] = max(rel.values())
            result["worst_param"] = max(rel, key=rel.get)
            result["moved"] = float(max(np.max(np.abs(params[k] - ref[1][k])) for k in params))
        out[name] = result
    return out


def run_on_simulated_devices(script: str, *args, devices: int = 8, timeout: int = 600) -> dict:
    """Run ``script`` (Python source) in a subprocess with ``devices`` simulated CPU devices (the XLA flag
    must be set before jax is imported) and return the JSON of its last ``RESULT {...}`` line."""
    # the script imports this harness (``import harness``): the tests folder goes on its path
    path = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def packing_collectives(mesh) -> dict[str, int]:
    """Collectives in the compiled pack -> unpack / first round trip (and its gradient) of a batch split over
    ``mesh``'s data-parallel devices with per-shard packing maps: {op: count}, for tests that packed rows stay
    on their devices."""
    import re

    import jax
    import jax.numpy as jnp
    from rdr_jax.models.packing import TokenPacking, block_maps, packed_per_row
    from rdr_jax.training.partitioning import batch_sharding

    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rng = np.random.RandomState(0)
    rows, length = 16, 16   # two rows per device of an 8-device mesh
    mask = (np.arange(length)[None] < rng.randint(1, length + 1, size=rows)[:, None]).astype(np.int32)
    maps = block_maps(mask, shards, packed_per_row(mask, shards))
    x, *maps = jax.device_put([rng.randn(rows, length, 8).astype(np.float32), *maps], batch_sharding(mesh))

    def round_trip(x, token_position, position_row):   # no reduction: a sum would all-reduce its scalar
        packing = TokenPacking.from_rows(token_position, position_row, shards)
        h = jnp.sin(packing.pack(x))
        return packing.unpack(h), packing.first(h)

    def backward(x, token_position, position_row):
        out, vjp = jax.vjp(lambda x: round_trip(x, token_position, position_row), x)
        return vjp(out)[0]

    ops = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter", "collective-permute")
    counts = dict.fromkeys(ops, 0)
    for fn in (round_trip, backward):
        text = jax.jit(fn).lower(x, *maps).compile().as_text()
        for op in ops:
            counts[op] += len(re.findall(rf"\b{op}(-start)?\(", text))
    return counts


def process_shards(make_iterator, count: int) -> list:
    """``count`` iterators from ``make_iterator()``, iterator ``i`` set to process shard ``i`` of ``count``."""
    parts = [make_iterator() for _ in range(count)]
    for i, it in enumerate(parts):
        it.set_shard(i, count)
    return parts


def assert_blocks_are_batches(parts: list, batches: list[dict]) -> list[dict]:
    """For each of ``batches`` (the 1-process ones, in order): the next block of every process shard in
    ``parts``, put together in process order, equals it, every field. Returns the last blocks."""
    blocks = []
    for want in batches:
        blocks = [next(it) for it in parts]
        for key in want:
            np.testing.assert_array_equal(np.concatenate([b[key] for b in blocks]), want[key], err_msg=key)
    return blocks


def assert_resumes(iterator, state: dict, batches: list[dict], end_state: dict) -> None:
    """``iterator`` set to ``state`` hands out exactly ``batches`` (every field, array-equal), then is at
    ``end_state``; closed afterwards (it may run grain workers)."""
    iterator.set_state(state)
    try:
        for want in batches:
            got = next(iterator)
            assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
        assert iterator.get_state() == end_state
    finally:
        close = getattr(iterator, "close", None)
        if close:
            close()
