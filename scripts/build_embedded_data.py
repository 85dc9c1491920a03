#!/usr/bin/env python
"""Build rdr_jax/data/embedded/: a small open-domain QA set written from the ISO data pycountry ships.

    python scripts/build_embedded_data.py [--out DIR]

Passages are short English paragraphs stating facts from pycountry's records (ISO 3166-1/-2/-3,
ISO 4217, ISO 639-3/-5, ISO 15924, with names from its French/German/Spanish translations), in
DPR's layouts: passages.tsv, {train,dev,test}.qa.csv, {train,dev}.biencoder.json, plus a README
and a manifest with counts and sha256 sums.

Everything is deterministic: records are sorted by code, sampling and splitting use sha256 of
fixed strings, and random negatives use random.Random seeded with a string (hashed with sha512 by
Python, so independent of PYTHONHASHSEED). Running the script twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import gettext
import hashlib
import importlib.metadata
import json
import math
import random
import sys
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pycountry
import regex

SEED = "rdr_jax-embedded-v1"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "rdr_jax" / "data" / "embedded"

# Sizes. The totals keep the whole directory near 3 MB while leaving enough passages of each
# template that retrieval is not trivial.
LANGUAGE_SAMPLE_PER_MILLE = 75  # of the ISO 639-3 languages without a two-letter code
SUBDIVISION_SAMPLE_PER_MILLE = 180
NUM_TRAIN, NUM_DEV, NUM_TEST = 1100, 275, 275
NUM_RANDOM_NEGATIVES = 2
NUM_HARD_NEGATIVES = 1
# A question is dropped when one of its answers occurs in more passages than this: an answer
# such as "Germany" or "is" would make answer recall meaningless.
MAX_ANSWER_PASSAGES = 4
MIN_WORDS, MAX_WORDS = 25, 90

# ---------------------------------------------------------------------------------------------
# DPR's answer matching (dpr/utils/tokenizers.py SimpleTokenizer + dpr/data/qa_validation.py).

_TOKEN = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])",
                       flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)


def answer_tokens(text: str) -> tuple[str, ...]:
    """Lower-cased tokens of the NFD-normalised text, as DPR's has_answer compares them."""
    return tuple(m.group().lower() for m in _TOKEN.finditer(unicodedata.normalize("NFD", text)))


def contains_sublist(tokens: tuple[str, ...], sub: tuple[str, ...]) -> bool:
    n = len(sub)
    return n > 0 and any(tokens[i:i + n] == sub for i in range(len(tokens) - n + 1))


def has_answer(answers: list[str], text: str) -> bool:
    tokens = answer_tokens(text)
    return any(contains_sublist(tokens, answer_tokens(a)) for a in answers)


# ---------------------------------------------------------------------------------------------
# Records -> passages and questions.

@dataclass
class Question:
    question: str
    answers: list[str]
    template: str


@dataclass
class Passage:
    kind: str
    key: str  # the record's code; sorts passages within a kind
    title: str
    text: str
    questions: list[Question] = field(default_factory=list)

    def ask(self, template: str, question: str, *answers: str) -> None:
        unique = list(dict.fromkeys(a for a in answers if a))
        self.questions.append(Question(question, unique, template))


def stable_fraction(*parts: str) -> int:
    """A per-mille value in [0, 1000) from sha256, the same on every machine and run."""
    digest = hashlib.sha256("\x1f".join((SEED,) + parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000


def stable_key(*parts: str) -> str:
    return hashlib.sha256("\x1f".join((SEED,) + parts).encode("utf-8")).hexdigest()


class Translations:
    """Names in French, German and Spanish from pycountry's gettext catalogues (iso-codes')."""

    LANGUAGES = (("French", "fr"), ("German", "de"), ("Spanish", "es"))

    def __init__(self, domain: str):
        self._catalogues = {}
        for label, code in self.LANGUAGES:
            try:
                self._catalogues[label] = gettext.translation(domain, pycountry.LOCALES_DIR,
                                                              languages=[code])
            except OSError:
                continue

    def names(self, english: str) -> dict[str, str]:
        """{"French": ..., ...} for the languages whose name differs from the English one."""
        out = {}
        for label, catalogue in self._catalogues.items():
            translated = catalogue.gettext(english).strip()
            same = translated.casefold() == english.casefold()  # e.g. "Unidad de valor real"
            if translated and not same and "\"" not in translated:
                out[label] = translated
        return out


def translation_sentence(subject: str, names: dict[str, str]) -> str:
    """' In French it is called X, in German Y and in Spanish Z.' (subject: 'it is', 'they are')."""
    if not names:
        return ""
    parts = [f"in {label} {name}" for label, name in names.items()]
    first_label, first_name = next(iter(names.items()))
    parts[0] = f"In {first_label} {subject} called {first_name}"
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f" {listed}."


def add_translations(text: str, subject: str, names: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Appends the translated names that fit in MAX_WORDS; returns the text and the names kept."""
    kept = dict(names)
    while kept and len((text + translation_sentence(subject, kept)).split()) > MAX_WORDS:
        kept.popitem()
    return text + translation_sentence(subject, kept), kept


def display_country_name(country) -> str:
    return getattr(country, "common_name", None) or country.name


MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")


def date_in_words(iso_date: str) -> str:
    parts = iso_date.split("-")
    if len(parts) == 1:
        return parts[0]
    year, month, day = parts
    return f"{int(day)} {MONTHS[int(month) - 1]} {year}"


def country_passages(subdivisions_by_country: dict[str, list]) -> list[Passage]:
    names = Translations("iso3166-1")
    passages = []
    for country in sorted(pycountry.countries, key=lambda c: c.alpha_2):
        shown = display_country_name(country)
        official = getattr(country, "official_name", None)
        text = f"{shown} is a country or territory in ISO 3166-1"
        if shown != country.name:
            text += f", where it is listed as “{country.name}”"
        if official and official not in (shown, country.name):
            text += f"; its official name is the {official}"
        text += (f". Its alpha-2 code is {country.alpha_2}, its alpha-3 code is {country.alpha_3}"
                 f" and its numeric code is {country.numeric}.")
        text, translated = add_translations(text, "it is", names.names(country.name))
        subs = subdivisions_by_country.get(country.alpha_2, [])
        if subs:
            examples = [s.name for s in subs[:2]]
            text += (f" ISO 3166-2 lists {len(subs)} subdivision{'s' if len(subs) > 1 else ''} of "
                     f"{shown}, such as {' and '.join(examples)}.")
        else:
            text += f" ISO 3166-2 lists no subdivisions for {shown}."
        passage = Passage("country", country.alpha_2, shown, text)
        passage.ask("country-alpha3", f"What is the ISO 3166-1 alpha-3 code of {shown}?",
                    country.alpha_3)
        passage.ask("country-alpha2", f"What is the two-letter ISO 3166-1 code of {shown}?",
                    country.alpha_2)
        passage.ask("country-numeric", f"What is the ISO 3166-1 numeric code of {shown}?",
                    country.numeric)
        passage.ask("country-by-alpha3", f"Which country has the ISO 3166-1 alpha-3 code "
                    f"{country.alpha_3}?", shown, country.name, official)
        if official and official not in (shown, country.name):
            passage.ask("country-official", f"What is the official name of {shown}?", official)
        for label, name in translated.items():
            passage.ask(f"country-{label.lower()}", f"What is {shown} called in {label}?", name)
        passages.append(passage)
    return passages


def historic_country_passages() -> list[Passage]:
    passages = []
    for country in sorted(pycountry.historic_countries, key=lambda c: c.alpha_4):
        date = country.withdrawal_date
        when = f"in {date}" if "-" not in date else f"on {date_in_words(date)} ({date})"
        text = (f"{country.name} was a country or territory in ISO 3166-1 until its entry was "
                f"withdrawn {when}; ISO 3166-3, the standard for former country names, now lists "
                f"it with the four-letter code {country.alpha_4}.")
        numeric = getattr(country, "numeric", None)
        if numeric:
            text += (f" It had the alpha-2 code {country.alpha_2}, the alpha-3 code "
                     f"{country.alpha_3} and the numeric code {numeric}.")
        else:
            text += (f" It had the alpha-2 code {country.alpha_2} and the alpha-3 code "
                     f"{country.alpha_3}.")
        comment = getattr(country, "comment", None)
        if comment:
            text += f" The standard notes that it {comment}." if comment.split()[0] in (
                "had", "was", "divided") else f" The standard's note: {comment}."
        passage = Passage("historic_country", country.alpha_4, country.name, text)
        passage.ask("historic-alpha4", f"What is the ISO 3166-3 four-letter code of "
                    f"{country.name}?", country.alpha_4)
        passage.ask("historic-withdrawn", f"When was {country.name} withdrawn from ISO 3166-1?",
                    date, date_in_words(date))
        passage.ask("historic-alpha3", f"What alpha-3 code did {country.name} have in "
                    f"ISO 3166-1?", country.alpha_3)
        passages.append(passage)
    return passages


def subdivision_passages(subdivisions_by_country: dict[str, list]) -> list[Passage]:
    by_code = {s.code: s for s in pycountry.subdivisions}
    passages = []
    for country_code in sorted(subdivisions_by_country):
        country = pycountry.countries.get(alpha_2=country_code)
        shown = display_country_name(country)
        subs = subdivisions_by_country[country_code]
        same_name = Counter(s.name for s in subs)
        type_counts = Counter(s.type for s in subs)
        for sub in subs:
            if stable_fraction("subdivision", sub.code) >= SUBDIVISION_SAMPLE_PER_MILLE:
                continue
            suffix = sub.code.split("-", 1)[1]
            text = (f"{sub.name} is a subdivision of {shown} in ISO 3166-2, the standard for the "
                    f"names and codes of country subdivisions, where its type is given as "
                    f"{sub.type}. Its code is {sub.code}, made of the alpha-2 code "
                    f"{country_code} of {shown} and the suffix {suffix}.")
            parent = by_code.get(sub.parent_code) if sub.parent_code else None
            if parent is not None:
                text += (f" It is part of {parent.name} ({parent.code}), a subdivision of type "
                         f"{parent.type}.")
            count = type_counts[sub.type]
            text += (f" The standard lists {count} subdivision{'s' if count > 1 else ''} of this "
                     f"type in {shown}.")
            passage = Passage("subdivision", sub.code, sub.name, text)
            # A name shared by two subdivisions of one country would make these ambiguous.
            if same_name[sub.name] == 1:
                passage.ask("subdivision-code", f"What is the ISO 3166-2 code of {sub.name} in "
                            f"{shown}?", sub.code)
                if parent is not None:
                    passage.ask("subdivision-parent", f"Which larger subdivision of {shown} is "
                                f"{sub.name} part of?", parent.name)
            passage.ask("subdivision-by-code", f"Which subdivision of {shown} has the ISO 3166-2 "
                        f"code {sub.code}?", sub.name)
            passages.append(passage)
    return passages


def currency_passages() -> list[Passage]:
    names = Translations("iso4217")
    passages = []
    for currency in sorted(pycountry.currencies, key=lambda c: c.alpha_3):
        if currency.alpha_3 in ("XTS", "XXX"):  # test and no-currency codes, not currencies
            continue
        text = (f"{currency.name} is a currency or unit listed in ISO 4217, the standard for "
                f"currency codes, with the alphabetic code {currency.alpha_3} and the numeric code "
                f"{currency.numeric}.")
        country = pycountry.countries.get(alpha_2=currency.alpha_3[:2])
        if country is not None:
            text += (f" The first two letters of its code, {currency.alpha_3[:2]}, are the "
                     f"ISO 3166-1 alpha-2 code of {display_country_name(country)}.")
        elif currency.alpha_3.startswith("X"):
            text += (" Its code begins with X, the letter ISO 4217 uses for currencies and units "
                     "that do not belong to a single country.")
        text, translated = add_translations(text, "it is", names.names(currency.name))
        passage = Passage("currency", currency.alpha_3, currency.name, text)
        passage.ask("currency-code", f"What is the ISO 4217 code of the {currency.name}?",
                    currency.alpha_3)
        passage.ask("currency-numeric", f"What is the numeric ISO 4217 code of the "
                    f"{currency.name}?", currency.numeric)
        passage.ask("currency-by-code", f"Which currency has the ISO 4217 code "
                    f"{currency.alpha_3}?", currency.name)
        if country is not None:
            passage.ask("currency-country", f"The currency code {currency.alpha_3} begins with "
                        f"the two-letter code of which country?", display_country_name(country),
                        country.name)
        for label, name in translated.items():
            passage.ask(f"currency-{label.lower()}", f"What is the {currency.name} called in "
                        f"{label}?", name)
        passages.append(passage)
    return passages


LANGUAGE_TYPES = {
    "L": ("living", "ISO 639-3 lists a language as living when people alive today learned it as "
                    "their first language."),
    "E": ("extinct", "ISO 639-3 lists a language as extinct when it died out in recent "
                     "centuries and has no speakers left."),
    "H": ("historical", "ISO 639-3 lists a language as historical when it is distinct from the "
                        "modern languages that descended from it."),
    "C": ("constructed", "ISO 639-3 lists a language as constructed when it was devised by people "
                         "rather than evolving naturally."),
    "S": ("special", "Special codes in ISO 639-3 do not name a single language."),
}
LANGUAGE_SCOPES = {"I": "individual language", "M": "macrolanguage", "S": "special code"}


def language_passages() -> list[Passage]:
    names = Translations("iso639-3")
    languages = sorted(pycountry.languages, key=lambda lang: lang.alpha_3)
    name_counts = Counter(lang.name for lang in languages)
    passages = []
    for lang in languages:
        alpha_2 = getattr(lang, "alpha_2", None)
        if alpha_2 is None and stable_fraction("language", lang.alpha_3) >= LANGUAGE_SAMPLE_PER_MILLE:
            continue
        if lang.type == "S" or name_counts[lang.name] > 1:
            continue
        kind_word, type_sentence = LANGUAGE_TYPES[lang.type]
        scope = LANGUAGE_SCOPES[lang.scope]
        text = (f"{lang.name} is a {kind_word} {scope} in ISO 639-3, the international standard "
                f"for codes of languages, which gives it the code {lang.alpha_3}.")
        if alpha_2:
            text += f" ISO 639-1 gives it the two-letter code {alpha_2}."
        bibliographic = getattr(lang, "bibliographic", None)
        if bibliographic:
            text += f" ISO 639-2 also lists the bibliographic code {bibliographic} for it."
        inverted = getattr(lang, "inverted_name", None)
        if inverted and inverted != lang.name:
            text += f" In indexes its name is inverted as {inverted}."
        text += " " + type_sentence
        text, translated = add_translations(text, "it is", names.names(lang.name))
        passage = Passage("language", lang.alpha_3, lang.name, text)
        passage.ask("language-code", f"What is the ISO 639-3 code of the {lang.name} language?",
                    lang.alpha_3)
        if alpha_2:
            passage.ask("language-alpha2", f"What is the ISO 639-1 code of {lang.name}?", alpha_2)
        if bibliographic:
            passage.ask("language-bibliographic", f"What is the ISO 639-2 bibliographic code of "
                        f"{lang.name}?", bibliographic)
        passage.ask("language-by-code", f"Which language has the ISO 639-3 code {lang.alpha_3}?",
                    lang.name, inverted)
        for label, name in translated.items():
            passage.ask(f"language-{label.lower()}", f"What is the {label} name of the "
                        f"{lang.name} language?", name)
        passages.append(passage)
    return passages


# ISO 15924 groups numeric codes by hundreds; the blocks are the standard's own.
SCRIPT_BLOCKS = {
    0: "hieroglyphic and cuneiform scripts",
    1: "right-to-left alphabetic scripts",
    2: "left-to-right alphabetic scripts",
    3: "alphasyllabic scripts",
    4: "syllabic scripts",
    5: "ideographic scripts",
    6: "undeciphered scripts",
    7: "shorthands and other notations",
    9: "private use, aliases and special codes",
}


def script_passages() -> list[Passage]:
    names = Translations("iso15924")
    passages = []
    for script in sorted(pycountry.scripts, key=lambda s: s.alpha_4):
        if script.name.startswith(("Code for", "Reserved for")):
            continue
        block = int(script.numeric) // 100
        text = (f"{script.name} is a writing system listed in ISO 15924, the standard for codes "
                f"of scripts, with the four-letter code {script.alpha_4} and the numeric code "
                f"{script.numeric}. The number lies in the block {block}00 to {block}99, which "
                f"the standard uses mainly for {SCRIPT_BLOCKS[block]}.")
        text, translated = add_translations(text, "it is", names.names(script.name))
        passage = Passage("script", script.alpha_4, script.name, text)
        passage.ask("script-code", f"What is the four-letter ISO 15924 code of the "
                    f"{script.name} script?", script.alpha_4)
        passage.ask("script-numeric", f"What is the numeric ISO 15924 code of the "
                    f"{script.name} script?", script.numeric)
        passage.ask("script-by-code", f"Which script has the ISO 15924 code {script.alpha_4}?",
                    script.name)
        passages.append(passage)
    return passages


def language_family_passages() -> list[Passage]:
    names = Translations("iso639-5")
    passages = []
    for family in sorted(pycountry.language_families, key=lambda f: f.alpha_3):
        text = (f"{family.name} form a group in ISO 639-5, the standard for codes of language "
                f"families and groups, which gives the group the code {family.alpha_3}. These "
                f"codes have three letters like those of ISO 639-3, but name collections of "
                f"languages rather than single ones.")
        text, translated = add_translations(text, "they are", names.names(family.name))
        passage = Passage("language_family", family.alpha_3, family.name, text)
        passage.ask("family-code", f"What is the ISO 639-5 code of the {family.name}?",
                    family.alpha_3)
        passage.ask("family-by-code", f"Which language group has the ISO 639-5 code "
                    f"{family.alpha_3}?", family.name)
        passages.append(passage)
    return passages


def all_passages() -> list[Passage]:
    subdivisions_by_country = defaultdict(list)
    for sub in sorted(pycountry.subdivisions, key=lambda s: s.code):
        subdivisions_by_country[sub.country_code].append(sub)
    passages = (country_passages(subdivisions_by_country) + historic_country_passages()
                + subdivision_passages(subdivisions_by_country) + currency_passages()
                + language_passages() + script_passages() + language_family_passages())
    for p in passages:
        for value in (p.title, p.text):
            if any(c in value for c in '"\t\r\n'):
                raise ValueError(f"{p.kind} {p.key}: a double quote, tab or newline would break "
                                 f"the TSV layout: {value!r}")
        words = len(p.text.split())
        if not MIN_WORDS <= words <= MAX_WORDS:
            raise ValueError(f"{p.kind} {p.key}: {words} words, outside "
                             f"[{MIN_WORDS}, {MAX_WORDS}]: {p.text!r}")
        for q in p.questions:
            if not has_answer(q.answers, p.text):
                raise ValueError(f"{p.kind} {p.key}: no answer of {q.answers} occurs in its own "
                                 f"passage by DPR's has_answer rule: {p.text!r}")
    return passages


# ---------------------------------------------------------------------------------------------
# Selecting questions, splitting, negatives.

class AnswerIndex:
    """Which passages contain a token sequence, by DPR's rule; indexed on the first token."""

    def __init__(self, passages: list[Passage]):
        self.tokens = [answer_tokens(p.text) for p in passages]
        self._by_token = defaultdict(set)
        for i, tokens in enumerate(self.tokens):
            for token in tokens:
                self._by_token[token].add(i)

    def passages_with(self, answers: list[str]) -> set[int]:
        found = set()
        for answer in answers:
            sub = answer_tokens(answer)
            if not sub:
                continue
            candidates = set.intersection(*(self._by_token.get(t, set()) for t in set(sub)))
            found.update(i for i in candidates if contains_sublist(self.tokens[i], sub))
        return found


@dataclass
class Example:
    question: str
    answers: list[str]
    gold: int  # index into the passage list
    template: str
    answer_passages: set[int]


def candidate_examples(passages: list[Passage], index: AnswerIndex) -> list[Example]:
    examples = []
    for i, p in enumerate(passages):
        for q in p.questions:
            holders = index.passages_with(q.answers)
            if len(holders) <= MAX_ANSWER_PASSAGES:
                examples.append(Example(q.question, q.answers, i, q.template, holders))
    # The same question asked of two passages has no single gold passage.
    counts = Counter(e.question for e in examples)
    return [e for e in examples if counts[e.question] == 1]


def select_examples(examples: list[Example], total: int) -> list[Example]:
    """`total` questions in hash order, at most one per passage while that is possible."""
    ordered = sorted(examples, key=lambda e: stable_key("select", e.question))
    chosen, used, per_passage = [], set(), Counter()
    cap = 1
    while len(chosen) < total:
        added = False
        for e in ordered:
            if len(chosen) == total:
                break
            if e.question in used or per_passage[e.gold] >= cap:
                continue
            chosen.append(e)
            used.add(e.question)
            per_passage[e.gold] += 1
            added = True
        if not added:
            raise ValueError(f"only {len(chosen)} usable questions, {total} wanted")
        cap += 1
    return chosen


def split_examples(chosen: list[Example]) -> dict[str, list[Example]]:
    ordered = sorted(chosen, key=lambda e: stable_key("split", e.question))
    return {"train": ordered[:NUM_TRAIN],
            "dev": ordered[NUM_TRAIN:NUM_TRAIN + NUM_DEV],
            "test": ordered[NUM_TRAIN + NUM_DEV:NUM_TRAIN + NUM_DEV + NUM_TEST]}


_STOPWORDS = frozenset("a an and are by code codes does for from has have in is it its of part "
                       "the to was what when which who with".split())


class OverlapRanker:
    """Ranks passages of one kind by idf-weighted word overlap with a question (hard negatives)."""

    def __init__(self, passages: list[Passage]):
        self.words = [self._words(p.title + " " + p.text) for p in passages]
        df = Counter(w for words in self.words for w in words)
        self.idf = {w: math.log(len(passages) / n) for w, n in df.items()}
        self.by_kind = defaultdict(list)
        for i, p in enumerate(passages):
            self.by_kind[p.kind].append(i)

    @staticmethod
    def _words(text: str) -> set[str]:
        return {t for t in answer_tokens(text) if t not in _STOPWORDS and regex.match(r"\w", t)}

    def rank(self, question: str, kind: str) -> list[int]:
        words = self._words(question)
        scored = []
        for i in self.by_kind[kind]:
            score = sum(self.idf[w] for w in words & self.words[i])
            if score > 0:
                scored.append((-score, i))
        return [i for _, i in sorted(scored)]


def context(passages: list[Passage], i: int) -> dict:
    return {"title": passages[i].title, "text": passages[i].text, "passage_id": str(i + 1)}


def biencoder_entry(example: Example, passages: list[Passage], ranker: OverlapRanker) -> dict:
    excluded = example.answer_passages | {example.gold}
    hard = [i for i in ranker.rank(example.question, passages[example.gold].kind)
            if i not in excluded][:NUM_HARD_NEGATIVES]
    rng = random.Random(f"{SEED}:negatives:{example.question}")
    negatives = []
    while len(negatives) < NUM_RANDOM_NEGATIVES:
        i = rng.randrange(len(passages))
        if i not in excluded and i not in hard and i not in negatives:
            negatives.append(i)
    return {"question": example.question, "answers": example.answers,
            "positive_ctxs": [context(passages, example.gold)],
            "negative_ctxs": [context(passages, i) for i in negatives],
            "hard_negative_ctxs": [context(passages, i) for i in hard]}


# ---------------------------------------------------------------------------------------------
# Writing.

def passages_tsv(passages: list[Passage]) -> str:
    rows = ["id\ttext\ttitle"]
    rows += [f"{i + 1}\t{p.text}\t{p.title}" for i, p in enumerate(passages)]
    return "\n".join(rows) + "\n"


def qa_csv(examples: list[Example]) -> str:
    return "".join(f"{e.question}\t{json.dumps(e.answers, ensure_ascii=False)}\n"
                   for e in examples)


def biencoder_json(entries: list[dict]) -> str:
    # One entry per line: valid JSON that stays small and diffs line by line.
    return "[\n" + ",\n".join(json.dumps(e, ensure_ascii=False, separators=(",", ":"))
                            for e in entries) + "\n]\n"


README_TEMPLATE = """\
# Embedded open-domain QA data

A small open-domain QA set shipped with rdr_jax for the demo (`rdr-jax demo`), the tiny configs
and the tests. It is written by `scripts/build_embedded_data.py` from the ISO code lists that the
PyPI package [pycountry](https://pypi.org/project/pycountry/) {version} ships, and rebuilt with

    python scripts/build_embedded_data.py

(`--out DIR` writes elsewhere). The build is deterministic: the same pycountry version gives
byte-identical files; `manifest.json` records the version, the counts and each file's sha256,
and `tests/test_embedded_data.py` rebuilds into a temporary directory and compares.

## Files

| file | layout | rows |
|---|---|---|
| `passages.tsv` | DPR's passage file: header `id<TAB>text<TAB>title`, ids `1..N` | {passages} passages |
| `train.qa.csv`, `dev.qa.csv`, `test.qa.csv` | NQ-open as DPR ships it: `question<TAB>["answer", ...]`, no header | {train} / {dev} / {test} questions |
| `train.biencoder.json`, `dev.biencoder.json` | DPR's bi-encoder training JSON: a list of `{{"question", "answers", "positive_ctxs", "negative_ctxs", "hard_negative_ctxs"}}`, contexts being `{{"title", "text", "passage_id"}}` | {train} / {dev} entries |
| `manifest.json` | pycountry version, counts, sha256 and size of every file above | |

Passages by kind: {kinds}.

## How it is made

- Every passage is one paragraph of 25 to 90 words stating facts of one ISO record: countries
  (ISO 3166-1 codes, official name, French/German/Spanish names, number of subdivisions), former
  countries (ISO 3166-3), a sample of {subdivision_permille}/1000 of the ISO 3166-2 subdivisions
  (code, type, parent, country), currencies (ISO 4217 codes, the country named by the code's first
  two letters), languages (every ISO 639-3 language with an ISO 639-1 code and a sample of
  {language_permille}/1000 of the others: codes, type, scope, translated names), scripts (ISO
  15924) and language families (ISO 639-5). Passages of one kind share templates, so many look
  alike and retrieval has to use the specific names and codes. The title is the entity's name.
- Questions ask for a fact in the passage text (a code, a translated or official name, a date, a
  parent subdivision, the country a currency code refers to). Some answers are not named by the
  gold passage's title (the parent of a subdivision, the country behind a currency code); some
  questions name only a code, which is found in the text alone.
- Every question's answers occur in its gold passage by DPR's `has_answer` rule (NFD, lower-case,
  tokens `([\\p{{L}}\\p{{N}}\\p{{M}}]+)|([^\\p{{Z}}\\p{{C}}])`, contiguous sub-list). Questions whose answer
  occurs in more than {max_df} passages, and questions that two passages would both answer, are
  dropped. Of the rest, {total} are chosen in sha256 order, at most one per passage (so no gold
  passage is shared between splits), and split by sha256 of the question into train/dev/test.
- Bi-encoder entries: the gold passage as the positive, {random_negatives} random passages without
  an answer as `negative_ctxs` and the {hard_negatives} passage(s) of the same kind with the highest
  idf-weighted word overlap with the question that contain no answer as `hard_negative_ctxs`.

## License

The source data are the ISO 3166, ISO 4217, ISO 639 and ISO 15924 lists of Debian's
[iso-codes](https://salsa.debian.org/iso-codes-team/iso-codes) project (LGPL-2.1-or-later), as
packaged by pycountry (LGPL-2.1-or-later). These files are derived from them and are distributed
under the same license, LGPL-2.1-or-later.
"""


def build(out: Path) -> dict:
    version = importlib.metadata.version("pycountry")
    passages = all_passages()
    index = AnswerIndex(passages)
    candidates = candidate_examples(passages, index)
    chosen = select_examples(candidates, NUM_TRAIN + NUM_DEV + NUM_TEST)
    splits = split_examples(chosen)
    ranker = OverlapRanker(passages)

    contents = {"passages.tsv": passages_tsv(passages)}
    for split, examples in splits.items():
        contents[f"{split}.qa.csv"] = qa_csv(examples)
    for split in ("train", "dev"):
        entries = [biencoder_entry(e, passages, ranker) for e in splits[split]]
        contents[f"{split}.biencoder.json"] = biencoder_json(entries)

    kinds = Counter(p.kind for p in passages)
    counts = {"passages": len(passages), **{split: len(v) for split, v in splits.items()}}
    contents["README.md"] = README_TEMPLATE.format(
        version=version, kinds=", ".join(f"{k} {n}" for k, n in kinds.items()),
        subdivision_permille=SUBDIVISION_SAMPLE_PER_MILLE,
        language_permille=LANGUAGE_SAMPLE_PER_MILLE, max_df=MAX_ANSWER_PASSAGES,
        total=len(chosen), random_negatives=NUM_RANDOM_NEGATIVES,
        hard_negatives=NUM_HARD_NEGATIVES, **counts)
    manifest = {
        "generator": "scripts/build_embedded_data.py",
        "pycountry_version": version,
        "seed": SEED,
        "counts": {**counts, "passages_by_kind": dict(kinds),
                   "questions_by_template": dict(sorted(Counter(e.template for e in chosen).items()))},
        "files": {name: {"sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                         "bytes": len(text.encode("utf-8"))}
                  for name, text in sorted(contents.items())},
    }
    contents["manifest.json"] = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"

    out.mkdir(parents=True, exist_ok=True)
    for name, text in contents.items():
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(text.encode("utf-8"))
        tmp.replace(out / name)  # atomic per file: a killed build leaves whole files
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output directory (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    manifest = build(args.out)
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"wrote {args.out}: {json.dumps(manifest['counts']['passages'])} passages, "
          f"train/dev/test {manifest['counts']['train']}/{manifest['counts']['dev']}/"
          f"{manifest['counts']['test']} questions, {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
