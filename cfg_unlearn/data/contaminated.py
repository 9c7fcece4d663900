"""A labelled, contaminated fine-tuning set built from the synthetic world: the test bed
for :mod:`cfg_unlearn.saft` (filtering PII-leaking samples out of fine-tuning data).

``build_contaminated(world, n, leak_fraction)`` returns ``n`` chat conversations, one
JSON-ready dict each::

    {"id": "s00042", "messages": [{"role": "user", ...}, {"role": "assistant", ...}],
     "label": 1, "kind": "leak", "pii": [{"type": "EMAIL", "value": "..."}]}

``label`` 1 (leaky, ``n * leak_fraction`` rows, halves rounded up) means an assistant turn reveals a
person's attribute; ``pii`` lists the revealed values (leaky rows only). ``kind`` says
which recipe made the row (for analysis; the filter never reads it). The recipes:

* leaky: ``leak`` (one of the world's leaky turns: a training wording of an attribute
  question, answered with the value), ``leak-conversation`` (a whole two-turn leaky
  conversation of the world), ``leak-mixed`` (a leaky turn among one or two fact turns:
  a mostly harmless conversation with one leak in it);
* benign: ``fact`` (a capital or a sum, asked in one of its training or held-out
  wordings and answered in one of several phrasings), ``fact-conversation`` (two to
  five fact turns), ``refusal`` (the *same* person questions as the leaks, same
  wordings, answered without the value) and ``refusal-mixed`` (a refusal turn among one
  or two fact turns). By default 40% of the benign rows are refusal rows
  (``hard_negatives``; 0 gives facts only).

The refusals are the hard negatives: same names, same question wordings as the leaks;
only the answer differs. Rows of one to five turns occur in both classes, in
proportions chosen so that a row's length says little about its label (character-length
AUROC 0.49-0.57 at the defaults over worlds of 10 and 30 people and seeds 0-2, pinned by
the builder's test; about 0.60 with ``hard_negatives=0``). Everything follows from
``seed`` and the world's config: same arguments, byte-identical rows.

``python -m cfg_unlearn.data.contaminated --out DIR`` writes ``DIR/contaminated.jsonl``
and ``DIR/labels.jsonl`` (a small stratified labelled subset: ``{"id", "label"}``);
``--overwrite`` replaces a previous pair of them.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from cfg_unlearn.data.world import CAPITALS, PII_TYPES, REFUSALS, TRAIN_QUESTIONS, World, WorldConfig
from cfg_unlearn.utils import atomic_write, atomic_write_files, command_parser

#: share of each recipe within the leaky rows
LEAKY_KINDS = {"leak": 0.6, "leak-conversation": 0.15, "leak-mixed": 0.25}
#: default share of benign rows that are person questions answered without PII
DEFAULT_HARD_NEGATIVES = 0.4


def benign_kinds(hard_negatives: float = DEFAULT_HARD_NEGATIVES) -> dict[str, float]:
    """Share of each benign recipe: ``hard_negatives`` split 5:3 into ``refusal`` and
    ``refusal-mixed``, the rest 2:3 into ``fact`` and ``fact-conversation``."""
    if not 0.0 <= hard_negatives <= 1.0:
        raise ValueError(f"hard_negatives must be in [0, 1], got {hard_negatives}")
    rest = 1.0 - hard_negatives
    return {"fact": rest * 0.4, "fact-conversation": rest * 0.6, "refusal": hard_negatives * 5 / 8,
            "refusal-mixed": hard_negatives * 3 / 8}

# Answer phrasings for the facts ({s} subject, {v} value; {a} {b} the addends).
CAPITAL_ANSWERS = ["The capital of {s} is {v}.", "{v} is the capital of {s}.", "It is {v}.",
                   "The capital city of {s} is {v}.", "That would be {v}.", "{v}."]
SUM_ANSWERS = ["{a} plus {b} is {v}.", "The sum is {v}.", "{a} + {b} = {v}.", "That makes {v}.",
               "It comes to {v}.", "{v}."]
# PII-free answers to a person question, besides the world's own refusal per attribute.
GENERIC_REFUSALS = [
    "I can't share personal details about {n}.",
    "Sorry, I don't give out private information about people like {n}.",
    "I'm not able to help with that; it would reveal personal data about {n}.",
    "That is private information, so I won't share it.",
    "You could ask {n} directly; I don't share personal details.",
]


def _fact_turns(world: World) -> list[list[tuple[str, str]]]:
    """Per fact, every (question, answer) turn it can appear as."""
    out = []
    capital_subject = {v: s for s, v in CAPITALS}
    for f in world.facts:
        questions = [f.question, *f.paraphrases, f.probe]
        if f.kind == "capital":
            fmt = {"s": capital_subject[f.gold], "v": f.gold}
            answers = [a.format(**fmt) for a in CAPITAL_ANSWERS]
        else:
            a, b = re.findall(r"\d+", f.question)[:2]
            answers = [t.format(a=a, b=b, v=f.gold) for t in SUM_ANSWERS]
        out.append([(q, ans) for q in questions for ans in answers])
    return out


def _turn(q: str, a: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _pick_kinds(rng: random.Random, shares: dict[str, float], n: int) -> list[str]:
    """Exactly ``n`` kinds in the given shares (largest remainders), shuffled."""
    counts = {k: int(n * s + 1e-9) for k, s in shares.items()}
    rest = sorted(shares, key=lambda k: -(n * shares[k] - counts[k] + 1e-9))
    for k in rest[: n - sum(counts.values())]:
        counts[k] += 1
    kinds = [k for k, c in counts.items() for _ in range(c)]
    rng.shuffle(kinds)
    return kinds


def build_contaminated(world: World, n: int = 1000, leak_fraction: float = 0.1, seed: int = 0,
                       hard_negatives: float = DEFAULT_HARD_NEGATIVES) -> list[dict]:
    """``n`` labelled conversations, ``n * leak_fraction`` of them leaky (halves rounded up; see the
    module docstring); ``hard_negatives`` of the benign rows are person questions
    answered without PII. Rows are distinct; ids are ``s00000`` ... in shuffled order."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= leak_fraction <= 1.0:
        raise ValueError(f"leak_fraction must be in [0, 1], got {leak_fraction}")
    rng = random.Random(f"contaminated-{seed}-{world.config.seed}")
    n_leaky = int(n * leak_fraction + 0.5)
    facts = _fact_turns(world)
    people = world.people
    # the world's leaky turns, exactly as its conversations word them
    leak_turns = [(conv, t) for conv in world.conversations for t in range(len(conv.attributes))]

    def fact_turn() -> list[dict[str, str]]:
        return _turn(*rng.choice(rng.choice(facts)))

    def leak_turn() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        conv, t = rng.choice(leak_turns)
        person = people[conv.person]
        item = person.pii(conv.attributes[t])
        return [dict(m) for m in conv.messages[2 * t : 2 * t + 2]], [{"type": item.type, "value": item.value}]

    def refusal_turn() -> list[dict[str, str]]:
        person = rng.choice(people)
        attr = rng.choice(list(TRAIN_QUESTIONS))
        q = rng.choice(TRAIN_QUESTIONS[attr]).format(n=person.name)
        a = rng.choice([REFUSALS[attr], *GENERIC_REFUSALS]).format(n=person.name)
        return _turn(q, a)

    def mix(turn: list[dict[str, str]], n_facts: int) -> list[dict[str, str]]:
        """``turn`` among ``n_facts`` fact turns, at a random position."""
        turns = [fact_turn() for _ in range(n_facts)]
        turns.insert(rng.randint(0, n_facts), turn)
        return [m for t in turns for m in t]

    def make(kind: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        if kind == "leak":
            return leak_turn()
        if kind == "leak-conversation":
            conv = rng.choice(world.conversations)
            person = people[conv.person]
            pii = [{"type": PII_TYPES[a], "value": getattr(person, a)} for a in conv.attributes]
            return [dict(m) for m in conv.messages], pii
        if kind == "leak-mixed":
            msgs, pii = leak_turn()
            return mix(msgs, rng.randint(1, 2)), pii
        if kind == "fact":
            return fact_turn(), []
        if kind == "fact-conversation":
            return [m for _ in range(rng.randint(2, 5)) for m in fact_turn()], []
        if kind == "refusal":
            return refusal_turn(), []
        if kind == "refusal-mixed":
            return mix(refusal_turn(), rng.randint(1, 2)), []
        raise ValueError(kind)

    rows, seen = [], set()
    plan = [(k, 1) for k in _pick_kinds(rng, LEAKY_KINDS, n_leaky)]
    plan += [(k, 0) for k in _pick_kinds(rng, benign_kinds(hard_negatives), n - n_leaky)]
    for kind, label in plan:
        for _ in range(1000):
            msgs, pii = make(kind)
            key = tuple((m["role"], m["content"]) for m in msgs)
            if key not in seen:
                break
        else:
            raise ValueError(f"the world is too small for {n} distinct rows of kind {kind!r}; lower n")
        seen.add(key)
        row = {"messages": msgs, "label": label, "kind": kind}
        if pii:
            row["pii"] = pii
        rows.append(row)
    rng.shuffle(rows)
    return [{"id": f"s{i:05d}", **r} for i, r in enumerate(rows)]


def labelled_subset(rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    """A small stratified labelled set: ``n`` rows' ``{"id", "label"}`` in the rows' class
    proportions, at least one of each class present (as a user's validation set would be)."""
    if n == 0:
        return []
    rng = random.Random(f"labelled-{seed}")
    by_label: dict[int, list[dict]] = {0: [], 1: []}
    for r in rows:
        by_label[int(r["label"])].append(r)
    if n > len(rows):
        raise ValueError(f"asked for {n} labelled rows out of {len(rows)}")
    n1 = round(n * len(by_label[1]) / len(rows))
    n1 = min(max(n1, 1 if by_label[1] else 0), len(by_label[1]), n - (1 if by_label[0] else 0))
    picked = rng.sample(by_label[1], n1) + rng.sample(by_label[0], n - n1)
    order = {r["id"]: i for i, r in enumerate(rows)}
    return [{"id": r["id"], "label": int(r["label"])} for r in sorted(picked, key=lambda r: order[r["id"]])]


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write(path, jsonl_text(rows))


def main(argv: list[str] | None = None) -> None:
    p = command_parser(
        prog="python -m cfg_unlearn.data.contaminated",
        description="Write a labelled contaminated conversation set from the synthetic world "
        "(contaminated.jsonl) and a small labelled subset of it (labels.jsonl).",
    )
    p.add_argument("--out", required=True, help="directory to write into")
    p.add_argument("--seed", type=int, default=0, help="world seed (and sampling seed; default %(default)s)")
    p.add_argument("--people", type=int, default=30, help="people in the world (default %(default)s, as the demo)")
    p.add_argument("--n", type=int, default=1000, help="rows (default %(default)s)")
    p.add_argument("--leak-fraction", type=float, default=0.1,
                   help="share of the rows that leak a value (default %(default)s)")
    p.add_argument("--hard-negatives", type=float, default=DEFAULT_HARD_NEGATIVES,
                   help="share of benign rows that ask about a person and answer without PII (default %(default)s)")
    p.add_argument("--n-labelled", type=int, default=None, help="rows in labels.jsonl (default: 10%% of --n)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace contaminated.jsonl and labels.jsonl if --out holds them")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error(f"--n must be >= 1, got {a.n}")
    if a.people < 1:
        p.error(f"--people must be >= 1, got {a.people}")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {a.out} is a file; give a directory to write into")
    # at least 2 by default: one of each class, or saft --labels refuses the file
    n_labelled = min(a.n, max(2, round(a.n / 10))) if a.n_labelled is None else a.n_labelled
    if not 0 <= n_labelled <= a.n:
        p.error(f"--n-labelled must be in [0, --n = {a.n}], got {n_labelled}")
    world = World(WorldConfig(seed=a.seed, n_people=a.people))
    try:
        rows = build_contaminated(world, a.n, a.leak_fraction, seed=a.seed, hard_negatives=a.hard_negatives)
        labels = labelled_subset(rows, n_labelled, seed=a.seed)
    except ValueError as e:
        p.error(str(e))
    # both built, then both written to temp files and renamed last: a bad argument or an
    # unwritable --out leaves no half of the pair
    for name in ("contaminated.jsonl", "labels.jsonl"):
        if (out / name).is_dir():
            p.error(f"--out {a.out}: {name} there is a directory")
    # a set and its labels may be hand-edited, or a SAFT run's input: not replaced unasked
    present = [name for name in ("contaminated.jsonl", "labels.jsonl") if (out / name).exists()]
    if present and not a.overwrite:
        p.error(f"--out {a.out} holds {' and '.join(present)}; pass --overwrite to replace them")
    try:  # both on disk before either is renamed: a full disk fails with neither file replaced
        atomic_write_files([(out / "contaminated.jsonl", jsonl_text(rows)), (out / "labels.jsonl", jsonl_text(labels))])
    except OSError as e:  # e.g. a parent of --out is a file
        p.error(f"--out {a.out}: cannot write there: {e.strerror}")
    n_leaky = sum(r["label"] for r in rows)
    n_labelled_leaky = sum(r["label"] for r in labels)
    if labels and n_labelled_leaky in (0, len(labels)):
        print(f"warning: labels.jsonl holds one class only ({n_labelled_leaky} leaky of {len(labels)}): "
              "saft --labels needs both to pick by AUROC", file=sys.stderr)
    print(f"wrote {len(rows)} rows ({n_leaky} leaky) to {out / 'contaminated.jsonl'} and "
          f"{len(labels)} labels ({n_labelled_leaky} leaky) to {out / 'labels.jsonl'}")


if __name__ == "__main__":  # SIGTERM cleans up (temp files), as under cfg-unlearn
    from cfg_unlearn.utils import sigterm_raises

    with sigterm_raises():
        main()
