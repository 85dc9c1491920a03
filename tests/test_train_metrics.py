"""The trainer's host accounting in metrics.jsonl: peak RSS (VmHWM, getrusage where there is no /proc), the share
of step time spent waiting for batches, and real vs padded tokens/s, checked against the batches the run saw."""

import json
import resource
import time
from pathlib import Path

import numpy as np
import pytest

import harness
from rdr_jax.tasks import load_config
from rdr_jax.training import host_metrics
from rdr_jax.training.loop import make_task, train

pytestmark = pytest.mark.usefixtures("compilation_cache")


def vm_hwm_bytes() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_peak_rss_from_proc_and_from_getrusage(monkeypatch):
    assert host_metrics.peak_rss_bytes() == pytest.approx(vm_hwm_bytes(), rel=0.01)
    now = host_metrics.rss_bytes()
    assert 0 < now["anon"] <= now["rss"] <= host_metrics.peak_rss_bytes()
    monkeypatch.setattr(host_metrics, "_STATUS", Path("/nonexistent/status"))   # no /proc: getrusage
    assert host_metrics.peak_rss_bytes() == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert host_metrics.rss_bytes() == {}


class SlowIterator:
    """The task's batches, each handed over ``delay`` seconds late (a slow input pipeline); keeps them."""

    def __init__(self, iterator, delay: float):
        self.iterator, self.delay, self.batches = iterator, delay, []

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.delay)
        batch = next(self.iterator)
        self.batches.append(batch)
        return batch


def test_run_logs_peak_rss_input_wait_and_real_vs_padded_tokens(tmp_path):
    bert = harness.tiny_bert_dir(tmp_path / "bert", dropout=0.0)
    data = harness.write_rdr_jsonl(tmp_path / "rdr.jsonl", 16, k=4)
    config = load_config(harness.TINY_CONFIGS / "rdr.yaml",
                         harness.tiny_overrides("rdr", bert, data)
                         + ["train.steps=3", "train.log_every=1", "train.checkpoint_every=3", "train.batch_size=8",
                            "train.export_final=false"], workdir=str(tmp_path / "run"))
    slow = SlowIterator(make_task(config).train_iterator(8, config.train.seed), delay=0.4)
    train(config, iterator=slow, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and len(slow.batches) == 3
    for r, batch in zip(records, slow.batches):
        masks = [batch["q_attention_mask"], batch["p_attention_mask"]]
        real, padded = sum(int(m.sum()) for m in masks), sum(m.size for m in masks)
        assert 0 < real < padded
        # one step per window: tokens/s over examples/s is the step's tokens per example
        assert r["tokens_per_sec"] / r["examples_per_sec"] == pytest.approx(real / 8, rel=1e-9)
        assert r["padded_tokens_per_sec"] / r["examples_per_sec"] == pytest.approx(padded / 8, rel=1e-9)
        assert r["padding_share"] == pytest.approx(1 - real / padded, rel=1e-9)
        assert 0.0 <= r["input_wait_share"] <= 1.0
        assert r["tokens_per_sec"] <= r["padded_tokens_per_sec"]
    # steps 2 and 3 compile nothing: the 0.4 s wait for data is a large share of them
    assert all(r["input_wait_share"] > 0.2 for r in records[1:]), [r["input_wait_share"] for r in records]
    peaks = [r["host_peak_rss_gb"] * 2**30 for r in records]
    assert 0 < peaks[0] <= peaks[1] <= peaks[2] <= vm_hwm_bytes()   # a high-water mark only rises
    assert peaks[2] > 0.5 * vm_hwm_bytes()
    np.testing.assert_allclose(peaks[2], vm_hwm_bytes(), rtol=0.5)
