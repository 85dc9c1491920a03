"""Answer matching: DPR's has_answer (string and regex) and reader exact match."""

import random
import unicodedata

import pytest
import regex

from rdr_jax.retrieval.answers import (
    AnswerMatcher,
    SimpleTokenizer,
    answer_hits,
    exact_match_score,
    has_answer,
    normalize_answer,
)


def dpr_reference_has_answer(answers, text):
    """DPR's qa_validation.has_answer ("string") written out as in its source, for comparison."""
    pattern = regex.compile(
        r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])", flags=regex.IGNORECASE + regex.UNICODE + regex.MULTILINE
    )

    def words(s):
        return [m.group().lower() for m in pattern.finditer(s)]

    text = words(unicodedata.normalize("NFD", text))
    for answer in answers:
        answer = words(unicodedata.normalize("NFD", answer))
        for i in range(0, len(text) - len(answer) + 1):
            if answer == text[i : i + len(answer)]:
                return True
    return False


def test_tokenizer_splits_words_and_single_symbols_lowercased():
    tokens = SimpleTokenizer().tokenize("Hello, World! It's 3.5\tkm\u00a0away")
    assert tokens == ["hello", ",", "world", "!", "it", "'", "s", "3", ".", "5", "km", "away"]
    assert SimpleTokenizer().tokenize("ABC def", uncased=False) == ["ABC", "def"]


def test_string_match_is_contiguous_whole_token_sublist():
    text = "I love New York City, said the mayor."
    assert has_answer(["new york"], text)
    assert has_answer(["NEW YORK CITY"], text)
    assert has_answer(["city,"], text)  # punctuation is a token of its own
    assert not has_answer(["york new"], text)
    assert not has_answer(["new city"], text)
    assert not has_answer(["ork"], text)  # no partial tokens
    assert has_answer(["nothing here", "mayor"], text)  # any of the answers


def test_string_match_normalises_unicode_to_nfd():
    precomposed, decomposed = "Caf\u00e9", "Cafe\u0301"
    assert has_answer([precomposed], f"The {decomposed} opens")
    assert has_answer([decomposed], f"The {precomposed} opens")
    # A combining mark stays inside its word ([\p{M}]), so "cafe" alone is not found.
    assert not has_answer(["cafe"], f"The {precomposed} opens")


def test_empty_answer_matches_every_passage_like_dpr():
    assert has_answer(["   "], "anything at all")
    assert dpr_reference_has_answer(["   "], "anything at all")


def test_regex_match_is_case_insensitive_search_and_bad_patterns_never_match():
    text = "The Eiffel Tower was finished in 1889.\nParis"
    assert has_answer([r"\d{4}"], text, match_type="regex")
    assert has_answer([r"eiffel\s+tower"], text, match_type="regex")
    assert has_answer([r"^paris$"], text, match_type="regex")  # MULTILINE
    assert not has_answer([r"\d{5}"], text, match_type="regex")
    assert not has_answer(["(unclosed"], text, match_type="regex")
    assert has_answer(["(unclosed", "18[0-9]{2}"], text, match_type="regex")


def test_unknown_match_type_and_single_string_answers_are_rejected():
    with pytest.raises(ValueError, match="match_type"):
        has_answer(["x"], "x", match_type="fuzzy")
    with pytest.raises(TypeError, match="list of strings"):
        AnswerMatcher("paris")


def test_agrees_with_dpr_reference_on_random_texts():
    rng = random.Random(0)
    alphabet = ["a", "b", "A", "B", "\u00e9", "e\u0301", "\u03a3", "\u03c3", "1", " ", " ", ",", "-", "\u00a0", "\n"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    answers = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    found = 0
    for text, answer in zip(texts, answers):
        expected = dpr_reference_has_answer([answer], text)
        assert has_answer([answer], text) == expected, (answer, text)
        found += expected
    assert 0 < found < len(texts)  # the sample exercises both outcomes


def test_answer_hits_per_question_and_length_check():
    hits = answer_hits(
        [["paris"], ["1889"]],
        [["London is big", "Paris is big"], ["built in 1889", "no", "1889!"]],
        progress=False,
    )
    assert hits == [[False, True], [True, False, True]]
    with pytest.raises(ValueError, match="has 1 questions but passages_per_question has 2"):
        answer_hits([["a"]], [["a"], ["b"]], progress=False)


def test_exact_match_normalisation():
    assert normalize_answer("  The  Beatles!  ") == "beatles"
    assert normalize_answer("An apple, a pear") == "apple pear"
    assert normalize_answer("Theater") == "theater"  # articles only as whole words
    assert exact_match_score("the Beatles.", ["Beatles"])
    assert exact_match_score("beatles", "The Beatles")
    assert exact_match_score("1889", ["Paris", "1889"])
    assert not exact_match_score("Beatle", ["Beatles"])
    assert not exact_match_score("Paris France", ["Paris"])
