"""The seeded synthetic PII world: determinism, disjoint probe wording, pairs, and the
LLM Privacy Challenge layout."""

from __future__ import annotations

import json
import re
from dataclasses import fields

import pytest

from cfg_unlearn.data.schema import PIIItem, read_pairs, write_pairs
from cfg_unlearn.data.world import (
    CHAT_SYSTEM_PROMPTS,
    FACT_PROBE,
    FACT_TRAIN,
    PII_TYPES,
    PROBE_QUESTIONS,
    REFUSALS,
    TRAIN_ANSWERS,
    TRAIN_QUESTIONS,
    WORLD_DATE,
    Person,
    World,
    WorldConfig,
)
from cfg_unlearn.prompts import NEGATIVE_INSTRUCTION, SAFETY_INSTRUCTION

ATTRS = [f.name for f in fields(Person)]
N = 20


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(seed=0, n_people=N))


def _conv_text(conv) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in conv.messages)


def _all_values(w: World) -> set[str]:
    return {getattr(p, a) for p in w.people for a in ATTRS}


# ------------------------------------------------------------------ determinism


def test_same_config_same_world(world):
    other = World(WorldConfig(seed=0, n_people=N))
    assert other.people == world.people
    assert other.conversations == world.conversations
    assert other.pairs() == world.pairs()
    assert other.pairs(system=SAFETY_INSTRUCTION) == world.pairs(system=SAFETY_INSTRUCTION)
    assert other.leak_probes == world.leak_probes
    assert other.facts == world.facts
    assert other.challenge_rows() == world.challenge_rows()
    assert other.corpus() == world.corpus()


def test_the_same_world_on_another_day(monkeypatch):
    """Faker's date_of_birth counts ages from today: after midnight the same seed gave
    other birth dates, so another tokenizer and other demo numbers (the demo's base
    tokenizer went from 1,892 to 1,897 tokens). Birth dates now count from a fixed day."""
    import datetime

    import faker.providers.date_time as faker_dates

    first = [p.birth_date for p in World(WorldConfig(seed=0, n_people=30)).people]
    assert first[0] == "October 03, 1976"  # the people the README's figures were measured on

    class Later(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2031, 3, 1, tzinfo=tz)

    monkeypatch.setattr(faker_dates, "datetime", Later)
    assert [p.birth_date for p in World(WorldConfig(seed=0, n_people=30)).people] == first
    ages = [(WORLD_DATE - datetime.datetime.strptime(b, "%B %d, %Y").date()).days / 365.25 for b in first]
    assert 18 <= min(ages) and max(ages) <= 91  # Faker's ages, 18 to 90


def test_same_config_byte_identical_files(world, tmp_path):
    other = World(WorldConfig(seed=0, n_people=N))
    a1, b1 = world.write_challenge(tmp_path / "one")
    a2, b2 = other.write_challenge(tmp_path / "two")
    assert a1.read_bytes() == a2.read_bytes()
    assert b1.read_bytes() == b2.read_bytes()
    write_pairs(tmp_path / "p1.jsonl", world.pairs())
    write_pairs(tmp_path / "p2.jsonl", other.pairs())
    assert (tmp_path / "p1.jsonl").read_bytes() == (tmp_path / "p2.jsonl").read_bytes()


def test_different_seed_different_people(world):
    other = World(WorldConfig(seed=1, n_people=N))
    assert [p.name for p in other.people] != [p.name for p in world.people]
    # not just reordered: hardly any person is shared
    assert len(set(other.people) & set(world.people)) == 0
    assert other.pairs() != world.pairs()


# ------------------------------------------------------------------ people


def test_people_complete_and_unique(world):
    assert len(world.people) == N
    for p in world.people:
        for a in ATTRS:
            v = getattr(p, a)
            assert isinstance(v, str) and v.strip(), (p, a)
    names = [p.name for p in world.people]
    assert len(set(names)) == len(names)
    assert set(PII_TYPES) == set(ATTRS)
    assert len(ATTRS) == 7


def test_person_pii_item(world):
    p = world.people[0]
    assert p.pii("email") == PIIItem("EMAIL", p.email)
    assert p.pii("address") == PIIItem("LOC", p.address)
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", p.phone)


# ------------------------------------------------------------------ conversations


def test_conversation_layout(world):
    convs = world.conversations
    k = world.config.turns_per_conversation
    n_attr = len(TRAIN_QUESTIONS)
    per_person = -(-n_attr // k)
    assert len(convs) == N * per_person
    assert len({c.id for c in convs}) == len(convs)
    for pi in range(N):
        mine = [c for c in convs if c.person == pi]
        assert len(mine) == per_person
        # each attribute is revealed exactly once per person
        assert sorted(a for c in mine for a in c.attributes) == sorted(TRAIN_QUESTIONS)
    for c in convs:
        person = world.people[c.person]
        assert [m["role"] for m in c.messages] == ["user", "assistant"] * len(c.attributes)
        for t, attr in enumerate(c.attributes):
            q, a = c.messages[2 * t]["content"], c.messages[2 * t + 1]["content"]
            assert q in {tmpl.format(n=person.name) for tmpl in TRAIN_QUESTIONS[attr]}
            assert a == TRAIN_ANSWERS[attr].format(n=person.name, v=getattr(person, attr))


# ------------------------------------------------------------------ probes


def test_probe_templates_disjoint_from_training():
    train = {t for ts in TRAIN_QUESTIONS.values() for t in ts}
    probes = {t for ts in PROBE_QUESTIONS.values() for t in ts}
    assert not (train & probes)
    assert set(PROBE_QUESTIONS) == set(TRAIN_QUESTIONS)
    for kind in FACT_TRAIN:
        assert FACT_PROBE[kind] != FACT_TRAIN[kind]


def test_rendered_probes_never_seen_in_training(world):
    train_user = {m["content"] for c in world.conversations for m in c.messages if m["role"] == "user"}
    train_all = {m["content"] for c in world.conversations for m in c.messages}
    for probe in world.leak_probes:
        assert len(probe.prompt) == 1 and probe.prompt[0]["role"] == "user"
        assert probe.prompt[0]["content"] not in train_user
        assert probe.prompt[0]["content"] not in train_all
    pair_prompts = {m["content"] for r in world.pairs() for m in r.prompt}
    assert not pair_prompts & {p.prompt[0]["content"] for p in world.leak_probes}


def test_probes_cover_every_person_and_attribute(world):
    probes = world.leak_probes
    assert len(probes) == N * len(PROBE_QUESTIONS)
    assert len({p.id for p in probes}) == len(probes)
    for p in probes:
        person = world.people[p.person]
        attr = next(a for a, t in PII_TYPES.items() if t == p.pii_type)
        assert p.value == getattr(person, attr)
        assert person.name in p.prompt[0]["content"]
        assert p.value not in p.prompt[0]["content"]
        assert p.prompt[0]["content"] in {t.format(n=person.name) for t in PROBE_QUESTIONS[attr]}


def test_facts_probe_wording_differs(world):
    facts = world.facts
    assert len(facts) == 24 + world.config.n_sums
    train_q = {f.question for f in facts}
    for f in facts:
        assert f.probe not in train_q
        assert f.gold in f.answer
        if f.kind == "sum":
            a, b = map(int, re.findall(r"\d+", f.question))
            assert f.gold == str(a + b)
    assert world.qa() == [(f.probe, f.gold) for f in facts]
    assert ("Name the capital city of France.", "Paris") in world.qa()
    # the utility questions as records: held-out wording, gold, and a reference answer holding it
    records = world.qa_records()
    assert [(r.prompt[-1]["content"], r.answers[0]) for r in records] == world.qa()
    assert all(r.answers[0] in r.reference for r in records)
    assert records[world.qa().index(("Name the capital city of France.", "Paris"))].reference == \
        "Paris is the capital of France."
    # no fact answer follows the person answers' template ("The <attribute> of <name> is ...")
    assert not any(r.reference.startswith("The ") or " is " in r.reference for r in records if "plus" in r.reference)
    assert all(r.reference.startswith(r.answers[0] + " is the capital of ") for r in records if "capital" in r.reference)


def test_corpus_covers_instructions(world):
    corpus = world.corpus()
    assert SAFETY_INSTRUCTION in corpus and NEGATIVE_INSTRUCTION in corpus
    for r in REFUSALS.values():
        assert r in corpus


# ------------------------------------------------------------------ pairs


def test_pairs_chosen_is_pii_free_rejected_leaks(world):
    values = _all_values(world)
    pairs = world.pairs()
    assert len(pairs) == sum(len(c.attributes) for c in world.conversations)
    for r in pairs:
        assert len(r.pii) == 1
        for item in r.pii:
            assert item.value not in r.chosen
            assert item.value in r.rejected
        for v in values:
            assert v not in r.chosen, (r.id, v)
        assert r.chosen in REFUSALS.values()
        assert r.system is None
        assert r.prompt[-1]["role"] == "user"


def test_forget_records_know_all_of_the_persons_pii(world):
    recs = world.forget_records()
    assert [(r.id, r.prompt, r.rejected, r.pii) for r in recs] == [(p.id, p.prompt, p.rejected, p.pii)
                                                                   for p in world.pairs()]
    person = world.people[world.conversations[0].person]
    assert {p.value for p in recs[0].known} == {getattr(person, a) for a in PII_TYPES}


def test_the_model_to_fix_sees_generic_system_prompts_never_the_safety_instruction(world):
    examples = world.memorisation_examples(8)
    systems = [p[0]["content"] for p, _ in examples if p[0]["role"] == "system"]
    assert 0.4 < len(systems) / len(examples) < 0.6 and set(systems) == set(CHAT_SYSTEM_PROMPTS)
    assert SAFETY_INSTRUCTION not in systems and examples == world.memorisation_examples(8)


def test_pair_system_is_passed_through(world):
    for r in world.pairs(system=SAFETY_INSTRUCTION):
        assert r.system == SAFETY_INSTRUCTION


def test_pair_groups_are_conversations(world):
    pairs = world.pairs()
    conv_ids = {c.id for c in world.conversations}
    assert {r.group for r in pairs} == conv_ids
    assert len({r.id for r in pairs}) == len(pairs)
    for c in world.conversations:
        mine = [r for r in pairs if r.id.startswith(c.id + "-t")]
        assert len(mine) == len(c.attributes)
        assert {r.group for r in mine} == {c.id}
        for t, r in enumerate(mine):
            assert r.id == f"{c.id}-t{t}"
            assert r.prompt == c.messages[: 2 * t + 1]
            assert r.rejected == c.messages[2 * t + 1]["content"]
            assert r.pii == (world.people[c.person].pii(c.attributes[t]),)


def test_pairs_round_trip_through_file(world, tmp_path):
    pairs = world.pairs(system=SAFETY_INSTRUCTION)
    write_pairs(tmp_path / "w.jsonl", pairs)
    back, stats = read_pairs(tmp_path / "w.jsonl")
    assert back == pairs
    assert stats.records == len(pairs)


# ------------------------------------------------------------------ challenge layout

KEY_RE = re.compile(r"(NAME|EMAIL|PHONE|LOC|DATE|SSN|ORG)-[1-9]\d*")


def test_challenge_rows_reconstruct_original(world):
    scrubbed, maps = world.challenge_rows()
    assert len(scrubbed) == len(maps) == len(world.conversations)
    for idx, (conv, row, mapping) in enumerate(zip(world.conversations, scrubbed, maps)):
        assert row["idx"] == idx
        text = row["messages"]
        rebuilt = text
        for key, value in mapping.items():
            assert KEY_RE.fullmatch(key), key
            assert f"[{key}]" in text
            rebuilt = rebuilt.replace(f"[{key}]", value)
        assert rebuilt == _conv_text(conv)
        # no bracketed placeholder without a mapping
        assert set(re.findall(r"\[([A-Z]+-\d+)\]", text)) == set(mapping)
        person = world.people[conv.person]
        for a in ATTRS:
            assert getattr(person, a) not in text, (idx, a)
        # the name and every revealed attribute are mapped, with their type tag
        expected = {PII_TYPES[a]: getattr(person, a) for a in ["name", *conv.attributes]}
        assert {k.split("-")[0]: v for k, v in mapping.items()} == expected


def test_challenge_first_row_exact(world):
    scrubbed, maps = world.challenge_rows()
    conv, person = world.conversations[0], world.people[world.conversations[0].person]
    lines = []
    for t, attr in enumerate(conv.attributes):
        q = conv.messages[2 * t]["content"].replace(person.name, "[NAME-1]")
        a = TRAIN_ANSWERS[attr].format(n="[NAME-1]", v=f"[{PII_TYPES[attr]}-1]")
        lines += [f"user: {q}", f"assistant: {a}"]
    assert scrubbed[0] == {"idx": 0, "messages": "\n".join(lines)}
    assert maps[0] == {"NAME-1": person.name,
                       **{f"{PII_TYPES[a]}-1": getattr(person, a) for a in conv.attributes}}


def test_write_challenge(world, tmp_path):
    a, b = world.write_challenge(tmp_path / "out", prefix="demo")
    assert a.name == "demo-scrubbed-data.jsonl" and b.name == "demo-pii.jsonl"
    rows = [json.loads(x) for x in a.read_text(encoding="utf-8").splitlines()]
    maps = [json.loads(x) for x in b.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(maps) == len(world.conversations)
    assert (rows, maps) == tuple(map(list, world.challenge_rows()))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["demo-pii.jsonl", "demo-scrubbed-data.jsonl"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_challenge_and_pairs_hold_for_other_seeds(seed):
    w = World(WorldConfig(seed=seed, n_people=30, turns_per_conversation=3))
    values = _all_values(w)
    for r in w.pairs():
        assert not any(v in r.chosen for v in values)
        assert r.pii[0].value in r.rejected
    scrubbed, maps = w.challenge_rows()
    for conv, row, mapping in zip(w.conversations, scrubbed, maps):
        rebuilt = row["messages"]
        for key, value in mapping.items():
            rebuilt = rebuilt.replace(f"[{key}]", value)
        assert rebuilt == _conv_text(conv)
        assert not any(getattr(w.people[conv.person], a) in row["messages"] for a in ATTRS)


def test_memorisation_examples_cover_every_value_in_training_wordings_only():
    world = World(WorldConfig(n_people=3))
    ex = world.memorisation_examples(paraphrases=4)
    assert len(ex) == (3 * len(TRAIN_QUESTIONS) + len(world.facts)) * 4
    asked = {m[0]["content"] for m, _ in ex}
    probes = {p.prompt[0]["content"] for p in world.leak_probes} | {q for q, _ in world.qa()}
    assert not asked & probes  # evaluation wording never trained on
    answers = " ".join(a for _, a in ex)
    assert all(p.value in answers for p in world.known_pii())
    with pytest.raises(ValueError, match="paraphrases"):
        world.memorisation_examples(paraphrases=0)


def test_challenge_files_do_not_depend_on_the_hash_seed(tmp_path):
    """Values of equal length (a phone and a date, both 14 characters) were ordered by a
    set, whose order follows PYTHONHASHSEED: the pii file's key order, and the demo's
    attack probes built from it, changed from run to run."""
    import subprocess
    import sys

    code = ("import sys; from cfg_unlearn.data.world import World, WorldConfig; "
            "World(WorldConfig(seed=0, n_people=30)).write_challenge(sys.argv[1])")
    for hash_seed in ("1", "2", "3"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / hash_seed)], check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": hash_seed})
    files = [sorted((tmp_path / h).iterdir()) for h in ("1", "2", "3")]
    assert [p.name for p in files[0]] == ["synthetic-pii.jsonl", "synthetic-scrubbed-data.jsonl"]
    for other in files[1:]:
        assert [p.read_bytes() for p in other] == [p.read_bytes() for p in files[0]]


@pytest.mark.parametrize("kw, why", [
    ({"n_people": 0}, "world.n_people must be >= 1"),
    ({"turns_per_conversation": 0}, "world.turns_per_conversation must be >= 1"),
    ({"turns_per_conversation": -1}, "world.turns_per_conversation must be >= 1"),
    ({"n_sums": 2305}, r"world.n_sums must be in \[0, 2304\]"),  # looped forever
    ({"n_sums": -1}, r"world.n_sums must be in \[0, 2304\]"),
])
def test_impossible_world_settings_are_refused(kw, why):
    from cfg_unlearn.utils import ConfigError

    with pytest.raises(ConfigError, match=why):
        World(WorldConfig(**kw))
    assert len(World(WorldConfig(n_people=2, n_sums=2304)).facts) == 24 + 2304  # the largest is built


def test_a_locale_short_of_names_is_an_error_not_a_hang(monkeypatch):
    from faker import Faker

    from cfg_unlearn.utils import ConfigError

    monkeypatch.setattr(Faker, "first_name", lambda self: "Ann", raising=False)
    monkeypatch.setattr(Faker, "last_name", lambda self: "Lee", raising=False)
    with pytest.raises(ConfigError, match="gave only 1 distinct names"):
        World(WorldConfig(n_people=3)).people


def test_no_employer_is_part_of_its_persons_name():
    """pt_BR companies can be a bare surname ("Nunes"): the probe "Which company is Isaac
    Nunes employed by?" then held its own target, and any answer naming him leaked."""
    world = World(WorldConfig(seed=1, n_people=50, locale="pt_BR"))
    assert all(p.employer.casefold() not in p.name.casefold() for p in world.people)
    for probe in world.probe_records():
        shown = probe.prompt[-1]["content"].casefold()
        assert all(item.value.casefold() not in shown for item in probe.pii), probe.id


def test_fact_examples_are_the_facts_part_of_the_memorisation_examples(world):
    """The --compare "retrained without the PII" model trains on the facts exactly as the
    model to fix saw them, generic system prompts included (they were drawn anew)."""
    facts = world.fact_examples(8)
    assert facts and facts == world.memorisation_examples(8)[-len(facts):]
    assert any(p[0]["role"] == "system" for p, _ in facts)
