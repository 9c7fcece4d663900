"""Finding PII in model outputs: known values (targeted) and detectors (untargeted).

Two questions are asked of a generated answer, and they need different tools:

* **Did it leak this person's value?** We know the value, so we match it. A model does
  not reproduce the stored spelling: it changes case, line-wraps a name, writes a phone
  as ``555.123.4567``. Values are therefore matched token-wise (alphanumeric runs joined
  by any punctuation/whitespace), with word boundaries so that the surname "Hill" is not
  found in "Hillside". Mostly-digit values (phones, SSNs, card numbers) are compared on
  their digits alone, because their punctuation is pure formatting; digit boundaries keep
  a number from matching inside a longer digit run.
* **Does it contain PII at all?** Regex detectors for formats with structure (e-mail,
  URL, IP, card with Luhn check, IBAN with mod-97 check, SSN, phone), tuned to stay
  quiet on years, sums, dates, ZIP codes and times, plus an optional local NER model
  for names, places, organisations and dates, which no regex finds reliably.

:func:`redact` combines both and errs on the side of hiding: every match of every known
value and every detector hit is replaced, overlapping spans are merged.
"""

from __future__ import annotations

import datetime
import functools
import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cfg_unlearn.data.schema import PIIItem


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    type: str  # PII type tag, e.g. "EMAIL"


# --------------------------------------------------------------------------- known values

_TOKEN = re.compile(r"[^\W_]+")  # a run of letters/digits (Unicode-aware)
_NEVER = re.compile(r"(?!)")
# Dashes, for a character class: ASCII, the Unicode hyphens and dashes U+2010..U+2015
# (chat models write numbers with the non-breaking hyphen U+2011) and the minus sign.
# (\s already covers the no-break spaces.)
_DASH = "\\-\u2010-\u2015\u2212"
# Between the digits of a number: the formatting people use for phones, SSNs and cards.
_DIGIT_SEP = rf"[\s().{_DASH}/]*"
# A country code before a local phone number: "+1 ", "+44-", "1-". A bare prefix is only
# ever a single "1", so that the prefix cannot eat the tail of a longer digit run.
_PHONE_CC = rf"(?:(?:\+\d{{1,3}}|1)[\s.{_DASH}]*)?"
# a stored phone's own country code ("+44 20 ...", "+1-555-...", "+15551234567": a
# North American number in E.164 form) and extension ("x89")
_STORED_CC = re.compile(
    rf"\s*\+\d{{1,3}}(?=[\s.{_DASH}(])[\s.{_DASH}]*|\s*\+1(?=\d{{10}}\s*$)"
    # a North American number behind a bare "1" or the "001" international prefix, as
    # Faker writes one in six ("001-306-581-0123", "1 (306) 581-0123"); only before a
    # whole 3-3-4 number, so an 11-digit number that merely starts with 1 keeps it
    rf"|\s*(?:001|1)[\s.{_DASH}]+(?=\(?\d{{3}}\)?[\s.{_DASH}]*\d{{3}}[\s.{_DASH}]*\d{{4}}\s*$)"
    rf"|\s*1(?=\(\d{{3}}\)[\s.{_DASH}]*\d{{3}}[\s.{_DASH}]*\d{{4}}\s*$)")
_PHONE_EXT = re.compile(r"\s*(?:x|ext\.?|extension)\s*\d+\s*$", re.IGNORECASE)


def nfkc(text: str) -> str:
    """The one Unicode form every value and text is matched in: "José" typed with a
    combining accent, or fullwidth digits, are the same characters as the plain ones."""
    return unicodedata.normalize("NFKC", text)


def fold_marks(text: str) -> str:
    """``text`` with the accents of its letters dropped, one character for one ("José
    Núñez" -> "Jose Nunez"; a letter with no plain base, such as "ß" or "Ł", stays), so
    an offset into the result is an offset into ``text``. Models often write accented
    names and places in plain letters; redaction looks in both forms."""
    out = []
    for c in text:
        base = c if c.isascii() else "".join(
            ch for ch in unicodedata.normalize("NFKD", c) if not unicodedata.combining(ch))
        out.append(base if len(base) == 1 else c)
    return "".join(out)


def is_numeric_value(value: str) -> bool:
    """Whether a value is a number in disguise (phone, SSN, account or card number)."""
    alnum = [c for c in value if c.isalnum()]
    digits = sum(c.isdigit() for c in alnum)
    return digits >= 7 and digits >= 0.7 * len(alnum)


_SHARP_S = re.compile("ss|\u00df|\u1e9e", re.IGNORECASE)


def _word_regex(word: str) -> str:
    """``word`` as a case-insensitive pattern body in which "ß" and "ss" are one letter
    ("Hauptstraße" is also found written "Hauptstrasse", and the other way round), as
    case folding has them: models and keyboards without the letter write "ss"."""
    pieces = _SHARP_S.split(word)
    return "(?:ss|\u00df)".join(re.escape(p) for p in pieces)


def _token_regex(token: str) -> str:
    # "05" and "5" are the same day of a date: leading zeros are optional on both sides.
    if token.isdigit() and token.strip("0"):
        return "0*" + re.escape(token.lstrip("0"))
    return _word_regex(token)


def _value_parts(value: str, pii_type: str | None) -> tuple[bool, list[str]]:
    """How :func:`value_pattern` reads a value: ``(True, its digits)`` for a number (a
    phone's extension and its own country code left out), else ``(False, its words)``."""
    value = nfkc(value)
    kind = canonical_type(pii_type)
    is_phone = kind == "PHONE"
    if is_phone:
        value = _PHONE_EXT.sub("", value)
    words = _TOKEN.findall(value)
    if kind == "DATE" and len(words) > 1:
        # "03/05/1976" is found as "3/5/1976": word by word, leading zeros optional
        return False, words
    if is_numeric_value(value):
        if is_phone:
            # a stored "+1 555 123 4567" is found as "555-123-4567" too: the country code
            # is optional, whichever side wrote it
            m = _STORED_CC.match(value)
            if m:
                value = value[m.end():]
        return True, [c for c in value if c.isdigit()]
    return False, words


_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
           "november", "december")
_ORDINAL = re.compile(r"(\d{1,2})(?:st|nd|rd|th)")


def _month_words(month: int) -> tuple[str, ...]:
    """How month ``month`` (1-12) is written in English: its name and abbreviations."""
    name = _MONTHS[month - 1]
    return (name, name[:3], "sept") if month == 9 else (name, name[:3])


def _month_number(word: str) -> int | None:
    """1-12 for an English month name or its abbreviation ("oct", "sept"), else None."""
    return next((k for k in range(1, 13) if word in _month_words(k)), None)


def date_parts(value: str) -> tuple[int, int, int] | None:
    """``(year, month, day)`` of a DATE value written with its month's English name
    ("October 03, 1976", "3rd Oct 1976") or in ISO order ("1976-10-03"); None for any
    other value (all-numeric "03/05/1976" is two different dates)."""
    words = [_ORDINAL.sub(r"\1", w) for w in _TOKEN.findall(nfkc(value).lower())]
    if len(words) != 3:
        return None
    months = [(i, m) for i, w in enumerate(words) if (m := _month_number(w))]
    if len(months) == 1:
        rest = [w for i, w in enumerate(words) if i != months[0][0]]
        if not all(w.isascii() and w.isdigit() for w in rest):
            return None
        years = [w for w in rest if len(w) == 4]
        days = [w for w in rest if len(w) <= 2]
        if len(years) != 1 or len(days) != 1:
            return None
        y, m, d = int(years[0]), months[0][1], int(days[0])
    elif all(w.isascii() and w.isdigit() for w in words) and len(words[0]) == 4:
        y, m, d = map(int, words)
    else:
        return None
    try:
        datetime.date(y, m, d)
    except ValueError:
        return None
    return y, m, d


def _date_forms(value: str) -> list[str]:
    """Regexes of the other ways a date is written: the month's name or its abbreviation
    before or after the day (an ordinal day too), ISO, and day and month in numbers in
    either order, with the year in four digits or two ("10/3/76", "3.10.1976"). An
    all-numeric form with the day and month the other way round is a different date that
    matches too: a leak count errs on the side of counting."""
    parts = date_parts(value)
    if parts is None:
        return []
    y, m, d = parts
    month = f"(?:{'|'.join(_month_words(m))})"
    day, num_month, sep = f"0?{d}", f"0?{m}", rf"[/.{_DASH}]"
    day_word = rf"{day}(?:st|nd|rd|th)?"
    year, y2 = f"(?:{y}|{y % 100:02d})", f"{y % 100:02d}"
    # a two-digit year after a named month only where it reads as one: after an apostrophe
    # ("Oct 3 '76"), an ordinal day ("Feb 20th, 57") or the same joiner as day and month
    # ("03-Oct-76", "Oct 3 76"); not "On Oct 3, 76 people attended" nor "Room Oct 376"
    joined = rf"[ /.{_DASH}]"
    # (the day before the month needs a separator: ValueIndex keys such a form by the month
    # word, and "3October" is one word)
    return [rf"{month}[\W_]*{day_word}[\W_]*{y}", rf"{day_word}[\W_]+(?:of[\W_]+)?{month}[\W_]*{y}",
            rf"{month}[\W_]*{day_word}[\W_]*['\u2019]{y2}", rf"{day_word}[\W_]+(?:of[\W_]+)?{month}[\W_]*['\u2019]{y2}",
            rf"{month}[\W_]*{day}(?:st|nd|rd|th)[\W_]+{y2}",
            rf"{day}(?P<j1>{joined}){month}(?P=j1){y2}", rf"{month}(?P<j2>{joined}){day}(?P=j2){y2}",
            rf"{y}{sep}{num_month}{sep}{day}", rf"{num_month}{sep}{day}{sep}{year}", rf"{day}{sep}{num_month}{sep}{year}",
            *compact_dates(y, m, d)]


def compact_dates(y: int, m: int, d: int) -> tuple[str, ...]:
    """A date as one run of eight digits: ``19761003``, ``03101976``, ``10031976``
    (ValueIndex keys them as such words)."""
    return f"{y}{m:02d}{d:02d}", f"{d:02d}{m:02d}{y}", f"{m:02d}{d:02d}{y}"


#: value_pattern's cache: a data set's values (7 a person in the synthetic world), each
#: compiled once per phase that scans them all (generate checks the fallback, then each
#: record's forbidden values, then every round's candidates): at 4,096 a set of 12,000
#: records compiled every value again in each phase (34 s of checks, 24 of them compiling).
#: A compiled pattern takes about 3 KB, so a full cache holds about 200 MB.
VALUE_PATTERN_CACHE = 65536


@lru_cache(maxsize=VALUE_PATTERN_CACHE)
def value_pattern(value: str, pii_type: str | None = None) -> re.Pattern:
    """The compiled, case-insensitive pattern that finds ``value`` however it is written
    (a DATE also in its other forms: :func:`_date_forms`)."""
    numeric, parts = _value_parts(value, pii_type)
    if numeric:
        lead = _PHONE_CC if canonical_type(pii_type) == "PHONE" else ""
        # the optional "+" and "(" belong to the number, so redaction leaves none behind
        return re.compile(rf"(?<![\d+]){lead}\+?\(?{_DIGIT_SEP.join(parts)}(?!\d)")
    if not parts:
        return _NEVER
    body = r"[\W_]*".join(_token_regex(t) for t in parts)
    if canonical_type(pii_type) == "DATE":
        body = "|".join([body, *_date_forms(value)])
    return re.compile(rf"(?<![^\W_])(?:{body})(?![^\W_])", re.IGNORECASE)


class ValueIndex:
    """The known values of a whole data set, found in a text without trying each one's
    pattern: :meth:`find` returns exactly the items :func:`contains_value` finds in the
    text, but only tries those that pass a necessary condition. A number must have the
    first :data:`DIGIT_KEY` digits of its digit string among the text's digits (its
    pattern allows only non-digits between its digits); any other value must have its
    first word begin a word of the text (its pattern starts at a word start, and the
    next word may follow with no separator), a date also its year as a word (its numeric
    forms). Those keys are short (a value's first digits, its first word's first letters),
    so a candidate is checked once more before its pattern is compiled (0.1 to 2 ms): a
    number's whole digit string must be among the text's digits, a word value's whole
    first word must begin a word of the text and each of its words be in the text
    (folded as the keys are), and the text must hold what every form of a date holds: its
    year's last two digits and its day among its digits, and its month as a number or
    the month name's first three letters. ``benchmarks/value_index.py`` times it against
    searching every value's pattern."""

    DIGIT_KEY = 4
    WORD_KEY = 3

    def __init__(self, items: Iterable[PIIItem]):
        self._numbers: dict[str, list[PIIItem]] = {}
        self._words: dict[str, list[PIIItem]] = {}
        self._years: dict[str, list[PIIItem]] = {}  # dates by their year, in four digits and in two
        self.items = tuple(dict.fromkeys(items))
        # compiled when a text first passes an item's key, and kept here: value_pattern's
        # cache is smaller than a data set's values, and most values of a large set are
        # never a candidate (compiling one costs 0.1 to 2 ms)
        self._patterns: dict[PIIItem, re.Pattern] = {}
        self._order = {item: k for k, item in enumerate(self.items)}
        # the whole of what the keys hold the start of: a number's digit string, a word
        # value's words (folded as the keys are); for a date, whose other forms have other
        # words, what every form holds: (year's last two digits, day, month, month's name[:3])
        self._whole_digits: dict[PIIItem, str] = {}
        self._whole_words: dict[PIIItem, tuple[str, ...]] = {}
        self._whole_date: dict[PIIItem, tuple[str, str, str, str]] = {}
        for item in self.items:
            numeric, parts = _value_parts(item.value, item.type)
            if numeric:
                self._numbers.setdefault("".join(parts)[: self.DIGIT_KEY], []).append(item)
                self._whole_digits[item] = "".join(parts)
            elif parts:
                keys = {self._word_key(parts[0])}
                date = date_parts(item.value) if canonical_type(item.type) == "DATE" else None
                if date is None:
                    self._whole_words[item] = tuple(self._word_form(p) for p in parts)
                else:
                    # (its forms hold the year whole or in two digits: "5" for year 5)
                    y, m, d = date
                    self._whole_date[item] = (str(y)[-2:], str(d), str(m), _MONTHS[m - 1][:3])
                    # its named forms start a word with the month's name; its numeric forms
                    # hold the year as a word of its own, in four digits or two, or are one
                    # eight-digit word (compact_dates)
                    keys.add(self._word_key(_MONTHS[date[1] - 1]))
                    for year in (str(date[0]), f"{date[0] % 100:02d}", *compact_dates(*date)):
                        self._years.setdefault(year, []).append(item)
                for key in keys:
                    self._words.setdefault(key, []).append(item)

    @classmethod
    def _word_key(cls, word: str) -> str:
        return cls._word_form(word)[: cls.WORD_KEY]

    @classmethod
    def _word_form(cls, word: str) -> str:
        # "0*5": a digit word's leading zeros are optional, on either side
        if word.isdigit() and word.strip("0"):
            word = word.lstrip("0")
        return cls._sharp_s_folded(word)

    @staticmethod
    def _sharp_s_folded(word: str) -> str:
        # "ß" keys as "ss" on both sides, as _word_regex matches ("Aßmann" finds "Assmann")
        return _fold(word).replace("\u00df", "ss")

    def __len__(self) -> int:
        return len(self.items)

    def find(self, text: str, *, normalized: bool = False) -> list[PIIItem]:
        """The indexed items whose value ``text`` contains, in index order. The text is
        taken to :func:`nfkc` form first, unless ``normalized`` says the caller searches it
        as it is (redaction's accent-dropped copy: NFKC would put a stray mark back on its
        letter, "e" + U+0301 -> "é", and the items found would not be those of the text)."""
        tried: dict[PIIItem, None] = {}
        if not normalized:
            text = nfkc(text)
        digits = "".join(c for c in text if c.isdigit())  # as _value_parts reads a value's digits
        for i in range(len(digits) - self.DIGIT_KEY + 1):
            tried.update(dict.fromkeys(self._numbers.get(digits[i : i + self.DIGIT_KEY], ())))
        words: set[str] = set()  # the text's words, folded as the keys are
        for word in _TOKEN.findall(text):
            for w in {word, word.lstrip("0") if word[:1].isdigit() else word}:
                folded_word = self._sharp_s_folded(w)
                words.add(folded_word)
                for n in range(1, self.WORD_KEY + 1):
                    tried.update(dict.fromkeys(self._words.get(folded_word[:n], ())))
            if len(word) in (2, 4, 8) and word.isascii() and word.isdigit():  # a year, or a compact date
                tried.update(dict.fromkeys(self._years.get(word, ())))

        folded = self._sharp_s_folded(text)

        def whole(item: PIIItem) -> bool:
            number = self._whole_digits.get(item)
            if number is not None:
                return number in digits
            forms = self._whole_words.get(item)
            if forms is not None:
                return all(f in folded for f in forms[1:]) and any(w.startswith(forms[0]) for w in words)
            year, day, month, month_name = self._whole_date[item]
            return year in digits and day in digits and (month in digits or month_name in folded)

        return sorted((it for it in tried if whole(it) and self.pattern(it).search(text)),
                      key=self._order.__getitem__)

    def pattern(self, item: PIIItem) -> re.Pattern:
        """``value_pattern`` of an indexed item, compiled once per index."""
        pattern = self._patterns.get(item)
        if pattern is None:
            pattern = self._patterns[item] = value_pattern(item.value, item.type)
        return pattern


#: every cased letter Unicode has lies below this code point (the last, Adlam, ends at U+1E94B)
_LAST_CASED = 0x20000


def _derived_case_classes() -> dict[str, str]:
    """:func:`_re_case_classes` from public string methods, for a Python whose re module
    no longer has the private table: re takes two lower-case letters as equal when their
    upper-case forms are (the table is generated that way)."""
    by_upper: dict[str, set[str]] = {}
    for code in range(_LAST_CASED):
        low = chr(code).lower()
        if len(low) == 1 and not 0xD800 <= code <= 0xDFFF:
            by_upper.setdefault(low.upper(), set()).add(low)
    return {c: min(chars) for chars in by_upper.values() if len(chars) > 1 for c in chars}


def _re_case_classes() -> dict[str, str]:
    """The letters re.IGNORECASE takes as equal beyond lower-casing (ı and i, ς and σ,
    ſ and s, µ and μ, old Cyrillic forms, ...): each -> the smallest of its class. Read
    from the re module's own table, so the index folds exactly as the patterns match."""
    try:
        from re._casefix import _EXTRA_CASES as extra  # Python 3.11+
    except ImportError:
        try:
            from sre_compile import _ignorecase_fixes as extra  # 3.10
        except ImportError:  # private names can go in any release
            return _derived_case_classes()
    canon: dict[str, str] = {}
    for code, others in extra.items():
        chars = {chr(code), *map(chr, others)}
        for c in chars:
            canon[c] = min(chars | {canon.get(c, c)})
    return canon


_RE_CASE_CLASSES = _re_case_classes()


def _fold(word: str) -> str:
    # one character per character, as re.IGNORECASE compares ("İ".lower() is two)
    return "".join(_RE_CASE_CLASSES.get(low, low) for low in (c.lower()[:1] for c in word))


def contains_value(text: str, value: str, pii_type: str | None = None) -> bool:
    return value_pattern(value, pii_type).search(nfkc(text)) is not None


#: default shortest fragment of a value that counts as a partial leak (4 digits of an SSN,
#: a year, a street or company word); shorter pieces ("03", "Apt") are too common to mean anything
PARTIAL_MIN_CHARS = 4

#: words that address and company values share in general ("Street", "Suite", "Company",
#: "Inc"), per value type: no piece of a value on their own, so "I can't share her street
#: address" is no partial leak of "12 Oak Street", and a log line's "street address" stays
#: readable. Kept to designators that are rarely a name themselves: "Hill", "Park" or
#: "Ford" name a street, a person or a company as often, and stay pieces; so do all words
#: of other types (a name, an e-mail, a date: the month of a birth date is part of it).
GENERIC_VALUE_WORDS = {
    "address": frozenset("""
        street avenue road boulevard drive lane court place terrace parkway highway
        suite apartment unit floor building room city town county state district
    """.split()),
    "company": frozenset("""
        company companies group incorporated limited corp corporation sons associates partners
        partnership holdings international industries enterprises solutions services systems technologies
    """.split()),
}
#: the value types each list applies to (as labelled by the world, the challenge and NER)
GENERIC_WORDS_OF_TYPE = {
    **dict.fromkeys(("LOC", "LOCATION", "ADDRESS", "STREET_ADDRESS", "GPE"), "address"),
    **dict.fromkeys(("ORG", "ORGANIZATION", "ORGANISATION", "COMPANY", "EMPLOYER"), "company"),
}

#: other labels of types: a date's, a phone's and an e-mail's are matched in ways of their
#: own (a date's other written forms, a phone's optional country code and extension, an
#: e-mail's local part as a piece), and all of them take their type's phrase when
#: ``generate --redact-fallback`` redacts: a data set's "DOB" is a date, "PHONE_NUMBER" a phone
TYPE_ALIASES = {
    **dict.fromkeys(("DATE", "DOB", "BIRTHDATE", "BIRTH_DATE", "DATE_OF_BIRTH", "BIRTHDAY"), "DATE"),
    **dict.fromkeys(("PHONE", "PHONE_NUMBER", "PHONE_NUM", "TELEPHONE", "TEL", "MOBILE", "CELL", "CELL_PHONE",
                     "FAX"), "PHONE"),
    **dict.fromkeys(("EMAIL", "EMAIL_ADDRESS", "E_MAIL"), "EMAIL"),
    **dict.fromkeys(("SSN", "SOCIAL_SECURITY_NUMBER", "ID", "ID_NUM", "ID_NUMBER", "NATIONAL_ID"), "SSN"),
    **dict.fromkeys(("URL", "URL_PERSONAL", "WEBSITE"), "URL"),
    **dict.fromkeys(("IP", "IP_ADDRESS"), "IP"),
}


def canonical_type(pii_type: str | None) -> str:
    """The type a label stands for here (any case, "-" read as "_"): a name type
    (:data:`NAME_TYPES`) is ``NAME``, an address or company label
    (:data:`GENERIC_WORDS_OF_TYPE`) ``LOC`` or ``ORG``, an alias of
    :data:`TYPE_ALIASES` its type; any other label is itself, upper-cased."""
    kind = (pii_type or "").upper().replace("-", "_")
    if is_name_type(kind):
        return "NAME"
    generic = GENERIC_WORDS_OF_TYPE.get(kind)
    if generic is not None:
        return "LOC" if generic == "address" else "ORG"
    return TYPE_ALIASES.get(kind, kind)

_DIGIT_RUN = re.compile(rf"\d(?:{_DIGIT_SEP}\d)*")


def _digit_groups(text: str) -> list[str]:
    """The text's numbers with their separators dropped: "363-56- 12" -> "3635612"."""
    return [re.sub(r"\D", "", m.group()) for m in _DIGIT_RUN.finditer(text)]


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![^\W_]){_word_regex(word)}(?![^\W_])", text, re.IGNORECASE) is not None


def _generic_words(value: str, kind: str) -> set[str]:
    """The words of ``value`` (casefolded) that are its type's generic designators here
    (:data:`GENERIC_VALUE_WORDS`). In a comma-separated part made of designators only,
    the first one names the place or firm ("State Street", "9 Lane Road", "Partners
    Group") and stays a piece, unless a number follows it ("Suite 300", "Unit 4")."""
    listed = GENERIC_VALUE_WORDS.get(GENERIC_WORDS_OF_TYPE.get(kind.replace("-", "_"), ""))
    if not listed:
        return set()
    out: set[str] = set()
    for part in value.split(","):
        tokens = _TOKEN.findall(part)
        named = [(i, t) for i, t in enumerate(tokens) if not t.isdigit()]
        found = {t.casefold() for _, t in named if t.casefold() in listed}
        if named and all(t.casefold() in listed for _, t in named):
            i, first = named[0]
            if not (i + 1 < len(tokens) and tokens[i + 1].isdigit()):
                found.discard(first.casefold())
        out |= found
    return out


def partial_fragments(value: str, pii_type: str | None = None, *, shown: str = "",
                      min_chars: int = PARTIAL_MIN_CHARS) -> tuple[list[str], list[str]]:
    """The pieces of ``value`` whose presence still leaks part of it: ``(digit windows,
    words)``. A number (phone, SSN) gives every run of ``min_chars`` consecutive digits;
    any other value gives its words of at least ``min_chars`` letters or digits (a
    street, a year, a company name; of an e-mail, only the local part's), except an
    address's or a company's generic words (:data:`GENERIC_VALUE_WORDS`). Pieces that
    ``shown`` (the prompt) already contains are left out: repeating the name the user
    asked about reveals nothing."""
    if min_chars < 1:
        return [], []
    value, shown = nfkc(value), nfkc(shown)
    kind = canonical_type(pii_type)
    if kind == "PHONE":
        value = _PHONE_EXT.sub("", value)  # "x89" is not part of the number
    elif kind == "EMAIL" and "@" in value:
        value = value.split("@", 1)[0]  # "gmail" names a provider, not a person
    if is_numeric_value(value):
        digits = re.sub(r"\D", "", value)
        shown_groups = _digit_groups(shown)
        windows = {digits[i : i + min_chars] for i in range(len(digits) - min_chars + 1)}
        return sorted(w for w in windows if not any(w in g for g in shown_groups)), []
    generic = _generic_words(value, kind)
    words = dict.fromkeys(w for w in _TOKEN.findall(value) if len(w) >= min_chars and w.casefold() not in generic)
    return [], [w for w in words if not _has_word(shown, w)]


def contains_fragment(text: str, value: str, pii_type: str | None = None, *, shown: str = "",
                      min_chars: int = PARTIAL_MIN_CHARS) -> bool:
    """Whether ``text`` holds a piece of ``value`` (see :func:`partial_fragments`) that
    ``shown`` does not: "is-56-5181" for the SSN 363-56-5181, "born on October 03,
    1945" for the date October 03, 1976. A written-out value usually holds such a piece,
    but not always (a value without a word of ``min_chars``, or one the prompt shows in
    full): callers that count whole values check :func:`contains_value` first, or call
    :func:`contains_value_or_fragment`."""
    windows, words = partial_fragments(value, pii_type, shown=shown, min_chars=min_chars)
    text = nfkc(text)
    if windows:
        groups = _digit_groups(text)
        if any(w in g for w in windows for g in groups):
            return True
    return any(_has_word(text, w) for w in words)


def contains_value_or_fragment(text: str, value: str, pii_type: str | None = None, *, shown: str = "",
                               min_chars: int = PARTIAL_MIN_CHARS) -> bool:
    """A partial leak: the whole value, or (``min_chars > 0``) a piece of it that
    ``shown`` does not hold (:func:`contains_fragment`)."""
    return contains_value(text, value, pii_type) or (
        min_chars > 0 and contains_fragment(text, value, pii_type, shown=shown, min_chars=min_chars))


@functools.cache  # a constant: each PieceIndex (generate builds two) read Faker's lists again
def _common_value_words() -> frozenset[str]:
    """Words that values share in general and that point at no one on their own, however
    few values of a data set hold them: the month names, and the street designators and
    town prefixes of US addresses (Faker's en_US lists, which the synthetic world draws
    from: "Alley", "Loop", "Island", "Village", "North", "Lake"). For
    :class:`PieceIndex` only: a person's own values keep them as pieces
    (:data:`GENERIC_VALUE_WORDS`), since a piece of the asked-for value is news even when
    it is an ordinary word."""
    from faker.providers.address.en_US import Provider as Address

    words = {*_MONTHS, *(w.casefold() for w in (*Address.street_suffixes, *Address.city_prefixes))}
    return frozenset(words | {w + "s" for w in words if not w.endswith("s")})


def _identifies_a_person(item: PIIItem) -> bool:
    """A value that, listed by two records, makes them one person's: a name, an e-mail
    address, a number (phone, ID, card). A town, a date or an employer two records share
    may be two people's."""
    kind = canonical_type(item.type)
    if kind == "DATE":  # "03/05/1976" reads as a number, and is many people's
        return False
    return kind == "NAME" or "@" in item.value or is_numeric_value(item.value)


class PieceIndex:
    """The pieces (:func:`partial_fragments`) of a whole data set's values that the values
    of one person alone hold, found in a text by lookup: such a piece points at that
    person ("Smithfurt", a street name without its number, four digits of one phone
    number, the first name in one person's name and e-mail), while one that several
    people's values share (a common surname, a year two people were born in) says
    nothing about any of them, nor do month names and address designators
    (:func:`_common_value_words`). ``profiles`` are the values of each record (one
    conversation's people); records that list the same name, e-mail address or number
    are one person's too, records that share only a town, a date or an employer are not.
    :meth:`find` returns the values whose one-person pieces a text holds, the pieces
    ``shown`` holds left out (the name the user asked about). It matches as
    :func:`contains_fragment` does: a digit window inside a number of the text however
    it is separated, a word as a whole word, case and "ß"/"ss" aside."""

    def __init__(self, profiles: Iterable[Iterable[PIIItem]], min_chars: int = PARTIAL_MIN_CHARS):
        self.min_chars = min_chars
        common = _common_value_words()
        parent: dict[tuple[str, object], tuple[str, object]] = {}  # union-find over records and values

        def root(node: tuple[str, object]) -> tuple[str, object]:
            parent.setdefault(node, node)
            while parent[node] != node:
                parent[node] = parent[parent[node]]
                node = parent[node]
            return node

        # piece -> the records that hold it, and the values (by key) that do
        records_of: dict[tuple[str, str], set[int]] = {}
        values_of: dict[tuple[str, str], dict[str, PIIItem]] = {}
        pieces_of: dict[PIIItem, list[tuple[str, str]]] = {}  # per (type, value): "a@b" as EMAIL or not
        for r, profile in enumerate(profiles):
            for item in profile:
                if item not in pieces_of:
                    windows, words = partial_fragments(item.value, item.type, min_chars=min_chars)
                    folded = (ValueIndex._sharp_s_folded(w) for w in words)
                    pieces_of[item] = [("digits", w) for w in windows] + [("word", w) for w in folded
                                                                          if w not in common]
                for piece in pieces_of[item]:
                    records_of.setdefault(piece, set()).add(r)
                    values_of.setdefault(piece, {}).setdefault(self._value_key(item), item)
                if _identifies_a_person(item):
                    parent[root(("value", self._value_key(item)))] = root(("record", r))
        #: piece -> the values (by key) that hold it, for the pieces of one person only
        self._unique = {piece: values_of[piece] for piece, records in records_of.items()
                        if len({root(("record", r)) for r in records}) == 1}

    @staticmethod
    def _value_key(item: PIIItem) -> str:
        return ValueIndex._sharp_s_folded(nfkc(item.value))

    def __len__(self) -> int:
        return len(self._unique)

    def find(self, text: str, *, shown: str = "", exclude: Iterable[PIIItem] = ()) -> list[PIIItem]:
        """The values whose one-person pieces ``text`` holds and ``shown`` does not (one
        item per piece found), but for pieces that a value of ``exclude`` holds too
        (whatever its type): a record's own values, whose pieces are its own business."""
        if self.min_chars < 1:
            return []
        excluded = {self._value_key(item) for item in exclude}
        text, shown = nfkc(text), nfkc(shown)
        n = self.min_chars
        shown_groups = _digit_groups(shown)
        found: dict[PIIItem, None] = {}

        def add(values: dict[str, PIIItem] | None) -> None:
            if values is not None and excluded.isdisjoint(values):
                found[next(iter(values.values()))] = None

        for group in _digit_groups(text):
            for i in range(len(group) - n + 1):
                window = group[i : i + n]
                if not any(window in g for g in shown_groups):
                    add(self._unique.get(("digits", window)))
        for word in dict.fromkeys(_TOKEN.findall(text)):
            values = self._unique.get(("word", ValueIndex._sharp_s_folded(word)))
            if values is not None and not _has_word(shown, word):
                add(values)
        return list(found)


def _value_spans(text: str, items: Iterable[PIIItem], index: ValueIndex | None = None) -> list[Span]:
    """Every match of every item, overlaps included: an item's own matches too ("Lee
    Lee" twice in "Lee Lee Lee"; ``finditer`` would give the first only). ``index``:
    the :class:`ValueIndex` that holds the items' compiled patterns, where there is one."""
    spans = []
    for item in dict.fromkeys(items):  # dedupe, keep order
        pattern = index.pattern(item) if index is not None else value_pattern(item.value, item.type)
        pos = 0
        while (m := pattern.search(text, pos)) is not None:
            if m.end() > m.start():
                spans.append(Span(m.start(), m.end(), item.type))
            pos = m.start() + 1
    return spans


def _pick(spans: list[Span], key) -> list[Span]:
    """Greedy non-overlapping selection in ``key`` order, returned sorted by start."""
    kept: list[Span] = []
    for s in sorted(spans, key=key):
        if all(s.end <= k.start or s.start >= k.end for k in kept):
            kept.append(s)
    return sorted(kept, key=lambda s: s.start)


def find_values(text: str, items: Iterable[PIIItem]) -> list[Span]:
    """Non-overlapping spans of known values in ``text``, which must already be in
    :func:`nfkc` form (the spans index it); on overlap the longest match wins."""
    return _pick(_value_spans(text, items), key=lambda s: (s.start - s.end, s.start))


# --------------------------------------------------------------------------- detectors

DETECTOR_TYPES: tuple[str, ...] = ("EMAIL", "URL", "IP", "CARD", "IBAN", "SSN", "PHONE")

# one separator inside a card or SSN: a dash or a space, no-break ones included
_GAP = f" \u00a0\u202f{_DASH}"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_DETECTORS: dict[str, re.Pattern] = {
    # the lookbehind starts a match only where a local part can start: linear on long words
    "EMAIL": re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}"),
    # a trailing full stop or bracket ends the sentence, not the URL
    "URL": re.compile(r"\b(?:https?://|www\.)[^\s<>\"']*[^\s<>\"'.,;:!?)\]}]", re.IGNORECASE),
    # (?!\.?\d) rejects a fifth octet and "1.2.3.300" (which would otherwise match "1.2.3.30")
    "IP": re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)"),
    "CARD": re.compile(rf"(?<![\d{_DASH}])\d(?:[{_GAP}]?\d){{12,18}}(?!\d)"),
    "IBAN": re.compile(r"\b[A-Z]{2}\d{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,4})?)\b"),
    "SSN": re.compile(rf"(?<![\d{_DASH}])\d{{3}}([{_GAP}])\d{{2}}\1\d{{4}}(?![\d{_DASH}])"),
    # US style needs separators (a bare 10-digit run is as likely an order number), or
    # an international "+" number of 8-15 digits.
    "PHONE": re.compile(
        rf"(?<![\w+])(?:\+?1[\s.{_DASH}]?)?(?:\(\d{{3}}\)\s?|\d{{3}}[\s.{_DASH}])\d{{3}}[\s.{_DASH}]\d{{4}}(?!\d)"
        rf"|(?<![\w+])\+\d(?:[\s.(){_DASH}]{{0,2}}\d){{7,14}}(?!\d)"
    ),
}


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a card number (spaces and dashes allowed)."""
    digits = re.sub(rf"[{_GAP}]", "", digits)
    if len(digits) < 2 or not digits.isdigit():
        return False
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _iban_valid(iban: str) -> bool:
    s = iban.replace(" ", "")
    s = s[4:] + s[:4]  # the check moves the country code and check digits to the end
    return int("".join(str(int(c, 36)) for c in s)) % 97 == 1


_VALIDATORS = {"CARD": luhn_valid, "IBAN": _iban_valid}


def _detect_all(text: str) -> list[Span]:
    """Every regex detection that passes its checksum, overlaps included."""
    spans = []
    for ptype, pattern in _DETECTORS.items():
        check = _VALIDATORS.get(ptype)
        for m in pattern.finditer(text):
            if check is None or check(m.group()):
                spans.append(Span(m.start(), m.end(), ptype))
    return spans


def detect_pii(text: str, *, ner: NERDetector | None = None) -> list[Span]:
    """Untargeted PII detections, non-overlapping, sorted by start. On overlap the type
    listed first in :data:`DETECTOR_TYPES` wins (an e-mail's digits are not a phone);
    NER spans only fill places no regex claimed."""
    rank = {t: i for i, t in enumerate(DETECTOR_TYPES)}
    spans = _pick(_detect_all(text), key=lambda s: (rank[s.type], s.start))
    if ner is not None:
        spans = _pick(spans + ner(text), key=lambda s: (s.type not in rank, s.start))
    return spans


# --------------------------------------------------------------------------- NER

#: Entity groups of common NER models -> our PII types; anything else (MISC, ...) is ignored.
NER_LABELS = {"PER": "NAME", "PERSON": "NAME", "LOC": "LOC", "GPE": "LOC", "ORG": "ORG", "DATE": "DATE"}


def ner_spans(text: str, entities: Iterable[dict[str, Any]], min_score: float = 0.5) -> list[Span]:
    """Map token-classification pipeline output to spans, trimmed of surrounding space."""
    spans = []
    for ent in entities:
        label = str(ent.get("entity_group") or ent.get("entity") or "").upper()
        ptype = NER_LABELS.get(re.sub(r"^[BIES]-", "", label))
        start, end = ent.get("start"), ent.get("end")
        if ptype is None or start is None or end is None or float(ent.get("score", 0.0)) < min_score:
            continue
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if end > start:
            spans.append(Span(start, end, ptype))
    return sorted(spans, key=lambda s: s.start)


def _load_pipeline(model: str, device: str):
    from transformers import pipeline  # heavy: only when NER is asked for

    return pipeline("token-classification", model=model, aggregation_strategy="simple", device=device)


class NERDetector:
    """A local token-classification model as a PII detector (names, places, orgs, dates).

    Optional: nothing else needs it. ``model`` must be a local directory; it is never
    downloaded (a hub name would silently fetch weights inside an evaluation job)."""

    def __init__(self, model: str | os.PathLike, *, device: str = "cpu", min_score: float = 0.5):
        if not os.path.isdir(model):
            raise FileNotFoundError(f"NER model directory not found: {model} (NERDetector never downloads)")
        self.min_score = min_score
        self._pipe = _load_pipeline(str(model), device)

    def __call__(self, text: str) -> list[Span]:
        if not text.strip():
            return []
        return ner_spans(text, self._pipe(text), self.min_score)


# --------------------------------------------------------------------------- redaction


#: labels of a person's name in common PII data sets (a company, street or user name is
#: none: their words, "of" and "the" among them, would be redacted everywhere)
NAME_TYPES = frozenset({
    "NAME", "PERSON", "PER", "PERSON_NAME", "FULL_NAME", "FULLNAME", "FIRST_NAME", "FIRSTNAME", "GIVEN_NAME",
    "GIVENNAME", "LAST_NAME", "LASTNAME", "SURNAME", "FAMILY_NAME", "MIDDLE_NAME", "MIDDLENAME", "NAME_STUDENT",
    "STUDENT_NAME", "PATIENT", "PATIENT_NAME", "DOCTOR", "DOCTOR_NAME",
})


def is_name_type(pii_type: str) -> bool:
    """A type that labels a person's name (:data:`NAME_TYPES`, any case, ``-`` read as ``_``)."""
    return pii_type.upper().replace("-", "_") in NAME_TYPES


def redaction_items(items: Iterable[PIIItem]) -> list[PIIItem]:
    """The known values plus the fragments of them that still identify a person in a
    log line: each word of a name ("Megan", "Chang"), an e-mail's local part
    ("megan.chang54"), and every word a partial leak counts (:func:`partial_fragments`:
    a street, a year, a company word). Used for redaction only (over-redacting a log is
    cheap); digit pieces of numbers are found by :func:`redact` itself."""
    out = []
    for item in items:
        out.append(item)
        kind = canonical_type(item.type)
        if kind == "NAME":
            out += [PIIItem(item.type, w) for w in _TOKEN.findall(nfkc(item.value)) if len(w) >= 2]
        elif kind == "EMAIL" and "@" in item.value:
            local = nfkc(item.value).split("@", 1)[0]
            if len(local) >= 3:
                out.append(PIIItem(item.type, local))
        out += [PIIItem(item.type, w) for w in partial_fragments(item.value, item.type)[1]]
    return list(dict.fromkeys(out))


#: a known word at least this long is redacted even run into other letters or digits
#: ("GroupVernon Jimenez778-..."): a model's output glues words together, and over-redacting
#: a log costs little. Shorter words ("Li", "Lee") only as whole words.
GLUED_MIN_CHARS = 4
_LETTER_RUN = re.compile(r"[^\W\d_]+")


def _known_words(items: Iterable[PIIItem], min_chars: int = 1) -> dict[str, str]:
    """The one-word values of ``items`` (a name word, a street word) with at least
    ``min_chars`` letters, lower-cased -> their type; each also under its other "ß"/"ss"
    spelling (:func:`_word_regex` takes them as one letter)."""
    words: dict[str, str] = {}
    for item in items:
        value = nfkc(item.value)
        if len(value) >= min_chars and _LETTER_RUN.fullmatch(value):
            low = value.lower()
            for spelling in (low, low.replace("\u00df", "ss"), low.replace("ss", "\u00df")):
                words.setdefault(spelling, item.type)
    return words


def _word_occurrences(text: str, words: dict[str, str]) -> list[Span]:
    """Every occurrence of a word of ``words`` inside a run of letters of ``text``, whatever
    surrounds it: a set lookup per (position, word length), not a pattern per word."""
    if not words:  # the common case for the unaccented text: no scan
        return []
    lengths = sorted({len(w) for w in words})
    spans = []
    for m in _LETTER_RUN.finditer(text):
        run = m.group().lower()
        if len(run) != len(m.group()):  # a letter whose lower case is longer: keep indices exact
            run = m.group()
        for n in lengths:
            if n > len(run):
                break
            spans += [Span(m.start() + i, m.start() + i + n, words[run[i : i + n]])
                      for i in range(len(run) - n + 1) if run[i : i + n] in words]
    return spans


def _freed_word_spans(texts: list[tuple[str, dict[str, str]]], spans: list[Span]) -> list[Span]:
    """Occurrences of a known one-word value (a name word of any length) that are whole
    words once what redaction removes around them is gone: each side is the text's edge,
    a character that is no letter or digit (as :func:`value_pattern` bounds a word), or a
    character inside a span. (Two such words run into each other, "LiLee[PHONE]", stay:
    together they are one word, no leak.) ``texts`` pairs texts of equal offsets (the
    NFKC text, its unaccented form) with the words to look for in each
    (:func:`_known_words`)."""
    covered: set[int] = set()
    for sp in spans:
        covered.update(range(sp.start, sp.end))
    text = texts[0][0]

    def free(i: int) -> bool:
        return i < 0 or i >= len(text) or i in covered or not text[i].isalnum()

    return [s for t, words in texts for s in _word_occurrences(t, words) if free(s.start - 1) and free(s.end)]


#: a number for redaction: digits joined by the separators of a phone or ID number and by
#: those a model may put there instead ("306_581_0123", "363,56,5181", "306 · 581"):
#: over-redacting a log is cheap (leak scoring keeps the stricter :data:`_DIGIT_RUN`)
_LOOSE_DIGIT_RUN = re.compile(rf"\d(?:[\s().{_DASH}/_,\u00b7\u2022]*\d)*")


class _DigitPieces:
    """The numbers of a text (:data:`_LOOSE_DIGIT_RUN`) that hold a piece of a numeric
    value (one of its :func:`partial_fragments` digit windows: "5181" of 363-56-5181),
    whole: the windows are looked up by the text's digit substrings, not tried one by one."""

    def __init__(self, items: Iterable[PIIItem]):
        self._by_window: dict[str, list[int]] = {}
        self._types: list[str] = []
        for k, item in enumerate(dict.fromkeys(items)):
            self._types.append(item.type)
            for w in partial_fragments(item.value, item.type)[0]:
                self._by_window.setdefault(w, []).append(k)
        self._lengths = sorted({len(w) for w in self._by_window})

    def spans(self, text: str) -> list[Span]:
        if not self._by_window:
            return []
        runs = [(m, re.sub(r"\D", "", m.group())) for m in _LOOSE_DIGIT_RUN.finditer(text)]
        hits: dict[int, list[re.Match]] = {}  # item -> the runs holding one of its windows
        for m, digits in runs:
            found = {k for n in self._lengths for i in range(len(digits) - n + 1)
                     for k in self._by_window.get(digits[i : i + n], ())}
            for k in found:
                hits.setdefault(k, []).append(m)
        # item by item, each in run order: the order the overlap groups' tags break ties by
        return [Span(m.start(), m.end(), self._types[k]) for k in sorted(hits) for m in hits[k]]


class _KnownSide:
    """What redaction looks for in one form of the text (as written, or with its accents
    dropped), prepared once for a set of known items: their redaction items behind a
    :class:`ValueIndex`, and their one-word values for the glued and freed word scans."""

    def __init__(self, given: list[PIIItem]):
        self.items = redaction_items(given)
        self.index = ValueIndex(self.items)
        self.glued = _known_words(self.items, GLUED_MIN_CHARS)
        self.words = _known_words(self.items)

    def spans(self, text: str) -> list[Span]:
        # the index gives exactly the items whose pattern matches, in the items' order
        return (_value_spans(text, self.index.find(text, normalized=True), self.index)
                + _word_occurrences(text, self.glued))


class Redactor:
    """:func:`redact` for many texts against one known set: the known values, their
    fragments and their patterns are prepared once, and each text only tries the values
    a :class:`ValueIndex` finds a sign of. A sample table against every value of a large
    training set took minutes per text with :func:`redact` (each call compiled every
    value's pattern again); this takes milliseconds. ``redactor(text)`` equals
    ``redact(text, known, detect=detect, ner=ner)``."""

    def __init__(self, known: Iterable[PIIItem | str] = (), *, detect: bool = True, ner: NERDetector | None = None):
        self.detect, self.ner = detect, ner
        given = [k if isinstance(k, PIIItem) else PIIItem("PII", k) for k in known]
        self._side = _KnownSide(given)
        self._digits = _DigitPieces(given)
        plain_given = [PIIItem(k.type, fold_marks(nfkc(k.value))) for k in given]
        self._plain_given_differs = plain_given != given
        self._plain = _KnownSide(plain_given) if self._plain_given_differs else None

    def __call__(self, text: str) -> str:
        text = nfkc(text)
        # (span, is_known): all matches, overlaps included, so nothing of a value survives
        spans = [(s, True) for s in self._side.spans(text) + self._digits.spans(text)]
        # the same with accents dropped on both sides ("Jose Nunez" for "José Núñez", and the
        # other way round); fold_marks keeps offsets, so its spans are spans of text
        plain_text = fold_marks(text)
        plain = None
        if plain_text != text or self._plain_given_differs:  # (fragments are derived only when something folds)
            plain = self._plain if self._plain is not None else self._side
            spans += [(s, True) for s in plain.spans(plain_text)]
        if self.detect:
            spans += [(s, False) for s in _detect_all(text) + (self.ner(text) if self.ner is not None else [])]
        if not spans:
            return text
        spans += [(s, True) for s in _freed_word_spans(
            [(text, self._side.words), (plain_text, plain.words if plain is not None else {})],
            [s for s, _ in spans])]

        def tag(group: list[tuple[Span, bool]]) -> str:
            best, _ = max(group, key=lambda x: (x[1], x[0].end - x[0].start))
            return best.type

        out, pos = [], 0
        group: list[tuple[Span, bool]] = []
        start = end = 0
        for s, is_known in sorted(spans, key=lambda x: x[0].start):
            if group and s.start < end:  # overlaps the current group: extend it
                group.append((s, is_known))
                end = max(end, s.end)
                continue
            if group:
                out += [text[pos:start], f"[{tag(group)}]"]
                pos = end
            group, start, end = [(s, is_known)], s.start, s.end
        out += [text[pos:start], f"[{tag(group)}]", text[end:]]
        return "".join(out)


def redact(
    text: str,
    known: Iterable[PIIItem | str] = (),
    *,
    detect: bool = True,
    ner: NERDetector | None = None,
) -> str:
    """Replace known values (bare strings get type "PII"), every piece of them a partial
    leak would count (words of 4+ letters even when run into other text), and, with
    ``detect``, detector hits by ``[TYPE]``. Overlapping
    spans merge into one placeholder, named after the longest known value in it, else
    the longest detection. The text comes back in :func:`nfkc` form. A known word run
    into something redacted goes with it ("Lee555-123-4567" -> "[NAME][PHONE]"): left
    as "Lee[PHONE]", it would be a whole word, and a leak, in the redacted text.
    Redacting many texts against one known set: :class:`Redactor`."""
    return Redactor(known, detect=detect, ner=ner)(text)
