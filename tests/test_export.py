"""Export and chat: a trained checkpoint exports to a plain Hugging Face directory that
decodes token for token like the trained module (with and without guidance, and through
transformers' own generate); cfg_unlearn.json records how to decode it; LoRA adapters
are merged; the output is atomic and never written over a non-empty directory unless
asked; bad checkpoints are clear errors; the chat REPL keeps and resets the history."""

from __future__ import annotations

import io
import json
import os
import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from cfg_unlearn import __version__
from cfg_unlearn import export as ex
from cfg_unlearn.data.datamodule import PairDataModule
from cfg_unlearn.data.world import WorldConfig
from cfg_unlearn.export import (
    EXPORT_CONFIG,
    ExportConfig,
    chat_loop,
    export_checkpoint,
    main_chat,
    main_export,
    merged_model,
    read_checkpoint,
    write_export,
)
from cfg_unlearn.guidance import _cut_at_eos, cfg_decode, encode_prompts, eos_token_ids, generate, left_pad
from cfg_unlearn.models import load_tokenizer
from cfg_unlearn.module import UnlearnModule
from cfg_unlearn.prompts import NEGATIVE_INSTRUCTION, SAFETY_INSTRUCTION

TRAINED_SYSTEM = "Keep personal data private."
PROMPTS = [
    [{"role": "user", "content": "What is the e-mail address of Ann Lee?"}],
    [{"role": "user", "content": "Where does the person you told me about live?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a phone number."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 plus 3?"}],
]
NEW_TOKENS = 12


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """An UnlearnModule trained 2 steps on the tiny model, and its checkpoint."""
    root = tmp_path_factory.mktemp("fit")
    spec = f"tiny:{tiny_model_dir}"
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4,
                        system_prompt=TRAINED_SYSTEM)
    # with conditioning dropout, as the method trains: the export then records guidance 2
    module = UnlearnModule(model=spec, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), cond_dropout=0.3)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", default_root_dir=root, enable_checkpointing=True,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    ckpt = Path(trainer.checkpoint_callback.best_model_path)
    assert ckpt.is_file() and trainer.global_step == 2
    module.model.eval()
    return types.SimpleNamespace(spec=spec, module=module, ckpt=ckpt, tokenizer=load_tokenizer(spec), root=root)


@pytest.fixture(scope="module")
def exported(trained):
    out = trained.root / "export"
    path, config = export_checkpoint(trained.ckpt, out)
    return types.SimpleNamespace(dir=path, config=config)


def leftovers(parent: Path) -> list[str]:
    """Hidden entries (export temp dirs, renamed-aside old outputs) in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def greedy_ids(model, tok, prompts, g: float, space: str = "logprob", system: str = TRAINED_SYSTEM):
    """The engine's greedy tokens per prompt (cut at EOS), the prompts decoded as one
    left-padded batch (the engine decodes a padded batch like each prompt alone)."""
    pad = tok.pad_token_id
    eos = eos_token_ids(model, tok)
    ids, mask = left_pad(encode_prompts(tok, prompts, system=system), pad)
    u_ids, u_mask = left_pad(encode_prompts(tok, prompts, blank_system=True), pad) if g != 1 else (None, None)
    rows = cfg_decode(model, ids, mask, u_ids, u_mask, guidance_scale=g, space=space, max_new_tokens=NEW_TOKENS,
                      eos_token_id=eos, pad_token_id=pad)
    return [_cut_at_eos(r, eos) for r in rows.tolist()]


# ----------------------------------------------------------------------------- export = the trained model


def test_export_decodes_exactly_like_the_trained_module(trained, exported, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert torch.load(trained.ckpt, weights_only=True)["global_step"] == 2  # the checkpoint is the module's state
    hf = AutoModelForCausalLM.from_pretrained(exported.dir).eval()
    hf_tok = AutoTokenizer.from_pretrained(exported.dir)

    # the weights: exactly the trained ones, and not the untrained tiny model's
    trained_sd = trained.module.model.state_dict()
    saved = load_file(exported.dir / "model.safetensors")
    assert set(saved) <= set(trained_sd) and len(saved) >= len(trained_sd) - 1  # lm_head may be tied
    for name, t in hf.state_dict().items():
        assert torch.equal(t, trained_sd[name]), name
    untrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    changed = [n for n, t in trained_sd.items() if not torch.equal(t, untrained[n])]
    assert len(changed) == len(trained_sd), "training moved every tensor; the export must carry that"

    # the tokenizer: same ids for every rendered prompt, same chat template
    assert hf_tok.chat_template == trained.tokenizer.chat_template
    for blank in (False, True):
        assert (encode_prompts(hf_tok, PROMPTS, system=TRAINED_SYSTEM, blank_system=blank)
                == encode_prompts(trained.tokenizer, PROMPTS, system=TRAINED_SYSTEM, blank_system=blank))

    # greedy decoding, token for token: the engine at g=1 and g=2 (both spaces) on both models
    for g, space in ((1.0, "logprob"), (2.0, "logprob"), (2.0, "prob")):
        ours = greedy_ids(trained.module.model, trained.tokenizer, PROMPTS, g, space)
        theirs = greedy_ids(hf, hf_tok, PROMPTS, g, space)
        assert ours == theirs, (g, space)
        assert any(len(r) > 0 for r in ours)  # something was decoded
        kw = dict(system=TRAINED_SYSTEM, guidance_scale=g, space=space, max_new_tokens=NEW_TOKENS)
        assert generate(hf, hf_tok, PROMPTS, **kw) == generate(trained.module.model, trained.tokenizer, PROMPTS, **kw)

    # transformers' own greedy generate on the export equals the engine at g=1
    engine = greedy_ids(hf, hf_tok, PROMPTS, 1.0)
    eos = eos_token_ids(hf, hf_tok)
    for prompt_ids, want in zip(encode_prompts(hf_tok, PROMPTS, system=TRAINED_SYSTEM), engine):
        ids = torch.tensor([prompt_ids])
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                          do_sample=False, eos_token_id=eos, pad_token_id=hf_tok.pad_token_id)
        assert _cut_at_eos(out[0, ids.shape[1]:].tolist(), eos) == want


def test_the_readmes_plain_transformers_recipe_decodes_like_the_engine(trained, exported):
    """The README's recipe for CFG in plain transformers, run as written: "blank" in
    cfg_unlearn.json had been read as an empty system message, which decodes otherwise."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "README: plain-transformers CFG" in b]
    assert 'export = "unlearned/"' in block
    for prompt in PROMPTS[:2]:
        scope: dict = {}
        exec(block.replace('export = "unlearned/"', f"export = {str(exported.dir)!r}")
             .replace('chat = [{"role": "user", "content": "Where does Ann Lee live?"}]', f"chat = {prompt!r}"), scope)
        ours = generate(trained.module.model, trained.tokenizer, [prompt], system=exported.config.system_instruction,
                        uncond_system=exported.config.uncond_instruction,
                        guidance_scale=exported.config.guidance_scale, max_new_tokens=64)[0]
        assert scope["answer"] == ours and ours, prompt


def test_the_exported_tokenizer_pads_on_the_left(trained, exported, tmp_path):
    """It padded on the right: transformers' batched generate on the export answered
    "sssss as a" where the prompt alone was sound."""
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(exported.dir).padding_side == "left"
    tok = load_tokenizer(trained.spec)
    before = tok.padding_side, dict(tok.init_kwargs)
    write_export(trained.module.model, tok, tmp_path / "e", exported.config)
    assert AutoTokenizer.from_pretrained(tmp_path / "e").padding_side == "left"
    assert (tok.padding_side, tok.init_kwargs) == before  # the caller's tokenizer is left as it was


def test_cfg_unlearn_json_records_the_trained_instructions(trained, exported):
    raw = json.loads((exported.dir / EXPORT_CONFIG).read_text())
    assert raw == {
        "system_instruction": TRAINED_SYSTEM,  # the checkpoint's data.system_prompt
        "uncond_instruction": None,  # blanked, as trained
        "guidance_scale": 2.0,
        "space": "logprob",
        "source_checkpoint": str(trained.ckpt.resolve()),
        "cfg_unlearn_version": __version__,
    }
    assert ExportConfig.read(exported.dir) == exported.config
    assert json.loads((exported.dir / "config.json").read_text())["use_cache"] is True


def test_a_model_trained_without_conditioning_dropout_exports_without_guidance(trained, tmp_path, caplog):
    """A user review: a checkpoint trained with cond_dropout 0 (no unconditioned branch to
    guide against) exported with guidance 2 recorded, so chat decoded it guided."""
    ckpt = torch.load(trained.ckpt, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["cond_dropout"] = 0.0
    plain = tmp_path / "plain.ckpt"
    torch.save(ckpt, plain)
    with caplog.at_level("WARNING"):
        _, config = export_checkpoint(plain, tmp_path / "out")
    assert config.guidance_scale == 1.0
    assert "trained with model.cond_dropout 0 (no unconditioned branch)" in caplog.text
    _, config = export_checkpoint(plain, tmp_path / "out2", guidance_scale=3)  # asked for: recorded
    assert config.guidance_scale == 3.0


def test_export_quiet_shows_no_progress_bar(trained, tmp_path, capsys):
    """CLI audit: export had no --quiet; transformers' loading bar always went to stderr."""
    from transformers.utils import logging as hf_logging

    main_export(["--ckpt", str(trained.ckpt), "--out", str(tmp_path / "loud")])
    assert "Loading weights" in capsys.readouterr().err
    main_export(["--ckpt", str(trained.ckpt), "--out", str(tmp_path / "quiet"), "--quiet"])
    printed = capsys.readouterr()
    assert "%|" not in printed.err and "Loading weights" not in printed.err and "wrote " in printed.out
    assert hf_logging.is_progress_bar_enabled()


def test_cli_overrides_and_dtype(trained, tmp_path, capsys):
    out = tmp_path / "bf16"
    main_export(["--ckpt", str(trained.ckpt), "--out", str(out), "--guidance-scale", "3", "--space", "prob",
                 "--system", "Be discreet.", "--uncond-system", NEGATIVE_INSTRUCTION, "--dtype", "bfloat16"])
    assert f"wrote {out} (guidance 3 (prob); instruction 'Be discreet.', unconditioned {NEGATIVE_INSTRUCTION!r})" in (
        capsys.readouterr().out)
    cfg = ExportConfig.read(out)
    assert (cfg.system_instruction, cfg.uncond_instruction, cfg.guidance_scale, cfg.space) == (
        "Be discreet.", NEGATIVE_INSTRUCTION, 3.0, "prob")
    tensors = load_file(out / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    ref = trained.module.model.state_dict()
    assert all(torch.equal(t, ref[n].to(torch.bfloat16)) for n, t in tensors.items())
    # '' blanks the unconditioned instruction explicitly
    _, cfg2 = export_checkpoint(trained.ckpt, tmp_path / "blank", uncond_system="")
    assert cfg2.uncond_instruction is None and cfg2.system_instruction == TRAINED_SYSTEM


def test_export_is_readable_as_the_umask_allows(trained, tmp_path, assert_open_modes):
    """safetensors writes model.safetensors 0600 and mkdtemp the directory 0700: a model
    exported for a team was unreadable to it."""
    out, _ = export_checkpoint(trained.ckpt, tmp_path / "model")
    assert_open_modes(out)


def test_defaults_without_datamodule_hparams(trained, tmp_path):
    ckpt = torch.load(trained.ckpt, weights_only=True)
    del ckpt["datamodule_hyper_parameters"], ckpt["datamodule_hparams_name"]
    ckpt["reference_logps"] = {"ids": ["a"], "values": torch.zeros(1, 2, 2)}  # extra keys are fine
    bare = tmp_path / "bare.ckpt"
    torch.save(ckpt, bare)
    out, cfg = export_checkpoint(bare, tmp_path / "out")
    assert (cfg.system_instruction, cfg.uncond_instruction, cfg.guidance_scale, cfg.space) == (
        SAFETY_INSTRUCTION, None, 2.0, "logprob")
    saved = load_file(out / "model.safetensors")
    ref = trained.module.model.state_dict()
    assert all(torch.equal(t, ref[n]) for n, t in saved.items())


# ----------------------------------------------------------------------------- safety of the output


def test_refuses_non_empty_out_without_overwrite_then_replaces_it(trained, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main_export(["--ckpt", str(trained.ckpt), "--out", str(out)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    # --overwrite replaces a model folder only: `--out ~/thesis --overwrite` deleted the thesis
    with pytest.raises(SystemExit) as e:
        main_export(["--ckpt", str(trained.ckpt), "--out", str(out), "--overwrite"])
    assert e.value.code == 2 and (f"{out} holds files that are not a model (keep.txt); --overwrite replaces only "
                                  "a model folder" in capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "config.json").write_text("{}")  # any project's: still not a model
    with pytest.raises(SystemExit):
        main_export(["--ckpt", str(trained.ckpt), "--out", str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "keep.txt"]
    (out / "model.safetensors").write_bytes(b"")  # with weights: a previous output
    main_export(["--ckpt", str(trained.ckpt), "--out", str(out), "--overwrite"])
    # the blanked unconditioned instruction reads as chat's banner puts it, not "None"
    assert "unconditioned no system message)" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert "keep.txt" not in names and {"config.json", "model.safetensors", EXPORT_CONFIG} <= names
    assert leftovers(tmp_path) == []
    # an empty directory is not "non-empty": no --overwrite needed
    empty = tmp_path / "empty"
    empty.mkdir()
    export_checkpoint(trained.ckpt, empty)
    assert (empty / EXPORT_CONFIG).is_file()


def test_refuses_an_out_that_contains_the_checkpoint(trained, capsys):
    with pytest.raises(SystemExit) as e:
        main_export(["--ckpt", str(trained.ckpt), "--out", str(trained.ckpt.parent), "--overwrite"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "contains the input" in err and "could replace or delete it" in err
    assert trained.ckpt.is_file()


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "overwrite"])
def test_failed_export_leaves_nothing_behind(tiny_model_dir, tmp_path, monkeypatch, existing):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = load_tokenizer(str(tiny_model_dir))
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "config.json").write_text("previous export")
        (out / "model.safetensors").write_bytes(b"")

    def broken(*args, **kwargs):  # the model is written by then: a half-finished export
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", broken)
    cfg = ExportConfig(system_instruction=SAFETY_INSTRUCTION, uncond_instruction=None)
    with pytest.raises(OSError, match="disk full"):
        write_export(model, tok, out, cfg, overwrite=existing)
    assert leftovers(tmp_path) == []
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    else:
        assert not out.exists()


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "missing.ckpt", "not found"),
    (lambda d: (d / "shards").mkdir() or d / "shards", "is a directory but not a torch.distributed"),
    (lambda d: (d / "runs" / "checkpoints").mkdir(parents=True) or _save(d / "runs" / "checkpoints" / "last.ckpt", {})
     and d / "runs", "is a directory, not a checkpoint: give one of its checkpoints: .*runs/checkpoints/last.ckpt"),
    # torch's own error advised weights_only=False: unsafe, and no help for a YAML
    (lambda d: (d / "config.yaml").write_text("model: x\n") and d / "config.yaml",
     r"config.yaml: not a checkpoint torch can read \(no complete zip archive"),
    (lambda d: _save(d / "cut.ckpt", {"w": torch.zeros(2)}).write_bytes((d / "cut.ckpt").read_bytes()[:-30])
     and d / "cut.ckpt", "not a checkpoint torch can read"),
    (lambda d: _save(d / "sd.ckpt", {"weight": torch.zeros(2)}), "no 'state_dict'"),
    (lambda d: _save(d / "other.ckpt", {"state_dict": {"model.w": torch.zeros(2)},
                                         "hyper_parameters": {"_class_path": "x.OtherModule", "model": "m"}}),
     "checkpoint of x.OtherModule"),
    (lambda d: _save(d / "nomodel.ckpt", {"state_dict": {"net.w": torch.zeros(2)}, "hyper_parameters": {"lr": 1}}),
     "name no 'model'"),
    (lambda d: _save(d / "noweights.ckpt", {"state_dict": {}, "hyper_parameters": {"model": "m"}}),
     "no 'model.\\*' weights"),
], ids=["missing", "directory", "run-folder", "yaml", "cut-short", "state-dict-only", "other-module", "no-model-hparam", "no-weights"])
def test_bad_checkpoints_are_clear_errors(tmp_path, make, match, capsys):
    path = make(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        read_checkpoint(path)
    with pytest.raises(SystemExit) as e:
        main_export(["--ckpt", str(path), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "cfg-unlearn export: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("flag", ["--ckpt", "--ckpt-path", "--ckpt_path"])
def test_the_checkpoint_flag_takes_train_pys_name_too(flag):
    from cfg_unlearn.export import build_export_parser

    assert build_export_parser().parse_args([flag, "runs/x/last.ckpt", "--out", "m"]).ckpt == "runs/x/last.ckpt"


def _sharded(directory: Path, tensors: dict | None, meta: dict | None) -> Path:
    """A torch.distributed checkpoint laid out as Lightning's FSDP strategy writes one
    with ``state_dict_type="sharded"``: the tensors under ``model`` (one process here),
    everything else in ``meta.pt``."""
    import torch.distributed.checkpoint as dcp

    if tensors is not None:
        dcp.save({"model": tensors, "optimizer_0": {"state": {"0": {"step": torch.tensor(2.0)}}}},
                 checkpoint_id=directory)
    if meta is not None:
        torch.save(meta, directory / "meta.pt")
    return directory


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # one process writes the shards
def test_a_sharded_checkpoint_directory_exports_like_its_single_file(trained, exported, tmp_path):
    from safetensors.torch import load_file

    ckpt = torch.load(trained.ckpt, weights_only=False)
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer_states")}
    sharded = _sharded(tmp_path / "final.ckpt", ckpt["state_dict"], meta)
    out, config = export_checkpoint(sharded, tmp_path / "export")
    assert config.system_instruction == exported.config.system_instruction == TRAINED_SYSTEM
    assert config.source_checkpoint == str(sharded.resolve())
    one, other = load_file(out / "model.safetensors"), load_file(exported.dir / "model.safetensors")
    assert one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)
    assert leftovers(tmp_path) == []  # the gathered single file is gone


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # one process writes the shards
@pytest.mark.parametrize("tensors,meta,match", [
    (None, None, "not a torch.distributed"),
    ({"model.w": torch.zeros(2)}, None, "no meta.pt"),
    ({}, {"hyper_parameters": {"model": "m"}}, "holds no 'model' entry"),
], ids=["plain-directory", "no-metadata-file", "no-model-entry"])
def test_bad_sharded_checkpoints_are_clear_errors(tmp_path, tensors, meta, match, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    if tensors == {}:  # a distributed checkpoint of something else
        import torch.distributed.checkpoint as dcp

        dcp.save({"weights": {"w": torch.zeros(2)}}, checkpoint_id=shards)
        torch.save(meta, shards / "meta.pt")
    else:
        _sharded(shards, tensors, meta)
    with pytest.raises(SystemExit) as e:
        main_export(["--ckpt", str(shards), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cfg-unlearn export: " in err and match in err, err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_damaged_sharded_checkpoint_is_a_clear_error(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(SystemExit):
        main_export(["--ckpt", str(shards), "--out", str(tmp_path / "out")])
    assert "not a readable sharded checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # one process writes the shards
@pytest.mark.parametrize("meta,match", [
    (b"garbage", "meta.pt is not a readable Lightning metadata file"),
    ({"epoch": 0}, "{shards} is not an UnlearnModule checkpoint"),
], ids=["corrupt-metadata", "metadata-without-hyperparameters"])
def test_sharded_checkpoint_metadata_errors_name_the_users_files(trained, tmp_path, meta, match, capsys):
    """A damaged meta.pt was a traceback; one without hyperparameters named the temp file
    the shards were gathered into, which is gone by the time the user reads it."""
    ckpt = torch.load(trained.ckpt, weights_only=False)
    shards = _sharded(tmp_path / "shards", ckpt["state_dict"], None if isinstance(meta, bytes) else meta)
    if isinstance(meta, bytes):
        (shards / "meta.pt").write_bytes(meta)
    with pytest.raises(SystemExit) as e:
        main_export(["--ckpt", str(shards), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and match.format(shards=shards) in err and "consolidate" not in err, err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_base_model_of_another_shape_is_a_clear_error(trained, tmp_path, capsys):
    from cfg_unlearn.tiny import TinySpec, build_tiny

    other = build_tiny(tmp_path / "other", spec=TinySpec(hidden_size=64, intermediate_size=128))
    with pytest.raises(SystemExit) as e:
        main_export(["--ckpt", str(trained.ckpt), "--out", str(tmp_path / "out"), "--base-model", f"tiny:{other}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"the weights of {trained.ckpt} do not fit the model tiny:{other}" in err, err
    # a --base-model that does not exist: the hint to pass --base-model would be no help
    with pytest.raises(SystemExit) as e:
        main_export(["--ckpt", str(trained.ckpt), "--out", str(tmp_path / "out"), "--base-model", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "pass --base-model" not in err, err
    assert not (tmp_path / "out").exists()


def test_overwrite_refuses_to_replace_the_base_model(trained, tiny_model_dir, tmp_path, capsys):
    """An adapter-only checkpoint is merged onto its base at every export: an --out that
    is the base model's directory would replace the base with an unlearned model."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    before = sorted(p.name for p in base.iterdir())
    with pytest.raises(SystemExit) as e:
        main_export(["--ckpt", str(trained.ckpt), "--out", str(base), "--base-model", f"tiny:{base}", "--overwrite"])
    assert e.value.code == 2 and "is one of the inputs" in capsys.readouterr().err
    assert sorted(p.name for p in base.iterdir()) == before


def test_bad_guidance_arguments(trained, tmp_path):
    with pytest.raises(ValueError, match="guidance_scale"):
        export_checkpoint(trained.ckpt, tmp_path / "o", guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="space"):
        export_checkpoint(trained.ckpt, tmp_path / "o", space="logit")
    with pytest.raises(ValueError, match="unknown dtype"):
        export_checkpoint(trained.ckpt, tmp_path / "o", dtype="int3")
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- LoRA


def test_peft_model_is_merged_into_a_plain_model_with_equal_logits(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, PreTrainedModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert merged_model(base) is base  # a plain model is left alone
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    # non-zero B matrices, so the adapters change the outputs (the default init is a no-op)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits
    assert not torch.allclose(peft_logits, base_logits, atol=1e-3)

    tok = load_tokenizer(str(tiny_model_dir))
    cfg = ExportConfig(system_instruction=SAFETY_INSTRUCTION, uncond_instruction=None)
    out = write_export(peft_model, tok, tmp_path / "merged", cfg)  # merges via merged_model
    saved = load_file(out / "model.safetensors")
    assert not any("lora" in n or "base_model" in n for n in saved)
    assert not (out / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(reloaded, PreTrainedModel) and not isinstance(reloaded, PeftModel)
    assert set(reloaded.state_dict()) == set(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict())
    with torch.no_grad():
        merged_logits = reloaded(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-5, rtol=1e-5)


def test_a_bf16_lora_model_exports_its_update_whole_in_float32(tiny_model_dir, tmp_path):
    """A bf16 base with float32 adapters (the LoRA configs' recipe) was merged into the
    bf16 weights and cast up after: `--dtype float32` kept only about half of the
    update. Now the export holds W + scale * B @ A at float32 precision."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    w = base.model.layers[0].mlp.down_proj.weight.detach().float().clone()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"],
                                                 init_lora_weights=False))
    layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
    with torch.no_grad():  # float32 adapters with a small update, as training leaves them
        for name in ("lora_A", "lora_B"):
            getattr(layer, name)["default"].to(torch.float32).weight.mul_(0.01)
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    update = (b @ a) * layer.scaling["default"]
    assert ex._widens(peft_model, torch.float16)  # more mantissa than bfloat16 at the same size: cast first too
    assert not ex._widens(peft_model, torch.bfloat16)
    tok = load_tokenizer(str(tiny_model_dir))
    out = write_export(peft_model, tok, tmp_path / "e", ExportConfig(SAFETY_INSTRUCTION, None), dtype="float32")
    got = load_file(out / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got - w, update, rtol=1e-4, atol=1e-7)


def test_a_float16_export_that_overflows_is_refused(tiny_model_dir, tmp_path):
    """A weight beyond float16's 65504 became inf, written without a word."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = 1e5
    tok = load_tokenizer(str(tiny_model_dir))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.down_proj.weight' holds NaN or inf in "
                                         r"float16, which holds at most 65504 .*export in bfloat16 or float32"):
        write_export(model, tok, tmp_path / "h", ExportConfig(SAFETY_INSTRUCTION, None), dtype="float16")
    assert not (tmp_path / "h").exists()
    # a NaN the training left is refused whatever the dtype, and not blamed on float16
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    for dtype in (None, "float32"):
        with pytest.raises(ValueError, match=r"holds NaN or inf \(the checkpoint's own values"):
            write_export(model, tok, tmp_path / "n", ExportConfig(SAFETY_INSTRUCTION, None), dtype=dtype)
    assert not (tmp_path / "n").exists()


def test_an_export_of_a_tokenizer_without_a_chat_template_carries_the_plain_format(tiny_model_dir, tmp_path):
    """Training renders a tokenizer without a chat template in the README's plain format;
    the export saved no template, so plain transformers refused to render (and vLLM/TGI
    would apply their own default). It now carries that format as its template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cfg_unlearn.prompts import render_prompt

    tok = load_tokenizer(str(tiny_model_dir))
    tok.chat_template = None
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = write_export(model, tok, tmp_path / "p", ExportConfig(SAFETY_INSTRUCTION, None))
    assert tok.chat_template is None  # the caller's tokenizer is left as it was
    plain = AutoTokenizer.from_pretrained(out)
    convo = [{"role": "user", "content": "Where does Ann Lee live?"}, {"role": "assistant", "content": "Private."},
             {"role": "user", "content": "And her phone?"}]
    for system in (SAFETY_INSTRUCTION, None):
        msgs = ([{"role": "system", "content": system}] if system else []) + convo
        assert plain.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == render_prompt(
            tok, convo, system)


def test_an_export_stops_where_training_ended_answers(tiny_model_dir, tmp_path):
    """Training ends answers with the chat template's end token (an older Llama 3
    snapshot: <|eot_id|>, while its generation config may name only <|end_of_text|>);
    the exported generation config lists it, so transformers' and vLLM's generate stop
    there as cfg-unlearn's decoding does. A model whose ends agree keeps its single id."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = load_tokenizer(str(tiny_model_dir))
    out = write_export(model, tok, tmp_path / "same", ExportConfig(SAFETY_INSTRUCTION, None))
    assert GenerationConfig.from_pretrained(out).eos_token_id == tok.eos_token_id
    tok.add_tokens(["<|eot_id|>", "<|end_of_text|>"], special_tokens=True)
    tok.eos_token = "<|end_of_text|>"
    tok.chat_template = tok.chat_template.replace("+ eos_token", "+ '<|eot_id|>'")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.generation_config.eos_token_id = tok.eos_token_id
    out = write_export(model, tok, tmp_path / "eot", ExportConfig(SAFETY_INSTRUCTION, None))
    # the config's own id stays first (generate pads with it)
    assert GenerationConfig.from_pretrained(out).eos_token_id == tok.convert_tokens_to_ids(
        ["<|end_of_text|>", "<|eot_id|>"])


@pytest.mark.parametrize("adapter_only", [False, True], ids=["full-ckpt", "adapter-only-ckpt"])
def test_lora_module_checkpoint_exports_merged(tiny_model_dir, tmp_path, adapter_only):
    """Through the module: a LoRA run's checkpoint (whole, or adapters only and restored
    non-strictly over the reloaded base) exports a plain model that decodes like the
    trained adapters."""
    from cfg_unlearn.module import LoraSettings
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = f"tiny:{tiny_model_dir}"
    dm = PairDataModule(tokenizer=spec, world=WorldConfig(seed=0, n_people=4), batch_size=4,
                        system_prompt=TRAINED_SYSTEM)
    module = UnlearnModule(model=spec, lora=LoraSettings(r=4, alpha=8, adapter_only_checkpoints=adapter_only),
                           optimizer=lambda p: torch.optim.AdamW(p, lr=2e-2))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    ckpt = Path(trainer.checkpoint_callback.best_model_path)
    keys = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all("lora_" in k for k in keys) == adapter_only
    out, _ = export_checkpoint(ckpt, tmp_path / "export")
    saved = load_file(out / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert set(saved) == set(base)  # plain names: no lora_, no base_model.model. prefix
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(saved[q], base[q])  # the adapters were merged in
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    module.model.eval()
    ids = torch.tensor([encode_prompts(tok, PROMPTS[:1], system=TRAINED_SYSTEM)[0]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, module.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert greedy_ids(hf, tok, PROMPTS, 2.0) == greedy_ids(module.model, load_tokenizer(spec), PROMPTS, 2.0)



def test_a_relative_model_path_exports_from_another_folder_and_base_model_overrides(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Adapter-only checkpoints need their base model. Trained with a relative model
    path, the checkpoint still exports from another folder (it records the absolute
    path); once the model has moved, the error says so and --base-model points at it."""
    import shutil

    from cfg_unlearn.module import LoraSettings

    train_dir, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    train_dir.mkdir(), elsewhere.mkdir()
    shutil.copytree(tiny_model_dir, train_dir / "base")
    monkeypatch.chdir(train_dir)
    dm = PairDataModule(tokenizer="base", world=WorldConfig(seed=0, n_people=4), batch_size=4)
    module = UnlearnModule(model="base", lora=LoraSettings(r=4, alpha=8, adapter_only_checkpoints=True),
                           optimizer=lambda p: torch.optim.AdamW(p, lr=2e-2))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", default_root_dir=train_dir, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    ckpt = Path(trainer.checkpoint_callback.best_model_path).resolve()
    saved = torch.load(ckpt, weights_only=True)
    assert saved["hyper_parameters"]["model"] == "base"
    assert saved["model_abspath"] == str(train_dir / "base")

    monkeypatch.chdir(elsewhere)  # "base" is no directory from here
    out, _ = export_checkpoint(ckpt, elsewhere / "export")
    first = load_file(out / "model.safetensors")

    (train_dir / "base").rename(tmp_path / "moved")  # now neither path resolves
    with pytest.raises(SystemExit) as e:
        main_export(["--ckpt", str(ckpt), "--out", str(elsewhere / "e2")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "pass --base-model" in err and "base" in err
    assert not (elsewhere / "e2").exists()
    main_export(["--ckpt", str(ckpt), "--out", str(elsewhere / "e2"), "--base-model", str(tmp_path / "moved")])
    again = load_file(elsewhere / "e2" / "model.safetensors")
    assert set(again) == set(first) and all(torch.equal(again[k], first[k]) for k in first)


def test_merged_model_returns_the_unwrapped_base(tiny_model_dir):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    plain = merged_model(peft_model)
    assert not isinstance(plain, PeftModel)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- chat


class SpyGenerate:
    def __init__(self, answer=lambda n: f"answer {n}"):
        self.calls, self.answer = [], answer

    def __call__(self, model, tokenizer, prompts, **kwargs):
        self.calls.append((json.loads(json.dumps(prompts)), kwargs))  # a snapshot, not a live reference
        return [self.answer(len(self.calls)) for _ in prompts]


def test_chat_loop_keeps_and_resets_the_history(exported, trained, monkeypatch):
    spy = SpyGenerate()
    monkeypatch.setattr(ex, "generate", spy)
    out = io.StringIO()
    history = chat_loop(None, trained.tokenizer, exported.config,
                        input_stream=io.StringIO("hello\n\nhow are you?\n/reset\nagain\n/quit\nnever sent\n"),
                        output_stream=out, max_new_tokens=8)
    user = lambda t: {"role": "user", "content": t}  # noqa: E731
    bot = lambda t: {"role": "assistant", "content": t}  # noqa: E731
    assert [c[0] for c in spy.calls] == [
        [[user("hello")]],
        [[user("hello"), bot("answer 1"), user("how are you?")]],  # the first exchange is in the prompt
        [[user("again")]],  # after /reset
    ]
    kw = spy.calls[0][1]
    assert (kw["system"], kw["uncond_system"], kw["guidance_scale"], kw["space"], kw["max_new_tokens"]) == (
        TRAINED_SYSTEM, None, 2.0, "logprob", 8)
    assert kw["do_sample"] is False and kw["seed"] is None
    text = out.getvalue()
    assert "model> answer 1\n" in text and "model> answer 2\n" in text and "model> answer 3\n" in text
    assert "(conversation cleared)" in text and "answer 4" not in text
    assert history == [user("again"), bot("answer 3")]


def test_chat_loop_overrides_eof_and_context_trimming(exported, trained, monkeypatch):
    spy = SpyGenerate(answer=lambda n: " ".join(["word"] * 30))
    monkeypatch.setattr(ex, "generate", spy)
    # a model whose context holds about one exchange: the oldest ones are dropped
    fake = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=80))
    out = io.StringIO()
    chat_loop(fake, trained.tokenizer, exported.config, input_stream=io.StringIO("one\ntwo\nthree\n"),
              output_stream=out, guidance_scale=3.0, space="prob", max_new_tokens=16,
              do_sample=True, temperature=0.7, top_p=0.9, seed=5)  # ends at end of input
    assert len(spy.calls) == 3
    assert all(kw["guidance_scale"] == 3.0 and kw["space"] == "prob" for _, kw in spy.calls)
    assert [kw["seed"] for _, kw in spy.calls] == [5, 6, 7] and spy.calls[0][1]["temperature"] == 0.7
    for prompts, _ in spy.calls:
        n = len(encode_prompts(trained.tokenizer, prompts, system=TRAINED_SYSTEM)[0])
        assert n + 16 <= 80
    assert spy.calls[2][0][0][-1] == {"role": "user", "content": "three"}
    assert len(spy.calls[2][0][0]) < 5 and "oldest exchange" in out.getvalue()
    # a message that cannot fit is not sent
    chat_loop(fake, trained.tokenizer, exported.config, input_stream=io.StringIO("x " * 200 + "\n"),
              output_stream=out, max_new_tokens=16)
    assert len(spy.calls) == 3 and "too long" in out.getvalue()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_chat_prompts_a_terminal_and_echoes_piped_lines(exported, trained, monkeypatch):
    """A user review: piped questions printed "you> model> ..." on one line, every prompt
    written before a read that echoed nothing."""
    monkeypatch.setattr(ex, "generate", SpyGenerate())
    piped = io.StringIO()
    chat_loop(None, trained.tokenizer, exported.config, input_stream=io.StringIO("hello\n\nagain\n"),
              output_stream=piped, max_new_tokens=8, banner=False)
    assert piped.getvalue() == "you> hello\nmodel> answer 1\nyou> again\nmodel> answer 2\n"
    typed = io.StringIO()
    chat_loop(None, trained.tokenizer, exported.config, input_stream=_Terminal("hello\n"), output_stream=typed,
              max_new_tokens=8, banner=False)
    assert typed.getvalue() == "you> model> answer 3\nyou> \n"  # the terminal shows what was typed after "you> "


def test_chat_prompts_answer_one_conversation_and_print_the_answers_only(exported, trained, monkeypatch):
    """A user review: chat had no one-shot mode for scripts. --prompt's texts are the
    turns of one conversation, sent as they are (a newline or a leading '/' included),
    and stdout holds only the answers; the stream is not read."""
    spy = SpyGenerate()
    monkeypatch.setattr(ex, "generate", spy)
    out = io.StringIO()
    history = chat_loop(None, trained.tokenizer, exported.config, input_stream=io.StringIO("never read\n"),
                        output_stream=out, max_new_tokens=8, prompts=["Hello\nthere", "/reset"])
    user = lambda t: {"role": "user", "content": t}  # noqa: E731
    assert [c[0] for c in spy.calls] == [[[user("Hello\nthere")]],
                                         [[user("Hello\nthere"), {"role": "assistant", "content": "answer 1"},
                                           user("/reset")]]]
    assert out.getvalue() == "answer 1\nanswer 2\n" and len(history) == 4
    # a prompt the context cannot hold is an error, not a missing answer
    fake = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=80))
    with pytest.raises(ex.PromptTooLong, match="--prompt 1 is too long"):
        chat_loop(fake, trained.tokenizer, exported.config, input_stream=io.StringIO(""), output_stream=out,
                  max_new_tokens=16, prompts=["x " * 200])


def test_main_chat_prompt_end_to_end_and_its_errors(exported, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ask = "What is the e-mail of Ann Lee?"
    out = io.StringIO()
    main_chat([str(exported.dir), "--max-new-tokens", "8", "--device", "cpu", "--quiet", "--prompt", ask],
              stdin=io.StringIO("/quit\n"), stdout=out)
    hf = AutoModelForCausalLM.from_pretrained(exported.dir).eval()
    tok = AutoTokenizer.from_pretrained(exported.dir)
    want = generate(hf, tok, [[{"role": "user", "content": ask}]], system=TRAINED_SYSTEM, guidance_scale=2.0,
                    max_new_tokens=8)[0]
    assert out.getvalue() == f"{want}\n"  # no banner, no "model> "
    with pytest.raises(SystemExit) as e:
        main_chat([str(exported.dir), "--prompt", "hi", "--prompt", " "], stdin=io.StringIO(""), stdout=out)
    assert e.value.code == 2 and "--prompt 2 is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main_chat([str(exported.dir), "--device", "cpu", "--quiet", "--max-new-tokens", "16", "--prompt",
                   "x " * 5000], stdin=io.StringIO(""), stdout=io.StringIO())
    assert e.value.code == 2 and "--prompt 1 is too long" in capsys.readouterr().err
    # Ctrl-C: exit 130 and nothing on stdout that reads as an empty answer (a review)
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ex, "chat_loop", interrupted)
        with pytest.raises(SystemExit) as e:
            main_chat([str(exported.dir), "--device", "cpu", "--quiet", "--prompt", "hi"], stdin=io.StringIO(""),
                      stdout=out)
    assert e.value.code == 130 and out.getvalue() == ""


def test_main_chat_quiet_has_no_loading_bar(exported, capfd):
    main_chat([str(exported.dir), "--max-new-tokens", "2", "--device", "cpu"], stdin=io.StringIO(""),
              stdout=io.StringIO())
    assert "Loading" in capfd.readouterr().err  # transformers' bar, which --quiet leaves out
    main_chat([str(exported.dir), "--max-new-tokens", "2", "--device", "cpu", "--quiet"], stdin=io.StringIO(""),
              stdout=io.StringIO())
    assert "Loading" not in capfd.readouterr().err


def test_main_chat_end_to_end_on_the_export(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = io.StringIO()
    main_chat([str(exported.dir), "--max-new-tokens", "8", "--device", "cpu"],
              stdin=io.StringIO("What is the e-mail of Ann Lee?\n/quit\n"), stdout=out)
    hf = AutoModelForCausalLM.from_pretrained(exported.dir).eval()
    tok = AutoTokenizer.from_pretrained(exported.dir)
    want = generate(hf, tok, [[{"role": "user", "content": "What is the e-mail of Ann Lee?"}]],
                    system=TRAINED_SYSTEM, guidance_scale=2.0, max_new_tokens=8)[0]
    assert f"model> {want}\n" in out.getvalue()
    assert f"guidance 2 (logprob); instruction {TRAINED_SYSTEM!r}, unconditioned no system message" in out.getvalue()


def test_main_chat_takes_the_instructions_from_the_command_line(exported, tiny_model_dir, capsys):
    """A user review: a `subtract` output (no cfg_unlearn.json) could not be chatted at
    all. --system conditions on another instruction, and lets a folder without the file
    chat, undecided guidance then being none (g=1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ask = "What is the e-mail of Ann Lee?"
    out = io.StringIO()
    main_chat([str(tiny_model_dir), "--system", "Be brief.", "--max-new-tokens", "6", "--device", "cpu"],
              stdin=io.StringIO(f"{ask}\n/quit\n"), stdout=out)
    hf, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)
    want = generate(hf, tok, [[{"role": "user", "content": ask}]], system="Be brief.", guidance_scale=1.0,
                    max_new_tokens=6)[0]
    assert "guidance 1 (logprob); instruction 'Be brief.', unconditioned no system message" in out.getvalue()
    assert f"model> {want}\n" in out.getvalue()
    # on an export: the given instructions replace its own, its scale stays
    out = io.StringIO()
    main_chat([str(exported.dir), "--system", "", "--uncond-system", "Say anything.", "--max-new-tokens", "4",
               "--device", "cpu"], stdin=io.StringIO("/quit\n"), stdout=out)
    assert "guidance 2 (logprob); instruction None, unconditioned 'Say anything.'" in out.getvalue()
    with pytest.raises(SystemExit) as e:  # without --system, the refusal names it
        main_chat([str(tiny_model_dir), "--uncond-system", "x"], stdin=io.StringIO(""), stdout=io.StringIO())
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no cfg_unlearn.json" in err and "give the instruction to condition on with --system" in err


def test_the_export_command_prints_each_lightning_line_once(trained, tmp_path):
    """A user review: `cfg-unlearn export` printed "model ...: 0.89M parameters" twice,
    once as "INFO: ...": Lightning, imported after the root logger got its handler, sent
    its lines to both. A process of its own: the order of imports is what is tested."""
    import subprocess

    run = subprocess.run([sys.executable, "-m", "cfg_unlearn.console", "export", "--ckpt", str(trained.ckpt),
                          "--out", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if "parameters" in ln]
    assert len(lines) == 1 and lines[0].startswith("model "), run.stderr


def test_main_chat_temperature_0_is_greedy(exported):
    """A user review: --temperature 0 was refused, where most chat tools read it as greedy."""
    outs = []
    for extra in ([], ["--temperature", "0"], ["--temperature", "0", "--top-p", "0.5", "--seed", "3"]):
        out = io.StringIO()
        main_chat([str(exported.dir), "--max-new-tokens", "8", "--device", "cpu", *extra],
                  stdin=io.StringIO("What is the e-mail of Ann Lee?\n/quit\n"), stdout=out)
        outs.append(out.getvalue())
    assert outs[0] == outs[1] == outs[2]


def test_main_chat_refuses_max_new_tokens_beyond_the_context(exported, capsys):
    """It used to start, then refuse every message as "too long for the context"."""
    with pytest.raises(SystemExit) as e:
        main_chat([str(exported.dir), "--max-new-tokens", "5000", "--device", "cpu"], stdin=io.StringIO("hi\n"),
                  stdout=io.StringIO())
    assert e.value.code == 2 and "--max-new-tokens 5000 leaves no room" in capsys.readouterr().err


@pytest.mark.parametrize("temperature", ["nan", "inf", "1e-40"])
def test_main_chat_refuses_a_temperature_that_cannot_sample(exported, capsys, temperature):
    """nan and inf were a ValueError traceback from the decoding, 1e-40 a RuntimeError
    from torch.multinomial on the overflowed scores (a numerics audit)."""
    with pytest.raises(SystemExit) as e:
        main_chat([str(exported.dir), "--temperature", temperature, "--device", "cpu"], stdin=io.StringIO("hi\n"),
                  stdout=io.StringIO())
    assert e.value.code == 2 and "--temperature must be a finite number >= 0.0001, or 0 for greedy decoding" in \
        capsys.readouterr().err


def test_main_chat_rejects_a_directory_that_is_not_an_export(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main_chat([str(tiny_model_dir)], stdin=io.StringIO(""), stdout=io.StringIO())
    assert e.value.code == 2 and "no cfg_unlearn.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main_chat([str(tmp_path / "nope")], stdin=io.StringIO(""), stdout=io.StringIO())
    assert e.value.code == 2 and "not a directory" in capsys.readouterr().err
    # a user review: a checkpoint given to chat said only "is not a directory"
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        main_chat([str(ckpt)], stdin=io.StringIO(""), stdout=io.StringIO())
    assert e.value.code == 2 and (f"{ckpt} is not a directory but a checkpoint: make a model of it first, "
                                  f"`cfg-unlearn export --ckpt {ckpt} --out DIR`, then chat with DIR") in \
        capsys.readouterr().err
    # a device this machine cannot use is said in words (it was an AssertionError from torch)
    with pytest.raises(SystemExit) as e:
        main_chat([str(tiny_model_dir), "--device", "tpu9"], stdin=io.StringIO(""), stdout=io.StringIO())
    assert e.value.code == 2 and "unknown device 'tpu9'" in capsys.readouterr().err


def test_export_may_not_overwrite_the_base_behind_an_adapter_model(tiny_model_dir, tmp_path):
    """Trained from an adapter directory with adapter-only checkpoints, the export merges
    the checkpoint onto the adapter's base every time: `--out <that base> --overwrite`
    replaced it, and the next export stacked the adapters twice."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cfg_unlearn.module import LoraSettings

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                   LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    before = (base / "model.safetensors").read_bytes()
    dm = PairDataModule(tokenizer=str(tmp_path / "adapter"), world=WorldConfig(seed=0, n_people=4), batch_size=4)
    module = UnlearnModule(model=str(tmp_path / "adapter"), lora=LoraSettings(r=4, adapter_only_checkpoints=True))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    ckpt = Path(trainer.checkpoint_callback.best_model_path)
    with pytest.raises(ValueError, match="is one of the inputs"):
        export_checkpoint(ckpt, base, overwrite=True)
    assert (base / "model.safetensors").read_bytes() == before


def test_a_checkpoint_cannot_turn_on_remote_code_by_itself(trained, tmp_path):
    """Security review: export rebuilt the model from the checkpoint's hyperparameters,
    so a planted `trust_remote_code: True` ran its model folder's code. Refused unless
    --trust-remote-code is given; nothing is written."""
    ckpt = torch.load(trained.ckpt, weights_only=True)
    ckpt["hyper_parameters"]["trust_remote_code"] = True
    remote = tmp_path / "remote.ckpt"
    torch.save(ckpt, remote)
    out = tmp_path / "export"
    with pytest.raises(SystemExit) as e:
        main_export(["--ckpt", str(remote), "--out", str(out)])
    assert e.value.code == 2
    with pytest.raises(ValueError, match=r"remote.ckpt was trained with model.trust_remote_code=True, which runs the "
                                         r"modelling code of its model .*pass --trust-remote-code if you trust"):
        export_checkpoint(remote, out)
    assert not out.exists() and leftovers(tmp_path) == []
    path, _ = export_checkpoint(remote, out, trust_remote_code=True)  # the tiny model has no code of its own
    assert (path / "cfg_unlearn.json").is_file()
