"""FSDP for YAML configs: :class:`UnlearnFSDPStrategy` and the wrap-policy functions it uses.

``trainer.strategy`` in a config::

    strategy:
      class_path: cfg_unlearn.strategies.UnlearnFSDPStrategy
      init_args:
        wrap_layer_classes: [LlamaDecoderLayer]   # or null: the model's _no_split_modules
        activation_checkpointing: true
        state_dict_type: sharded

Lightning's own ``FSDPStrategy`` wants layer *classes* (``auto_wrap_policy={LlamaDecoderLayer}``),
which a YAML file cannot name before the model exists, and :class:`~cfg_unlearn.module.UnlearnModule`
builds its model only in ``configure_model``. This strategy takes class **names** and
resolves them in :meth:`UnlearnFSDPStrategy.setup`, which Lightning calls after
``configure_model`` and before wrapping, by walking the built model's modules.

How the model is cut into FSDP units (see :func:`build_auto_wrap_policy`):

* **Full fine-tuning** (every parameter trainable): one unit per decoder layer
  (``ModuleWrapPolicy``), the usual transformer recipe; embeddings, final norm and head
  stay in the root unit.
* **LoRA / any frozen base** (some parameters frozen, some trainable): one unit per decoder
  layer **plus** one unit per leaf module that owns trainable parameters (peft's
  ``lora_A.default`` / ``lora_B.default`` linears). This is the policy of peft's
  ``peft.utils.other.fsdp_auto_wrap_policy`` (transformer layers OR leaf modules with a
  trainable weight), and what the PyTorch FSDP docs recommend ("frozen parameters should be
  isolated into their own modules and wrapped separately"). Every FlatParameter is then
  uniformly frozen or uniformly trainable, so:

  - the frozen base weights sit in FlatParameters with ``requires_grad=False``: FSDP
    allocates no gradient for them and reduce-scatters nothing for them. Wrapping whole
    decoder layers only also runs with ``use_orig_params=True``, but every unit then
    holds frozen and trainable weights, and FSDP allocates (and communicates) gradients
    for the whole FlatParameter: the memory of not freezing (FSDP warns about it);
  - the adapters can keep a different dtype from the base (peft makes them float32 over
    a bfloat16 base), which FSDP needs per FlatParameter.

  ``use_orig_params=True`` is kept (Lightning's default): the module's
  ``configure_optimizers`` builds the optimizer over ``self.parameters()`` that require
  grad, which only works when FSDP exposes the original parameters. peft's own recipe
  (accelerate's FSDP config) pairs its policy with ``use_orig_params=False``, where the
  optimizer is built on the flattened parameters; with the uniform units above, the two
  give the same memory. The cost is more, smaller collectives: two KB-sized units per
  adapted linear (``2 * 7 * 32 = 448`` for Llama-3.1-8B with all-linear adapters).

Activation checkpointing (``activation_checkpointing: true``) wraps the same decoder layer
classes in ``checkpoint_wrapper`` (non-reentrant) after FSDP wrapping, as Lightning's
``activation_checkpointing_policy`` does. If the Hugging Face model's own gradient
checkpointing is also on (``model.gradient_checkpointing: true``), it is switched off with
a warning: both would recompute each layer twice.

Mixed precision comes from ``trainer.precision`` (Lightning's FSDP precision plugin:
``bf16-mixed`` = bfloat16 compute, parameters and gradient reduction over float32 sharded
master weights; buffers such as the rotary frequencies stay float32, see
:class:`NormClippingFSDPPrecision`). Beyond Lightning's ``FSDPStrategy`` this one also

* clips gradients by norm (``trainer.gradient_clip_val``) with FSDP's collective
  ``clip_grad_norm_`` on the root, where Lightning's FSDP plugin raises;
* works around a PyTorch FSDP1 gap that breaks checkpoint saving of a LoRA model under
  ``NO_SHARD``, which FSDP picks by itself on one GPU (:func:`restore_unsharded_param_views`);
* writes sharded checkpoints atomically (a temp folder renamed into place);
* runs on the CPU (gloo), for tests and debugging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from cfg_unlearn.utils import ConfigError, publish_dir

__all__ = [
    "NormClippingFSDPPrecision",
    "UnlearnFSDPStrategy",
    "WrapUnit",
    "build_auto_wrap_policy",
    "decoder_like_class_names",
    "has_frozen_and_trainable",
    "is_trainable_leaf",
    "lora_aware_policy",
    "no_split_module_names",
    "resolve_layer_classes",
    "restore_unsharded_param_views",
    "wrap_plan",
]


# ---------------------------------------------------------------------- class names


def full_params_outside_forward(strategy: Any):
    """Under FSDP (FSDP1, as Lightning's FSDPStrategy wraps it) the parameters that live
    outside the wrapped decoder layers (embeddings, final norm, lm_head) are only whole
    inside the root wrapper's forward; decoding or scoring outside a training step calls
    the inner model directly, so gather those root parameters for the duration
    (``recurse=False``: the wrapped layers still gather their own, one at a time). Other
    strategies: nothing to do."""
    root = getattr(strategy, "model", None)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # torch built without distributed
        return contextlib.nullcontext()
    if isinstance(root, FSDP):
        return FSDP.summon_full_params(root, recurse=False, writeback=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def forward_outside_step(strategy: Any) -> Iterator[None]:
    """Run the LightningModule's model outside Lightning's own steps (guided decoding in
    the evaluation callback, the reference log-probs at fit start) as a step would: the
    root FSDP parameters gathered and the precision plugin's autocast on, so that a
    ``bf16-mixed`` run scores in the precision it trains in."""
    with full_params_outside_forward(strategy), strategy.precision_plugin.forward_context():
        yield


def no_split_module_names(model: nn.Module) -> list[str]:
    """The block classes Hugging Face models declare in ``_no_split_modules`` (the unit
    ``device_map`` never splits, which is the decoder layer), collected over every
    submodule, so a peft wrapper or a LightningModule holding the model works as well."""
    names: dict[str, None] = {}
    for module in model.modules():
        declared = getattr(module, "_no_split_modules", None)
        if declared:
            names.update(dict.fromkeys(sorted(declared) if isinstance(declared, (set, frozenset)) else declared))
    return list(names)


def decoder_like_class_names(model: nn.Module) -> list[str]:
    """Class names that look like transformer blocks: the classes of modules held in an
    ``nn.ModuleList`` (``model.layers[i]``), plus the declared ``_no_split_modules``
    present in the model. Used in error messages."""
    found: dict[str, None] = {}
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            found.update(dict.fromkeys(type(child).__name__ for child in module))
    present = {type(m).__name__ for m in model.modules()}
    found.update(dict.fromkeys(n for n in no_split_module_names(model) if n in present))
    return sorted(found)


def resolve_layer_classes(model: nn.Module, names: Iterable[str] | None = None) -> set[type[nn.Module]]:
    """Module classes of ``model`` whose ``__name__`` is one of ``names``.

    ``names=None``: the model's ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``); names
    declared there but absent from the model (multimodal models list blocks of towers
    they may not have) are skipped, as long as one is found. Explicit names must all be
    found. Errors name what is missing and list the decoder-like classes that exist.
    """
    by_name: dict[str, set[type[nn.Module]]] = {}
    for module in model.modules():
        by_name.setdefault(type(module).__name__, set()).add(type(module))
    candidates = decoder_like_class_names(model)
    if names is None:
        declared = no_split_module_names(model)
        if not declared:
            raise ValueError(
                f"{type(model).__name__} declares no _no_split_modules to wrap by default: set "
                f"strategy.init_args.wrap_layer_classes explicitly; decoder-like classes found: {candidates}"
            )
        wanted = [n for n in declared if n in by_name]
        if not wanted:
            raise ValueError(
                f"none of the model's _no_split_modules {declared} is a module of {type(model).__name__}: set "
                f"strategy.init_args.wrap_layer_classes explicitly; decoder-like classes found: {candidates}"
            )
    else:
        wanted = list(dict.fromkeys(names))
        if not wanted:
            raise ValueError(f"wrap_layer_classes is empty; decoder-like classes found: {candidates}")
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise ValueError(
                f"wrap_layer_classes: no module of class {', '.join(missing)} in {type(model).__name__}; "
                f"decoder-like classes found: {candidates}"
            )
    return set().union(*(by_name[n] for n in wanted))


# ---------------------------------------------------------------------- policies


def is_trainable_leaf(module: nn.Module) -> bool:
    """A module without children that owns a parameter requiring grad: peft's
    ``lora_A.default`` / ``lora_B.default`` linears, a ``modules_to_save`` copy, DoRA's
    magnitude vector."""
    if next(module.children(), None) is not None:
        return False
    return any(p.requires_grad for p in module.parameters(recurse=False))


def has_frozen_and_trainable(model: nn.Module) -> bool:
    """Some parameters require grad and some do not (LoRA, a frozen base)."""
    flags = {p.requires_grad for p in model.parameters()}
    return flags == {True, False}


class _LoraAwarePredicate:
    """Picklable ``module -> bool`` for :class:`~torch.distributed.fsdp.wrap.CustomPolicy`."""

    def __init__(self, layer_classes: Iterable[type[nn.Module]]):
        self.layer_classes = tuple(sorted(set(layer_classes), key=lambda c: (c.__module__, c.__qualname__)))

    def __call__(self, module: nn.Module) -> bool:
        return isinstance(module, self.layer_classes) or is_trainable_leaf(module)

    def __repr__(self) -> str:
        return f"layers {[c.__name__ for c in self.layer_classes]} or leaf modules with trainable parameters"


def lora_aware_policy(layer_classes: Iterable[type[nn.Module]]):
    """FSDP policy for a frozen base with trainable adapters: a unit per decoder layer
    (``layer_classes``) and a unit per leaf module that owns trainable parameters, so that
    no unit mixes frozen and trainable parameters (see the module docstring)."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    classes = set(layer_classes)
    if not classes:
        raise ValueError("lora_aware_policy needs at least one layer class")
    return CustomPolicy(_LoraAwarePredicate(classes))


def build_auto_wrap_policy(model: nn.Module, names: Iterable[str] | None = None, lora: bool | None = None):
    """The auto-wrap policy for ``model``: decoder layers by class name (``names``, default
    the model's ``_no_split_modules``); with ``lora`` (default: detected, some parameters
    frozen and some trainable) also every leaf that owns trainable parameters."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    classes = resolve_layer_classes(model, names)
    if lora is None:
        lora = has_frozen_and_trainable(model)
    return lora_aware_policy(classes) if lora else ModuleWrapPolicy(classes)


@dataclass(frozen=True)
class WrapUnit:
    """One FSDP unit a policy would create: its module path (``""`` = the root), class
    and the numbers of trainable and frozen parameter elements it would manage."""

    name: str
    cls: str
    trainable: int
    frozen: int

    @property
    def mixed(self) -> bool:
        return self.trainable > 0 and self.frozen > 0


def _policy_targets(model: nn.Module, policy) -> set[nn.Module]:
    from torch.distributed.fsdp.wrap import CustomPolicy, ModuleWrapPolicy

    if isinstance(policy, ModuleWrapPolicy):
        classes = tuple(policy._module_classes)
        return {m for m in model.modules() if isinstance(m, classes)}
    if isinstance(policy, CustomPolicy):
        return {m for m in model.modules() if policy._lambda_fn(m)}
    if isinstance(policy, (set, frozenset)):
        return {m for m in model.modules() if isinstance(m, tuple(policy))}
    raise TypeError(f"wrap_plan understands ModuleWrapPolicy, CustomPolicy or a set of classes, not {policy!r}")


def wrap_plan(model: nn.Module, policy) -> list[WrapUnit]:
    """The FSDP units ``policy`` would create on ``model`` (the root included), each with
    the parameters it would manage: those of its subtree not managed by a nested unit.
    A pure function of the module tree: no process group, no wrapping. Lets tests and
    the strategy's log check that no unit mixes frozen and trainable parameters."""
    targets = _policy_targets(model, policy)
    unit_names = [name for name, m in model.named_modules() if m in targets and name]
    owner_of = sorted(unit_names, key=len, reverse=True)  # the innermost unit owns a parameter
    counts: dict[str, list[int]] = {"": [0, 0], **{n: [0, 0] for n in unit_names}}
    for pname, p in model.named_parameters():
        owner = next((u for u in owner_of if pname.startswith(u + ".")), "")
        counts[owner][0 if p.requires_grad else 1] += p.numel()
    modules = dict(model.named_modules())
    return [WrapUnit(n, type(modules[n]).__name__, t, f) for n, (t, f) in counts.items()]


# ---------------------------------------------------------------------- strategy


class _PendingPolicy:
    """Stands in for the policy until :meth:`UnlearnFSDPStrategy.setup` resolves it."""

    def __call__(self, module: nn.Module) -> bool:
        raise RuntimeError("UnlearnFSDPStrategy resolves its wrap policy in setup(); it was used before")


def _hf_checkpointing_models(model: nn.Module) -> list[nn.Module]:
    """Hugging Face models inside ``model`` with their own gradient checkpointing on."""
    out = []
    for module in model.modules():
        on = getattr(module, "is_activation_checkpointing", None)
        if on is None:
            on = getattr(module, "is_gradient_checkpointing", None)
        if on is True and hasattr(module, "supports_gradient_checkpointing"):
            out.append(module)
    return out


def restore_unsharded_param_views(model: nn.Module) -> int:
    """Work around a PyTorch FSDP1 gap; call it after every backward.

    With ``NO_SHARD`` (which FSDP also picks by itself on a world size of 1) and
    ``use_orig_params=True``, the pre-backward of a unit whose parameters are all frozen
    swaps its original parameters for plain-tensor views, and nothing swaps them back
    (the sharded strategies do, when they reshard; frozen units get no post-backward
    hook). The next forward then adopts the tensors as the unit's "parameters" for good,
    and every later ``state_dict()`` misses them: FSDP fails with "FSDP assumes ... is in
    the state_dict" when a checkpoint is saved. Re-registering the original parameters
    as views into the unsharded flat parameter (what FSDP itself does after ``.to()``)
    is exact: with ``NO_SHARD`` that flat parameter is the only copy. Returns the number
    of units fixed; sharded strategies are left alone."""
    try:
        from torch.distributed.fsdp._traversal_utils import _get_fsdp_handles
    except ImportError:  # a torch without FSDP1's internals: nothing we know how to fix
        return 0
    fixed = 0
    for handle in _get_fsdp_handles(model):
        flat = handle.flat_param
        if not getattr(handle, "_use_orig_params", False) or handle.uses_sharded_strategy or flat._params is None:
            continue
        if any(getattr(mod, name, None) is not orig for orig, (name, mod, _) in zip(flat._params, flat._param_infos)):
            if all(isinstance(orig, nn.Parameter) for orig in flat._params):
                handle._use_unsharded_views(as_params=True)
                fixed += 1
    return fixed


def _disable_hf_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


class NormClippingFSDPPrecision(FSDPPrecision):
    """Lightning's FSDP precision plugin, plus ``gradient_clip_algorithm: norm``
    (``trainer.gradient_clip_val``), which Lightning refuses under FSDP because the plugin
    has no handle on the root module: clipping is FSDP's collective
    ``FullyShardedDataParallel.clip_grad_norm_`` on the root (the total norm over every
    rank's shards), which :class:`UnlearnFSDPStrategy` hands it after wrapping."""

    fsdp_root: nn.Module | None = None
    #: where the model runs, set by the strategy: Lightning's plugin autocasts on cuda
    #: only, and on the CPU (the FSDP configs' debugging path) the bf16 weights met
    #: float32 activations, in Lightning's own steps (a LoRA's float32 adapters) and
    #: outside them ("expected m1 and m2 to have the same dtype")
    device_type: str = "cuda"

    @property
    def mixed_precision_config(self):
        # Lightning casts buffers to the low precision too, and FSDP does it at the first
        # forward: Llama's and Qwen's rotary inv_freq in bf16 is off by up to 0.33%, which
        # turns positions by up to 1.8 rad at position 1000. The FSDP run then trained and
        # scored other positions than the exported model (inv_freq is not saved), which
        # runs them in float32 as DDP and one device do. Buffers stay as the model keeps them.
        config = super().mixed_precision_config
        # (under bf16-true and 16-true Lightning casts the whole module first, buffers included,
        # as DDP and one device do: nothing diverges there)
        return dataclasses.replace(config, buffer_dtype=None) if self.precision != "32-true" else config

    def forward_context(self) -> contextlib.AbstractContextManager:
        if "mixed" in self.precision and self.device_type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16)
        return super().forward_context()

    def clip_grad_by_norm(self, optimizer, clip_val) -> None:
        if self.fsdp_root is None:
            raise RuntimeError("gradient clipping by norm before the FSDP model was set up")
        self.fsdp_root.clip_grad_norm_(clip_val)


def _holds_shards(path: Path) -> bool:
    """A sharded checkpoint folder, whole (``meta.pt``) or one a kill left half written by
    an in-place save (``.metadata``, ``*.distcp``): a save may replace it."""
    return (path / "meta.pt").is_file() or (path / ".metadata").is_file() or any(path.glob("*.distcp"))


class UnlearnFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP (FSDP1, ``torch.distributed.fsdp.FullyShardedDataParallel``) with
    YAML-friendly arguments and a LoRA-aware wrap policy resolved from the built model.

    Args:
        wrap_layer_classes: class names of the transformer blocks, each its own FSDP unit
            (e.g. ``[LlamaDecoderLayer]``, ``[Qwen2DecoderLayer]``). None: the model's
            ``_no_split_modules``. Resolved against the model in ``setup``; an unknown name
            is an error that lists the decoder-like classes found.
        activation_checkpointing: recompute the activations of those blocks in backward
            (non-reentrant ``checkpoint_wrapper``). Replaces the model's own gradient
            checkpointing, which is switched off if it was on.
        state_dict_type: ``full`` (gathered on rank 0 into one file, loadable anywhere) or
            ``sharded`` (a checkpoint folder, one file per rank: no gather onto rank 0;
            ``--ckpt_path`` resumes from the folder and ``cfg-unlearn export --ckpt``
            exports it as it is).
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3), ``SHARD_GRAD_OP`` (ZeRO-2),
            ``NO_SHARD`` (DDP-like) or ``HYBRID_SHARD`` (shard within a node, replicate
            across nodes).
        cpu_offload: keep the sharded parameters (and gradients) in CPU memory.
        lora_aware: wrap every leaf module with trainable parameters in its own unit, so
            frozen weights get no gradient memory. None: on when the model has frozen and
            trainable parameters (a peft LoRA model), off for full fine-tuning.
        use_orig_params: expose the original parameters (needed by the module's
            ``configure_optimizers``, which selects the trainable ones). Keep it on.
        limit_all_gathers: FSDP's rate limiter on all-gathers ahead of compute.
        forward_prefetch: prefetch the next unit's all-gather in forward.
    """

    def __init__(
        self,
        wrap_layer_classes: list[str] | None = None,
        activation_checkpointing: bool = False,
        state_dict_type: Literal["full", "sharded"] = "full",
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD",
        cpu_offload: bool = False,
        lora_aware: bool | None = None,
        use_orig_params: bool = True,
        limit_all_gathers: bool = True,
        forward_prefetch: bool = False,
    ):
        if wrap_layer_classes is not None:
            wrap_layer_classes = list(wrap_layer_classes)
            if not wrap_layer_classes or not all(isinstance(n, str) and n for n in wrap_layer_classes):
                raise ValueError(
                    f"wrap_layer_classes must be a non-empty list of class names, got {wrap_layer_classes!r}"
                )
        if state_dict_type not in ("full", "sharded"):
            raise ValueError(f"state_dict_type must be 'full' or 'sharded', got {state_dict_type!r}")
        from torch.distributed.fsdp.wrap import CustomPolicy

        super().__init__(
            cpu_offload=cpu_offload,
            # resolved in setup(); a placeholder now, because Lightning checks at construction
            # that HYBRID_SHARD has a policy
            auto_wrap_policy=CustomPolicy(_PendingPolicy()),
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            use_orig_params=use_orig_params,
            limit_all_gathers=limit_all_gathers,
            forward_prefetch=forward_prefetch,
        )
        self.wrap_layer_classes = wrap_layer_classes
        self.activation_checkpointing = activation_checkpointing
        self.lora_aware = lora_aware
        self.resolved_layer_classes: set[type[nn.Module]] | None = None
        self.plan: list[WrapUnit] | None = None

    def configure_wrapping(self, model: nn.Module) -> None:
        """Resolve the layer classes and the wrap policy on the built ``model`` (the
        LightningModule, after ``configure_model``) and set up activation checkpointing.
        Called by :meth:`setup`; public so it can be checked without a process group."""
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            # already wrapped (validate/test after fit in the same process): Lightning drops
            # the policy; keep what was resolved the first time
            return
        if next(model.parameters(), None) is None:
            raise ValueError(
                "UnlearnFSDPStrategy found a model without parameters at setup: the module must build its "
                "model in configure_model()"
            )
        settings = getattr(model, "lora", None)
        if self._state_dict_type == "sharded" and getattr(settings, "adapter_only_checkpoints", False):
            # a sharded checkpoint is loaded key for key by the model's full state dict, so
            # one with the adapters alone saves but cannot be resumed or validated
            raise ConfigError("lora.adapter_only_checkpoints needs state_dict_type: full under FSDP "
                              "(a sharded checkpoint of the adapters alone cannot be loaded back)")
        classes = resolve_layer_classes(model, self.wrap_layer_classes)
        lora = has_frozen_and_trainable(model) if self.lora_aware is None else self.lora_aware
        policy = lora_aware_policy(classes) if lora else ModuleWrapPolicy(classes)
        self.kwargs["auto_wrap_policy"] = policy
        self.resolved_layer_classes = classes
        self.plan = wrap_plan(model, policy)
        names = sorted(c.__name__ for c in classes)
        mixed = [u.name or "<root>" for u in self.plan if u.mixed]
        rank_zero_info(
            f"FSDP: {len(self.plan)} units ({'LoRA-aware: ' if lora else ''}{names}"
            f"{' + leaves with trainable parameters' if lora else ''}), sharding {self.sharding_strategy.name}, "
            f"state dict {self._state_dict_type}, "
            f"activation checkpointing {'on' if self.activation_checkpointing else 'off'}"
        )
        if mixed and self.kwargs.get("use_orig_params"):
            rank_zero_warn(
                f"FSDP units {mixed[:5]}{' ...' if len(mixed) > 5 else ''} hold frozen and trainable parameters: "
                "gradient memory is allocated for their frozen weights too (set lora_aware: true or null)"
            )
        if self.activation_checkpointing:
            hf = _hf_checkpointing_models(model)
            if hf:
                rank_zero_warn(
                    "UnlearnFSDPStrategy(activation_checkpointing=true) replaces the model's own gradient "
                    "checkpointing, which is switched off (set model.gradient_checkpointing: false to silence this)"
                )
                for m in hf:
                    _disable_hf_checkpointing(m)
            self._activation_checkpointing_kwargs = {"auto_wrap_policy": ModuleWrapPolicy(classes)}
        else:
            self._activation_checkpointing_kwargs = {}

    @property
    def precision_plugin(self) -> FSDPPrecision:
        return FSDPStrategy.precision_plugin.fget(self)

    @precision_plugin.setter
    def precision_plugin(self, plugin) -> None:
        if plugin is not None and type(plugin) is FSDPPrecision:  # the trainer's, from `precision:`
            plugin = NormClippingFSDPPrecision(plugin.precision, scaler=plugin.scaler)
        FSDPStrategy.precision_plugin.fset(self, plugin)

    def setup(self, trainer) -> None:
        assert self.model is not None
        self.configure_wrapping(self.model)
        super().setup(trainer)
        if isinstance(self._precision_plugin, NormClippingFSDPPrecision):
            self._precision_plugin.fsdp_root = self.model
            self._precision_plugin.device_type = self.root_device.type

    def _full_state_dict_on_cpu(self) -> contextlib.AbstractContextManager | None:
        """The full-state-dict context of a CPU run: Lightning's offloads to the CPU
        (``offload_to_cpu=True``), which on parameters that already live there crashed
        the process with a segmentation fault in FSDP's state-dict hook on 2 gloo ranks
        (training done, no checkpoint written). None on an accelerator: Lightning's."""
        if self._state_dict_type != "full" or self.root_device.type != "cpu":
            return None
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                    FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
                                    FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True))

    def lightning_module_state_dict(self) -> dict[str, Any]:
        context = self._full_state_dict_on_cpu()
        if context is None:
            return super().lightning_module_state_dict()
        with context:
            return self.model.state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        context = self._full_state_dict_on_cpu()
        if context is None:
            return super().optimizer_state(optimizer)
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with context:  # as Lightning's, in its standard (parameter id) keys on rank 0
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Sharded checkpoints are written whole or not at all: Lightning writes the shards
        into the target folder in place and ``meta.pt`` (the loop state) after them, so a
        kill in between left one step's shards beside the step before's loop state, which
        resumed silently. Here every rank writes into a temp folder beside the target and
        rank 0 renames it into place once all are done (:func:`~cfg_unlearn.utils.publish_dir`). Full
        state dicts go through the checkpoint IO as before (atomic already)."""
        if self._state_dict_type != "sharded" or storage_options is not None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        from cfg_unlearn.checkpointing import remove_stale_temp_files, sharded_temp_path

        path = Path(self.broadcast(str(filepath)))
        if path.is_dir() and not path.is_symlink() and any(path.iterdir()) and not _holds_shards(path):
            # the save replaces the folder as a whole: one that is no sharded checkpoint (a run
            # folder, checkpoints/) would be deleted, where Lightning wrote the shards into it
            raise IsADirectoryError(f"{path} is a folder that is no sharded checkpoint (no meta.pt, .metadata or "
                                    "shards): a sharded checkpoint replaces its target whole; give the "
                                    "checkpoint its own path")
        tmp = Path(sharded_temp_path(path, self.broadcast(uuid.uuid4().hex)))  # one name on every rank
        try:
            super().save_checkpoint(checkpoint, tmp)  # every rank's shards (fsynced by DCP), rank 0's meta.pt
            if self.global_rank == 0:
                with open(tmp / "meta.pt", "rb") as fh:  # Lightning's name for the loop state
                    os.fsync(fh.fileno())
        except BaseException:
            if self.global_rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.barrier("sharded_checkpoint_written")
        failure = None
        if self.global_rank == 0:
            try:
                publish_dir(tmp, path, overwrite=True)  # an older checkpoint there is set aside, then deleted
                remove_stale_temp_files(path, older_than_s=600.0)  # temp folders of saves killed earlier
            except BaseException as e:
                shutil.rmtree(tmp, ignore_errors=True)
                failure = e
        # every rank learns whether rank 0 managed (a barrier alone would leave them waiting)
        failed = self.broadcast(None if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        if failed is not None:
            raise RuntimeError(f"rank 0 could not put the sharded checkpoint {path} in place: {failed}")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's FSDP loads a full checkpoint's weights itself and drops its
        ``state_dict`` before the module's ``on_load_checkpoint`` sees it, so the module's
        adapter-key check (adapter-only checkpoints load non-strictly, which hides adapters
        the checkpoint lacks or holds for other LoRA settings) is made here, first."""
        module = self.lightning_module
        check = getattr(module, "_check_adapter_checkpoint", None)
        if check is not None and module._adapter_only():
            from cfg_unlearn.checkpointing import load_checkpoint_file

            path = self.broadcast(checkpoint_path)
            if Path(path).is_file():  # a full checkpoint (mmap: keys read, not tensors); shards load strictly
                check(load_checkpoint_file(path)["state_dict"])
        return super().load_checkpoint(checkpoint_path, weights_only)

    def post_backward(self, closure_loss):
        super().post_backward(closure_loss)
        if self.model is not None:
            restore_unsharded_param_views(self.model)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self.root_device.type == "cpu" and not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            # CPU (gloo), for tests and debugging: Lightning passes device_id=None (the CPU
            # device's index), which FSDP refuses; wrap here with the CPU device, and let
            # Lightning's already-wrapped path add activation checkpointing
            kwargs = dict(self.kwargs)
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=self.root_device,
                **kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied: Lightning would warn it is ignored
        return super()._setup_model(model)
