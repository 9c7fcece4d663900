"""The one model-loading path: fit, validate, generation and export all come here.

``tiny:<dir>`` names are resolved to a built tiny model first (see :mod:`cfg_unlearn.tiny`);
everything else goes to ``AutoTokenizer`` / ``AutoModelForCausalLM`` unchanged, so hub
names work where the hub is reachable and local paths work everywhere.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch

from cfg_unlearn.tiny import resolve_pretrained
from cfg_unlearn.utils import ConfigError

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(dtype: str | None) -> torch.dtype | str | None:
    if dtype is None or dtype == "auto":
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or 'auto'") from None


def context_limit(model) -> int | None:
    """The positions ``model`` can read (``config.max_position_embeddings``), or None
    when its config does not say. A PEFT model passes its base's config through; a
    DDP/FSDP wrapper is looked through (``.module``); a multimodal config gives its text
    model's; a rotary scaling with a factor (YaRN, dynamic, linear: Qwen2.5's 32k x 4)
    extends the window its ``original_max_position_embeddings`` times the factor."""
    inner = getattr(model, "module", model)
    config = getattr(inner, "config", None) or getattr(model, "config", None)
    if config is None:
        return None
    if callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(rope, dict):
        factor, original = rope.get("factor"), rope.get("original_max_position_embeddings", limit)
        if isinstance(factor, (int, float)) and factor > 1 and isinstance(original, int):
            limit = max(limit, int(original * factor))
    return limit


def check_device(device: str | None) -> None:
    """Refuse a device this machine cannot use, in words (``.to("cuda")`` on a CPU-only
    build is an AssertionError from deep inside torch)."""
    if device is None:
        return
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this machine has no usable CUDA GPU (torch {torch.__version__})")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine")
    if d.type == "meta":
        raise ValueError(f"device {device!r} holds no data; use cpu, cuda, cuda:N or mps")
    if d.type not in ("cpu", "cuda", "mps"):  # xpu, hpu, ...: the same check, where torch has one
        backend = getattr(torch, d.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise ValueError(f"device {device!r}: this torch build ({torch.__version__}) cannot use it here")


class ModelNotFoundError(ConfigError):
    """A model or tokenizer name that is neither a local model directory nor served by
    the hub (a ConfigError: ``train.py`` prints it as one line)."""


def _from_pretrained(loader, name_or_path: str, what: str, **kwargs):
    """``loader.from_pretrained`` with a plain error for a name that is no local path:
    transformers reports a mistyped directory as a hub failure ("couldn't connect to
    huggingface.co", "Repo id must be in the form ...")."""
    path = resolve_pretrained(name_or_path)
    local = Path(path).expanduser()
    if local.is_file():
        raise ModelNotFoundError(f"{what} {name_or_path!r} is a file, not a model directory (a training checkpoint "
                                 "becomes one with `cfg-unlearn export`)")
    markers = ("config.json", "tokenizer_config.json", "adapter_config.json")
    if local.is_dir() and not any((local / f).is_file() for f in markers):
        # transformers would blame a missing sentencepiece/tiktoken, or fail on a JSON file
        raise ModelNotFoundError(f"{what} {name_or_path!r}: the directory exists but holds no Hugging Face model "
                                 "(no config.json, tokenizer_config.json or adapter_config.json)")
    try:
        # the expanded path: "~/m" unexpanded reads as a (malformed) hub id
        return loader.from_pretrained(str(local) if local.exists() else path, **kwargs)
    except (ValueError, ImportError) as e:
        # an attention backend that does not exist or is not installed ("sdpaa",
        # flash_attention_2 without flash-attn) fails here, after the config and data
        # setup; it is a setting, named as one
        attn = kwargs.get("attn_implementation")
        if attn is None or not ("attn_implementation" in str(e) or "attention" in str(e).lower()):
            raise
        raise ConfigError(f"attn_implementation {attn!r} cannot load {what} {name_or_path!r}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__} ('sdpa' and 'eager' need "
                          "nothing installed)") from e
    except OSError as e:  # transformers wraps hub and repo-id errors in OSError
        if local.exists():
            raise
        raise ModelNotFoundError(
            f"{what} {name_or_path!r}: no such local directory (relative paths start at {Path.cwd()}), and the "
            f"Hugging Face hub did not serve it (offline, private or no such repo): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from e


#: a directory holding one of these has a tokenizer of its own
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def _adapter_base(name_or_path: str) -> str | None:
    """The base model of a LoRA adapter directory that holds no tokenizer files (peft
    saves adapters alone by default), else None."""
    local = Path(resolve_pretrained(name_or_path)).expanduser()
    if any((local / f).is_file() for f in TOKENIZER_FILES):
        return None
    return _adapter_config_base(local, f"tokenizer {name_or_path!r}: an adapter directory without tokenizer files")


def _adapter_config_base(local: Path, what: str) -> str | None:
    """The ``base_model_name_or_path`` of the adapter directory ``local`` (None: no
    adapter there); a relative one saved beside the adapter resolves from it."""
    config = local / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (ValueError, AttributeError):
        base = None
    if not isinstance(base, str) or not base:
        raise ModelNotFoundError(f"{what}, and {config} names no base_model_name_or_path to take it from")
    beside = local / base  # a relative base saved beside the adapter (an absolute one: base itself)
    return str(beside) if not Path(base).exists() and beside.is_dir() else base


#: weight files of a whole model (an adapter's are adapter_model.*)
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def adapter_base_model(name_or_path: str) -> str | None:
    """The base model of a peft adapter directory (``adapter_config.json`` and no whole
    model's weights; some trainers save the base's ``config.json`` beside the adapter),
    else None (a model, a hub id)."""
    local = Path(resolve_pretrained(name_or_path)).expanduser()
    if any((local / f).is_file() for f in MODEL_WEIGHTS):
        return None
    return _adapter_config_base(local, f"adapter {name_or_path!r}")


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """Load a tokenizer; give it a pad token (EOS) if it has none, as padding needs one
    and the pad positions are masked everywhere anyway. An adapter directory without
    tokenizer files gives its base model's tokenizer."""
    from transformers import AutoTokenizer

    base = _adapter_base(name_or_path)
    if base is not None:
        log.info("%s holds an adapter without a tokenizer: using the tokenizer of its base model %s",
                 name_or_path, base)
        tok = _from_pretrained(AutoTokenizer, base, f"tokenizer of adapter {name_or_path!r}: base model",
                               trust_remote_code=trust_remote_code)
    else:
        tok = _from_pretrained(AutoTokenizer, name_or_path, "tokenizer", trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
        log.info("tokenizer has no pad token; using EOS (%r) for padding", tok.eos_token)
    return tok


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str | None = "float32",
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
):
    """Load a causal LM. ``trust_remote_code`` stays off unless asked: a hub repo's code
    would run with the user's credentials."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": parse_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    base = adapter_base_model(name_or_path)
    if base is None:
        model = _from_pretrained(AutoModelForCausalLM, name_or_path, "model", **kwargs)
    else:
        from peft import PeftModel

        # merged into its base: the adapter is the model's weights (transformers would
        # inject it as adapter "default", which a LoRA block on top re-initialised, and
        # which export could not save); its base is found as the tokenizer's is
        base_model = _from_pretrained(AutoModelForCausalLM, base, f"base model of adapter {name_or_path!r}",
                                      **kwargs)
        with warnings.catch_warnings():  # peft asks transformers for a deprecated property
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            local = Path(resolve_pretrained(name_or_path)).expanduser()
            model = PeftModel.from_pretrained(base_model, str(local)).merge_and_unload()
        model.requires_grad_(True)  # peft froze the base for inference; from_pretrained's models train
    if gradient_checkpointing:
        # non-reentrant: works with frozen inputs (LoRA) and with FSDP. transformers >= 5.2x
        # calls it activation checkpointing; keep the older name working too.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def _same_place(a: str, b: str) -> bool:
    paths = [Path(resolve_pretrained(x)).expanduser() for x in (a, b)]
    if all(p.exists() for p in paths):
        return paths[0].resolve() == paths[1].resolve()
    return a == b


def check_tokenizer_fits(tokenizer, tokenizer_name: str, model, model_name: str, *,
                         trust_remote_code: bool = False) -> None:
    """Refuse a data tokenizer that is not the model's. Ids past the model's embedding
    rows fail deep in the forward (an IndexError); a smaller vocabulary of another
    tokenizer trains, and decodes, on ids that mean other tokens, without a word. When the
    tokenizer comes from another place than the model, its vocabulary must equal the
    model's own tokenizer's (skipped when the model has none beside it)."""
    rows = getattr(model.get_input_embeddings(), "num_embeddings", None)  # None: a wrapper that hides it
    if rows is not None and len(tokenizer) > rows:
        raise ConfigError(f"the data tokenizer {tokenizer_name} has {len(tokenizer)} tokens, more than the {rows} "
                          f"embedding rows of model {model_name}: give the model's own tokenizer (data.tokenizer: "
                          f"{model_name}, or leave it unset)")
    if _same_place(tokenizer_name, model_name):
        return
    try:
        own = load_tokenizer(resolve_pretrained(model_name), trust_remote_code=trust_remote_code)
    except (ConfigError, OSError, ValueError):
        return  # no tokenizer beside the model: nothing to compare with
    own_vocab, vocab = own.get_vocab(), tokenizer.get_vocab()
    if own_vocab != vocab:
        # fewer tokens with the model's ids still split text otherwise than the model learned
        why = ("it would split text into other tokens than the model learned" if all(
            own_vocab.get(token) == i for token, i in vocab.items()) else "the same ids would mean other tokens")
        raise ConfigError(f"the data tokenizer {tokenizer_name} ({len(tokenizer)} tokens) is not the tokenizer of "
                          f"model {model_name} ({len(own)} tokens): {why}. Give the model's own tokenizer "
                          f"(data.tokenizer: {model_name}, or leave it unset)")
