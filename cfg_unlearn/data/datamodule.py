"""PairDataModule: pairs -> token tensors, with a conditioned and an unconditioned
variant of every pair so that the module's conditioning hook can pick per sample.

Layout of a batch (``B`` pairs, ``L`` = longest sequence in the batch, right padded)::

    batch["cond"]["input_ids"]      (B, 2, L)   [:, 0] = prompt+chosen, [:, 1] = prompt+rejected
    batch["cond"]["attention_mask"] (B, 2, L)
    batch["cond"]["labels"]         (B, 2, L)   -100 on prompt and padding (response + its end token only)
    batch["cond"]["nll_labels"]     (B, 2, L)   labels of the NLL term: == labels for
                                                nll_span="response"; prompt too for "prompt_response"
    batch["uncond"][...]            same, with the system instruction blanked (or replaced
                                    by ``uncond_system_prompt``, the negative instruction)
    batch["id"]                     B pair ids
    batch["pad"]                    (B,) bool  training and validation batches: True on a
                                    row that only pads a rank's shard (``ShardSampler``)

Both variants share one ``L`` so the hook can choose rows with a ``torch.where``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
from jinja2.exceptions import TemplateError
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cfg_unlearn.data.schema import DEFAULT_MAX_CHARS, PairRecord, PIIItem, read_pairs, user_text
from cfg_unlearn.data.world import World, WorldConfig
from cfg_unlearn.models import load_tokenizer
from cfg_unlearn.pii import ValueIndex, contains_value
from cfg_unlearn.prompts import SAFETY_INSTRUCTION, answer_encoder, answer_end_ids, render_prompt
from cfg_unlearn.tiny import resolve_pretrained
from cfg_unlearn.utils import ConfigError, check_input_file, dataclass_from

log = logging.getLogger(__name__)
# the data module's hyperparameters (saved in every checkpoint) may hold a WorldConfig:
# a plain dataclass of numbers, safe for torch.load(weights_only=True), which resume uses
torch.serialization.add_safe_globals([WorldConfig])

IGNORE_INDEX = -100
VARIANTS = ("cond", "uncond")


@dataclass
class EncodeStats:
    pairs: int = 0
    truncated_prompts: int = 0  # sequences whose prompt lost its oldest turns' tokens
    prompt_tokens_cut: int = 0
    instruction_cut: int = 0  # ... and even the instruction: it left no room for the newest tokens
    #: where the pairs skipped for an answer longer than max_length are (on_error: skip)
    too_long: list[str] = field(default_factory=list)


def audit_pairs(records: Sequence[PairRecord]) -> dict[str, list[PairRecord]]:
    """Pairs that teach nothing or the wrong thing: ``chosen_leaks`` (the chosen answer
    holds one of the row's own ``pii`` values that the user's turns do not show, so
    training rewards the leak; repeating the name the user asked about is no leak; an
    unchanged leaky answer is one) and ``identical`` (chosen == rejected, leaking nothing:
    the odds-ratio and DPO terms are constant, NLL trains the answer as it is)."""
    out: dict[str, list[PairRecord]] = {"identical": [], "chosen_leaks": []}
    for rec in records:
        # the index compiles a value's pattern only when the chosen answer holds a sign of
        # it: most rows compile nothing (contains_value on every value compiled each one,
        # 0.9 ms a row past value_pattern's cache: minutes per setup on a large file)
        found = ValueIndex(rec.pii).find(rec.chosen)
        if found and any(not contains_value(user_text(rec.prompt), p.value, p.type) for p in found):
            # first: a leaky answer left unchanged (chosen == rejected) is a leak trained
            # outright, not only a pair that teaches nothing (a user review: it was warned of)
            out["chosen_leaks"].append(rec)
        elif rec.chosen.strip() == rec.rejected.strip():
            out["identical"].append(rec)
    return out


def where_pair(rec: PairRecord) -> str:
    """A pair named by its ``file:line`` (or id), never by its text, which holds PII."""
    return rec.source or f"id {rec.id!r}"


def named_places(records: Sequence[PairRecord]) -> str:
    """The first five pairs' :func:`where_pair`, for a message."""
    return ", ".join(map(where_pair, records[:5])) + (", ..." if len(records) > 5 else "")


def label_sequence(prompt_ids: list[int], answer_ids: list[int], *, nll_on_prompt: bool,
                   ) -> tuple[list[int], list[int], list[int]]:
    """prompt + answer (ending with its end token, :func:`answer_end_ids`) -> (input_ids,
    labels, nll_labels): ``labels`` score the answer alone (``-100`` on the prompt); ``nll_labels`` are the
    labels of the NLL term, the whole sequence with ``nll_on_prompt``. Three new lists."""
    ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return ids, labels, (ids[:] if nll_on_prompt else labels[:])


def cut_prompts(prompts: Sequence[list[int]], heads: Sequence[int], room: int, bos_id: int | None) -> list[list[int]]:
    """The prompts of one pair's variants (conditioned, unconditioned) cut to ``room``
    tokens each (``max_length`` less the longer answer: answers are kept whole). A prompt
    too long is cut from the left *after* its head (``heads``: the BOS, the system
    instruction, the template's framing; the conditioned sample must keep its condition,
    or it trains as the unconditioned one), so the oldest turns go first, and each keeps
    the *same number* of newest tokens, so the variants still differ by their instruction
    alone (cut each to its own room, the variant with the shorter instruction kept more
    of the conversation). A head that leaves no room for a newest token (a prompt of the
    instruction alone, with no question, teaches nothing) is dropped but for a leading
    BOS; no room at all drops the BOS too."""
    spans = []
    for prompt, head in zip(prompts, heads):
        bos = 1 if bos_id is not None and prompt and prompt[0] == bos_id else 0
        head = max(head, bos)
        spans.append(head if head < room else (bos if room >= 1 else 0))
    if all(len(p) <= room for p in prompts) and len({len(p) - h for p, h in zip(prompts, spans)}) <= 1:
        return [list(p) for p in prompts]  # nothing to cut, nothing to align
    newest = min(room - h for h in spans)
    return [list(p) if len(p) - h <= newest else p[:h] + p[len(p) - newest:] for p, h in zip(prompts, spans)]


#: stands in for the first message when the template is rendered to measure its head:
#: plain letters, which no template trims, escapes or re-cases
HEAD_SENTINEL = "cfgunlearnfirstmessage"


def instruction_head(tok, prompt_ids: list[int], text: str, system: str | None,
                     messages: Sequence[dict[str, str]]) -> int | None:
    """How many leading tokens of the rendered prompt ``text`` (``prompt_ids``) come
    before its first conversation message: the BOS, the system instruction and the
    template's framing. Measured by rendering the template with a sentinel as the first
    message, not by finding that message in ``text``: templates rewrite it (Llama 3's
    ``| trim`` drops its outer whitespace, so it was not found and the head was taken to
    be empty). None when it cannot be told (the template renders no common head)."""
    if not messages:
        return 0
    try:
        probe = render_prompt(tok, [{**messages[0], "content": HEAD_SENTINEL}], system)
    except Exception:  # noqa: BLE001 - a template that refuses a lone first message: unknown
        return None
    at = probe.find(HEAD_SENTINEL)
    if at < 0 or not text.startswith(probe[:at]):
        return None
    head_ids = tok(probe[:at], add_special_tokens=False)["input_ids"]
    n = 0  # the tokens the prompt shares with its head (a merge across the boundary can differ)
    while n < min(len(head_ids), len(prompt_ids)) and head_ids[n] == prompt_ids[n]:
        n += 1
    return n


class PairDataset(Dataset):
    """Encoded pairs, packed: each pair's two prompts (one per variant, already cut to
    ``max_length``) and two answers (with their end token) in one growing int32 buffer, each token
    stored once, 4 bytes. An item is built as plain lists on access, labels included
    (``-100`` on the prompt; ``nll_labels`` the whole sequence when ``nll_on_prompt``).
    Storing the items themselves took 12 Python int lists per pair (2 variants x 2
    answers x ids, labels, NLL labels), 42 bytes a token: 18 GB per rank for 500k pairs
    of 860 tokens; and DataLoader workers forked from a process holding them copied their
    pages as they touched each int's reference count. Pickles as bytes (spawned workers)."""

    def __init__(self, nll_on_prompt: bool = False):
        self.nll_on_prompt = nll_on_prompt
        self.ids: list[str] = []
        self._tokens = array("i")
        # where each part ends in _tokens: cond prompt, uncond prompt, chosen, rejected
        self._ends = array("q")

    def append(self, pair_id: str, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> None:
        """Add a pair: its prompt per variant (``VARIANTS`` order) and its chosen and
        rejected answer ids."""
        if len(prompts) != len(VARIANTS) or len(answers) != 2:
            raise ValueError(f"a pair has {len(VARIANTS)} prompts and 2 answers, got {len(prompts)} and {len(answers)}")
        parts = [array("i", part) for part in (*prompts, *answers)]  # an id past int32 fails here, nothing added
        for part in parts:
            self._tokens.extend(part)
            self._ends.append(len(self._tokens))
        self.ids.append(pair_id)

    def __len__(self) -> int:
        return len(self.ids)

    def _spans(self, i: int) -> list[tuple[int, int]]:
        """Where pair ``i``'s parts (:data:`_PARTS`) lie in the buffer: ``(start, end)`` each."""
        k = len(_PARTS) * i
        starts = [self._ends[k - 1] if k else 0, *self._ends[k : k + len(_PARTS) - 1]]
        return list(zip(starts, self._ends[k : k + len(_PARTS)]))

    def _parts(self, i: int) -> list[list[int]]:
        """Pair ``i``'s cond prompt, uncond prompt, chosen and rejected ids."""
        return [self._tokens[start:end].tolist() for start, end in self._spans(i)]

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.ids)
        if not -n <= i < n:
            raise IndexError(f"pair {i} of {n}")
        i %= n
        *prompts, chosen, rejected = self._parts(i)
        item: dict[str, Any] = {"id": self.ids[i]}
        for v, prompt in zip(VARIANTS, prompts):
            seqs = [label_sequence(prompt, a, nll_on_prompt=self.nll_on_prompt) for a in (chosen, rejected)]
            item[v] = {key: [s[k] for s in seqs] for k, key in enumerate(("input_ids", "labels", "nll_labels"))}
        return item

    def longest_sequence(self) -> int:
        """Tokens of the longest prompt + answer sequence; 0 when empty."""
        longest = 0
        for i in range(len(self.ids)):
            lengths = [end - start for start, end in self._spans(i)]
            longest = max(longest, max(lengths[: len(VARIANTS)]) + max(lengths[len(VARIANTS):]))
        return longest


_PARTS = (*VARIANTS, "chosen", "rejected")


def pair_fingerprint(item: dict[str, Any]) -> int:
    """CRC-32 of an encoded pair's token ids and labels, both variants and both answers:
    what a reference log-prob was scored on. A pair keeps its id when its text, the
    tokenizer, ``max_length`` or the instruction change (the synthetic world's ids under
    another seed, ``file:line`` of a regenerated file), so an id alone cannot tell a
    precomputed reference table that it is stale."""
    return zlib.crc32(json.dumps([[item[v][k] for k in ("input_ids", "labels")] for v in VARIANTS]).encode())


class ShardSampler(DistributedSampler):
    """Rank ``r`` of ``W`` takes positions ``r, r+W, ...`` of the order (training: the
    seeded permutation of ``seed + epoch``, as ``DistributedSampler`` draws it; validation:
    the pairs in order) padded to a multiple of ``W`` (every rank runs the same number of
    batches, as collectives need) with positions at or past the data set's length, which
    :class:`MarkedPadding` marks as padding. ``DistributedSampler`` pads with repeats of
    real pairs instead, unmarked: ``val/*`` then counted them twice (3 pairs on 2 ranks:
    accuracy 2/4 where one process has 1/3), and training gave them double weight (21
    pairs on 2 ranks: the last step's weights 4e-4 off the one-process run's). Lightning
    keeps a ``DistributedSampler`` as given and calls ``set_epoch`` on it."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = False, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        order += range(n, self.total_size)
        return iter(order[self.rank : self.total_size : self.num_replicas])


class MarkedPadding(Dataset):
    """``dataset`` read at positions past its end too (they wrap around), each item
    marked ``pad``: True past the end (:class:`ShardSampler`'s padding)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self.dataset)
        return {**self.dataset[i % n], "pad": i >= n}


class PairCollator:
    """Right-pads cond/uncond x chosen/rejected to one length per batch."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        length = max(len(seq) for it in items for v in VARIANTS for seq in it[v]["input_ids"])
        batch: dict[str, Any] = {"id": [it["id"] for it in items]}
        if "pad" in items[0]:  # which rows only pad a rank's shard (ShardSampler)
            batch["pad"] = torch.tensor([it["pad"] for it in items])
        for v in VARIANTS:
            out = {
                "input_ids": torch.full((len(items), 2, length), self.pad_token_id, dtype=torch.long),
                "attention_mask": torch.zeros((len(items), 2, length), dtype=torch.long),
                "labels": torch.full((len(items), 2, length), IGNORE_INDEX, dtype=torch.long),
                "nll_labels": torch.full((len(items), 2, length), IGNORE_INDEX, dtype=torch.long),
            }
            for b, it in enumerate(items):
                for k in range(2):
                    n = len(it[v]["input_ids"][k])
                    out["input_ids"][b, k, :n] = torch.tensor(it[v]["input_ids"][k])
                    out["attention_mask"][b, k, :n] = 1
                    out["labels"][b, k, :n] = torch.tensor(it[v]["labels"][k])
                    out["nll_labels"][b, k, :n] = torch.tensor(it[v]["nll_labels"][k])
            batch[v] = out
        return batch


def _hash_message(h, role: str, content: str) -> None:
    """Feed one message to a running hash, length-prefixed (no two message lists feed
    the same bytes)."""
    for part in (role, content):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "big") + data)


def _exchange_key(r: PairRecord) -> bytes:
    """The pair as its conversation's later turns see it (also a pair's identity: its
    prompt and leaky answer): a digest of those messages, as :func:`_earlier_keys` gives
    the same messages in a later pair's prompt."""
    h = hashlib.blake2b(digest_size=16)
    for m in r.prompt:
        _hash_message(h, m["role"], m["content"])
    _hash_message(h, "assistant", r.rejected)
    return h.digest()


def _earlier_keys(r: PairRecord) -> list[bytes]:
    """The exchanges the pair's prompt already holds (its conversation's earlier turns),
    each the digest of the prompt up to one of its assistant turns: one running hash, so
    a conversation of n turns costs its length, not n times it (a JSON key per prefix
    took 5 s for 200 conversations of 40 turns)."""
    h, out = hashlib.blake2b(digest_size=16), []
    for m in r.prompt:
        _hash_message(h, m["role"], m["content"])
        if m["role"] == "assistant":
            out.append(h.copy().digest())
    return out


def conversations(records: list[PairRecord]) -> dict[str, str]:
    """Each ``group`` -> its conversation's (the smallest group name joined to it): groups
    joined where one pair's prompt holds another's prompt and leaky answer (later turns
    of one conversation) or two pairs are the same exchange. Rows without a ``group``
    (TRL-style files) are each their own group (their id), so a turn-2 row and the
    turn-1 row its prompt repeats were split apart, one to validation."""
    parent: dict[str, str] = {r.group: r.group for r in records}

    def root(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    def join(a: str, b: str) -> None:
        a, b = root(a), root(b)
        if a != b:
            parent[max(a, b)] = min(a, b)

    owner: dict[str, str] = {}
    for r in records:
        join(owner.setdefault(_exchange_key(r), r.group), r.group)
    for r in records:
        for k in _earlier_keys(r):
            if k in owner:
                join(owner[k], r.group)
    return {g: root(g) for g in parent}


def split_by_group(records: list[PairRecord], val_fraction: float, seed: int) -> tuple[list, list]:
    """Train/val split by conversation (``group``, and the turns of one conversation
    found by content: :func:`conversations`), never by sample: no conversation
    contributes to both sides. Seeded and independent of input order."""
    conv = conversations(records)
    groups = sorted(set(conv.values()))
    if val_fraction <= 0 or len(groups) < 2:
        return list(records), []
    rng = random.Random(seed)
    rng.shuffle(groups)
    n_val = min(len(groups) - 1, max(1, round(val_fraction * len(groups))))
    val_groups = set(groups[:n_val])
    return ([r for r in records if conv[r.group] not in val_groups],
            [r for r in records if conv[r.group] in val_groups])


def check_disjoint(train: list[PairRecord], val: list[PairRecord], val_file: str) -> None:
    """Refuse validation pairs that are training pairs (the same prompt and leaky answer),
    or other turns of a training pair's conversation (one's prompt holds the other's
    prompt and leaky answer as its earlier exchange): their scores would measure
    memorisation, the very thing being removed. Compared by content, not by id or group:
    files number their rows on their own (ids 0, 1, ... in each; pairs from two
    challenge files both start at llmpc-0). Named by ``file:line``, not by id (an id can
    be personal data)."""
    def where(r: PairRecord) -> str:
        return r.source or "a pair of the world"

    as_exchange: dict[str, str] = {}  # also the identity of a pair: its prompt and leaky answer
    as_earlier: dict[str, str] = {}
    for r in train:
        as_exchange.setdefault(_exchange_key(r), where(r))
        for k in _earlier_keys(r):
            as_earlier.setdefault(k, where(r))
    same, turns = [], []
    for r in val:
        key = _exchange_key(r)
        if (w := as_exchange.get(key)) is not None:
            same.append((r.source, w))
        elif (w := as_earlier.get(key) or next(filter(None, map(as_exchange.get, _earlier_keys(r))), None)):
            turns.append((r.source, w))
    if same:
        first, w = same[0]
        raise ConfigError(f"{len(same)} of the {len(val)} validation pairs in {val_file} are training pairs too "
                          f"(the same prompt and leaky answer), first {first} (as {w}): validation would score "
                          "memorisation")
    if turns:
        first, w = turns[0]
        raise ConfigError(f"{len(turns)} of the {len(val)} validation pairs in {val_file} are other turns of a "
                          f"training pair's conversation (one's prompt holds the other's prompt and leaky answer), "
                          f"first {first} (with {w}): validation would score memorisation; split by "
                          "conversation")


class PairDataModule(L.LightningDataModule):
    """Pairs for every objective.

    Args:
        tokenizer: hub name, path or ``tiny:<dir>``; linked to the model's name by the CLI.
            None (the default): the tokenizer of the model the trainer trains
            (``UnlearnModule.model``), so that the Python API cannot pair a model with
            token ids of another vocabulary.
        train_file: pair JSONL (our format or TRL-style). Exclusive with ``world``.
        val_file: optional separate validation pairs; without it ``val_fraction`` of the
            conversations (groups) of ``train_file`` are held out.
        world: build pairs from the synthetic PII world instead of a file.
        system_prompt: the conditioning instruction, used for records without ``system``.
        uncond_system_prompt: what replaces the instruction in the unconditioned variant:
            None blanks it (conditioning dropout); a string such as
            :data:`~cfg_unlearn.prompts.NEGATIVE_INSTRUCTION` is the swap variant's
            negative instruction.
        max_length: tokens per sequence; prompts lose their oldest tokens to fit, after
            the instruction (counted; see :func:`cut_prompts`), an answer that alone
            exceeds it is an error.
        nll_span: ``response`` (default: the prompt may hold the PII being removed) or
            ``prompt_response`` (TRL's ORPO, for parity).
        val_fraction: share of conversations held out when ``val_file`` is not given.
        batch_size: pairs per training batch (per device).
        eval_batch_size: pairs per validation batch (default: ``batch_size``).
        num_workers: DataLoader workers.
        seed: shuffling and split seed.
        max_chars: per-field character cap of the JSONL reader.
        on_error: ``raise`` on the first bad row, or ``skip`` bad rows (counted, logged),
            pairs with an answer longer than ``max_length`` included; a duplicate id is
            an error either way.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        world: WorldConfig | None = None,
        system_prompt: str = SAFETY_INSTRUCTION,
        uncond_system_prompt: str | None = None,
        max_length: int = 512,
        nll_span: Literal["response", "prompt_response"] = "response",
        val_fraction: float = 0.1,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        max_chars: int = DEFAULT_MAX_CHARS,
        on_error: Literal["raise", "skip"] = "raise",
    ):
        super().__init__()
        if (train_file is None) == (world is None):
            hint = (" (got both: with a config that sets data.world, such as configs/tiny.yaml, pass "
                    "--data.world null beside --data.train_file)" if world is not None else
                    " (got neither: a run config such as configs/tiny.yaml sets one; a logger preset such as "
                    "configs/wandb.yaml is stacked after one, --config configs/tiny.yaml --config configs/wandb.yaml)")
            raise ConfigError(f"PairDataModule needs exactly one of `train_file` or `world`{hint}")
        if nll_span not in ("response", "prompt_response"):
            raise ConfigError(f"nll_span must be 'response' or 'prompt_response', got {nll_span!r}")
        if max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {max_length}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and value < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {value}")
        world = dataclass_from(world, WorldConfig, "world")
        if world is not None:
            world.check()
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.train_file, self.val_file, self.world = train_file, val_file, world
        self.system_prompt, self.uncond_system_prompt = system_prompt, uncond_system_prompt
        self.max_length, self.nll_span = max_length, nll_span
        self.val_fraction, self.seed = val_fraction, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.max_chars, self.on_error = num_workers, max_chars, on_error
        self.tokenizer = None
        self.train_dataset: PairDataset | None = None
        self.val_dataset: PairDataset | None = None
        self.stats: dict[str, int] = {}
        self._known_pii: tuple[PIIItem, ...] = ()

    # -------------------------------------------------------------------- loading

    def tokenizer_source(self) -> str:
        """``tokenizer``, or when it is None the name of the model the attached trainer's
        module trains (its ``model_name``)."""
        if self.tokenizer_name is not None:
            return self.tokenizer_name
        trainer = getattr(self, "trainer", None)
        name = getattr(trainer.lightning_module, "model_name", None) if trainer is not None else None
        if not isinstance(name, str):
            raise ConfigError("PairDataModule(tokenizer=None) takes the tokenizer of the model its trainer trains "
                              "(UnlearnModule.model); outside such a Trainer, give tokenizer= (a hub name, path or "
                              "tiny:<dir>)")
        return name

    def longest_sequence(self) -> int:
        """Tokens of the longest encoded sequence (prompt + answer, either variant and
        side) of the set-up train and validation pairs; 0 before ``setup``."""
        return max((ds.longest_sequence() for ds in (self.train_dataset, self.val_dataset) if ds is not None),
                   default=0)

    def known_pii(self) -> tuple[PIIItem, ...]:
        """Every PII value the training data knows (after ``setup``): the synthetic
        world's, or the pairs' ``pii`` fields. What a redacted log must hide, whichever
        probes are scored."""
        return self._known_pii

    def prepare_data(self) -> None:
        # local rank 0 only: build the tiny model once before other ranks load it
        resolve_pretrained(self.tokenizer_source())

    def load_records(self) -> tuple[list[PairRecord], list[PairRecord]]:
        check_input_file("data.train_file", self.train_file)
        check_input_file("data.val_file", self.val_file)
        if self.world is not None:
            world = World(self.world)
            records = world.pairs()
            self._known_pii = tuple(world.known_pii())  # its people's names too, which no pair lists
            source = f"world(seed={self.world.seed}, n_people={self.world.n_people})"
            rank_zero_info(f"{source}: {len(records)} pairs")
        else:
            records, st = read_pairs(self.train_file, max_chars=self.max_chars, on_error=self.on_error)
            if not st.skipped:  # else read_pairs has warned with this summary
                rank_zero_info(st.summary())
            self.stats["skipped_rows"] = st.skipped
        if self.val_file:
            val, st = read_pairs(self.val_file, max_chars=self.max_chars, on_error=self.on_error)
            if not st.skipped:
                rank_zero_info(st.summary())
            self.stats["skipped_rows"] = self.stats.get("skipped_rows", 0) + st.skipped
            if not val:  # as an empty train_file is: validation was asked for and would not run
                raise ConfigError(f"no validation pairs: the pair file {self.val_file} is empty or every row was "
                                  "skipped (leave data.val_file unset to hold out data.val_fraction instead)")
            check_disjoint(records, val, self.val_file)
            return records, val
        train, val = split_by_group(records, self.val_fraction, self.seed)
        if self.val_fraction > 0 and not val and records:  # (no records at all is an error of its own, later)
            rank_zero_warn(f"data.val_fraction={self.val_fraction} holds out nothing: the training pairs form one "
                           "conversation (one group, or rows whose prompts repeat each other's exchanges, which stay "
                           "together), and the split is by conversation. No validation runs (no val/* metrics); give "
                           "data.val_file, or groups")
        return train, val

    def encode(self, records: list[PairRecord], stats: EncodeStats) -> PairDataset:
        tok = self.tokenizer
        end = answer_end_ids(tok)  # the chat template's end of an answer (Llama 3's <|eot_id|>), else EOS
        if not end:
            raise ConfigError("the tokenizer names no EOS token, and its chat template no token that ends an "
                              "answer: training has nothing to end the answers with")
        encode_answer = answer_encoder(tok, end)
        nll_on_prompt = self.nll_span == "prompt_response"
        items = PairDataset(nll_on_prompt)
        for rec in records:
            answers = []
            for side in ("chosen", "rejected"):
                ids = encode_answer(getattr(rec, side))
                if len(ids) > self.max_length:
                    where = rec.source or f"record {rec.id!r}"
                    if self.on_error == "skip":  # a bad row like any other: skipped, counted
                        stats.too_long.append(f"{where} ({side}, {len(ids)} tokens)")
                        break
                    raise ConfigError(
                        f"{where}: field '{side}': answer is {len(ids)} tokens (with its end token), more than "
                        f"max_length={self.max_length}; answers are never truncated, raise max_length "
                        "(or skip such rows with on_error: skip)"
                    )
                answers.append(ids)
            if len(answers) < 2:
                continue
            systems = [(rec.system or self.system_prompt) if v == "cond" else self.uncond_system_prompt
                       for v in VARIANTS]
            texts, prompts = [], []
            for system in systems:
                try:
                    texts.append(render_prompt(tok, rec.prompt, system))
                except TemplateError as e:  # e.g. one that insists on alternating turns: name the row
                    where = rec.source or f"record {rec.id!r}"
                    raise ConfigError(f"{where}: field 'prompt': the tokenizer's chat template refuses this "
                                      f"conversation ({e})") from None
                prompts.append(tok(texts[-1], add_special_tokens=False)["input_ids"])
            # one cut for the pair: both answers scored after the same prompt (the odds
            # ratio and DPO's margin compare them; cut to each answer's own room, the
            # shorter answer kept older turns), both variants keeping the same newest tokens
            room = self.max_length - max(map(len, answers))
            heads: list[int | None] = [0] * len(VARIANTS)
            kept = prompts
            if any(len(p) > room for p in prompts):
                heads = [instruction_head(tok, p, t, s, rec.prompt) for p, t, s in zip(prompts, texts, systems)]
                kept = cut_prompts(prompts, [h or 0 for h in heads], room, tok.bos_token_id)
            for system, prompt_ids, prompt, head in zip(systems, prompts, kept, heads):
                cut = len(prompt_ids) - len(prompt)
                if cut:
                    stats.truncated_prompts += len(answers)
                    stats.prompt_tokens_cut += cut * len(answers)
                    if head is None:  # an unknown head is cut from the left: is the instruction left?
                        lost = bool(system) and system not in tok.decode(prompt)
                    else:
                        lost = head > 0 and prompt[:head] != prompt_ids[:head]
                    # either variant's instruction: the swap variant's negative one too
                    stats.instruction_cut += len(answers) * (bool(system) and lost)
            items.append(rec.id, kept, answers)
            stats.pairs += 1
        return items

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(resolve_pretrained(self.tokenizer_source()))
        train, val = self.load_records()
        suspect = audit_pairs(train + val)
        train, val = self._drop_chosen_leaks(train, val, suspect["chosen_leaks"])
        if not train:
            source = (f"the pair file {self.train_file} is empty or every row was skipped" if self.train_file
                      else f"the world ({self.world}) makes none")
            raise ConfigError(f"no training pairs: {source}")
        self._warn_suspect_pairs(train + val, suspect["identical"])
        # for UnlearnModule.on_fit_start: a run that conditions (dropout) on none of them
        self.stats["train_records"] = len(train)
        self.stats["train_same_prompts"] = sum(map(self._one_prompt, train))
        self._known_pii = tuple(dict.fromkeys([*self._known_pii,
                                               *(p for r in train + val for p in (*r.pii, *r.context_pii))]))
        st = EncodeStats()
        train_items, val_items = self.encode(train, st), self.encode(val, st)
        if st.too_long:
            log.warning("%d pairs skipped (on_error: skip): an answer is longer than max_length=%d and answers are "
                        "never truncated: %s%s", len(st.too_long), self.max_length, ", ".join(st.too_long[:5]),
                        f" (+{len(st.too_long) - 5} more)" if len(st.too_long) > 5 else "")
            self.stats["skipped_rows"] = self.stats.get("skipped_rows", 0) + len(st.too_long)
            if not train_items:
                raise ConfigError(f"no training pairs: every answer is longer than max_length={self.max_length}")
        kept = {*train_items.ids, *val_items.ids}
        self.train_dataset = train_items
        self.val_dataset = val_items if len(val_items) else None
        self.stats.update(
            train_pairs=len(train_items),
            val_pairs=len(val_items),
            train_groups=len({r.group for r in train if r.id in kept}),
            val_groups=len({r.group for r in val if r.id in kept}),
            truncated_prompts=st.truncated_prompts,
            prompt_tokens_cut=st.prompt_tokens_cut,
            instruction_cut=st.instruction_cut,
        )
        rank_zero_info(
            "pairs: {train_pairs} train / {val_pairs} val ({train_groups} / {val_groups} conversations); "
            "{truncated_prompts} sequences lost their oldest prompt tokens to max_length".format(**self.stats)
        )
        if st.truncated_prompts:
            log.warning(
                "%d sequences (%d prompt tokens) were cut to max_length=%d, the oldest turns first",
                st.truncated_prompts, st.prompt_tokens_cut, self.max_length,
            )
        if st.instruction_cut:
            log.warning(
                "%d sequences could not keep their system instruction within max_length=%d: a conditioned one "
                "trains as an unconditioned sample, an unconditioned one (the swap variant's negative instruction) "
                "as neither; raise max_length", st.instruction_cut, self.max_length,
            )

    def _one_prompt(self, rec: PairRecord) -> bool:
        """Whether the pair's conditioned and unconditioned prompts are one text (its
        instruction blank, or ``uncond_system_prompt``'s): dropout and guidance would
        compare a prompt with itself."""
        return (rec.system or self.system_prompt or "").strip() == (self.uncond_system_prompt or "").strip()

    def _drop_chosen_leaks(self, train: list[PairRecord], val: list[PairRecord], leaks: list[PairRecord],
                           ) -> tuple[list[PairRecord], list[PairRecord]]:
        """A pair whose chosen answer holds the row's own PII value (``leaks``, of
        :func:`audit_pairs`) trains the model to say it: a bad row (a review: it was a
        warning, and the fit trained it), refused, or with ``on_error: skip`` skipped and
        counted."""
        self.stats["chosen_leaks"] = len(leaks)
        if not leaks:
            return train, val
        what = (f"{len(leaks)} of {len(train) + len(val)} pairs have a chosen answer holding one of the row's own "
                f"pii values, so training would reward the leak: {named_places(leaks)}")
        if self.on_error != "skip":
            raise ConfigError(f"{what}; fix those rows (the chosen answer must be PII-free), or skip them with "
                              "data.on_error: skip")
        rank_zero_warn(f"{what}; skipped (on_error: skip)")
        self.stats["skipped_rows"] = self.stats.get("skipped_rows", 0) + len(leaks)
        dropped = {id(r) for r in leaks}
        train, kept_val = [r for r in train if id(r) not in dropped], [r for r in val if id(r) not in dropped]
        if self.val_file and not kept_val:  # as load_records refuses an empty val_file
            raise ConfigError(f"no validation pairs: every pair of {self.val_file} was skipped")
        return train, kept_val

    def _warn_suspect_pairs(self, records: list[PairRecord], identical: list[PairRecord]) -> None:
        found = {"identical": identical}
        self.stats["identical_pairs"] = len(identical)
        what = {"identical": "have chosen == rejected (nothing to prefer; NLL trains the answer as it is)"}
        # A row's own system message is its conditioning instruction (the documented rule),
        # so the model learns guidance on that text; a generic one ("You are a helpful
        # assistant", common in TRL-style data) then never trains the instruction that
        # decoding conditions on.
        found["own_system"] = [r for r in records if r.system and r.system != self.system_prompt]
        self.stats["own_system"] = len(found["own_system"])
        what["own_system"] = ("carry their own system message, which replaces data.system_prompt as their "
                              "conditioning instruction: guidance learns that message, while GuidanceEval "
                              "decodes with data.system_prompt (or a probe's own system message) and chat and "
                              "export with --system; drop it from the rows to train on data.system_prompt")
        found["same_prompts"] = [r for r in records if self._one_prompt(r)]
        what["same_prompts"] = ("have the same conditioned and unconditioned prompt (their system message is "
                                "data.uncond_system_prompt's text, or blank): dropout and guidance learn nothing there")
        for key, suspect in found.items():
            if suspect:
                rank_zero_warn(f"{len(suspect)} of {len(records)} pairs {what[key]}: {named_places(suspect)}")

    # -------------------------------------------------------------------- loaders

    def _train_sampler(self, ds: PairDataset) -> ShardSampler:
        """One seeded permutation per epoch (seed + epoch), rank ``r`` of ``W`` taking
        positions ``r, r+W, ...`` of it: a global batch of ``W x b`` pairs holds exactly the
        pairs of a one-process batch of ``W x b``, so 2 processes follow 1; the padding
        that evens out the shards is marked, and weighs nothing (``UnlearnModule``)."""
        world, rank = self._world_rank()
        return ShardSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)

    def _eval_sampler(self, ds: PairDataset) -> ShardSampler:
        world, rank = self._world_rank()
        return ShardSampler(ds, num_replicas=world, rank=rank)

    def _world_rank(self) -> tuple[int, int]:
        """(processes, this one's rank) of the attached trainer; (1, 0) without one."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, ds: PairDataset, batch_size: int, shuffle: bool, sharded: bool = False) -> DataLoader:
        # each rank its shard, the padding marked (see ShardSampler)
        if shuffle:
            sampler, ds = self._train_sampler(ds), MarkedPadding(ds)
        elif sharded:
            sampler, ds = self._eval_sampler(ds), MarkedPadding(ds)
        else:
            sampler = None
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=PairCollator(self.tokenizer.pad_token_id),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def reference_dataloaders(self) -> dict[str, DataLoader]:
        """Every train and validation pair once, in order, by split (``"train"``,
        ``"val"``: a training and a validation pair may share an id, e.g. the default
        ``<file name>:<line>`` of two files both named pairs.jsonl): for a reference
        model's log-probs computed before training (NPO/DPO, ``reference: precomputed``)."""
        return {split: self._loader(ds, self.eval_batch_size, shuffle=False)
                for split, ds in (("train", self.train_dataset), ("val", self.val_dataset)) if ds is not None}

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            if self.trainer is not None and self.trainer.state.fn == "validate":
                # Lightning would run no hook at all: no loss and no GuidanceEval, silently
                raise ConfigError("validate needs validation pairs: set data.val_file, or data.val_fraction > 0 "
                                 "(held out by conversation, so the data needs at least two)")
            return []
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False, sharded=True)
