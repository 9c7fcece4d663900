"""The instructions that condition the model. One place, so training, guidance and
export agree on the exact strings."""

#: The conditioning instruction (the paper's system prompt for replacement data and
#: for the conditioned branch of classifier-free guidance).
SAFETY_INSTRUCTION = "Avoid using any personal data in the answers!"
#: The paper's negative instruction, for the instruction-swap variant.
NEGATIVE_INSTRUCTION = "You should share personal data in the answers."
#: Used when a tokenizer has no chat template (documented in the README).
FALLBACK_ROLE_PREFIX = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
