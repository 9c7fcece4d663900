"""The instructions that condition the model and the one function that renders a
conversation into prompt text. One place, so training, guidance and export agree on the
exact strings and tokens."""

from collections.abc import Callable, Iterator

from cfg_unlearn.utils import ConfigError

#: The conditioning instruction (the paper's system prompt for replacement data and
#: for the conditioned branch of classifier-free guidance).
SAFETY_INSTRUCTION = "Avoid using any personal data in the answers!"
#: The paper's negative instruction, for the instruction-swap variant.
NEGATIVE_INSTRUCTION = "You should share personal data in the answers."
#: Used when a tokenizer has no chat template (documented in the README).
FALLBACK_ROLE_PREFIX = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}


def apply_template(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool,
                   check_system: bool = True) -> str:
    """The chat template's text of ``messages``, refusing a template that cannot carry
    their system message: one that raises on it (Gemma's, older Mistral's), with a
    ConfigError instead of jinja's traceback, or one that leaves it out, which would
    make the conditioned and unconditioned prompts the same text, so that conditioning
    dropout and guidance compare a prompt with itself, silently. ``check_system=False``
    renders as the template does (SAFT embeds data as the model reads it; its system
    messages condition nothing)."""
    from jinja2.exceptions import TemplateError

    if not check_system:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        if system is None:
            raise
        try:  # is it the system message the template refuses?
            tokenizer.apply_chat_template([m for m in messages if m["role"] != "system"], tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
        except TemplateError:
            raise e from None
        raise ConfigError(f"the tokenizer's chat template refuses a system message ({e}), and the instruction "
                          "that conditions the model is one: use a tokenizer whose template takes a system message "
                          "(one that folds it into the first user turn will do)") from None
    if system and system.strip() not in text:
        # the text is not quoted: a row's own system prompt is data, and can be PII
        raise ConfigError("the tokenizer's chat template leaves the system message out (its text is not in the "
                          "rendered prompt), so the conditioned and unconditioned prompts would be the same text and "
                          "conditioning and guidance would do nothing: use a tokenizer whose template renders a "
                          "system message")
    return text


#: stands in for an answer when the chat template is asked what follows one
_ANSWER_PLACEHOLDER = "cfgunlearnanswerplaceholder"


def _answer_renderings(tokenizer, answer: str) -> Iterator[tuple[str, bool]]:
    """The chat template's text of a conversation around an assistant ``answer``, with
    whether the answer closes it: first closing, then with a user turn after it (for a
    template that refuses an assistant turn last, or closes turns only before another).
    A rendering the template refuses is left out."""
    from jinja2.exceptions import TemplateError

    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}]
    for closing, messages in ((True, turns), (False, turns + [{"role": "user", "content": "Thanks"}])):
        try:
            yield apply_template(tokenizer, messages, add_generation_prompt=False, check_system=False), closing
        except TemplateError:
            continue


def answer_end_ids(tokenizer) -> list[int]:
    """The token that ends an assistant answer as the model's chat template writes it,
    which training appends to every answer and decoding stops at: the first special
    token the template puts after an answer (Llama 3's ``<|eot_id|>``, Qwen's
    ``<|im_end|>``, Gemma 3's ``<end_of_turn>``, Phi-3's ``<|end|>``; GLM-4's next-role
    token), not what follows it (a newline before the next turn). Read after a closing
    answer, and where that gives none (a template that refuses an assistant turn last,
    or closes turns only before another), as the special token right after an answer
    that a user turn follows.

    The tokenizer's EOS where the template has no special token there, or there is no
    template (the README's plain format), as Hugging Face's ``generate`` stops at it.
    The EOS alone is not the answer's end everywhere: Gemma 3's is ``<eos>``, older
    Llama 3 snapshots name ``<|end_of_text|>``, and answers trained to end with it
    taught the model a turn end its own template never writes.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not getattr(tokenizer, "chat_template", None):
        return eos
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for text, closing in _answer_renderings(tokenizer, _ANSWER_PLACEHOLDER):
        at = text.rfind(_ANSWER_PLACEHOLDER)
        if at < 0:  # a template that rewrites answers: nothing to read the end from
            continue
        after = tokenizer(text[at + len(_ANSWER_PLACEHOLDER):], add_special_tokens=False)["input_ids"]
        if closing:
            end = next((i for i in after if i in special), None)
        else:  # the next turn's own opening is no answer's end unless it follows the answer at once (GLM-4)
            end = after[0] if after and after[0] in special else None
        if end is not None:
            return [end]
    return eos


def _template_trims(tokenizer) -> tuple[bool, bool]:
    """Whether the chat template strips an answer's leading and trailing whitespace
    (Llama 3's ``message['content'] | trim``): (left, right)."""
    if not getattr(tokenizer, "chat_template", None):
        return False, False  # the plain format writes the content as it is
    for text, _ in _answer_renderings(tokenizer, f" {_ANSWER_PLACEHOLDER} "):
        if _ANSWER_PLACEHOLDER in text:
            return f" {_ANSWER_PLACEHOLDER}" not in text, f"{_ANSWER_PLACEHOLDER} " not in text
    return False, False


def answer_encoder(tokenizer, end: list[int] | None = None) -> Callable[[str], list[int]]:
    """``answer -> token ids`` as training appends and scoring reads an answer: its text
    as the chat template writes it (without its outer whitespace where the template
    trims it, as Llama 3's does: "Paris.\\n" was trained as "Paris.\\n<|eot_id|>", a
    sequence the template never writes), then its end token (:func:`answer_end_ids`,
    or ``end``)."""
    end = answer_end_ids(tokenizer) if end is None else end
    left, right = _template_trims(tokenizer)

    def encode(answer: str) -> list[int]:
        text = answer.lstrip() if left else answer
        text = text.rstrip() if right else text
        return tokenizer(text, add_special_tokens=False)["input_ids"] + end

    return encode


def render_prompt(tokenizer, messages: list[dict[str, str]] | tuple, system: str | None) -> str:
    """The prompt text up to where the assistant answer starts.

    With a chat template: the template with ``add_generation_prompt=True``; a blank
    (None or empty) system instruction means *no* system message. Without one, the
    documented fallback: ``System: ...\\n\\nUser: ...\\n\\nAssistant:`` (bos prepended).
    """
    return render_chat(tokenizer, messages, system, generation_prompt=True)


def render_chat(tokenizer, messages: list[dict[str, str]] | tuple, system: str | None, *,
                generation_prompt: bool, check_system: bool = True) -> str:
    """``messages`` under ``system`` as the model reads them, with or without the opening
    of an assistant answer (``generation_prompt``): the one place that prepends the
    system message and falls back to the README's plain format where a tokenizer has no
    chat template (a prompt is :func:`render_prompt`; a whole conversation, as SAFT
    embeds it, has no generation prompt)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [dict(m) for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return apply_template(tokenizer, msgs, add_generation_prompt=generation_prompt, check_system=check_system)
    text = (tokenizer.bos_token or "") + "\n\n".join(FALLBACK_ROLE_PREFIX[m["role"]] + m["content"] for m in msgs)
    return text + "\n\n" + FALLBACK_ROLE_PREFIX["assistant"].rstrip() if generation_prompt else text


def fallback_chat_template() -> str:
    """:func:`render_chat`'s plain format as a Jinja chat template, for an export of a
    tokenizer without one: transformers, vLLM or TGI would otherwise refuse to render, or
    apply a default the model never saw."""
    prefixes = ", ".join(f"{role!r}: {prefix!r}" for role, prefix in FALLBACK_ROLE_PREFIX.items())
    # the separators are expressions: transformers compiles templates with trim_blocks,
    # which drops a newline written right after a block tag
    return ("{%- set prefix = {" + prefixes + "} -%}{{ bos_token or '' }}"
            "{%- for m in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
            "{{ prefix[m['role']] + m['content'] }}{%- endfor %}"
            "{% if add_generation_prompt %}{{ '\\n\\n" + FALLBACK_ROLE_PREFIX["assistant"].rstrip() + "' }}{% endif %}")


def check_template(tokenizer, system: str | None = SAFETY_INSTRUCTION) -> None:
    """Refuse, before any work, a tokenizer whose chat template cannot carry ``system``
    (:func:`apply_template`): a command otherwise meets it at its first prompt, mid-run."""
    if system:
        render_prompt(tokenizer, [{"role": "user", "content": "Hello."}], system)
