"""Cross-encoder re-ranking: scores equal transformers' logits on the same pairs (BERT with two labels,
DeBERTa-v3 with one), runs and DPR results are re-ordered by them, TREC output round-trips and evaluates,
the `rerank` command works end to end, and bad input fails with errors naming what is wrong."""

import argparse
import json
import random

import numpy as np
import pytest
import torch
import transformers

import rdr_jax
from rdr_jax.commands.rerank import add_rerank_arguments, run_rerank
from rdr_jax.data.readers import read_retriever_results
from rdr_jax.retrieval.metrics import evaluate_run, rank_documents, read_trec_run, write_qrels, write_trec_run
from rdr_jax.retrieval.rerank import CrossEncoderScorer, rerank_results, rerank_run
from parity import assert_close

spm = pytest.importorskip("sentencepiece", reason="sentencepiece trains the tiny DeBERTa vocabulary")

TOL = 1e-5
MAX_LENGTH = 32
BUCKETS = (16,)  # + MAX_LENGTH: two shapes per model

WORDS = ("the a retrieval passage query answer model question dense sparse index vector score rank teacher "
         "student distill cross encoder relevance neural search document title what is how does").split()
QUERIES = {"q1": "what is dense retrieval", "q2": "how does a cross encoder score a passage"}
PASSAGES = {
    "d1": "a dense passage index scores the query against every document vector",
    "d2": "sparse retrieval ranks the document by term overlap",
    "d3": "the teacher model is a cross encoder",
    "d4": "students distill the teacher relevance " * 6,  # long: truncated (only the passage)
    "d5": "neural search",
    "d6": "how does the answer model read a passage title",
}
BERT_CONFIG = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=37, max_position_embeddings=64, num_labels=2,
                   initializer_range=0.1)  # wider init: logits that differ between pairs
DEBERTA_CONFIG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=48, relative_attention=True, position_buckets=8, max_relative_positions=16,
                      max_position_embeddings=64, pos_att_type="p2c|c2p", share_att_key=True,
                      norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0,
                      layer_norm_eps=1e-7, hidden_act="gelu", num_labels=1, initializer_range=0.1)


def _deberta_tokenizer(tmp_path_factory):
    """A tiny SentencePiece model with DeBERTa-v3's special-piece layout (as tests/test_deberta_tokenizer.py)."""
    work, spm_dir = tmp_path_factory.mktemp("corpus"), tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) + "." for _ in range(400)]
    (work / "corpus.txt").write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(work / "corpus.txt"), model_prefix=str(work / "spm"), model_type="unigram", vocab_size=60,
        hard_vocab_limit=False, pad_id=0, pad_piece="[PAD]", bos_id=1, bos_piece="[CLS]", eos_id=2,
        eos_piece="[SEP]", unk_id=3, unk_piece="[UNK]", user_defined_symbols=["[MASK]"], minloglevel=2)
    (spm_dir / "spm.model").write_bytes((work / "spm.model").read_bytes())
    return transformers.DebertaV2Tokenizer.from_pretrained(spm_dir)


@pytest.fixture(scope="module")
def cross_encoders(tmp_path_factory, minilm_dir):
    """name -> (transformers model, saved dir holding model + tokenizer, tokenizer, our loaded model)."""
    built = {}
    for name, hf_cls, config_cls, config, tokenizer in (
            ("bert", transformers.BertForSequenceClassification, transformers.BertConfig, BERT_CONFIG,
             transformers.BertTokenizerFast.from_pretrained(minilm_dir)),
            ("deberta", transformers.DebertaV2ForSequenceClassification, transformers.DebertaV2Config,
             DEBERTA_CONFIG, _deberta_tokenizer(tmp_path_factory))):
        torch.manual_seed(0)
        hf = hf_cls(config_cls(**config, attn_implementation="eager")).eval()
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        tokenizer.save_pretrained(path)
        built[name] = (hf, path, tokenizer, rdr_jax.from_pretrained(path))
    return built


@pytest.fixture(scope="module")
def scorers(cross_encoders):
    return {name: CrossEncoderScorer(model, tok, batch_size=4, max_length=MAX_LENGTH, buckets=BUCKETS)
            for name, (_, _, tok, model) in cross_encoders.items()}


def hf_scores(hf, tokenizer, pairs, label_index):
    """transformers' logit for each pair, one unpadded row at a time (only the passage truncated, unless the
    query alone fills the row)."""
    out = []
    for query, passage in pairs:
        room = len(tokenizer(query, add_special_tokens=False)["input_ids"]) + 3 < MAX_LENGTH
        enc = tokenizer(query, passage, truncation="only_second" if room else "longest_first",
                        max_length=MAX_LENGTH, return_tensors="pt")
        with torch.no_grad():
            out.append(float(hf(**enc).logits[0, label_index]))
    return np.array(out)


ALL_PAIRS = [(q, p) for q in QUERIES.values() for p in PASSAGES.values()]
LONG_QUERY_PAIR = ("what is the dense retrieval model answer " * 6, "a passage")


@pytest.mark.parametrize("name,label_index", [("bert", 1), ("deberta", 0)])
def test_scores_equal_transformers_logits(cross_encoders, scorers, name, label_index):
    hf, _, tokenizer, model = cross_encoders[name]
    assert type(model).__name__ == type(hf).__name__  # from_pretrained picked the class
    scorer = scorers[name]
    assert scorer.label_index == label_index  # 2 labels: the positive class; 1 label: the logit
    pairs = ALL_PAIRS + [LONG_QUERY_PAIR]
    got = scorer.score([q for q, _ in pairs], [p for _, p in pairs])
    want = hf_scores(hf, tokenizer, pairs, label_index)
    assert got.dtype == np.float32 and got.shape == (len(pairs),)
    assert_close(got, want, atol=TOL)
    assert np.ptp(want) > 1e-2  # the scores really distinguish the pairs


@pytest.mark.parametrize("name", ["bert", "deberta"])
def test_pair_layout_padding_and_truncation(cross_encoders, scorers, name):
    _, _, tokenizer, _ = cross_encoders[name]
    scorer = scorers[name]
    short, long_ = ("what is dense retrieval", "neural search"), ("what is dense retrieval", PASSAGES["d4"])
    batch = scorer.tokenize([short[0], long_[0]], [short[1], long_[1]])
    assert batch["input_ids"].shape == (2, MAX_LENGTH)  # the long pair needs the largest bucket
    reference = tokenizer(*short)
    n = len(reference["input_ids"])
    assert batch["input_ids"][0, :n].tolist() == reference["input_ids"]
    assert batch["input_ids"][0, 0] == tokenizer.cls_token_id  # [CLS] query [SEP] passage [SEP]
    assert reference["input_ids"].count(tokenizer.sep_token_id) == 2
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (MAX_LENGTH - n)
    assert batch["input_ids"][0, n:].tolist() == [tokenizer.pad_token_id] * (MAX_LENGTH - n)
    assert batch["token_type_ids"][0, :n].tolist() == reference["token_type_ids"]
    assert set(batch["token_type_ids"][0, :n]) == {0, 1}
    query_len = len(tokenizer(long_[0], add_special_tokens=False)["input_ids"])
    assert batch["attention_mask"][1].all() and batch["input_ids"][1, -1] == tokenizer.sep_token_id
    assert batch["token_type_ids"][1].tolist() == [0] * (query_len + 2) + [1] * (MAX_LENGTH - query_len - 2)
    small = scorer.tokenize([short[0]], [short[1]])
    assert small["input_ids"].shape == (1, 16)  # a short pair pads to the small bucket


def first_stage_run():
    rng = np.random.RandomState(3)
    docs = list(PASSAGES)
    return {qid: {d: float(s) for d, s in zip(docs, rng.permutation(len(docs)).astype(float))} for qid in QUERIES}


@pytest.mark.parametrize("name", ["bert", "deberta"])
def test_rerank_run_orders_by_cross_encoder_scores(cross_encoders, scorers, name, tmp_path):
    hf, _, tokenizer, _ = cross_encoders[name]
    scorer, depth = scorers[name], 4
    run = first_stage_run()
    reranked = rerank_run(scorer, QUERIES, PASSAGES, run, depth=depth, progress=False)
    for qid, scores in run.items():
        first = rank_documents(scores)
        top, rest = first[:depth], first[depth:]
        ce = hf_scores(hf, tokenizer, [(QUERIES[qid], PASSAGES[d]) for d in top], scorer.label_index)
        expected_top = [top[i] for i in np.argsort(-ce, kind="stable")]
        assert rank_documents(reranked[qid]) == expected_top + rest
        assert_close([reranked[qid][d] for d in top], ce, atol=TOL)
    # The TREC file reads back as the same run and evaluates as the re-ranked order says.
    path = tmp_path / "reranked.trec"
    write_trec_run(path, reranked)
    back = read_trec_run(path)
    assert {q: rank_documents(s) for q, s in back.items()} == {q: rank_documents(s) for q, s in reranked.items()}
    qrels = {qid: {rank_documents(reranked[qid])[1]: 1, rank_documents(run[qid])[0]: 2} for qid in QUERIES}
    got = evaluate_run(qrels, back, ["MRR@10"])["MRR@10"]
    expected_rr = [1.0 / (1 + min(rank_documents(reranked[q]).index(d) for d in qrels[q])) for q in QUERIES]
    assert got == pytest.approx(100 * np.mean(expected_rr))


def test_rerank_results_reorders_ctxs_and_keeps_layout(cross_encoders, scorers):
    hf, _, tokenizer, _ = cross_encoders["bert"]
    ctxs = [{"id": d, "title": "doc title" if i % 2 else "", "text": PASSAGES[d], "score": 10.0 - i,
             "has_answer": d == "d5"} for i, d in enumerate(PASSAGES)]
    results = [{"question": QUERIES["q1"], "answers": ["dense"], "ctxs": ctxs}]
    out = rerank_results(scorers["bert"], results, depth=5, progress=False)
    texts = [f"{c['title']} {c['text']}" if c["title"] else c["text"] for c in ctxs[:5]]
    ce = hf_scores(hf, tokenizer, [(QUERIES["q1"], t) for t in texts], 1)
    new = out[0]["ctxs"]
    assert [c["id"] for c in new] == [ctxs[i]["id"] for i in np.argsort(-ce, kind="stable")] + ["d6"]
    assert all(new[k]["score"] > new[k + 1]["score"] for k in range(5))  # scores descend, depth tail included
    assert {c["id"]: c["retriever_score"] for c in new} == {c["id"]: c["score"] for c in ctxs}
    assert out[0]["question"] == results[0]["question"] and out[0]["answers"] == ["dense"]


def test_rerank_run_rejects_unknown_passages_and_queries(scorers):
    run = {"q1": {"d1": 2.0, "nope": 1.0}}
    with pytest.raises(ValueError, match="not in the passages.*nope"):
        rerank_run(scorers["bert"], QUERIES, PASSAGES, run, progress=False)
    with pytest.raises(ValueError, match="no text.*q9"):
        rerank_run(scorers["bert"], QUERIES, PASSAGES, {"q9": {"d1": 1.0}}, progress=False)


def test_scorer_checks_lengths_and_labels(cross_encoders):
    _, _, bert_tok, bert = cross_encoders["bert"]
    _, _, deberta_tok, deberta = cross_encoders["deberta"]
    with pytest.raises(ValueError, match="max_length 128 exceeds the model's max_position_embeddings 64"):
        CrossEncoderScorer(bert, bert_tok, max_length=128)
    CrossEncoderScorer(deberta, deberta_tok, max_length=128)  # relative positions only: no absolute limit
    with pytest.raises(ValueError, match="label_index 2 is out of range.*2 labels"):
        CrossEncoderScorer(bert, bert_tok, max_length=32, label_index=2)
    assert CrossEncoderScorer(bert, bert_tok, max_length=32, label_index=0).label_index == 0


# ---- the command -------------------------------------------------------------------------------------------------
def rerank_cli(argv):
    parser = argparse.ArgumentParser()
    add_rerank_arguments(parser)
    return run_rerank(parser.parse_args(argv))


@pytest.fixture(scope="module")
def msmarco_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("msmarco")
    (d / "queries.tsv").write_text("".join(f"{q}\t{t}\n" for q, t in QUERIES.items()))
    (d / "collection.tsv").write_text("".join(f"{p}\t{t}\n" for p, t in PASSAGES.items()))
    write_trec_run(d / "run.trec", first_stage_run())
    write_qrels(d / "qrels.tsv", {"q1": {"d1": 1}, "q2": {"d6": 1}})
    return d


def test_cli_reranks_a_trec_run(cross_encoders, msmarco_files, tmp_path, capsys):
    hf, model_dir, tokenizer, _ = cross_encoders["bert"]
    d = msmarco_files
    out = tmp_path / "reranked.trec"
    assert rerank_cli(["--model", str(model_dir), "--run", str(d / "run.trec"), "--queries", str(d / "queries.tsv"),
                       "--passages", str(d / "collection.tsv"), "--out", str(out), "--depth", "3",
                       "--batch-size", "4", "--max-length", str(MAX_LENGTH), "--qrels", str(d / "qrels.tsv")]) == 0
    printed = capsys.readouterr().out
    assert "MRR@10" in printed and "nDCG@10" in printed and "re-ranked" in printed
    reranked, first = read_trec_run(out), first_stage_run()
    for qid in QUERIES:
        top = rank_documents(first[qid])[:3]
        ce = hf_scores(hf, tokenizer, [(QUERIES[qid], PASSAGES[p]) for p in top], 1)
        assert rank_documents(reranked[qid]) == [top[i] for i in np.argsort(-ce)] + rank_documents(first[qid])[3:]


def test_cli_reranks_dpr_results(cross_encoders, tmp_path, capsys):
    _, model_dir, _, _ = cross_encoders["bert"]
    ctxs = [{"id": d, "title": "t", "text": PASSAGES[d], "score": 5.0 - i, "has_answer": d == "d6"}
            for i, d in enumerate(PASSAGES)]
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"question": QUERIES["q2"], "answers": ["a"], "ctxs": ctxs}]))
    out = tmp_path / "reranked.json"
    assert rerank_cli(["--model", str(model_dir), "--results", str(results), "--out", str(out),
                       "--batch-size", "4", "--max-length", str(MAX_LENGTH), "--k", "1", "5"]) == 0
    printed = capsys.readouterr().out
    assert "Top-1" in printed and "Top-5" in printed and "retriever" in printed
    back = list(read_retriever_results(out))
    assert sorted(c["id"] for c in back[0]["ctxs"]) == sorted(PASSAGES)
    scores = [c["score"] for c in back[0]["ctxs"]]
    assert scores == sorted(scores, reverse=True)


def test_cli_errors_name_the_bad_input(cross_encoders, msmarco_files, tmp_path, minilm_dir):
    _, model_dir, _, _ = cross_encoders["bert"]
    d = msmarco_files
    bad_run = tmp_path / "bad.trec"
    write_trec_run(bad_run, {"q1": {"d1": 2.0, "d404": 1.0}})
    common = ["--model", str(model_dir), "--queries", str(d / "queries.tsv"), "--out", str(tmp_path / "o.trec")]
    with pytest.raises(ValueError, match=r"collection\.tsv.*passages of the run are missing.*d404"):
        rerank_cli(common + ["--run", str(bad_run), "--passages", str(d / "collection.tsv")])
    with pytest.raises(FileNotFoundError, match="--passages .*nowhere.tsv"):
        rerank_cli(common + ["--run", str(bad_run), "--passages", str(tmp_path / "nowhere.tsv")])
    with pytest.raises(ValueError, match="either --run"):
        rerank_cli(common + ["--passages", str(d / "collection.tsv")])
    with pytest.raises(ValueError, match="BertModel, not a cross-encoder"):
        rerank_cli(["--model", str(minilm_dir), "--run", str(d / "run.trec"), "--queries", str(d / "queries.tsv"),
                    "--passages", str(d / "collection.tsv"), "--out", str(tmp_path / "o.trec")])
    assert not (tmp_path / "o.trec").exists()  # nothing written on failure
