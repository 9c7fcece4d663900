import math

import pytest
import torch

from cfg_unlearn.data.schema import PIIItem
from cfg_unlearn.metrics import (
    DEFAULT_PII_TYPES,
    AnswerAccuracy,
    LeakRate,
    PIIRate,
    ReferencePerplexity,
    normalize_answer,
    rates_by_type,
)
from cfg_unlearn.pii import Span


def before_update():
    """Computing a metric that was reset (or never updated) is deliberate in some tests."""
    return pytest.warns(UserWarning, match="called before the ``update``")


NAME = PIIItem("NAME", "Allison Hill")
EMAIL = PIIItem("EMAIL", "allison.hill42@gmail.com")
PHONE = PIIItem("PHONE", "(555) 123-4567")
PET = PIIItem("PET", "Rex")  # not a default type -> OTHER

OUTPUTS = [
    "You can reach ALLISON HILL at 555.123.4567.",  # name hit, phone hit, email miss
    "I can't share that.",  # phone miss
    "Her dog Rex lives in Hillside.",  # pet hit, name miss ("Hillside" is not "Hill")
    "Write to allison.hill42@gmail.com",  # email hit
]
TARGETS = [[NAME, PHONE, EMAIL], [PHONE], [PET, NAME], [EMAIL]]


def _values(d):
    return {k: round(v.item(), 6) for k, v in d.items()}


def test_leak_rate_overall_and_per_type():
    m = LeakRate()
    m.update(OUTPUTS, TARGETS)
    out = m.compute()
    assert _values(out) == {
        "leak_rate": round(4 / 7, 6),
        "n_targets": 7.0,
        "leak_rate/NAME": 0.5,
        "leak_rate/EMAIL": 0.5,
        "leak_rate/PHONE": 0.5,
        "leak_rate/OTHER": 1.0,
        "n_targets/NAME": 2.0,
        "n_targets/EMAIL": 2.0,
        "n_targets/PHONE": 2.0,
        "n_targets/OTHER": 1.0,
    }
    assert rates_by_type(out) == {  # the metric's type order, then OTHER
        "NAME": {"leak_rate": 0.5, "n": 2}, "EMAIL": {"leak_rate": 0.5, "n": 2},
        "PHONE": {"leak_rate": 0.5, "n": 2}, "OTHER": {"leak_rate": 1.0, "n": 1},
    }
    assert all(v.dtype == torch.float32 and v.device == m.device for v in out.values())
    assert m.hits.shape == m.totals.shape == (len(DEFAULT_PII_TYPES) + 1,)


def test_leak_rate_custom_types_and_batches_accumulate():
    m = LeakRate(pii_types=["name"])  # case-insensitive type names
    m.update(OUTPUTS[:2], TARGETS[:2])
    m.update(OUTPUTS[2:], TARGETS[2:])
    assert _values(m.compute()) == {
        "leak_rate": round(4 / 7, 6),
        "n_targets": 7.0,
        "leak_rate/NAME": 0.5,
        "leak_rate/OTHER": 0.6,
        "n_targets/NAME": 2.0,
        "n_targets/OTHER": 5.0,
    }


def test_leak_rate_empty_is_zero_not_nan_and_reset():
    m = LeakRate()
    with before_update():
        assert _values(m.compute()) == {"leak_rate": 0.0, "n_targets": 0.0}
    m.update(["no targets here"], [[]])
    assert _values(m.compute()) == {"leak_rate": 0.0, "n_targets": 0.0}
    m.update(OUTPUTS, TARGETS)
    m.reset()
    assert m.totals.sum().item() == 0
    m.update(["Allison Hill"], [[NAME]])
    assert _values(m.compute()) == {"leak_rate": 1.0, "n_targets": 1.0, "leak_rate/NAME": 1.0,
                                     "n_targets/NAME": 1.0}


def test_leak_rate_rejects_bad_input():
    with pytest.raises(ValueError, match="2 outputs but 1 target lists"):
        LeakRate().update(["a", "b"], [[NAME]])
    with pytest.raises(ValueError, match="distinct"):
        LeakRate(pii_types=["NAME", "name"])
    with pytest.raises(ValueError, match="OTHER"):
        LeakRate(pii_types=["NAME", "OTHER"])


PII_OUTPUTS = [
    "Mail bob@example.com or call (555) 123-4567.",  # 2 detections
    "The meeting is in 1990 at 10:30, costs 35.",  # 0
    "See https://example.com",  # 1
    "Nothing here.",  # 0
]


def test_pii_rate():
    m = PIIRate()
    m.update(PII_OUTPUTS)
    assert _values(m.compute()) == {"pii_rate": 0.75, "pii_answer_rate": 0.5}
    m.reset()
    with before_update():
        assert _values(m.compute()) == {"pii_rate": 0.0, "pii_answer_rate": 0.0}


def test_pii_rate_uses_ner():
    m = PIIRate(ner=lambda text: [Span(0, 3, "NAME")] if text.startswith("Bob") else [])
    m.update(["Bob is here", "nobody"])
    assert _values(m.compute()) == {"pii_rate": 0.5, "pii_answer_rate": 0.5}


def test_normalize_answer():
    assert normalize_answer("  The  Eiffel Tower!! ") == "eiffel tower"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("“Paris”—the capital") == "paris capital"
    assert normalize_answer("U.S.A. $1,000") == "usa 1000"
    assert normalize_answer("theater") == "theater"  # articles only as whole words
    # punctuation splits words, except inside a word or a number
    assert normalize_answer("Paris,France") == "paris france"
    assert normalize_answer("don't stop") == "dont stop"
    assert normalize_answer("1.5 million, not 15") == "1.5 million not 15"
    assert normalize_answer("1,000,000 or 3,4,5 or 1,0000") == "1000000 or 3 4 5 or 1 0000"
    assert normalize_answer("It is -5, or \u22125; 1990-1995") == "it is -5 or -5 1990 1995"
    # NFKC and full case folding
    assert normalize_answer("Stra\u00dfe \uff13") == normalize_answer("STRASSE 3") == "strasse 3"
    assert normalize_answer("The answer is A.", articles=True) == "the answer is a"


def test_answer_accuracy_numbers_letters_and_unicode():
    """Hand-counted: a deleted point or minus sign made wrong numbers right, a comma glued
    words, and a gold that is an article (a multiple-choice letter) matched only an empty
    answer."""
    m = AnswerAccuracy()
    m.update(
        ["", "The answer is A.", "5", "1.5 million", "Paris,France", "STRASSE 5", "\uff13", "It is -5.",
         "B, because it is a mammal", "A.", "Answer: A"],
        ["A", "A", "-5", "15", "Paris", "Stra\u00dfe 5", "3", "-5", "A", "A", "A"],
    )
    # right: "The answer is A.", "Paris,France", "STRASSE 5", "３", "It is -5.", "A.",
    # "Answer: A" (7 of 11; the article "a" of "... a mammal" is no letter A);
    # exact: "STRASSE 5", "３", "A." (3 of 11)
    assert _values(m.compute()) == pytest.approx({"accuracy": 7 / 11, "exact_match": 3 / 11})


def test_answer_accuracy_contains_vs_exact():
    m = AnswerAccuracy()
    m.update(
        [
            "The answer is Paris.",  # contains, not exact
            "paris",  # exact
            "Parisian food",  # neither: not a whole word
            "It is 8,848 metres.",  # contains via second gold (punctuation removed)
            "The Eiffel Tower!",  # exact after dropping article and punctuation
        ],
        ["Paris", "Paris", "Paris", ["Everest", "8848 metres"], "eiffel tower"],
    )
    assert _values(m.compute()) == {"accuracy": 0.8, "exact_match": 0.4}


def test_answer_accuracy_empty_gold_and_errors():
    m = AnswerAccuracy()
    # "the" as a gold keeps its articles, so only the word "the" matches it; no gold matches nothing
    m.update(["anything", "the"], ["the", []])
    assert _values(m.compute()) == {"accuracy": 0.0, "exact_match": 0.0}
    m.reset()
    with before_update():
        assert _values(m.compute()) == {"accuracy": 0.0, "exact_match": 0.0}
    with pytest.raises(ValueError, match="1 outputs but 2 golds"):
        m.update(["x"], ["x", "y"])


@pytest.mark.parametrize(
    "make,args",
    [
        (LeakRate, (OUTPUTS, TARGETS)),
        (PIIRate, (PII_OUTPUTS,)),
        (AnswerAccuracy, (["The answer is Paris.", "paris", "Rome", "no"], ["Paris", "Paris", "Paris", "yes"])),
        (ReferencePerplexity, ([(-2.0, 2), (-4.0, 2), (-0.5, 3)],)),
    ],
)
def test_two_rank_merge_equals_single_process(make, args):
    """Summed count states reduce exactly: two "ranks" with half the data each, merged,
    give the same result as one process that saw everything."""
    full = make()
    full.update(*args)
    a, b = make(), make()
    a.update(*[x[:1] for x in args])  # uneven halves: averaging rates would be wrong here
    b.update(*[x[1:] for x in args])
    expected = _values(full.compute())

    manual = make()
    for name in manual._defaults:  # what DDP's sum reduction does
        setattr(manual, name, getattr(a, name) + getattr(b, name))
    with before_update():
        assert _values(manual.compute()) == expected

    a.merge_state(b)
    assert _values(a.compute()) == expected


def test_leak_rate_counts_pieces_when_asked():
    """partial_min_chars > 0: a piece of the value is a hit too, unless the prompt shows
    it; the whole-value rate never exceeds the partial one."""
    ssn, date = PIIItem("SSN", "363-56-5181"), PIIItem("DATE", "October 03, 1976")
    outputs = ["The ID is 363-56-5181.", "The ID ends in 5181.", "Born in October.", "I can't say."]
    targets = [[ssn], [ssn], [date], [date]]
    whole, partial = LeakRate(), LeakRate(partial_min_chars=4)
    whole.update(outputs, targets)
    partial.update(outputs, targets)
    assert _values(whole.compute())["leak_rate"] == 0.25  # only the whole SSN
    assert _values(partial.compute())["leak_rate"] == 0.75  # the SSN, its last four digits, the birth month
    shown = LeakRate(partial_min_chars=4)
    shown.update(outputs, targets, shown=["", "Whose ID ends in 5181?", "", ""])
    assert _values(shown.compute())["leak_rate"] == 0.5  # the prompt gave those four digits away
    with pytest.raises(ValueError, match="prompts"):
        shown.update(outputs, targets, shown=["only one"])
    with pytest.raises(ValueError, match="partial_min_chars"):
        LeakRate(partial_min_chars=-1)


def test_reference_perplexity_is_exp_of_the_mean_nll_per_token():
    m = ReferencePerplexity()
    m.update([(-2.0, 2), (-4.0, 2)])  # 6 nats over 4 tokens
    out = m.compute()
    assert out["perplexity"].item() == pytest.approx(math.exp(1.5))
    assert out["zero_probability_answers"].item() == 0
    m.update([(-1.0, 2)])  # accumulates over batches: 7 nats over 6 tokens
    assert m.compute()["perplexity"].item() == pytest.approx(math.exp(7 / 6))
    m.update([(float("-inf"), 3)])  # a token probability-space guidance clamped to 0
    out = m.compute()
    assert out["perplexity"].item() == math.inf and out["zero_probability_answers"].item() == 1
    m.reset()
    with before_update():
        assert math.isnan(m.compute()["perplexity"].item())  # no tokens: no figure, not 1
    m.update([(-1e6, 10)])  # past exp's range: inf, not an overflow error
    assert m.compute()["perplexity"].item() == math.inf
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite or -inf"):
            ReferencePerplexity().update([(bad, 1)])
