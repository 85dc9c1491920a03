"""Trie-constrained beam search (generative retrieval): rdr_jax vs transformers' ``generate`` with
``prefix_allowed_tokens_fn``, same T5 weights, same trie, same inputs and beams; plus the trie's memory at 1M
identifiers.

- T5 at t5-small size (d_model 512, 8 heads, d_kv 64, d_ff 2048, 6+6 layers, vocab 32128), random weights,
  saved by transformers and loaded by rdr_jax;
- 10,000 random identifiers of 4-8 tokens over the vocabulary (EOS appended), batch 8 questions x 32 tokens
  (padded at random lengths), 10 beams, ``max_length`` = the longest identifier (EOS included).

JAX: ``model.constrained_beam_search`` with the trie already on device (built once, as a server would); the
first call compiles, so compile time is reported apart and never timed. PyTorch: ``model.generate(num_beams=10,
num_return_sequences=10, max_length=L + 1, prefix_allowed_tokens_fn=<dict-of-dicts trie walk>,
length_penalty=0.0, early_stopping=True, do_sample=False)`` under ``torch.inference_mode`` (``max_length``
counts the decoder start token there). Both sides rank by summed log-probabilities, so their top-1 identifiers
should agree; the share that does is reported.

The second row is ``benchmarks.trie_scale`` at 1M identifiers (10k with ``--quick``): build time as jax_ms,
host / device bytes in the notes; the dict-of-dicts trie the PyTorch side walks is measured (tracemalloc) on
the benchmark's own trie for comparison.
"""

from __future__ import annotations

import contextlib
import io
import time
import tracemalloc
from pathlib import Path

import numpy as np

from benchmarks import common as C

T5_SMALL = dict(d_model=512, num_heads=8, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                vocab_size=32128, relative_attention_num_buckets=32, relative_attention_max_distance=128)
TINY = dict(d_model=32, num_heads=4, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, vocab_size=256,
            relative_attention_num_buckets=8, relative_attention_max_distance=16)
FULL_SHAPE = dict(identifiers=10_000, min_tokens=4, max_tokens=8, batch=8, length=32, beams=10,
                  scale_identifiers=1_000_000)
QUICK_SHAPE = dict(identifiers=300, min_tokens=2, max_tokens=4, batch=2, length=8, beams=4,
                   scale_identifiers=100_000)
FIRST_TOKEN = 2  # T5: 0 pad (= decoder start), 1 EOS


def random_identifiers(count: int, min_tokens: int, max_tokens: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_tokens, max_tokens + 1, count)
    flat = rng.integers(FIRST_TOKEN, vocab, int(lengths.sum()))
    return [s.tolist() for s in np.split(flat, np.cumsum(lengths)[:-1])]


def dict_trie(identifiers: list[list[int]], eos: int) -> dict:
    """The usual PyTorch-side trie: nested dicts keyed by token, EOS closing each identifier."""
    root: dict = {}
    for seq in identifiers:
        node = root
        for token in seq + [eos]:
            node = node.setdefault(token, {})
    return root


def dict_trie_bytes(identifiers: list[list[int]], eos: int) -> int:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        trie = dict_trie(identifiers, eos)
        size = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del trie
    return size


class CallbackClock:
    """Seconds spent inside a callback, to show how much of ``generate`` the Python trie walk is."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args):
        start = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def prefix_allowed_tokens(trie: dict, eos: int):
    def allowed(batch_id, prefix):
        node = trie
        for token in prefix.tolist()[1:]:  # skip the decoder start token
            node = node.get(token)
            if node is None:
                return [eos]  # a placeholder beam transformers keeps at -1e9
        return list(node) or [eos]

    return allowed


def questions(batch: int, length: int, vocab: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Random question ids, each row padded (T5 pad 0) after a random length; the first row is full."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(2, length // 2), length + 1, batch)
    lengths[0] = length
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    return np.where(mask == 1, rng.integers(FIRST_TOKEN, vocab, (batch, length)), 0).astype(np.int32), mask


def identifier(sequence, eos: int) -> tuple:
    sequence = [int(t) for t in sequence]
    return tuple(sequence[:sequence.index(eos) + 1]) if eos in sequence else tuple(sequence)


def constrained_search(opts: C.Options) -> C.Result:
    import transformers
    from rdr_jax.decoding import PrefixTrie
    from rdr_jax.models.t5 import T5ForConditionalGeneration

    torch = C.configure_torch(opts.threads)
    size, shape = (TINY, QUICK_SHAPE) if opts.quick else (T5_SMALL, FULL_SHAPE)
    config = transformers.T5Config(**size, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    hf = transformers.T5ForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    path = C.save_random_hf(hf, Path(opts.workdir) / "t5_generative")
    device = C.torch_device()
    hf = hf.to(device)
    model = T5ForConditionalGeneration.from_pretrained(path)
    eos, vocab, K, B = config.eos_token_id, config.vocab_size, shape["beams"], shape["batch"]

    identifiers = random_identifiers(shape["identifiers"], shape["min_tokens"], shape["max_tokens"], vocab)
    trie = PrefixTrie(identifiers, eos_token_id=eos)
    max_length = trie.max_length  # longest identifier + EOS
    device_trie = trie.to_device()
    reference = dict_trie(identifiers, eos)
    allowed = prefix_allowed_tokens(reference, eos)

    ids, mask = questions(B, shape["length"], vocab)
    t_ids, t_mask = (torch.from_numpy(a.astype(np.int64)).to(device) for a in (ids, mask))

    def jax_search():
        return model.constrained_beam_search(ids, mask, device_trie, K, max_length)

    def torch_generate(allowed=allowed):
        out = hf.generate(input_ids=t_ids, attention_mask=t_mask, num_beams=K, num_return_sequences=K,
                          max_length=max_length + 1, prefix_allowed_tokens_fn=allowed, length_penalty=0.0,
                          early_stopping=True, do_sample=False)
        C.torch_sync(device)
        return out

    t0 = time.perf_counter()
    ours, scores = C.block(jax_search())
    first_call_s = time.perf_counter() - t0
    with torch.inference_mode():
        clock = CallbackClock(allowed)  # an untimed call, for the agreement check and the callback's share
        t0 = time.perf_counter()
        theirs = torch_generate(clock).cpu().numpy()[:, 1:].reshape(B, K, -1)
        callback_share = clock.seconds / (time.perf_counter() - t0)
        times = C.interleaved({"jax": jax_search, "torch": torch_generate}, opts.repeats, opts.warmup,
                              desc="beam_search")
    ours = np.asarray(ours)
    valid = trie.lookup(ours[:, 0]) >= 0
    agree = float(np.mean([identifier(ours[b, 0], eos) == identifier(theirs[b, 0], eos) for b in range(B)]))

    jax_ms, torch_ms = C.median_ms(times["jax"]), C.median_ms(times["torch"])
    compile_s = max(first_call_s - jax_ms / 1000, 0.0)
    extra = {"torch_device": device, "batch": B, "source_length": shape["length"], "num_beams": K,
             "max_length": max_length,
             "identifiers": trie.num_identifiers, "trie_nodes": trie.num_nodes, "model": size,
             "compile_s": compile_s, "first_call_s": first_call_s, "top1_agreement": agree,
             "top1_valid": float(valid.mean()), "torch_prefix_fn_calls": clock.calls,
             "torch_prefix_fn_share": callback_share,
             "jax_questions_per_s": B / (jax_ms / 1000), "torch_questions_per_s": B / (torch_ms / 1000),
             "jax_spread": C.spread(times["jax"]), "torch_spread": C.spread(times["torch"])}
    note = (f"{B}x{shape['length']}, {K} beams, {trie.num_identifiers:,} ids, L {max_length}: "
            f"{extra['jax_questions_per_s']:.1f} vs {extra['torch_questions_per_s']:.1f} q/s, "
            f"compile {compile_s:.1f}s, top-1 agree {agree:.0%}, torch trie callback {callback_share:.1%} of generate")
    name = "beam_search: T5 " + ("tiny" if opts.quick else "t5-small") + " constrained"
    return C.Result(name, jax_ms, torch_ms, note, extra)


def trie_memory(opts: C.Options) -> C.Result:
    """PrefixTrie at scale (benchmarks.trie_scale), and the dict-of-dicts trie's bytes per identifier."""
    from benchmarks import trie_scale

    shape = QUICK_SHAPE if opts.quick else FULL_SHAPE
    vocab = (TINY if opts.quick else T5_SMALL)["vocab_size"]
    count = shape["scale_identifiers"]
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its own JSON
        scale = trie_scale.main(["--count", str(count), "--vocab", str(vocab), "--min-len", str(shape["min_tokens"]),
                                 "--max-len", str(shape["max_tokens"])])
    sample = random_identifiers(shape["identifiers"], shape["min_tokens"], shape["max_tokens"], vocab, seed=1)
    dict_bytes_per_id = dict_trie_bytes(sample, eos=1) / len(sample)
    extra = {"trie_identifiers": scale["identifiers"], "trie_nodes": scale["nodes"],
             "trie_host_bytes": scale["host_bytes"], "trie_device_bytes": scale["device_bytes"],
             "trie_build_s": scale["build_seconds"], "mask_and_child_ms": scale["mask_and_child_ms"],
             "prefix_trie_bytes_per_identifier": scale["host_bytes"] / scale["identifiers"],
             "dict_trie_bytes_per_identifier": dict_bytes_per_id, "dict_trie_sample": len(sample)}
    note = (f"PrefixTrie {count:,} ids ({shape['min_tokens']}-{shape['max_tokens']} tokens): {scale['nodes']:,} "
            f"nodes, host {scale['host_bytes'] / 2 ** 20:.1f} MiB, device {scale['device_bytes'] / 2 ** 20:.1f} "
            f"MiB ({extra['prefix_trie_bytes_per_identifier']:.0f} B/id vs dict-of-dicts "
            f"{dict_bytes_per_id:.0f} B/id); ms = build")
    return C.Result(f"beam_search: trie {count:,} ids", 1000.0 * scale["build_seconds"], None, note, extra)


def run(opts: C.Options) -> list[C.Result]:
    return [constrained_search(opts), trie_memory(opts)]
