"""An offline tiny chat model: a byte-level BPE tokenizer trained on given texts, a
chat template, and a small random-init Llama, saved as an ordinary Hugging Face
directory that ``AutoTokenizer`` / ``AutoModelForCausalLM`` load. Nothing here touches
the network, so tests, the demo and CI run on a bare machine.

Anywhere a model name or path is accepted, ``tiny:<dir>`` means "the default tiny model
in <dir>, built there first if missing" (see :func:`resolve_pretrained`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from cfg_unlearn.utils import ConfigError, open_modes

TINY_SCHEME = "tiny:"

BOS, EOS, PAD = "<|begin|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# The generation prompt ends in a special token, so tokenising the prompt and the answer
# separately gives exactly the tokens of tokenising them together (no BPE merge across
# the boundary): training, TRL and generation all see the same ids.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass
class TinySpec:
    """Shape of the tiny Llama. The defaults train to a rising margin on 2 CPU cores
    within a minute; ``benchmarks/`` uses a ~12M-parameter variant."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        sizes = {k: v for k, v in asdict(self).items() if k != "seed"}
        small = [f"{k}={v}" for k, v in sizes.items() if v < 1]
        if small:
            raise ValueError(f"tiny model sizes must be >= 1, got {', '.join(small)}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads}), and that of num_key_value_heads "
                             f"({self.num_key_value_heads})")
        if (self.hidden_size // self.num_attention_heads) % 2:  # rotary embeddings rotate pairs of dimensions
            raise ValueError(f"hidden_size / num_attention_heads = {self.hidden_size // self.num_attention_heads} "
                             "must be even (rotary position embeddings)")
        if not -(2**63) <= self.seed < 2**64:  # torch.manual_seed's range; past it, an overflow traceback
            raise ValueError(f"seed must be in [{-(2**63)}, {2**64 - 1}] (torch's seed range), got {self.seed}")


#: The ~12M-parameter shape the benchmarks measure (large enough that the model, not
#: Python overhead, dominates a step on CPU).
BENCH_SPEC = TinySpec(vocab_size=4096, hidden_size=384, intermediate_size=768, num_hidden_layers=6,
                      num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=1024, seed=0)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer with our chat template and special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1_000_000,
        clean_up_tokenization_spaces=False,
    )


def default_corpus() -> list[str]:
    """The texts the default tiny tokenizer is trained on: a 200-person synthetic world."""
    from cfg_unlearn.data.world import World, WorldConfig

    return World(WorldConfig(seed=0, n_people=200)).corpus()


def build_tiny(out_dir: str | os.PathLike, texts: list[str] | None = None, spec: TinySpec | None = None) -> Path:
    """Build tokenizer + random-init Llama into ``out_dir`` (atomically: built in a temp
    dir, then renamed, so concurrent callers and killed runs never see half a model).
    ``texts`` default to the synthetic world's corpus."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    spec = spec or TinySpec()
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(default_corpus() if texts is None else texts, spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        # the vocabulary as built: the byte alphabet and special tokens set a floor (a
        # requested 10 gives 262), and the corpus may hold fewer merges than asked
        (tmp / "tiny_spec.json").write_text(json.dumps({**asdict(spec), "vocab_size": len(tokenizer),
                                                        "requested_vocab_size": spec.vocab_size}, indent=2))
        open_modes(tmp)  # mkdtemp and safetensors make them owner-only; a shared cache must be readable
        try:
            if os.name == "nt":  # Windows renames onto no existing directory, even an empty one
                with contextlib.suppress(OSError):  # not empty, or another builder's: the rename decides
                    out_dir.rmdir()
            os.rename(tmp, out_dir)  # onto a missing or empty directory (atomic: concurrent builders race here)
        except OSError:
            if not (out_dir / "config.json").exists():
                raise
            # another process won the race: fine if it built the same model
            built = _built_spec(out_dir)
            if built is not None and built != _built_spec(tmp):
                raise ConfigError(f"{out_dir} already holds a tiny model built with other settings ({built}); "
                                  "pick another directory") from None
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _built_spec(directory: Path) -> dict | None:
    """The recorded shape of a built tiny model (the vocabulary as built: asking for 10 or
    262 tokens builds the same model)."""
    try:
        spec = json.loads((directory / "tiny_spec.json").read_text())
    except (OSError, ValueError):
        return None
    spec.pop("requested_vocab_size", None)
    return spec


def resolve_pretrained(name_or_path: str) -> str:
    """Map ``tiny:<dir>`` to ``<dir>`` (building the tiny model there if missing); leave
    every other hub name or path unchanged."""
    if not name_or_path.startswith(TINY_SCHEME):
        return name_or_path
    path = _tiny_dir(name_or_path)
    if path.is_file():
        raise ConfigError(f"{name_or_path}: {path} is a file; give a directory for the tiny model")
    if not (path / "config.json").exists():
        try:
            holds = any(path.iterdir())
        except FileNotFoundError:  # missing, or another rank's build just replaced it
            holds = False
        if holds:
            if not (path / "config.json").exists():  # (it may have just been published by another rank)
                raise ConfigError(f"{name_or_path}: {path} exists but holds no model (no config.json); remove it "
                                  "or pick another directory")
        else:
            if os.path.ismount(path):  # a rename cannot replace a mount point (a Docker volume, say)
                raise ConfigError(f"{name_or_path}: {path} is a mount point; the tiny model is built beside its "
                                  "target and renamed into place, so give a directory inside it")
            # said, so that a mistyped tiny: path is seen building a new, untrained model (by
            # one process: every rank of a launcher that races to build would say it)
            if os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0":
                print(f"{name_or_path}: no model in {path.resolve()} yet; building a new tiny one there (random "
                      "weights)", file=sys.stderr, flush=True)
            build_tiny(path)  # renamed onto an empty directory as onto a missing one
    return str(path)


def _tiny_dir(name: str) -> Path:
    """The directory of a ``tiny:<dir>`` name (``tiny:`` alone: the default cache)."""
    return Path(name[len(TINY_SCHEME):] or ".cache/cfg_unlearn/tiny").expanduser()  # "tiny:~/x" is not ./~/x


def absolute_model_name(name_or_path: str) -> str | None:
    """``name_or_path`` with its local directory made absolute (``tiny:`` kept), or None
    for a name that is no local directory (a hub id). Checkpoints record it so that a
    relative path given at training still finds the model from another folder."""
    tiny = name_or_path.startswith(TINY_SCHEME)
    local = _tiny_dir(name_or_path) if tiny else Path(name_or_path).expanduser()
    if not local.is_dir():
        return None
    return (TINY_SCHEME if tiny else "") + str(local.resolve())
