import re

import pytest

from cfg_unlearn import pii
from cfg_unlearn.data.generate import leak_reason
from cfg_unlearn.data.schema import PIIItem
from cfg_unlearn.pii import (
    DETECTOR_TYPES,
    NERDetector,
    PieceIndex,
    ValueIndex,
    canonical_type,
    Redactor,
    Span,
    contains_value,
    detect_pii,
    find_values,
    is_numeric_value,
    luhn_valid,
    ner_spans,
    redact,
    value_pattern,
)

PHONE = "(555) 123-4567"
SSN = "123-45-6789"


def test_is_numeric_value():
    assert is_numeric_value(PHONE) and is_numeric_value(SSN) and is_numeric_value("4111 1111 1111 1111")
    assert not is_numeric_value("123 Main Street Apt. 4, Springfield")
    assert not is_numeric_value("March 05, 1990")  # 6 digits
    assert not is_numeric_value("AB-1234567-CDEFG")  # 7 digits but only 7/15 of the characters


@pytest.mark.parametrize(
    "text",
    [
        "Her name is allison   HILL.",
        "Allison\nHill",
        "ALLISON HILL",
        "Allison-Hill",
        "(Allison Hill)",
    ],
)
def test_name_variants_match(text):
    assert contains_value(text, "Allison Hill", "NAME")


@pytest.mark.parametrize(
    "value,text",
    [
        ("Hill", "They walked to Hillside."),
        ("Hill", "It is all uphill from here."),
        ("Ng", "Angela said hi."),
        ("Lee", "She moved to Leeds."),
        ("Allison Hill", "Allison Hills"),
        ("Ann", "annual report"),
    ],
)
def test_no_match_inside_other_words(value, text):
    assert not contains_value(text, value, "NAME")


@pytest.mark.parametrize(
    "text",
    [
        "555.123.4567",
        "555 123 4567",
        "5551234567",
        "(555)123-4567",
        "+1 555-123-4567",
        "+1-555 123 4567",
        "1-555-123-4567",
        "call (555) 123-4567.",
    ],
)
def test_phone_variants_match(text):
    assert contains_value(text, PHONE, "PHONE")


def test_phone_country_code_only_for_phone_type():
    assert contains_value("15551234567", PHONE, "PHONE")
    assert not contains_value("15551234567", PHONE)  # digits inside a longer run


@pytest.mark.parametrize("text", ["1234567890123", "55512345678", "25551234567", "order 9555-123-4567"])
def test_digits_inside_longer_run_do_not_match(text):
    value = "(234) 567-8901" if text == "1234567890123" else PHONE
    assert not contains_value(text, value, "PHONE")


@pytest.mark.parametrize("text", ["SSN 123-45-6789", "123 45 6789", "123456789", "123.45.6789"])
def test_ssn_variants_match(text):
    assert contains_value(text, SSN, "SSN")


def test_ssn_not_inside_longer_numbers():
    assert not contains_value("1234567890", SSN, "SSN")
    assert not contains_value("0123456789", SSN, "SSN")


@pytest.mark.parametrize(
    "value,text",
    [
        ("123 Main Street Apt. 4, Springfield", "It's 123 main street, apt 4 Springfield."),
        ("123 Main Street Apt. 4, Springfield", "123 Main Street\nApt. 4\nSpringfield"),
        ("Smith, Jones and Lee", "works for smith jones and lee"),
        ("Smith, Jones and Lee", "SMITH, JONES AND LEE LLC"),
        ("allison.hill42@gmail.com", "mail ALLISON.HILL42@GMAIL.COM now"),
        ("March 05, 1990", "born on March 5, 1990"),
    ],
)
def test_multiword_values_match(value, text):
    assert contains_value(text, value)


def test_partial_multiword_value_does_not_match():
    assert not contains_value("works for Smith and Lee", "Smith, Jones and Lee")
    assert not contains_value("allison.hill42@yahoo.com", "allison.hill42@gmail.com")


def test_value_without_alphanumerics_never_matches():
    assert not contains_value("--- ... ---", "---")
    assert not contains_value("", "")


def test_value_pattern_is_cached():
    assert value_pattern("Allison Hill", "NAME") is value_pattern("Allison Hill", "NAME")


def test_find_values_longest_wins_and_sorted():
    text = "Mail allison.hill@x.com or call 555.123.4567; Allison Hill."
    items = [PIIItem("NAME", "Allison Hill"), PIIItem("EMAIL", "allison.hill@x.com"), PIIItem("PHONE", PHONE)]
    spans = find_values(text, items)
    assert [(text[s.start : s.end], s.type) for s in spans] == [
        ("allison.hill@x.com", "EMAIL"),  # the name inside it loses: shorter
        ("555.123.4567", "PHONE"),
        ("Allison Hill", "NAME"),
    ]


# --------------------------------------------------------------------------- detectors


def _detected(text):
    return [(s.type, text[s.start : s.end]) for s in detect_pii(text)]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("write to bob.smith99@example.co.uk today", ("EMAIL", "bob.smith99@example.co.uk")),
        ("see https://example.com/a?b=1.", ("URL", "https://example.com/a?b=1")),
        ("see www.example.org, please", ("URL", "www.example.org")),
        ("host 192.168.0.1 is up", ("IP", "192.168.0.1")),
        ("card 4111 1111 1111 1111 ok", ("CARD", "4111 1111 1111 1111")),
        ("card 4111-1111-1111-1111 ok", ("CARD", "4111-1111-1111-1111")),
        ("iban GB82 WEST 1234 5698 7654 32 ok", ("IBAN", "GB82 WEST 1234 5698 7654 32")),
        ("iban DE89370400440532013000 ok", ("IBAN", "DE89370400440532013000")),
        ("ssn 123-45-6789 ok", ("SSN", "123-45-6789")),
        ("ssn 123 45 6789 ok", ("SSN", "123 45 6789")),
        ("call (555) 123-4567 now", ("PHONE", "(555) 123-4567")),
        ("call 555.123.4567 now", ("PHONE", "555.123.4567")),
        ("call +1 555-123-4567 now", ("PHONE", "+1 555-123-4567")),
        ("call +44 20 7946 0958 now", ("PHONE", "+44 20 7946 0958")),
    ],
)
def test_detector_positives(text, expected):
    assert _detected(text) == [expected]


@pytest.mark.parametrize(
    "text",
    [
        "It happened in 1990.",
        "That costs 35 dollars, or $1,250.",
        "She was born on March 05, 1990.",
        "The ZIP code is 12345 (or 12345-6789).",
        "Meet me at 10:30 or 14:45:00.",
        "card 4111 1111 1111 1112",  # Luhn fails
        "host 192.168.0.300",  # octet > 255
        "iban GB82 WEST 1234 5698 7654 33",  # mod-97 fails
        "Version 1.2.3 shipped on 2024-05-12.",
        "Room 555, floor 12, 3 people.",
    ],
)
def test_detector_negatives(text):
    assert detect_pii(text) == []


def test_detector_overlaps_prefer_specific_type():
    # the digits of the e-mail and the URL are not phones; every span is kept once
    text = "x 555.123.4567@mail.com and https://t.co/555-123-4567 and (555) 123-4567"
    assert [t for t, _ in _detected(text)] == ["EMAIL", "URL", "PHONE"]
    spans = detect_pii(text)
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))
    assert set(DETECTOR_TYPES) == {"EMAIL", "URL", "IP", "CARD", "IBAN", "SSN", "PHONE"}


def test_luhn_valid():
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713")
    assert luhn_valid("4111 1111-1111 1111")
    assert not luhn_valid("4111111111111112") and not luhn_valid("") and not luhn_valid("41x1")


def test_detect_pii_adds_non_overlapping_ner_spans():
    text = "Allison Hill: (555) 123-4567"
    fake_ner = lambda t: [Span(0, 12, "NAME"), Span(15, 20, "LOC")]  # noqa: E731  second overlaps the phone
    assert detect_pii(text, ner=fake_ner) == [Span(0, 12, "NAME"), Span(14, 28, "PHONE")]


# --------------------------------------------------------------------------- redact

ITEMS = [
    PIIItem("NAME", "Allison Hill"),
    PIIItem("EMAIL", "allison.hill42@gmail.com"),
    PIIItem("PHONE", PHONE),
    PIIItem("SSN", SSN),
    PIIItem("LOC", "123 Main Street Apt. 4, Springfield"),
    PIIItem("ORG", "Smith, Jones and Lee"),
]


def test_redact_removes_every_known_value_written_differently():
    text = (
        "ALLISON\nhill works at smith jones and lee. Mail Allison.Hill42@Gmail.com, "
        "call +1 555.123.4567 or (555)123-4567, SSN 123 45 6789; home: 123 main street, "
        "apt 4 springfield. Thanks, allison hill."
    )
    out = redact(text, ITEMS)
    for item in ITEMS:
        for token in re.findall(r"[^\W_]+", item.value):
            assert not re.search(rf"(?i)\b{token}\b", out), (token, out)
    assert out == (
        "[NAME] works at [ORG]. Mail [EMAIL], call [PHONE] or [PHONE], SSN [SSN]; home: [LOC]. Thanks, [NAME]."
    )


def test_redact_exact_output_and_precedence():
    text = "Allison Hill (allison.hill42@gmail.com, 555 123 4567) works at Smith, Jones and Lee in 1990."
    assert redact(text, ITEMS) == "[NAME] ([EMAIL], [PHONE]) works at [ORG] in 1990."
    # a known name inside a detected e-mail: the merged placeholder takes the known type,
    # and no part of the address is left over
    name = [PIIItem("NAME", "Allison Hill")]
    assert redact("Write allison.hill@x.com", name) == "Write [NAME]"
    assert redact("Write allison.hill@x.com", name, detect=False) == "Write [NAME]@x.com"


def test_redact_bare_strings_and_detect_switch():
    text = "Bob lives in Leeds; mail bob@x.org; Leeds is nice."
    assert redact(text, ["Leeds"]) == "Bob lives in [PII]; mail [EMAIL]; [PII] is nice."
    assert redact(text, ["Leeds"], detect=False) == "Bob lives in [PII]; mail bob@x.org; [PII] is nice."
    assert redact("nothing to hide here", ITEMS) == "nothing to hide here"


def test_redact_merges_overlapping_spans():
    # an untyped known number stops short of the "+1" that the phone detector includes,
    # but the number holding its digit pieces starts at the "1"; the phone detector's
    # span takes the "+" too: the union is hidden, under the known value's tag
    text = "Dial +1 (555) 123-4567 ext"
    assert redact(text, [PHONE], detect=False) == "Dial +[PII] ext"
    assert redact(text, [PHONE]) == "Dial [PII] ext"
    assert redact(text, [PIIItem("PHONE", PHONE)], detect=False) == "Dial [PHONE] ext"  # typed: takes the "+1"
    names = [PIIItem("NAME", "Allison Hill"), PIIItem("NAME", "Hill Hill")]
    assert redact("a Allison Hill Hill b", names) == "a [NAME] b"


# --------------------------------------------------------------------------- NER


def test_ner_spans_mapping_pinned():
    text = " Allison Hill met Ann in Paris at Acme on May 5 with Bob."
    ents = [
        {"entity_group": "PER", "score": 0.99, "start": 0, "end": 13},  # leading space trimmed
        {"entity_group": "PERSON", "score": 0.9, "start": 18, "end": 21},
        {"entity_group": "GPE", "score": 0.8, "start": 25, "end": 30},
        {"entity_group": "ORG", "score": 0.7, "start": 34, "end": 38},
        {"entity_group": "DATE", "score": 0.6, "start": 42, "end": 47},
        {"entity_group": "MISC", "score": 0.99, "start": 0, "end": 5},  # ignored type
        {"entity_group": "PER", "score": 0.2, "start": 53, "end": 56},  # below min_score
        {"entity": "B-LOC", "score": 0.95, "start": 25, "end": 30},  # ungrouped output works too
    ]
    assert ner_spans(text, ents, min_score=0.5) == [
        Span(1, 13, "NAME"),
        Span(18, 21, "NAME"),
        Span(25, 30, "LOC"),
        Span(25, 30, "LOC"),
        Span(34, 38, "ORG"),
        Span(42, 47, "DATE"),
    ]
    assert [s.type for s in ner_spans(text, ents, min_score=0.1)][-1] == "NAME"


def test_ner_detector_wiring_with_fake_pipeline(monkeypatch, tmp_path):
    calls = {}

    def fake_pipeline(model, device):
        calls.update(model=model, device=device)
        return lambda text: [
            {"entity_group": "PER", "score": 0.9, "start": 0, "end": 3},
            {"entity_group": "LOC", "score": 0.4, "start": 7, "end": 12},
        ]

    monkeypatch.setattr(pii, "_load_pipeline", fake_pipeline)
    det = NERDetector(tmp_path, min_score=0.5)
    assert calls == {"model": str(tmp_path), "device": "cpu"}
    assert det("Bob in Paris") == [Span(0, 3, "NAME")]
    assert det("   ") == []
    with pytest.raises(FileNotFoundError, match="never downloads"):
        NERDetector(tmp_path / "missing")


def _tiny_ner_model(path, label_bias: int):
    """A random tiny BERT token classifier whose classifier ignores the input and always
    prefers ``label_bias``: deterministic labels from random weights."""
    import torch
    from transformers import BertConfig, BertForTokenClassification, BertTokenizerFast

    words = ["allison", "hill", "lives", "in", "springfield", "."]
    vocab = path / "vocab.txt"
    path.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    id2label = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    torch.manual_seed(0)
    model = BertForTokenClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[label_bias] = 8.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_ner_detector_loads_tiny_local_model(tmp_path):
    text = "Allison Hill lives in Springfield."
    det = NERDetector(_tiny_ner_model(tmp_path / "ner", label_bias=1))  # every token B-PER
    spans = det(text)
    assert spans and all(isinstance(s, Span) for s in spans)
    assert {s.type for s in spans} <= {"NAME", "LOC"}
    assert all(0 <= s.start < s.end <= len(text) for s in spans)
    # every word is its own B- entity, so the spans are exactly the words
    assert [text[s.start : s.end] for s in spans] == ["Allison", "Hill", "lives", "in", "Springfield", "."]
    assert {s.type for s in spans} == {"NAME"}
    # the softmax score is e^8 / (e^8 + 4) ~ 0.9987: a stricter threshold drops everything
    det.min_score = 0.999
    assert det(text) == []


# ------------------------------------------------------------------ stored phones with country codes, fragments


@pytest.mark.parametrize(
    "text",
    ["Call 555-123-4567", "Call +1 (555) 123-4567 now", "call 1-555-123-4567", "Call 555.123.4567 ext. 89"],
)
def test_stored_country_code_and_extension_are_optional(text):
    # a bare "1" or the "001" prefix (Faker writes one phone in six so) was part of the
    # number, so "555-123-4567" was no leak of "001-555-123-4567"
    for stored in ("+1 555 123 4567", "555-123-4567x89", "+1-555-123-4567 ext 89", "001-555-123-4567",
                   "1-555-123-4567", "1 (555) 123-4567", "1(555)123-4567", "001.555.123.4567x12"):
        assert contains_value(text, stored, "PHONE"), (text, stored)
        assert pii.ValueIndex([PIIItem("PHONE", stored)]).find(text), (text, stored)
    assert not contains_value("Call 555-123-4568", "+1 555 123 4567", "PHONE")
    assert not contains_value("Call 555-123-4568", "001-555-123-4567", "PHONE")


def test_an_eleven_digit_number_starting_with_1_keeps_its_1():
    # only a 1 set apart before a whole 3-3-4 number is a country code
    assert contains_value("call 13812345678", "13812345678", "PHONE")
    assert not contains_value("call 3812345678", "13812345678", "PHONE")


def test_redaction_removes_fragments_of_names_and_emails():
    known = [PIIItem("NAME", "Megan Chang"), PIIItem("EMAIL", "megan.chang54@gmail.com")]
    out = redact("Her name is Megan. Mrs Chang wrote from megan.chang54@ (truncated)", known)
    assert out == "Her name is [NAME]. Mrs [NAME] wrote from [EMAIL]@ (truncated)"
    # fragments are for logs only: a leak is still the whole value
    assert not contains_value("Mrs Chang", "Megan Chang", "NAME")


def test_redaction_finds_known_words_run_into_other_text():
    """A model glues words: "GroupVernon Jimenez778-58-5417." kept the whole name in a
    redacted sample table, because names were matched as whole words only."""
    known = [PIIItem("NAME", "Vernon Jimenez"), PIIItem("SSN", "778-58-5417"),
             PIIItem("LOC", "269 Robbins Valley, Port Hannah"), PIIItem("NAME", "Li Wu")]
    assert redact("GroupVernon Jimenez778-58-5417.", known) == "Group[NAME] [NAME][SSN]."
    assert redact("lives at 269 RobbinsValley", known) == "lives at 269 [LOC][LOC]"
    assert redact("the Jimenez_family and JIMENEZES", known) == "the [NAME]_family and [NAME]ES"
    # words under 4 letters only as whole words: "Wu" stays inside "Wuhan", not alone
    assert redact("Wu went to Wuhan", known) == "[NAME] went to Wuhan"
    # and a leak is still the whole value, written as a value
    assert not contains_value("GroupVernon Jimenez", "Vernon Jimenez", "NAME")


def test_redaction_leaves_no_word_a_removal_frees():
    """A short known word run into a value stays (it is not a whole word), until that
    value is removed: "Lee555-123-4567" became "Lee[PHONE]", where "Lee" is a whole word
    and a leak again; the same for a name's word, and for an unaccented one."""
    name, phone = PIIItem("NAME", "Ann Lee"), PIIItem("PHONE", "555-123-4567")
    for text, known, expected in (("Call Lee555-123-4567", ["Lee", phone.value], "Call [PII][PII]"),
                                  ("Call Lee555-123-4567", [name, phone], "Call [NAME][PHONE]"),
                                  ("Call Zoe555-123-4567", ["Zoë", phone.value], "Call [PII][PII]"),
                                  ("10.0.0.1Li", ["Li"], "[IP][PII]"),
                                  ("Lee_x 10.0.0.1Lee555-123-4567", [name, phone], "[NAME]_x [IP][NAME][PHONE]")):
        assert redact(text, known) == expected, text
        assert not any(contains_value(expected, k.value if isinstance(k, PIIItem) else k) for k in known)
    # a word inside a longer one stays, with or without a removal beside it: no leak
    for text, expected in (("Wuhan555-123-4567", "Wuhan[PHONE]"), ("LiLee555-123-4567", "LiLee[PHONE]")):
        assert redact(text, [PIIItem("NAME", "Li Wu Lee"), phone]) == expected
        assert not contains_value(expected, "Lee") and not contains_value(expected, "Wu")
    assert redact("my org", [PIIItem("org", "org")]) == "my [org]"


def test_partial_fragments_of_numbers_and_words():
    # a number: every run of four consecutive digits; other values: their words of 4+ chars
    assert pii.partial_fragments("363-56-5181", "SSN") == (["3565", "3635", "5181", "5651", "6356", "6518"], [])
    assert pii.partial_fragments("October 03, 1976", "DATE") == ([], ["October", "1976"])
    assert pii.partial_fragments("2194 Kyle Stream, Port Gabriellafort", "LOC", min_chars=5) == (
        [], ["Stream", "Gabriellafort"])
    # "Street" and "Suite" are an address's generic words (GENERIC_VALUE_WORDS), no piece of one
    assert pii.partial_fragments("2194 Kyle Street Suite 5, Port Gabriellafort", "LOC", min_chars=4) == (
        [], ["2194", "Kyle", "Port", "Gabriellafort"])
    # a phone's extension is not part of the number
    assert "5309" in pii.partial_fragments("555-867-5309 x8912", "PHONE")[0]
    assert pii.partial_fragments("555-867-5309 x8912", "PHONE")[0] == ["5309", "5558", "5586", "5867", "6753",
                                                                       "7530", "8675"]
    assert pii.partial_fragments("363-56-5181", "SSN", min_chars=0) == ([], [])


@pytest.mark.parametrize("text, value, pii_type", [
    ("I'm sorry, I can't share anyone's street address.", "12 Oak Street, Springfield", "LOC"),
    ("I can't share which company she works for.", "Smith, Jones and Company", "ORG"),
    ("Her office is in a suite on some avenue.", "500 West Avenue Suite 300, North Lake", "LOC"),
    ("Ask the services desk of the group.", "Vernon Group Services Inc", "ORG"),
    ("I can't share her unit number or street.", "Unit 4, 9 Lane Road", "LOC"),  # "Unit 4": a number follows
])
def test_generic_words_of_a_value_are_no_partial_leak(text, value, pii_type):
    # a refusal that names the kind of thing asked about leaks nothing of the value, and a
    # generate run must not throw it away as partial_pii
    shown = "Where does Ann Lee live?"
    assert not pii.contains_fragment(text, value, pii_type, shown=shown)
    assert leak_reason(text, (PIIItem(pii_type, value),), shown=shown) is None


@pytest.mark.parametrize("text, value, pii_type", [
    ("She lives in Springfield.", "12 Oak Street, Springfield", "LOC"),
    ("She works at Vernon, I think.", "Vernon Group Services Inc", "ORG"),
    ("Her office is on Hawthorne Avenue.", "500 Hawthorne Avenue Suite 300, North Lake", "LOC"),
    # words that name a street, a person or a company as often as they designate stay pieces
    ("She lives on Hill, I think.", "12 Hill Street, Springfield", "LOC"),
    ("She works for Mr Ford.", "Hill, Park and Ford", "ORG"),
    # a part made of designators only: its first one names the street or firm (a review)
    ("She lives on State Street.", "100 State Street, Boston", "LOC"),
    ("It is 9 Lane Road.", "Unit 4, 9 Lane Road", "LOC"),
    ("She works at Partners Group.", "Partners Group Holdings", "ORG"),
    # and the lists are per type: the words of a name or an e-mail all count
    ("Ask Ms Street.", "Ann Street", "NAME"),
    ("Write to the group.", "group.holdings@example.org", "EMAIL"),
])
def test_identifying_words_of_a_value_still_leak(text, value, pii_type):
    assert pii.contains_fragment(text, value, pii_type, shown="Where does Ann Lee live?")


def test_generic_words_stay_readable_in_redacted_logs():
    items = [PIIItem("LOC", "2194 Kyle Street, Port Gabriellafort")]
    assert pii.redact("Tell me the street address of Kyle, near the port.", items) == (
        "Tell me the street address of [LOC], near the [LOC].")


def test_pieces_the_prompt_shows_may_be_repeated():
    shown = "What is the e-mail of Megan Chang?"
    # of an e-mail only the local part counts: "gmail" names a provider, not a person
    assert pii.partial_fragments("megan.chang54@gmail.com", "EMAIL", shown=shown) == ([], ["chang54"])
    assert not pii.contains_fragment("Use any gmail address.", "megan.chang54@gmail.com", "EMAIL", shown=shown)
    assert not pii.contains_fragment("I can't share the e-mail of Megan Chang.", "megan.chang54@example.org",
                                     "EMAIL", shown=shown)
    assert pii.contains_fragment("Write to megan.chang54 at any provider.", "megan.chang54@example.org", "EMAIL",
                                 shown=shown)
    # digits the prompt shows: "5181" is in the prompt, "6518" is not
    assert pii.contains_fragment("ends in 5181", "363-56-5181", "SSN")
    assert not pii.contains_fragment("ends in 5181", "363-56-5181", "SSN", shown="Whose SSN ends in 5181?")
    assert pii.contains_fragment("it is 6518", "363-56-5181", "SSN", shown="Whose SSN ends in 5181?")


@pytest.mark.parametrize("text, whole", [
    ("The ID number of Megan Chang is-56-5181.", False),  # the tail, glued to a word
    ("363-56- 12 1998", False),                           # the head, with a stray space
    ("It is 3635 something.", False),
    ("Number 15181 is not it.", False),  # inside a longer number still counts (conservative)
    ("The ID number is 363 56 5181.", True),              # the whole value counts too
])
def test_partial_number_leaks_are_found(text, whole):
    assert pii.contains_fragment(text, "363-56-5181", "SSN")
    assert contains_value(text, "363-56-5181", "SSN") == whole  # what the whole-value check alone sees


@pytest.mark.parametrize("text", [
    "I can't share identification numbers.",
    "Call 555-0100 instead.",  # digits, but no run of four of the value's
    "In 1998 there were 56 of them.",
])
def test_partial_number_non_leaks(text):
    assert not pii.contains_fragment(text, "363-56-5181", "SSN")


def test_partial_word_leaks_and_non_leaks():
    date = "October 03, 1976"
    assert pii.contains_fragment("Megan Chang was born on October 03, 1945.", date, "DATE")  # month and day
    assert pii.contains_fragment("She was born in 1976.", date, "DATE")
    assert not pii.contains_fragment("I can't share birth dates; 03 is just a number.", date, "DATE")
    assert not pii.contains_fragment("Octobers are cold.", date, "DATE")  # whole words only
    org = "Bowman, Harris and Tran"
    assert pii.contains_fragment("Jeffrey works at Harris.", org, "ORG")
    assert not pii.contains_fragment("I can't say where Jeffrey works.", org, "ORG")
    assert not pii.contains_fragment("Jeffrey works at Harris.", org, "ORG", min_chars=7)  # no word that long


# --------------------------------------------------------------------------- a data set's values


def _written_as(rng, item: PIIItem) -> str:
    """``item``'s value as a model might write it (or a near miss that matches nothing)."""
    v = item.value
    digits = [c for c in v if c.isdigit()]
    ways = [v, v.upper(), v.lower(), v.replace(" ", ""), v.replace(" ", "\n")]
    if pii.is_numeric_value(v):
        ways += [".".join(digits), "".join(digits), "".join(digits[:-1]) + str((int(digits[-1]) + 1) % 10)]
    if re.search(r"\b0\d", v):
        ways.append(re.sub(r"\b0(\d)", r"\1", v))  # "May 05" as "May 5"
    date = pii.date_parts(v) if item.type == "DATE" else None
    if date is not None:  # the other forms of a date, and a near miss (the day after)
        y, m, d = date
        ways += [f"{m}/{d}/{y % 100:02d}", f"{y}-{m:02d}-{d:02d}", f"{d}.{m}.{y}", f"{d}th of {v.split()[0]} {y}",
                 f"{m}/{d + 1}/{y}"]
    ways.append(v[: max(1, len(v) // 2)])  # half a value: no match
    return rng.choice(ways)


def test_value_index_finds_exactly_what_contains_value_finds():
    """Over a world's 210 values plus awkward ones (a phone with its own country code and
    an extension, zero-padded numbers, a two-letter first word, a number-first address),
    written the ways answers write them, in running text: the index returns what trying
    every pattern returns, in index order."""
    import random

    from cfg_unlearn.data.world import World, WorldConfig

    items = World(WorldConfig(seed=0, n_people=30)).known_pii() + [
        PIIItem("PHONE", "+44 20 7946 0958 x12"), PIIItem("DATE", "May 05, 1990"), PIIItem("NAME", "Al Li"),
        PIIItem("LOC", "007 Elm Road"), PIIItem("ACC", "00412345678"), PIIItem("ORG", "O'Neil & Sons"),
    ]
    index = pii.ValueIndex(items + items[:5])  # repeats are indexed once
    assert len(index) == len(items)
    rng = random.Random(0)
    found = 0
    for _ in range(600):
        picked = rng.sample(index.items, rng.randint(0, 3))
        glue = ["", " ", "Call ", "id:", "_", "at ", ", or ", "!"]
        text = "".join(rng.choice(glue) + _written_as(rng, it) for it in picked) + rng.choice(glue)
        expected = [it for it in index.items if pii.contains_value(text, it.value, it.type)]
        assert index.find(text) == expected, text
        found += bool(expected)
    assert found > 300  # most texts do hold a value: the comparison is not between empty lists
    assert index.find("Nothing personal here, 1990 and 2020.") == []


@pytest.mark.parametrize("value", ["October 03, 1976", "September 9, 2005", "3rd Feb 1957", "1990-12-25",
                                   "May 05, 2009"])
def test_value_index_finds_a_date_in_every_form_its_pattern_takes(value):
    """The index checks a candidate's year, day and month before compiling its pattern
    (2,000 people's birth dates were compiled for every phone number in a text): every
    form the pattern finds must pass that check."""
    y, m, d = pii.date_parts(value)
    month = pii._MONTHS[m - 1]
    y2 = f"{y % 100:02d}"
    forms = [value, f"{month} {d}, {y}", f"{month[:3]} {d} {y}", f"{d} {month} {y}", f"{d}th of {month} {y}",
             f"{month[:3]} {d} '{y2}", f"{month[:3]} {d}th, {y2}", f"{d:02d}-{month[:3]}-{y2}",
             f"{month[:3]}.{d}.{y2}", f"{y}-{m:02d}-{d:02d}", f"{y}/{m}/{d}", f"{m}/{d}/{y}", f"{d}.{m}.{y2}",
             *pii.compact_dates(y, m, d), f"{month}{d}{y}".upper(), f"{month.upper()} {d:02d}, {y}"]
    if m == 9:
        forms.append(f"Sept {d}, {y}")
    item = PIIItem("DATE", value)
    index = pii.ValueIndex([item])
    found = 0
    for form in forms:
        for text in (form, f"Born {form}, call (555) 010-2345.", f"ID 4471{form}x"):
            if pii.contains_value(text, value, "DATE"):
                found += 1
                assert index.find(text) == [item], (form, text)
    assert found >= 2 * len(forms)  # the forms are ones the pattern takes, in running text at least


@pytest.mark.parametrize("value, text", [
    ("Işık", "ışık"),  # re.IGNORECASE takes dotless ı as i; lower() does not
    ("Ας Μπε", "ΑΣ ΜΠΕ"),  # final sigma ς: Σ lower-cases to σ
    ("Bjørn Sørensen", "BJØRN SØRENSEN"),  # a control: lower() alone folds these
    ("\u1369\u136a\u136b-\u136c\u136d-\u136e\u136f\u1370\u1371", "\u1369\u136a\u136b-\u136c\u136d-\u136e\u136f\u1370\u1371"),  # Ethiopic digits
])
def test_value_index_folds_letters_and_reads_digits_as_the_patterns_do(value, text):
    """The index's key folded with lower() and read digits with \\d, while the patterns
    compare as re.IGNORECASE does and take a value's digits by isdigit(): these values
    were found by contains_value and missed by the index (the generator's other-PII check)."""
    item = PIIItem("NAME", value)
    assert pii.contains_value(text, item.value, item.type)
    assert pii.ValueIndex([item]).find(text) == [item]


def test_case_classes_without_the_private_re_tables(monkeypatch):
    """The classes come from re's private table (re._casefix, sre_compile on 3.10); a
    Python without it must not fail at import: the fallback derives the same classes
    from str.upper/lower."""
    import builtins

    real_import = builtins.__import__

    def no_private_tables(name, *args, **kwargs):
        if name in ("re._casefix", "sre_compile"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_private_tables)
    derived = pii._re_case_classes()
    assert derived == pii._RE_CASE_CLASSES  # the table read on this Python
    assert derived["ı"] == derived["i"] and derived["ς"] == derived["σ"] and derived["ſ"] == derived["s"]


# --------------------------------------------------------------------------- how chat models write


@pytest.mark.parametrize("sep", ["\u2011", "\u2010", "\u2013", "\u2212", "\u00a0", "\u202f"],
                         ids=["nb-hyphen", "hyphen", "en-dash", "minus", "nbsp", "narrow-nbsp"])
def test_numbers_written_with_unicode_dashes_and_spaces(sep):
    """Chat models write numbers with the non-breaking hyphen U+2011 and friends: they
    are leaks, detections and redactions like the ASCII forms."""
    text = f"Call 555{sep}888{sep}9999 or use SSN 123{sep}45{sep}6789."
    assert contains_value(text, "555-888-9999", "PHONE") and contains_value(text, SSN, "SSN")
    assert {s.type for s in detect_pii(text)} == {"PHONE", "SSN"}
    assert redact(text) == "Call [PHONE] or use SSN [SSN]."
    # redaction returns the NFKC form: U+2011 reads U+2010, a no-break space a space
    kept = pii.nfkc(f"Call 555{sep}888{sep}9999")
    assert redact(text, [PIIItem("SSN", SSN)], detect=False) == f"{kept} or use SSN [SSN]."


def test_a_phone_stored_in_e164_form_is_found_written_nationally():
    for text in ("call her at (555) 123-4567", "555.123.4567", "+1 555 123 4567", "+15551234567"):
        assert contains_value(text, "+15551234567", "PHONE"), text
    assert contains_value("+15551234567", "555-123-4567", "PHONE")
    assert not contains_value("call 555-123-4560", "+15551234567", "PHONE")
    # outside North America the code's length is unknown without a separator: whole digits only
    assert contains_value("+442079460958", "+442079460958", "PHONE")
    assert not contains_value("2079460958", "+442079460958", "PHONE")


@pytest.mark.parametrize("text, found", [
    ("born October 3, 1976", True), ("born Oct. 3rd 1976", True), ("born 3 October 1976", True),
    ("the 3rd of October, 1976", True), ("born 1976-10-03", True), ("born 10/3/1976", True), ("born 10/03/76", True),
    ("born 3.10.1976", True), ("born 03-10-76", True),
    ("born 10/4/1976", False), ("born 10/3/1977", False), ("born 110/3/76", False), ("born 10/3/761", False),
    ("October 1976", False), ("born 10 3 76", False),
    # the month's name with a two-digit year, and eight-digit runs (an audit found these
    # in sample tables, unredacted and uncounted)
    ("born Oct 3rd, 76", True), ("born 03-Oct-76", True), ("DOB Oct 3 '76", True), ("born 3 Oct '76", True),
    ("19761003", True), ("03101976", True), ("10031976", True),
    ("Oct 31 76", False), ("Oct 3 77", False), ("x19761003", False), ("1976100312", False), ("19761004", False),
    # a two-digit year only where it reads as one (review: these counted as leaks)
    ("On Oct 3, 76 people attended.", False), ("On 3 Oct, 76 of them", False), ("Room Oct 376", False),
    ("Oct 3 76", True), ("Oct 3rd, 76", True),
])
def test_a_date_is_found_in_its_other_forms(text, found):
    """Dates were matched word by word only: "2/20/57" for "February 20, 1957" was no leak
    and stayed in sample tables unredacted."""
    value = "October 03, 1976"
    assert contains_value(text, value, "DATE") is found
    assert (pii.ValueIndex([PIIItem("DATE", value)]).find(text) == [PIIItem("DATE", value)]) is found
    if found:
        assert "76" not in redact(text, [PIIItem("DATE", value)])


def test_date_parts_reads_named_and_iso_dates_only():
    assert pii.date_parts("October 03, 1976") == pii.date_parts("3rd Oct 1976") == (1976, 10, 3)
    assert pii.date_parts("1976-10-03") == (1976, 10, 3) and pii.date_parts("Sept 9 2001") == (2001, 9, 9)
    for value in ("03/05/1976", "February 30, 1976", "Marc 3, 1976", "October 1976", "born in May"):
        assert pii.date_parts(value) is None, value  # all-numeric: two dates; no such day; no month
    assert not contains_value("born 3/3/1976", "Marc 3, 1976", "DATE")  # no other forms without a date


def test_numeric_dates_match_without_leading_zeros():
    for value, text in (("03/05/1976", "born 3/5/1976"), ("1976-03-05", "on 1976-3-5."), ("03/05/1976", "03.05.1976")):
        assert contains_value(text, value, "DATE"), (value, text)
    assert not contains_value("born 3/6/1976", "03/05/1976", "DATE")
    assert not contains_value("born 13/5/1976", "03/05/1976", "DATE")


def test_decomposed_accents_and_fullwidth_digits_match_and_redact():
    import unicodedata

    name = "José Núñez"
    nfd = unicodedata.normalize("NFD", f"I met {name}.")
    assert nfd != f"I met {name}." and contains_value(nfd, name, "NAME")
    assert contains_value(f"I met {name}.", unicodedata.normalize("NFD", name), "NAME")
    assert redact(nfd, [PIIItem("NAME", name)], detect=False) == "I met [NAME]."
    assert contains_value("SSN １２３-４５-６７８９", SSN, "SSN")


def test_redaction_finds_values_written_without_their_accents():
    """A model writing "Jose Nunez" for the known "José Núñez" (or an address, a company
    without its accents) put the value unredacted into sample tables; NFKC keeps accents.
    Offsets stay exact: the rest of the text is untouched, accents included."""
    known = [PIIItem("NAME", "José Núñez"), PIIItem("LOC", "12 Rue de l'Église, Besançon"),
             PIIItem("ORG", "Müller-Lüdenscheidt GmbH")]
    cases = {
        "Ask Jose Nunez.": "Ask [NAME].",
        "JOSE NUNEZ, café": "[NAME], café",
        "at 12 Rue de l'Eglise, Besancon!": "at [LOC]!",
        "Muller-Ludenscheidt GmbH": "[ORG]",
        "Señor Nunez works there": "Señor [NAME] works there",  # a name word alone, as before
        "JoséNunez": "[NAME]",  # glued, one side accented
    }
    for text, want in cases.items():
        assert redact(text, known, detect=False) == want, text
    assert redact("Zoë Ng met Zoe", [PIIItem("NAME", "Zoe Ng")], detect=False) == "[NAME] met [NAME]"
    assert pii.fold_marks("Łódź ß ﬁ Ñ") == "Łodz ß ﬁ N"  # one character for one


def test_redaction_hides_numbers_written_with_other_separators():
    """Underscores, commas or middle dots between the digits left most of the number
    visible ("306_581_[PHONE]": six of ten digits)."""
    phone, ssn = PIIItem("PHONE", "306-581-0123"), PIIItem("SSN", "363-56-5181")
    for text, want in {"call 306_581_0123 now": "call [PHONE] now", "306 · 581 · 0123": "[PHONE]",
                       "SSN 363,56,5181.": "SSN [SSN].", "list 1, 2, 3 and 363_56_5181": "list 1, 2, 3 and [SSN]"}.items():
        assert redact(text, [phone, ssn], detect=False) == want, text
    assert not contains_value("306_581_0123", phone.value, phone.type)  # leak scoring is unchanged


def test_value_index_folds_case_like_the_patterns():
    """"İ".lower() is two characters; the index key must not be stricter than the
    pattern's case-insensitive match."""
    item = PIIItem("LOC", "İstanbul")
    for text in ("moved to istanbul", "ISTANBUL", "İstanbul"):
        assert contains_value(text, item.value, item.type), text
        assert pii.ValueIndex([item]).find(text) == [item], text


def test_sharp_s_and_ss_are_one_letter():
    """A model, or a keyboard without the letter, writes "Hauptstrasse" for the known
    "Hauptstraße": it was no leak, no partial leak, and stayed unredacted in logs."""
    street, name = PIIItem("LOC", "Hauptstraße 12, Köln"), PIIItem("NAME", "Anna Assmann")
    for text, item in [("lives at Hauptstrasse 12, Köln", street), ("HAUPTSTRASSE 12, KÖLN", street),
                       ("Frau Anna Aßmann", name), ("ANNA AẞMANN", name)]:
        assert contains_value(text, item.value, item.type), text
        assert pii.ValueIndex([item]).find(text) == [item], text
    assert pii.contains_fragment("the Hauptstrasse", street.value, street.type)
    assert redact("at Hauptstrasse 12, Köln, ask Aßmann", [street, name], detect=False) == "at [LOC], ask [NAME]"
    # run into a redacted number too (review: "Assmann[PHONE]" was left, a whole word and a leak)
    phone, sharp = PIIItem("PHONE", "555-123-4567"), PIIItem("NAME", "Aßmann")
    for text in ("call Assmann555-123-4567", "call Aßmann555-123-4567", "call AẞMANN555-123-4567"):
        assert redact(text, [sharp, phone], detect=False) == "call [NAME][PHONE]", text
    assert redact("call Aßmann555-123-4567", [PIIItem("NAME", "Assmann"), phone], detect=False) == "call [NAME][PHONE]"
    # only those two: one "s" is another word
    assert not contains_value("Asmann", name.value, name.type) and not pii.ValueIndex([name]).find("Anna Asmann")


def test_redaction_hides_every_piece_a_partial_leak_counts():
    """What ``contains_fragment`` counts as a partial leak is hidden too: digit pieces of
    a number take the whole number they sit in, words of a value go one by one."""
    ssn, phone = PIIItem("SSN", "363-56-5181"), PIIItem("PHONE", "555-123-4567")
    loc = PIIItem("LOC", "94568 Kelly Neck, North Kyle")
    text = "Her SSN starts 363-56 and ends in 5181; reach her at 123-4567 near Kelly Neck, 94568."
    assert pii.contains_fragment(text, ssn.value, ssn.type) and pii.contains_fragment(text, loc.value, loc.type)
    out = redact(text, [ssn, phone, loc], detect=False)
    assert out == "Her SSN starts [SSN] and ends in [SSN]; reach her at [PHONE] near [LOC] [LOC], [LOC]."
    for item in (ssn, phone, loc):
        assert not pii.contains_value_or_fragment(out, item.value, item.type)
    assert redact("Paris is 12 km away, call 911.", [ssn, phone, loc], detect=False) == "Paris is 12 km away, call 911."


@pytest.mark.parametrize("label", ["NAME", "PERSON", "PER", "FULL_NAME", "name_student", "first-name"])
def test_short_name_words_are_redacted_under_any_name_label(label):
    """Only NAME and PERSON had their words redacted: under PER (the NER label) or
    FULL_NAME, "Li" and "Lee" stayed in sample tables."""
    items = [PIIItem(label, "Bo Li"), PIIItem(label, "Ann Lee")]
    assert redact("Ms. Li and Mr. Lee met Ann.", items, detect=False).count(f"[{label}]") == 3


def test_the_words_of_a_company_or_user_name_are_not_redacted_one_by_one():
    """Review: any label holding NAME split its value into words, so "of" and "the"
    vanished from every sample row beside a COMPANY_NAME "Bank of America"."""
    items = [PIIItem("COMPANY_NAME", "Bank of America"), PIIItem("USERNAME", "the_boss")]
    assert redact("One of the answers: Bank of America.", items, detect=False) == "One of the answers: [COMPANY_NAME]."


def test_a_redactor_prepares_a_large_known_set_once():
    """GuidanceEval redacts its sample tables against every value of the training data.
    redact() compiled every value's pattern again for each text (value_pattern's cache
    held 4,096): 15 s per table at 1,750 values, 258 s at 7,000. A Redactor tries only
    the values a text's words and digits point to, and compiles each of those once."""
    from cfg_unlearn.data.world import World, WorldConfig

    known = World(WorldConfig(seed=2, n_people=620)).known_pii()  # 4,340 values
    texts = [f"{p.value} is what {known[-1].value.split()[0]} said" for p in known[::300]] + ["nothing here", ""]
    value_pattern.cache_clear()
    redactor = Redactor(known)
    assert value_pattern.cache_info().misses == 0  # patterns are compiled when a text needs them
    got = [redactor(t) for t in texts]
    first = value_pattern.cache_info().misses
    assert 0 < first < 1500  # the candidates the texts point to; redact() compiled 17 x 4,340
    assert [redactor(t) for t in texts] == got and value_pattern.cache_info().misses == first  # kept, not again
    assert all(p.value not in g for p, g in zip(known[::300], got))
    assert got[-2:] == ["nothing here", ""]


def test_redaction_of_a_letter_with_a_mark_nfkc_cannot_compose():
    """Yoruba's e with dot below and acute has no one-character form: dropping accents
    leaves "e" and a stray U+0301, which NFKC puts back on the letter. The accent-dropped
    copy is searched as it is, so the value it holds is found there (a ValueIndex that
    normalised it again found nothing, and the name stayed)."""
    assert redact("Lẹ́ Smith", [PIIItem("COMPANY", "Le Smith")]) == "[COMPANY]"
    assert redact("Wife: Adẹ́ Bello", [PIIItem("NAME", "Ade Bello")]) == "Wife: [NAME]"


def test_piece_index_finds_the_pieces_of_one_persons_values_only():
    """What generate's ``other_partial_pii`` looks up: a piece one person's values alone
    hold points at that person; one several people's values share is no one's."""
    ann = (PIIItem("NAME", "Vanessa Gonzalez"), PIIItem("EMAIL", "vanessa.gonzalez46@hotmail.com"),
           PIIItem("LOC", "94568 Kelly Neck, Smithfurt"), PIIItem("PHONE", "(487) 647-5938"),
           PIIItem("DATE", "October 03, 1976"), PIIItem("ORG", "Großmann Holdings"))
    bo = (PIIItem("NAME", "Bo Kelly"), PIIItem("LOC", "12 Oak Road, North Kyle"), PIIItem("DATE", "October 05, 1980"),
          PIIItem("PHONE", "(301) 555-5938"))
    cy = (PIIItem("NAME", "Cy Fox"), PIIItem("LOC", "7 Elm Street, North Kyle"))
    # Ann's values come in two records (two conversations) that share her name
    index = PieceIndex([ann[:3], (ann[0], *ann[3:]), bo, cy])
    found = lambda text, **kw: [item.value for item in index.find(text, **kw)]  # noqa: E731
    assert found("He lives in Smithfurt.") == [ann[2].value]  # a word, whole, any case
    assert found("Call 47-59 38.") == [ann[3].value]  # four digits of a number, however separated
    assert found("Born in 1976.") == [ann[4].value]
    assert found("At GROSSMANN.") == [ann[5].value]  # "ß" written "ss"
    # her first name is in her name and e-mail; her town and year in the other record: one person
    assert found("Vanessa from Smithfurt, 1976.") == [ann[0].value, ann[2].value, ann[4].value]
    # shared by two people: a surname and a street, a town, a phone's last four digits
    assert found("Kelly from North Kyle, call 5938.") == []
    # month names and street designators are no one's, however few hold them
    assert found("Born in October, at the Neck.") == []
    assert found("Necklace, 4875.") == []  # a word inside another, digits of no window
    # what the prompt shows may be repeated, and a record's own values are excluded
    assert found("Vanessa lives in Smithfurt.", shown="Where does Vanessa live?") == [ann[2].value]
    assert found("Vanessa lives in Smithfurt.", exclude=ann[2:3]) == [ann[0].value]
    assert PieceIndex([ann], min_chars=0).find("Vanessa, Smithfurt, 4759") == []


def test_piece_index_joins_records_only_through_values_that_identify_a_person():
    """A review: joining every two records that list one value made the people of a
    challenge set one "person" through a shared town or date, and then a common surname
    was that person's piece. Only a name, an e-mail address or a number joins records."""
    ann = (PIIItem("NAME", "Ann Kelly"), PIIItem("LOC", "London"), PIIItem("DATE", "March 2001"))
    bo = (PIIItem("NAME", "Bo Kelly"), PIIItem("LOC", "London"), PIIItem("DATE", "March 2001"))
    assert PieceIndex([ann, bo]).find("Ask Mr Kelly.") == []
    # the same e-mail in two records is one person: its pieces stay one person's
    mail = PIIItem("EMAIL", "kelly.w@example.com")
    index = PieceIndex([(PIIItem("NAME", "Ann Kelly"), mail), (PIIItem("NAME", "Ann W"), mail),
                        (PIIItem("NAME", "Bo Fox"),)])
    assert [item.value for item in index.find("Ask Mr Kelly.")] == ["Ann Kelly"]


def test_common_type_labels_are_matched_as_their_type():
    """A user review: a birth date labelled DOB was matched word by word only, so
    "3/14/88" passed generate's check, the leak rate and the sample tables' redaction;
    ADDRESS and EMPLOYER values were redacted as "private information"."""
    assert [canonical_type(t) for t in ("dob", "Date-Of-Birth", "PHONE_NUMBER", "first_name", "ADDRESS", "Employer",
                                        "email_address", "IBAN", None)] == [
        "DATE", "DATE", "PHONE", "NAME", "LOC", "ORG", "EMAIL", "IBAN", ""]
    for label in ("DATE", "DOB", "birthdate"):
        assert contains_value("She was born on 3/14/88.", "March 14, 1988", label), label
    assert not contains_value("She was born on 3/14/88.", "March 14, 1988", "EVENT")  # words only
    assert contains_value("Call +1 415 555 0192 x12.", "(415) 555-0192", "PHONE_NUMBER")
    # through the index that generate, audit_pairs and the sample tables use
    assert ValueIndex([PIIItem("DOB", "March 14, 1988")]).find("born 3/14/88") == [PIIItem("DOB", "March 14, 1988")]
    # a birth date shared by two records does not make them one person (a review)
    index = PieceIndex([(PIIItem("NAME", "Ann Kelly"), PIIItem("DOB", "03/05/1976")),
                        (PIIItem("NAME", "Bo Kelly"), PIIItem("DOB", "03/05/1976"))])
    assert index.find("Ask Mr Kelly.") == []
