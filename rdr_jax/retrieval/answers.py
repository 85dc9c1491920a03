"""Answer matching as DPR evaluates it: retriever `has_answer` and reader exact match.

Follows facebookresearch/DPR `dpr/data/qa_validation.py` and the `SimpleTokenizer` of
`dpr/utils/tokenizers.py` (itself from DrQA), so top-k answer recall computed here is comparable to
the numbers in the DPR and RDR papers:

- "string" match (NQ, TriviaQA, WebQuestions): NFD-normalise passage and answer, tokenize both with
  the regex ``([\\p{L}\\p{N}\\p{M}]+)|([^\\p{Z}\\p{C}])``, lower-case every token, and look for the
  answer's token list as a contiguous sub-list of the passage's.
- "regex" match (CuratedTREC): every answer is a regular expression, searched (case-insensitive) in
  the NFD-normalised passage text; a pattern that does not compile never matches, as in DPR.
- Reader exact match: SQuAD normalisation (lower-case, drop ASCII punctuation, drop the articles
  a/an/the, fold white space), then string equality, max over the gold answers.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Iterable, Sequence

import regex
from tqdm.auto import tqdm

MATCH_TYPES = ("string", "regex")

# DPR's SimpleTokenizer pattern with its two groups made non-capturing, so `findall` returns whole
# tokens; the set of matches is the same as DPR's `finditer(...).group()`.
_ALPHA_NUM = r"[\p{L}\p{N}\p{M}]+"
_NON_WS = r"[^\p{Z}\p{C}]"
_FLAGS = regex.IGNORECASE | regex.UNICODE | regex.MULTILINE

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = regex.compile(r"\b(a|an|the)\b")


def normalize_unicode(text: str) -> str:
    """NFD normalisation, applied by DPR to passages and answers before matching."""
    return unicodedata.normalize("NFD", text)


class SimpleTokenizer:
    """DPR's answer-matching tokenizer: the compiled regex is built once and reused."""

    def __init__(self) -> None:
        self._pattern = regex.compile(f"(?:{_ALPHA_NUM})|(?:{_NON_WS})", flags=_FLAGS)

    def tokenize(self, text: str, uncased: bool = True) -> list[str]:
        """Tokens of `text` (already NFD-normalised), lower-cased when `uncased` (DPR always is)."""
        tokens = self._pattern.findall(text)
        # Lower each token on its own, as DPR does: str.lower is context-dependent (final sigma).
        return [token.lower() for token in tokens] if uncased else tokens


_DEFAULT_TOKENIZER: SimpleTokenizer | None = None


def default_tokenizer() -> SimpleTokenizer:
    global _DEFAULT_TOKENIZER
    if _DEFAULT_TOKENIZER is None:
        _DEFAULT_TOKENIZER = SimpleTokenizer()
    return _DEFAULT_TOKENIZER


def _check_match_type(match_type: str) -> None:
    if match_type not in MATCH_TYPES:
        raise ValueError(f"match_type must be one of {MATCH_TYPES}, got {match_type!r}")


def _compile_answer_regex(pattern: str):
    try:
        return regex.compile(normalize_unicode(pattern), flags=_FLAGS)
    except Exception:  # DPR catches BaseException; a bad pattern simply never matches
        return None


def _contains_sublist(tokens: Sequence[str], sub: Sequence[str]) -> bool:
    n = len(sub)
    if n == 0:
        # DPR's loop compares [] with text[0:0] and reports a match: an answer with no tokens
        # (empty or white space only) is found in every passage. Kept for identical numbers.
        return True
    first = sub[0]
    for i in range(len(tokens) - n + 1):
        if tokens[i] == first and tokens[i : i + n] == sub:
            return True
    return False


class AnswerMatcher:
    """The gold answers of one question, prepared once and tested against many passages.

    Gives the same result as `has_answer(answers, text, match_type)` for every text; it only avoids
    re-tokenizing (or re-compiling) the answers for each of a question's passages.
    """

    def __init__(
        self,
        answers: Iterable[str],
        match_type: str = "string",
        tokenizer: SimpleTokenizer | None = None,
    ) -> None:
        _check_match_type(match_type)
        if isinstance(answers, str):
            raise TypeError("answers must be a list of strings, got a single string")
        self.match_type = match_type
        self.tokenizer = tokenizer or default_tokenizer()
        answers = list(answers)
        if match_type == "string":
            self._answer_tokens = [self.tokenizer.tokenize(normalize_unicode(a)) for a in answers]
        else:
            self._answer_patterns = [p for p in map(_compile_answer_regex, answers) if p is not None]

    def __call__(self, text: str) -> bool:
        text = normalize_unicode(text)
        if self.match_type == "string":
            tokens = self.tokenizer.tokenize(text)
            return any(_contains_sublist(tokens, answer) for answer in self._answer_tokens)
        return any(pattern.search(text) is not None for pattern in self._answer_patterns)


def has_answer(
    answers: Iterable[str],
    text: str,
    match_type: str = "string",
    tokenizer: SimpleTokenizer | None = None,
) -> bool:
    """Whether passage `text` contains one of `answers` (DPR's `has_answer`)."""
    return AnswerMatcher(answers, match_type, tokenizer)(text)


def answer_hits(
    answers_per_question: Sequence[Sequence[str]],
    passages_per_question: Sequence[Sequence[str]],
    match_type: str = "string",
    progress: bool = True,
) -> list[list[bool]]:
    """For each question, `has_answer` of each of its ranked passages (input to top-k recall).

    `passages_per_question[q]` holds the texts of question q's retrieved passages, best first (DPR
    matches on the passage text only, without the title).
    """
    if len(answers_per_question) != len(passages_per_question):
        raise ValueError(
            f"answers_per_question has {len(answers_per_question)} questions but "
            f"passages_per_question has {len(passages_per_question)}"
        )
    tokenizer = default_tokenizer()
    hits = []
    pairs = zip(answers_per_question, passages_per_question)
    for answers, passages in tqdm(
        pairs, total=len(answers_per_question), desc="matching answers", disable=not progress
    ):
        matcher = AnswerMatcher(answers, match_type, tokenizer)
        hits.append([matcher(text) for text in passages])
    return hits


def normalize_answer(text: str) -> str:
    """SQuAD/DPR answer normalisation: lower, drop punctuation, drop articles, fold spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, answers: str | Iterable[str]) -> bool:
    """Reader EM: whether the normalised prediction equals one of the normalised gold answers."""
    if isinstance(answers, str):
        answers = [answers]
    normalized = normalize_answer(prediction)
    return any(normalized == normalize_answer(answer) for answer in answers)
