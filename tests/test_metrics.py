"""Top-k answer recall, reader EM, trec_eval-compatible IR metrics, TREC I/O and result tables."""

import json
import math
import random

import pytest

from rdr_jax.retrieval.metrics import (
    evaluate_run,
    first_hit_ranks,
    format_results_table,
    format_trec_run,
    rank_documents,
    read_qrels,
    read_trec_run,
    reader_exact_match,
    top_k_answer_recall,
    write_qrels,
    write_results_json,
    write_trec_run,
)


# ---------------------------------------------------------------- open-domain QA


def test_top_k_recall_counts_first_hit_and_short_lists():
    hits = [
        [False, True, False],  # first hit at rank 2
        [True],  # hit at rank 1, only one passage
        [False, False],  # no hit
        [False] * 4 + [True],  # hit at rank 5
    ]
    assert list(first_hit_ranks(hits)) == [1, 0, -1, 4]
    assert top_k_answer_recall(hits, ks=(1, 2, 5, 100)) == {"1": 25.0, "2": 50.0, "5": 75.0, "100": 75.0}


def test_top_k_recall_default_ks_and_rounding():
    hits = [[True]] + [[False]] * 2
    recall = top_k_answer_recall(hits)
    assert list(recall) == ["1", "5", "20", "50", "100"]
    assert recall["1"] == 33.33
    assert top_k_answer_recall(hits, ks=(1,), decimals=None)["1"] == pytest.approx(100 / 3, abs=1e-12)
    with pytest.raises(ValueError, match="no questions"):
        top_k_answer_recall([])
    with pytest.raises(ValueError, match="positive integer"):
        top_k_answer_recall(hits, ks=(0,))


def test_reader_exact_match_percent():
    assert reader_exact_match(["The Beatles", "paris", "x"], [["beatles"], ["London"], ["y", "X."]]) == 66.67
    with pytest.raises(ValueError, match="2 predictions for 1 questions"):
        reader_exact_match(["a", "b"], [["a"]])


# ---------------------------------------------------------------- IR metrics by hand


QRELS = {"q1": {"a": 1, "b": 2, "c": 0, "d": -1}, "q2": {"x": 0}, "q3": {"z": 1}}
RUN = {
    "q1": {"a": 1.0, "b": 1.0, "c": 2.0, "e": 0.5, "d": 3.0},
    "q2": {"x": 1.0},
    "q4": {"k": 1.0},  # not in the qrels: ignored
}


def test_ties_break_by_docid_descending():
    assert rank_documents(RUN["q1"]) == ["d", "c", "b", "a", "e"]


def test_ir_metrics_by_hand():
    means, per_query = evaluate_run(QRELS, RUN, ("MRR@10", "nDCG@10", "R@3", "MRR@2"), as_percent=False, per_query=True)
    # q1 ranking d(-1) c(0) b(2) a(1) e(unjudged)
    dcg = 2 / math.log2(4) + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert per_query["q1"] == pytest.approx({"MRR@10": 1 / 3, "nDCG@10": dcg / idcg, "R@3": 0.5, "MRR@2": 0.0})
    # q2 has no relevant document, q3 is missing from the run: both score 0 and count in the mean.
    assert per_query["q2"] == per_query["q3"] == {"MRR@10": 0.0, "nDCG@10": 0.0, "R@3": 0.0, "MRR@2": 0.0}
    assert set(per_query) == {"q1", "q2", "q3"}
    assert means["MRR@10"] == pytest.approx(1 / 9)
    assert evaluate_run(QRELS, RUN, ("nDCG@10",))["nDCG@10"] == pytest.approx(100 * dcg / idcg / 3)


def test_measure_names():
    assert set(evaluate_run(QRELS, RUN, ("RR@10", "Recall@5", "ndcg@3"))) == {"RR@10", "Recall@5", "ndcg@3"}
    for bad in ("MAP@10", "nDCG", "R@0"):
        with pytest.raises(ValueError, match="unknown measure"):
            evaluate_run(QRELS, RUN, (bad,))


def random_run_and_qrels(seed, num_queries=40, num_docs=60):
    rng = random.Random(seed)
    qrels, run = {}, {}
    for q in range(num_queries):
        qid = f"q{q}"
        docs = [f"d{rng.randrange(1000)}" for _ in range(num_docs)]
        if q % 7 != 3:  # some queries have no qrels
            qrels[qid] = {d: rng.choice([0, 0, 0, 1, 2, 3, -1]) for d in rng.sample(sorted(set(docs)), min(15, len(set(docs))))}
        if q % 5 != 1:  # some qrels queries are missing from the run
            # Scores on a coarse grid so that many ties exercise the tie-breaking rule.
            run[qid] = {d: rng.randrange(8) / 4.0 for d in docs}
    return qrels, run


@pytest.mark.parametrize("seed", [0, 1])
def test_ir_metrics_agree_with_trec_eval(seed):
    """Reference: trec_eval's own code through pytrec_eval (package pytrec-eval-terrier)."""
    pytrec_eval = pytest.importorskip(
        "pytrec_eval", reason="pytrec-eval-terrier is the reference; pip install ir-measures (brings it)"
    )
    qrels, run = random_run_and_qrels(seed)
    names = ["MRR@10", "nDCG@10", "nDCG@3", "R@5", "R@20"]
    means, per_query = evaluate_run(qrels, run, names, as_percent=False, per_query=True)

    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank", "ndcg_cut.3,10", "recall.5,20"})
    trec = evaluator.evaluate(run)  # queries in both the qrels and the run
    for qid in qrels:
        if qid not in run:  # trec_eval -c: a query without results scores 0
            assert all(value == 0.0 for value in per_query[qid].values()), qid
            continue
        t = trec[qid]
        # trec_eval has no cut-off reciprocal rank: RR@10 is RR when the first hit ranks <= 10.
        rr_at_10 = t["recip_rank"] if t["recip_rank"] >= 1 / 10 else 0.0
        expected = {
            "MRR@10": rr_at_10,
            "nDCG@10": t["ndcg_cut_10"],
            "nDCG@3": t["ndcg_cut_3"],
            "R@5": t["recall_5"],
            "R@20": t["recall_20"],
        }
        assert per_query[qid] == pytest.approx(expected, abs=1e-12), qid
    assert set(per_query) == set(qrels)
    assert any(qid not in run for qid in qrels)  # the sample has queries missing from the run
    assert any(0 < per_query[qid]["MRR@10"] < per_query[qid]["R@20"] for qid in per_query)

    # Averaging over all qrels queries, as ir-measures aggregates trec_eval's numbers.
    ir_measures = pytest.importorskip("ir_measures", reason="ir-measures checks the averaging convention")
    from ir_measures import R, nDCG

    aggregate = ir_measures.pytrec_eval.calc_aggregate([nDCG @ 10, R @ 20], qrels, run)
    assert means["nDCG@10"] == pytest.approx(aggregate[nDCG @ 10], abs=1e-12)
    assert means["R@20"] == pytest.approx(aggregate[R @ 20], abs=1e-12)


# ---------------------------------------------------------------- TREC files


def test_run_and_qrels_files_round_trip(tmp_path):
    qrels, run = random_run_and_qrels(3, num_queries=5, num_docs=10)
    run_path, qrels_path = tmp_path / "run.trec", tmp_path / "qrels.txt"
    write_trec_run(run_path, run, tag="test")
    write_qrels(qrels_path, qrels)
    assert read_trec_run(run_path) == run
    assert read_qrels(qrels_path) == qrels

    first = run_path.read_text().splitlines()[0].split()
    assert first[1] == "Q0" and first[3] == "1" and first[5] == "test"
    assert evaluate_run(read_qrels(qrels_path), read_trec_run(run_path)) == evaluate_run(qrels, run)

    # depth keeps the best documents in trec_eval order
    lines = format_trec_run({"q": {"a": 1.0, "b": 1.0, "c": 0.5}}, depth=2).splitlines()
    assert [line.split()[2] for line in lines] == ["b", "a"]
    assert [line.split()[3] for line in lines] == ["1", "2"]


@pytest.mark.parametrize(
    "reader, content, message",
    [
        (read_trec_run, "q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 2 0.4\n", "line 2: expected 6 columns"),
        (read_trec_run, "q1 Q0 d1 1 high tag\n", "line 1: score 'high' is not a number"),
        (read_trec_run, "q1 Q0 d1 1 0.5 t\n\nq1 Q0 d1 2 0.4 t\n", "line 3: document 'd1' appears twice"),
        (read_qrels, "q1 0 d1 1\nq1 0 d2\n", "bad.txt:2: expected 4 columns"),
        (read_qrels, "q1 0 d1 0.5\n", "bad.txt:1: field 'relevance' must be an integer, got '0.5'"),
        (read_qrels, "q1 0 d1 1\nq1 0 d1 2\n", "bad.txt:2: document 'd1' is judged twice"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, reader, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(ValueError) as error:
        reader(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_writers_reject_white_space_in_ids(tmp_path):
    with pytest.raises(ValueError, match="docid"):
        write_trec_run(tmp_path / "r", {"q": {"a b": 1.0}})
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- tables


def test_results_table_is_aligned():
    results = {"DPR": {"1": 45.87, "20": 79.97, "100": 85.87}, "RDR (ours)": {"1": 54.29, "20": 82.8}}
    table = format_results_table(results)
    lines = table.splitlines()
    assert lines[0].split() == ["Top-1", "Top-20", "Top-100"]
    assert lines[2].split() == ["DPR", "45.87", "79.97", "85.87"]
    assert lines[3].split() == ["RDR", "(ours)", "54.29", "82.80", "-"]
    # numbers right-aligned under their headers
    for column in ("Top-1", "Top-20"):
        right = lines[0].index(column) + len(column)
        assert lines[2][right - 1].isdigit() and lines[3][right - 1].isdigit()
        assert lines[2][right : right + 1] in (" ", "") and lines[3][right : right + 1] in (" ", "")
    assert format_results_table({"x": {"MRR@10": 35.3}}).splitlines()[0].split() == ["MRR@10"]


def test_results_json_layout(tmp_path):
    path = tmp_path / "out" / "results.json"
    write_results_json(path, {"before": {"1": 45.8712, "20": 80}, "after": {"1": 54.29}})
    assert json.loads(path.read_text()) == {"before": {"1": 45.87, "20": 80.0}, "after": {"1": 54.29}}
