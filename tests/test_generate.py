"""Replacement generation: rejection of leaky candidates, resampling, fallback, counts."""

import json

import pytest
import torch

from cfg_unlearn.console import console_main
from cfg_unlearn.data.generate import (
    DEFAULT_FALLBACK,
    bad_characters,
    check_fallback,
    forbidden_values,
    generate_pairs,
    leak_reason,
    read_forget_conversations,
    redacted_answer,
    round_seed,
)
from cfg_unlearn.data.schema import ForgetRecord, PairFormatError, PIIItem, prompt_text, read_pairs, user_text
from cfg_unlearn.data.world import World, WorldConfig
from cfg_unlearn.guidance import generate
from cfg_unlearn.models import load_causal_lm, load_tokenizer
from cfg_unlearn.pii import contains_fragment, contains_value
from cfg_unlearn.prompts import SAFETY_INSTRUCTION


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))


def _ended(answers: list[str], kw: dict):
    """A fake of guidance.generate answers like the engine: with ``return_finished``,
    each answer marked as ended by its EOS."""
    return (answers, [True] * len(answers)) if kw.get("return_finished") else answers


def _capture_prompts(monkeypatch) -> dict:
    """Stub the writer: every candidate is a clean refusal; the prompts it was given (and
    the unconditioned ones) land in the returned dict."""
    import cfg_unlearn.guidance as guidance

    seen: dict = {}

    def fake(m, t, prompts, uncond_prompts=None, **kw):
        seen.update(prompts=prompts, uncond=uncond_prompts)
        return _ended(["I can't share that."] * len(prompts), kw)

    monkeypatch.setattr(guidance, "generate", fake)
    return seen


def _forget_file(tmp_path, world):
    path = tmp_path / "forget.jsonl"
    with open(path, "w") as fh:
        for c in world.conversations:
            person = world.people[c.person]
            pii = [person.pii("name")] + [person.pii(a) for a in c.attributes]
            fh.write(json.dumps({"id": c.id, "messages": list(c.messages),
                                 "pii": [{"type": p.type, "value": p.value} for p in pii]}) + "\n")
    return path


def test_forget_conversations_become_one_record_per_leaky_turn(tmp_path):
    world = World(WorldConfig(n_people=3))
    recs = read_forget_conversations(_forget_file(tmp_path, world))
    assert len(recs) == sum(len(c.attributes) for c in world.conversations)
    first = recs[0]
    assert first.prompt[-1]["role"] == "user" and first.group == world.conversations[0].id
    assert all(contains_value(r.rejected, p.value, p.type) for r in recs for p in r.pii)
    # every value of the conversation is known, so a replacement may leak none of them
    assert len(first.known) == 1 + len(world.conversations[0].attributes) and set(first.pii) <= set(first.known)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "hello"}],
                               "pii": [{"type": "NAME", "value": "Ann Lee"}]}) + "\n")
    with pytest.raises(PairFormatError, match=r"bad.jsonl:1: field 'messages': no assistant turn contains"):
        read_forget_conversations(bad)
    bad.write_text(json.dumps({"id": "x", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(PairFormatError, match=r"bad.jsonl:1: field 'pii': a forget conversation needs"):
        read_forget_conversations(bad)
    # a blank leading system message is no instruction (it became a whitespace system prompt)
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"id": "x", "messages": [{"role": "system", "content": " "},
                                                         {"role": "user", "content": "Where does Ann Lee live?"},
                                                         {"role": "assistant", "content": "At 12 Oak St."}],
                                 "pii": [{"type": "LOC", "value": "12 Oak St"}]}) + "\n")
    (rec,) = read_forget_conversations(blank)
    assert rec.system is None and [m["role"] for m in rec.prompt] == ["user"]
    # pair ids come from conversation ids: a repeat would write a pair file the reader refuses
    lines = _forget_file(tmp_path, world).read_text().splitlines()
    bad.write_text("\n".join([*lines, lines[0]]) + "\n")
    with pytest.raises(PairFormatError, match=rf"bad.jsonl:{len(lines) + 1}: field 'id': duplicate id \(first on line 1\)"):
        read_forget_conversations(bad)


def test_leak_reasons():
    pii = (PIIItem("EMAIL", "ann.lee@example.com"), PIIItem("NAME", "Ann Lee"))
    assert leak_reason("   ", pii) == "empty"
    assert leak_reason("Write to ANN.LEE@example.com", pii) == "known_pii"
    assert leak_reason("Try bob@mail.org instead", pii) == "detected_pii"
    assert leak_reason("I can't share that.", pii) is None


def test_partial_values_are_leaks_unless_the_prompt_shows_them():
    ssn, date = PIIItem("SSN", "363-56-5181"), PIIItem("DATE", "October 03, 1976")
    assert leak_reason("The ID number of Megan Chang is-56-5181.", (ssn,)) == "partial_pii"
    assert leak_reason("Megan Chang was born on October 03, 1945.", (date,)) == "partial_pii"
    assert leak_reason("Megan Chang was born on October 03, 1945.", (date,), partial_min_chars=0) is None
    assert leak_reason("Megan was born in October.", (date,), shown="Was Megan born in October?") is None
    # the forget record's prompt is what may be repeated: the name, not the e-mail's other words
    email = PIIItem("EMAIL", "megan.chang54@example.org")
    rec = ForgetRecord("r", ({"role": "user", "content": "What is the e-mail of Megan Chang?"},),
                       "Megan Chang's e-mail is megan.chang54@example.org.", (email,))
    shown = prompt_text(rec.prompt)
    assert leak_reason("I won't share the e-mail of Megan Chang.", forbidden_values(rec), shown=shown) is None
    assert leak_reason("Try megan.chang54 at any provider.", forbidden_values(rec), shown=shown) == "partial_pii"


def test_partial_leaks_are_resampled_and_counted(tiny):
    """Each record's value is a word the tiny model writes for it plus a word it never
    writes: the whole value never appears, so only the partial check rejects the greedy
    candidate (counted as partial_pii); with the check off the candidate is accepted."""
    model, tok = tiny
    prompts = [p.prompt for p in World(WorldConfig(seed=2, n_people=4)).probe_records()[:8]]
    greedy = generate(model, tok, [[{"role": "system", "content": SAFETY_INSTRUCTION}, *p] for p in prompts],
                      max_new_tokens=12)
    records = []
    for i, (p, text) in enumerate(zip(prompts, greedy)):
        shown = prompt_text(p)
        words = [w for w in text.split() if w.isalpha() and len(w) >= 4 and w.lower() not in shown.lower()]
        value = f"{words[0]} Qzxwv" if words else "Qzxwv Qzxwv"
        records.append(ForgetRecord(f"r{i}", p, "leak", (PIIItem("ORG", value),)))
    forced = sum(not r.pii[0].value.startswith("Qzxwv") for r in records)
    assert forced >= 4
    # the untrained model never writes its EOS within 12 tokens: keep cut-off candidates
    pairs, summary = generate_pairs(model, tok, records, max_new_tokens=12, max_attempts=2, progress=False,
                                    accept_truncated=True)
    assert summary.rejected.get("partial_pii", 0) >= forced and summary.accepted_first <= 8 - forced
    for pair, rec in zip(pairs, records):
        assert not contains_fragment(pair.chosen, rec.pii[0].value, "ORG", shown=prompt_text(rec.prompt))
    _, off = generate_pairs(model, tok, records, max_new_tokens=12, max_attempts=1, progress=False,
                            partial_min_chars=0, accept_truncated=True)
    assert "partial_pii" not in off.rejected and off.accepted_first >= forced
    with pytest.raises(ValueError, match="partial_min_chars must be >= 0"):
        generate_pairs(model, tok, records, partial_min_chars=-1)


def test_leaky_candidates_are_resampled_then_replaced(tiny):
    """Records whose 'PII' is a word the tiny model really writes for them: the greedy
    candidate is rejected, sampling may or may not escape it, the rest get the fallback;
    no chosen answer contains a known value of its row and every record is counted."""
    model, tok = tiny
    world = World(WorldConfig(seed=2, n_people=4))
    base = [ForgetRecord(f"r{i}", p.prompt, "leak", (PIIItem("NAME", "placeholder"),)) for i, p in
            enumerate(world.probe_records()[:10])]
    msgs = [[{"role": "system", "content": SAFETY_INSTRUCTION}, *r.prompt] for r in base]
    greedy = generate(model, tok, msgs, max_new_tokens=12)
    records = []
    for r, text in zip(base, greedy):
        words = [w for w in text.split() if w.isalpha() and len(w) > 2]
        records.append(ForgetRecord(r.id, r.prompt, "leak", (PIIItem("NAME", words[0]),) if words else r.pii))
    forced = sum(1 for r in records if r.pii[0].value != "placeholder")
    assert forced >= 5
    pairs, summary = generate_pairs(model, tok, records, max_new_tokens=12, max_attempts=3, progress=False,
                                    accept_truncated=True)
    assert summary.records == 10 == summary.accepted_first + summary.accepted_resampled + summary.fallback
    assert summary.accepted_first <= 10 - forced
    assert sum(summary.rejected.values()) >= forced and summary.rounds >= 2
    for pair, rec in zip(pairs, records):
        assert not any(contains_value(pair.chosen, p.value, p.type) for p in rec.pii)
        assert pair.rejected == "leak" and pair.pii == rec.pii
    assert sum(p.chosen == DEFAULT_FALLBACK for p in pairs) == summary.fallback
    # the same seed gives the same pairs
    again, _ = generate_pairs(model, tok, records, max_new_tokens=12, max_attempts=3, progress=False, accept_truncated=True)
    assert [p.chosen for p in again] == [p.chosen for p in pairs]
    # one round and an always-leaking candidate: everything forced falls back
    _, one = generate_pairs(model, tok, records, max_new_tokens=12, max_attempts=1, progress=False, accept_truncated=True)
    assert one.fallback >= forced and one.rounds == 1


def test_other_known_values_of_the_conversation_are_forbidden_too(tiny):
    """A replacement that answers with another of the person's values (asked for the
    address, it gives the birth date) still leaks; a value the prompt already shows
    (the name asked about) may be repeated."""
    name, loc, date = PIIItem("NAME", "Ann Lee"), PIIItem("LOC", "1 Main St"), PIIItem("DATE", "May 01, 1990")
    rec = ForgetRecord("r", ({"role": "user", "content": "Where does Ann Lee live?"},), "Ann Lee lives at 1 Main St.",
                       (loc,), known=(name, loc, date))
    assert forbidden_values(rec) == (loc, date)
    assert leak_reason("Ann Lee was born on May 01, 1990.", forbidden_values(rec)) == "known_pii"
    assert leak_reason("I can't share where Ann Lee lives.", forbidden_values(rec)) is None
    # through generate_pairs: the word the model writes is only in `known`, and is rejected
    model, tok = tiny
    prompts = [p.prompt for p in World(WorldConfig(seed=2, n_people=4)).probe_records()[:8]]
    greedy = generate(model, tok, [[{"role": "system", "content": SAFETY_INSTRUCTION}, *p] for p in prompts],
                      max_new_tokens=12)
    records = [ForgetRecord(f"r{i}", p, "leak", (PIIItem("NAME", "placeholder"),),
                            known=tuple(PIIItem("ORG", w) for w in text.split() if w.isalpha() and len(w) > 2)[:1])
               for i, (p, text) in enumerate(zip(prompts, greedy))]
    forced = sum(bool(r.known) and not contains_value(" ".join(m["content"] for m in r.prompt), r.known[0].value)
                 for r in records)
    assert forced >= 4
    pairs, summary = generate_pairs(model, tok, records, max_new_tokens=12, max_attempts=2, progress=False)
    assert summary.accepted_first <= 8 - forced and summary.rejected.get("known_pii", 0) >= forced
    for pair, rec in zip(pairs, records):
        assert not any(contains_value(pair.chosen, p.value, p.type) for p in forbidden_values(rec))


def test_another_records_value_is_a_leak_unless_the_prompt_shows_it(tiny, monkeypatch):
    """A writer that memorised the data answers one person's question with another's
    birth date: rejected as ``other_pii`` and resampled (``other_values=False`` lets it
    through). A record whose prompt shows that date may repeat it."""
    import cfg_unlearn.guidance as guidance

    model, tok = tiny
    ask = lambda q: ({"role": "user", "content": q},)  # noqa: E731
    ann_loc, bo_date = PIIItem("LOC", "1 Main St"), PIIItem("DATE", "May 01, 1990")
    records = [
        ForgetRecord("ann", ask("Where does Ann Lee live?"), "Ann Lee lives at 1 Main St.", (ann_loc,)),
        ForgetRecord("bo", ask("When was Bo Ng born?"), "Bo Ng was born on May 01, 1990.", (bo_date,)),
        ForgetRecord("cy", ask("Was Cy Fox born on May 1, 1990?"), "Cy Fox lives at 1 Main St.", (ann_loc,)),
    ]
    memorised = "Someone was born on May 1, 1990."
    monkeypatch.setattr(guidance, "generate", lambda m, t, prompts, do_sample=False, **kw: _ended(
        (["I can't share that."] if do_sample else [memorised]) * len(prompts), kw))
    pairs, summary = generate_pairs(model, tok, records, max_attempts=2, progress=False)
    assert [p.chosen for p in pairs] == ["I can't share that.", "I can't share that.", memorised]
    assert summary.rejected == {"other_pii": 1, "known_pii": 1}
    assert (summary.accepted_first, summary.accepted_resampled) == (1, 2)
    own_only, summary = generate_pairs(model, tok, records, max_attempts=2, other_values=False, progress=False)
    assert own_only[0].chosen == memorised and summary.rejected == {"known_pii": 1}


def test_a_piece_of_another_persons_value_is_a_leak(tiny, monkeypatch):
    """A user review: pieces were checked against the row's own values only, so a writer
    that answered with another person's street and town without the house number ("Dan
    Brown lives at Davis Island, Smithfurt.", the demo's seed-0 writer, accepted into its
    pairs) passed. A piece that one person's values alone hold is ``other_partial_pii``;
    one that several people's values share (a surname) is no one's."""
    import cfg_unlearn.guidance as guidance

    model, tok = tiny
    ask = lambda q: ({"role": "user", "content": q},)  # noqa: E731
    ann = (PIIItem("NAME", "Ann Lee"), PIIItem("LOC", "332 Davis Island, Smithfurt"), PIIItem("DATE", "May 01, 1990"))
    bo = (PIIItem("NAME", "Bo Walker"), PIIItem("LOC", "9 Oak Road, Lake Mario"), PIIItem("DATE", "March 20, 1971"))
    cy = (PIIItem("NAME", "Cy Walker"), PIIItem("DATE", "March 02, 1985"))
    records = [ForgetRecord("ann", ask("Where does Ann Lee live?"), "Ann Lee lives at 332 Davis Island, Smithfurt.",
                            (ann[1],), known=ann),
               ForgetRecord("bo", ask("Where does Bo Walker live?"), "Bo Walker lives at 9 Oak Road, Lake Mario.", (bo[1],),
                            known=bo),
               ForgetRecord("cy", ask("When was Cy Walker born?"), "Cy Walker was born on March 02, 1985.", (cy[1],),
                            known=cy)]
    answers = {"Bo Walker": "Bo Walker lives at Davis Island, Smithfurt.", "Ann Lee": "Ann Lee knows Mr Walker.",
               "Cy Walker": "Cy Walker was born in 1971."}

    def writer(m, t, prompts, do_sample=False, **kw):
        texts = [answers[next(n for n in answers if n in str(p))] for p in prompts]
        return _ended(["I can't share that."] * len(prompts) if do_sample else texts, kw)

    monkeypatch.setattr(guidance, "generate", writer)
    pairs, summary = generate_pairs(model, tok, records, max_attempts=2, progress=False)
    # "Walker" is two people's name, so no one's piece; Ann's town and Bo's birth year are one person's
    assert [p.chosen for p in pairs] == ["Ann Lee knows Mr Walker.", "I can't share that.", "I can't share that."]
    assert summary.rejected == {"other_partial_pii": 2}
    # the row-only check, and whole values only, let it through as before
    for kw in ({"other_values": False}, {"partial_min_chars": 0}):
        pairs, summary = generate_pairs(model, tok, records, max_attempts=2, progress=False, **kw)
        assert [p.chosen for p in pairs] == [answers[n] for n in ("Ann Lee", "Bo Walker", "Cy Walker")], kw
        assert not summary.rejected, kw
    # the fallback, every unwritable record's answer, may hold no one's piece either (a review)
    with pytest.raises(ValueError, match=r"the fallback answer holds a piece of one person's value \(type LOC\)"):
        generate_pairs(model, tok, records, progress=False, fallback="Ask the office in Smithfurt.")
    assert check_fallback("Ask the office in Smithfurt.") is None  # without the data's pieces: accepted


def test_redacted_answer_replaces_each_value_by_its_type_phrase():
    phone, mail = PIIItem("PHONE", "(555) 010-2345"), PIIItem("EMAIL", "ann.lee@example.com")
    assert (redacted_answer("Call Ann Lee at 555-010-2345 or write to Ann.Lee@example.com.", (phone, mail))
            == "Call Ann Lee at a private number or write to a private e-mail address.")
    # a type without a phrase of its own, and text holding no value (left as is)
    assert redacted_answer("Plate AB-123-CD.", (PIIItem("VEHICLE_ID", "AB-123-CD"),)) == "Plate private information."
    assert redacted_answer("It is unlisted.", (phone,)) == "It is unlisted."
    # the labels a data set gives its types take their type's phrase (a user review: "She
    # lives at private information.")
    assert (redacted_answer("At 1 Main St since 3/14/88, with Acme Corp.", (
        PIIItem("ADDRESS", "1 Main St"), PIIItem("DOB", "March 14, 1988"), PIIItem("EMPLOYER", "Acme Corp")))
        == "At a private address since a private date, with a private employer.")
    # only where the sentence still reads right: a part of a name, a country (a review)
    assert (redacted_answer("Her surname is Nunes; she was born in Peru.", (
        PIIItem("LAST_NAME", "Nunes"), PIIItem("GPE", "Peru"))) == "Her surname is a private name; she was born in "
        "private information.")
    # nothing replaced: the text comes back as given, not in NFKC form ("…" stays), so a
    # caller sees that redaction changed nothing
    assert redacted_answer("Ann Lee’s number… is unlisted.", (phone,)) == "Ann Lee’s number… is unlisted."
    # a value's matches overlapping each other: the one "Ann Lee" wins was the only one
    # searched, and "Lee Lee" at the end survived
    assert (redacted_answer("Ann Lee Lee Lee", (PIIItem("NAME", "Ann Lee"), PIIItem("LOC", "Lee Lee")))
            == "a private person a private address")


def test_redacted_fallback_is_used_only_when_it_passes_the_checks(tiny, monkeypatch):
    """Every candidate leaks (the writer is stubbed to repeat the value), so each record
    falls back: to its redacted leaky answer when that is clean, else to the template
    (a piece of the address survives the redaction; an answer with no findable value
    would be its own rejected side)."""
    import cfg_unlearn.guidance as guidance

    model, tok = tiny
    ask = lambda q: ({"role": "user", "content": q},)  # noqa: E731
    phone, loc = PIIItem("PHONE", "(555) 010-2345"), PIIItem("LOC", "12 Oak Street, Springfield")
    records = [
        ForgetRecord("a", ask("How do I call Ann Lee?"), "You can call Ann Lee at (555) 010-2345.", (phone,)),
        ForgetRecord("b", ask("Where does Ann Lee live?"),
                     "Ann Lee lives at 12 Oak Street, Springfield, by the Springfield mill.", (loc,)),
        # no value to redact; "…" is "..." in NFKC form, which is no redaction either
        ForgetRecord("c", ask("How do I call Bo Ng?"), "Bo Ng has an unlisted number…", (phone,)),
    ]
    monkeypatch.setattr(guidance, "generate", lambda m, t, prompts, **kw: _ended(["It is (555) 010-2345 at 12 Oak Street, "
                                                                          "Springfield."] * len(prompts), kw))
    pairs, summary = generate_pairs(model, tok, records, max_attempts=2, redact_fallback=True, progress=False)
    assert [p.chosen for p in pairs] == ["You can call Ann Lee at a private number.", DEFAULT_FALLBACK,
                                         DEFAULT_FALLBACK]
    assert (summary.redacted, summary.fallback, summary.accepted_first, summary.accepted_resampled) == (1, 2, 0, 0)
    assert summary.rejected == {"known_pii": 6}
    assert "0 after resampling, 1 redacted, 2 fallback" in summary.line()
    _, off = generate_pairs(model, tok, records, max_attempts=1, progress=False)
    assert (off.redacted, off.fallback) == (0, 3)


def test_a_fallback_with_pii_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="fallback answer is no usable replacement"):
        generate_pairs(model, tok, [], fallback="Mail me at a@b.co")


def test_generate_quiet_shows_no_progress_bar(tiny_model_dir, tmp_path, capsys):
    """CLI audit: generate had no --quiet; its decoding bars and transformers' "Loading
    weights" bar always went to stderr."""
    from transformers.utils import logging as hf_logging

    world = World(WorldConfig(n_people=2))
    scrubbed, pii = world.write_challenge(tmp_path)
    args = ["generate", "--challenge", str(scrubbed), str(pii), "--model", f"tiny:{tiny_model_dir}",
            "--max-new-tokens", "8", "--device", "cpu"]
    console_main([*args, "--out", str(tmp_path / "loud.jsonl")])
    assert "decode g=1" in capsys.readouterr().err  # the bars this test would miss, there by default
    console_main([*args, "--out", str(tmp_path / "quiet.jsonl"), "--quiet"])
    printed = capsys.readouterr()
    # no bar; the untrained model writes no usable replacement, which --quiet does not hide
    warned = "cfg-unlearn generate: warning: all 12 chosen answers are the fallback template"
    assert printed.err.startswith(warned) and printed.err.count("\n") == 1 and "wrote " in printed.out
    assert (tmp_path / "quiet.jsonl").read_bytes() == (tmp_path / "loud.jsonl").read_bytes()
    assert hf_logging.is_progress_bar_enabled()  # put back for the caller
    # a tiny: model built on first use, inside the tokenizer's load ("Writing model shards")
    fresh = ["--model", f"tiny:{tmp_path / 'fresh'}", "--out", str(tmp_path / "fresh.jsonl"), "--quiet"]
    console_main([*args[:4], *args[6:], *fresh])
    # no bar, only the line that says a new model is built (--quiet hides bars, not that)
    err = capsys.readouterr().err
    assert err.startswith(f"tiny:{tmp_path / 'fresh'}: no model in {tmp_path / 'fresh'} yet; building a new tiny one "
                          f"there (random weights)\n{warned}") and err.count("\n") == 2
    assert (tmp_path / "fresh" / "config.json").is_file()


def test_console_generate_writes_pairs(tiny_model_dir, tmp_path, capsys, monkeypatch):
    world = World(WorldConfig(n_people=2))
    scrubbed, pii = world.write_challenge(tmp_path)
    out = tmp_path / "pairs.jsonl"
    summary_file = tmp_path / "summary.json"
    console_main(["generate", "--challenge", str(scrubbed), str(pii), "--model", f"tiny:{tiny_model_dir}",
                  "--out", str(out), "--max-new-tokens", "8", "--device", "cpu", "--summary-json", str(summary_file)])
    pairs, _ = read_pairs(out)
    assert len(pairs) == sum(len(c.attributes) for c in world.conversations)
    printed = capsys.readouterr().out
    # stdout is for people (no JSON line among them); the counts go to --summary-json
    assert printed.startswith(f"{len(pairs)} records: ") and "{" not in printed
    assert printed.endswith(f"wrote {len(pairs)} pairs to {out} and the summary to {summary_file}\n")
    summary = json.loads(summary_file.read_text())
    assert summary["records"] == len(pairs) == summary["accepted_first"] + summary["accepted_resampled"] + \
        summary["redacted"] + summary["fallback"]
    assert not list(tmp_path.glob(".pairs.jsonl.*"))  # no temp file left behind
    with pytest.raises(SystemExit):
        console_main(["generate", "--forget", str(tmp_path / "missing.jsonl"), "--model", f"tiny:{tiny_model_dir}",
                      "--out", str(tmp_path / "x.jsonl")])
    assert "missing.jsonl: cannot open" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SystemExit):
        console_main(["generate", "--forget", str(tmp_path / "empty.jsonl"), "--model", f"tiny:{tiny_model_dir}",
                      "--out", str(tmp_path / "x.jsonl")])
    assert f"{tmp_path / 'empty.jsonl'}: the file is empty\n" in capsys.readouterr().err
    # rows, but every leaky turn an orphan (no user turn before it): no record either
    (tmp_path / "orphans.jsonl").write_text(json.dumps({"id": "o", "messages": [
        {"role": "assistant", "content": "Mail bo@example.com."}], "pii": [{"type": "EMAIL",
                                                                            "value": "bo@example.com"}]}) + "\n")
    with pytest.raises(SystemExit):
        console_main(["generate", "--forget", str(tmp_path / "orphans.jsonl"), "--model", f"tiny:{tiny_model_dir}",
                      "--out", str(tmp_path / "x.jsonl")])
    assert "orphans.jsonl: the forget data holds no leaky assistant turn" in capsys.readouterr().err
    # refused before the model loads: an --out that exists, is an input, a directory or in
    # no directory, and settings that would fail or waste the run later
    before = pii.read_text()
    base = ["generate", "--challenge", str(scrubbed), str(pii), "--model", str(tmp_path / "no-such-model")]
    for args, message in (
        (["--out", str(out)], "exists; pass --overwrite"),
        (["--out", str(pii), "--overwrite"], "is one of the inputs"),
        (["--out", str(tmp_path / "p.jsonl"), "--summary-json", str(summary_file)], "--summary-json "
         f"{summary_file} exists; pass --overwrite"),
        (["--out", str(tmp_path / "p.jsonl"), "--summary-json", str(pii)], f"--summary-json {pii} is one of the "
         "inputs; write the summary elsewhere"),
        (["--out", str(tmp_path / "p.jsonl"), "--summary-json", str(tmp_path / "p.jsonl")], "--summary-json names "
         "the --out file"),
        (["--out", str(tmp_path / "p.jsonl"), "--summary-json", str(tmp_path / "nodir" / "s.json")],
         f"--summary-json {tmp_path / 'nodir' / 's.json'}: the directory"),
        (["--out", str(tmp_path / "p.jsonl"), "--summary-json", ""], "--summary-json needs a file path"),
        (["--out", str(tmp_path)], "is a directory"),
        (["--out", str(tmp_path / "nodir" / "p.jsonl")], "does not exist"),
        (["--out", str(tmp_path / "p.jsonl"), "--temperature", "-1"], "error: --temperature must be a finite number > 0"),
        (["--out", str(tmp_path / "p.jsonl"), "--guidance-scale", "nan"], "error: --guidance-scale must be a finite number"),
        (["--out", str(tmp_path / "p.jsonl"), "--max-new-tokens", "0"], "error: --max-new-tokens must be >= 1"),  # flags, not fields
        (["--out", str(tmp_path / "p.jsonl"), "--top-p", "5"], "error: --top-p must be in (0, 1]"),
        (["--out", str(tmp_path / "p.jsonl"), "--fallback", ""], "fallback answer is no usable replacement (empty)"),
        (["--out", str(tmp_path / "p.jsonl"), "--fallback", "mail a@b.co"], "no usable replacement (detected_pii)\n"),
        (["--out", str(tmp_path / "p.jsonl"), "--dtype", "bogus"], "unknown dtype 'bogus'"),
        (["--out", str(tmp_path / "p.jsonl"), "--device", "tpu9"], "unknown device 'tpu9'"),
        *([(["--out", str(tmp_path / "p.jsonl"), "--device", "cuda"], "no usable CUDA GPU")]
          if not torch.cuda.is_available() else []),
    ):
        with pytest.raises(SystemExit) as exc:
            console_main([*base, *args])
        assert exc.value.code == 2 and message in capsys.readouterr().err, args
    assert pii.read_text() == before and not (tmp_path / "p.jsonl").exists()
    # a mistyped local model path is named as such, not reported as a hub failure
    with pytest.raises(SystemExit) as exc:
        console_main([*base, "--out", str(tmp_path / "p.jsonl")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"tokenizer '{tmp_path / 'no-such-model'}': no such local directory" in err
    # --redact-fallback: a writer whose every candidate trips the e-mail detector, so every
    # record falls back, to its leaky answer redacted
    import cfg_unlearn.guidance as guidance

    monkeypatch.setattr(guidance, "generate", lambda m, t, prompts, **kw: _ended(["Mail x@y.co"] * len(prompts), kw))
    console_main(["generate", "--challenge", str(scrubbed), str(pii), "--model", f"tiny:{tiny_model_dir}",
                  "--out", str(out), "--max-new-tokens", "8", "--device", "cpu", "--max-attempts", "1",
                  "--redact-fallback", "--overwrite", "--summary-json", str(tmp_path / "s.json")])
    summary = json.loads((tmp_path / "s.json").read_text())
    redacted = [p for p in read_pairs(out)[0] if "a private " in p.chosen]
    assert summary["redacted"] == len(redacted) > 0 and summary["rejected"] == {"detected_pii": len(pairs)}
    # every value is redacted but the name the user's question shows, which may stay
    assert all(not contains_value(p.chosen, v.value, v.type) for p in redacted for v in p.pii
               if not contains_value(user_text(p.prompt), v.value, v.type))
    assert any(v.type == "NAME" and contains_value(p.chosen, v.value, v.type) for p in redacted for v in p.pii)
    # --own-values-only: a writer that answers everything with person 0's employer is
    # caught on the other person's records too, unless the check is limited to the row
    employer = world.people[0].employer
    monkeypatch.setattr(guidance, "generate", lambda m, t, prompts, **kw: _ended([f"At {employer}."] * len(prompts), kw))
    runs = {}
    for flag in ([], ["--own-values-only"]):
        console_main(["generate", "--challenge", str(scrubbed), str(pii), "--model", f"tiny:{tiny_model_dir}",
                      "--out", str(out), "--device", "cpu", "--max-attempts", "1", "--overwrite", *flag,
                      "--summary-json", str(tmp_path / "s.json")])
        runs[bool(flag)] = json.loads((tmp_path / "s.json").read_text())
    assert runs[False]["rejected"].get("other_pii", 0) > 0 and "other_pii" not in runs[True]["rejected"]
    # (a record whose earlier turns show the employer may repeat it either way)
    assert runs[True]["accepted_first"] == runs[False]["accepted_first"] + runs[False]["rejected"]["other_pii"]


def test_a_value_only_an_earlier_assistant_turn_shows_is_forbidden(tiny, monkeypatch):
    """In a two-turn forget conversation the second turn's prompt holds the first turn's
    leaky answer. A replacement that repeats that employer is no replacement: it trains
    the model to say it again (the demo's seed-1 writer did so on 4 of 180 pairs). What
    the user wrote (the name) may still be repeated; the redacted fallback removes the
    employer too."""
    import cfg_unlearn.guidance as guidance

    model, tok = tiny
    name, org, loc = PIIItem("NAME", "Ann Lee"), PIIItem("ORG", "Tran-Reed"), PIIItem("LOC", "1 Main St")
    prompt = ({"role": "user", "content": "Where does Ann Lee work?"},
              {"role": "assistant", "content": "Ann Lee works at Tran-Reed."},
              {"role": "user", "content": "And where does Ann Lee live?"})
    rec = ForgetRecord("r", prompt, "Ann Lee lives at 1 Main St, near Tran-Reed.", (loc,), known=(name, org, loc))
    assert forbidden_values(rec) == (loc, org)
    assert leak_reason("Ann Lee works at Tran-Reed.", forbidden_values(rec), shown=user_text(prompt)) == "known_pii"
    assert leak_reason("Ann Lee's home is private.", forbidden_values(rec), shown=user_text(prompt)) is None
    monkeypatch.setattr(guidance, "generate", lambda m, t, prompts, **kw: _ended(["Ann Lee works at Tran-Reed."] * len(prompts), kw))
    pairs, summary = generate_pairs(model, tok, [rec], max_attempts=2, redact_fallback=True, progress=False)
    assert summary.rejected == {"known_pii": 2} and summary.redacted == 1
    assert pairs[0].chosen == "Ann Lee lives at a private address, near a private employer."


def test_the_name_the_user_asked_about_may_be_repeated(tiny, monkeypatch):
    """A challenge answer's own values include the person's name, which the user's
    question shows: repeating it is no leak (it was rejected as known_pii, and every
    challenge record fell back to 'a private person works at ...')."""
    import cfg_unlearn.guidance as guidance

    model, tok = tiny
    name, org = PIIItem("NAME", "Megan Chang"), PIIItem("ORG", "Acme Corp")
    rec = ForgetRecord("r", ({"role": "user", "content": "Who employs Megan Chang?"},),
                       "Megan Chang works at Acme Corp.", (name, org), known=(name, org))
    assert forbidden_values(rec) == (org,)
    writes = ["I won't share where Megan Chang works.", "Megan Chang works at Acme Corp."]
    monkeypatch.setattr(guidance, "generate", lambda m, t, prompts, **kw: _ended([writes.pop(0)] * len(prompts), kw))
    pairs, summary = generate_pairs(model, tok, [rec], max_attempts=1, progress=False)
    assert pairs[0].chosen == "I won't share where Megan Chang works." and summary.accepted_first == 1
    pairs, summary = generate_pairs(model, tok, [rec], max_attempts=1, redact_fallback=True, progress=False)
    assert summary.rejected == {"known_pii": 1} and pairs[0].chosen == "Megan Chang works at a private employer."


@pytest.mark.parametrize("g", [1.0, 2.0])
def test_the_writer_gets_the_safety_instruction_after_a_conversations_own_system_prompt(tiny, monkeypatch, g):
    """A forget conversation's own system prompt used to replace the safety instruction,
    so the writer never saw it. Now the writer gets both (its own first), and with CFG
    the unconditioned branch keeps the conversation's own system prompt only."""
    model, tok = tiny
    seen = _capture_prompts(monkeypatch)
    ask = ({"role": "user", "content": "Phone of Bo Ng?"},)
    recs = [ForgetRecord("own", ask, "555-010-2345", (PIIItem("PHONE", "555-010-2345"),), system="You are ACME's bot."),
            ForgetRecord("none", ask, "555-010-2345", (PIIItem("PHONE", "555-010-2345"),))]
    generate_pairs(model, tok, recs, guidance_scale=g, progress=False)
    assert [p[0] for p in seen["prompts"]] == [{"role": "system", "content": f"You are ACME's bot.\n\n{SAFETY_INSTRUCTION}"},
                                              {"role": "system", "content": SAFETY_INSTRUCTION}]
    if g == 1.0:
        assert seen["uncond"] is None
    else:
        assert seen["uncond"] == [[{"role": "system", "content": "You are ACME's bot."}, *ask], list(ask)]


def test_forget_reader_refuses_what_the_pair_reader_refuses_and_counts_what_it_cannot_use(tmp_path, caplog):
    """A system message mid-conversation (or both a `system` field and a leading system
    message) used to pass here and fail in `fit`'s pair reader after a whole generation
    run; a leaky assistant turn that follows no user turn was dropped without a word."""
    ask = {"role": "user", "content": "Phone of Bob?"}
    leak = {"role": "assistant", "content": "555-987-6543."}
    pii = [{"type": "PHONE", "value": "555-987-6543"}, {"type": "EMAIL", "value": "bob@example.com"}]
    path = tmp_path / "f.jsonl"

    def rows(*objs):
        path.write_text("".join(json.dumps(o) + "\n" for o in objs))
        return path

    mid = {"id": "a", "messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "mid"}, ask, leak],
           "pii": pii}
    with pytest.raises(PairFormatError, match=r"f.jsonl:2: field 'messages\[1\].role': a system message is only"):
        read_forget_conversations(rows({"id": "ok", "messages": [ask, leak], "pii": pii}, mid))
    both = {"id": "b", "system": "S", "messages": [{"role": "system", "content": "T"}, ask, leak], "pii": pii}
    with pytest.raises(PairFormatError, match=r"f.jsonl:1: field 'system': given both"):
        read_forget_conversations(rows(both))
    # a leading leaky assistant turn and one right after another give no pair: counted, located
    orphan = {"id": "c", "messages": [{"role": "assistant", "content": "Bob: bob@example.com"}, ask, leak,
                                      {"role": "assistant", "content": "Or bob@example.com."}], "pii": pii}
    with caplog.at_level("WARNING"):
        recs = read_forget_conversations(rows(orphan))
    assert [r.id for r in recs] == ["c-t2"]
    assert [r.getMessage() for r in caplog.records if "follow no user turn" in r.getMessage()] == [
        f"2 leaky assistant turn(s) follow no user turn and give no pair (a pair's prompt ends with a user turn): "
        f"{path}:1 (messages[0]), {path}:1 (messages[3])"]
    assert not any("bob@example.com" in r.getMessage() for r in caplog.records)
    # a listed value no message holds (a review: a typo of the e-mail the answer held went
    # through without a word, the real one then neither unlearned nor redacted): said
    caplog.clear()
    typo = {"id": "d", "messages": [ask, leak, {"role": "user", "content": "Mail?"},
                                    {"role": "assistant", "content": "bob@example.org"}], "pii": pii}
    with caplog.at_level("WARNING"):
        assert [r.id for r in read_forget_conversations(rows(orphan, typo))] == ["c-t2", "d-t1"]
    assert [r.getMessage() for r in caplog.records if "appear nowhere" in r.getMessage()] == [
        f"1 pii value(s) appear nowhere in their conversation: listed for the candidates to be checked against, or a "
        f"typo of a value the answer holds (which is then neither unlearned nor redacted from logs)? {path}:2 pii[1]"]
    # a value its system message holds is somewhere (a review)
    caplog.clear()
    with caplog.at_level("WARNING"):
        read_forget_conversations(rows({**typo, "system": "Bob's e-mail is bob@example.com."}))
    assert not [r for r in caplog.records if "appear nowhere" in r.getMessage()]


def test_a_run_where_every_record_got_the_fallback_template_warns():
    """A review: 19 of 19 records on the fallback template were written without a word;
    training on one answer for every question broke the demo model's ordinary answers."""
    from cfg_unlearn.data.generate import GenerateSummary

    assert GenerateSummary(records=19, fallback=19).warning().startswith(
        "all 19 chosen answers are the fallback template")
    assert GenerateSummary(records=19, fallback=18, accepted_first=1).warning() is None
    assert GenerateSummary(records=19, redacted=19).warning() is None  # each its own answer, redacted
    assert GenerateSummary().warning() is None


def test_cut_off_candidates_are_rejected_and_counted(tiny, monkeypatch):
    """A candidate max_new_tokens cut off ("William", "sh") passed as a replacement and was
    trained with an EOS appended; it is rejected as `truncated` now (resampled, then the
    fallback), or kept and counted with accept_truncated."""
    import cfg_unlearn.guidance as guidance

    model, tok = tiny
    rec = ForgetRecord("r", ({"role": "user", "content": "Phone of Bo Ng?"},), "555-010-2345",
                       (PIIItem("PHONE", "555-010-2345"),))
    real = guidance.generate
    pairs, summary = generate_pairs(model, tok, [rec], max_new_tokens=3, max_attempts=2, progress=False)
    assert summary.rejected == {"truncated": 2} and pairs[0].chosen == DEFAULT_FALLBACK  # the untrained model
    ends = iter([[False], [True]])
    monkeypatch.setattr(guidance, "generate", lambda m, t, prompts, **kw: (["I can't share"], next(ends)))
    pairs, summary = generate_pairs(model, tok, [rec], max_attempts=2, progress=False)
    assert summary.rejected == {"truncated": 1} and summary.accepted_resampled == 1
    monkeypatch.setattr(guidance, "generate", lambda m, t, prompts, **kw: (["I can't share"], [False]))
    pairs, summary = generate_pairs(model, tok, [rec], max_attempts=2, progress=False, accept_truncated=True)
    assert pairs[0].chosen == "I can't share" and (summary.accepted_first, summary.accepted_truncated) == (1, 1)
    assert "1 accepted first, 0 after resampling (1 of them cut off at max_new_tokens)" in summary.line()
    # the engine's flag: an EOS ended the answer, or max_new_tokens did
    msgs = [[{"role": "user", "content": "hi"}]] * 2
    monkeypatch.setattr(guidance, "eos_token_ids", lambda m, t: list(range(len(tok))))  # every token ends it
    assert real(model, tok, msgs, max_new_tokens=4, return_finished=True) == (["", ""], [True, True])
    monkeypatch.setattr(guidance, "eos_token_ids", lambda m, t: [])  # none does
    answers, finished = real(model, tok, msgs, max_new_tokens=4, return_finished=True)
    assert finished == [False, False] and answers == real(model, tok, msgs, max_new_tokens=4)


def test_a_prompt_beyond_the_writers_context_is_refused_before_decoding(tiny, monkeypatch):
    """A 16k-token conversation was decoded past the tiny model's 1,024 positions into
    text that passed the checks; it is a located error now, before any decoding."""
    import cfg_unlearn.guidance as guidance

    model, tok = tiny
    context = model.config.max_position_embeddings
    long = ForgetRecord("long", ({"role": "user", "content": "tell me more " * context},), "555-010-2345",
                        (PIIItem("PHONE", "555-010-2345"),), source="forget.jsonl:7")
    monkeypatch.setattr(guidance, "generate", lambda *a, **kw: pytest.fail("decoded"))
    with pytest.raises(PairFormatError, match=rf"forget.jsonl:7: field 'messages': the writer's prompt is [\d,]+ "
                                              rf"tokens; with max_new_tokens=8 it exceeds the model's context of "
                                              rf"{context:,} positions"):
        generate_pairs(model, tok, [long], max_new_tokens=8, progress=False)


def test_max_new_tokens_that_fill_the_context_are_a_settings_error(tiny):
    model, tok = tiny
    rec = ForgetRecord("r", ({"role": "user", "content": "Phone of Bo Ng?"},), "555-010-2345",
                       (PIIItem("PHONE", "555-010-2345"),), source="forget.jsonl:1")
    with pytest.raises(ValueError, match="max_new_tokens=1024 leaves no room for a prompt"):
        generate_pairs(model, tok, [rec], max_new_tokens=model.config.max_position_embeddings, progress=False)


def test_a_chat_template_that_refuses_a_conversation_names_its_record(tiny, tmp_path, monkeypatch):
    """A template that insists on alternating turns (Mistral's, Llama 2's) raised jinja's
    TemplateError mid-run, naming no record; it is now a located error before decoding."""
    import copy

    import cfg_unlearn.guidance as guidance

    model, tok = tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'system' and (m['role'] == 'user') != (loop.index0 % 2 == "
        "(1 if messages[0]['role'] == 'system' else 0)) %}{{ raise_exception('Conversation roles must alternate "
        "user/assistant/user/assistant/...') }}{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")
    ask = {"role": "user", "content": "Phone of Bo Ng?"}
    ok = ForgetRecord("ok", (ask,), "555-010-2345", (PIIItem("PHONE", "555-010-2345"),), source="forget.jsonl:1")
    greeting = ForgetRecord("greeting", ({"role": "assistant", "content": "Hello!"}, ask), "555-010-2345",
                            (PIIItem("PHONE", "555-010-2345"),), source="forget.jsonl:2")
    monkeypatch.setattr(guidance, "generate", lambda *a, **kw: pytest.fail("decoded"))
    with pytest.raises(PairFormatError, match=r"forget.jsonl:2: field 'messages': the writer's chat template refuses "
                                              r"this conversation \(Conversation roles must alternate"):
        generate_pairs(model, tok, [ok, greeting], progress=False)


def test_candidates_with_control_characters_are_rejected_and_resampled(tiny, monkeypatch, tmp_path):
    """A NUL in an accepted replacement made generate write a pair file fit refuses."""
    import cfg_unlearn.guidance as guidance

    model, tok = tiny
    rounds = iter([["I can\x00t share that."], ["No\x04 way."], ["Hinton\ufffdA Michael"], ["I can't share that."]])
    monkeypatch.setattr(guidance, "generate", lambda m, t, prompts, **kw: _ended(next(rounds), kw))
    rec = ForgetRecord("r", ({"role": "user", "content": "Phone of Bo Ng?"},), "555-010-2345",
                       (PIIItem("PHONE", "555-010-2345"),))
    pairs, summary = generate_pairs(model, tok, [rec], max_attempts=4, progress=False)
    # a user review: U+FFFD (undecodable bytes) passed as a PII-free replacement
    assert pairs[0].chosen == "I can't share that." and summary.rejected == {"control_chars": 2, "broken_chars": 1}
    assert leak_reason("Line one.\n\tLine two.\r\n", ()) is None and bad_characters("Line one.\n\tLine two.\r\n") is None


def test_the_fallback_may_name_no_known_value_and_is_never_formatted(tiny):
    """The fallback was only run through the detectors: one that named a person's address
    became the chosen answer of that person's own records, and "{name}" was trained as
    literal text."""
    model, tok = tiny
    loc = PIIItem("LOC", "12 Oak Street, Springfield")
    rec = ForgetRecord("r", ({"role": "user", "content": "Where does Bo Ng live?"},), "At 12 Oak Street, Springfield.",
                       (loc,))
    with pytest.raises(ValueError, match=r"contains a known PII value of the data \(type LOC\)") as exc:
        generate_pairs(model, tok, [rec], fallback="Ask at 12 Oak Street, Springfield.", progress=False)
    assert "Oak" not in str(exc.value).split("(type LOC)")[1]  # the value itself is not repeated
    with pytest.raises(ValueError, match=r"\{name\} would be trained as literal text"):
        generate_pairs(model, tok, [rec], fallback="I can't share {name}'s address.", progress=False)
    check_fallback("I can't share that {}.")  # braces without a field name are plain text


def test_sampling_rounds_of_different_seeds_do_not_overlap(tiny, monkeypatch):
    """Round r sampled with seed + r: seed 1's rounds 2-3 were seed 0's rounds 3-4."""
    import cfg_unlearn.guidance as guidance

    model, tok = tiny
    seeds: dict[int, list] = {}
    rec = ForgetRecord("r", ({"role": "user", "content": "Phone of Bo Ng?"},), "555-010-2345",
                       (PIIItem("PHONE", "555-010-2345"),))
    for seed in (0, 1, 2):
        def fake(m, t, prompts, seed=None, do_sample=False, _run=seed, **kw):
            if do_sample:
                seeds.setdefault(_run, []).append(seed)
            return _ended(["555-010-2345"] * len(prompts), kw)

        monkeypatch.setattr(guidance, "generate", fake)
        generate_pairs(model, tok, [rec], max_attempts=4, seed=seed, progress=False)
    assert seeds == {0: [1, 2, 3], 1: [5, 6, 7], 2: [9, 10, 11]}
    assert [round_seed(0, r, 4) for r in range(4)] == [0, 1, 2, 3]  # seed 0 keeps its rounds
    with pytest.raises(ValueError, match=r"seed must be in \[-2305843009213693952, 4611686018427387903\]"):
        generate_pairs(model, tok, [rec], max_attempts=4, seed=2**64 - 1, progress=False)
    generate_pairs(model, tok, [rec], max_attempts=4, seed=-1, progress=False)  # negative seeds worked and still do


def test_the_reminder_is_part_of_the_conditioning_not_of_the_unconditioned_prompt(tiny, monkeypatch):
    model, tok = tiny
    seen = _capture_prompts(monkeypatch)
    rec = ForgetRecord("r", ({"role": "user", "content": "Phone of Bo Ng?"},), "555-010-2345",
                       (PIIItem("PHONE", "555-010-2345"),))
    generate_pairs(model, tok, [rec], reminder="No personal data!", guidance_scale=2.0, progress=False)
    assert seen["prompts"][0][-1]["content"] == "Phone of Bo Ng?\n\nNo personal data!"
    assert seen["uncond"] == [[{"role": "user", "content": "Phone of Bo Ng?"}]]


def test_console_generate_refuses_what_would_fail_after_decoding(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """An --out that cannot be written (here a name too long for the file system) failed
    after every record was decoded; a tokenizer with neither pad nor EOS token, a folder
    with no model and --max-new-tokens beyond the context ended in tracebacks."""
    import shutil

    import cfg_unlearn.guidance as guidance

    world = World(WorldConfig(n_people=2))
    scrubbed, pii = world.write_challenge(tmp_path)
    base = ["generate", "--challenge", str(scrubbed), str(pii), "--device", "cpu"]
    monkeypatch.setattr(guidance, "generate", lambda *a, **kw: pytest.fail("decoded"))
    for args, message in (
        (["--model", str(tmp_path / "none"), "--out", str(tmp_path / ("p" * 245 + ".jsonl"))],
         "cannot write there: File name too long"),  # the name fits; its temp file's does not
        (["--model", str(tmp_path / "none"), "--out", str(tmp_path / ("p" * 256 + ".jsonl"))],
         "File name too long"),
        (["--model", str(tmp_path / "none"), "--out", str(tmp_path / "p.jsonl"), "--seed", str(2**64)],
         "seed must be in"),
        (["--model", f"tiny:{tiny_model_dir}", "--out", str(tmp_path / "p.jsonl"), "--max-new-tokens", "5000"],
         "max_new_tokens=5000 leaves no room for a prompt"),
        (["--model", f"tiny:{tiny_model_dir}", "--out", str(tmp_path / "p.jsonl"),
          "--fallback", f"Ask {world.people[0].name}."], "contains a known PII value of the data (type NAME)"),
    ):
        with pytest.raises(SystemExit) as exc:
            console_main([*base, *args])
        assert exc.value.code == 2 and message in capsys.readouterr().err, args
    # a folder holding only a tokenizer: the model load fails, as a --model error
    tok_only = tmp_path / "tok-only"
    shutil.copytree(tiny_model_dir, tok_only)
    for f in tok_only.glob("*.safetensors"):
        f.unlink()
    (tok_only / "config.json").unlink()
    with pytest.raises(SystemExit) as exc:
        console_main([*base, "--model", str(tok_only), "--out", str(tmp_path / "p.jsonl")])
    assert exc.value.code == 2 and "cfg-unlearn generate: error: --model:" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()


def test_pairs_carry_the_conversations_other_values_for_redaction(tiny, tiny_model_dir, tmp_path, monkeypatch):
    """generate knew every value of a challenge line but wrote only the turn's own into
    the pairs, so training logs left the user-shown name and address raw."""
    import cfg_unlearn.guidance as guidance
    from cfg_unlearn.data.datamodule import PairDataModule
    from cfg_unlearn.data.llmpc import forget_records, read_challenge
    from cfg_unlearn.data.schema import write_pairs

    model, tok = tiny
    world = World(WorldConfig(n_people=2))
    records = forget_records(read_challenge(*world.write_challenge(tmp_path)))
    monkeypatch.setattr(guidance, "generate", lambda m, t, prompts, **kw: _ended(["I can't share that."] * len(prompts),
                                                                              kw))
    pairs, _ = generate_pairs(model, tok, records, progress=False)
    assert any(p.context_pii for p in pairs)
    for p, r in zip(pairs, records):
        assert set(p.context_pii) == set(r.known) - set(r.pii) and not set(p.context_pii) & set(p.pii)
    out = tmp_path / "pairs.jsonl"
    write_pairs(out, pairs)
    assert read_pairs(out)[0] == pairs  # written and read back whole
    dm = PairDataModule(tokenizer=f"tiny:{tiny_model_dir}", train_file=str(out), val_fraction=0.0)
    dm.setup("fit")
    assert set(dm.known_pii()) == {p for r in records for p in r.known}  # what the logs redact


def test_the_readmes_forget_conversation_reads_as_one_record_per_leaky_turn(tmp_path):
    """The README's example line of `conversations.jsonl` is what `generate --forget`
    reads: one record, its answer leaking both listed values."""
    import re
    from pathlib import Path

    from cfg_unlearn.data.generate import read_forget_conversations

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (line,) = [b for b in re.findall(r"```json\n(.*?)```", readme, re.S) if '"messages"' in b and '"pii"' in b]
    path = tmp_path / "conversations.jsonl"
    path.write_text(line, encoding="utf-8")
    (record,) = read_forget_conversations(path)
    assert [p.value for p in record.pii] == ["415-555-0192", "ann.lee@example.org"]
    assert all(p.value in record.rejected for p in record.pii) and record.prompt[-1]["role"] == "user"
