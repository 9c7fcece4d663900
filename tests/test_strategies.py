"""FSDP for YAML configs (cfg_unlearn.strategies) and the shipped GPU configs.

CPU only, except the last test (a 2-step FSDP fit on a GPU, skipped without one). The
wrap policies are checked as pure functions of the tiny Llama's module tree, then under a
real FSDP wrap (gloo, world size 1), then through Lightning in a subprocess. The GPU
configs are parsed as written (``--print_config``) and instantiated with the trainer
moved to the CPU: nothing is downloaded, weights load in ``configure_model``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from cfg_unlearn.cli import cli_main
from cfg_unlearn.data.datamodule import PairDataModule
from cfg_unlearn.models import load_causal_lm
from cfg_unlearn.module import LoraSettings, UnlearnModule, add_lora
from cfg_unlearn.strategies import (
    NormClippingFSDPPrecision,
    UnlearnFSDPStrategy,
    build_auto_wrap_policy,
    decoder_like_class_names,
    lora_aware_policy,
    no_split_module_names,
    resolve_layer_classes,
    restore_unsharded_param_views,
    wrap_plan,
)

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIGS = ["llama3.1-8b-lora.yaml", "llama3.1-8b-ddp8.yaml", "llama3.1-8b-fsdp-full.yaml",
               "qwen2.5-0.5b-quick.yaml"]
PROJECTIONS = 7  # q, k, v, o, gate, up, down: "all-linear" adapts each of them


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI reads sys.argv otherwise


@pytest.fixture()
def llama(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir))


@pytest.fixture()
def lora_llama(tiny_model_dir):
    return add_lora(load_causal_lm(str(tiny_model_dir)), LoraSettings(r=4))


def decoder_layer_class(model):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert any(isinstance(m, LlamaDecoderLayer) for m in model.modules())
    return LlamaDecoderLayer


# ---------------------------------------------------------------------- class names


def test_default_layer_classes_come_from_no_split_modules(llama, lora_llama):
    layer = decoder_layer_class(llama)
    assert no_split_module_names(llama) == ["LlamaDecoderLayer"]
    assert resolve_layer_classes(llama) == {layer}
    # through the peft wrapper and a LightningModule-like holder as well
    assert resolve_layer_classes(lora_llama) == {layer}
    holder = nn.Module()
    holder.model = lora_llama
    assert resolve_layer_classes(holder) == {layer}


def test_explicit_names_resolve_to_the_model_classes(llama):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    layer = decoder_layer_class(llama)
    assert resolve_layer_classes(llama, ["LlamaDecoderLayer"]) == {layer}
    assert resolve_layer_classes(llama, ["LlamaDecoderLayer", "LlamaRMSNorm"]) == {layer, LlamaRMSNorm}


def test_unknown_class_name_is_a_clear_error_listing_candidates(llama):
    with pytest.raises(ValueError, match=r"no module of class MistralDecoderLayer in LlamaForCausalLM; "
                                         r"decoder-like classes found: \['LlamaDecoderLayer'\]"):
        resolve_layer_classes(llama, ["LlamaDecoderLayer", "MistralDecoderLayer"])
    with pytest.raises(ValueError, match="empty"):
        resolve_layer_classes(llama, [])


def test_model_without_no_split_modules_needs_explicit_names():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

    model = nn.Sequential(nn.Embedding(10, 4), nn.ModuleList([Block(), Block()]))
    assert decoder_like_class_names(model) == ["Block"]
    with pytest.raises(ValueError, match=r"declares no _no_split_modules.*wrap_layer_classes.*\['Block'\]"):
        resolve_layer_classes(model)
    assert resolve_layer_classes(model, ["Block"]) == {Block}


# ---------------------------------------------------------------------- policies


def test_full_finetuning_wraps_each_decoder_layer(llama):
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    policy = build_auto_wrap_policy(llama)
    assert isinstance(policy, ModuleWrapPolicy)
    plan = wrap_plan(llama, policy)
    n_layers = llama.config.num_hidden_layers
    assert [u.cls for u in plan] == ["LlamaForCausalLM"] + ["LlamaDecoderLayer"] * n_layers
    assert all(u.frozen == 0 for u in plan)
    assert sum(u.trainable for u in plan) == sum(p.numel() for p in llama.parameters())


def test_lora_policy_keeps_frozen_and_trainable_weights_in_separate_units(lora_llama):
    from torch.distributed.fsdp.wrap import CustomPolicy

    policy = build_auto_wrap_policy(lora_llama)  # LoRA detected: frozen base + trainable adapters
    assert isinstance(policy, CustomPolicy)
    plan = wrap_plan(lora_llama, policy)
    n_layers = lora_llama.config.num_hidden_layers
    assert not [u for u in plan if u.mixed]
    trainable_units = [u for u in plan if u.trainable]
    assert len(trainable_units) == 2 * PROJECTIONS * n_layers  # lora_A and lora_B of every linear
    assert all(".lora_A.default" in u.name or ".lora_B.default" in u.name for u in trainable_units)
    frozen_units = [u for u in plan if u.frozen]
    assert [u.cls for u in frozen_units] == ["PeftModelForCausalLM"] + ["LlamaDecoderLayer"] * n_layers
    # every parameter is accounted for exactly once
    params = list(lora_llama.parameters())
    assert sum(u.trainable for u in plan) == sum(p.numel() for p in params if p.requires_grad)
    assert sum(u.frozen for u in plan) == sum(p.numel() for p in params if not p.requires_grad)
    # for contrast: decoder layers alone put the adapters in with their frozen base weights
    plain = build_auto_wrap_policy(lora_llama, lora=False)
    mixed = [u for u in wrap_plan(lora_llama, plain) if u.mixed]
    assert [u.cls for u in mixed] == ["LlamaDecoderLayer"] * n_layers
    # explicit classes work the same way
    assert not [u for u in wrap_plan(lora_llama, lora_aware_policy(resolve_layer_classes(lora_llama))) if u.mixed]


@pytest.fixture()
def process_group(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:FSDP.state_dict_type\\(\\) and FSDP.set_state_dict_type\\(\\):FutureWarning")
@pytest.mark.filterwarnings("ignore:When using ``NO_SHARD``:UserWarning")
@pytest.mark.parametrize("lora", [True, False], ids=["lora_aware", "decoder_layers_only"])
def test_under_fsdp_frozen_weights_get_no_gradient(lora_llama, process_group, lora):
    """A real FSDP wrap (world size 1): with the LoRA-aware policy every FlatParameter is
    uniformly frozen or trainable, so the frozen base has ``requires_grad=False`` flat
    parameters (no gradient buffer, no reduce-scatter) and FSDP does not warn; decoder
    layers alone make mixed units, which FSDP warns allocate gradients for the frozen
    weights. After a backward the state dict is whole (restore_unsharded_param_views)."""
    from torch.distributed.fsdp import FullStateDictConfig, ShardingStrategy, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    n_params = len(dict(lora_llama.named_parameters()))
    policy = build_auto_wrap_policy(lora_llama, lora=lora)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fsdp = FSDP(lora_llama, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"),
                    sharding_strategy=ShardingStrategy.NO_SHARD)
    mixed_warnings = [w for w in caught if "both parameters with requires_grad=True and False" in str(w.message)]
    flat = [(u._handle.flat_param, u) for u in FSDP.fsdp_modules(fsdp) if u._handle is not None]
    if lora:
        assert not mixed_warnings
        assert len(flat) == len(wrap_plan(lora_llama, policy))
        for fp, _ in flat:  # uniform: FSDP stores requires_grad per FlatParameter
            assert fp.requires_grad == any(p.requires_grad for p in fp._params)
            assert fp.requires_grad == all(p.requires_grad for p in fp._params)
        assert sum(not fp.requires_grad for fp, _ in flat) == 1 + lora_llama.config.num_hidden_layers
    else:
        assert mixed_warnings

    ids = torch.randint(0, 100, (2, 8))
    fsdp(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    for name, p in fsdp.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    if lora:
        assert all(fp.grad is None for fp, _ in flat if not fp.requires_grad)
    restore_unsharded_param_views(fsdp)
    fsdp(input_ids=ids).logits.sum()  # a second step's forward keeps the parameters
    with FSDP.state_dict_type(fsdp, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
        assert len(fsdp.state_dict()) == n_params


# ---------------------------------------------------------------------- strategy


def test_strategy_arguments_map_to_fsdp():
    from torch.distributed.fsdp import CPUOffload, ShardingStrategy

    s = UnlearnFSDPStrategy(wrap_layer_classes=["LlamaDecoderLayer"], activation_checkpointing=True,
                            state_dict_type="sharded", sharding_strategy="SHARD_GRAD_OP", cpu_offload=True)
    assert s.wrap_layer_classes == ["LlamaDecoderLayer"] and s.activation_checkpointing
    assert s.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP
    assert s._state_dict_type == "sharded"
    assert isinstance(s.cpu_offload, CPUOffload) and s.cpu_offload.offload_params
    assert s.kwargs["use_orig_params"] is True and s.kwargs["limit_all_gathers"] is True
    # HYBRID_SHARD needs a policy at construction in Lightning: the placeholder satisfies it
    assert UnlearnFSDPStrategy(sharding_strategy="HYBRID_SHARD").sharding_strategy == ShardingStrategy.HYBRID_SHARD
    with pytest.raises(ValueError, match="non-empty list of class names"):
        UnlearnFSDPStrategy(wrap_layer_classes=[])
    with pytest.raises(ValueError, match="state_dict_type"):
        UnlearnFSDPStrategy(state_dict_type="consolidated")
    # the trainer's precision becomes the norm-clipping FSDP plugin
    from lightning.pytorch.plugins.precision import FSDPPrecision

    s.precision_plugin = FSDPPrecision("bf16-mixed")
    assert isinstance(s.precision_plugin, NormClippingFSDPPrecision)
    assert s.precision_plugin.mixed_precision_config.param_dtype == torch.bfloat16


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_configure_wrapping_resolves_on_the_built_module(tiny_model_dir, lora):
    from torch.distributed.fsdp.wrap import CustomPolicy, ModuleWrapPolicy

    module = UnlearnModule(model=f"tiny:{tiny_model_dir}", lora=LoraSettings(r=4) if lora else None,
                           gradient_checkpointing=True)
    module.configure_model()
    layer = decoder_layer_class(module)
    s = UnlearnFSDPStrategy(activation_checkpointing=True)
    with pytest.warns(UserWarning, match="replaces the model's own gradient checkpointing"):
        s.configure_wrapping(module)
    policy = s.kwargs["auto_wrap_policy"]
    assert isinstance(policy, CustomPolicy if lora else ModuleWrapPolicy)
    assert s.resolved_layer_classes == {layer}
    assert not [u for u in s.plan if u.mixed]
    ac = s._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert isinstance(ac, ModuleWrapPolicy) and ac._module_classes == {layer}
    # the model's own checkpointing is off: one recomputation, not two
    assert not any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())

    forced = UnlearnFSDPStrategy(lora_aware=False)
    if lora:
        with pytest.warns(UserWarning, match="hold frozen and trainable parameters"):
            forced.configure_wrapping(module)
    else:
        forced.configure_wrapping(module)
    assert isinstance(forced.kwargs["auto_wrap_policy"], ModuleWrapPolicy)
    assert forced._activation_checkpointing_kwargs == {}
    with pytest.raises(ValueError, match="no module of class Qwen2DecoderLayer.*'LlamaDecoderLayer'"):
        UnlearnFSDPStrategy(wrap_layer_classes=["Qwen2DecoderLayer"]).configure_wrapping(module)
    with pytest.raises(ValueError, match="configure_model"):
        UnlearnFSDPStrategy().configure_wrapping(UnlearnModule(model=f"tiny:{tiny_model_dir}"))


def test_sharded_checkpoints_of_adapters_alone_are_refused(tiny_model_dir):
    """They saved, then `fit --ckpt_path` and `validate` failed with a raw DCP error
    ("Missing key in checkpoint state_dict: ...embed_tokens.weight")."""
    from cfg_unlearn.utils import ConfigError

    module = UnlearnModule(model=f"tiny:{tiny_model_dir}", lora=LoraSettings(r=4, adapter_only_checkpoints=True))
    module.configure_model()
    with pytest.raises(ConfigError, match="adapter_only_checkpoints needs state_dict_type: full under FSDP"):
        UnlearnFSDPStrategy(state_dict_type="sharded").configure_wrapping(module)
    UnlearnFSDPStrategy(state_dict_type="full").configure_wrapping(module)  # the full state dict loads back


def test_a_sharded_save_refuses_a_folder_that_is_no_checkpoint(tmp_path):
    """The sharded save replaces its target whole: pointed at a run folder it would delete
    the logs and checkpoints in it (Lightning wrote the shards into it, beside them)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.csv").write_text("step,loss\n")
    with pytest.raises(IsADirectoryError, match="no sharded checkpoint"):
        UnlearnFSDPStrategy(state_dict_type="sharded").save_checkpoint({}, run)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "metrics.csv"]
    # a sharded checkpoint an in-place save left without its meta.pt (killed) is replaced, not refused
    half = tmp_path / "last.ckpt"
    half.mkdir()
    (half / ".metadata").write_bytes(b"old")
    (half / "__0_0.distcp").write_bytes(b"old")
    UnlearnFSDPStrategy(state_dict_type="sharded").save_checkpoint({"state_dict": {}, "epoch": 1}, half)
    assert (half / "meta.pt").is_file() and (half / ".metadata").read_bytes() != b"old"


def test_fsdp_checks_the_keys_of_an_adapter_checkpoint_before_loading_it(tiny_model_dir, tmp_path):
    """Lightning's FSDP loads a full checkpoint's weights itself and drops its state_dict
    before on_load_checkpoint, so adapters for other LoRA settings loaded as nothing."""
    from cfg_unlearn.utils import ConfigError

    trained = UnlearnModule(model=f"tiny:{tiny_model_dir}", lora=LoraSettings(r=4, adapter_only_checkpoints=True))
    trained.configure_model()
    adapters = {f"model.{n}": p.detach() for n, p in trained.model.named_parameters() if p.requires_grad}
    torch.save({"state_dict": adapters, "global_step": 1}, tmp_path / "adapters.ckpt")
    fewer = UnlearnModule(model=f"tiny:{tiny_model_dir}",
                          lora=LoraSettings(r=4, target_modules=["q_proj", "v_proj"], adapter_only_checkpoints=True))
    fewer.configure_model()
    strategy = UnlearnFSDPStrategy(state_dict_type="full")
    strategy.connect(fewer)
    with pytest.raises(ConfigError, match=r"does not fit model tiny:.*this model does not have"):
        strategy.load_checkpoint(tmp_path / "adapters.ckpt")


# ---------------------------------------------------------------------- configs


def _raw(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / name).read_text())


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_config_parses_as_written(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(ROOT / "configs" / name), "--print_config"])
    assert e.value.code == 0
    header = (ROOT / "configs" / name).read_text().splitlines()[:12]
    assert any(f"--config configs/{name}" in line for line in header), "header must give the launch command"
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model"] == _raw(name)["model"]["model"]
    assert printed["trainer"]["accelerator"] == _raw(name)["trainer"]["accelerator"]  # as written, not moved


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_config_instantiates_without_downloading(name, tmp_path, cpu_args_unless_enough_gpus):
    cli = cli_main(["--config", str(ROOT / "configs" / name), "--trainer.default_root_dir", str(tmp_path),
                    *cpu_args_unless_enough_gpus(ROOT / "configs" / name)], run=False)
    assert isinstance(cli.model, UnlearnModule) and isinstance(cli.datamodule, PairDataModule)
    assert cli.model.model is None  # weights load in configure_model
    assert cli.datamodule.tokenizer is None  # the tokenizer loads in setup
    assert cli.datamodule.tokenizer_name == cli.model.model_name
    strategy = cli.trainer.strategy
    if name == "llama3.1-8b-fsdp-full.yaml":
        assert type(strategy) is UnlearnFSDPStrategy
        assert strategy.wrap_layer_classes == ["LlamaDecoderLayer"] and strategy.activation_checkpointing
        assert strategy._state_dict_type == "sharded"
        assert cli.model.lora is None and not cli.model.hparams.gradient_checkpointing
        assert cli.model.hparams.dtype == "float32"
    if name == "llama3.1-8b-ddp8.yaml":
        from lightning.pytorch.strategies import DDPStrategy

        assert isinstance(strategy, DDPStrategy)


def test_llama_lora_config_has_the_papers_hyperparameters(tmp_path, cpu_args_unless_enough_gpus):
    name = "llama3.1-8b-lora.yaml"
    cli = cli_main(["--config", str(ROOT / "configs" / name), "--trainer.default_root_dir", str(tmp_path),
                    *cpu_args_unless_enough_gpus(ROOT / "configs" / name)], run=False)
    m = cli.model
    assert m.model_name == "meta-llama/Llama-3.1-8B-Instruct"
    assert (m.lora.r, m.lora.alpha, m.lora.dropout, m.lora.target_modules) == (16, 32, 0.01, "all-linear")
    assert m.objective == "orpo" and m.beta == 0.1
    assert m.cond_dropout == 0.3 and m.cond_mode == "dropout"  # as configs/tiny.yaml
    assert m.hparams.gradient_checkpointing and m.hparams.dtype == "bfloat16"
    opt = m.optimizer_factory([nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    sched = m.scheduler_factory(opt)
    assert sched.min_ratio == pytest.approx(0.1) and sched.needs_total_steps  # cosine to 10% of all steps
    sched.set_total_steps(100)
    assert sched._factor(100) == pytest.approx(0.1)
    assert cli.trainer.max_epochs == 3
    raw = _raw(name)["trainer"]
    assert raw["precision"] == "bf16-mixed" and raw["devices"] == 1
    assert cli.trainer.precision == "bf16-mixed"
    assert cli.config_init.get("eval") is not None  # GuidanceEval on, as in tiny.yaml


def test_multi_gpu_configs_keep_the_global_batch_and_the_method():
    def global_batch(name):
        raw = _raw(name)
        return raw["data"]["batch_size"] * raw["trainer"]["devices"] * raw["trainer"].get("accumulate_grad_batches", 1)

    one = _raw("llama3.1-8b-lora.yaml")
    assert global_batch("llama3.1-8b-lora.yaml") == global_batch("llama3.1-8b-ddp8.yaml") == 16
    assert global_batch("llama3.1-8b-fsdp-full.yaml") == 16
    ddp = _raw("llama3.1-8b-ddp8.yaml")
    assert ddp["trainer"]["devices"] == 8 and ddp["trainer"]["strategy"] == "ddp"
    for key in ("model", "lora", "beta", "objective", "cond_dropout", "optimizer", "lr_scheduler", "dtype"):
        assert ddp["model"][key] == one["model"][key], key
    assert ddp["trainer"]["max_epochs"] == one["trainer"]["max_epochs"] == 3
    fsdp = _raw("llama3.1-8b-fsdp-full.yaml")
    assert fsdp["trainer"]["devices"] == 8
    assert fsdp["trainer"]["strategy"]["class_path"] == "cfg_unlearn.strategies.UnlearnFSDPStrategy"


# ---------------------------------------------------------------------- FSDP fits

FIT_SCRIPT = r"""
import json, sys, torch, lightning as L
from cfg_unlearn.data.datamodule import PairDataModule
from cfg_unlearn.data.world import WorldConfig
from cfg_unlearn.module import LoraSettings, UnlearnModule
from cfg_unlearn.strategies import NormClippingFSDPPrecision, UnlearnFSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

model_dir, accelerator, out = sys.argv[1:4]
clips = []
_clip = NormClippingFSDPPrecision.clip_grad_by_norm
def counted(self, optimizer, clip_val):
    clips.append(clip_val)
    return _clip(self, optimizer, clip_val)
NormClippingFSDPPrecision.clip_grad_by_norm = counted

results = {}
for case, lora, state_dict_type in (("lora", True, "full"), ("full", False, "sharded")):
    spec = f"tiny:{model_dir}"
    module = UnlearnModule(model=spec, lora=LoraSettings(r=4) if lora else None, cond_dropout=0.3,
                           optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=6), batch_size=4)
    strategy = UnlearnFSDPStrategy(activation_checkpointing=True, state_dict_type=state_dict_type)
    trainer = L.Trainer(accelerator=accelerator, devices=1, strategy=strategy, max_steps=2, limit_val_batches=0,
                        gradient_clip_val=1.0, precision="bf16-mixed" if accelerator == "cuda" else "32-true",
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=f"{out}/{case}")
    trainer.fit(module, dm)
    root = trainer.strategy.model
    units = [u for u in FSDP.fsdp_modules(root) if u._handle is not None]
    trainer.save_checkpoint(f"{out}/{case}/final.ckpt")
    # the trained weights as one plain state dict, for the export of the sharded checkpoint
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True)):
        torch.save({k: v.detach().float().cpu() for k, v in root.state_dict().items()}, f"{out}/{case}/weights.pt")
    if state_dict_type == "sharded":
        # a save killed after the shards, before meta.pt (the loop state), must leave the
        # checkpoint it replaces whole: change the weights, then kill the save there
        from pathlib import Path
        final = Path(f"{out}/{case}/final.ckpt")
        before = {p.name: p.read_bytes() for p in final.iterdir()}
        with torch.no_grad():
            for p in root.parameters():
                p.add_(1.0)
        real_save = torch.save
        def killed(obj, f, *a, **kw):
            if str(f).endswith("meta.pt"):
                raise KeyboardInterrupt("killed between the shards and meta.pt")
            return real_save(obj, f, *a, **kw)
        torch.save = killed
        try:
            trainer.save_checkpoint(str(final))
        except KeyboardInterrupt:
            pass
        finally:
            torch.save = real_save
        intact = {p.name: p.read_bytes() for p in final.iterdir()} == before
        beside = sorted(p.name for p in final.parent.iterdir())
    results[case] = {
        "intact_after_kill": intact if state_dict_type == "sharded" else None,
        "beside_final": beside if state_dict_type == "sharded" else None,
        "root_is_fsdp": isinstance(root, FSDP),
        "units": len(units),
        "frozen_units": sum(not u._handle.flat_param.requires_grad for u in units),
        "planned_units": len(trainer.strategy.plan),
        "mixed_units": sum(u.mixed for u in trainer.strategy.plan),
        "checkpointed_layers": sum(isinstance(m, CheckpointWrapper) for m in root.modules()),
        "steps": trainer.global_step,
        "loss": float(trainer.callback_metrics["train/loss"]),
        "layers": module.model.config.num_hidden_layers,
    }
results["clips"] = len(clips)
print("RESULT " + json.dumps(results))
"""


def _run_fit(tiny_model_dir, tmp_path, accelerator: str) -> dict:
    script = tmp_path / "fit_fsdp.py"
    script.write_text(FIT_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(tiny_model_dir), accelerator, str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _check_fit(results: dict, tmp_path: Path, base: Path) -> None:
    lora, full = results["lora"], results["full"]
    n = lora["layers"]
    for r in (lora, full):
        assert r["root_is_fsdp"] and r["steps"] == 2 and r["loss"] == r["loss"]  # finite, not NaN
        assert r["units"] == r["planned_units"] and r["mixed_units"] == 0
        assert r["checkpointed_layers"] == n
    assert lora["units"] == 1 + n + 2 * PROJECTIONS * n and lora["frozen_units"] == 1 + n
    assert full["units"] == 1 + n and full["frozen_units"] == 0
    assert results["clips"] == 4  # 2 steps x 2 runs, through FSDP's clip_grad_norm_
    assert (tmp_path / "out" / "lora" / "final.ckpt").is_file()  # full state dict: one file
    sharded = tmp_path / "out" / "full" / "final.ckpt"
    assert sharded.is_dir()  # sharded: one file per rank
    # a save killed before its meta.pt left the previous checkpoint as it was, and no temp folder
    assert full["intact_after_kill"] and full["beside_final"] == ["checkpoints", "final.ckpt", "weights.pt"]
    _check_sharded_export(sharded, tmp_path / "out" / "full" / "weights.pt", tmp_path / "exports", base)


def _check_sharded_export(sharded: Path, weights: Path, parent: Path, base: Path) -> None:
    """``cfg-unlearn export`` takes the sharded directory as it is: every exported tensor
    is the trained one, bit for bit (and training moved them off the base model), and
    the gathering leaves no temporary file behind."""
    from safetensors.torch import load_file

    from cfg_unlearn.export import EXPORT_CONFIG, export_checkpoint

    out, _ = export_checkpoint(sharded, parent / "export")
    trained = torch.load(weights)
    exported = load_file(out / "model.safetensors")
    assert exported and set(exported) <= {k[len("model."):] for k in trained}
    for name, tensor in exported.items():
        assert torch.equal(tensor.float(), trained[f"model.{name}"]), name
    initial = load_file(base / "model.safetensors")
    assert any(not torch.equal(exported[k].float(), initial[k].float()) for k in exported)
    assert json.loads((out / EXPORT_CONFIG).read_text())["source_checkpoint"] == str(sharded.resolve())
    assert sorted(p.name for p in parent.iterdir()) == ["export"]


@pytest.mark.slow
def test_fsdp_fit_on_cpu(tiny_model_dir, tmp_path):
    """The strategy through Lightning on the CPU (gloo; Lightning's own FSDPStrategy refuses
    CPUs, this one wraps with the CPU device): LoRA with a full checkpoint and full
    fine-tuning with a sharded one, 2 steps each, with activation checkpointing and norm
    clipping; then ``cfg-unlearn export`` of the sharded directory. The fits run in a
    subprocess: they initialise a process group."""
    _check_fit(_run_fit(tiny_model_dir, tmp_path, "cpu"), tmp_path, tiny_model_dir)


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU")
def test_fsdp_fit_on_gpu(tiny_model_dir, tmp_path):
    """The same 2-step FSDP fits on one GPU in bf16-mixed (FSDP runs NO_SHARD on one rank)."""
    _check_fit(_run_fit(tiny_model_dir, tmp_path, "cuda"), tmp_path, tiny_model_dir)


SHARDED_REFERENCE_SCRIPT = """
import json, sys, torch, lightning as L
from cfg_unlearn.data.datamodule import PairDataModule
from cfg_unlearn.data.world import WorldConfig
from cfg_unlearn.module import UnlearnModule
from cfg_unlearn.strategies import UnlearnFSDPStrategy

spec = "tiny:" + sys.argv[1]
seen = []
class Grab(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        seen.append({k: float(trainer.callback_metrics[k]) for k in ("train/loss", "train/npo/log_ratio")})
dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4, val_fraction=0.0)
module = UnlearnModule(model=spec, objective="npo", reference="precomputed", beta=0.1,
                       optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=UnlearnFSDPStrategy(state_dict_type="sharded"),
                    max_steps=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, callbacks=[Grab()],
                    default_root_dir=sys.argv[2])
trainer.fit(module, dm)
# a sharded save from 2 ranks: both write into one temp folder (its name broadcast), renamed into place
import os
saved = os.path.join(sys.argv[2], "saved.ckpt")
for _ in range(2):  # the second replaces the first
    trainer.save_checkpoint(saved)
if trainer.global_rank == 0:
    print("RESULT " + json.dumps({"steps": seen, "table": len(module.reference_logps),
                                  "saved": sorted(os.listdir(saved)), "beside": sorted(os.listdir(sys.argv[2]))}))
"""


@pytest.mark.slow
def test_precomputed_reference_under_two_rank_fsdp(tiny_model_dir, tmp_path):
    """``reference: precomputed`` with the model sharded over 2 ranks: the table is scored
    before the first step, outside FSDP's forward, where the root unit's parameters
    (embeddings, head) are flat shards; they must be gathered (it raised "'weight' must
    be 2-D" before). With lr 0 the policy is its own reference: log-ratio 0, NPO loss
    (2 / beta) ln 2."""
    script = tmp_path / "fsdp_reference.py"
    script.write_text(SHARDED_REFERENCE_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert result["table"] == 4 * 6  # every pair, on every rank
    assert result["saved"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert result["beside"] == ["saved.ckpt"]  # no temp folder left
    assert len(result["steps"]) == 2
    for step in result["steps"]:
        assert abs(step["train/npo/log_ratio"]) < 1e-5
        assert step["train/loss"] == pytest.approx(20 * math.log(2), abs=1e-4)


def test_fsdp_mixed_precision_autocasts_on_the_cpu():
    """Lightning's FSDP precision plugin autocasts on cuda only: GuidanceEval after an FSDP
    bf16-mixed fit on the CPU failed with "expected m1 and m2 to have the same dtype", and
    so did Lightning's own steps of a LoRA model (float32 adapters after bfloat16 layers).
    The strategy's plugin autocasts on the device it runs on."""
    from types import SimpleNamespace

    from cfg_unlearn.strategies import forward_outside_step

    plugin = NormClippingFSDPPrecision("bf16-mixed")
    plugin.device_type = "cpu"
    for context in (plugin.forward_context, lambda: forward_outside_step(SimpleNamespace(precision_plugin=plugin))):
        with context():
            assert (torch.ones(2, 3) @ torch.ones(3, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16
    for precision, device in (("32-true", "cpu"), ("bf16-mixed", "cuda")):
        plugin = NormClippingFSDPPrecision(precision)
        plugin.device_type = device
        with plugin.forward_context():
            assert not torch.is_autocast_enabled("cpu")


TWO_RANK_FULL_SCRIPT = """
import json, sys, torch, lightning as L
from cfg_unlearn.data.datamodule import PairDataModule
from cfg_unlearn.data.world import WorldConfig
from cfg_unlearn.module import LoraSettings, UnlearnModule
from cfg_unlearn.strategies import UnlearnFSDPStrategy

spec, out = "tiny:" + sys.argv[1], sys.argv[2]
results = {}
for case, lora, precision in (("lora", True, "bf16-mixed"), ("full", False, "32-true")):
    module = UnlearnModule(model=spec, lora=LoraSettings(r=4) if lora else None,
                           optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=2, val_fraction=0.25)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=UnlearnFSDPStrategy(state_dict_type="full"),
                        precision=precision, max_steps=2, limit_val_batches=1, num_sanity_val_steps=1,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=out)
    trainer.fit(module, dm)
    path = f"{out}/{case}.ckpt"
    trainer.save_checkpoint(path)
    if trainer.global_rank == 0:
        ckpt = torch.load(path, weights_only=False)
        results[case] = {"keys": len(ckpt["state_dict"]), "optimizer": len(ckpt["optimizer_states"][0]["state"]),
                         "finite": all(bool(torch.isfinite(t).all()) for t in ckpt["state_dict"].values()
                                       if t.is_floating_point()),
                         "trainable": sum(1 for p in module.parameters() if p.requires_grad),
                         "layers": module.model.config.num_hidden_layers,
                         "buffers": sorted({str(b.dtype) for b in module.model.buffers() if b.is_floating_point()})}
if trainer.global_rank == 0:
    print("RESULT " + json.dumps(results))
"""


@pytest.mark.slow
def test_two_rank_fsdp_on_the_cpu_saves_full_checkpoints_and_trains_lora_in_bf16_mixed(tiny_model_dir, tmp_path):
    """On 2 gloo ranks: ``state_dict_type: full`` (the default) crashed the process with a
    segmentation fault in FSDP's state-dict hook when the checkpoint was saved (Lightning
    offloads to the CPU what lives there already); LoRA under bf16-mixed failed in the
    sanity check with "expected m1 and m2 to have the same dtype" (no autocast on CPU)."""
    script = tmp_path / "fsdp_full.py"
    script.write_text(TWO_RANK_FULL_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    lora, full = result["lora"], result["full"]
    assert lora["finite"] and full["finite"]
    # every tensor of the model, whole (the base's and the adapters'); the optimizer's state
    # for every trainable tensor (the adapters' 4 per adapted linear)
    adapters = 2 * PROJECTIONS * lora["layers"]
    assert lora["keys"] == full["keys"] + adapters
    assert lora["optimizer"] == lora["trainable"] == adapters and full["optimizer"] == full["trainable"] > 0
    # the rotary inv_freq stays float32 under bf16-mixed: FSDP cast it to bf16 (Lightning's
    # buffer_dtype), so the run trained on other positions than the exported model's
    assert lora["buffers"] == full["buffers"] == ["torch.float32"]
