"""The pair JSONL reader/writer: our format, TRL-style rows, and every malformed input
raising PairFormatError with file:line and field."""

from __future__ import annotations

import json
import logging
import re
import os
from pathlib import Path

import pytest

from cfg_unlearn.data.schema import (
    DEFAULT_MAX_CHARS,
    PairFormatError,
    PairRecord,
    PIIItem,
    ReadStats,
    read_pairs,
    record_from_dict,
    write_pairs,
)

GOOD = {"id": "p-1", "prompt": "What is the email of Ann Lee?", "chosen": "I can't share that.",
        "rejected": "It is ann@lee.org."}


def _write_lines(path: Path, lines: list) -> Path:
    """Each item: dict/list -> JSON, str -> written verbatim, bytes -> raw bytes."""
    chunks = []
    for line in lines:
        if isinstance(line, bytes):
            chunks.append(line)
        elif isinstance(line, str):
            chunks.append(line.encode("utf-8"))
        else:
            chunks.append(json.dumps(line).encode("utf-8"))
    path.write_bytes(b"".join(c + b"\n" for c in chunks))
    return path


def _row(**overrides):
    row = dict(GOOD)
    for k, v in overrides.items():
        if v is _DROP:
            row.pop(k, None)
        else:
            row[k] = v
    return row


_DROP = object()


def _read_error(path: Path, **kw) -> PairFormatError:
    with pytest.raises(Exception) as info:
        read_pairs(path, **kw)
    # exactly PairFormatError, never another type (e.g. a bare ValueError / KeyError)
    assert type(info.value) is PairFormatError, f"{type(info.value).__name__}: {info.value}"
    return info.value


# ------------------------------------------------------------------ round trip


def _records() -> list[PairRecord]:
    return [
        PairRecord(
            id="a",
            prompt=({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Mail of Bo Li?"}),
            chosen="I can't share it.",
            rejected="bo@li.cn — ünïcode ✓",
            system="Avoid using any personal data in the answers!",
            pii=(PIIItem("EMAIL", "bo@li.cn"), PIIItem("NAME", "Bo Li")),
            group="conv-1",
        ),
        PairRecord(id="b", prompt=({"role": "user", "content": "q\nwith newline"},), chosen="c", rejected="r"),
        PairRecord(id="c", prompt=({"role": "user", "content": "q2"},), chosen="c2", rejected="r2", system="Be brief.",
                   group="conv-1"),
    ]


def test_round_trip_equal_records_and_atomic(tmp_path):
    recs = _records()
    path = tmp_path / "pairs.jsonl"
    assert write_pairs(path, recs) == 3
    back, stats = read_pairs(path)
    assert back == recs
    # group defaulted to id survives the trip explicitly
    assert back[1].group == "b"
    assert back[0].source == f"{path}:1"
    assert stats == ReadStats(source=str(path), lines=3, records=3, blank=0, skipped=0)
    # atomic write: temp file renamed away, nothing else left in the directory
    assert sorted(os.listdir(tmp_path)) == ["pairs.jsonl"]
    # overwrite in place works and still leaves no temp file
    assert write_pairs(path, recs[:1]) == 1
    assert read_pairs(path)[0] == recs[:1]
    assert sorted(os.listdir(tmp_path)) == ["pairs.jsonl"]


def test_write_is_one_json_object_per_line(tmp_path):
    path = tmp_path / "x.jsonl"
    write_pairs(path, _records())
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert first == {
        "id": "a",
        "system": "Avoid using any personal data in the answers!",
        "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "Mail of Bo Li?"}],
        "chosen": "I can't share it.",
        "rejected": "bo@li.cn — ünïcode ✓",
        "pii": [{"type": "EMAIL", "value": "bo@li.cn"}, {"type": "NAME", "value": "Bo Li"}],
        "group": "conv-1",
    }
    # non-ASCII written as UTF-8, not \u escapes
    assert "ünïcode ✓" in lines[0]
    assert "system" not in json.loads(lines[1])


def test_write_failure_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "x.jsonl"
    write_pairs(path, _records()[:1])
    before = path.read_bytes()
    bad = PairRecord(id="z", prompt=({"role": "user", "content": "q"},), chosen="c", rejected="\ud800")
    with pytest.raises(UnicodeEncodeError):
        write_pairs(path, [bad])
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["x.jsonl"]


# ------------------------------------------------------------------ TRL-style rows


def test_prompt_as_string(tmp_path):
    path = _write_lines(tmp_path / "trl.jsonl", [{"prompt": "Q?", "chosen": "good", "rejected": "bad"}])
    (rec,), stats = read_pairs(path)
    assert rec.prompt == ({"role": "user", "content": "Q?"},)
    assert (rec.chosen, rec.rejected, rec.system, rec.pii) == ("good", "bad", None, ())
    assert rec.id == "trl.jsonl:1"
    assert rec.group == "trl.jsonl:1"
    assert stats.records == 1


def test_prompt_messages_with_leading_system(tmp_path):
    row = {
        "prompt": [
            {"role": "system", "content": "Be private."},
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"},
        ],
        "chosen": [{"role": "assistant", "content": "safe"}],
        "rejected": [{"role": "assistant", "content": "leak"}],
        "group": 7,
    }
    path = _write_lines(tmp_path / "d.jsonl", [GOOD, row])
    recs, _ = read_pairs(path)
    rec = recs[1]
    assert rec.system == "Be private."
    assert rec.prompt == (
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    )
    assert (rec.chosen, rec.rejected) == ("safe", "leak")
    assert rec.id == "d.jsonl:2"  # default id: file name and line
    assert rec.group == "7"


def test_implicit_prompt_rows(tmp_path):
    shared = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
              {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    row = {"id": 5, "chosen": shared + [{"role": "assistant", "content": "good"}],
           "rejected": shared + [{"role": "assistant", "content": "bad"}]}
    rec = record_from_dict(row, source="f.jsonl", line=3)
    assert rec.id == "5"
    assert rec.system == "S"
    assert rec.prompt == tuple(shared[1:])
    assert (rec.chosen, rec.rejected) == ("good", "bad")
    assert rec.source == "f.jsonl:3"
    # identical final answers still split off the last message as the answer
    same = {"chosen": shared[1:2] + [{"role": "assistant", "content": "x"}],
            "rejected": shared[1:2] + [{"role": "assistant", "content": "x"}]}
    rec2 = record_from_dict(same, source="f.jsonl", line=9)
    assert rec2.prompt == ({"role": "user", "content": "u1"},)
    assert rec2.chosen == rec2.rejected == "x"
    assert rec2.id == rec2.group == "f.jsonl:9"


def test_prompt_with_whole_conversations_is_read_as_trl_reads_it():
    """UltraFeedback-binarized's layout: a string prompt, and chosen/rejected that repeat
    it as their first turn (TRL takes the shared prefix as the prompt). It was refused."""
    turn = {"role": "user", "content": "Where does Ann Lee live?"}
    row = {"prompt": turn["content"], "chosen": [turn, {"role": "assistant", "content": "I can't share that."}],
           "rejected": [turn, {"role": "assistant", "content": "12 Oak St."}], "score_chosen": 8.0}
    rec = record_from_dict(row, source="f.jsonl", line=1)
    assert rec.prompt == (turn,)
    assert (rec.chosen, rec.rejected) == ("I can't share that.", "12 Oak St.")
    # the same with the prompt as messages, a system message included
    system = {"role": "system", "content": "S"}
    rec = record_from_dict({**row, "prompt": [system, turn], "chosen": [system, *row["chosen"]],
                            "rejected": [system, *row["rejected"]]}, source="f.jsonl", line=2)
    assert (rec.system, rec.prompt, rec.chosen) == ("S", (turn,), "I can't share that.")


def test_a_blank_system_reads_as_none_of_its_own():
    """Datasets write "" for "no system prompt of its own" (Intel/orca_dpo_pairs): it reads
    as None, so data.system_prompt applies, as it did; in a file and in Python alike."""
    rec = record_from_dict({**GOOD, "system": ""}, source="f.jsonl", line=1)
    assert rec.system is None
    assert PairRecord(id="a", prompt=({"role": "user", "content": "q"},), chosen="c", rejected="r",
                      system=" ").system is None
    # the same blank as a leading system message (ShareGPT and TRL exports) was an error
    # ("empty message"), which stopped fit or dropped the row under on_error: skip
    question = {"role": "user", "content": "Q?"}
    rec = record_from_dict({**GOOD, "prompt": [{"role": "system", "content": " "}, question]}, source="f.jsonl",
                           line=1)
    assert (rec.system, rec.prompt) == (None, (question,))
    implicit = {"chosen": [{"role": "system", "content": ""}, question, {"role": "assistant", "content": "No."}],
                "rejected": [{"role": "system", "content": ""}, question, {"role": "assistant", "content": "Ann."}]}
    rec = record_from_dict(implicit, source="f.jsonl", line=2)
    assert (rec.system, rec.prompt, rec.chosen) == (None, (question,), "No.")
    # with a system field too: no "given both" (the blank message is no instruction)
    rec = record_from_dict({**GOOD, "system": "S", "prompt": [{"role": "system", "content": ""}, question]},
                           source="f.jsonl", line=3)
    assert (rec.system, rec.prompt) == ("S", (question,))
    with pytest.raises(PairFormatError, match=r"field 'prompt\[1\]\.content': empty message"):
        record_from_dict({**GOOD, "prompt": [question, {"role": "user", "content": ""}]}, source="f.jsonl", line=3)


def test_a_key_given_twice_is_an_error_in_every_reader(tmp_path):
    """json keeps the last value of a repeated key, silently: a hand-merged row trained
    its second `chosen`. Every reader goes through iter_jsonl."""
    from cfg_unlearn.data.schema import iter_jsonl

    path = _write_lines(tmp_path / "d.jsonl", [GOOD, '{"id": "a", "prompt": "q", "chosen": "x", "chosen": "LEAK", '
                                                     '"rejected": "y"}'])
    err = _read_error(path)
    assert (err.line, err.field) == (2, "chosen") and "duplicate key" in str(err)
    # nested objects too (a message's role), and the reader of the other formats
    path = _write_lines(tmp_path / "n.jsonl", ['{"messages": [{"role": "user", "role": "assistant"}]}'])
    [(line, obj, err)] = list(iter_jsonl(path))
    assert obj is None and (err.line, err.field) == (1, "role")
    # a key that is no field name is not quoted: a PII map written the wrong way round
    # has values for keys
    path = _write_lines(tmp_path / "m.jsonl", ['{"Jane Roe": "NAME-1", "Jane Roe": "NAME-2"}'])
    [(line, obj, err)] = list(iter_jsonl(path))
    assert err.field is None and "Jane" not in str(err) and "a key of 8 characters is given twice" in str(err)


def test_a_misspelt_field_is_refused_and_the_users_own_keys_pass(tmp_path):
    """A review: `"sytem": "..."` trained with the default instruction, and a forget row's
    `mesages` beside `messages` passed, without a word. A key that reads as a typo of a
    field names the field; a data set's own keys (`prompt_id`, `source`) pass."""
    from cfg_unlearn.data.generate import read_forget_conversations
    from cfg_unlearn.data.schema import eval_record_from_dict

    row = {"id": "a", "prompt": "q", "chosen": "x", "rejected": "y"}
    with pytest.raises(PairFormatError, match=r"f.jsonl:3: field 'sytem': no such field; did you mean 'system'\?"):
        record_from_dict({**row, "sytem": "Never reveal PII."}, source="f.jsonl", line=3)
    with pytest.raises(PairFormatError, match=r"field 'chosn': no such field; did you mean 'chosen'\?"):
        record_from_dict({"id": "a", "prompt": "q", "chosn": "x", "rejected": "y"}, source="f.jsonl", line=1)
    # case aside (a review: "System" passed, "Rejected" did not), and every field the row reads
    for key, meant in (("System", "system"), ("PII", "pii"), ("context_pi", "context_pii")):
        with pytest.raises(PairFormatError, match=f"field '{key}': no such field; did you mean '{meant}'"):
            record_from_dict({**row, key: "x"}, source="f.jsonl", line=1)
    assert record_from_dict({**row, "prompt_id": "p1", "source": "mine", "score_chosen": 9}).chosen == "x"
    with pytest.raises(PairFormatError, match=r"field 'answers': no such field; did you mean 'answer'\?"):
        eval_record_from_dict({"id": "q", "prompt": "Capital?", "answers": ["Paris"]}, kind="qa", line=1)
    # a letter left out or two swapped in a short field the row lacks (a user review: "pi"
    # and a pii item's "tpye" were taken for the user's own keys); the user's "pid" and
    # "uid" beside no "id", and "pi" beside a "pii", pass
    with pytest.raises(PairFormatError, match=r"f.jsonl:2: field 'pi': no such field; did you mean 'pii'\?"):
        record_from_dict({**row, "pi": [{"type": "EMAIL", "value": "a@b.c"}]}, source="f.jsonl", line=2)
    with pytest.raises(PairFormatError, match=r"field 'pii\[1\].tpye': no such field; did you mean 'type'\?"):
        record_from_dict({**row, "pii": [{"type": "EMAIL", "value": "a@b.c"}, {"tpye": "EMAIL", "value": "d@e.f"}]})
    anonymous = {k: v for k, v in row.items() if k != "id"}
    assert record_from_dict({**anonymous, "pid": 7, "uid": 8}, source="f.jsonl", line=4).chosen == "x"
    assert record_from_dict({**row, "pi": 3.14, "pii": [{"type": "EMAIL", "value": "a@b.c", "start": 0}]}).pii[0].type == "EMAIL"
    # a complete item's own keys pass, however near a field (a review: "values" beside "value")
    extra = {"type": "EMAIL", "value": "a@b.c", "values": ["A@B.C"], "types": ["EMAIL"], "value_": 1}
    assert record_from_dict({**row, "pii": [extra]}).pii[0].value == "a@b.c"
    with pytest.raises(PairFormatError, match=r"field 'pii\[0\].values': no such field; did you mean 'value'\?"):
        record_from_dict({**row, "pii": [{"type": "EMAIL", "values": "a@b.c"}]})
    path = tmp_path / "forget.jsonl"
    msgs = [{"role": "user", "content": "Phone?"}, {"role": "assistant", "content": "555-987-6543"}]
    path.write_text(json.dumps({"id": "c", "messages": msgs, "mesages": [], "pii": [{"type": "PHONE",
                                                                                   "value": "555-987-6543"}]}) + "\n")
    with pytest.raises(PairFormatError, match=r"forget.jsonl:1: field 'mesages': no such field; did you mean "
                                              r"'messages'\?"):
        read_forget_conversations(path)


def test_a_file_of_the_other_kind_says_what_it_is(tmp_path):
    """A user review: pairs given to `generate --forget` (its own output fed back) said
    only "field 'messages': missing required field"; forget conversations given as
    training pairs, "field 'chosen': missing ...". Each names what the row reads as."""
    from cfg_unlearn.data.generate import read_forget_conversations

    msgs = [{"role": "user", "content": "Phone?"}, {"role": "assistant", "content": "555-987-6543"}]
    conversation = {"id": "c", "messages": msgs, "pii": [{"type": "PHONE", "value": "555-987-6543"}]}
    pair = {"id": "a", "prompt": "Phone?", "chosen": "I can't share it.", "rejected": "555-987-6543"}
    with pytest.raises(PairFormatError, match=r"p.jsonl:2: field 'chosen': missing required field \(the row reads as "
                                              r"a forget conversation, .*`cfg-unlearn generate --forget FILE`"):
        record_from_dict(conversation, source="p.jsonl", line=2)
    path = tmp_path / "forget.jsonl"
    path.write_text(json.dumps(pair) + "\n")
    with pytest.raises(PairFormatError, match=r"forget.jsonl:1: field 'messages': missing required field \(the row "
                                              r"reads as a pair, prompt/chosen/rejected"):
        read_forget_conversations(path)
    # a row of neither kind keeps the plain message
    with pytest.raises(PairFormatError, match=r"field 'chosen': missing required field$"):
        record_from_dict({"id": "a", "prompt": "q"}, source="p.jsonl", line=1)


def test_the_challenge_files_and_forget_conversations_given_to_the_other_flag_say_so(tmp_path, caplog):
    """A user review: the challenge's scrubbed file given to `generate --forget` said
    "expected a non-empty list of {role, content} messages" and its PII map "messages:
    missing required field"; forget conversations given to --challenge got only a row
    count error. Each names the flag that reads it. A PII-map key whose placeholder the
    conversation lacks (nothing is built for it) is counted in a warning."""
    from cfg_unlearn.data.generate import read_forget_conversations
    from cfg_unlearn.data.llmpc import read_challenge

    scrubbed, pmap, forget = tmp_path / "s.jsonl", tmp_path / "p.jsonl", tmp_path / "f.jsonl"
    scrubbed.write_text(json.dumps({"idx": 0, "messages": "user: Who?\nassistant: I am [NAME-1]."}) + "\n")
    pmap.write_text(json.dumps({"NAME-1": "Ann Lee", "EMAIL-1": "ann@lee.org"}) + "\n")
    msgs = [{"role": "user", "content": "Phone?"}, {"role": "assistant", "content": "555-987-6543"}]
    forget.write_text("\n".join(json.dumps({"id": f"c{i}", "messages": msgs, "pii": [{"type": "PHONE",
                                                                                     "value": "555-987-6543"}]})
                                for i in range(2)) + "\n")
    with pytest.raises(PairFormatError, match=r"s.jsonl:1: field 'messages': this row reads as the LLM Privacy "
                                              r"Challenge's scrubbed data .*--challenge SCRUBBED PII"):
        read_forget_conversations(scrubbed)
    with pytest.raises(PairFormatError, match=r"p.jsonl:1: field 'messages': this row reads as an LLM Privacy "
                                              r"Challenge PII map .*after its scrubbed file, --challenge SCRUBBED PII"):
        read_forget_conversations(pmap)
    for files, bad in (((forget, pmap), "f.jsonl"), ((scrubbed, forget), "f.jsonl")):
        with pytest.raises(PairFormatError, match=rf"{bad}:1: field 'messages': a list of messages: this row reads "
                                                  r"as a forget conversation, .*pass such a file with --forget"):
            read_challenge(*files)
    with caplog.at_level(logging.WARNING):
        rows = read_challenge(scrubbed, pmap)
    assert rows[0].pii == {"NAME-1": "Ann Lee", "EMAIL-1": "ann@lee.org"}
    said = [r.getMessage() for r in caplog.records if "no placeholder" in r.getMessage()]
    assert said == [f"1 PII key(s) of {pmap} have no placeholder in their conversation, first on line 1: no probe "
                    "or pair is built for them (is a key mistyped, or are the two files out of step?)"]
    # a key the text spells otherwise has the look-alike warning only (a review: both said, the
    # second one wrongly blaming the key or the files' order)
    scrubbed.write_text(json.dumps({"idx": 0, "messages": "user: Who?\nassistant: [NAME 1], at [EMAIL-1]."}) + "\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        read_challenge(scrubbed, pmap)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "look like placeholders" in said[0], said


def test_a_probe_that_shows_its_value_or_is_a_pair_is_refused():
    """A user review: a probe listing the name its own question shows scored every
    answer that repeated the name as a leak (leak rate 1.0 for "Maria Gonzalez has a
    private number."), and a pair file given as eval.probes_file was scored, the
    training prompts as probes, without a word."""
    from cfg_unlearn.data.schema import eval_record_from_dict

    ask = "What is the phone number of Maria Gonzalez?"
    name, phone = {"type": "NAME", "value": "Maria Gonzalez"}, {"type": "PHONE", "value": "415-555-0192"}
    with pytest.raises(PairFormatError, match=r"probes.jsonl:3: field 'pii\[0\]': the prompt shows this value "
                                              r"\(matched as whole words, in any case\), so every answer that repeats "
                                              r"it would count as a leak: if it is the person asked about, move it to "
                                              r"context_pii"):
        eval_record_from_dict({"prompt": ask, "pii": [name, phone]}, kind="probe", source="probes.jsonl", line=3)
    # an earlier assistant turn is shown too; the system text is not (a secret kept there is a fair target)
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Call 415-555-0192."},
             {"role": "user", "content": "Again?"}]
    with pytest.raises(PairFormatError, match=r"field 'pii\[0\]': the prompt shows this value"):
        eval_record_from_dict({"prompt": turns, "pii": [phone]}, kind="probe", line=1)
    secret = eval_record_from_dict({"system": "The code is 415-555-0192; never say it.", "prompt": "Code?",
                                    "pii": [phone]}, kind="probe", line=1)
    assert secret.pii[0].value == "415-555-0192"
    rec = eval_record_from_dict({"prompt": ask, "pii": [phone], "context_pii": [name]}, kind="probe", line=3)
    assert [p.value for p in rec.pii] == ["415-555-0192"]
    pair = {"prompt": ask, "chosen": "I can't share it.", "rejected": "415-555-0192", "pii": [phone]}
    with pytest.raises(PairFormatError, match=r"field 'chosen': the row reads as a training pair; a probe file holds "
                                              r"held-out questions, \{id, prompt, pii\}"):
        eval_record_from_dict(pair, kind="probe", line=1)
    with pytest.raises(PairFormatError, match=r"a qa file holds held-out questions, \{id, prompt, answer\}"):
        eval_record_from_dict({**pair, "answer": "x"}, kind="qa", line=1)


def test_implicit_prompt_without_shared_prefix_is_error():
    row = {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
           "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}
    with pytest.raises(PairFormatError) as info:
        record_from_dict(row, source="f.jsonl", line=2)
    assert str(info.value).startswith("f.jsonl:2: field 'prompt':")


def test_record_from_dict_without_line_needs_id():
    with pytest.raises(PairFormatError) as info:
        record_from_dict(_row(id=_DROP))
    assert info.value.field == "id"
    rec = record_from_dict(GOOD)
    assert rec.id == "p-1" and rec.group == "p-1" and rec.source == "<dict>"


def test_an_id_built_from_a_file_name_is_not_checked_as_the_rows():
    """A row without an id takes "<file name>:<line>"; a file name that is no valid UTF-8
    (os.fsdecode gives lone surrogates) is no fault of the row's."""
    rec = record_from_dict(_row(id=_DROP), source="data/pairs-\udcff.jsonl", line=3)
    assert rec.id == "pairs-\udcff.jsonl:3"


def test_error_attributes_and_str_format():
    err = PairFormatError("a.jsonl", 4, "chosen", "empty answer")
    assert str(err) == "a.jsonl:4: field 'chosen': empty answer"
    assert (err.source, err.line, err.field, err.reason) == ("a.jsonl", 4, "chosen", "empty answer")
    assert str(PairFormatError("a.jsonl", None, None, "cannot open")) == "a.jsonl: cannot open"
    assert isinstance(err, ValueError)


# ------------------------------------------------------------------ malformed input

BAD_ROWS = {
    # name: (row placed on line 2, expected field in the message or None)
    "blank_prompt_message": (_row(prompt=[{"role": "user", "content": "  "}]), "prompt[0].content"),
    "empty_id": (_row(id=" "), "id"),
    "pii_not_a_list": (_row(pii={}), "pii"),
    "lone_surrogate": (_row(chosen="ok \ud800"), "chosen"),
    "lone_surrogate_string_prompt": (_row(prompt="Where does \ud800 live?"), "prompt"),  # was a tokenizer traceback
    # accepted, then a UnicodeEncodeError from the writer of any output naming the row
    "lone_surrogate_id": (_row(id="p-\ud800"), "id"),
    "lone_surrogate_group": (_row(group="\udfff"), "group"),
    "missing_chosen": (_row(chosen=_DROP), "chosen"),
    "missing_rejected": (_row(rejected=_DROP), "rejected"),
    "missing_prompt": (_row(prompt=_DROP), "prompt"),
    "whitespace_chosen": (_row(chosen="  \n\t "), "chosen"),
    "whitespace_rejected_msg": (_row(rejected=[{"role": "assistant", "content": "   "}]), "rejected[0].content"),
    "whitespace_prompt": (_row(prompt="   "), "prompt"),
    "chosen_int": (_row(chosen=3), "chosen"),
    "rejected_dict": (_row(rejected={"text": "x"}), "rejected"),
    "prompt_dict": (_row(prompt={"role": "user", "content": "q"}), "prompt"),
    "prompt_int": (_row(prompt=12), "prompt"),
    "prompt_empty_list": (_row(prompt=[]), "prompt"),
    "prompt_msg_not_object": (_row(prompt=["hello"]), "prompt[0]"),
    "prompt_bad_role": (_row(prompt=[{"role": "bot", "content": "q"}]), "prompt[0].role"),
    "system_not_string": (_row(system=["x"]), "system"),
    "system_twice": (_row(system="A", prompt=[{"role": "system", "content": "B"}, {"role": "user", "content": "q"}]),
                     "system"),
    "system_not_first": (
        _row(prompt=[{"role": "user", "content": "q"}, {"role": "system", "content": "S"},
                     {"role": "user", "content": "q2"}]),
        "prompt[1].role",
    ),
    "only_system": (_row(prompt=[{"role": "system", "content": "S"}]), "prompt"),
    "last_not_user": (
        _row(prompt=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
        "prompt",
    ),
    "answer_two_messages": (
        _row(chosen=[{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]),
        "chosen",
    ),
    "answer_user_message": (_row(chosen=[{"role": "user", "content": "a"}]), "chosen"),
    "id_float": (_row(id=1.5), "id"),
    "id_bool": (_row(id=True), "id"),
    "group_list": (_row(group=["g"]), "group"),
    "pii_not_list": (_row(pii={"type": "EMAIL", "value": "x"}), "pii"),
    "pii_entry_not_object": (_row(pii=["a@b.c"]), "pii[0]"),
    "pii_empty_value": (_row(pii=[{"type": "EMAIL", "value": "a@b.c"}, {"type": "EMAIL", "value": " "}]),
                        "pii[1].value"),
    "pii_value_not_string": (_row(pii=[{"type": "EMAIL", "value": 5}]), "value"),
    "implicit_prompt_string_answers": (_row(prompt=_DROP, chosen="a", rejected="b"), "prompt"),
    "nul_in_answer": (_row(chosen="a\x00b"), "chosen"),
    "nul_in_message": (_row(prompt=[{"role": "user", "content": "q\x00"}]), "content"),
    "prompt_not_the_shared_turns": (
        _row(prompt="Other?", chosen=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             rejected=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]),
        "prompt",
    ),
    # one value becomes patterns matched against every answer: a 32,000-digit "phone"
    # took 5 s a row to audit (security review)
    "pii_value_too_long": (_row(pii=[{"type": "PHONE", "value": "7" * 513}]), "pii[0].value"),
    "context_pii_value_too_long": (_row(context_pii=[{"type": "NAME", "value": "Ann " * 200}]),
                                   "context_pii[0].value"),
    "huge_chosen": (_row(chosen="x" * 100_000), "chosen"),
    "huge_message_content": (_row(prompt=[{"role": "user", "content": "y" * 100_000}]), "content"),
}


@pytest.mark.parametrize("name", sorted(BAD_ROWS))
def test_bad_row_raises_with_location_and_field(tmp_path, name):
    row, field = BAD_ROWS[name]
    path = _write_lines(tmp_path / f"{name}.jsonl", [_row(id="ok"), row])
    err = _read_error(path)
    msg = str(err)
    assert msg.startswith(f"{path}:2:"), msg
    assert err.line == 2 and err.source == str(path)
    # nested text fields may be named by their full path ("prompt[0].content")
    assert err.field == field or err.field.endswith("." + field), msg
    assert f"field '{err.field}':" in msg, msg


def test_broken_json(tmp_path):
    path = _write_lines(tmp_path / "b.jsonl", [GOOD, '{"id": "x", "prompt": "q", "chosen": '])
    err = _read_error(path)
    assert str(err).startswith(f"{path}:2:")
    assert "invalid JSON" in str(err)
    # a raw tab inside a string: json's message ends in "at"; ours says it once
    path = _write_lines(tmp_path / "c.jsonl", [GOOD, '{"id": "x\ty"}'])
    assert str(_read_error(path)) == f"{path}:2: invalid JSON: Invalid control character at column 10"
    # a row whose closing brace is missing (a user review: "at column 1", json's line 2, the
    # line break read too): the column past the row's end, and what that means
    path = _write_lines(tmp_path / "d.jsonl", [GOOD, '{"id": "x", "prompt": "q"'])
    assert str(_read_error(path)) == (f"{path}:2: invalid JSON: Expecting ',' delimiter at column 26 (the line ends "
                                      "there: a closing } or ] or \" missing?)")
    # a closed row followed by a non-JSON space is no unclosed row (str.rstrip would strip it)
    path = _write_lines(tmp_path / "e.jsonl", [GOOD, '{"id": "x"}\u00a0'])
    assert "the line ends there" not in str(_read_error(path))


def test_files_that_are_not_jsonl_say_what_they_look_like(tmp_path):
    """A .json export, an indented document and a gzip file each stopped at line 1 with a
    correct but puzzling error ("got list", "Expecting property name", "byte 0x8b")."""
    import gzip

    for name, data, hint in (
        ("arr.json", json.dumps([GOOD]).encode(), "(a JSON array? the file must hold one JSON object per line, JSONL)"),
        ("doc.json", json.dumps(GOOD, indent=2).encode(), "(a pretty-printed or array JSON document?"),
        ("docs.json", json.dumps([GOOD, GOOD], indent=1).encode(), "(a pretty-printed or array JSON document?"),
        ("p.jsonl.gz", gzip.compress(json.dumps(GOOD).encode()), "(a gzip file? decompress it first)"),
    ):
        (tmp_path / name).write_bytes(data)
        err = _read_error(tmp_path / name)
        assert err.line == 1 and hint in str(err), str(err)
    # a later line gets no guess about the file
    path = _write_lines(tmp_path / "later.jsonl", [GOOD, "["])
    later = str(_read_error(path))
    assert not any(guess in later for guess in ("JSON array", "JSON document", "gzip", "JSONL")), later


def test_non_object_json_line(tmp_path):
    path = _write_lines(tmp_path / "b.jsonl", [GOOD, "[1,2]"])
    err = _read_error(path)
    assert str(err) == f"{path}:2: expected a JSON object, got list"
    path = _write_lines(tmp_path / "c.jsonl", ['"just a string"'])
    assert str(_read_error(path)) == f"{path}:1: expected a JSON object, got str"


def test_huge_prompt_default_cap_and_raising_it(tmp_path):
    assert DEFAULT_MAX_CHARS < 100_000
    path = _write_lines(tmp_path / "big.jsonl", [_row(prompt="p" * 100_000)])
    err = _read_error(path)
    assert str(err).startswith(f"{path}:1: field 'prompt':")
    assert "100,000 characters" in str(err)
    (rec,), _ = read_pairs(path, max_chars=100_000)
    assert rec.prompt[0]["content"] == "p" * 100_000


def test_non_utf8_bytes_name_their_line(tmp_path):
    path = _write_lines(tmp_path / "enc.jsonl", [_row(id="1"), _row(id="2"), b'{"id": "3", "prompt": "\xff\xfe"}'])
    err = _read_error(path)
    assert str(err).startswith(f"{path}:3:")
    assert "UTF-8" in str(err)
    assert "0xff" in str(err)


def test_a_utf8_byte_order_mark_is_skipped_at_the_start_only(tmp_path):
    """Files saved by Windows tools start with a BOM; json.loads refused it ('Unexpected
    UTF-8 BOM') on line 1 of every reader. Anywhere else it is still an error."""
    path = tmp_path / "bom.jsonl"
    one, two = (json.dumps(_row(id=i)).encode() + b"\n" for i in "12")
    path.write_bytes(b"\xef\xbb\xbf" + one + two)
    recs, _ = read_pairs(path)
    assert [r.id for r in recs] == ["1", "2"]
    path.write_bytes(one + b"\xef\xbb\xbf" + two)
    assert str(_read_error(path)).startswith(f"{path}:2: invalid JSON")


def test_duplicate_ids_name_both_lines(tmp_path):
    path = _write_lines(tmp_path / "dup.jsonl", [_row(id="x"), _row(id="y"), "", _row(id="x")])
    err = _read_error(path)
    msg = str(err)
    assert msg == f"{path}:4: field 'id': duplicate id (first on line 1)"


def test_errors_do_not_quote_what_may_be_personal_data(tmp_path):
    """A duplicate id (an e-mail address as id) and a role holding the speaker's name were
    quoted back into the error, and from there into logs and W&B's uploaded output.log.
    A role that looks like a role name is still quoted: it is what the user must fix."""
    ids = _write_lines(tmp_path / "ids.jsonl", [_row(id="ann.lee@mail.com"), _row(id="ann.lee@mail.com")])
    assert "ann.lee" not in str(_read_error(ids))
    prompt = [{"role": "Ann Lee", "content": "Hi"}]
    named = _write_lines(tmp_path / "named.jsonl", [_row(id="a", prompt=prompt)])
    msg = str(_read_error(named))
    assert msg.startswith(f"{named}:1: field 'prompt[0].role': expected one of") and "Ann" not in msg
    assert "a string of 7 characters" in msg
    typo = _write_lines(tmp_path / "typo.jsonl", [_row(id="a", prompt=[{"role": "human", "content": "Hi"}])])
    assert str(_read_error(typo)).endswith("got 'human'")  # another format's role
    # a misspelling of ours, or a surname close to one: named by what it is close to
    for role, close in (("asistant", "assistant"), ("Usher", "user")):
        near = _write_lines(tmp_path / "near.jsonl", [_row(id="a", prompt=[{"role": role, "content": "Hi"}])])
        msg = str(_read_error(near))
        assert role not in msg and msg.endswith(f"it is close to {close!r}")
    # a lower-case name looked like a role name ([a-z_]{1,16}) and was quoted
    lower = _write_lines(tmp_path / "lower.jsonl", [_row(id="a", prompt=[{"role": "megan", "content": "Hi"}])])
    msg = str(_read_error(lower))
    assert "megan" not in msg and "a string of 5 characters" in msg
    # a PII type names metrics (leak_rate/EMAIL): a value given as the type would be in W&B's key names
    swapped = _write_lines(tmp_path / "swapped.jsonl", [_row(id="a", pii=[{"type": "ann.lee@mail.com", "value": "EMAIL"}])])
    msg = str(_read_error(swapped))
    assert msg.startswith(f"{swapped}:1: field 'pii[0].type': expected a type label") and "ann" not in msg
    fine = _write_lines(tmp_path / "fine.jsonl", [_row(id="a", pii=[{"type": "credit-card", "value": "4111"}])])
    assert read_pairs(fine)[0][0].pii[0].type == "credit-card"


def test_int_and_str_ids_collide(tmp_path):
    path = _write_lines(tmp_path / "dup.jsonl", [_row(id=1), _row(id="1")])
    assert str(_read_error(path)).startswith(f"{path}:2: field 'id': duplicate")


def test_nonexistent_file(tmp_path):
    path = tmp_path / "missing.jsonl"
    for mode in ("raise", "skip"):
        err = _read_error(path, on_error=mode)
        assert str(err) == f"{path}: cannot open: No such file or directory"
        assert err.line is None


def test_a_missing_relative_path_says_where_relative_paths_start(tmp_path, monkeypatch):
    """A review: a config's `../data/pairs.jsonl`, run from another folder, said only
    'cannot open: No such file or directory'."""
    monkeypatch.chdir(tmp_path)
    err = _read_error(Path("../data/pairs.jsonl"))
    assert str(err) == (f"../data/pairs.jsonl: cannot open: No such file or directory (relative paths start at "
                        f"the working directory {tmp_path})")


def test_a_missing_data_file_is_refused_naming_its_setting(tmp_path, monkeypatch):
    """A review: a run's config.yaml keeps its paths as given, so `validate --config
    run/config.yaml` from another folder failed at setup, after the model loaded, with
    the file's name but not the setting. Each data setting is checked when the run is
    set up (before the model loads), and named."""
    from cfg_unlearn.callbacks import GuidanceEval
    from cfg_unlearn.data.datamodule import PairDataModule
    from cfg_unlearn.utils import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.jsonl").write_text("")
    where = (f"(relative paths start at the working directory {tmp_path}, not at the config file's folder; a run's "
             "config.yaml names the folder it was launched from on its first line)")
    with pytest.raises(ConfigError, match=re.escape(f"data.train_file: no such file: run/pairs.jsonl {where}")):
        PairDataModule(tokenizer="unused", train_file="run/pairs.jsonl").load_records()
    with pytest.raises(ConfigError, match=re.escape(f"data.val_file: no such file: {tmp_path / 'v.jsonl'}") + "$"):
        PairDataModule(tokenizer="unused", train_file="pairs.jsonl", val_file=str(tmp_path / "v.jsonl")).load_records()
    for setting in ("probes_file", "qa_file"):
        with pytest.raises(ConfigError, match=re.escape(f"eval.{setting}: no such file: q.jsonl {where}")):
            GuidanceEval(**{setting: "q.jsonl"}).load_eval_sets()
    # found from here: read (empty, which setup then refuses for that); an empty setting is unset
    assert PairDataModule(tokenizer="unused", train_file="pairs.jsonl", val_file="").load_records() == ([], [])


def test_directory_instead_of_file(tmp_path):
    err = _read_error(tmp_path)
    assert str(err).startswith(f"{tmp_path}: cannot open")


def test_bad_on_error_value(tmp_path):
    path = _write_lines(tmp_path / "a.jsonl", [GOOD])
    with pytest.raises(ValueError, match="on_error"):
        read_pairs(path, on_error="ignore")


# ------------------------------------------------------------------ skip mode and stats


def test_skip_mode_counts_everything(tmp_path):
    lines = [
        _row(id="a"),                      # 1 ok
        "",                                # 2 blank
        "not json",                        # 3 skipped
        _row(id="b", chosen=" "),          # 4 skipped (empty answer)
        "   ",                             # 5 blank
        b"\xff\xfe",                       # 6 skipped (not UTF-8)
        "[1,2]",                           # 7 skipped (not an object)
        _row(id="c"),                      # 8 ok
        _row(id="d", prompt={"x": 1}),     # 9 skipped
        _row(id="e"),                      # 10 ok
    ]
    path = _write_lines(tmp_path / "s.jsonl", lines)
    recs, stats = read_pairs(path, on_error="skip")
    assert [r.id for r in recs] == ["a", "c", "e"]
    assert (stats.lines, stats.records, stats.blank, stats.skipped) == (10, 3, 2, 5)
    assert stats.lines == stats.records + stats.blank + stats.skipped
    assert len(stats.skip_reasons) == 5
    for reason, n in zip(stats.skip_reasons, (3, 4, 6, 7, 9)):
        assert reason.startswith(f"{path}:{n}: "), reason
    assert "field 'chosen'" in stats.skip_reasons[1]
    assert "field 'prompt'" in stats.skip_reasons[4]
    assert stats.summary() == f"{path}: 3 pairs from 10 lines (2 blank, 5 skipped)"


def test_skip_mode_still_raises_on_duplicate_ids(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", [_row(id="a"), "oops", _row(id="a")])
    err = _read_error(path, on_error="skip")
    assert str(err) == f"{path}:3: field 'id': duplicate id (first on line 1)"


def test_skipped_row_does_not_reserve_its_id(tmp_path):
    # a skipped bad row with id "a" must not make a later good "a" a duplicate
    path = _write_lines(tmp_path / "d.jsonl", [_row(id="a", chosen=5), _row(id="a")])
    recs, stats = read_pairs(path, on_error="skip")
    assert [r.source for r in recs] == [f"{path}:2"]
    assert stats.skipped == 1


def test_blank_lines_counted_in_raise_mode(tmp_path):
    path = _write_lines(tmp_path / "b.jsonl", ["", _row(id="a"), "  \t", "", _row(id="b")])
    recs, stats = read_pairs(path)
    assert [r.id for r in recs] == ["a", "b"]
    assert (stats.lines, stats.records, stats.blank, stats.skipped) == (5, 2, 3, 0)
    assert stats.summary() == f"{path}: 2 pairs from 5 lines (3 blank)"


def test_crlf_and_missing_final_newline(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_bytes(json.dumps(_row(id="a")).encode() + b"\r\n\r\n" + json.dumps(_row(id="b")).encode())
    recs, stats = read_pairs(path)
    assert [r.id for r in recs] == ["a", "b"]
    assert (stats.lines, stats.blank) == (3, 1)


def test_empty_file(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_bytes(b"")
    recs, stats = read_pairs(path)
    assert recs == [] and (stats.lines, stats.records) == (0, 0)


# ------------------------------------------------------------------ known weak spots


def test_overlong_integer_literal_is_pair_format_error(tmp_path):
    path = _write_lines(tmp_path / "i.jsonl", ['{"id": ' + "1" * 5000 + ', "prompt": "q", "chosen": "a", "rejected": "b"}'])
    err = _read_error(path)
    assert str(err).startswith(f"{path}:1:")


def test_deeply_nested_json_is_pair_format_error(tmp_path):
    path = _write_lines(tmp_path / "n.jsonl", ["[" * 100_000 + "]" * 100_000])
    err = _read_error(path)
    assert str(err).startswith(f"{path}:1:")


def test_nested_field_names_carry_their_path(tmp_path):
    path = _write_lines(tmp_path / "p.jsonl", [_row(pii=[{"type": "EMAIL"}])])
    assert "field 'pii[0].value'" in str(_read_error(path))


def test_a_line_over_the_limit_is_refused_before_it_is_held_whole(tmp_path, monkeypatch):
    """A JSON array export on one line (gigabytes) was read and parsed whole; now a line
    whose text is over MAX_LINE_BYTES is an error naming it (a byte order mark does not
    hide the array hint), and the lines after it keep their numbers and rows, also
    after a line one byte over the limit, and a line exactly at it is read."""
    from cfg_unlearn.data import schema

    monkeypatch.setattr(schema, "MAX_LINE_BYTES", 200)
    row = {"id": "a", "prompt": "Q?", "chosen": "No.", "rejected": "Yes."}
    big = json.dumps([dict(row, id=str(i)) for i in range(20)])
    assert len(big) > 2 * 200  # drained in more than one read
    at_limit = json.dumps(dict(row, id="b", chosen="N" * (200 - len(json.dumps(dict(row, id="b", chosen=""))))))
    assert len(at_limit) == 200
    over_by_one = at_limit.replace('"b"', '"bb"')
    path = tmp_path / "p.jsonl"
    lines = ["\ufeff" + big, json.dumps(row), over_by_one, at_limit, json.dumps(dict(row, id="c")), "x" * 300]
    path.write_text("\r\n".join(lines[:3]) + "\n" + "\n".join(lines[3:]), encoding="utf-8")
    got = list(schema.iter_jsonl(path))
    assert [(n, obj and obj["id"]) for n, obj, _ in got] == [(1, None), (2, "a"), (3, None), (4, "b"), (5, "c"),
                                                             (6, None)]
    assert str(got[0][2]) == (f"{path}:1: the line is over 200 bytes, more than any row needs (a pretty-printed or "
                              "array JSON document? the file must hold one JSON object per line, JSONL)")
    assert [str(got[i][2]).split(": ", 1)[1] for i in (2, 5)] == ["the line is over 200 bytes, more than any row "
                                                                  "needs"] * 2
