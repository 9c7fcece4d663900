"""Export a trained checkpoint as a plain Hugging Face model, and chat with the export.

``cfg-unlearn export --ckpt C --out DIR`` turns a Lightning checkpoint of
:class:`~cfg_unlearn.module.UnlearnModule` into a directory that anything reading Hugging
Face models loads (``AutoModelForCausalLM.from_pretrained(DIR)``, vLLM, TGI, ...):

* the model, rebuilt exactly as Lightning restores it (``load_from_checkpoint``: the
  module's ``configure_model`` then its state dict), every checkpoint tensor checked to
  have arrived; LoRA adapters are merged into the base weights (:func:`merged_model`),
  so the export needs no ``peft``;
* ``model.safetensors`` (sharded for large models), ``config.json`` and the generation
  config, written by ``save_pretrained``; the tokenizer (with its chat template);
* ``cfg_unlearn.json``: how the model is meant to be decoded, since guidance is not a
  property of the weights: the conditioning instruction, the unconditioned one (None =
  blanked), the guidance scale and space, the source checkpoint and our version.
  Defaults come from the checkpoint's data module (the instructions it was trained
  with), else :data:`~cfg_unlearn.prompts.SAFETY_INSTRUCTION` / blank, g=2, logprob.

``--ckpt`` may also be the *directory* of a sharded checkpoint (``UnlearnFSDPStrategy``'s
default ``state_dict_type: sharded``): its model tensors and Lightning's metadata are
gathered into one temporary checkpoint file next to ``DIR`` (the optimizer states are
not read: they are not part of the export), which is exported like any other and
deleted. It needs the CPU memory of one full copy of the weights.

Everything is written into a temp directory next to ``DIR`` and renamed into place
(:func:`cfg_unlearn.utils.publish_dir`), so a failed export leaves nothing behind and
an existing export is replaced only by a complete one (``--overwrite``).

``cfg-unlearn chat DIR`` is a small REPL over an export (or a demo's ``models/leaky`` or
``models/unlearned``, which carry the same ``cfg_unlearn.json``): it keeps the conversation and
decodes each answer with :func:`cfg_unlearn.guidance.generate` under the exported
instructions and scale. ``/reset`` clears the history, ``/quit`` (or end of input) exits.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

import torch

from cfg_unlearn.guidance import MIN_TEMPERATURE, SPACES, check_guidance, encode_prompts, generate
from cfg_unlearn.prompts import SAFETY_INSTRUCTION, check_template
from cfg_unlearn.tiny import TINY_SCHEME, absolute_model_name
from cfg_unlearn.utils import (NOT_TORCH_SAVE, check_out_dir, checkpoints_in, command_parser, console_logging,
                               exit_with_error, hf_progress_bars_off, is_torch_save_file, staged_dir)

log = logging.getLogger(__name__)

EXPORT_CONFIG = "cfg_unlearn.json"
DEFAULT_GUIDANCE_SCALE = 2.0
DEFAULT_SPACE = "logprob"
MODULE_CLASS = "UnlearnModule"
#: the index file of a torch.distributed checkpoint directory
DCP_METADATA = ".metadata"
#: the file beside the shards where Lightning keeps everything but tensors
LIGHTNING_SHARDED_META = "meta.pt"


# ----------------------------------------------------------------------------- the decoding config


@dataclass
class ExportConfig:
    """The contents of ``cfg_unlearn.json``: how an exported model is meant to be decoded."""

    system_instruction: str | None
    #: None: the unconditioned prompt has no system message at all (not an empty one)
    uncond_instruction: str | None
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    space: str = DEFAULT_SPACE
    source_checkpoint: str | None = None
    cfg_unlearn_version: str | None = None

    def __post_init__(self) -> None:
        check_guidance(self.guidance_scale, self.space)
        for name in ("system_instruction", "uncond_instruction"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string or null, got {type(value).__name__}")

    def describe(self) -> str:
        """One line for the console: guidance, space and the two instructions."""
        uncond = repr(self.uncond_instruction) if self.uncond_instruction else "no system message"
        return (f"guidance {self.guidance_scale:g} ({self.space}); instruction {self.system_instruction!r}, "
                f"unconditioned {uncond}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def read(cls, export_dir: str | os.PathLike) -> ExportConfig:
        """Read and check ``export_dir/cfg_unlearn.json``."""
        export_dir = Path(export_dir)
        if not export_dir.is_dir():
            hint = ""
            if export_dir.is_file() and export_dir.suffix == ".ckpt":  # chat takes a model folder
                hint = (f" but a checkpoint: make a model of it first, `cfg-unlearn export --ckpt {export_dir} "
                        "--out DIR`, then chat with DIR")
            raise FileNotFoundError(f"{export_dir} is not a directory{hint}")
        path = export_dir / EXPORT_CONFIG
        if not path.is_file():
            raise ValueError(f"{export_dir} has no {EXPORT_CONFIG}: not a directory written by `cfg-unlearn export` "
                             "(nor a demo's models/leaky or models/unlearned of this version, written once the demo "
                             "has finished)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object")
        missing = [k for k in ("system_instruction", "uncond_instruction", "guidance_scale", "space") if k not in raw]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(missing)}")
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        if not isinstance(known["guidance_scale"], (int, float)) or isinstance(known["guidance_scale"], bool):
            raise ValueError(f"{path}: guidance_scale must be a number")
        try:
            return cls(**known)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _blank_to_none(text: str | None) -> str | None:
    return text if text else None


# ----------------------------------------------------------------------------- reading the checkpoint


def _error_line(e: BaseException, index: int = 0) -> str:
    """One line of an exception's message, for a one-line error: its ``index``-th
    non-blank line (``-1``: the last; the last there is when it has fewer), else the
    exception's type name."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    return lines[index] if -len(lines) <= index < len(lines) else lines[-1]


def read_checkpoint(path: str | os.PathLike, name: str | os.PathLike | None = None) -> dict[str, Any]:
    """Load a checkpoint file (memory-mapped where possible, so reading it next to
    Lightning's own load costs little memory) and check that it is a Lightning
    checkpoint of an :class:`~cfg_unlearn.module.UnlearnModule`. Errors call it
    ``name`` (default: ``path``), e.g. the sharded checkpoint a temp file was gathered from."""
    path = Path(path)
    shown = path if name is None else name
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {shown} not found")
    if path.is_dir():
        inside = checkpoints_in(path)
        if inside:  # a run's folder or its checkpoints folder
            raise ValueError(f"checkpoint {shown} is a directory, not a checkpoint: give one of its checkpoints: "
                             f"{', '.join(inside)}")
        raise ValueError(
            f"checkpoint {shown} is a directory but not a torch.distributed (FSDP) sharded checkpoint "
            f"(no {DCP_METADATA} file): a DeepSpeed checkpoint must first be consolidated into one file "
            "with DeepSpeed's zero_to_fp32.py"
        )
    if not is_torch_save_file(path):
        raise ValueError(f"checkpoint {shown}: {NOT_TORCH_SAVE}")
    from cfg_unlearn.checkpointing import load_checkpoint_file  # Lightning: on use, not for chat or --help

    try:
        ckpt = load_checkpoint_file(path)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means "not a checkpoint we can read"
        raise ValueError(f"{shown} is not a readable PyTorch Lightning checkpoint ({_error_line(e)})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{shown} is not a PyTorch Lightning checkpoint (no 'state_dict')")
    hp = ckpt.get("hyper_parameters")
    class_path = hp.get("_class_path") if isinstance(hp, dict) else None
    if isinstance(class_path, str) and class_path.rsplit(".", 1)[-1] != MODULE_CLASS:
        raise ValueError(f"{shown} is a checkpoint of {class_path}, not of cfg_unlearn's {MODULE_CLASS}")
    if not isinstance(hp, dict) or not isinstance(hp.get("model"), str):
        raise ValueError(
            f"{shown} is not an {MODULE_CLASS} checkpoint: its hyper_parameters name no 'model' "
            "(save_hyperparameters of UnlearnModule records it)"
        )
    if not any(k.startswith("model.") for k in ckpt["state_dict"]):
        raise ValueError(f"{shown} is not an {MODULE_CLASS} checkpoint: its state_dict holds no 'model.*' weights")
    return ckpt


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a torch.distributed checkpoint directory (what Lightning's
    FSDP strategy writes with ``state_dict_type="sharded"``)."""
    return (Path(path) / DCP_METADATA).is_file()


def consolidate_sharded(ckpt_dir: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Gather a sharded FSDP checkpoint directory into one Lightning checkpoint file:
    the model tensors (the sharded ``model`` entry, renamed ``state_dict`` as in
    ``lightning.pytorch.utilities.consolidate_checkpoint``) plus Lightning's metadata
    file (hyperparameters, loop state). Optimizer states are left out. Runs in this
    process, no process group; the whole model is held in CPU memory once."""
    from torch.distributed.checkpoint import CheckpointException, FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    ckpt_dir, out_file = Path(ckpt_dir), Path(out_file)
    loaded: dict[str, Any] = {}
    try:
        reader = FileSystemReader(ckpt_dir)
        reader.read_metadata()  # first on its own: a damaged index fails here, before the loader's fallbacks log
        _load_state_dict(loaded, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(keys={"model"}),
                         no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - damaged or foreign: say why
        # (CheckpointException is a BaseException; its last line is the underlying error)
        raise ValueError(f"{ckpt_dir} is not a readable sharded checkpoint ({_error_line(e, -1)[:300]})") from None
    if not isinstance(loaded.get("model"), dict) or not loaded["model"]:
        raise ValueError(f"sharded checkpoint {ckpt_dir} holds no 'model' entry (not written by Lightning's FSDP?)")
    meta_file = ckpt_dir / LIGHTNING_SHARDED_META
    if not meta_file.is_file():
        raise ValueError(f"sharded checkpoint {ckpt_dir} has no {LIGHTNING_SHARDED_META} (Lightning's metadata "
                         "file with the hyperparameters): the export cannot tell which model it holds")
    from cfg_unlearn.checkpointing import register_checkpoint_types

    register_checkpoint_types()
    try:
        meta = torch.load(meta_file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - damaged or foreign: say which file and why
        raise ValueError(f"{meta_file} is not a readable Lightning metadata file ({_error_line(e)[:300]})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file} is not a Lightning metadata file (it holds a {type(meta).__name__})")
    ckpt = {**{k: v for k, v in meta.items() if k != "state_dict"}, "state_dict": loaded.pop("model")}
    torch.save(ckpt, out_file)
    return out_file


def _local_dir(name: str) -> Path | None:
    """The directory a model/tokenizer name loads from (``tiny:`` specs included), or
    None for a hub id."""
    resolved = absolute_model_name(name)
    return None if resolved is None else Path(resolved.removeprefix(TINY_SCHEME))


def checkpoint_instructions(ckpt: dict[str, Any]) -> tuple[str | None, str | None]:
    """The (conditioning, unconditioned) instructions the checkpoint was trained with:
    its data module's ``system_prompt`` / ``uncond_system_prompt`` where it saved them,
    else :data:`SAFETY_INSTRUCTION` and None (blanked)."""
    dm = ckpt.get("datamodule_hyper_parameters")
    dm = dm if isinstance(dm, dict) else {}
    system = dm.get("system_prompt", SAFETY_INSTRUCTION)
    uncond = dm.get("uncond_system_prompt")
    system = _blank_to_none(system) if isinstance(system, str) or system is None else SAFETY_INSTRUCTION
    uncond = _blank_to_none(uncond) if isinstance(uncond, str) else None
    return system, uncond


def base_model_name(ckpt: dict[str, Any], base_model: str | None = None) -> str:
    """The model a checkpoint's weights go over: ``base_model`` if given; else its
    ``model`` hyperparameter where that is a hub id or a directory seen from here; else
    the absolute path the checkpoint recorded at training (a relative path given in
    another folder); else the hyperparameter as is (its load then names what is missing)."""
    if base_model is not None:
        return base_model
    given = ckpt["hyper_parameters"]["model"]
    recorded = ckpt.get("model_abspath")
    if absolute_model_name(given) is None and isinstance(recorded, str) and absolute_model_name(recorded):
        log.info("model %r is no directory from here; using %s, where it was at training", given, recorded)
        return recorded
    return given


def load_module(ckpt_path: str | os.PathLike, ckpt: dict[str, Any] | None = None, base_model: str | None = None):
    """The :class:`UnlearnModule` of a checkpoint, rebuilt as Lightning restores it
    (``load_from_checkpoint`` calls ``configure_model`` and loads the state dict), then
    checked: every ``model.*`` tensor of the checkpoint must be in the module, equal.
    (A module that loads non-strictly, e.g. adapters only, cannot silently drop one.)
    ``base_model`` replaces the checkpoint's ``model`` (see :func:`base_model_name`)."""
    from cfg_unlearn.module import UnlearnModule

    ckpt = read_checkpoint(ckpt_path) if ckpt is None else ckpt
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        override = {} if base_model is None else {"model": base_model}
        module = UnlearnModule.load_from_checkpoint(ckpt_path, map_location="cpu", **override)
    for w in caught:
        if module.strict_loading is False and "not in the checkpoint" in str(w.message):
            # adapter-only checkpoints: the base comes from `model`, by design
            n = sum(k.startswith("model.") for k in ckpt["state_dict"])
            log.info("restored %d tensors from %s over the base model %s", n, ckpt_path, module.hparams.model)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    module.configure_model()  # idempotent: a no-op after load_from_checkpoint
    if module.model is None:
        raise RuntimeError(f"{MODULE_CLASS}.configure_model built no model")
    state = module.state_dict()
    for name, saved in ckpt["state_dict"].items():
        if not name.startswith("model.") or not isinstance(saved, torch.Tensor):
            continue
        if name not in state:
            raise ValueError(
                f"checkpoint tensor {name!r} has no place in the rebuilt model (a different architecture?)"
            )
        if not torch.equal(state[name].detach().cpu(), saved.to(state[name].dtype)):
            raise RuntimeError(f"checkpoint tensor {name!r} did not load into the model")
    return module


# ----------------------------------------------------------------------------- writing


def merged_model(model: torch.nn.Module) -> torch.nn.Module:
    """A plain Hugging Face model: a PEFT model's adapters (LoRA) merged into its base
    weights (``merge_and_unload``, in place); any other model returned as is."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return model
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def _widens(model: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` keeps more mantissa bits than some floating weight of ``model``
    (float16 over bfloat16 too: same size, 10 bits against 7)."""
    if not dtype.is_floating_point:
        return False
    eps = torch.finfo(dtype).eps  # the spacing at 1: smaller is more mantissa
    return any(p.is_floating_point() and torch.finfo(p.dtype).eps > eps for p in model.parameters())


def _check_finite(model: torch.nn.Module, cast_to: torch.dtype | None) -> None:
    """Refuse weights that are NaN or inf (a value beyond float16's 65504 casts to inf, a
    diverged training leaves NaN): the export would load, and decode nothing sensible."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            largest = float(t.float().nan_to_num(0, 0, 0).abs().max())
            if cast_to is not None and torch.finfo(cast_to).max < 1e6:
                why = (f"in {str(cast_to).removeprefix('torch.')}, which holds at most {torch.finfo(cast_to).max:g} "
                       f"(largest finite magnitude {largest:.4g}): export in bfloat16 or float32")
            else:
                why = "(the checkpoint's own values: the training diverged)"
            raise ValueError(f"tensor {name!r} holds NaN or inf {why}")


def _checked_fallback_template(tokenizer) -> str:
    """:func:`~cfg_unlearn.prompts.fallback_chat_template`, checked to render a sample
    conversation exactly as training rendered it."""
    from cfg_unlearn.prompts import fallback_chat_template, render_chat

    sample = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Who?"}]
    want = render_chat(tokenizer, sample, "Be safe.", generation_prompt=True)
    template = fallback_chat_template()
    got = tokenizer.apply_chat_template([{"role": "system", "content": "Be safe."}, *sample],
                                        chat_template=template, tokenize=False, add_generation_prompt=True)
    if got != want:  # pragma: no cover - a transformers change in what a template sees
        raise RuntimeError(f"the fallback chat template renders {got!r}, training rendered {want!r}")
    return template


def write_export(
    model: torch.nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    config: ExportConfig,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    protect: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Write ``model`` (adapters merged, cast to ``dtype`` unless None/``auto``), its
    tokenizer and ``cfg_unlearn.json`` to ``out_dir``, atomically. ``protect``: input
    files that ``out_dir`` must neither be nor contain (an ``--overwrite`` would delete
    them).

    ``model`` is changed in place, as PEFT's ``merge_and_unload`` changes it: its adapters
    are merged into the base weights and it is cast to ``dtype`` and set to eval mode (a
    copy would double the memory of an 8B model). Reload it to go on training it."""
    from cfg_unlearn.models import parse_dtype

    out = Path(out_dir)
    check_out_dir(out, overwrite, protect)
    torch_dtype = parse_dtype(dtype)
    if isinstance(torch_dtype, torch.dtype) and _widens(model, torch_dtype):
        # cast first: merged into bf16 weights and cast up after, a LoRA update is rounded
        # to bf16's precision, and a float32 export lost about half of it
        model = model.to(torch_dtype)
    model = merged_model(model)
    if isinstance(torch_dtype, torch.dtype):
        model = model.to(torch_dtype)
    _check_finite(model, torch_dtype if isinstance(torch_dtype, torch.dtype) else None)
    model.eval()
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = True  # training with gradient checkpointing turns it off
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        # transformers' and vLLM's generate stop at the generation config's ids: add the
        # chat template's end of an answer, which training appended (a config that named
        # only <|end_of_text|> ran past the trained <|eot_id|>)
        from cfg_unlearn.guidance import eos_token_ids

        # the config's own ids first, in their order (generate pads with the first)
        ends = [gen.eos_token_id] if isinstance(gen.eos_token_id, int) else list(gen.eos_token_id or [])
        ends += [i for i in eos_token_ids(model, tokenizer) if i not in ends]
        gen.eos_token_id = ends[0] if len(ends) == 1 else ends
    with staged_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        # an export is for decoding: transformers' batched generate needs left padding (a
        # right-padded batch answered "sssss as a" where one prompt alone was sound).
        # save_pretrained writes the attribute only where the init kwargs name it
        saved = tokenizer.padding_side, dict(tokenizer.init_kwargs), getattr(tokenizer, "chat_template", None)
        tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
        if not saved[2]:
            # the plain format training used, written out: outside cfg-unlearn there is no fallback
            tokenizer.chat_template = _checked_fallback_template(tokenizer)
        try:
            tokenizer.save_pretrained(tmp)
        finally:
            tokenizer.padding_side, tokenizer.init_kwargs, tokenizer.chat_template = saved
        (tmp / EXPORT_CONFIG).write_text(config.to_json(), encoding="utf-8")
    return out


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    guidance_scale: float | None = None,
    space: str | None = None,
    system: str | None = None,
    uncond_system: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    base_model: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Path, ExportConfig]:
    """Export a Lightning checkpoint of :class:`UnlearnModule` (a file, or a sharded FSDP
    checkpoint directory, see the module docstring) to ``out_dir``.

    ``system`` / ``uncond_system``: None keeps the checkpoint's (its data module's)
    instructions; an empty string blanks one. ``guidance_scale`` / ``space``: None
    gives 2.0 (1.0 for a checkpoint trained with ``cond_dropout`` 0, which has no
    unconditioned branch to guide against) / ``logprob``. ``base_model``: the model the checkpoint was trained from,
    where its recorded path no longer resolves (see :func:`base_model_name`).
    ``trust_remote_code``: a checkpoint trained with ``model.trust_remote_code`` is
    refused unless this is set (rebuilding it runs its model folder's code, and a
    checkpoint cannot turn that on by itself). Returns the directory and the written
    decoding config.
    """
    ckpt_path, out = Path(ckpt_path), Path(out_dir)
    g = None if guidance_scale is None else float(guidance_scale)  # None: decided by the checkpoint
    space = DEFAULT_SPACE if space is None else space
    check_guidance(DEFAULT_GUIDANCE_SCALE if g is None else g, space)
    from cfg_unlearn.models import parse_dtype

    parse_dtype(dtype)  # these checks come before the (slow) load
    check_out_dir(out, overwrite, (ckpt_path,))
    if is_sharded_checkpoint(ckpt_path):
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.consolidate-", dir=out.parent,
                                         ignore_cleanup_errors=True) as tmp:
            log.info("gathering the sharded checkpoint %s into one file", ckpt_path)
            single = consolidate_sharded(ckpt_path, Path(tmp) / "consolidated.ckpt")
            return _export_file(single, out, ckpt_path, g, space, system, uncond_system, dtype, overwrite,
                                base_model, trust_remote_code)
    return _export_file(ckpt_path, out, ckpt_path, g, space, system, uncond_system, dtype, overwrite, base_model,
                        trust_remote_code)


def _export_file(ckpt_path: Path, out: Path, source: Path, g: float | None, space: str, system: str | None,
                 uncond_system: str | None, dtype: str | None, overwrite: bool,
                 base_model: str | None = None, trust_remote_code: bool = False) -> tuple[Path, ExportConfig]:
    """:func:`export_checkpoint` of one checkpoint file; ``source`` is what the user gave."""
    from cfg_unlearn import __version__
    from cfg_unlearn.checkpointing import remote_code_refusal
    from cfg_unlearn.models import adapter_base_model, load_tokenizer

    ckpt = read_checkpoint(ckpt_path, name=source)
    if ckpt["hyper_parameters"].get("trust_remote_code") and not trust_remote_code:
        raise ValueError(f"{source} " + remote_code_refusal(ckpt["hyper_parameters"]["model"], "pass --trust-remote-code"))
    trained_system, trained_uncond = checkpoint_instructions(ckpt)
    if g is None:
        # a model trained without conditioning dropout never learned the unconditioned
        # branch that guidance pushes away from (a user review: its export recorded g=2)
        g = DEFAULT_GUIDANCE_SCALE if ckpt["hyper_parameters"].get("cond_dropout", 0) > 0 else 1.0
        if g == 1.0:
            log.warning("%s was trained with model.cond_dropout 0 (no unconditioned branch): the export records "
                        "guidance scale 1 (off); pass --guidance-scale to record another", source)
    config = ExportConfig(
        system_instruction=trained_system if system is None else _blank_to_none(system),
        uncond_instruction=trained_uncond if uncond_system is None else _blank_to_none(uncond_system),
        guidance_scale=g,
        space=space,
        source_checkpoint=str(source.resolve()),
        cfg_unlearn_version=__version__,
    )
    hp = ckpt["hyper_parameters"]
    base = base_model_name(ckpt, base_model)
    try:
        module = load_module(ckpt_path, ckpt, None if base == hp["model"] else base)
    except RuntimeError as e:  # torch's load_state_dict: line 2 names the first mismatch
        raise ValueError(f"the weights of {source} do not fit the model {base} ({_error_line(e, 1)[:300]}); "
                         "is it the model the checkpoint was trained from?") from None
    dm = ckpt.get("datamodule_hyper_parameters")
    tok_name = dm.get("tokenizer") if isinstance(dm, dict) and isinstance(dm.get("tokenizer"), str) else hp["model"]
    tok_name = base if tok_name == hp["model"] else tok_name  # the CLI links data.tokenizer to model.model
    del ckpt  # the mmapped checkpoint is no longer needed
    tokenizer = load_tokenizer(tok_name, trust_remote_code=bool(hp.get("trust_remote_code", False)))
    model = module.model
    module.model = None  # the export owns the model now (the merge changes it in place)
    # the base model's and tokenizer's directories are inputs too: an adapter-only
    # checkpoint is merged onto that base at every export, so it must survive this one
    local = [_local_dir(n) for n in (base, tok_name)]
    adapter_base = adapter_base_model(base)  # an adapter model: its base is merged at every export too
    if adapter_base is not None:
        local.append(_local_dir(adapter_base))
    write_export(model, tokenizer, out, config, dtype=dtype, overwrite=overwrite,
                 protect=(source, *[d for d in local if d is not None]))
    return out, config


# ----------------------------------------------------------------------------- chat


def chat_settings(model_dir: str | os.PathLike, system: str | None = None,
                  uncond_system: str | None = None) -> ExportConfig:
    """How ``cfg-unlearn chat`` decodes ``model_dir``: its ``cfg_unlearn.json``, with the
    instructions given here in place of its own (``''``: none). A folder without one (a
    ``subtract`` output, any causal LM's folder) needs ``system`` and decodes at g=1 (no
    guidance: nothing says the model learnt an unconditioned branch) unless the caller
    overrides the scale."""
    model_dir = Path(model_dir)
    if system is not None and model_dir.is_dir() and not (model_dir / EXPORT_CONFIG).is_file():
        config = ExportConfig(system_instruction=None, uncond_instruction=None, guidance_scale=1.0)
    else:
        try:
            config = ExportConfig.read(model_dir)
        except ValueError as e:
            if (model_dir / EXPORT_CONFIG).is_file():  # a file that is wrong: its own error
                raise
            raise ValueError(f"{e}; to chat it anyway, give the instruction to condition on with --system "
                             "('' = none)") from None
    given = {k: _blank_to_none(v) for k, v in (("system_instruction", system), ("uncond_instruction", uncond_system))
             if v is not None}
    return replace(config, **given)


def load_export(export_dir: str | os.PathLike, *, dtype: str | None = "auto", device: str = "cpu",
                config: ExportConfig | None = None):
    """``(model, tokenizer, ExportConfig)`` of an export directory, the model in eval mode
    (``config``: decode under this one rather than the directory's)."""
    from cfg_unlearn.models import load_causal_lm, load_tokenizer

    config = ExportConfig.read(export_dir) if config is None else config
    tokenizer = load_tokenizer(str(export_dir))
    model = load_causal_lm(str(export_dir), dtype=dtype).to(device).eval()
    return model, tokenizer, config


HELP = "/reset clears the conversation, /quit (or end of input) exits"
COMMANDS_QUIT = ("/quit", "/exit")


def _fit_context(model, tokenizer, messages: list[dict[str, str]], *, system, uncond_system, guided: bool,
                 max_new_tokens: int) -> tuple[list[dict[str, str]] | None, int]:
    """Drop the oldest exchanges until the prompt plus ``max_new_tokens`` fits the
    model's positions. Returns (messages, exchanges dropped); messages is None when the
    latest message alone does not fit."""
    from cfg_unlearn.models import context_limit

    limit = context_limit(model)
    if limit is None:
        return messages, 0
    dropped = 0
    while True:
        lengths = [len(encode_prompts(tokenizer, [messages], system=system)[0])]
        if guided:
            lengths.append(len(encode_prompts(tokenizer, [messages], blank_system=True,
                                              replacement_system=uncond_system)[0]))
        if max(lengths) + max_new_tokens <= limit:
            return messages, dropped
        if len(messages) <= 1:
            return None, dropped
        messages = messages[2:]  # one (user, assistant) exchange
        dropped += 1


class PromptTooLong(ValueError):
    """A ``chat --prompt`` that the model's context cannot hold."""


def chat_loop(
    model: torch.nn.Module,
    tokenizer,
    config: ExportConfig,
    *,
    input_stream: IO[str],
    output_stream: IO[str],
    guidance_scale: float | None = None,
    space: str | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    banner: bool = True,
    prompts: Sequence[str] | None = None,
) -> list[dict[str, str]]:
    """Read user lines from ``input_stream`` and write answers to ``output_stream``
    until ``/quit``/``/exit`` or end of input. Each answer is decoded by
    :func:`~cfg_unlearn.guidance.generate` on the whole conversation so far, under the
    export's instructions and ``guidance_scale``/``space`` (None: the export's).
    ``/reset`` clears the conversation; the oldest exchanges are dropped when the
    conversation outgrows the model's context. Returns the final conversation.

    ``prompts`` (``chat --prompt``): the user turns of one conversation, in place of the
    stream, each sent as it is but for surrounding whitespace (newlines inside and a
    leading ``/`` included), and only the answers written, one after each, for scripts to
    read; one the context cannot hold raises :class:`PromptTooLong`."""
    g = config.guidance_scale if guidance_scale is None else float(guidance_scale)
    space = config.space if space is None else space
    check_guidance(g, space)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

    def write(text: str) -> None:
        output_stream.write(text)
        output_stream.flush()

    one_shot = prompts is not None
    if banner and not one_shot:
        write(f"cfg-unlearn chat: {replace(config, guidance_scale=g, space=space).describe()}\n{HELP}\n")
    # piped input (`chat DIR < questions.txt`) gets no prompt before each read, where the
    # "you> " prompts ran into the answers' line ("you> you> model> ..."); each line is
    # echoed after its prompt instead, so the output reads as the conversation
    interactive = not one_shot and _isatty(input_stream)
    pending = iter(prompts or ())
    history: list[dict[str, str]] = []
    turn = 0
    while True:
        if one_shot:
            text = next(pending, None)
            if text is None:
                break
            text = text.strip()
        else:
            if interactive:
                write("you> ")
            line = input_stream.readline()
            if not line:  # end of input
                write("\n" if interactive else "")
                break
            text = line.strip()
            if not text:
                continue
            if not interactive:
                write(f"you> {text}\n")
            if text in COMMANDS_QUIT:
                break
            if text == "/reset":
                history = []
                write("(conversation cleared)\n")
                continue
            if text == "/help":
                write(HELP + "\n")
                continue
        messages, dropped = _fit_context(
            model, tokenizer, history + [{"role": "user", "content": text}], system=config.system_instruction,
            uncond_system=config.uncond_instruction, guided=g != 1, max_new_tokens=max_new_tokens,
        )
        if messages is None:
            if one_shot:  # a script's prompt unanswered must not pass for an empty answer
                raise PromptTooLong(f"--prompt {turn + 1} is too long for the model's context "
                                    f"(with --max-new-tokens {max_new_tokens})")
            write("(that message is too long for the model's context; not sent)\n")
            continue
        if dropped:  # with --prompt on stderr, so that stdout holds the answers only
            note = f"(dropped the {dropped} oldest exchange{'s' if dropped > 1 else ''} to fit the context)\n"
            if one_shot:
                sys.stderr.write(note)
            else:
                write(note)
        answer = generate(
            model, tokenizer, [messages], system=config.system_instruction, uncond_system=config.uncond_instruction,
            guidance_scale=g, space=space, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_p=top_p, seed=(seed + turn) if do_sample else None,
        )[0]
        write(f"{answer}\n" if one_shot else f"model> {answer}\n")
        history = messages + [{"role": "assistant", "content": answer}]
        turn += 1
    return history


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or a closed stream
        return False


# ----------------------------------------------------------------------------- command lines


def build_export_parser() -> argparse.ArgumentParser:
    p = command_parser(
        prog="cfg-unlearn export",
        description="Write a Lightning checkpoint of UnlearnModule as a Hugging Face model directory "
        "(LoRA adapters merged, safetensors, tokenizer) plus cfg_unlearn.json: the instructions, guidance "
        "scale and space to decode it with (read by `cfg-unlearn chat`). Written atomically.",
    )
    # --ckpt_path as train.py names it, so a path copied from a fit's command line works
    p.add_argument("--ckpt", "--ckpt-path", "--ckpt_path", required=True,
                   help="Lightning checkpoint of UnlearnModule: a .ckpt file, or a sharded FSDP checkpoint directory")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help=f"guidance scale recorded for decoding (default: {DEFAULT_GUIDANCE_SCALE:g}, or 1 for a "
                   "model trained with model.cond_dropout 0)")
    p.add_argument("--space", choices=SPACES, default=None, help=f"guidance space (default: {DEFAULT_SPACE})")
    p.add_argument("--system", default=None,
                   help="conditioning instruction (default: the checkpoint's data.system_prompt, else "
                   f"{SAFETY_INSTRUCTION!r}; '' = none)")
    p.add_argument("--uncond-system", default=None,
                   help="instruction of the unconditioned branch (default: the checkpoint's "
                   "data.uncond_system_prompt, else blank; '' = blank)")
    p.add_argument("--dtype", default=None,
                   help="cast the weights: float32, bfloat16, float16 (default / 'auto': as trained)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a model folder (a previous output); a folder of other files is refused")
    p.add_argument("--base-model", default=None,
                   help="the model the checkpoint was trained from, where its recorded path no longer resolves "
                   "(moved, or another machine); default: the checkpoint's model.model")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a checkpoint trained with model.trust_remote_code to run its model's own modelling "
                   "code (refused without this flag)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (transformers' loading and writing bars)")
    return p


def main_export(argv: list[str] | None = None) -> None:
    """``cfg-unlearn export ...``: bad inputs exit with status 2 and a one-line message."""
    p = build_export_parser()
    a = p.parse_args(argv)
    # imported before the root logger gets a handler, Lightning prints its lines through its
    # own, once; imported after (with the checkpoint), each line came twice, once as "INFO: ..."
    importlib.import_module("lightning.pytorch")
    console_logging(logging.INFO)
    try:
        with hf_progress_bars_off(a.quiet):
            out, config = export_checkpoint(
                a.ckpt, a.out, guidance_scale=a.guidance_scale, space=a.space, system=a.system,
                uncond_system=a.uncond_system, dtype=a.dtype, overwrite=a.overwrite, base_model=a.base_model,
                trust_remote_code=a.trust_remote_code,
            )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        from cfg_unlearn.models import ModelNotFoundError

        hint = ("; pass --base-model with the model it was trained from"
                if isinstance(e, ModelNotFoundError) and a.base_model is None else "")
        exit_with_error(p, f"{e}{hint}")
    print(f"wrote {out} ({config.describe()})")


def build_chat_parser() -> argparse.ArgumentParser:
    p = command_parser(
        prog="cfg-unlearn chat",
        description="Chat with a model written by `cfg-unlearn export` (or a demo's models/leaky or "
        "models/unlearned), decoded with classifier-free guidance under its cfg_unlearn.json. "
        f"{HELP}.",
    )
    p.add_argument("dir", help="directory written by cfg-unlearn export, or a demo's models/unlearned")
    p.add_argument("--guidance-scale", type=float, default=None, help="override the exported guidance scale")
    p.add_argument("--space", choices=SPACES, default=None, help="override the exported guidance space")
    p.add_argument("--system", default=None,
                   help="the instruction to condition on, in place of the exported one ('' = none); with it, a "
                   "folder without cfg_unlearn.json (a `cfg-unlearn subtract` output, any causal LM's folder) "
                   "chats too, at guidance 1 unless --guidance-scale says otherwise")
    p.add_argument("--uncond-system", default=None,
                   help="the unconditioned branch's instruction, in place of the exported one ('' = blank)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer at most (default %(default)s)")
    p.add_argument("--sample", action="store_true",
                   help="sample instead of greedy decoding (implied by --temperature or --top-p)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 0.8; 0: greedy decoding)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (turn n uses seed + n)")
    p.add_argument("--dtype", default="auto", help="weights dtype to load (default: as saved)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs (default here: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (transformers' loading bar)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="answer TEXT and exit, printing only the answer (for scripts); repeat it for the turns "
                   "of one conversation. Standard input is not read")
    return p


def main_chat(argv: list[str] | None = None, stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> None:
    """``cfg-unlearn chat DIR ...``; ``stdin``/``stdout`` default to the process's."""
    from cfg_unlearn.models import check_device, context_limit

    p = build_chat_parser()
    a = p.parse_args(argv)
    # --temperature 0 is greedy decoding, as in most chat tools (it was refused)
    do_sample = (a.sample or a.temperature is not None or a.top_p is not None) and a.temperature != 0
    temperature = 0.8 if a.temperature is None else a.temperature
    top_p = 0.95 if a.top_p is None else a.top_p
    # (nan, inf and 1e-40 were tracebacks from the decoding)
    if do_sample and not (math.isfinite(temperature) and temperature >= MIN_TEMPERATURE):
        p.error(f"--temperature must be a finite number >= {MIN_TEMPERATURE:g}, or 0 for greedy decoding, "
                f"got {temperature}")
    if not 0 < top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {top_p}")
    if a.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    for i, prompt in enumerate(a.prompt or (), 1):
        if not prompt.strip():
            p.error(f"--prompt {i} is empty")
    try:
        if a.guidance_scale is not None:
            check_guidance(a.guidance_scale, a.space or DEFAULT_SPACE)
        check_device(a.device)
        config = chat_settings(a.dir, a.system, a.uncond_system)
        with hf_progress_bars_off(a.quiet):
            model, tokenizer, config = load_export(a.dir, dtype=a.dtype, device=a.device, config=config)
        for instruction in (config.system_instruction, config.uncond_instruction):
            check_template(tokenizer, instruction)
        limit = context_limit(model)
        if limit is not None and a.max_new_tokens >= limit:
            raise ValueError(f"--max-new-tokens {a.max_new_tokens} leaves no room for a message in the model's "
                             f"context of {limit} positions; use fewer")
    except (ValueError, FileNotFoundError) as e:
        exit_with_error(p, str(e))
    try:
        chat_loop(
            model, tokenizer, config, input_stream=stdin or sys.stdin, output_stream=stdout or sys.stdout,
            guidance_scale=a.guidance_scale, space=a.space, max_new_tokens=a.max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_p=top_p, seed=a.seed, prompts=a.prompt,
        )
    except PromptTooLong as e:
        exit_with_error(p, str(e))
    except KeyboardInterrupt:
        if a.prompt:  # a script's run cut short: no newline that reads as an empty answer
            sys.exit(130)
        (stdout or sys.stdout).write("\n")

