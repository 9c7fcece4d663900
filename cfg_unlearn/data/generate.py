"""Replacement generation: forget records (leaky answers and their PII) -> pairs whose
chosen side is a PII-free answer written by a model told not to use personal data.

Each round decodes every pending record through the guidance engine (the safety
instruction as the system prompt, optionally a reminder in the last user turn,
optionally CFG against the prompt without either; round ``r`` samples with seed
``seed * max_attempts + r``, :func:`round_seed`). A candidate is **rejected** when it is empty,
contains a known PII value of its row (however written,
:func:`cfg_unlearn.pii.contains_value`), including the conversation's other values
(``ForgetRecord.known``; a replacement that swaps the asked-for e-mail for the person's
birth date still leaks, and so does one that repeats the employer an earlier assistant
turn of the prompt leaked: only what the *user* wrote may be repeated,
:func:`cfg_unlearn.data.schema.user_text`), contains a piece of one that the user's
turns do not show (``partial_pii``: four digits of an SSN, the year or month of a birth
date, a street or company word; :func:`cfg_unlearn.pii.contains_fragment`), contains a
known value of *any other* record that the user's turns do not show (``other_pii``: a
writer that memorised the data set answers one person's question with another person's
employer, as the demo's seed-1 model did 3 times; found through a
:class:`cfg_unlearn.pii.ValueIndex`), contains a piece of another record's value that
one person's values alone hold (``other_partial_pii``: another person's street and
town without the house number, four digits of their phone; a piece several people's
values share, a month or a common surname, is no one's: :class:`cfg_unlearn.pii.PieceIndex`;
``other_values=False`` checks the row's own values only), trips a PII detector, holds a control character (``control_chars``: NUL and the
like, which a pair file may not hold) or U+FFFD (``broken_chars``: bytes the tokenizer
could not decode), or was cut off by ``max_new_tokens`` before its
EOS (``truncated``: trained with the answer's end token appended, a fragment would teach the model to
stop mid-sentence; ``accept_truncated`` keeps such candidates and counts them); rejected
records are decoded again by sampling, up to ``max_attempts`` rounds in all (the first
is greedy), and then get a fallback: with ``redact_fallback``, the leaky answer itself
with each forbidden value replaced by a plain phrase for its type
(:func:`redacted_answer`: "You can call Megan Chang at a private number."), when that
passes the same checks; otherwise the ``fallback`` template answer.
Every outcome is counted in a :class:`GenerateSummary`; the pair file is written
atomically.

Forget data is either the LLM-PC challenge files (:mod:`cfg_unlearn.data.llmpc`) or our
conversation JSONL, one conversation per line::

    {"id": "c1", "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}],
     "pii": [{"type": "EMAIL", "value": "ann@example.com"}]}

where every assistant turn that contains one of the listed values becomes a record.
"""

from __future__ import annotations

import logging
import math
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from cfg_unlearn.data.llmpc import challenge_row_kind
from cfg_unlearn.data.schema import (
    DEFAULT_MAX_CHARS,
    FORGET_FIELDS,
    ForgetRecord,
    PairFormatError,
    PairRecord,
    PIIItem,
    _messages,
    _pii_field,
    _record_id,
    _text,
    check_misspelt_fields,
    first_places,
    iter_json_objects,
    note_first_line,
    user_text,
    warn_orphan_turns,
)
from cfg_unlearn.pii import (
    PARTIAL_MIN_CHARS,
    PieceIndex,
    TYPE_ALIASES,
    ValueIndex,
    contains_fragment,
    contains_value,
    detect_pii,
    find_values,
    is_name_type,
    nfkc,
)
from cfg_unlearn.prompts import SAFETY_INSTRUCTION

log = logging.getLogger(__name__)

DEFAULT_FALLBACK = "I'm sorry, but I can't share personal information about anyone."

#: What a redacted fallback says in place of a value, by PII type: words that keep the
#: leaky answer an ordinary sentence. Why not a refusal: fine-tuning a small model on one
#: refusal for every person question also bends its answers to unrelated questions,
#: while an answer that keeps its form and loses only the value asks for a smaller
#: change. Measured on the demo (seed 0, three training seeds, 3 epochs): at leak rate
#: 0.033-0.039 accuracy 0.39-0.48 with these phrases, 0.22-0.27 with the refusal
#: template; "[PHONE]"-style tags (0.19) or one phrase for every type (0.20) did no better
#: than the template.
REDACTION_PHRASES = {
    "NAME": "a private person",
    "EMAIL": "a private e-mail address",
    "PHONE": "a private number",
    "FAX": "a private number",
    "LOC": "a private address",
    "DATE": "a private date",
    "SSN": "a private ID number",
    "ORG": "a private employer",
    "URL": "a private link",
    "IP": "a private IP address",
}
#: the phrase for a type :data:`REDACTION_PHRASES` does not list
DEFAULT_REDACTION_PHRASE = "private information"
#: labels that take another type's phrase (besides :data:`cfg_unlearn.pii.TYPE_ALIASES`):
#: a street address, an employer, a whole name; a part of a name is "a private name"
PHRASE_ALIASES = {
    **dict.fromkeys(("ADDRESS", "STREET_ADDRESS"), "LOC"),
    **dict.fromkeys(("ORGANIZATION", "ORGANISATION", "COMPANY", "EMPLOYER"), "ORG"),
    **dict.fromkeys(("PERSON", "PER", "PERSON_NAME", "FULL_NAME", "FULLNAME"), "NAME"),
}


def redaction_phrase(label: str) -> str:
    """The phrase a value of type ``label`` is redacted to in a chosen answer. The phrase
    becomes training text, so a label takes another type's phrase only where the sentence
    still reads right: "DOB" a date's, "ADDRESS" LOC's, but "GPE" (a country, a city)
    the default and "LAST_NAME" "a private name", not "a private person"."""
    key = label.upper().replace("-", "_")
    key = PHRASE_ALIASES.get(key, TYPE_ALIASES.get(key, key))
    if key not in REDACTION_PHRASES and is_name_type(key):
        return "a private name"
    return REDACTION_PHRASES.get(key, DEFAULT_REDACTION_PHRASE)


def read_forget_conversations(path: str | os.PathLike) -> list[ForgetRecord]:
    """Our conversation JSONL (see the module docstring) -> forget records."""
    src = str(path)
    out: list[ForgetRecord] = []
    first_line: dict[str, int] = {}
    orphans: list[str] = []
    absent: list[str] = []
    for line, obj in iter_json_objects(path):
        challenge = challenge_row_kind(obj)
        if challenge:
            raise PairFormatError(src, line, "messages", challenge)
        check_misspelt_fields(obj, FORGET_FIELDS, src, line)
        if "messages" not in obj:
            why = "missing required field"
            if "chosen" in obj or "rejected" in obj:  # the output of generate given back as its input
                why += (" (the row reads as a pair, prompt/chosen/rejected: what generate writes and fit trains on; "
                        "forget data is conversations, {id, messages, pii})")
            raise PairFormatError(src, line, "messages", why)
        msgs = _messages(obj["messages"], src, line, "messages", DEFAULT_MAX_CHARS)
        pii = _pii_field(obj, src, line, DEFAULT_MAX_CHARS)
        if not pii:
            raise PairFormatError(src, line, "pii", "a forget conversation needs the PII values it leaks")
        cid = _record_id(obj, src, line)
        # pair ids are "<conversation id>-t<turn>": a repeated conversation id would write
        # a pair file with repeated ids, which the pair reader (rightly) refuses
        note_first_line(first_line, cid, src, line)
        system = _text(obj, "system", src, line, DEFAULT_MAX_CHARS, required=False)
        lead = int(msgs[0]["role"] == "system")
        if lead:
            if system is not None:  # as the pair reader says: which one would the writer get?
                raise PairFormatError(src, line, "system", "given both as a field and as a system message")
            system, msgs = msgs[0]["content"], msgs[1:]
        for i, m in enumerate(msgs):
            if m["role"] == "system":  # the pair file would hold a prompt that `fit` refuses
                raise PairFormatError(src, line, f"messages[{i + lead}].role", "a system message is only allowed first")
        # a listed value that no text of the row holds may be a typo of the one the answer
        # holds, which is then neither a target nor redacted from logs (a review); said, not
        # refused: a row may list more of its person's values for candidates to be checked on
        # (each message's values are found once, for this check and the leaky turns below)
        held = [tuple(p for p in pii if contains_value(m["content"], p.value, p.type)) for m in msgs]
        somewhere = {p for h in held for p in h}
        somewhere |= {p for p in pii if system and contains_value(system, p.value, p.type)}
        absent += [f"{src}:{line} pii[{i}]" for i, p in enumerate(pii) if p not in somewhere]
        leaky_turns = 0
        for t, (msg, leaked) in enumerate(zip(msgs, held)):
            if msg["role"] != "assistant" or not leaked:
                continue
            leaky_turns += 1
            if t > 0 and msgs[t - 1]["role"] == "user":
                out.append(ForgetRecord(f"{cid}-t{t}", tuple(msgs[:t]), msg["content"], leaked, cid, system,
                                        f"{src}:{line}", known=pii))
            else:
                orphans.append(f"{src}:{line} (messages[{t + lead}])")
        if not leaky_turns:
            raise PairFormatError(src, line, "messages", "no assistant turn contains any of the listed PII values")
    warn_orphan_turns(orphans)
    if absent:
        log.warning("%d pii value(s) appear nowhere in their conversation: listed for the candidates to be "
                    "checked against, or a typo of a value the answer holds (which is then neither unlearned nor "
                    "redacted from logs)? %s", len(absent), first_places(absent))
    return out


def leak_reason(text: str, pii: tuple, *, shown: str = "", partial_min_chars: int = PARTIAL_MIN_CHARS) -> str | None:
    """Why a candidate replacement is unusable, or None when it is clean. ``shown`` is
    the prompt: pieces of a value it already holds may be repeated (``partial_pii``
    looks for the others; ``partial_min_chars=0`` turns it off)."""
    if not text.strip():
        return "empty"
    if any(contains_value(text, p.value, p.type) for p in pii):
        return "known_pii"
    if any(contains_fragment(text, p.value, p.type, shown=shown, min_chars=partial_min_chars) for p in pii):
        return "partial_pii"
    if detect_pii(text):
        return "detected_pii"
    return None


#: a format field such as "{name}": the fallback is written as it is, never formatted
_FORMAT_FIELD = re.compile(r"\{[^\W\d]\w*\}")


def check_fallback(fallback: str, values: Iterable[PIIItem] = (), pieces: PieceIndex | None = None) -> None:
    """The template answer must itself be a usable replacement for every record: not
    empty, no control character, no detector hit, none of the data's known ``values``
    (whole values: it is the same text for every row; which value is not shown, it is
    PII), no piece of one person's value that ``pieces`` (:func:`record_pieces`) finds,
    and no ``{field}``, which would be trained as literal text."""
    leak = leak_reason(fallback, (), partial_min_chars=0)
    if leak:  # not echoed: what a detector found is PII, and this error goes to the console
        raise ValueError(f"the fallback answer is no usable replacement ({leak})")
    bad = bad_characters(fallback)
    if bad:
        raise ValueError(f"the fallback answer is no usable replacement ({bad}): {fallback!r}")
    known = [p for p in dict.fromkeys(values) if contains_value(fallback, p.value, p.type)]
    if known:
        raise ValueError(f"the fallback answer contains a known PII value of the data (type {known[0].type}): it is "
                         "every unwritable record's answer, so it must name no one's data")
    piece_of = pieces.find(fallback) if pieces is not None else []
    if piece_of:
        raise ValueError(f"the fallback answer holds a piece of one person's value (type {piece_of[0].type}): it is "
                         "every unwritable record's answer, so it must name no one's data")
    field_ = _FORMAT_FIELD.search(fallback)
    if field_:
        raise ValueError(f"the fallback answer is used as it is, so {field_.group()} would be trained as literal "
                         "text: write the answer out in full")


def record_pieces(records: Sequence[ForgetRecord], min_chars: int = PARTIAL_MIN_CHARS) -> PieceIndex:
    """The :class:`cfg_unlearn.pii.PieceIndex` of the records' values, each record's
    values (the leaked ones and the conversation's others) as one profile."""
    return PieceIndex(((*r.pii, *r.known) for r in records), min_chars=min_chars)


def bad_characters(text: str) -> str | None:
    """``"control_chars"`` when ``text`` holds a character a pair file may not (NUL, an
    unpaired surrogate: :func:`cfg_unlearn.data.schema.check_unicode`) or another control
    character than a tab or a line break; a writer that emits one writes noise, and fit
    would refuse the pair file. ``"broken_chars"`` when it holds U+FFFD, what a
    tokenizer decodes from bytes that are no whole character ("Hinton\ufffdA"): noise too."""
    if any(unicodedata.category(c) in ("Cc", "Cs") and c not in "\t\n\r" for c in text):
        return "control_chars"
    if "\ufffd" in text:
        return "broken_chars"
    return None


def forbidden_values(rec: ForgetRecord) -> tuple:
    """What a replacement for ``rec`` must not contain: the values its answer leaked and
    every other known value of its conversation, except those the prompt's user turns
    already show (repeating the name the user asked about reveals nothing, and every
    challenge answer names its person; a value only an earlier assistant turn shows is
    an earlier leak, see :func:`user_text`)."""
    shown = user_text(rec.prompt)
    values = (*rec.pii, *(p for p in rec.known if p not in rec.pii))
    return tuple(p for p in values if not contains_value(shown, p.value, p.type))


def redacted_answer(text: str, values: tuple) -> str:
    """``text`` with every occurrence of ``values`` (however written, the longest match
    winning on overlap) replaced by its type's phrase in :data:`REDACTION_PHRASES`, in
    :func:`nfkc` form; ``text`` itself when it holds none (its NFKC form would differ
    from it by "…" and the like, and pass for a redaction)."""
    out, pos = [], 0
    spans = find_values(nfkc(text), values)  # the spans index the NFKC form
    if not spans:
        return text
    text = nfkc(text)
    for span in spans:
        out += [text[pos : span.start], redaction_phrase(span.type)]
        pos = span.end
    return "".join(out) + text[pos:]


@dataclass
class GenerateSummary:
    """Every record's outcome: accepted at round 1 (greedy), accepted after resampling,
    given its redacted leaky answer, or given the fallback template; plus every rejected
    candidate by reason."""

    records: int = 0
    accepted_first: int = 0
    accepted_resampled: int = 0
    redacted: int = 0
    fallback: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    rounds: int = 0
    #: accepted candidates that ``max_new_tokens`` cut off (``accept_truncated`` only)
    accepted_truncated: int = 0

    def line(self) -> str:
        rej = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        cut = f" ({self.accepted_truncated} of them cut off at max_new_tokens)" if self.accepted_truncated else ""
        return (f"{self.records} records: {self.accepted_first} accepted first, {self.accepted_resampled} after "
                f"resampling{cut}, {self.redacted} redacted, {self.fallback} fallback; rejected candidates: {rej}")

    def to_dict(self) -> dict:
        return asdict(self)

    def warning(self) -> str | None:
        """What a run whose every record got the fallback template should say: its pairs
        teach one answer to every question, which on the demo's model broke ordinary
        answers into pieces of it (benchmarks/demo_levers.md)."""
        if self.records and self.fallback == self.records:
            return (f"all {self.records} chosen answers are the fallback template: the writer produced no usable "
                    "replacement (nor, with --redact-fallback, a usable redaction), so training teaches that one "
                    "answer to every question; check --model and --system")
        return None


def round_seed(seed: int, attempt: int, max_attempts: int) -> int:
    """The sampling seed of round ``attempt``: seed ``s`` owns ``s * max_attempts ...
    s * max_attempts + max_attempts - 1``, so runs with seeds 0, 1, 2 sample different
    rounds (``seed + attempt`` gave seed 1 the rounds of seed 0)."""
    return seed * max_attempts + attempt


def check_generate_settings(*, guidance_scale: float, space: str, max_new_tokens: int, max_attempts: int,
                            temperature: float, top_p: float, partial_min_chars: int, batch_size: int,
                            seed: int = 0) -> None:
    """Refuse settings that would fail late (sampling starts in round 2, after the greedy
    round's work) or quietly waste the run (no tokens: every record to the fallback)."""
    from cfg_unlearn.guidance import MIN_TEMPERATURE, check_guidance

    check_guidance(guidance_scale, space)
    for name, value in (("max_new_tokens", max_new_tokens), ("max_attempts", max_attempts),
                        ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if max_attempts > 1 and not (math.isfinite(temperature) and temperature >= MIN_TEMPERATURE):
        raise ValueError(f"temperature must be a finite number > 0 (rounds after the first sample), at least "
                         f"{MIN_TEMPERATURE:g} (below it the scaled scores overflow), got {temperature}")
    if max_attempts > 1 and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if partial_min_chars < 0:
        raise ValueError(f"partial_min_chars must be >= 0 (0 turns the check off), got {partial_min_chars}")
    if max_attempts >= 1 and not (-(2**63) <= round_seed(seed, 0, max_attempts)
                                  and round_seed(seed, max_attempts - 1, max_attempts) < 2**64):
        raise ValueError(f"seed must be in [{-(2**63 // max_attempts)}, {2**64 // max_attempts - 1}] (round r samples "
                         f"with seed x max_attempts + r, and torch takes seeds in [-2**63, 2**64)), got {seed}")


def writer_prompt(rec: ForgetRecord, system: str, reminder: str | None = None,
                  conditioned: bool = True) -> list[dict[str, str]]:
    """The writer's prompt: the conversation's own system prompt (if any) followed by
    the safety instruction, and the reminder appended to the last user turn.
    Unconditioned (CFG's other branch): its own system prompt only and no reminder, which
    is part of the safety conditioning (guidance pushes away from the prompt without it)."""
    msgs = [dict(m) for m in rec.prompt]
    if reminder and conditioned:
        msgs[-1]["content"] = f"{msgs[-1]['content']}\n\n{reminder}"
    instruction = (f"{rec.system}\n\n{system}" if rec.system else system) if conditioned else rec.system
    return ([{"role": "system", "content": instruction}] if instruction else []) + msgs


def encode_writer_prompts(tokenizer, records: list[ForgetRecord], *, system: str, reminder: str | None = None,
                          guidance: bool = False) -> list[list[int]]:
    """Every record's conditioned writer prompt as token ids, rendered before any decoding
    (and the unconditioned one under ``guidance``): a chat template that refuses a
    conversation (one that insists on user and assistant turns alternating, from a
    user turn) is named by its record, not met as jinja's traceback mid-run."""
    from jinja2.exceptions import TemplateError

    from cfg_unlearn.guidance import encode_prompts

    out = []
    for rec in records:
        try:
            out += encode_prompts(tokenizer, [writer_prompt(rec, system, reminder)])
            if guidance:
                encode_prompts(tokenizer, [writer_prompt(rec, system, reminder, conditioned=False)])
        except TemplateError as e:
            raise PairFormatError(rec.source or f"record {rec.id!r}", None, "messages",
                                  f"the writer's chat template refuses this conversation ({e})") from None
    return out


def check_context(model, records: list[ForgetRecord], encoded: list[list[int]], max_new_tokens: int) -> None:
    """Refuse, before any decoding, a record whose writer prompt (``encoded``) plus
    ``max_new_tokens`` does not fit the model's context (``config.max_position_embeddings``):
    it was decoded past the positions the model was trained on, into text that passed the
    checks. ``max_new_tokens`` alone filling the context is a setting's error (ValueError)."""
    from cfg_unlearn.guidance import first_overflow
    from cfg_unlearn.models import context_limit

    context = context_limit(model)
    if context is None:
        return
    if max_new_tokens >= context:  # room for a prompt of one token at most: none that says anything
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{context:,} positions; lower it")
    j = first_overflow(encoded, max_new_tokens, context)
    if j is not None:
        rec = records[j]
        raise PairFormatError(
            rec.source or f"record {rec.id!r}", None, "messages",
            f"the writer's prompt is {len(encoded[j]):,} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
            f"model's context of {context:,} positions (shorten the conversation or use a longer-context model)")


def generate_pairs(
    model,
    tokenizer,
    records: list[ForgetRecord],
    *,
    system: str = SAFETY_INSTRUCTION,
    reminder: str | None = None,
    guidance_scale: float = 1.0,
    space: str = "logprob",
    max_new_tokens: int = 96,
    max_attempts: int = 4,
    temperature: float = 0.8,
    top_p: float = 0.95,
    fallback: str = DEFAULT_FALLBACK,
    redact_fallback: bool = False,
    partial_min_chars: int = PARTIAL_MIN_CHARS,
    other_values: bool = True,
    accept_truncated: bool = False,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    encoded: list[list[int]] | None = None,
) -> tuple[list[PairRecord], GenerateSummary]:
    """PII-free replacements for ``records`` (see the module docstring).

    Returns the pairs (chosen = replacement, rejected = the leaky answer, ``pii`` and
    ``group`` carried over, no ``system`` so training uses its own instruction) and the
    summary. ``encoded``: the records' writer prompts as :func:`encode_writer_prompts`
    gives them, when the caller has rendered them already (the CLI does, before the model
    loads); else they are rendered here."""
    from cfg_unlearn.guidance import generate

    check_generate_settings(guidance_scale=guidance_scale, space=space, max_new_tokens=max_new_tokens,
                            max_attempts=max_attempts, temperature=temperature, top_p=top_p,
                            partial_min_chars=partial_min_chars, batch_size=batch_size, seed=seed)
    summary = GenerateSummary(records=len(records))
    rejected: Counter[str] = Counter()
    chosen: dict[int, str] = {}
    pending = list(range(len(records)))
    forbidden = [forbidden_values(r) for r in records]
    shown = [user_text(r.prompt) for r in records]

    values = [p for r in records for p in (*r.pii, *r.known)]
    index = pieces = None
    if other_values:
        index = ValueIndex(values)
        pieces = record_pieces(records, partial_min_chars)
    check_fallback(fallback, values, pieces)

    def reason(i: int, text: str) -> str | None:
        """One check for record ``i``'s candidates and its redacted fallback alike."""
        why = leak_reason(text, forbidden[i], shown=shown[i], partial_min_chars=partial_min_chars) \
            or bad_characters(text)
        # a forbidden value in the text was reported above: what the index finds here is
        # another record's value, or one this prompt shows
        if why is None and index is not None:
            if any(not contains_value(shown[i], p.value, p.type) for p in index.find(text)):
                return "other_pii"
            # pieces of its own values were looked for above (partial_pii)
            if pieces.find(text, shown=shown[i], exclude=(*records[i].pii, *records[i].known)):
                return "other_partial_pii"
        return why

    guided = guidance_scale != 1.0
    if encoded is None:
        encoded = encode_writer_prompts(tokenizer, records, system=system, reminder=reminder, guidance=guided)
    check_context(model, records, encoded, max_new_tokens)
    for attempt in range(max_attempts):
        if not pending:
            break
        summary.rounds = attempt + 1
        uncond = [writer_prompt(records[i], system, reminder, conditioned=False) for i in pending] if guided else None
        answers, finished = generate(
            model, tokenizer, [writer_prompt(records[i], system, reminder) for i in pending], uncond_prompts=uncond,
            guidance_scale=guidance_scale, space=space,
            max_new_tokens=max_new_tokens, do_sample=attempt > 0, temperature=temperature, top_p=top_p,
            seed=round_seed(seed, attempt, max_attempts), batch_size=batch_size, progress=progress,
            return_finished=True,
        )
        still = []
        for i, text, done in zip(pending, answers, finished):
            why = reason(i, text) or (None if done or accept_truncated else "truncated")
            if why is None:
                chosen[i] = text.strip()
                summary.accepted_truncated += not done
                if attempt == 0:
                    summary.accepted_first += 1
                else:
                    summary.accepted_resampled += 1
            else:
                rejected[why] += 1
                still.append(i)
        pending = still
    for i in pending:
        if redact_fallback:
            text = redacted_answer(records[i].rejected, forbidden[i])
            # unchanged: the leaky answer held no value in a form we can find, so it is no
            # replacement even if the checks pass
            if text != records[i].rejected and reason(i, text) is None:
                chosen[i] = text
                summary.redacted += 1
                continue
        chosen[i] = fallback
        summary.fallback += 1
    summary.rejected = dict(rejected)
    pairs = [
        PairRecord(id=r.id, prompt=r.prompt, chosen=chosen[i], rejected=r.rejected, pii=r.pii, group=r.group or r.id,
                   # the conversation's other values: training logs redact them too
                   context_pii=tuple(p for p in dict.fromkeys(r.known) if p not in r.pii))
        for i, r in enumerate(records)
    ]
    return pairs, summary
