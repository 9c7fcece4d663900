"""PairDataModule with the offline tiny model: batch layout, label masks, cond/uncond
variants, group splits, left truncation, file input and workers."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from cfg_unlearn.data.datamodule import (
    IGNORE_INDEX,
    VARIANTS,
    EncodeStats,
    PairCollator,
    PairDataModule,
    PairDataset,
    cut_prompts,
    label_sequence,
    split_by_group,
)
from cfg_unlearn.data.schema import PairRecord, PIIItem, write_pairs
from cfg_unlearn.data.world import World, WorldConfig
from cfg_unlearn.models import load_tokenizer
from cfg_unlearn.prompts import NEGATIVE_INSTRUCTION, SAFETY_INSTRUCTION, answer_encoder, answer_end_ids, render_prompt
from cfg_unlearn.utils import ConfigError

WORLD = WorldConfig(seed=0, n_people=10)


@pytest.fixture(scope="module")
def tiny_name(tiny_model_dir) -> str:
    return f"tiny:{tiny_model_dir}"


@pytest.fixture(scope="module")
def tok(tiny_name):
    return load_tokenizer(tiny_name)


@pytest.fixture(scope="module")
def world_pairs() -> dict[str, PairRecord]:
    return {r.id: r for r in World(WORLD).pairs()}


def make_dm(tiny_name, **kw) -> PairDataModule:
    kw.setdefault("world", None if "train_file" in kw else WORLD)
    dm = PairDataModule(tokenizer=tiny_name, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def dm(tiny_name) -> PairDataModule:
    return make_dm(tiny_name, batch_size=4)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _split_seq(batch, v, b, k):
    """(prompt ids, answer ids, n real tokens) of one sequence of a batch."""
    ids = batch[v]["input_ids"][b, k]
    lab = batch[v]["labels"][b, k]
    n = int(batch[v]["attention_mask"][b, k].sum())
    p = int((lab[:n] == IGNORE_INDEX).sum())
    return ids[:p].tolist(), ids[p:n].tolist(), n


# ------------------------------------------------------------------ batch layout


def test_setup_stats(dm):
    assert dm.stats["train_pairs"] + dm.stats["val_pairs"] == 60  # 10 people x 6 attributes
    assert dm.stats["train_groups"] + dm.stats["val_groups"] == 30
    assert dm.stats["val_groups"] == 3  # round(0.1 * 30)
    assert dm.stats["truncated_prompts"] == 0
    assert len(dm.train_dataset) == dm.stats["train_pairs"]
    assert len(dm.val_dataset) == dm.stats["val_pairs"]


def test_batch_keys_and_shapes(dm):
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"id", "cond", "uncond", "pad"}
    assert len(batch["id"]) == 4 and not batch["pad"].any()  # one process: nothing pads
    shape = batch["cond"]["input_ids"].shape
    assert shape[:2] == (4, 2)
    for v in VARIANTS:
        assert set(batch[v]) == {"input_ids", "attention_mask", "labels", "nll_labels"}
        for key, t in batch[v].items():
            assert t.shape == shape, (v, key)  # both variants share one L
            assert t.dtype == torch.long
    # L is the longest real sequence of the batch, over both variants
    longest = max(int(batch[v]["attention_mask"].sum(-1).max()) for v in VARIANTS)
    assert shape[2] == longest


def test_labels_mask_prompt_and_padding(dm, tok, world_pairs):
    batch = next(iter(dm.train_dataloader()))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    for v in VARIANTS:
        ids, mask, lab = batch[v]["input_ids"], batch[v]["attention_mask"], batch[v]["labels"]
        for b, rid in enumerate(batch["id"]):
            rec = world_pairs[rid]
            system = SAFETY_INSTRUCTION if v == "cond" else None
            want_prompt = _ids(tok, render_prompt(tok, rec.prompt, system))
            for k, answer in enumerate((rec.chosen, rec.rejected)):
                n = int(mask[b, k].sum())
                assert mask[b, k, :n].eq(1).all() and mask[b, k, n:].eq(0).all()
                want_answer = _ids(tok, answer) + [eos]
                p = len(want_prompt)
                assert n == p + len(want_answer)
                assert ids[b, k, :p].tolist() == want_prompt
                assert ids[b, k, p:n].tolist() == want_answer
                assert lab[b, k, :p].eq(IGNORE_INDEX).all()
                assert lab[b, k, p:n].tolist() == want_answer
                assert lab[b, k, n:].eq(IGNORE_INDEX).all()
                assert ids[b, k, n:].eq(pad).all()
                assert int(ids[b, k, n - 1]) == eos
                # default nll_span="response"
                assert torch.equal(batch[v]["nll_labels"][b, k], lab[b, k])


def test_cond_has_instruction_uncond_does_not(dm, tok):
    batch = next(iter(dm.train_dataloader()))
    for b in range(len(batch["id"])):
        for k in range(2):
            cond_prompt, cond_answer, _ = _split_seq(batch, "cond", b, k)
            unc_prompt, unc_answer, _ = _split_seq(batch, "uncond", b, k)
            assert SAFETY_INSTRUCTION in tok.decode(cond_prompt)
            assert SAFETY_INSTRUCTION not in tok.decode(unc_prompt)
            assert "<|system|>" not in tok.decode(unc_prompt)
            assert cond_answer == unc_answer
            # same conversation, only the system message differs
            assert tok.decode(cond_prompt).replace(f"<|system|>{SAFETY_INSTRUCTION}<|end|>", "") == tok.decode(
                unc_prompt
            )


def test_negative_instruction_in_uncond(tiny_name, tok):
    dm = make_dm(tiny_name, uncond_system_prompt=NEGATIVE_INSTRUCTION, val_fraction=0.0, batch_size=3)
    batch = next(iter(dm.train_dataloader()))
    for b in range(3):
        for k in range(2):
            cond = tok.decode(_split_seq(batch, "cond", b, k)[0])
            unc = tok.decode(_split_seq(batch, "uncond", b, k)[0])
            assert f"<|system|>{NEGATIVE_INSTRUCTION}<|end|>" in unc
            assert SAFETY_INSTRUCTION not in unc
            assert NEGATIVE_INSTRUCTION not in cond
            assert SAFETY_INSTRUCTION in cond


def test_record_system_overrides_default(tiny_name, tok, tmp_path):
    recs = [
        PairRecord(id="a", prompt=({"role": "user", "content": "Where does Bo live?"},), chosen="I can't say.",
                   rejected="Bo lives at 1 Main St.", system="Custom rule."),
        PairRecord(id="b", prompt=({"role": "user", "content": "Bo's phone?"},), chosen="No.", rejected="555-0101"),
    ]
    write_pairs(tmp_path / "p.jsonl", recs)
    dm = make_dm(tiny_name, train_file=str(tmp_path / "p.jsonl"), val_fraction=0.0)
    items = {it["id"]: it for it in dm.train_dataset}
    cond_a = tok.decode(items["a"]["cond"]["input_ids"][0])
    assert "<|system|>Custom rule.<|end|>" in cond_a and SAFETY_INSTRUCTION not in cond_a
    assert f"<|system|>{SAFETY_INSTRUCTION}<|end|>" in tok.decode(items["b"]["cond"]["input_ids"][0])
    for rid in items:
        assert "<|system|>" not in tok.decode(items[rid]["uncond"]["input_ids"][0])


# ------------------------------------------------------------------ nll span


def test_nll_span_prompt_response(tiny_name):
    dm = make_dm(tiny_name, nll_span="prompt_response", batch_size=5)
    batch = next(iter(dm.train_dataloader()))
    for v in VARIANTS:
        mask = batch[v]["attention_mask"].bool()
        nll, ids, lab = batch[v]["nll_labels"], batch[v]["input_ids"], batch[v]["labels"]
        assert torch.equal(nll[mask], ids[mask])
        assert nll[~mask].eq(IGNORE_INDEX).all()
        # labels themselves still mask the prompt
        assert (lab[mask] == IGNORE_INDEX).any()


def test_nll_span_response(dm):
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        for v in VARIANTS:
            assert torch.equal(batch[v]["nll_labels"], batch[v]["labels"])


# ------------------------------------------------------------------ splits


def _groups(ds, world_pairs) -> set[str]:
    return {world_pairs[it["id"]].group for it in ds}


def test_split_by_group_disjoint(dm, world_pairs):
    train, val = _groups(dm.train_dataset, world_pairs), _groups(dm.val_dataset, world_pairs)
    assert train and val
    assert not train & val
    assert train | val == {r.group for r in world_pairs.values()}
    # every pair of a val conversation is in val
    val_ids = {it["id"] for it in dm.val_dataset}
    assert val_ids == {rid for rid, r in world_pairs.items() if r.group in val}


def test_split_keeps_the_turns_of_a_conversation_without_group_together():
    """Rows with no ``group`` (TRL-style files) are each their own group: a conversation's
    turn-2 pair, whose prompt holds turn 1's prompt and leaky answer, went to validation
    while turn 1 trained (4 of 4 validation pairs in an audit), which check_disjoint
    refuses for a val_file. Turns found by content stay on one side, and so do two rows
    of one exchange; unrelated conversations still split."""
    recs = []
    for c in range(10):
        q1, leak1 = f"Where does person {c} live?", f"Person {c} lives at {c} Oak St."
        recs.append(PairRecord(id=f"{c}-1", prompt=({"role": "user", "content": q1},), chosen="I can't say.",
                               rejected=leak1))
        recs.append(PairRecord(id=f"{c}-2", prompt=({"role": "user", "content": q1},
                                                    {"role": "assistant", "content": leak1},
                                                    {"role": "user", "content": "And the phone?"}),
                               chosen="I can't say.", rejected=f"555-000{c}"))
    recs.append(PairRecord(id="9-1-again", prompt=recs[-2].prompt, chosen="No.", rejected=recs[-2].rejected))
    for seed in range(5):
        train, val = split_by_group(recs, 0.3, seed)
        assert val and train
        person = {r.id.split("-")[0] for r in val}
        assert not person & {r.id.split("-")[0] for r in train}, seed
        assert len([r for r in val if r.id.startswith("9-")]) in (0, 3)


def test_split_seeded(dm, tiny_name, world_pairs):
    again = make_dm(tiny_name, batch_size=4)
    assert [it["id"] for it in again.val_dataset] == [it["id"] for it in dm.val_dataset]
    # shuffling follows the seed too
    assert next(iter(again.train_dataloader()))["id"] == next(iter(dm.train_dataloader()))["id"]
    recs = list(world_pairs.values())
    splits = {tuple(sorted({r.group for r in split_by_group(recs, 0.1, s)[1]})) for s in range(5)}
    assert len(splits) > 1  # the seed matters


def test_split_by_group_unit():
    recs = [
        PairRecord(id=f"{g}-{i}", prompt=({"role": "user", "content": f"q{g}{i}"},), chosen="c", rejected="r", group=g)
        for g in "abcdefghij" for i in range(3)
    ]
    train, val = split_by_group(recs, 0.2, seed=7)
    assert len(val) == 6 and len(train) == 24
    assert not {r.group for r in train} & {r.group for r in val}
    # independent of input order
    train2, val2 = split_by_group(list(reversed(recs)), 0.2, seed=7)
    assert {r.id for r in val2} == {r.id for r in val}
    # at least one group held out for a tiny fraction, never all groups
    assert len({r.group for r in split_by_group(recs, 0.01, 0)[1]}) == 1
    assert len({r.group for r in split_by_group(recs, 0.99, 0)[0]}) == 1
    # nothing to split
    assert split_by_group(recs, 0.0, 0) == (recs, [])
    one = [r for r in recs if r.group == "a"]
    assert split_by_group(one, 0.5, 0) == (one, [])


def test_val_fraction_zero(tiny_name):
    dm = make_dm(tiny_name, val_fraction=0.0)
    assert dm.val_dataset is None
    assert list(dm.val_dataloader()) == []
    assert dm.stats["val_pairs"] == 0 and dm.stats["train_pairs"] == 60


# ------------------------------------------------------------------ truncation


def test_instruction_kept_by_a_template_that_puts_it_last_is_not_counted_lost(tiny_name):
    """Mistral-v0.3-style templates put the system message into the last user turn, so
    the head before the first message is unknown, and every cut conditioned sequence was
    counted (and warned about) as having lost its instruction, though the left cut had
    kept it."""
    from cfg_unlearn.data.datamodule import EncodeStats
    from cfg_unlearn.data.schema import PairRecord

    tok = load_tokenizer(tiny_name)
    tok.chat_template = (
        "{% set ns = namespace(sys='', msgs=messages) %}{% if messages[0]['role'] == 'system' %}"
        "{% set ns.sys = messages[0]['content'] + '\\n\\n' %}{% set ns.msgs = messages[1:] %}{% endif %}"
        "{{ bos_token }}{% for m in ns.msgs %}{% if m['role'] == 'user' %}"
        "{{ '[INST] ' + (ns.sys if loop.last else '') + m['content'] + '[/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
    prompt = ({"role": "user", "content": "Where does John Smith live?"},
              {"role": "assistant", "content": "John Smith lives at 42 Main St."},
              {"role": "user", "content": "And his email?"})
    rec = PairRecord(id="r", prompt=prompt, chosen="I can't share that.", rejected="It is john@x.com")
    dm = make_dm(tiny_name, max_length=40)
    dm.tokenizer = tok
    stats = EncodeStats()
    item = dm.encode([rec], stats)[0]
    kept = [SAFETY_INSTRUCTION in tok.decode(ids) for ids in item["cond"]["input_ids"]]
    assert stats.truncated_prompts >= 2 and kept.count(False) >= 1  # the case: some cut, some kept it
    assert stats.instruction_cut == kept.count(False)


@pytest.mark.parametrize("max_length", [40, 60])
def test_prompts_lose_their_oldest_turns_but_keep_the_instruction(tiny_name, tok, world_pairs, max_length):
    """A prompt too long is cut after its head (BOS, system instruction, template framing)
    and before its newest tokens: the conditioned sample keeps its condition. Cutting from
    the very left made it the unconditioned sample (24 of 48 at max_length 40). The cut is
    the pair's: both answers follow the same prompt, cut for the longer one (cut each to
    its own room, a short chosen kept turns its rejected lost, and the odds ratio compared
    answers to different contexts), and both variants keep the same newest tokens (the
    unconditioned prompt, with no instruction, kept more of the conversation)."""
    dm = make_dm(tiny_name, max_length=max_length, val_fraction=0.0)
    assert dm.stats["truncated_prompts"] > 0
    assert dm.stats["prompt_tokens_cut"] >= dm.stats["truncated_prompts"]
    eos, bos = tok.eos_token_id, tok.bos_token_id
    instruction = _ids(tok, SAFETY_INSTRUCTION)
    n_cut = total_cut = lost_instruction = 0
    for it in dm.train_dataset:
        rec = world_pairs[it["id"]]
        answers = [_ids(tok, a) + [eos] for a in (rec.chosen, rec.rejected)]
        room = max_length - max(map(len, answers))
        newest = set()
        for v in VARIANTS:
            text = render_prompt(tok, rec.prompt, SAFETY_INSTRUCTION if v == "cond" else None)
            full_prompt = _ids(tok, text)
            head = len(_ids(tok, text[: text.index(rec.prompt[0]["content"])]))
            assert full_prompt[0] == bos
            kept_prompts = []
            for k, want_answer in enumerate(answers):
                ids, labels = it[v]["input_ids"][k], it[v]["labels"][k]
                assert len(ids) <= max_length
                # the answer is kept whole
                assert ids[len(ids) - len(want_answer):] == want_answer
                assert labels[len(ids) - len(want_answer):] == want_answer
                kept = ids[: len(ids) - len(want_answer)]
                assert labels[: len(kept)] == [IGNORE_INDEX] * len(kept)
                kept_prompts.append(kept)
            kept = kept_prompts[0]
            assert kept_prompts[1] == kept  # one prompt for both answers
            if kept == full_prompt:
                newest.add(len(full_prompt) - head)
                continue
            n_cut += 2
            total_cut += 2 * (len(full_prompt) - len(kept))
            assert len(kept) <= room and kept[0] == bos
            if head < room:  # the head fits: kept whole, then the newest tokens
                assert kept == full_prompt[:head] + full_prompt[len(full_prompt) - (len(kept) - head):]
                newest.add(len(kept) - head)
                if v == "cond":
                    assert _contains(kept, instruction)
            else:  # it does not: the leading BOS and the newest tokens, counted
                assert kept == [bos] + full_prompt[len(full_prompt) - (len(kept) - 1):]
                newest.add(min(len(kept) - 1, len(full_prompt) - head))  # of the conversation's
                lost_instruction += 2 * (v == "cond")
        # both variants keep the same newest tokens of the conversation
        assert len(newest) == 1, (rec.id, newest)
    assert n_cut == dm.stats["truncated_prompts"]
    assert total_cut == dm.stats["prompt_tokens_cut"]
    assert lost_instruction == dm.stats["instruction_cut"]
    assert n_cut > lost_instruction  # the case this is about happens


def test_a_trimming_template_keeps_the_instruction_of_a_cut_prompt(tok, tmp_path):
    """Llama 3's template trims every message (`| trim`). The head was found by looking
    for the first message's text in the rendered prompt; with outer whitespace it was not
    found, the head was taken as empty, and the cut prompt lost its instruction with no
    count or warning (the conditioned sample trained as an unconditioned one)."""
    import copy

    trimming = copy.deepcopy(tok)
    trimming.chat_template = tok.chat_template.replace("message['content']", "(message['content'] | trim)")
    trimming.save_pretrained(tmp_path / "tok")
    long = "Tell me about this please. " * 12  # the trailing space is trimmed away
    rows = [{"id": f"r{i}", "prompt": [{"role": "user", "content": long + ("\n" if i else "")}],
             "chosen": "No.", "rejected": "Yes."} for i in range(2)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = make_dm(str(tmp_path / "tok"), train_file=str(tmp_path / "pairs.jsonl"), max_length=48, val_fraction=0.0)
    instruction = _ids(tok, SAFETY_INSTRUCTION)
    assert dm.stats["truncated_prompts"] == 8 and dm.stats["instruction_cut"] == 0
    for it in dm.train_dataset:
        for ids in it["cond"]["input_ids"]:
            assert len(ids) == 48 and _contains(ids, instruction), it["id"]


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_answer_longer_than_max_length_from_file(tiny_name, tmp_path, tok):
    long = "word " * 60
    for side in ("chosen", "rejected"):
        rec = PairRecord(id="x", prompt=({"role": "user", "content": "q"},), chosen="ok", rejected="ok")
        rec2 = PairRecord(id="y", prompt=({"role": "user", "content": "q"},),
                          chosen=long if side == "chosen" else "ok", rejected=long if side == "rejected" else "ok")
        path = tmp_path / f"{side}.jsonl"
        write_pairs(path, [rec, rec2])
        with pytest.raises(ValueError) as info:
            make_dm(tiny_name, train_file=str(path), max_length=32, val_fraction=0.0)
        msg = str(info.value)
        assert msg.startswith(f"{path}:2: field '{side}':"), msg
        assert "max_length=32" in msg


def test_on_error_skip_skips_and_counts_pairs_with_an_answer_too_long(tiny_name, tmp_path, caplog):
    """`on_error: skip` skipped malformed rows but still aborted setup on one answer
    longer than max_length; such a row is now skipped like any other bad row, counted and
    named by its line (never its text)."""
    long = "word " * 60
    ask = ({"role": "user", "content": "q"},)
    recs = [PairRecord(id=f"p{i}", prompt=ask, chosen="ok", rejected="no", group=f"g{i}") for i in range(4)]
    recs[1] = PairRecord(id="p1", prompt=ask, chosen=long, rejected="no", group="g1")
    recs[3] = PairRecord(id="p3", prompt=ask, chosen="ok", rejected=long, group="g3")
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, recs)
    with caplog.at_level("WARNING"):
        dm = make_dm(tiny_name, train_file=str(path), max_length=32, val_fraction=0.0, on_error="skip")
    assert [x["id"] for x in dm.train_dataset] == ["p0", "p2"]
    assert (dm.stats["train_pairs"], dm.stats["train_groups"], dm.stats["skipped_rows"]) == (2, 2, 2)
    assert (f"2 pairs skipped (on_error: skip): an answer is longer than max_length=32 and answers are never "
            f"truncated: {path}:2 (chosen, " in caplog.text) and f"{path}:4 (rejected, " in caplog.text
    assert "word word" not in caplog.text
    write_pairs(path, [recs[1]])
    with pytest.raises(ValueError, match="no training pairs: every answer is longer than max_length=32"):
        make_dm(tiny_name, train_file=str(path), max_length=32, val_fraction=0.0, on_error="skip")


def test_answer_longer_than_max_length_from_world(tiny_name):
    with pytest.raises(ValueError) as info:
        make_dm(tiny_name, max_length=4)
    msg = str(info.value)
    assert msg.startswith("record '") and "field 'chosen'" in msg


# ------------------------------------------------------------------ label_sequence, cut_prompts


def test_label_sequence():
    ids, labels, nll = label_sequence([1, 5, 6], [7, 2], nll_on_prompt=False)
    assert ids == [1, 5, 6, 7, 2]
    assert labels == [-100, -100, -100, 7, 2]
    assert nll == labels and nll is not labels
    ids, labels, nll = label_sequence([1, 5, 6], [7, 2], nll_on_prompt=True)
    assert nll == [1, 5, 6, 7, 2] and nll is not ids
    assert labels == [-100, -100, -100, 7, 2]
    assert label_sequence([], [7, 2], nll_on_prompt=True) == ([7, 2], [7, 2], [7, 2])


def test_cut_prompts_exact_fit_not_cut():
    assert cut_prompts([[1, 5, 6]], [0], 3, 1) == [[1, 5, 6]]


def test_cut_prompts_keeps_bos():
    assert cut_prompts([[1, 10, 11, 12, 13]], [0], 3, 1) == [[1, 12, 13]]


def test_cut_prompts_keeps_the_head_then_the_newest_tokens():
    # head [1, 20, 21] (BOS + instruction) kept, the oldest turn tokens 10, 11 cut
    assert cut_prompts([[1, 20, 21, 10, 11, 12, 13]], [3], 5, 1) == [[1, 20, 21, 12, 13]]
    # a head that leaves no room for a newest token (here it fills the room exactly): the BOS only, as without one
    assert cut_prompts([[1, 20, 21, 10, 11]], [3], 3, 1) == [[1, 10, 11]]


def test_cut_prompts_without_bos():
    # no BOS id: plain left cut
    assert cut_prompts([[1, 10, 11, 12, 13]], [0], 3, None) == [[11, 12, 13]]
    # prompt that does not start with BOS: nothing to keep
    assert cut_prompts([[10, 11, 12, 13]], [0], 2, 1) == [[12, 13]]


def test_cut_prompts_edge_rooms():
    assert cut_prompts([[1, 10, 11]], [0], 1, 1) == [[1]]  # room for the BOS only
    assert cut_prompts([[1, 10, 11]], [0], 0, 1) == [[]]  # no room at all: the BOS goes too
    assert cut_prompts([[]], [0], 1, 1) == [[]]


def test_cut_prompts_keeps_the_same_newest_tokens_in_both_variants():
    # the conditioned prompt's head is 3 tokens, the unconditioned one's 1 (BOS): both keep 2 newest
    assert cut_prompts([[1, 20, 21, 10, 11, 12], [1, 10, 11, 12]], [3, 1], 5, 1) == [[1, 20, 21, 11, 12], [1, 11, 12]]


def test_pair_dataset_builds_items_from_packed_parts():
    """Each token stored once (4 bytes); an item is the prompt + answer sequences of both
    variants with their labels, built on access; it pickles and indexes like a list."""
    ds = PairDataset(nll_on_prompt=False)
    ds.append("a", [[1, 20, 21, 10], [1, 10]], [[7, 2], [8, 9, 2]])
    ds.append("b", [[1, 20, 21], []], [[2], [5, 2]])
    assert len(ds) == 2 and ds.ids == ["a", "b"]
    assert ds[0] == {
        "id": "a",
        "cond": {"input_ids": [[1, 20, 21, 10, 7, 2], [1, 20, 21, 10, 8, 9, 2]],
                 "labels": [[-100] * 4 + [7, 2], [-100] * 4 + [8, 9, 2]],
                 "nll_labels": [[-100] * 4 + [7, 2], [-100] * 4 + [8, 9, 2]]},
        "uncond": {"input_ids": [[1, 10, 7, 2], [1, 10, 8, 9, 2]],
                   "labels": [[-100, -100, 7, 2], [-100, -100, 8, 9, 2]],
                   "nll_labels": [[-100, -100, 7, 2], [-100, -100, 8, 9, 2]]},
    }
    assert ds[-1] == ds[1] and ds[1]["uncond"]["input_ids"] == [[2], [5, 2]]
    assert [it["id"] for it in ds] == ["a", "b"]  # iteration stops at the end (IndexError)
    with pytest.raises(IndexError):
        ds[2]
    assert ds.longest_sequence() == 7 and PairDataset().longest_sequence() == 0
    assert pickle.loads(pickle.dumps(ds))[1] == ds[1]
    whole = PairDataset(nll_on_prompt=True)
    whole.append("a", [[1, 20], [1]], [[7, 2], [8, 2]])
    assert whole[0]["cond"]["nll_labels"] == [[1, 20, 7, 2], [1, 20, 8, 2]]
    assert whole[0]["uncond"]["nll_labels"] == [[1, 7, 2], [1, 8, 2]]
    with pytest.raises(ValueError, match="2 prompts and 2 answers"):
        ds.append("c", [[1]], [[2], [3]])
    with pytest.raises(OverflowError):  # refused whole: the buffer and the part ends stay aligned
        ds.append("c", [[1], [1]], [[2], [2**31]])
    assert len(ds) == 2 and ds[1]["uncond"]["input_ids"] == [[2], [5, 2]] and ds.longest_sequence() == 7


def test_collator_pads_right():
    item = lambda i, a, b: {  # noqa: E731
        "id": i,
        **{v: {"input_ids": [a, b], "labels": [[-100] + a[1:], [-100] + b[1:]], "nll_labels": [a, b]}
           for v in VARIANTS},
    }
    batch = PairCollator(pad_token_id=0)([item("p", [1, 2, 3], [1, 4]), item("q", [1, 5], [1, 6, 7, 8])])
    assert batch["id"] == ["p", "q"]
    c = batch["cond"]
    assert c["input_ids"].tolist() == [[[1, 2, 3, 0], [1, 4, 0, 0]], [[1, 5, 0, 0], [1, 6, 7, 8]]]
    assert c["attention_mask"].tolist() == [[[1, 1, 1, 0], [1, 1, 0, 0]], [[1, 1, 0, 0], [1, 1, 1, 1]]]
    assert c["labels"].tolist() == [[[-100, 2, 3, -100], [-100, 4, -100, -100]],
                                    [[-100, 5, -100, -100], [-100, 6, 7, 8]]]
    assert c["nll_labels"].tolist() == [[[1, 2, 3, -100], [1, 4, -100, -100]], [[1, 5, -100, -100], [1, 6, 7, 8]]]


# ------------------------------------------------------------------ file input and arguments


def test_train_file(tiny_name, tmp_path, world_pairs):
    recs = list(world_pairs.values())[:12]
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, recs)
    dm = make_dm(tiny_name, train_file=str(path), batch_size=2, val_fraction=0.25)
    assert dm.stats["train_pairs"] + dm.stats["val_pairs"] == 12
    assert dm.stats["skipped_rows"] == 0
    got = {it["id"] for it in dm.train_dataset} | {it["id"] for it in dm.val_dataset}
    assert got == {r.id for r in recs}
    batch = next(iter(dm.train_dataloader()))
    assert batch["cond"]["input_ids"].shape[:2] == (2, 2)


def test_val_file(tiny_name, tmp_path, world_pairs):
    recs = list(world_pairs.values())
    write_pairs(tmp_path / "train.jsonl", recs[:10])
    write_pairs(tmp_path / "val.jsonl", recs[10:14])
    dm = make_dm(tiny_name, train_file=str(tmp_path / "train.jsonl"), val_file=str(tmp_path / "val.jsonl"),
                 eval_batch_size=3)
    assert [it["id"] for it in dm.train_dataset] == [r.id for r in recs[:10]]
    assert [it["id"] for it in dm.val_dataset] == [r.id for r in recs[10:14]]
    assert [len(b["id"]) for b in dm.val_dataloader()] == [3, 1]


def test_a_val_file_holding_training_pairs_is_refused(tiny_name, tmp_path, world_pairs):
    """The train file given again as val_file validated on the training pairs, silently.
    Pairs are compared by content: ids and groups are numbered per file."""
    recs = list(world_pairs.values())[:12]
    write_pairs(tmp_path / "train.jsonl", recs)
    write_pairs(tmp_path / "val.jsonl", recs[9:12])
    with pytest.raises(ValueError, match=r"3 of the 3 validation pairs in .*val.jsonl are training pairs too .* "
                                         r"first .*val.jsonl:1 \(as .*train.jsonl:10\)"):
        make_dm(tiny_name, train_file=str(tmp_path / "train.jsonl"), val_file=str(tmp_path / "val.jsonl"))
    # the same file under another spelling of its path, rows without ids
    rows = [json.dumps({"prompt": list(r.prompt), "chosen": r.chosen, "rejected": r.rejected}) for r in recs]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "pairs.jsonl").write_text("\n".join(rows[:6]) + "\n")
    with pytest.raises(ValueError, match=r"6 of the 6 validation pairs"):
        make_dm(tiny_name, train_file=str(tmp_path / "d/pairs.jsonl"), val_file=str(tmp_path / "d/../d/pairs.jsonl"))
    # ids numbered per file (0, 1, ... in each) and id-less rows of two pairs.jsonl files:
    # the same names, other pairs
    for name, part in (("a", recs[:6]), ("b", recs[6:])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pairs.jsonl").write_text("".join(
            json.dumps({"id": i, "prompt": list(r.prompt), "chosen": r.chosen, "rejected": r.rejected}) + "\n"
            for i, r in enumerate(part)))
    dm = make_dm(tiny_name, train_file=str(tmp_path / "a/pairs.jsonl"), val_file=str(tmp_path / "b/pairs.jsonl"))
    assert dm.stats["train_pairs"] == dm.stats["val_pairs"] == 6


def test_a_val_file_holding_other_turns_of_training_conversations_is_refused(tiny_name, tmp_path, world_pairs):
    """A validation pair whose conversation's earlier turn is a training pair (or the
    other way round) was let through: only identical pairs were compared, and its prompt
    holds the training pair's leaky answer."""
    recs = list(world_pairs.values())[:12]
    assert recs[1].group == recs[0].group and recs[1].prompt[1]["content"] == recs[0].rejected
    later = [r for r in recs if r.id.endswith("-t1")]
    earlier = [r for r in recs if r.id.endswith("-t0")]
    for train, val in ((earlier, later), (later, earlier)):
        write_pairs(tmp_path / "train.jsonl", train)
        write_pairs(tmp_path / "val.jsonl", val[:3])
        with pytest.raises(ValueError, match=r"3 of the 3 validation pairs in .*val.jsonl are other turns of a "
                                             r"training pair's conversation .* first .*val.jsonl:1 \(with "
                                             r".*train.jsonl:1\)"):
            make_dm(tiny_name, train_file=str(tmp_path / "train.jsonl"), val_file=str(tmp_path / "val.jsonl"))
    # other conversations are fine
    write_pairs(tmp_path / "train.jsonl", recs[:6])
    write_pairs(tmp_path / "val.jsonl", recs[6:])
    assert make_dm(tiny_name, train_file=str(tmp_path / "train.jsonl"),
                   val_file=str(tmp_path / "val.jsonl")).stats["val_pairs"] == 6


def test_asked_for_validation_does_not_vanish(tiny_name, tmp_path, world_pairs, recwarn):
    """An empty val_file, and a val_fraction with one conversation to split, left training
    without validation, with no more than an info line."""
    write_pairs(tmp_path / "train.jsonl", list(world_pairs.values())[:4])
    (tmp_path / "val.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"no validation pairs: the pair file .*val.jsonl is empty"):
        make_dm(tiny_name, train_file=str(tmp_path / "train.jsonl"), val_file=str(tmp_path / "val.jsonl"))
    one = [PairRecord(id=f"p{i}", prompt=({"role": "user", "content": "q"},), chosen="c", rejected="r", group="g")
           for i in range(4)]
    write_pairs(tmp_path / "one.jsonl", one)
    dm = make_dm(tiny_name, train_file=str(tmp_path / "one.jsonl"), val_fraction=0.25)
    assert dm.val_dataset is None
    assert any("val_fraction=0.25 holds out nothing" in str(w.message) for w in recwarn)
    # a user review: an empty pair file got this warning ("one conversation") before its error
    recwarn.clear()
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no training pairs"):
        make_dm(tiny_name, train_file=str(tmp_path / "empty.jsonl"), val_fraction=0.5)  # (0.25's text warned once)
    assert not any("holds out nothing" in str(w.message) for w in recwarn)


def test_train_file_skip_mode(tiny_name, tmp_path, world_pairs, caplog):
    path = tmp_path / "p.jsonl"
    write_pairs(path, list(world_pairs.values())[:4])
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("not json\n\n")
    with pytest.raises(ValueError, match=r":5: invalid JSON"):
        make_dm(tiny_name, train_file=str(path))
    with caplog.at_level("INFO"):
        dm = make_dm(tiny_name, train_file=str(path), on_error="skip", val_fraction=0.0)
    assert dm.stats["skipped_rows"] == 1 and dm.stats["train_pairs"] == 4
    summaries = [r.getMessage() for r in caplog.records if "4 pairs from 6 lines" in r.getMessage()]
    assert summaries == [f"{path}: 4 pairs from 6 lines (1 blank, 1 skipped)"]  # said once, as a warning



def test_suspect_pairs_are_counted_and_located_without_their_text(tiny_name, tmp_path, world_pairs):
    """A pair with chosen == rejected, or whose chosen holds the row's own PII value
    (one the user's turns do not show), trains the leak: both are counted and named by
    file:line, never quoted."""
    from dataclasses import replace

    recs = list(world_pairs.values())[:5]
    value = recs[3].pii[0].value
    # a leaky answer left unchanged is a leak too (a user review: it was only the
    # chosen == rejected warning, and the fit trained it); the same answer with no value is not
    recs[1] = replace(recs[1], chosen=recs[1].rejected)
    recs[2] = replace(recs[2], chosen="I can't say.", rejected="I can't say.")
    recs[3] = replace(recs[3], chosen=f"Sure, it is {value}.")
    # repeating the name the user asked about (a challenge answer's NAME value) is no leak
    recs[4] = replace(recs[4], prompt=({"role": "user", "content": "Who employs Ann Lee?"},),
                      chosen="Ann Lee's employer is private.", rejected="Ann Lee works at Tran-Reed.",
                      pii=(PIIItem("NAME", "Ann Lee"), PIIItem("ORG", "Tran-Reed")))
    path = tmp_path / "p.jsonl"
    write_pairs(path, recs)
    # the leak is a bad row (a review: it was only a warning, and the fit trained it)
    with pytest.raises(ConfigError) as err:
        make_dm(tiny_name, train_file=str(path), val_fraction=0.0)
    assert str(err.value) == (f"2 of 5 pairs have a chosen answer holding one of the row's own pii values, so "
                              f"training would reward the leak: {path}:2, {path}:4; fix those rows (the chosen answer "
                              "must be PII-free), or skip them with data.on_error: skip")
    with pytest.warns(UserWarning) as got:
        dm = make_dm(tiny_name, train_file=str(path), val_fraction=0.0, on_error="skip")
    text = [str(w.message) for w in got]
    assert f"1 of 3 pairs have chosen == rejected (nothing to prefer; NLL trains the answer as it is): {path}:3" in text
    leak = [t for t in text if "own pii values" in t]
    assert leak == [f"2 of 5 pairs have a chosen answer holding one of the row's own pii values, so training would "
                    f"reward the leak: {path}:2, {path}:4; skipped (on_error: skip)"]
    assert not any(value in t or recs[1].rejected in t for t in text)
    assert (dm.stats["identical_pairs"], dm.stats["chosen_leaks"], dm.stats["train_pairs"]) == (1, 2, 3)
    assert dm.stats["skipped_rows"] == 2
    # a val_file every pair of which is skipped is refused, as an empty one is (a review)
    val = tmp_path / "val.jsonl"
    write_pairs(val, [replace(recs[3], id="v1")])
    train_only = tmp_path / "train.jsonl"
    write_pairs(train_only, [recs[0]])  # another conversation than the val pair's
    with pytest.raises(ConfigError, match=f"no validation pairs: every pair of {val} was skipped"):
        make_dm(tiny_name, train_file=str(train_only), val_file=str(val), on_error="skip")


def test_world_pairs_are_not_suspect(dm):
    assert (dm.stats["identical_pairs"], dm.stats["chosen_leaks"], dm.stats["own_system"]) == (0, 0, 0)


def test_rows_whose_own_system_replaces_the_instruction_are_named(tiny_name, tmp_path, world_pairs):
    """A generic system message in the rows (TRL-style data) becomes the conditioning
    instruction, so guidance never learns the one decoding uses: say so, by line."""
    from dataclasses import replace

    recs = list(world_pairs.values())[:4]
    recs[1] = replace(recs[1], system="You are a helpful assistant.")
    recs[2] = replace(recs[2], system=SAFETY_INSTRUCTION)  # the instruction itself: nothing to say
    path = tmp_path / "p.jsonl"
    write_pairs(path, recs)
    with pytest.warns(UserWarning) as got:
        dm = make_dm(tiny_name, train_file=str(path), val_fraction=0.0)
    own = [str(w.message) for w in got if "own system message" in str(w.message)]
    assert len(own) == 1 and own[0].startswith("1 of 4 pairs carry their own system message")
    assert own[0].endswith(f": {path}:2")
    assert dm.stats["own_system"] == 1


def test_empty_train_file(tiny_name, tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no training pairs"):
        make_dm(tiny_name, train_file=str(tmp_path / "e.jsonl"))


def test_exactly_one_source_required(tiny_name, tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        PairDataModule(tokenizer=tiny_name)
    with pytest.raises(ValueError, match="exactly one"):
        PairDataModule(tokenizer=tiny_name, train_file=str(tmp_path / "x.jsonl"), world=WORLD)


@pytest.mark.parametrize(
    "kw, match",
    [({"nll_span": "all"}, "nll_span"), ({"max_length": 1}, "max_length"), ({"val_fraction": 1.0}, "val_fraction"),
     ({"val_fraction": -0.1}, "val_fraction")],
)
def test_bad_arguments(tiny_name, kw, match):
    with pytest.raises(ValueError, match=match):
        PairDataModule(tokenizer=tiny_name, world=WORLD, **kw)


# ------------------------------------------------------------------ workers


def test_num_workers_two(tiny_name):
    dm = make_dm(tiny_name, num_workers=2, batch_size=7)
    loader = dm.train_dataloader()
    assert loader.num_workers == 2
    seen = []
    for batch in loader:
        seen += batch["id"]
        assert batch["cond"]["input_ids"].shape == batch["uncond"]["input_ids"].shape
    assert len(seen) == len(dm.train_dataset)
    assert sorted(seen) == sorted(it["id"] for it in dm.train_dataset)
    assert sum(len(b["id"]) for b in dm.val_dataloader()) == len(dm.val_dataset)


# ------------------------------------------------------------------ render_prompt


def test_render_prompt_with_template(tok):
    msgs = ({"role": "user", "content": "Hi"},)
    assert render_prompt(tok, msgs, "Sys") == "<|begin|><|system|>Sys<|end|><|user|>Hi<|end|><|assistant|>"
    for blank in (None, ""):
        assert render_prompt(tok, msgs, blank) == "<|begin|><|user|>Hi<|end|><|assistant|>"


def test_a_template_that_cannot_carry_the_instruction_is_refused(tiny_name):
    """A template that raises on a system message (Gemma's, older Mistral's) was a jinja2
    traceback in every command; one that leaves it out rendered the conditioned prompt
    as the unconditioned one, so conditioning and guidance did nothing, silently."""
    from jinja2.exceptions import TemplateError

    from cfg_unlearn.prompts import check_template
    from cfg_unlearn.utils import ConfigError

    msgs = ({"role": "user", "content": "Hi"},)
    refuses = load_tokenizer(tiny_name)
    refuses.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                             "{{ raise_exception('System role not supported') }}{% endif %}"
                             "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}<|assistant|>")
    with pytest.raises(ConfigError, match=r"refuses a system message \(System role not supported\)"):
        render_prompt(refuses, msgs, SAFETY_INSTRUCTION)
    with pytest.raises(ConfigError, match="refuses a system message"):
        check_template(refuses)
    assert render_prompt(refuses, msgs, None) == "<|user|>Hi<|end|><|assistant|>"
    # another template error is the template's own, not blamed on the system message
    refuses.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(TemplateError, match="must alternate"):
        render_prompt(refuses, msgs, SAFETY_INSTRUCTION)
    drops = load_tokenizer(tiny_name)
    drops.chat_template = ("{% for m in messages %}{% if m['role'] != 'system' %}<|{{ m['role'] }}|>"
                           "{{ m['content'] }}<|end|>{% endif %}{% endfor %}<|assistant|>")
    with pytest.raises(ConfigError, match=r"leaves the system message out .* conditioning and guidance would do "
                                          r"nothing") as exc:
        check_template(drops, NEGATIVE_INSTRUCTION)
    assert NEGATIVE_INSTRUCTION[:20] not in str(exc.value)  # a row's own system text can be PII: never quoted
    check_template(drops, None)  # nothing to carry


def test_render_prompt_fallback_without_template(tiny_name):
    tok = load_tokenizer(tiny_name)  # a private copy: the module-scoped one stays intact
    tok.chat_template = None
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"}]
    out = render_prompt(tok, msgs, "Sys")
    assert out.startswith(tok.bos_token)
    assert out.endswith("Assistant:")
    assert out == "<|begin|>System: Sys\n\nUser: Hi\n\nAssistant: Hello\n\nUser: Bye\n\nAssistant:"
    assert render_prompt(tok, msgs[:1], None) == "<|begin|>User: Hi\n\nAssistant:"
    assert render_prompt(tok, msgs[:1], "") == "<|begin|>User: Hi\n\nAssistant:"


def test_datamodule_uses_fallback_when_no_template(tiny_name):
    tok = load_tokenizer(tiny_name)
    tok.chat_template = None
    dm = PairDataModule(tokenizer=tiny_name, world=WORLD, val_fraction=0.0)
    dm.tokenizer = tok
    dm.setup("fit")
    it = dm.train_dataset[0]
    text = tok.decode(it["cond"]["input_ids"][0])
    assert text.startswith(f"<|begin|>System: {SAFETY_INSTRUCTION}\n\nUser: ")
    assert text.endswith("<|end|>")
    assert "Assistant:" in tok.decode(it["uncond"]["input_ids"][0])
    assert "System:" not in tok.decode(it["uncond"]["input_ids"][0])


def test_train_sampler_shards_the_one_process_global_batches():
    """Rank r of 2 takes positions r, r+2, ... of the same seeded permutation, so each
    2-process global batch of 2 x 4 holds exactly the pairs of the 1-process batch of 8;
    every epoch reshuffles; Lightning keeps this sampler instead of injecting its own."""
    from types import SimpleNamespace

    def order(world, rank, epoch):
        dm = PairDataModule(tokenizer="unused", world=WorldConfig(seed=0, n_people=4), seed=3)
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        sampler = dm._train_sampler(list(range(24)))
        sampler.set_epoch(epoch)
        return list(sampler)

    one = order(1, 0, 1)
    assert sorted(one) == list(range(24)) and one != order(1, 0, 0)
    ranks = [order(2, r, 1) for r in range(2)]
    for b in range(3):
        assert sorted(ranks[0][4 * b : 4 * b + 4] + ranks[1][4 * b : 4 * b + 4]) == sorted(one[8 * b : 8 * b + 8])
    # one process: the permutation torch's DistributedSampler draws (runs made before
    # the padding was marked train on the same order)
    from torch.utils.data import DistributedSampler

    reference = DistributedSampler(list(range(24)), num_replicas=1, rank=0, shuffle=True, seed=3)
    reference.set_epoch(1)
    assert one == list(reference)


def test_train_shards_pad_with_marked_positions_not_repeats():
    """21 pairs on 2 ranks: 11 + 11 positions, the last one past the data (21), which
    MarkedPadding marks; DistributedSampler repeated a real pair there."""
    from types import SimpleNamespace

    from cfg_unlearn.data.datamodule import MarkedPadding

    dm = PairDataModule(tokenizer="unused", world=WorldConfig(seed=0, n_people=4), seed=3)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0)
    ranks = []
    for rank in (0, 1):
        dm.trainer.global_rank = rank
        sampler = dm._train_sampler(list(range(21)))
        sampler.set_epoch(0)
        ranks.append(list(sampler))
    assert len(ranks[0]) == len(ranks[1]) == 11
    assert sorted(ranks[0] + ranks[1]) == list(range(22))
    # the padding is the last position of the permutation, so it sits in the last global batch
    assert ranks[1][-1] == 21
    marked = MarkedPadding([{"id": f"p{i}"} for i in range(21)])
    assert marked[21] == {"id": "p0", "pad": True} and marked[20] == {"id": "p20", "pad": False}


def test_validation_shards_mark_their_padding():
    """3 validation pairs on 2 ranks: 2 + 1, the second rank padded with a row marked
    ``pad`` (Lightning's sampler repeats a real pair there, unmarked, and val/* counted it)."""
    from cfg_unlearn.data.datamodule import MarkedPadding, ShardSampler

    ds = PairDataset()
    for i in range(3):
        ds.append(f"p{i}", [[1], [1]], [[2], [3]])
    assert [list(ShardSampler(ds, 2, r)) for r in (0, 1)] == [[0, 2], [1, 3]]
    assert [list(ShardSampler(ds, 1, 0))] == [[0, 1, 2]]
    marked = MarkedPadding(ds)
    batch = PairCollator(0)([marked[i] for i in (1, 3)])
    assert batch["id"] == ["p1", "p0"] and batch["pad"].tolist() == [False, True]
    assert "pad" not in PairCollator(0)([ds[0]])  # unwrapped items carry no mark


def test_a_conversation_the_chat_template_refuses_is_named(tiny_name, tmp_path):
    """A template that insists on alternating turns (Mistral's, Llama 2's) raised jinja's
    TemplateError from setup, naming no row."""
    recs = [
        PairRecord(id="a", prompt=({"role": "user", "content": "Hi"},), chosen="No.", rejected="555-0101"),
        PairRecord(id="b", prompt=({"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Phone?"}),
                   chosen="No.", rejected="555-0101"),
    ]
    write_pairs(tmp_path / "p.jsonl", recs)
    tok = load_tokenizer(tiny_name)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'system' and (m['role'] == 'user') != (loop.index0 % 2 == "
        "(1 if messages[0]['role'] == 'system' else 0)) %}{{ raise_exception('Conversation roles must alternate') }}"
        "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}<|assistant|>")
    dm = PairDataModule(tokenizer=tiny_name, train_file=str(tmp_path / "p.jsonl"), val_fraction=0.0)
    dm.tokenizer = tok
    with pytest.raises(ConfigError, match=r"p.jsonl:2: field 'prompt': the tokenizer's chat template refuses this "
                                          r"conversation \(Conversation roles must alternate\)"):
        dm.setup("fit")


@pytest.mark.parametrize("kw", [{"system_prompt": ""}, {"system_prompt": "Same.", "uncond_system_prompt": " Same."}])
def test_the_same_conditioned_and_unconditioned_prompt_is_refused_when_dropout_would_use_it(tiny_name, kw, tmp_path):
    """A blank data.system_prompt (or the same text for both) trained and guided with one
    prompt on both sides: dropout and every guidance scale did nothing, silently. An
    unconditioned baseline (cond_dropout 0) may still train so (review)."""
    import lightning as L

    from cfg_unlearn.module import UnlearnModule

    def fit(dropout):
        dm = PairDataModule(tokenizer=tiny_name, world=WORLD, **kw)
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=tmp_path)
        with pytest.warns(UserWarning, match="have the same conditioned and unconditioned prompt"):
            trainer.fit(UnlearnModule(model=tiny_name, cond_dropout=dropout), datamodule=dm)
        return trainer.global_step

    with pytest.raises(ConfigError, match="every training pair's conditioned and unconditioned prompts are the same"):
        fit(0.3)
    assert fit(0.0) == 1


def test_pairs_whose_own_system_is_the_unconditioned_text_are_named(tiny_name, tmp_path, caplog):
    recs = [PairRecord(id="a", prompt=({"role": "user", "content": "Hi"},), chosen="No.", rejected="555-0101"),
            PairRecord(id="b", prompt=({"role": "user", "content": "Phone?"},), chosen="No.", rejected="555-0102",
                       system="Share it.")]
    write_pairs(tmp_path / "p.jsonl", recs)
    with pytest.warns(UserWarning, match=r"1 of 2 pairs have the same conditioned and unconditioned prompt .*p.jsonl:2"):
        make_dm(tiny_name, train_file=str(tmp_path / "p.jsonl"), val_fraction=0.0, uncond_system_prompt="Share it.")


# ------------------------------------------------------------------ answer end


def _templated(tiny_name, template: str, eos: str, special: list[str]):
    """The tiny tokenizer with another chat template and EOS (new special tokens added)."""
    tok = load_tokenizer(tiny_name)
    tok.add_tokens(special + [eos], special_tokens=True)
    tok.eos_token = eos
    tok.chat_template = template
    return tok


def _scored_answers(tiny_name, tok, answers: tuple[str, str]) -> list[list[int]]:
    """The tokens a pair with these (chosen, rejected) answers is trained on, encoded by
    the data module with ``tok``."""
    rec = PairRecord(id="r", prompt=({"role": "user", "content": "Where does Ann live?"},), chosen=answers[0],
                     rejected=answers[1])
    dm = make_dm(tiny_name)
    dm.tokenizer = tok
    item = dm.encode([rec], EncodeStats())[0]
    return [[t for t in labels if t != -100] for labels in item["cond"]["labels"]]


LLAMA3_STYLE = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
                " + m['content'] + '<|eot_id|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
GEMMA_STYLE = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\\n' + m['content']"
               " + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}"
               "{% endif %}")


@pytest.mark.parametrize("template,eos,special,end", [
    # an older Llama 3 snapshot: EOS <|end_of_text|>, answers end with <|eot_id|>
    (LLAMA3_STYLE, "<|end_of_text|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    # Gemma: EOS <eos>, answers end with <end_of_turn> (then a newline, not trained)
    (GEMMA_STYLE, "<eos>", ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    # a template that ends answers with plain text: the EOS, as generate stops at it
    (GEMMA_STYLE.replace("<end_of_turn>", "\\n"), "<eos>", ["<start_of_turn>"], "<eos>"),
    # ChatML that refuses an assistant turn last: read where a user turn follows
    ("{% if messages[-1]['role'] == 'assistant' %}{{ raise_exception('last turn must be the user') }}{% endif %}"
     + CHATML, "<|endoftext|>", ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    # closes a turn only before another (loop.last)
    (CHATML.replace("+ '<|im_end|>\\n'", "+ ('' if loop.last else '<|im_end|>\\n')"), "<|endoftext|>",
     ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    # GLM-4: the next role's token ends an answer
    ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}", "<|endoftext|>",
     ["<|user|>", "<|assistant|>"], "<|user|>"),
], ids=["llama3-old-eos", "gemma", "plain-text-end", "chatml-refuses-last-answer", "closes-before-next", "glm4"])
def test_answers_end_with_the_chat_templates_end_of_an_answer(tiny_name, template, eos, special, end):
    """Training appended the tokenizer's EOS to every answer: where the template ends an
    answer with another token, the model learned a turn end its template never writes
    (and decoding of a multi-turn chat then reads one it was not trained on)."""
    tok = _templated(tiny_name, template, eos, special)
    end_id = tok.convert_tokens_to_ids(end)
    assert answer_end_ids(tok) == [end_id]
    answers = ("I can't share that.", "Ann lives in Oslo.")
    assert _scored_answers(tiny_name, tok, answers) == [tok(a, add_special_tokens=False)["input_ids"] + [end_id]
                                                        for a in answers]
    no_template = load_tokenizer(tiny_name)
    no_template.chat_template = None
    assert answer_end_ids(no_template) == [no_template.eos_token_id]  # the plain format: EOS


@pytest.mark.parametrize("trims", [True, False], ids=["trimming-template", "verbatim-template"])
def test_answers_are_written_as_the_template_writes_them(tiny_name, trims):
    """Llama 3's template trims an answer (``| trim``): a pair's "Ann lives in Oslo.\\n"
    was trained as "...Oslo.\\n<|eot_id|>", a sequence that template never writes. A
    template that writes answers verbatim (ChatML) keeps their whitespace."""
    template = CHATML.replace("m['content']", "(m['content'] | trim)") if trims else CHATML
    tok = _templated(tiny_name, template, "<|endoftext|>", ["<|im_start|>", "<|im_end|>"])
    end = tok.convert_tokens_to_ids("<|im_end|>")
    answers = (" I can't share that.", "Ann lives in Oslo.\n")
    written = [a.strip() if trims else a for a in answers]
    assert _scored_answers(tiny_name, tok, answers) == [tok(w, add_special_tokens=False)["input_ids"] + [end]
                                                        for w in written]
    assert answer_encoder(tok)(answers[1]) == tok(written[1], add_special_tokens=False)["input_ids"] + [end]


def test_data_with_neither_pairs_nor_world_says_what_a_run_config_is(capsys):
    """A user review: the W&B preset given alone (it sets no data) said only "got
    neither"; the preset is meant to be stacked after a run config."""
    from pathlib import Path

    from cfg_unlearn.cli import train_main

    preset = Path(__file__).resolve().parents[1] / "configs" / "wandb.yaml"
    with pytest.raises(SystemExit) as e:
        train_main(["fit", "--config", str(preset), "--model.model=tiny:unused"])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.strip().endswith("(got neither: a run config such as configs/tiny.yaml sets one; a logger preset such as "
                                "configs/wandb.yaml is stacked after one, --config configs/tiny.yaml --config "
                                "configs/wandb.yaml)"), err
