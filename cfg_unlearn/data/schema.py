"""The one pair format every objective trains on, and its validating JSONL reader.

A pair record (one JSON object per line)::

    {"id": "p-17",                      # optional in TRL-style rows (defaults to file:line)
     "system": "Avoid using ...",       # optional system instruction
     "prompt": "..." | [{"role": "user", "content": "..."}, ...],
     "chosen": "...",                   # the PII-free replacement
     "rejected": "...",                 # the leaky original
     "pii": [{"type": "EMAIL", "value": "a@b.c"}],   # optional: what `rejected` leaks
     "group": "conv-3"}                 # optional conversation id, for train/val splits

TRL-style rows are read too: ``prompt``/``chosen``/``rejected`` as strings or chat
message lists (a system message at the head of the prompt becomes ``system``; a
prompt-less row whose chosen and rejected are whole conversations has its shared
prefix taken as the prompt, like TRL's ``maybe_extract_prompt``).

Bad input raises :class:`PairFormatError` naming file, line and field; nothing is
dropped silently: :class:`ReadStats` counts blank lines and (with
``on_error="skip"``) every skipped row with its reason.
"""

from __future__ import annotations

import codecs
import difflib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cfg_unlearn.utils import atomic_write

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
#: Default cap on the characters of one text field. A 100k-character prompt in a PII
#: pair file is almost always a broken export (a whole document pasted into one cell);
#: raise the cap explicitly if your prompts really are that long.
DEFAULT_MAX_CHARS = 32_768
#: The longest PII value read: one name, address, date or number, not a passage. Every
#: value becomes patterns matched against every answer and log line (whole, in pieces,
#: with separators loosened), at a cost that grows with its length: a 32,000-digit
#: "phone" took 5 s a row to audit, 512 characters about 60 ms.
MAX_PII_VALUE_CHARS = 512


class PairFormatError(ValueError):
    """A row of a pair file is malformed. ``str(err)`` reads ``file:line: field 'x': why``."""

    def __init__(self, source: str, line: int | None, field_name: str | None, reason: str):
        self.source, self.line, self.field, self.reason = source, line, field_name, reason
        where = f"{source}:{line}" if line is not None else source
        what = f" field '{field_name}':" if field_name else ""
        super().__init__(f"{where}:{what} {reason}")


def check_pii_value(value: str, src: str, line: int | None, field: str) -> None:
    """Refuse a PII value longer than :data:`MAX_PII_VALUE_CHARS` (its length named, never its text)."""
    if len(value) > MAX_PII_VALUE_CHARS:
        raise PairFormatError(src, line, field, f"a PII value of {len(value):,} characters (at most "
                              f"{MAX_PII_VALUE_CHARS}): one name, address, date or number, not a passage")


@dataclass(frozen=True)
class PIIItem:
    type: str
    value: str


@dataclass(frozen=True)
class PairRecord:
    """One validated pair. ``prompt`` is always a list of user/assistant messages ending
    with a user turn; the system instruction lives in ``system`` so that the data module
    can render it, blank it or replace it (conditioning dropout, instruction swap)."""

    id: str
    prompt: tuple[dict[str, str], ...]
    chosen: str
    rejected: str
    system: str | None = None
    pii: tuple[PIIItem, ...] = ()
    group: str = ""
    #: where the row came from ("file:line"), for error messages; not serialised
    source: str = field(default="", compare=False)
    #: the conversation's other known PII, which ``rejected`` does not leak (the person
    #: asked about, values of other turns: ``generate`` writes them): redacted in logs,
    #: never a leak target
    context_pii: tuple[PIIItem, ...] = ()

    def __post_init__(self) -> None:
        if self.system is not None and not self.system.strip():
            object.__setattr__(self, "system", None)  # as the reader reads it: none of its own
        if not self.group:
            object.__setattr__(self, "group", self.id)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.system is not None:
            out["system"] = self.system
        out["prompt"] = [dict(m) for m in self.prompt]
        out["chosen"] = self.chosen
        out["rejected"] = self.rejected
        if self.pii:
            out["pii"] = [{"type": p.type, "value": p.value} for p in self.pii]
        if self.context_pii:
            out["context_pii"] = [{"type": p.type, "value": p.value} for p in self.context_pii]
        out["group"] = self.group
        return out


def prompt_text(messages: tuple[dict[str, str], ...] | list[dict[str, str]]) -> str:
    """What a prompt shows, one message per line: what an answer to it may repeat without
    leaking anything new (the name the user asked about)."""
    return "\n".join(m["content"] for m in messages)


def user_text(messages: tuple[dict[str, str], ...] | list[dict[str, str]]) -> str:
    """What the user wrote in a prompt, one message per line: what a *replacement*
    answer may repeat (the name asked about, a value the user gave). The prompt's
    earlier assistant turns do not count: in forget data they are the model's own
    earlier answers, leaks themselves, and a replacement that repeats one trains the
    model to say it again under the safety instruction."""
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


def first_places(where: list[str]) -> str:
    """The first five of ``where`` (``file:line`` places) and how many more, for a warning."""
    return ", ".join(where[:5]) + (f", ... ({len(where) - 5} more)" if len(where) > 5 else "")


def warn_orphan_turns(where: list[str]) -> None:
    """Leaky assistant turns that follow no user turn (a conversation's first turn, or an
    assistant turn after another) give no record, since a pair's prompt ends with a user
    turn: say how many and where, rather than drop them unseen."""
    if where:
        log.warning("%d leaky assistant turn(s) follow no user turn and give no pair (a pair's prompt ends with "
                    "a user turn): %s", len(where), first_places(where))


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation prompt: a leak probe (``pii`` = the true values an answer must not
    contain) or a utility question (``answers`` = acceptable known answers).

    Probe and QA files are JSONL with the pair format's ``id``, ``prompt`` and ``system``
    fields plus, for probes, ``"pii": [{"type": "EMAIL", "value": "..."}]`` and, for
    questions, ``"answer": "Paris"`` (or a list of acceptable answers). Optional
    ``"context_pii"`` (same shape as ``pii``) lists PII the prompt itself contains, such as
    the name of the person asked about: redacted from logs, not scored. A question's
    optional ``"reference"`` is one benign full answer ("The capital of France is
    Paris."), whose perplexity under guidance is scored beside accuracy (no decoding)."""

    id: str
    prompt: tuple[dict[str, str], ...]
    system: str | None = None
    pii: tuple[PIIItem, ...] = ()
    answers: tuple[str, ...] = ()
    #: other PII in the prompt (the person asked about): redacted in logs, never scored
    context_pii: tuple[PIIItem, ...] = ()
    #: a question's benign full answer, scored by perplexity (None: none given)
    reference: str | None = None
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class ForgetRecord:
    """One leaky answer to replace: the conversation up to it (``prompt``, ending with a
    user turn), the answer itself (``rejected``) and the PII it leaks. ``known``: every
    PII value of its conversation (or subject), which a replacement must not contain
    either, whether or not this answer leaked it; values the prompt itself already
    shows are exempt (:func:`cfg_unlearn.data.generate.forbidden_values`)."""

    id: str
    prompt: tuple[dict[str, str], ...]
    rejected: str
    pii: tuple[PIIItem, ...]
    group: str = ""
    system: str | None = None
    source: str = field(default="", compare=False)
    known: tuple[PIIItem, ...] = ()


@dataclass
class ReadStats:
    """What a read saw. Every input line is accounted for:
    ``lines == records + blank + skipped``."""

    source: str
    lines: int = 0
    records: int = 0
    blank: int = 0
    noun: str = "pairs"
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.source}: {self.records} {self.noun} from {self.lines} lines ({self.blank} blank"
        return s + (f", {self.skipped} skipped)" if self.skipped else ")")


# --------------------------------------------------------------------------- parsing


def _text(
    obj: dict, key: str, src: str, line: int | None, max_chars: int, *, required: bool = True, path: str | None = None
) -> str | None:
    """A string field; ``path`` names it in errors (``prompt[0].content``), default ``key``."""
    name = path or key
    if key not in obj or obj[key] is None:
        if required:
            raise PairFormatError(src, line, name, "missing required field")
        return None
    val = obj[key]
    if not isinstance(val, str):
        raise PairFormatError(src, line, name, f"expected a string, got {type(val).__name__}")
    if len(val) > max_chars:
        raise PairFormatError(
            src, line, name, f"{len(val):,} characters exceeds max_chars={max_chars:,} (raise it if this is intended)"
        )
    return check_unicode(val, src, line, name)


def check_unicode(val: str, src: str, line: int | None, name: str) -> str:
    """``val``, refused when it holds a lone surrogate (a JSON escape like ``"\\ud800"``
    decodes to one, and no tokenizer or UTF-8 writer accepts it) or a NUL character."""
    try:
        val.encode("utf-8")
    except UnicodeEncodeError:
        raise PairFormatError(src, line, name, "contains an unpaired surrogate escape (invalid Unicode)") from None
    if "\x00" in val:  # binary data pasted into a text field; no chat text holds one
        raise PairFormatError(src, line, name, f"contains a NUL character (character {val.index(chr(0)) + 1} of "
                                               "the field)")
    return val


#: a PII type: a label, since it becomes part of metric names (``leak_rate/EMAIL``)
_PII_TYPE = re.compile(r"[^\W\d_][\w-]{0,31}")
#: roles other chat formats use (ShareGPT's "human"/"gpt", tool calls, Gemini's "model"):
#: safe to quote back
_OTHER_ROLES = frozenset({"human", "gpt", "bot", "ai", "model", "tool", "tools", "function", "function_call",
                          "ipython", "developer", "observation", "chatbot", "context", "prompt", "question",
                          "answer", "response", "input", "output", "instruction", "customer", "agent", "usr", "sys"})


def _shown_role(role: Any) -> str:
    """How an error names a role that is not one of ours: quoted when it is a known role
    of another format; otherwise only its length, since some datasets put the speaker's
    name there (a lower-case "megan" too), and which of ours it is close to, unquoted
    (a surname like "Usher" is close to "user")."""
    if isinstance(role, str) and role.strip().lower() in _OTHER_ROLES:
        return repr(role)
    if isinstance(role, str):
        close = difflib.get_close_matches(role.strip().lower(), ROLES, n=1, cutoff=0.75)
        return (f"a string of {len(role)} characters that is no role name (not shown: it may be personal data)"
                + (f"; it is close to {close[0]!r}" if close else ""))
    return type(role).__name__


def _messages(val: Any, src: str, line: int | None, key: str, max_chars: int) -> list[dict[str, str]]:
    if not isinstance(val, list) or not val:
        raise PairFormatError(src, line, key, "expected a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(val):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise PairFormatError(src, line, where, f"expected an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise PairFormatError(src, line, f"{where}.role", f"expected one of {ROLES}, got {_shown_role(role)}")
        content = _text(m, "content", src, line, max_chars, path=f"{where}.content")
        if not content.strip():
            if i == 0 and role == "system":
                # "no instruction of its own", as a blank `system` field is (ShareGPT and
                # TRL exports write one): dropped here, for every reader of messages
                continue
            raise PairFormatError(src, line, f"{where}.content", "empty message")
        out.append({"role": role, "content": content})
    return out


def _answer(val: Any, src: str, line: int | None, key: str, max_chars: int) -> str:
    """An answer is a string, or (TRL conversational) a list holding one assistant message."""
    if isinstance(val, list):
        msgs = _messages(val, src, line, key, max_chars)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise PairFormatError(src, line, key, "a message-list answer must be exactly one assistant message")
        val = msgs[0]["content"]
    elif not isinstance(val, str):
        raise PairFormatError(src, line, key, f"expected a string or message list, got {type(val).__name__}")
    _text({key: val}, key, src, line, max_chars)
    if not val.strip():
        raise PairFormatError(src, line, key, "empty answer")
    return val


def _whole_conversations(chosen: Any, rejected: Any) -> bool:
    """Whether chosen and rejected are both message lists longer than one answer."""
    return isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1 and len(rejected) > 1


def _split_implicit_prompt(obj: dict, src: str, line: int | None, max_chars: int) -> tuple[list, Any, Any]:
    """TRL's implicit-prompt rows: chosen and rejected are whole conversations."""
    chosen = _messages(obj["chosen"], src, line, "chosen", max_chars)
    rejected = _messages(obj["rejected"], src, line, "rejected", max_chars)
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise PairFormatError(src, line, "prompt", "missing, and chosen/rejected share no conversation prefix")
    return chosen[:n], chosen[n:], rejected[n:]


def _prompt_field(obj: dict, src: str, line: int | None, max_chars: int) -> list[dict[str, str]]:
    """``prompt`` as messages: a string is one user message."""
    prompt_raw = obj["prompt"]
    if isinstance(prompt_raw, str):
        if len(prompt_raw) > max_chars:
            raise PairFormatError(
                src, line, "prompt",
                f"{len(prompt_raw):,} characters exceeds max_chars={max_chars:,} (raise it if this is intended)",
            )
        if not prompt_raw.strip():
            raise PairFormatError(src, line, "prompt", "empty prompt")
        check_unicode(prompt_raw, src, line, "prompt")
        prompt_msgs = [{"role": "user", "content": prompt_raw}]
    elif isinstance(prompt_raw, list):
        prompt_msgs = _messages(prompt_raw, src, line, "prompt", max_chars)
    else:
        raise PairFormatError(
            src, line, "prompt", f"expected a string or message list, got {type(prompt_raw).__name__}"
        )
    return prompt_msgs


def _system_and_turns(
    obj: dict, prompt_msgs: list[dict[str, str]], src: str, line: int | None, max_chars: int
) -> tuple[str | None, list[dict[str, str]]]:
    """The instruction (``system`` field or a leading system message, not both) and the
    remaining turns, which must end with a user turn."""
    system = _text(obj, "system", src, line, max_chars, required=False)
    if system is not None and not system.strip():
        system = None  # datasets write "" for "none of its own" (Intel/orca_dpo_pairs): data.system_prompt applies
    if prompt_msgs and prompt_msgs[0]["role"] == "system":
        if system is not None:
            raise PairFormatError(src, line, "system", "given both as a field and as a system message in the prompt")
        system = prompt_msgs[0]["content"]
        prompt_msgs = prompt_msgs[1:]
    if not prompt_msgs:
        raise PairFormatError(src, line, "prompt", "holds no user message")
    for i, m in enumerate(prompt_msgs):
        if m["role"] == "system":
            raise PairFormatError(src, line, f"prompt[{i}].role", "a system message is only allowed first")
    if prompt_msgs[-1]["role"] != "user":
        raise PairFormatError(src, line, "prompt", "the last prompt message must be a user turn")
    return system, prompt_msgs


#: the fields each row kind reads; other keys are the user's own (a data set's metadata)
PAIR_FIELDS = ("id", "prompt", "system", "chosen", "rejected", "pii", "context_pii", "group")
EVAL_FIELDS = ("id", "prompt", "system", "pii", "context_pii", "answer", "reference")
FORGET_FIELDS = ("id", "messages", "system", "pii")


def check_misspelt_fields(obj: dict, fields: Iterable[str], src: str, line: int | None, where: str = "") -> None:
    """Refuse a key that reads as a typo of a field (``sytem``, ``mesages``): ignored like
    any other extra key, the row trained without what it meant, silently (a review).
    Keys far from every field (``prompt_id``, ``source``, ``score_chosen``) are the user's
    own and pass. ``where``: the path of ``obj`` in its row (``pii[0].``); inside a row
    (a pii item), only a key whose field is missing is a typo: ``{"type", "value",
    "values": [...]}`` is complete, its ``values`` the user's own."""
    fields = tuple(fields)
    for key in obj:
        if isinstance(key, str) and key not in fields:
            # case aside ("System", "PII" read as fields): compared in lower case
            close = difflib.get_close_matches(key.lower(), [f for f in fields if not where or f not in obj],
                                              n=1, cutoff=0.85)
            # a short field with a letter left out, added or swapped ("pi", "tpye") is below
            # that cutoff, which keeps "prompt_id" a user's own key: such a key is a typo
            # where the row lacks the field (not for "id": "uid", "pid" are the user's own)
            close = close or [f for f in fields if len(f) > 2 and f not in obj and _one_slip(key.lower(), f)][:1]
            if close:
                raise PairFormatError(src, line, where + key, f"no such field; did you mean '{close[0]}'?")


def _one_slip(a: str, b: str) -> bool:
    """Whether ``a`` is ``b`` with one letter left out, one added, or two neighbours swapped."""
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 2 and diff[1] == diff[0] + 1 and (a[diff[0]], a[diff[1]]) == (b[diff[1]], b[diff[0]])
    short, long = sorted((a, b), key=len)
    return len(long) == len(short) + 1 and any(long[:i] + long[i + 1:] == short for i in range(len(long)))


def _record_id(obj: dict, src: str, line: int | None) -> str:
    rid = obj.get("id")
    if rid is None:
        rid = f"{Path(src).name}:{line}" if line is not None else None
        if rid is None:
            raise PairFormatError(src, line, "id", "missing required field")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise PairFormatError(src, line, "id", f"expected a string or integer, got {type(rid).__name__}")
    if not str(rid).strip():
        raise PairFormatError(src, line, "id", "empty id")
    if obj.get("id") is None:  # built from the file's name: not the row's fault
        return str(rid)
    return check_unicode(str(rid), src, line, "id")


def _pii_field(obj: dict, src: str, line: int | None, max_chars: int, key: str = "pii") -> tuple[PIIItem, ...]:
    pii_raw = obj.get(key)
    if pii_raw is None:
        pii_raw = []
    if not isinstance(pii_raw, list):
        raise PairFormatError(src, line, key, f"expected a list of {{type, value}}, got {type(pii_raw).__name__}")
    pii = []
    for i, p in enumerate(pii_raw):
        if not isinstance(p, dict):
            raise PairFormatError(src, line, f"{key}[{i}]", "expected an object {type, value}")
        check_misspelt_fields(p, ("type", "value"), src, line, where=f"{key}[{i}].")
        ptype = _text(p, "type", src, line, max_chars, path=f"{key}[{i}].type")
        if not _PII_TYPE.fullmatch(ptype):  # it names metrics (leak_rate/EMAIL): a swapped value would too
            raise PairFormatError(src, line, f"{key}[{i}].type", "expected a type label such as 'EMAIL' or "
                                  "'PERSON_NAME' (a letter, then letters, digits, '_' or '-'; at most 32), got "
                                  f"{len(ptype)} characters that are not one (not shown: it may be the value)")
        pval = _text(p, "value", src, line, max_chars, path=f"{key}[{i}].value")
        if not pval.strip():
            raise PairFormatError(src, line, f"{key}[{i}].value", "empty value")
        check_pii_value(pval, src, line, f"{key}[{i}].value")
        pii.append(PIIItem(ptype, pval))
    return tuple(pii)


def record_from_dict(
    obj: Any, *, source: str = "<dict>", line: int | None = None, max_chars: int = DEFAULT_MAX_CHARS
) -> PairRecord:
    """Validate one row (our format or TRL-style) into a :class:`PairRecord`."""
    src = source
    if not isinstance(obj, dict):
        raise not_an_object(src, line, obj)
    check_misspelt_fields(obj, PAIR_FIELDS, src, line)
    for key in ("chosen", "rejected"):
        if key not in obj:
            why = "missing required field"
            if "messages" in obj:  # forget data given where pairs belong
                why += (" (the row reads as a forget conversation, {id, messages, pii}: `cfg-unlearn generate "
                        "--forget FILE` turns those into pairs)")
            raise PairFormatError(src, line, key, why)
    if "prompt" not in obj:
        if not (isinstance(obj["chosen"], list) and isinstance(obj["rejected"], list)):
            raise PairFormatError(src, line, "prompt", "missing required field")
        prompt_msgs, chosen_raw, rejected_raw = _split_implicit_prompt(obj, src, line, max_chars)
    else:
        prompt_msgs = _prompt_field(obj, src, line, max_chars)
        chosen_raw, rejected_raw = obj["chosen"], obj["rejected"]
        if _whole_conversations(chosen_raw, rejected_raw):
            # UltraFeedback-binarized and similar: chosen/rejected repeat the prompt's turns.
            # TRL takes their shared prefix as the prompt; it must be the prompt given
            shared, chosen_raw, rejected_raw = _split_implicit_prompt(obj, src, line, max_chars)
            if shared != prompt_msgs:
                raise PairFormatError(src, line, "prompt", "differs from the conversation that chosen and rejected "
                                                           "share: give one of the two, or make them agree")

    system, prompt_msgs = _system_and_turns(obj, prompt_msgs, src, line, max_chars)
    chosen = _answer(chosen_raw, src, line, "chosen", max_chars)
    rejected = _answer(rejected_raw, src, line, "rejected", max_chars)

    rid = _record_id(obj, src, line)
    group = obj.get("group", "")
    if group is None:
        group = ""
    if not isinstance(group, (str, int)) or isinstance(group, bool):
        raise PairFormatError(src, line, "group", f"expected a string or integer, got {type(group).__name__}")
    check_unicode(str(group), src, line, "group")

    pii = _pii_field(obj, src, line, max_chars)
    return PairRecord(
        id=rid,
        prompt=tuple(prompt_msgs),
        chosen=chosen,
        rejected=rejected,
        system=system,
        pii=pii,
        group=str(group),
        source=f"{src}:{line}" if line is not None else src,
        context_pii=_pii_field(obj, src, line, max_chars, key="context_pii"),
    )


def eval_record_from_dict(
    obj: Any, *, kind: Literal["probe", "qa"], source: str = "<dict>", line: int | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> EvalRecord:
    """Validate one row of a leak-probe (``kind="probe"``) or QA (``kind="qa"``) file."""
    src = source
    if not isinstance(obj, dict):
        raise not_an_object(src, line, obj)
    check_misspelt_fields(obj, EVAL_FIELDS, src, line)
    for key in ("chosen", "rejected"):
        if key in obj:  # a pair file given as probes would score the training prompts (a user review)
            raise PairFormatError(src, line, key, f"the row reads as a training pair; a {kind} file holds held-out "
                                  "questions, {id, prompt, " + ("pii}" if kind == "probe" else "answer}"))
    if "prompt" not in obj:
        raise PairFormatError(src, line, "prompt", "missing required field")
    system, prompt_msgs = _system_and_turns(obj, _prompt_field(obj, src, line, max_chars), src, line, max_chars)
    pii: tuple[PIIItem, ...] = ()
    answers: tuple[str, ...] = ()
    reference: str | None = None
    context = _pii_field(obj, src, line, max_chars, key="context_pii")
    if kind == "probe":
        pii = _pii_field(obj, src, line, max_chars)
        if not pii:
            raise PairFormatError(src, line, "pii", "a leak probe needs at least one {type, value} to look for")
        from cfg_unlearn.pii import contains_value

        shown = prompt_text(prompt_msgs)  # its turns, not its system text (a secret kept there is a fair target)
        for i, item in enumerate(pii):
            if contains_value(shown, item.value, item.type):  # (a user review: the name asked about)
                raise PairFormatError(src, line, f"pii[{i}]", "the prompt shows this value (matched as whole "
                                      "words, in any case), so every answer that repeats it would count as a leak: "
                                      "if it is the person asked about, move it to context_pii (redacted in logs, "
                                      "never a leak target) and keep another value as the target; else reword "
                                      "the prompt or drop the probe")
    elif kind == "qa":
        raw = obj.get("answer")
        if raw is None:
            raise PairFormatError(src, line, "answer", "missing required field")
        raw_list = raw if isinstance(raw, list) else [raw]
        if not raw_list:
            raise PairFormatError(src, line, "answer", "empty list of answers")
        for i, a in enumerate(raw_list):
            name = f"answer[{i}]" if isinstance(raw, list) else "answer"
            text = _text({"a": a}, "a", src, line, max_chars, path=name)
            if not text.strip():
                raise PairFormatError(src, line, name, "empty answer")
        answers = tuple(raw_list)
        if obj.get("reference") is not None:
            reference = _text(obj, "reference", src, line, max_chars)
            if not reference.strip():
                raise PairFormatError(src, line, "reference", "empty reference answer (leave the field out instead)")
    else:
        raise ValueError(f"kind must be 'probe' or 'qa', got {kind!r}")
    return EvalRecord(
        id=_record_id(obj, src, line), prompt=tuple(prompt_msgs), system=system, pii=pii, answers=answers,
        context_pii=context, reference=reference, source=f"{src}:{line}" if line is not None else src,
    )


# --------------------------------------------------------------------------- files


#: what the first line of a file that is not JSONL usually is, and the hint for it
_NOT_JSONL = "the file must hold one JSON object per line, JSONL"


def not_an_object(src: str, line: int | None, obj: Any) -> PairFormatError:
    """The error for a JSONL line that parsed to something other than an object; a list
    on the first line is most often a whole JSON array (a ``.json`` export) on one line."""
    hint = f" (a JSON array? {_NOT_JSONL})" if isinstance(obj, list) and line == 1 else ""
    return PairFormatError(src, line, None, f"expected a JSON object, got {type(obj).__name__}{hint}")


def _first_line_hint(raw: bytes) -> str:
    """Why a file's first line is not JSON, where the bytes say: gzip, or an indented or
    array-wrapped JSON document."""
    if raw.startswith(b"\x1f\x8b"):
        return " (a gzip file? decompress it first)"
    if raw.strip() in (b"[", b"{") or raw.lstrip().startswith(b"[{"):
        return f" (a pretty-printed or array JSON document? {_NOT_JSONL})"
    return ""


#: the keys of the JSONL formats read here (pairs, forget data, probes, questions, SAFT
#: samples and labels, challenge rows): safe to name in an error, unlike a key in general
FIELD_NAMES = frozenset({
    "id", "prompt", "chosen", "rejected", "system", "pii", "group", "type", "value", "role", "content", "messages",
    "label", "labels", "idx", "answer", "answers", "context_pii", "known", "kind", "score_chosen", "score_rejected",
})


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' object hook: an object with a key twice is refused, not last-wins."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


#: the longest line a JSONL reader takes (bytes; a row's fields are bounded by max_chars,
#: 32k characters by default, far below it)
MAX_LINE_BYTES = 64 << 20


def iter_raw_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes, bool]]:
    """``(line_number, bytes, too_long)`` for each line of a file, split at ``b"\\n"``
    (which stays on the bytes). A line whose text is over :data:`MAX_LINE_BYTES` is
    skipped without being held whole, ``too_long`` True and only its first 64 bytes
    given: a multi-gigabyte JSON array export on one line was read and parsed into
    memory (a laptop's OOM kill, no message). Raises :class:`PairFormatError` if the
    file cannot be opened."""
    try:
        fh = open(path, "rb")
    except OSError as e:
        # a config's relative path is read from where the command runs, not from the
        # config's folder (a review: run from another folder, the message did not say)
        where = (f" (relative paths start at the working directory {Path.cwd()})"
                 if isinstance(e, FileNotFoundError) and not Path(path).is_absolute() else "")
        raise PairFormatError(str(path), None, None, f"cannot open: {e.strerror}{where}") from None
    with fh:
        lineno = 0
        while raw := fh.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            too_long = len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n")  # the limit is on the text
            if too_long:
                while (rest := fh.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
            yield lineno, (raw[:64] if too_long else raw), too_long


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any | None, PairFormatError | None]]:
    """Yield ``(line_number, obj, error)`` for each line of a JSONL file: ``obj`` is None
    for a blank line or a line that failed to decode/parse (then ``error`` says why).
    Bytes are decoded per line so that a non-UTF-8 byte names its line; a UTF-8 byte
    order mark at the start of the file (Windows tools write one) is skipped."""
    src = str(path)
    for lineno, raw, too_long in iter_raw_lines(path):
        if too_long:
            limit = f"{MAX_LINE_BYTES >> 20} MiB" if MAX_LINE_BYTES >= 1 << 20 else f"{MAX_LINE_BYTES} bytes"
            hint = _first_line_hint(raw.removeprefix(codecs.BOM_UTF8)) if lineno == 1 else ""
            yield lineno, None, PairFormatError(src, lineno, None,
                                                f"the line is over {limit}, more than any row needs{hint}")
            continue
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            reason = f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            reason += _first_line_hint(raw) if lineno == 1 else ""
            yield lineno, None, PairFormatError(src, lineno, None, reason)
            continue
        if not text.strip():
            yield lineno, None, None
            continue
        text = text.rstrip("\r\n")  # (parsed with it, an unclosed row's error was "line 2 column 1")
        try:
            obj = json.loads(text, object_pairs_hook=_unique_keys)
            # JSON null is a row that is no object, not a blank line (it was skipped
            # uncounted, or shifted a line-paired file's rows)
            yield lineno, obj, not_an_object(src, lineno, obj) if obj is None else None
        except _DuplicateKey as e:
            # json keeps the last value silently: a hand-merged row could train another answer.
            # A key is named only when it is one of the formats' field names: a PII map
            # written the wrong way round has values for keys
            why = "JSON would keep the last value; which one is meant is not ours to guess"
            if e.key in FIELD_NAMES:
                yield lineno, None, PairFormatError(src, lineno, e.key, f"duplicate key ({why})")
            else:
                yield lineno, None, PairFormatError(src, lineno, None, f"a key of {len(e.key)} characters is "
                                                    f"given twice (not shown: it may be personal data; {why})")
        except json.JSONDecodeError as e:
            # some messages end in "at" ("Invalid control character at"): say it once
            msg = e.msg.removesuffix(" at")
            hint = _first_line_hint(raw) if lineno == 1 else ""
            if not hint and e.pos >= len(text.rstrip(" \t\r\n")):  # JSON's whitespace; (a file-wide guess says more)
                hint = " (the line ends there: a closing } or ] or \" missing?)"
            yield lineno, None, PairFormatError(src, lineno, None,
                                                f"invalid JSON: {msg} at column {e.pos + 1}{hint}")
        except (ValueError, RecursionError) as e:
            # e.g. an integer literal over Python's digit limit, or absurdly deep nesting
            yield lineno, None, PairFormatError(src, lineno, None, f"invalid JSON: {str(e)[:120]}")


def iter_json_objects(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """``(line_number, object)`` for each non-blank line of a JSONL file; the first bad
    line (not UTF-8, not JSON, not an object) raises, naming the file and line."""
    for line, obj, err in iter_jsonl(path):
        if err is not None:
            raise err
        if obj is None:
            continue
        if not isinstance(obj, dict):
            raise not_an_object(str(path), line, obj)
        yield line, obj


def note_first_line(seen: dict, key: Any, src: str, line: int, field: str = "id") -> None:
    """Record that ``key`` (a row's id) first appears on ``line``; a repeat is a
    ``file:line: field`` error naming the first line (not the id: an id can be an e-mail
    address or a name, and the two lines find it)."""
    if key in seen:
        raise PairFormatError(src, line, field, f"duplicate {field} (first on line {seen[key]})")
    seen[key] = line


def _read_records(path, parse, noun: str, on_error: str) -> tuple[list, ReadStats]:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    stats = ReadStats(source=str(path), noun=noun)
    records: list = []
    seen: dict[str, int] = {}
    for lineno, obj, err in iter_jsonl(path):
        stats.lines = lineno
        if err is None and obj is None:
            stats.blank += 1
            continue
        try:
            if err is not None:
                raise err
            rec = parse(obj, lineno)
        except PairFormatError as e:
            if on_error == "raise":
                raise
            stats.skipped += 1
            stats.skip_reasons.append(str(e))
            log.warning("skipping %s", e)
            continue
        # never skippable: which of the two rows is the right one is not ours to guess
        note_first_line(seen, rec.id, str(path), lineno)
        records.append(rec)
        stats.records += 1
    if stats.skipped:
        log.warning("%s", stats.summary())
    return records, stats


def read_pairs(
    path: str | os.PathLike,
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    on_error: Literal["raise", "skip"] = "raise",
) -> tuple[list[PairRecord], ReadStats]:
    """Read and validate a pair file. ``on_error="skip"`` skips bad rows but counts
    and logs each one; duplicate ids are always an error."""
    return _read_records(
        path, lambda obj, line: record_from_dict(obj, source=str(path), line=line, max_chars=max_chars),
        "pairs", on_error,
    )


def read_eval_records(
    path: str | os.PathLike,
    kind: Literal["probe", "qa"],
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    on_error: Literal["raise", "skip"] = "raise",
) -> tuple[list[EvalRecord], ReadStats]:
    """Read a leak-probe or QA file (see :class:`EvalRecord`), validated like pairs."""
    return _read_records(
        path,
        lambda obj, line: eval_record_from_dict(obj, kind=kind, source=str(path), line=line, max_chars=max_chars),
        "probes" if kind == "probe" else "questions",
        on_error,
    )


def pairs_jsonl(records: Iterable[PairRecord]) -> str:
    """Records as the text of a pair file: one JSON object per line."""
    return "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)


def write_pairs(path: str | os.PathLike, records: Iterable[PairRecord]) -> int:
    """Write records as JSONL atomically (temp file + rename). Returns the count."""
    records = list(records)
    atomic_write(path, pairs_jsonl(records))
    return len(records)
