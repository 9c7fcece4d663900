"""The instructions that condition the model and the one function that renders a
conversation into prompt text. One place, so training, guidance and export agree on the
exact strings and tokens."""

#: The conditioning instruction (the paper's system prompt for replacement data and
#: for the conditioned branch of classifier-free guidance).
SAFETY_INSTRUCTION = "Avoid using any personal data in the answers!"
#: The paper's negative instruction, for the instruction-swap variant.
NEGATIVE_INSTRUCTION = "You should share personal data in the answers."
#: Used when a tokenizer has no chat template (documented in the README).
FALLBACK_ROLE_PREFIX = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}


def render_prompt(tokenizer, messages: list[dict[str, str]] | tuple, system: str | None) -> str:
    """The prompt text up to where the assistant answer starts.

    With a chat template: the template with ``add_generation_prompt=True``; a blank
    (None or empty) system instruction means *no* system message. Without one, the
    documented fallback: ``System: ...\\n\\nUser: ...\\n\\nAssistant:`` (bos prepended).
    """
    msgs = ([{"role": "system", "content": system}] if system else []) + [dict(m) for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    text = "\n\n".join(FALLBACK_ROLE_PREFIX[m["role"]] + m["content"] for m in msgs)
    return (tokenizer.bos_token or "") + text + "\n\n" + FALLBACK_ROLE_PREFIX["assistant"].rstrip()
