"""Model subtraction with task vectors (method.md, section 1, item 5):

    theta = theta_base - alpha * (theta_finetuned - theta_base)

``finetuned`` is the model that memorised the PII (base fine-tuned on it), so
``finetuned - base`` is the "leak" direction and subtracting it pushes the base away
from it. The paper found ``alpha = 0.5`` usable and ``alpha = 1`` model-breaking, and the
whole step weak: it is an option, not part of the default recipe.

Both inputs are Hugging Face model directories with safetensors weights (one
``model.safetensors``, or shards listed in ``model.safetensors.index.json``). Memory is
bounded by a few copies of the largest single tensor, whatever the model size:

* headers are read first (:func:`read_layout`) and every name, shape and dtype is checked
  (:func:`check_compatible`) before any tensor is loaded, so a mismatch fails in
  seconds, not after an hour of writing;
* output shards mirror the base's (same file names, same tensors in each) and are
  *streamed*: the safetensors header is computed from the base's header, then each
  tensor is loaded from both models, combined (:func:`subtract_tensor`), written and
  dropped (:func:`write_safetensors_streaming`);
* everything is written into a temp directory next to the output, which is renamed
  into place only when complete (:func:`publish_dir`): an interrupted run leaves no
  half-written model.

Command line: ``cfg-unlearn subtract --base B --finetuned F --alpha 0.5 --out O``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cfg_unlearn.tiny import resolve_pretrained
from cfg_unlearn.utils import check_out_dir, command_parser, console_logging, exit_with_error, staged_dir

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.5
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: Bytes per element of each safetensors dtype tag. Needed to lay out a shard's header
#: before its tensors are computed (the header, with every offset, comes first).
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}

#: Files in a model directory that hold weights (in any format). They are never copied
#: to the output: a base ``pytorch_model.bin`` next to our new safetensors would be the
#: *base's* weights under the output's name.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
WEIGHT_INDEX_SUFFIX = ".index.json"  # model.safetensors.index.json, pytorch_model.bin.index.json, ...

#: How many names to list when the two models' tensor names differ.
MAX_LISTED = 5


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it (no data loaded)."""

    name: str
    file: str  # file name inside the model directory
    dtype: str  # safetensors tag: "F32", "BF16", "I64", ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of the data, from the header alone (to lay out an output header)."""
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"tensor {self.name!r} in {self.file}: unsupported safetensors dtype {self.dtype}")
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass
class WeightLayout:
    """Where every tensor of a model directory lives: its shard files (in index order),
    the tensors of each, and the index JSON when the model is sharded."""

    model_dir: Path
    files: list[str]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, dict[str, str]]  # per file: the safetensors ``__metadata__``
    index: dict | None = None

    def names_in(self, file: str) -> list[str]:
        """Names stored in ``file`` (in header order, as safetensors lists them)."""
        return [t.name for t in self.tensors.values() if t.file == file]


@dataclass
class SubtractSummary:
    """What a run did, for the log line and for tests."""

    tensors: int = 0
    parameters: int = 0
    float_tensors: int = 0
    copied_tensors: int = 0  # non-float (int/bool buffers), equal in both models, copied as is
    shards: int = 0
    seconds: float = 0.0
    task_vector_norm: float = 0.0  # ||finetuned - base|| over float tensors (0: the two models are equal)
    base_norm: float = 0.0

    def line(self) -> str:
        rel = self.task_vector_norm / self.base_norm if self.base_norm else float("nan")
        return (
            f"subtracted {self.float_tensors} float tensors and copied {self.copied_tensors} others "
            f"({self.tensors} tensors, {self.parameters:,} parameters, {self.shards} shard(s)) "
            f"in {self.seconds:.1f}s; ||finetuned - base|| = {self.task_vector_norm:.4g} "
            f"({rel:.3g} of ||base||)"
        )


# ----------------------------------------------------------------------------- reading


def check_alpha(alpha: float) -> float:
    """Reject NaN and infinities up front: they would silently turn every weight into
    NaN/inf, and nothing would fail until the model is used."""
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha}")
    return alpha


def weight_files(model_dir: str | os.PathLike) -> tuple[list[str], dict | None]:
    """The safetensors files of a model directory (``[model.safetensors]``, or the shards
    the index names, in order of first appearance) and the index JSON (``None`` when
    not sharded). Raises :class:`FileNotFoundError` naming what is missing."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is not a directory")
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no weight_map")
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index_path} lists safetensors files that do not exist: {', '.join(missing)}")
        return files, index
    if (model_dir / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    hint = ""
    if any(model_dir.glob("*.bin")):
        hint = " (it has .bin weights: load and save_pretrained it once to convert them to safetensors)"
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}{hint}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def read_layout(model_dir: str | os.PathLike) -> WeightLayout:
    """Read every safetensors header of a model directory (no tensor data), and check
    that the index, when there is one, agrees with the shards' contents: a broken index
    would otherwise produce an output that silently drops or duplicates tensors."""
    from safetensors import SafetensorError, safe_open

    model_dir = Path(model_dir)
    files, index = weight_files(model_dir)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, dict[str, str]] = {}
    for file in files:
        try:
            handle = safe_open(str(model_dir / file), framework="pt")
        except (SafetensorError, OSError) as e:  # truncated, corrupt, or not safetensors at all
            raise ValueError(f"{model_dir / file}: not a readable safetensors file ({e})") from None
        with handle as f:
            metadata[file] = dict(f.metadata() or {})
            for name in f.keys():
                if name in tensors:
                    raise ValueError(
                        f"tensor {name!r} is stored twice in {model_dir}: in {tensors[name].file} and {file}"
                    )
                s = f.get_slice(name)
                tensors[name] = TensorInfo(name, file, s.get_dtype(), tuple(s.get_shape()))
    if index is not None:
        wrong = [n for n, file in index["weight_map"].items() if n not in tensors or tensors[n].file != file]
        wrong += [n for n in tensors if n not in index["weight_map"]]
        if wrong:
            raise ValueError(
                f"{model_dir / INDEX_FILE} disagrees with its shards for {len(wrong)} tensor(s), e.g. "
                f"{', '.join(map(repr, wrong[:MAX_LISTED]))}"
            )
    return WeightLayout(model_dir, files, tensors, metadata, index)


def check_compatible(base: WeightLayout, finetuned: WeightLayout) -> None:
    """Same tensor names, and per tensor the same shape and dtype, from the headers
    alone. Errors name the tensor and both files, so the user can see which checkpoint
    is not what they thought (a different architecture, a LoRA adapter, a dtype cast)."""
    only_base = sorted(set(base.tensors) - set(finetuned.tensors))
    only_ft = sorted(set(finetuned.tensors) - set(base.tensors))
    if only_base or only_ft:
        parts = []
        for names, where in ((only_base, base.model_dir), (only_ft, finetuned.model_dir)):
            if names:
                shown = ", ".join(map(repr, names[:MAX_LISTED])) + (", ..." if len(names) > MAX_LISTED else "")
                parts.append(f"{len(names)} only in {where}: {shown}")
        raise ValueError("the two models have different tensor names: " + "; ".join(parts))
    for name, b in base.tensors.items():
        f = finetuned.tensors[name]
        where = f"{base.model_dir / b.file} and {finetuned.model_dir / f.file}"
        if b.shape != f.shape:
            raise ValueError(f"tensor {name!r}: shape {list(b.shape)} vs {list(f.shape)} in {where}")
        if b.dtype != f.dtype:
            raise ValueError(f"tensor {name!r}: dtype {b.dtype} vs {f.dtype} in {where}")


#: config.json fields that decide how the weights are used: two models that differ in
#: one hold tensors of the same names and shapes that mean different things (heads of
#: another size, another rotary base), so their difference is no task vector
ARCHITECTURE_FIELDS = (
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rope_theta", "rope_scaling",
    "rope_parameters", "partial_rotary_factor", "hidden_act", "rms_norm_eps", "layer_norm_eps",
    "layer_norm_epsilon", "tie_word_embeddings", "sliding_window", "attention_bias", "mlp_bias", "n_embd", "n_layer",
    "n_head", "n_positions", "n_inner", "activation_function",
)


def _effective_config(model_dir: Path) -> dict | None:
    """``model_dir``'s config as transformers reads it (defaults filled in, the rotary
    fields of older files moved into ``rope_parameters``: a fine-tune saved by another
    transformers version writes them otherwise), else its raw JSON; None without one."""
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_dir).to_dict()
    except Exception:  # noqa: BLE001 - a model type this transformers lacks: compare the file as written
        raw = _read_json(path)
        return raw if isinstance(raw, dict) else None


def check_same_architecture(base_dir: Path, finetuned_dir: Path) -> None:
    """Refuse two models whose configs differ in an :data:`ARCHITECTURE_FIELDS` field (at
    the top level or in a ``text_config``), naming the field and both values; the tensor
    headers alone passed a model with 8 heads of 16 as a fine-tune of one with 4 of 32.
    The configs are compared as transformers reads them; a field one of them lacks is
    not compared. Bare weight folders (no config.json) are checked by tensor only."""
    configs = [_effective_config(d) for d in (base_dir, finetuned_dir)]
    if any(c is None for c in configs):
        return
    for scope in (None, "text_config"):
        parts = [c if scope is None else c.get(scope) for c in configs]
        if not all(isinstance(x, dict) for x in parts):
            continue
        for name in ARCHITECTURE_FIELDS:
            if name not in parts[0] or name not in parts[1]:
                continue
            a, b = parts[0][name], parts[1][name]
            if a != b:
                field = name if scope is None else f"{scope}.{name}"
                raise ValueError(f"config field {field!r}: {a!r} in {base_dir / 'config.json'} vs {b!r} in "
                                 f"{finetuned_dir / 'config.json'}: the two models are not one architecture, so "
                                 "their difference is no task vector")


def check_not_quantized(model_dir: Path) -> None:
    """Quantized weights are codes relative to per-block scales stored elsewhere, so
    subtracting them elementwise is meaningless: refuse rather than write nonsense."""
    config = model_dir / "config.json"
    if config.is_file():
        cfg = _read_json(config)
        if isinstance(cfg, dict) and cfg.get("quantization_config"):
            raise ValueError(f"{config} describes a quantized model; subtract the unquantized checkpoints instead")


# ----------------------------------------------------------------------------- arithmetic


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float (bf16, fp16, fp8, fp32) is combined in
    float32, so low-precision weights lose nothing until the single final cast."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def subtract_tensor(base: torch.Tensor, finetuned: torch.Tensor, alpha: float, name: str = "?") -> torch.Tensor:
    """``base - alpha * (finetuned - base)`` in :func:`compute_dtype`, cast back to the
    base's dtype. For float32 this is exactly torch's elementwise fp32 result (the same
    two ops, no fused kernel). Non-float tensors (int/bool buffers such as position ids)
    have no task vector: they must be equal and are returned as is."""
    if base.shape != finetuned.shape or base.dtype != finetuned.dtype:
        raise ValueError(
            f"tensor {name!r}: {base.dtype}{list(base.shape)} vs {finetuned.dtype}{list(finetuned.shape)}"
        )
    if not base.is_floating_point():
        if not torch.equal(base, finetuned):
            raise ValueError(f"tensor {name!r} ({base.dtype}) is not a float tensor and differs between the models")
        return base
    ct = compute_dtype(base.dtype)
    b, f = base.to(ct), finetuned.to(ct)
    out = (b - alpha * (f - b)).to(base.dtype)
    # a large alpha overflows the dtype (fp16 and bf16 sooner): an inf/NaN model that loads
    # and decodes garbage. Refused when the inputs were finite there (not their own inf/NaN)
    bad = ~torch.isfinite(out) & torch.isfinite(base) & torch.isfinite(finetuned)
    if bad.any():
        raise ValueError(f"tensor {name!r}: alpha={alpha:g} overflows {base.dtype} in {int(bad.sum())} of "
                         f"{out.numel()} values (inf); use a smaller alpha")
    return out


# ----------------------------------------------------------------------------- writing


def _padded_header(entries: list[TensorInfo], metadata: dict[str, str]) -> tuple[bytes, list[TensorInfo]]:
    """The safetensors header for ``entries`` and the order their data must follow.
    Largest element size first and the header padded to 8 bytes (as safetensors does),
    so every tensor starts aligned and mmap-loading never copies."""
    order = sorted(entries, key=lambda t: (-DTYPE_SIZES.get(t.dtype, 1), t.name))
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in order:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return raw, order


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor without a copy (when contiguous);
    works for bf16 and fp8, which numpy has no dtype for, via a uint8 view."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def write_safetensors_streaming(
    path: str | os.PathLike,
    entries: list[TensorInfo],
    produce: Callable[[TensorInfo], torch.Tensor],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[TensorInfo, torch.Tensor], None] | None = None,
) -> int:
    """Write a safetensors file one tensor at a time: the header is laid out from
    ``entries`` (names, dtypes, shapes), then ``produce(entry)`` is called for each and
    its bytes written and dropped. ``safetensors.torch.save_file`` would need the whole
    shard in memory. Returns the data size in bytes; the file is fsynced."""
    header, order = _padded_header(entries, dict(metadata or {}))
    total = 0
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)))
        fh.write(header)
        for entry in order:
            t = produce(entry)
            if tuple(t.shape) != entry.shape or t.element_size() * t.numel() != entry.nbytes:
                raise ValueError(
                    f"tensor {entry.name!r}: produced {t.dtype}{list(t.shape)}, "
                    f"header says {entry.dtype}{list(entry.shape)}"
                )
            fh.write(tensor_bytes(t))
            total += entry.nbytes
            if on_tensor is not None:
                on_tensor(entry, t)
            del t
        fh.flush()
        os.fsync(fh.fileno())
    return total


def is_weight_file(name: str) -> bool:
    """Weights in any format, and their indexes: these must not be copied from the base."""
    return name.endswith(WEIGHT_SUFFIXES) or (name.endswith(WEIGHT_INDEX_SUFFIX) and (
        ".safetensors" in name or ".bin" in name))


def copy_non_weight_files(src: Path, dst: Path) -> tuple[list[str], list[str]]:
    """Copy the base's config, generation config, tokenizer files, README, ... (every
    top-level regular file that is not a weight file) into ``dst``. Subdirectories are
    skipped (e.g. Llama's ``original/`` holds a second copy of the base weights), and so
    is an export's decoding (``cfg_unlearn.json``): it describes the base, and `chat` would
    take the subtracted model for an export guided as the base was meant to be.
    Returns (copied, skipped) names."""
    from cfg_unlearn.export import EXPORT_CONFIG

    copied, skipped = [], []
    for p in sorted(src.iterdir()):
        if p.name == EXPORT_CONFIG:
            skipped.append(p.name)
        elif p.is_file() and not is_weight_file(p.name):
            shutil.copy2(p, dst / p.name)  # follows symlinks (HF cache snapshots)
            copied.append(p.name)
        elif not is_weight_file(p.name):
            skipped.append(p.name)
    return copied, skipped


# ----------------------------------------------------------------------------- the whole run



def _write_shard(
    base: WeightLayout,
    ft: WeightLayout,
    file: str,
    ft_handles: dict,
    path: Path,
    alpha: float,
    summary: SubtractSummary,
    advance: Callable[[], object],
) -> int:
    """Stream one output shard: the base shard's tensors, each combined with the same
    tensor from whichever fine-tuned shard holds it (the two models may be sharded
    differently). ``summary``'s norms accumulate *squared* here. Returns the bytes."""
    from safetensors import safe_open

    with safe_open(str(base.model_dir / file), framework="pt") as bf:

        def produce(entry: TensorInfo) -> torch.Tensor:
            ft_file = ft.tensors[entry.name].file
            b, f = bf.get_tensor(entry.name), ft_handles[ft_file].get_tensor(entry.name)
            try:
                out = subtract_tensor(b, f, alpha, name=entry.name)
            except ValueError as e:
                raise ValueError(f"{e} (in {base.model_dir / file} and {ft.model_dir / ft_file})") from None
            if b.is_floating_point():
                ct = compute_dtype(b.dtype)
                summary.task_vector_norm += float(torch.linalg.vector_norm(f.to(ct) - b.to(ct))) ** 2
                summary.base_norm += float(torch.linalg.vector_norm(b.to(ct))) ** 2
            return out

        def count(entry: TensorInfo, t: torch.Tensor) -> None:
            summary.parameters += t.numel()
            if t.is_floating_point():
                summary.float_tensors += 1
            else:
                summary.copied_tensors += 1
            advance()

        metadata = {"format": "pt", **base.metadata[file]}
        entries = [base.tensors[n] for n in base.names_in(file)]
        return write_safetensors_streaming(path, entries, produce, metadata, count)


def subtract_models(
    base_dir: str | os.PathLike,
    finetuned_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    alpha: float = DEFAULT_ALPHA,
    overwrite: bool = False,
    progress: bool = True,
) -> SubtractSummary:
    """Write ``base - alpha * (finetuned - base)`` as a Hugging Face model directory at
    ``out_dir`` (weights sharded like the base, the base's config and tokenizer files
    copied). All checks run on headers before any tensor is read; the output appears
    only when complete."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    start = time.perf_counter()
    alpha = check_alpha(alpha)
    # tiny:<dir>, as everywhere a model is named (other names: the local directory itself)
    base_dir, finetuned_dir = (Path(resolve_pretrained(str(d))) for d in (base_dir, finetuned_dir))
    out = Path(out_dir)
    base, ft = read_layout(base_dir), read_layout(finetuned_dir)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {base_dir}: the output would not load as a model")
    check_not_quantized(base_dir)
    check_not_quantized(finetuned_dir)
    check_same_architecture(base_dir, finetuned_dir)
    check_compatible(base, ft)
    for t in base.tensors.values():
        _ = t.nbytes  # unsupported dtypes fail here, before any writing
    check_out_dir(out, overwrite, (base_dir, finetuned_dir))

    summary = SubtractSummary(tensors=len(base.tensors), shards=len(base.files))
    with staged_dir(out, overwrite) as tmp:
        copied, skipped = copy_non_weight_files(base_dir, tmp)
        if skipped:
            log.warning("not copied from %s (folders, and an export's decoding, which describes the base): %s",
                        base_dir, ", ".join(skipped))
        bar = tqdm(total=len(base.tensors), desc="subtract", unit="tensor", disable=not progress)
        with ExitStack() as stack, bar:
            ft_handles = {file: stack.enter_context(safe_open(str(finetuned_dir / file), framework="pt"))
                          for file in ft.files}
            total_size = sum(_write_shard(base, ft, file, ft_handles, tmp / file, alpha, summary, bar.update)
                             for file in base.files)
        if base.index is not None:
            index = dict(base.index)
            index["metadata"] = {**(index.get("metadata") or {}), "total_size": total_size}
            index["weight_map"] = {n: base.tensors[n].file for n in sorted(base.tensors)}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    summary.task_vector_norm, summary.base_norm = math.sqrt(summary.task_vector_norm), math.sqrt(summary.base_norm)
    summary.seconds = time.perf_counter() - start
    if summary.float_tensors and summary.task_vector_norm == 0.0:
        log.warning("the fine-tuned model equals the base: the output is a copy of the base")
    log.info("%s; copied %s", summary.line(), ", ".join(copied) or "no other files")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        prog="cfg-unlearn subtract",
        description="Model subtraction with task vectors: write theta = base - alpha * (finetuned - base), "
        "tensor by tensor, as a Hugging Face model directory (safetensors sharded like --base; the base's "
        "config and tokenizer files copied). alpha=0.5 was usable in the paper, alpha=1 broke the model.",
    )
    p.add_argument("--base", required=True, help="model directory of the base (before fine-tuning on the PII)")
    p.add_argument("--finetuned", required=True, help="model directory of the fine-tuned (leaky) model")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="how far to step away (default: %(default)s)")
    p.add_argument("--out", required=True, help="output model directory (written atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is a model folder (a previous output); a folder of other files is refused")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    """``cfg-unlearn subtract ...``: usage errors and bad inputs exit with status 2 and a
    one-line message, not a traceback."""
    p = build_parser()
    a = p.parse_args(argv)
    console_logging(logging.INFO)
    try:
        summary = subtract_models(a.base, a.finetuned, a.out, alpha=a.alpha, overwrite=a.overwrite,
                                  progress=not a.quiet)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        exit_with_error(p, str(e))
    print(f"wrote {a.out} ({summary.tensors} tensors, {summary.parameters:,} parameters, {summary.seconds:.1f}s)")


if __name__ == "__main__":  # pragma: no cover - SIGTERM cleans up, as under cfg-unlearn
    from cfg_unlearn.utils import sigterm_raises

    with sigterm_raises():
        main(sys.argv[1:])
