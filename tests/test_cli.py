"""The user interface: every shipped YAML parses and instantiates (without building or
downloading a model), and the tiny config trains end to end with a rising margin."""

import csv
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cfg_unlearn.cli import cli_main, train_main
from cfg_unlearn.console import console_main
from cfg_unlearn.data.datamodule import PairDataModule
from cfg_unlearn.data.schema import write_pairs
from cfg_unlearn.data.world import WorldConfig
from cfg_unlearn.module import UnlearnModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
PRESETS = {"wandb.yaml"}  # logger presets: stacked after a run config, not runnable alone


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    # LightningCLI warns when both args= and a (pytest) command line are present
    monkeypatch.setattr(sys, "argv", ["train.py"])


def test_there_are_configs():
    assert any(p.name == "tiny.yaml" for p in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_instantiates(config, tmp_path, cpu_args_unless_enough_gpus):
    base = ["--config", str(ROOT / "configs/tiny.yaml")] if config.name in PRESETS else []
    # a GPU config on a machine without enough GPUs: parsed as written, its trainer on one CPU
    cpu = cpu_args_unless_enough_gpus(config)
    cli = cli_main([*base, "--config", str(config), "--trainer.default_root_dir", str(tmp_path), *cpu], run=False)
    assert isinstance(cli.model, UnlearnModule)
    assert isinstance(cli.datamodule, PairDataModule)
    assert cli.model.model is None  # weights are loaded in configure_model, not at parse time
    assert cli.datamodule.tokenizer_name == cli.model.model_name  # linked: one model path


@pytest.mark.parametrize("objective", ["npo", "dpo", "ga", "sft"])
def test_objective_is_a_config_field(objective, tmp_path):
    cli = cli_main(["--config", str(ROOT / "configs/tiny.yaml"), "--trainer.default_root_dir", str(tmp_path),
                    "--model.objective", objective, "--model.reference", "precomputed"], run=False)
    assert cli.model.objective == objective and cli.model.reference == "precomputed"
    with pytest.raises(SystemExit):  # a typo is refused at parse time, not mid-run
        cli_main(["--config", str(ROOT / "configs/tiny.yaml"), "--model.objective", "nop"], run=False)


def test_stop_when_forgotten_is_a_trainer_callback_of_a_config(tmp_path):
    from cfg_unlearn.callbacks import StopWhenForgotten

    (tmp_path / "stop.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: cfg_unlearn.callbacks.StopWhenForgotten\n"
        "      init_args: {pairs_file: pairs.jsonl, threshold: 0.05, every_n_train_steps: 4}\n")
    cli = cli_main(["--config", str(ROOT / "configs/tiny.yaml"), "--config", str(tmp_path / "stop.yaml"),
                    "--trainer.default_root_dir", str(tmp_path)], run=False)
    stops = [c for c in cli.trainer.callbacks if isinstance(c, StopWhenForgotten)]
    assert [(c.pairs_file, c.threshold, c.every, c.max_new_tokens) for c in stops] == [("pairs.jsonl", 0.05, 4, 32)]
    with pytest.raises(ValueError, match=r"StopWhenForgotten: threshold must be in \[0, 1\], got 2.0"):
        cli_main(["--config", str(ROOT / "configs/tiny.yaml"), "--config", str(tmp_path / "stop.yaml"),
                  "--trainer.callbacks.init_args.threshold", "2"], run=False)


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--print_config"])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "cond_dropout: 0.3" in printed and "class_path: cfg_unlearn.schedules.WarmupCosine" in printed
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == printed  # the printed config is a complete, stable config


def test_console_script_rejects_unknown_command(capsys):
    with pytest.raises(SystemExit) as e:
        console_main(["frobnicate"])
    assert e.value.code == 2
    assert "unknown command 'frobnicate'\n" in capsys.readouterr().err
    for typed, meant in (("gen", "generate"), ("fitt", "fit"), ("sft", "saft")):  # a prefix, or a typo
        with pytest.raises(SystemExit) as e:
            console_main([typed])
        assert e.value.code == 2
        assert f"unknown command {typed!r}; did you mean {meant!r}?" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_console_script_version(flag, capsys):
    from cfg_unlearn import __version__

    with pytest.raises(SystemExit) as e:
        console_main([flag])
    assert e.value.code == 0 and capsys.readouterr().out == f"cfg-unlearn {__version__}\n"


def test_python_dash_m_runs_the_console_script():
    from cfg_unlearn import __version__

    run = subprocess.run([sys.executable, "-m", "cfg_unlearn", "--version"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert (run.returncode, run.stdout) == (0, f"cfg-unlearn {__version__}\n"), run.stderr
    run = subprocess.run([sys.executable, "-m", "cfg_unlearn", "frobnicate"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert run.returncode == 2 and "unknown command 'frobnicate'" in run.stderr


def test_ctrl_c_is_one_line_and_exit_130_in_every_command(monkeypatch, capsys):
    """CLI audit: Ctrl-C in generate or saft printed a KeyboardInterrupt traceback from
    inside the model's forward; a fit went through Lightning's graceful shutdown and
    exited 1, as a failed run does."""
    import cfg_unlearn.cli as cli
    import cfg_unlearn.console as console

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(console, "_generate", interrupted)
    with pytest.raises(SystemExit) as e:
        console_main(["generate", "--forget", "f.jsonl"])
    assert e.value.code == 130
    assert capsys.readouterr().err == "cfg-unlearn generate: interrupted (outputs are written whole or not at all)\n"

    def failed(args, prog=None):  # a run that failed exits 1 as before (the fit's Ctrl-C: below, beside SIGTERM)
        raise SystemExit(1)

    monkeypatch.setattr(cli, "cli_main", failed)
    with pytest.raises(SystemExit) as e:
        train_main(["validate"])
    assert e.value.code == 1


def test_console_script_usage(capsys):
    """No command is a usage error: exit 2 with the usage on stderr (it went to stdout);
    --help prints it to stdout and exits 0; `python -m cfg_unlearn.cli` is the same
    command (it did nothing)."""
    with pytest.raises(SystemExit) as e:
        console_main([])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and err.startswith("usage: cfg-unlearn {demo,") and "build-tiny " in err
    with pytest.raises(SystemExit) as e:
        console_main(["--help"])
    out, err = capsys.readouterr()
    assert e.value.code == 0 and err == "" and out.startswith("usage: cfg-unlearn") and "saft " in out
    import cfg_unlearn.cli

    # launchers that installs before console.py wrote import it from cli (review)
    assert cfg_unlearn.cli.console_main is console_main
    proc = subprocess.run([sys.executable, "-m", "cfg_unlearn.cli", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: cfg-unlearn")


@pytest.mark.parametrize("argv", [["fit", "--trainer.max_epochz=2"], ["validate", "--trainer.max_epochs=x"],
                                  ["generate", "--forget", "x.jsonl"], ["export", "--ckpt"], ["chat"]])
def test_a_usage_error_is_the_error_then_one_usage_line_naming_the_command(argv, capsys, monkeypatch):
    """A user review: a misspelt key printed 70 lines of jsonargparse's usage and a tip
    before the line that said what was wrong, and under `python -m cfg_unlearn` the tip
    read "run: __main__.py fit --help"; generate's argparse usage took a dozen lines."""
    monkeypatch.setattr(sys, "argv", ["__main__.py", *argv])
    with pytest.raises(SystemExit) as e:
        console_main(argv)
    prog = f"cfg-unlearn {argv[0]}"
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(lines) >= 2 and lines[0].startswith(f"{prog}: error: "), lines
    # a positional is shown (a review: "arguments are required: dir" did not say it is no --dir)
    shown = " DIR" if argv[0] == "chat" else ""
    assert lines[-1] == f"usage: {prog} [options]{shown}   ({prog} -h lists them)", lines
    assert not any("__main__" in line or line.startswith("tip:") for line in lines), lines


@pytest.mark.parametrize("flag", ["--seed=3", "--trainer.max_e=3"])
def test_fit_refuses_abbreviated_flags(flag, capsys):
    """CLI audit: `--seed 3` was taken as --seed_everything and `--trainer.max_e` as
    max_epochs; an abbreviation breaks as soon as a setting with its prefix is added."""
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), flag, "--print_config"])
    assert e.value.code == 2 and f"unrecognized arguments: {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["build-tiny", "--out", "o", "--vocab", "600"],
    ["generate", "--forget", "f.jsonl", "--model", "m", "--out", "o.jsonl", "--guid", "2"],
    ["demo", "--unlearn-e", "1"],
    ["export", "--ckpt", "c.ckpt", "--out", "o", "--guid", "2"],
    ["chat", "d", "--guid", "2"],
    ["subtract", "--base", "b", "--finetuned", "f", "--out", "o", "--alph", "0.5"],
    ["saft", "--model", "m", "--data", "d.jsonl", "--out", "o", "--remove-f", "0.1"],
], ids=lambda argv: argv[0])
def test_commands_refuse_abbreviated_flags(argv, capsys, tmp_path, monkeypatch):
    """As fit's: argparse took `--guid 2` for --guidance-scale 2, until another flag
    starting with --guid would make the same command line an error."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        console_main(argv)
    assert e.value.code == 2 and f"unrecognized arguments: {argv[-2]}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_fit_refuses_a_seed_numpy_cannot_take(seed, tmp_path, capsys):
    """Lightning checks the range only when it seeds: a traceback through the CLI."""
    with pytest.raises(SystemExit) as e:
        train_main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--seed_everything={seed}",
                    f"--trainer.default_root_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "train.py: error: seed_everything must be in 0 .. 4294967295" in err
    assert f"got {seed}" in err and list(tmp_path.iterdir()) == []


def test_a_lightning_setting_that_cannot_work_is_one_line(tmp_path, capsys):
    """tiny.yaml's LearningRateMonitor with `trainer.logger: false`: Lightning raises its
    MisconfigurationException from inside the fit loop, which was a traceback (review)."""
    with pytest.raises(SystemExit) as e:
        train_main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--trainer.logger=false",
                    "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}", "--eval=null"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "train.py: error: Cannot use `LearningRateMonitor` callback with `Trainer` that has no logger.")


def test_help_and_version_do_not_import_lightning():
    """The console script lived in cli.py, which imports Lightning: --version, a mistyped
    command and every --help took about 6 s on a laptop CPU (now well under 2 s)."""
    code = textwrap.dedent("""
        import contextlib, io, sys
        from cfg_unlearn.console import console_main
        for argv in (["--version"], ["--help"], ["frobnicate"], *([c, "--help"] for c in (
                "demo", "generate", "build-tiny", "export", "chat", "subtract", "saft"))):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    console_main(argv)
                except SystemExit as e:
                    assert e.code in (0, 2), (argv, e.code)
        print(sorted(m for m in sys.modules if m == "lightning" or m.startswith(("lightning.", "pytorch_lightning"))))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["test", "predict"])
def test_trainer_subcommands_without_steps_are_refused_up_front(command, capsys):
    """The module has no test or predict step: argparse refuses those commands and names the
    two there are, before any model is built (Lightning would fail after loading it)."""
    with pytest.raises(SystemExit) as exc:
        cli_main([command, "--config", str(ROOT / "configs" / "tiny.yaml")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"invalid choice: '{command}'" in err and "'fit', 'validate'" in err



def test_ckpt_path_names_the_model_arguments_it_replaces(tmp_path, monkeypatch):
    """LightningCLI rebuilds the model from the checkpoint's hyperparameters, dropping
    `--model.*` values given with `--ckpt_path`: each one that differs from the
    checkpoint's is named in a warning, a value equal to the default included (it was
    silent: `--model.beta 0.1` against a checkpoint trained at 1.0)."""
    from cfg_unlearn.cli import UnlearnCLI

    ckpt = tmp_path / "c.ckpt"
    torch.save({"hyper_parameters": {"model": "tiny:unused", "beta": 1.0, "cond_dropout": 0.0, "cond_seed": 3},
                "state_dict": {}}, ckpt)
    monkeypatch.setattr(UnlearnCLI, "_run_subcommand", lambda self, sub: None)  # parse and build only
    base = ["validate", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    with pytest.warns(UserWarning, match="--ckpt_path") as got:
        cli = cli_main([*base, "--model.beta=5", "--model.cond_dropout=0.2", "--model.cond_seed=3",
                        f"--ckpt_path={ckpt}"])
    (msg,) = [str(w.message) for w in got if "--ckpt_path" in str(w.message)]
    assert "model.beta=5.0 (checkpoint: 1.0)" in msg and "model.cond_dropout=0.2 (checkpoint: 0.0)" in msg
    assert "seed" not in msg  # set, but to the checkpoint's own value
    assert (cli.model.beta, cli.model.cond_dropout) == (1.0, 0.0)  # Lightning's rule is kept
    with pytest.warns(UserWarning, match="--ckpt_path") as got:
        cli_main([*base, "--model.beta=0.1", f"--ckpt_path={ckpt}"])  # 0.1: the default, given on purpose
    (msg,) = [str(w.message) for w in got if "--ckpt_path" in str(w.message)]
    assert "model.beta=0.1 (checkpoint: 1.0)" in msg


def test_a_checkpoint_cannot_turn_on_remote_code_by_itself(tmp_path, monkeypatch):
    """Security review: LightningCLI rebuilds the model from the checkpoint's
    hyperparameters, so a planted checkpoint with `trust_remote_code: True` and a model
    folder holding an `auto_map` ran that folder's code under `validate --ckpt_path`
    (with a warning only). It is refused unless the command line turns it on itself."""
    from cfg_unlearn.cli import UnlearnCLI
    from cfg_unlearn.utils import ConfigError

    ckpt = tmp_path / "c.ckpt"
    torch.save({"hyper_parameters": {"model": "tiny:unused", "trust_remote_code": True}, "state_dict": {}}, ckpt)
    monkeypatch.setattr(UnlearnCLI, "_run_subcommand", lambda self, sub: None)  # parse and build only
    base = ["validate", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.default_root_dir", str(tmp_path),
            f"--ckpt_path={ckpt}"]
    with pytest.raises(ConfigError, match=r"c.ckpt: the checkpoint was trained with model.trust_remote_code=True, "
                                          r"which runs the modelling code of its model 'tiny:unused'; .*add "
                                          r"--model.trust_remote_code true if you trust that code"):
        cli_main(base)
    cli = cli_main([*base, "--model.trust_remote_code=true"])
    assert cli.model.hparams.trust_remote_code is True


def test_a_fit_resumed_on_other_data_says_so(tmp_path, monkeypatch):
    """Another world seed (the same pair ids), file or max_length on resume continued
    ORPO silently, on the epoch position and dropout draws of other pairs."""
    import warnings

    from cfg_unlearn.cli import UnlearnCLI

    world = {"seed": 0, "n_people": 50, "turns_per_conversation": 2, "n_sums": 40, "locale": "en_US"}
    ckpt = tmp_path / "c.ckpt"
    torch.save({"hyper_parameters": {"model": "tiny:unused"}, "state_dict": {},
                "datamodule_hyper_parameters": {"train_file": None, "val_file": None, "world": world,
                                                "max_length": 256, "nll_span": "response", "val_fraction": 0.1,
                                                "seed": 0, "batch_size": 8, "tokenizer": None,
                                                "system_prompt": "Avoid using any personal data in the answers!"}},
               ckpt)
    monkeypatch.setattr(UnlearnCLI, "_run_subcommand", lambda self, sub: None)  # parse and build only
    base = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.default_root_dir", str(tmp_path),
            f"--ckpt_path={ckpt}"]
    with pytest.warns(UserWarning, match="resumes on other data") as got:
        cli_main([*base, "--data.world.seed=1", "--data.max_length=128"])
    (msg,) = [str(w.message) for w in got if "other data" in str(w.message)]
    assert "data.world.seed=1 (checkpoint: 0)" in msg and "data.max_length=128 (checkpoint: 256)" in msg
    assert "n_people" not in msg and "batch_size" not in msg
    with warnings.catch_warnings(record=True) as quiet:  # the checkpoint's own data: nothing to say
        warnings.simplefilter("always")
        cli_main(base)
    assert not [w for w in quiet if "other data" in str(w.message)]


def test_ckpt_path_names_a_lora_group_and_instructions_that_differ(tmp_path, monkeypatch):
    """`--model.lora null` against a LoRA checkpoint was silent (the flattened config had
    `lora: None` before and `lora.r`, `lora.alpha`, ... after), and so was a configured
    `data.system_prompt` other than the one the checkpoint trained with: validate scored
    the model under an instruction it never saw (export reads the checkpoint's)."""
    from cfg_unlearn.cli import UnlearnCLI

    ckpt = tmp_path / "c.ckpt"
    torch.save({"hyper_parameters": {"model": "tiny:unused", "lora": {"r": 4, "alpha": 8}},
                "datamodule_hyper_parameters": {"system_prompt": "Never reveal private data.",
                                                "uncond_system_prompt": None},
                "state_dict": {}}, ckpt)
    monkeypatch.setattr(UnlearnCLI, "_run_subcommand", lambda self, sub: None)  # parse and build only
    base = ["validate", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.default_root_dir", str(tmp_path),
            f"--ckpt_path={ckpt}"]
    with pytest.warns(UserWarning, match="--ckpt_path") as got:
        cli = cli_main([*base, "--model.lora=null"])
    msgs = " | ".join(str(w.message) for w in got if "--ckpt_path" in str(w.message))
    assert "model.lora=None (checkpoint: {'r': 4, 'alpha': 8" in msgs
    assert "data.system_prompt='Never reveal private data.' (configured: 'Avoid using any personal data" in msgs
    assert "data.uncond_system_prompt=" not in msgs  # the same on both sides
    assert cli.model.lora is not None and cli.model.lora.r == 4  # Lightning's rule is kept
    import warnings

    with warnings.catch_warnings(record=True) as quiet:  # the checkpoint's own instruction: nothing to say
        warnings.simplefilter("always")
        cli_main([*base, "--data.system_prompt=Never reveal private data."])
    assert not [w for w in quiet if "trained with" in str(w.message)]



def test_resumed_fit_names_optimizer_and_schedule_arguments_the_checkpoint_overrides(tmp_path, monkeypatch):
    """A resumed fit restores the optimizer's param groups and the schedule's state, so a
    new --model.optimizer/lr_scheduler value took no effect without a word (the run's
    config.yaml even recorded it). Values equal to the checkpoint's are not named."""
    from cfg_unlearn.cli import UnlearnCLI

    ckpt = tmp_path / "c.ckpt"
    torch.save({"hyper_parameters": {"model": "tiny:unused"}, "state_dict": {},
                "optimizer_states": [{"state": {}, "param_groups": [
                    {"lr": 0.0004, "initial_lr": 0.001, "weight_decay": 0.0, "betas": (0.9, 0.999), "params": [0]}]}],
                "lr_schedulers": [{"warmup_steps": 10, "min_ratio": 0.1, "total_steps": 50, "last_epoch": 7}]}, ckpt)
    monkeypatch.setattr(UnlearnCLI, "_run_subcommand", lambda self, sub: None)  # parse and build only
    base = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.default_root_dir", str(tmp_path),
            f"--ckpt_path={ckpt}"]
    with pytest.warns(UserWarning, match="restores the optimizer") as got:
        cli = cli_main([*base, "--model.optimizer.init_args.lr=0.01", "--model.lr_scheduler.init_args.warmup_steps=0",
                        "--model.optimizer.init_args.betas=[0.9, 0.999]"])
    (msg,) = [str(w.message) for w in got if "restores the optimizer" in str(w.message)]
    assert "model.optimizer.init_args.lr=0.01 (checkpoint: 0.001)" in msg
    assert "model.lr_scheduler.init_args.warmup_steps=0 (checkpoint: 10)" in msg
    assert msg.endswith("take no effect; the run's config.yaml records the checkpoint's values")
    # what the run's config.yaml is written from: the values it trains with (it recorded the typed ones)
    model = cli.config["fit"]["model"]
    assert model.optimizer.init_args.lr == 0.001 and model.lr_scheduler.init_args.warmup_steps == 10
    assert "lr: 0.001" in cli.parser.dump(cli.config, skip_unset=False)
    # without a schedule the restored param group trains at its own lr, not the schedule's base
    with pytest.warns(UserWarning, match="restores the optimizer") as got:
        cli = cli_main([*base, "--model.optimizer.init_args.lr=0.01", "--model.lr_scheduler=null"])
    (msg,) = [str(w.message) for w in got if "restores the optimizer" in str(w.message)]
    assert "model.optimizer.init_args.lr=0.01 (checkpoint: 0.0004)" in msg
    assert cli.config["fit"]["model"].optimizer.init_args.lr == 0.0004
    assert "betas" not in msg and "weight_decay" not in msg and "min_ratio" not in msg and "total_steps" not in msg
    import warnings

    with warnings.catch_warnings(record=True) as quiet:  # the config's own values: nothing to say
        warnings.simplefilter("always")
        cli_main(base)
    assert not [w for w in quiet if "restores the optimizer" in str(w.message)]


@pytest.mark.parametrize("args,message", [
    (["--data.batch_size=0"], "batch_size must be >= 1, got 0"),  # was 79 lines from torch's sampler
    (["--model.cond_dropout=1.5"], "cond_dropout must be in [0, 1], got 1.5"),
    (["--data.world.n_people=0"], "world.n_people must be >= 1, got 0"),
    (["--data.world=null", "--data.train_file={pairs}"], "with your own pairs pass --eval.probes_file/--eval.qa_file, "
                                                          "or --eval null"),
    # GuidanceEval is an Optional[...] argument: jsonargparse buried its error in a
    # "Does not validate against any of the Union subtypes" traceback
    (["--eval.spaces=[foo]"], "spaces must be a non-empty subset of ('logprob', 'prob'), got ['foo']"),
    (["--eval.max_new_tokens=0"], "max_new_tokens must be >= 1, got 0"),
    # raised in configure_optimizers, inside Lightning's fit
    (["--model.lr_scheduler.init_args.min_ratio=2"], "lr_scheduler: warmup_steps must be >= 0 and min_ratio in "
                                                     "[0, 1], got 10 and 2.0"),
    # the Trainer's own refusals: Lightning's tracebacks until they were wrapped
    (["--trainer.devices=0"], "trainer: `Trainer(devices='0')` value is not a valid input using cpu accelerator"),
    (["--trainer.strategy=nonsense"], "trainer: You selected an invalid strategy name: `strategy='nonsense'`"),
    (["--trainer.strategy=fsdp"], "trainer: The strategy `fsdp` requires a GPU accelerator"),
    (["--model.attn_implementation=sdpaa"], "attn_implementation 'sdpaa' cannot load model"),  # at the model build
], ids=["batch-size", "cond-dropout", "no-people", "own-pairs-without-eval-sets", "eval-spaces", "eval-new-tokens",
        "schedule-ratio", "trainer-devices", "trainer-strategy", "trainer-fsdp-on-cpu", "attn-implementation"])
def test_settings_that_cannot_work_are_one_line_errors(tiny_model_dir, tmp_path, capsys, monkeypatch, args, message):
    """A value the module, data module or GuidanceEval refuses is `train.py: error: ...`
    with exit status 2 (it was a traceback), like a malformed pair row."""
    from cfg_unlearn.data.world import World

    monkeypatch.chdir(ROOT)
    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs, World(WorldConfig(n_people=2)).pairs())
    with pytest.raises(SystemExit) as e:
        train_main(["fit", "--config", "configs/tiny.yaml", *[a.format(pairs=pairs) for a in args],
                    f"--model.model=tiny:{tiny_model_dir}", f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.max_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("train.py: error: ") and message in err[-1], err[-3:]


def test_cfg_unlearn_fit_runs_without_lightnings_args_warning(tmp_path, monkeypatch, recwarn):
    """`cfg-unlearn fit ...` passed its command line to LightningCLI as `args` too, and
    Lightning warned "not recommended to provide both args and command line arguments"
    on every run."""
    from cfg_unlearn.cli import UnlearnCLI

    ran = []
    monkeypatch.setattr(UnlearnCLI, "_run_subcommand", lambda self, sub: ran.append(sub))  # parse and build only
    argv = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false"]
    monkeypatch.setattr(sys, "argv", ["cfg-unlearn", *argv])
    console_main()
    assert ran == ["fit"]
    assert not [w for w in recwarn if "args parameter" in str(w.message)], [str(w.message) for w in recwarn]


@pytest.mark.parametrize("flag", ["--config", "-c", "--config="])
def test_a_config_that_is_not_yaml_names_its_file_and_line(tmp_path, capsys, flag):
    """jsonargparse named a stacked config with a YAML syntax error `<unicode string>`,
    so the user could not tell which of their files was broken."""
    bad = tmp_path / "mine.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n  devices: [1\n")
    args = [f"--config={bad}"] if flag == "--config=" else [flag, str(bad)]
    with pytest.raises(SystemExit) as e:
        train_main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"train.py: error: --config {bad}:4:1: not valid YAML: "), err
    assert "(line 3, column 12)" in err and "<unicode string>" not in err


def _parse_error(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        train_main(args)
    assert e.value.code == 2
    # the error first, then one usage line (jsonargparse printed the usage of every setting,
    # some 70 lines, and a tip before it)
    message, _, usage = capsys.readouterr().err.rstrip("\n").rpartition("\n")
    assert message.startswith("train.py") and re.fullmatch(r"usage: (train\.py[ a-z]*) \[options\]   \(\1 -h lists them\)",
                                                            usage), usage
    return message.partition(": error: ")[2].strip()


@pytest.mark.parametrize("text,line", [("trainer:\n  max_steps: 3\n  max_epoch: 2\n", 3),
                                       ("trainer.max_epoch: 2\n", 1)], ids=["nested", "dotted"])
def test_a_misspelt_config_key_names_its_file_line_and_the_setting_meant(tmp_path, capsys, text, line):
    """jsonargparse said "Subcommand 'fit' does not accept option 'trainer.max_epoch'",
    naming neither the file nor the line among the user's stacked configs."""
    mine = tmp_path / "mine.yaml"
    mine.write_text(text)
    err = _parse_error(capsys, ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(mine)])
    assert err == (f"Subcommand 'fit' does not accept option 'trainer.max_epoch' "
                   f"(--config {mine}:{line}; did you mean 'trainer.max_epochs'?)"), err


def test_a_misspelt_key_of_a_config_given_before_the_subcommand_is_found_under_it(tmp_path, capsys):
    mine = tmp_path / "root.yaml"
    mine.write_text("fit:\n  model:\n    betaa: 2\n")
    err = _parse_error(capsys, ["--config", str(mine), "fit", "--config", str(ROOT / "configs/tiny.yaml")])
    assert err.endswith(f"'model.betaa' (--config {mine}:3; did you mean 'model.beta'?)"), err


def test_a_bad_config_value_names_the_file_that_set_it_not_the_command_line(tmp_path, capsys):
    """jsonargparse checks each config as it loads it: the file's "three" is refused even
    where the command line gives the key too, and a later file's good value is not it."""
    bad, good = tmp_path / "bad.yaml", tmp_path / "good.yaml"
    bad.write_text("trainer:\n  max_epochs: three\n")
    good.write_text("trainer:\n  max_epochs: 4\n")
    base = ["fit", "--config", str(ROOT / "configs/tiny.yaml")]
    for extra in ([], ["--config", str(good)], ["--trainer.max_epochs=5"]):
        err = _parse_error(capsys, [*base, "--config", str(bad), *extra])
        assert err.startswith('Parser key "trainer.max_epochs":'), err
        assert err.endswith(f"Given value: three\n  Set by --config {bad}:2"), err
    # the command line's own bad value: no file is blamed
    err = _parse_error(capsys, [*base, "--config", str(good), "--trainer.max_epochs", "x"])
    assert err.endswith("Given value: x"), err


def test_a_misspelt_class_argument_in_a_config_names_its_line_and_the_argument_meant(tmp_path, capsys):
    mine = tmp_path / "opt.yaml"
    mine.write_text("model:\n  optimizer:\n    class_path: torch.optim.AdamW\n    init_args:\n      lrr: 0.001\n")
    err = _parse_error(capsys, ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(mine)])
    assert err.startswith('Parser key "model.optimizer":') and "Option 'lrr' is not accepted" in err, err
    assert err.endswith(f"\n  Set by --config {mine}:5\n  Did you mean 'lr'?"), err


def test_a_misspelt_eval_argument_in_a_relative_config_names_its_file_and_the_argument_meant(
        tmp_path, capsys, monkeypatch):
    """A review: `eval: {probe_file: ...}` in a --config given by a relative path got
    neither hint. jsonargparse parses a config from inside its folder, where the relative
    path named nothing; and a Union's error spells the class `class_path '...'`."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text("trainer:\n  max_epochs: 1\neval:\n  probe_file: p.jsonl\n")
    monkeypatch.chdir(tmp_path)
    err = _parse_error(capsys, ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config", "sub/mine.yaml"])
    assert err.startswith('Parser key "eval":') and "Option 'probe_file' is not accepted" in err, err
    assert err.endswith("\n  Set by --config sub/mine.yaml:4\n  Did you mean 'probes_file'?"), err


@pytest.mark.parametrize("args,hint", [
    (["--model.optimizer.init_args.lrr", "0.1"], "\n  Did you mean 'lr'?"),
    (["--model.optimizer.init_args.lr", "abc"], "Given value: abc. Got value: Namespace(class_path='torch.optim.AdamW', "
                                                "init_args=Namespace(lr='abc'))"),
    # a Union's error names the class as "class_path '...'": its argument meant is named too
    (["--data.world.seeds", "1"], "Given value: NestedArg(key='seeds', val='1')\n  Did you mean 'seed'?"),
    # jsonargparse's appending form, and a --config of inline YAML: not tiny.yaml's doing
    (["--trainer.callbacks+=NoSuchCallback"], "Given value: NoSuchCallback"),
    (["--config", "{trainer: {max_epochs: x}}"], "Given value: x"),
], ids=["class-argument-typo", "class-argument-value", "nested-typo", "appended", "inline-yaml"])
def test_a_bad_nested_flag_is_a_usage_error_that_blames_no_file(capsys, args, hint):
    """A user review: `--model.lora.rank 8` (a nested flag, its value after a space)
    crashed the error's explanation with an IndexError, 80 lines of traceback and exit
    status 1; the config file that sets the same section is not what was refused."""
    err = _parse_error(capsys, ["fit", "--config", str(ROOT / "configs/tiny.yaml"), *args])
    assert err.endswith(hint) and "Set by" not in err, err


def test_every_config_file_that_sets_an_unknown_key_is_named_and_top_level_keys_are_meant_too(tmp_path, capsys):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("trainer:\n  max_epoch: 2\n")
    b.write_text("seed_everything: 1\ntrainer:\n  max_epoch: 3\n")
    err = _parse_error(capsys, ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(a), "--config", str(b)])
    assert err.endswith(f"(--config {a}:2, --config {b}:3; did you mean 'trainer.max_epochs'?)"), err
    b.write_text("seed_everythin: 1\n")
    err = _parse_error(capsys, ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config", str(b)])
    assert err.endswith(f"'seed_everythin' (--config {b}:1; did you mean 'seed_everything'?)"), err
    err = _parse_error(capsys, ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--ckpt_pth=x"])
    assert err == "unrecognized arguments: --ckpt_pth=x (did you mean --ckpt_path for --ckpt_pth?)", err


def test_a_misspelt_flag_gets_the_nearest_setting(capsys):
    err = _parse_error(capsys, ["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.max_epoch=3",
                                "--nothing_like_it=1"])
    assert err == ("unrecognized arguments: --trainer.max_epoch=3 --nothing_like_it=1 "
                   "(did you mean --trainer.max_epochs for --trainer.max_epoch?)"), err


def test_train_py_reports_a_bad_pair_row_in_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    """A malformed row is `file:line: field` on stderr with exit status 2, not a
    traceback through Lightning's loops; giving a file beside the config's world says
    to pass --data.world null."""
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi", "chosen": 5, "rejected": "b"}\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    run = subprocess.run([sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml", "--data.world", "null",
                          f"--data.train_file={bad}", f"--model.model=tiny:{tiny_model_dir}",
                          f"--trainer.logger.init_args.save_dir={tmp_path}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        f"train.py: error: {bad}:2: field 'chosen': expected a string or message list, got int")
    assert "Traceback" not in run.stderr
    with pytest.raises(ValueError, match="pass --data.world null beside --data.train_file"):
        PairDataModule(tokenizer="unused", train_file=str(bad), world=WorldConfig())

    # `cfg-unlearn fit` is the same command
    with pytest.raises(SystemExit) as e:
        console_main(["fit", "--config", "configs/tiny.yaml", "--data.world", "null", f"--data.train_file={bad}",
                      f"--model.model=tiny:{tiny_model_dir}", f"--trainer.default_root_dir={tmp_path}",
                      "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"cfg-unlearn fit: error: {bad}:2: field 'chosen': expected a string or message list, got int")


def test_a_run_directory_of_another_run_is_refused_unless_resuming(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A fit into a version directory that holds a run (`--trainer.logger.init_args.version
    0` given twice) replaced its config.yaml and last.ckpt without a word; it is one
    error now, and the old run is untouched. Resuming that run into its own directory
    (`--ckpt_path`) is allowed."""
    monkeypatch.chdir(ROOT)
    args = ["fit", "--config", "configs/tiny.yaml", f"--model.model=tiny:{tiny_model_dir}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.version=0",
            "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0", "--eval=null",
            "--data.world.n_people=2", "--trainer.log_every_n_steps=1"]
    train_main([*args, "--trainer.max_steps=1"])
    run_dir = tmp_path / "tiny" / "version_0"
    config, last, metrics = run_dir / "config.yaml", run_dir / "checkpoints" / "last.ckpt", run_dir / "metrics.csv"
    before = (config.read_bytes(), last.read_bytes(), metrics.read_bytes())
    with pytest.raises(SystemExit) as e:
        train_main([*args, "--trainer.max_steps=1", "--model.beta=0.5"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith(f"train.py: error: {run_dir} holds another run (config.yaml, "
                                                "checkpoints/last.ckpt)"), err
    # nothing of the old run replaced, its metrics.csv included (the CSVLogger deleted it
    # when it opened the directory, before the refusal)
    assert (config.read_bytes(), last.read_bytes(), metrics.read_bytes()) == before

    with pytest.raises(SystemExit):  # a validate cannot resume into it: no such advice
        train_main(["validate", *args[1:], f"--ckpt_path={last}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("(or let the logger choose one) or remove the directory"), err
    train_main([*args, "--trainer.max_steps=2", f"--ckpt_path={last}"])  # resuming it: allowed
    assert torch.load(last, weights_only=False)["global_step"] == 2
    # the rows logged before the resume are kept beside the new metrics.csv (they were deleted)
    assert (run_dir / "metrics.1.csv").read_bytes() == before[2]
    assert {r["step"] for r in csv.DictReader((run_dir / "metrics.1.csv").open())} == {"0"}
    assert {r["step"] for r in csv.DictReader(metrics.open())} == {"1"}  # the resumed step's rows only
    # another run's checkpoint resumed into this pinned folder: that folder's run would be
    # replaced (config.yaml, last.ckpt), so it is refused as any taken folder is
    other = [a for a in args if "version=" not in a] + ["--trainer.logger.init_args.version=1"]
    train_main([*other, "--trainer.max_steps=1"])
    before = (config.read_bytes(), last.read_bytes())
    with pytest.raises(SystemExit) as e:
        train_main([*args, "--trainer.max_steps=2",
                    f"--ckpt_path={tmp_path / 'tiny' / 'version_1' / 'checkpoints' / 'last.ckpt'}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith(f"train.py: error: {run_dir} holds another run"), err
    assert (config.read_bytes(), last.read_bytes()) == before


def test_a_failed_run_leaves_no_run_directory_and_a_missing_checkpoint_is_one_line(tiny_model_dir, tmp_path,
                                                                                      capsys, monkeypatch):
    """A run that failed in setup left its version directory (config.yaml only): the
    next run got the next version number, and a reused version name was refused as
    "another run". A --ckpt_path that does not exist was a traceback."""
    monkeypatch.chdir(ROOT)
    args = ["fit", "--config", "configs/tiny.yaml", f"--model.model=tiny:{tiny_model_dir}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false", "--eval=null",
            "--data.world.n_people=2", "--trainer.max_steps=1"]
    with pytest.raises(SystemExit):
        train_main([*args, "--data.max_length=10"])  # an answer longer than max_length: refused in setup
    # nor the logger's folder it created (it stayed, empty)
    assert not (tmp_path / "tiny").exists() and tmp_path.is_dir()
    train_main(args)
    assert (tmp_path / "tiny" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    capsys.readouterr()
    for sub in ("fit", "validate"):
        with pytest.raises(SystemExit) as e:
            train_main([sub, *args[1:], f"--ckpt_path={tmp_path / 'nope.ckpt'}"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and err == f"train.py: error: --ckpt_path {tmp_path / 'nope.ckpt'}: no such checkpoint"
    (tmp_path / "junk.ckpt").write_text("garbage\n")  # was a torch traceback advising weights_only=False
    for sub in ("fit", "validate"):
        with pytest.raises(SystemExit) as e:
            train_main([sub, *args[1:], f"--ckpt_path={tmp_path / 'junk.ckpt'}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1
        assert err[0].startswith(f"train.py: error: --ckpt_path {tmp_path / 'junk.ckpt'}: not a checkpoint torch can read")
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["version_0"]
    # "~" in --ckpt_path is the home folder (Lightning's fsspec loading expands it); a
    # resume without a CSV logger leaves a metrics.csv of the user's alone
    home = tmp_path / "home"
    home.mkdir()
    (home / "last.ckpt").write_bytes((tmp_path / "tiny" / "version_0" / "checkpoints" / "last.ckpt").read_bytes())
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    (work / "metrics.csv").write_text("name,score\n")
    train_main(["fit", *args[1:-1], "--trainer.max_steps=2", "--trainer.logger=false", "--trainer.callbacks=[]",
                f"--trainer.default_root_dir={work}", "--ckpt_path=~/last.ckpt"])
    assert (work / "metrics.csv").read_text() == "name,score\n" and not (work / "metrics.1.csv").exists()


def test_ckpt_path_last_names_the_last_checkpoint_of_another_version(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Every run gets a new version folder, and `--ckpt_path last` looks in that one
    only: a fit meant to resume trained from scratch, a validate scored the untrained
    model, each after a warning whose hint (save_last=True) was already set."""
    monkeypatch.chdir(ROOT)
    args = ["--config", "configs/tiny.yaml", f"--model.model=tiny:{tiny_model_dir}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false", "--eval=null",
            "--data.world.n_people=2", "--trainer.limit_val_batches=1"]
    with pytest.raises(SystemExit) as e:  # nothing anywhere: validate would score the untrained model
        train_main(["validate", *args, "--ckpt_path=last"])
    assert e.value.code == 2 and "--ckpt_path last: no last checkpoint for this run" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="no last checkpoint available"):  # a first fit starts fresh (set and forget)
        train_main(["fit", *args, "--trainer.max_steps=1", "--ckpt_path=last"])
    last = tmp_path / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 1
    for sub in ("fit", "validate"):
        with pytest.raises(SystemExit) as e:
            train_main([sub, *args, "--trainer.max_steps=2", "--ckpt_path=last"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and err == (
            f"train.py: error: --ckpt_path last: this run's folder {tmp_path / 'tiny' / 'version_1'} holds no last "
            f"checkpoint (each run gets a new version folder); the latest one is {last}: pass that path to "
            "--ckpt_path, or pin --trainer.logger.init_args.version to resume a run in its own folder"), err
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["version_0"]
    # pinned to its own folder, `last` resumes it
    train_main(["fit", *args, "--trainer.logger.init_args.version=0", "--trainer.max_steps=2", "--ckpt_path=last"])
    assert torch.load(last, weights_only=False)["global_step"] == 2
    # a user review: a pinned run stopped before its first checkpoint (its folder holds
    # its config.yaml and metrics only) was told to pin the version it had pinned, and
    # its rerun to resume with --ckpt_path; both now say it holds no checkpoint
    stopped = tmp_path / "tiny" / "version_18"
    stopped.mkdir()
    (stopped / "config.yaml").write_text("model: {}\n")
    (stopped / "metrics.csv").write_text("step\n")
    pinned = [*args, "--trainer.logger.init_args.version=18", "--trainer.max_steps=1"]
    with pytest.raises(SystemExit) as e:
        train_main(["fit", *pinned, "--ckpt_path=last"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err == (
        f"train.py: error: --ckpt_path last: {stopped} holds an earlier run but no checkpoint of it (it stopped "
        "before saving one): remove that folder to start the run anew, or pass a checkpoint's path to --ckpt_path "
        f"(the latest last checkpoint of another run: {last})"), err
    with pytest.raises(SystemExit) as e:  # validate: nothing to start anew
        train_main(["validate", *pinned[:-1], "--ckpt_path=last"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "(it stopped before saving one): pass a checkpoint's path" in err, err
    with pytest.raises(SystemExit) as e:
        train_main(["fit", *pinned])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.endswith("or remove the directory (it holds no checkpoint to resume: that run "
                                              "stopped before its first)"), err
    assert sorted(p.name for p in stopped.iterdir()) == ["config.yaml", "metrics.csv"]
    # a review: a finished run with save_last off keeps other checkpoints; "remove that
    # folder" would have deleted them
    (stopped / "checkpoints").mkdir()
    (stopped / "checkpoints" / "epoch=2-step=36.ckpt").write_bytes(last.read_bytes())
    with pytest.raises(SystemExit) as e:
        train_main(["fit", *pinned, "--ckpt_path=last"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err == (
        f"train.py: error: --ckpt_path last: {stopped} holds an earlier run's checkpoints but no last one: pass one "
        f"of them to --ckpt_path (the latest is {stopped / 'checkpoints' / 'epoch=2-step=36.ckpt'})"), err
    (stopped / "checkpoints" / "epoch=2-step=36.ckpt").unlink()
    (stopped / "checkpoints" / ".last.ckpt.0123.tmp").write_bytes(b"")  # a killed save's: nothing to resume
    with pytest.raises(SystemExit) as e:
        train_main(["fit", *pinned])
    assert "(it holds no checkpoint to resume" in capsys.readouterr().err
    # not counted as a last checkpoint: a link to a deleted file (it was a traceback), a
    # temp file of a killed save; and without a logger there are no version folders to search
    links = tmp_path / "links" / "tiny" / "version_0" / "checkpoints"
    links.mkdir(parents=True)
    (links / "last.ckpt").symlink_to(tmp_path / "deleted.ckpt")
    (links / ".last.ckpt.0123.tmp").write_bytes(b"")
    unlogged = [a for a in args if "save_dir" not in a]
    for extra in ([f"--trainer.logger.init_args.save_dir={tmp_path / 'links'}"],
                  ["--trainer.logger=false", f"--trainer.default_root_dir={tmp_path / 'tiny' / 'solo'}"]):
        with pytest.raises(SystemExit) as e:
            train_main(["validate", *unlogged, *extra, "--ckpt_path=last"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and "no last checkpoint for this run" in err and "version_0" not in err, err


def test_fast_dev_run_twice_in_one_folder_is_not_another_run(tiny_model_dir, tmp_path, monkeypatch):
    """fast_dev_run saves no config (LightningCLI skips it): the second one was refused
    as "another run". Nor does it write a checkpoint: Lightning 2.6's ModelCheckpoint
    wrote last.ckpt at the end of training anyway, into default_root_dir (the working
    directory unless given)."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(ROOT / "configs/tiny.yaml"), f"--model.model=tiny:{tiny_model_dir}", "--eval=null",
            "--trainer.fast_dev_run=1", "--data.world.n_people=2", "--trainer.enable_progress_bar=false"]
    train_main(args)
    train_main(args)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["{trainer: {max_epochs: 1, " + ", ".join(f"log_every_n_steps: {i}"
                                                                            for i in range(1, 30)) + "}}",
                                  "trainer:\n  logger:\n    init_args:\n      version: 2024-02-30\n"],
                         ids=["long-inline-yaml", "impossible-date"])
def test_configs_jsonargparse_reads_are_left_to_it(tmp_path, capsys, text):
    """The YAML check before parsing crashed on what jsonargparse accepts: inline YAML
    longer than a file name may be (OSError), a date-like value that is no date."""
    if "\n" in text:
        path = tmp_path / "date.yaml"
        path.write_text(text)
        text = str(path)
    with pytest.raises(SystemExit) as e:
        train_main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--config", text, "--print_config"])
    assert e.value.code == 0 and "trainer:" in capsys.readouterr().out


def test_tiny_fit_then_validate_end_to_end(tiny_model_dir, tmp_path):
    """`python train.py fit --config configs/tiny.yaml` (shortened to 2 epochs) raises the
    reward margin, and `validate --ckpt_path` scores the checkpoint it wrote. The
    conditioning draws' seed differs from the data module's seed (they once shared the
    name `seed`, and LightningCLI refused the run at its first hyperparameter log)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    common = ["--config", "configs/tiny.yaml", f"--model.model=tiny:{tiny_model_dir}",
              f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    fit = subprocess.run([sys.executable, "train.py", "fit", *common, "--trainer.max_epochs=2",
                          "--model.cond_seed=7", "--data.seed=0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run_dir = tmp_path / "tiny" / "version_0"
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    margins = [float(r["train/rewards/margins"]) for r in rows if r.get("train/rewards/margins")]
    assert len(margins) >= 5
    assert margins[-1] > margins[0] + 0.1, margins
    val = [float(r["val/rewards/margins"]) for r in rows if r.get("val/rewards/margins")]
    assert val and val[-1] > 0
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    validate = subprocess.run([sys.executable, "train.py", "validate", *common, f"--ckpt_path={ckpt}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert validate.returncode == 0, validate.stderr[-3000:]
    assert "val/rewards/margins" in validate.stdout
    # Lightning's own news stays; its advertisement for litlogger, printed by every run, does not
    for run in (fit, validate):
        assert "GPU available" in run.stdout + run.stderr and "litlogger" not in run.stdout + run.stderr
    # GuidanceEval scores the checkpoint per guidance scale, and its samples are redacted
    for key in ("eval@g=1.0/leak_rate", "eval@g=2.0/leak_rate", "eval@g=3.0/accuracy", "eval@g=2.0/pii_rate"):
        assert key in validate.stdout
    tables = sorted(run_dir.glob("eval_samples/*.csv"))
    assert len(tables) == 2  # one per validation epoch of the fit
    assert "[NAME]" in tables[-1].read_text()
    # validate runs at Lightning's step 0; its report and table name the checkpoint's step
    step = torch.load(ckpt, weights_only=False)["global_step"]
    assert step > 0 and f"GuidanceEval of the checkpoint at training step {step} (" in validate.stdout + validate.stderr
    assert [p.name for p in (tmp_path / "tiny" / "version_1" / "eval_samples").iterdir()] == [f"step_{step:07d}.csv"]


def test_console_build_tiny(tmp_path, capsys):
    out = tmp_path / "small"
    console_main(["build-tiny", "--out", str(out), "--vocab-size", "600", "--hidden-size", "32", "--layers", "1"])
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (32, 1, 600)
    with pytest.raises(SystemExit):  # refuses to overwrite
        console_main(["build-tiny", "--out", str(out)])
    capsys.readouterr()
    # shapes that cannot build (were tracebacks) or build nonsense (0 layers: exit 0)
    # (the messages name the flags, not TinySpec's fields: CLI audit)
    for args, match in ((["--hidden-size", "130"], "--hidden-size (130) must be a multiple of num_attention_heads (4)"),
                        (["--hidden-size", "-4"], "sizes must be >= 1, got --hidden-size=-4"),
                        (["--layers", "0"], "sizes must be >= 1, got --layers=0"),
                        (["--seed", str(2**64)], f"--seed must be in [{-(2**63)}, {2**64 - 1}]")):
        with pytest.raises(SystemExit) as e:
            console_main(["build-tiny", "--out", str(tmp_path / "bad"), *args])
        assert e.value.code == 2 and match in capsys.readouterr().err, args
    assert not (tmp_path / "bad").exists()
    # tiny_spec.json records the vocabulary as built (a requested 10 is 262: the byte alphabet)
    console_main(["build-tiny", "--out", str(tmp_path / "v10"), "--vocab-size", "10", "--hidden-size", "32",
                  "--layers", "1"])
    spec = json.loads((tmp_path / "v10" / "tiny_spec.json").read_text())
    assert spec["vocab_size"] == AutoConfig.from_pretrained(tmp_path / "v10").vocab_size > 10
    assert spec["requested_vocab_size"] == 10


def test_a_relative_model_path_of_a_checkpoint_is_found_from_another_folder(tiny_model_dir, tmp_path, monkeypatch):
    """Trained with `--model.model mymodel` (relative), the checkpoint replaced any given
    model path with "mymodel", which is no folder from elsewhere: "no such local
    directory". The absolute path it recorded at training is used now."""
    import shutil

    from cfg_unlearn.cli import UnlearnCLI

    shutil.copytree(tiny_model_dir, tmp_path / "train" / "mymodel")
    ckpt = tmp_path / "c.ckpt"
    torch.save({"hyper_parameters": {"model": "mymodel"}, "model_abspath": str(tmp_path / "train" / "mymodel"),
                "state_dict": {}}, ckpt)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setattr(UnlearnCLI, "_run_subcommand", lambda self, sub: None)  # parse and build only
    with pytest.warns(UserWarning, match="the checkpoint's model 'mymodel' is no directory from here"):
        cli = cli_main(["validate", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.default_root_dir",
                        str(tmp_path), f"--ckpt_path={ckpt}"])
    assert cli.model.model_name == str(tmp_path / "train" / "mymodel")
    assert cli.datamodule.tokenizer_name == str(tmp_path / "train" / "mymodel")


def test_a_checkpoint_directory_is_refused_unless_sharded_for_a_sharding_strategy(tmp_path):
    """A folder given as --ckpt_path was a traceback once the model had loaded."""
    from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

    from cfg_unlearn.cli import check_ckpt_path
    from cfg_unlearn.utils import ConfigError

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"is a directory, not a checkpoint \(give one of its checkpoints: "
                                          + re.escape(str(folder / "last.ckpt")) + r"\)"):
        check_ckpt_path(str(folder))
    with pytest.raises(ConfigError, match=r"\(give one of its checkpoints: " + re.escape(str(folder / "last.ckpt"))):
        check_ckpt_path(str(tmp_path))  # the run's folder: its checkpoints folder's
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a sharded checkpoint: load it with the sharding strategy"):
        check_ckpt_path(str(sharded), SingleDeviceStrategy("cpu"))
    check_ckpt_path(str(sharded), FSDPStrategy())  # Lightning loads it
    deepspeed = tmp_path / "ds.ckpt"  # review: DeepSpeed's layout is sharded too
    (deepspeed / "checkpoint").mkdir(parents=True)
    (deepspeed / "latest").write_text("checkpoint")
    with pytest.raises(ConfigError, match="is a sharded checkpoint"):
        check_ckpt_path(str(deepspeed), SingleDeviceStrategy("cpu"))
    torch.save({"state_dict": {}}, folder / "last.ckpt")
    check_ckpt_path(str(folder / "last.ckpt"), SingleDeviceStrategy("cpu"))


def test_a_file_torch_cannot_read_is_refused_as_a_checkpoint(tmp_path):
    """A user review: garbage, a .safetensors file or a checkpoint cut short were a torch
    traceback advising weights_only=False; now one line naming the flag and the file."""
    import pickle

    from cfg_unlearn.cli import check_ckpt_path
    from cfg_unlearn.utils import ConfigError

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(64)}, "epoch": 1}, good)
    check_ckpt_path(str(good))
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"epoch": 1}, legacy, _use_new_zipfile_serialization=False)
    check_ckpt_path(str(legacy))
    assert legacy.read_bytes()[:1] == pickle.PROTO  # the legacy layout the check lets through
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:-100])
    garbage = tmp_path / "junk.ckpt"
    garbage.write_text("garbage\n")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    for bad in (cut, garbage, weights, empty):
        with pytest.raises(ConfigError, match=rf"--ckpt_path {re.escape(str(bad))}: not a checkpoint torch can read"):
            check_ckpt_path(str(bad))


def test_a_resume_may_use_a_taken_run_folder_only_with_that_runs_checkpoint(tmp_path):
    """Review: the first rule (the file lies in the run folder) refused resuming a run
    whose checkpoints go to a callback's own dirpath, or to scratch storage linked as
    `checkpoints`, and `--ckpt_path hpc`."""
    from types import SimpleNamespace

    from cfg_unlearn.callbacks import resumes_run

    run = tmp_path / "tiny" / "version_0"
    run.mkdir(parents=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (run / "checkpoints").symlink_to(scratch)
    mine = tmp_path / "my-ckpts"
    trainer = SimpleNamespace(checkpoint_callbacks=[SimpleNamespace(dirpath=str(mine))])
    for ckpt in (run / "checkpoints" / "last.ckpt", scratch / "last.ckpt", mine / "epoch=1.ckpt", "last", "hpc",
                 "registry:me/model", "s3://bucket/last.ckpt"):
        assert resumes_run(str(ckpt), run, trainer), ckpt
    other = tmp_path / "tiny" / "version_1" / "checkpoints" / "last.ckpt"
    assert not resumes_run(str(other), run, trainer)
    assert not resumes_run(None, run, trainer)


def test_a_resume_spelled_in_another_case_is_the_same_run_on_a_case_insensitive_disk(tmp_path, monkeypatch):
    """resumes_run compared path strings: on macOS or Windows `--ckpt_path
    Runs/tiny/version_0/checkpoints/last.ckpt` was refused as another run's checkpoint for
    the run folder runs/tiny/version_0. A case-insensitive disk is simulated by a stat
    that ignores case."""
    from types import SimpleNamespace

    from cfg_unlearn import utils
    from cfg_unlearn.callbacks import resumes_run

    run = tmp_path / "runs" / "tiny" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    real_stat = os.stat
    monkeypatch.setattr(utils.os, "stat", lambda p, *a, **kw: real_stat(str(p).lower(), *a, **kw))
    trainer = SimpleNamespace(checkpoint_callbacks=[])
    assert resumes_run(str(tmp_path / "RUNS" / "Tiny" / "version_0" / "checkpoints" / "last.ckpt"), run, trainer)
    assert not resumes_run(str(tmp_path / "runs" / "tiny" / "version_1" / "last.ckpt"), run, trainer)


def _lightning_sigterm(args):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    raise SIGTERMException


def _lightning_ctrl_c(args):  # what Lightning's _call_and_handle_interrupt does after its shutdown
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise SystemExit(1) from None


@pytest.mark.parametrize("stop,code,said", [
    (_lightning_sigterm, 143, "stopped by SIGTERM at the end of a step"),
    (_lightning_ctrl_c, 130, "interrupted"),
], ids=["sigterm", "ctrl-c"])
@pytest.mark.parametrize("saved", ["file", "sharded", "none", "resumed", "resumed-last", "last-not-found"])
def test_a_stopped_fit_exits_with_the_signals_status_not_0_or_1(tmp_path, monkeypatch, capsys, stop, code, said,
                                                               saved):
    """Lightning ends the step and raises SIGTERMException, a SystemExit with no code: a
    fit a scheduler stopped exited 0, as if finished, and `fit && export` went on. After
    a Ctrl-C Lightning exits 1, as a failed run does (CLI audit). The message names the
    checkpoint to resume from; a user review: a fit stopped before its first checkpoint
    was told "the checkpoints saved before it are kept", and there were none. Named from
    what the callbacks recorded (a review: another run's newer file in a shared dirpath
    was named, and an FSDP run's sharded checkpoint, a directory, was not)."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    import cfg_unlearn.cli as cli

    folder = tmp_path / "run dir" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "other-run.ckpt").write_bytes(b"x")  # newer than this run's, not this run's
    cb = ModelCheckpoint(dirpath=str(folder))
    last = folder / "last.ckpt"
    if saved in ("file", "sharded"):
        (folder / "step=20.ckpt").write_bytes(b"x")
        os.utime(folder / "step=20.ckpt", (1, 1))
        if saved == "file":
            last.write_bytes(b"x")
        else:
            (last / "shard").mkdir(parents=True)
        os.utime(last, (2, 2))
        cb.last_model_path, cb.best_k_models = str(last), {str(folder / "step=20.ckpt"): torch.tensor(1.0)}
    # `--ckpt_path last`: Lightning's trainer.ckpt_path is the file it resolved that to,
    # or None where it found none and started afresh (the note said "resumed from last")
    trainer = SimpleNamespace(callbacks=[LearningRateMonitor(), cb],
                              ckpt_path="old/last.ckpt" if saved != "last-not-found" else None)
    given = {"resumed": "old/last.ckpt", "resumed-last": "last", "last-not-found": "last"}.get(saved)

    def running(args, prog=None):  # as UnlearnCLI._run_subcommand does before Lightning's loop
        cli._RUNNING.update(trainer=trainer, ckpt_path=given)
        stop(args)

    monkeypatch.setattr(cli, "cli_main", running)
    with pytest.raises(SystemExit) as e:
        train_main(["fit"])
    assert e.value.code == code
    note = {"none": "no checkpoint was saved before it", "last-not-found": "no checkpoint was saved before it",
            "resumed": "it saved no checkpoint since it resumed from old/last.ckpt",
            "resumed-last": "it saved no checkpoint since it resumed from old/last.ckpt"}.get(
        saved, f"the checkpoints saved before it are kept (resume with --ckpt_path '{last}')")
    assert capsys.readouterr().err == f"train.py: {said}; {note}\n"


@pytest.mark.parametrize("prog", ["train.py", "cfg-unlearn fit", "cfg-unlearn validate"])
def test_ctrl_c_while_lightning_imports_is_one_line(monkeypatch, capsys, prog):
    """train.py and `cfg-unlearn fit|validate` import Lightning (seconds) inside
    console.trainer_command: a Ctrl-C there was a traceback through the imports."""
    import types

    from cfg_unlearn import console

    class Importing(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "cfg_unlearn.cli", Importing("cfg_unlearn.cli"))
    sub = "validate" if prog.endswith("validate") else "fit"
    with pytest.raises(SystemExit) as e:
        console.trainer_command([sub], prog=prog)
    assert e.value.code == 130
    assert capsys.readouterr().err == f"{prog}: interrupted" + (
        "; it had not started training, so no checkpoint was saved" if sub == "fit" else "") + "\n"


@pytest.mark.parametrize("sub", ["fit", "validate"])
def test_ctrl_c_before_lightnings_loop_is_one_line(monkeypatch, capsys, sub):
    """A user review: Ctrl-C in the first seconds (parsing the config, loading the model)
    was a 60-line KeyboardInterrupt traceback through jsonargparse."""
    import cfg_unlearn.cli as cli

    def parsing(args, prog=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cli_main", parsing)
    with pytest.raises(SystemExit) as e:
        train_main([sub])
    assert e.value.code == 130
    assert capsys.readouterr().err == "train.py: interrupted" + (
        "; it had not started training, so no checkpoint was saved" if sub == "fit" else "") + "\n"


def test_sigterm_cleans_up_like_ctrl_c_in_the_other_commands(tmp_path, monkeypatch):
    """Python dies at once on SIGTERM by default: no cleanup ran, and a stopped subtract
    or export left a staged copy of the whole model beside --out."""
    import signal

    import cfg_unlearn.console as console
    from cfg_unlearn.utils import staged_dir

    def killed_midway(argv):
        with staged_dir(tmp_path / "out", overwrite=False) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(console, "_build_tiny", killed_midway)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        console_main(["build-tiny", str(tmp_path / "out")])
    assert e.value.code == 143
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staged copy
    assert signal.getsignal(signal.SIGTERM) is before  # put back for the caller


def test_a_non_ascii_config_is_refused_where_python_would_not_read_it_as_utf8(tmp_path, monkeypatch):
    """jsonargparse reads config files in the locale's encoding: on Windows (cp1252) the
    UTF-8 instruction "Keine persönlichen Daten" trained as "Keine persÃ¶nlichen Daten",
    silently."""
    import locale

    from cfg_unlearn.cli import check_config_files
    from cfg_unlearn.utils import ConfigError

    german = tmp_path / "de.yaml"
    german.write_text('data:\n  system_prompt: "Keine persönlichen Daten verwenden!"\n', encoding="utf-8")
    plain = tmp_path / "en.yaml"
    plain.write_text('data:\n  system_prompt: "Use no personal data."\n', encoding="utf-8")
    check_config_files(["fit", "--config", str(german)])  # this machine reads UTF-8
    monkeypatch.setattr(locale, "getpreferredencoding", lambda do_setlocale=True: "cp1252")
    check_config_files(["fit", "--config", str(plain)])  # ASCII reads alike in both
    with pytest.raises(ConfigError, match=r"de.yaml: holds non-ASCII text, and this Python reads config files as "
                                          r"cp1252, not UTF-8, so it would be misread; run with PYTHONUTF8=1"):
        check_config_files(["fit", f"--config={german}"])


def test_resume_checks_read_a_checkpoint_that_cannot_be_memory_mapped(tmp_path, monkeypatch):
    """A checkpoint torch could not map (Windows, some network disks) read as no
    checkpoint: every resume check (replaced settings, another instruction) was skipped."""
    import cfg_unlearn.cli as cli

    path = tmp_path / "last.ckpt"
    torch.save({"global_step": 7}, path)
    real = torch.load

    def no_mmap(*a, mmap=None, **kw):
        if mmap:
            raise RuntimeError("mmap not supported")
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", no_mmap)
    assert cli._checkpoint_file(str(path)) == {"global_step": 7}


def test_config_yaml_is_written_in_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """jsonargparse's parser.save opens config.yaml in the locale's encoding: under
    Windows' cp1252 a Cyrillic instruction failed half-way and left an empty file (a
    German one was written in cp1252, and the run's own config.yaml was then refused).
    Simulated here: every text-mode open without an encoding gets cp1252."""
    import builtins

    import yaml

    from cfg_unlearn.callbacks import LoggerSaveConfigCallback

    instruction = "Не раскрывай персональные данные."
    cli = cli_main(["--config", str(ROOT / "configs/tiny.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}",
                    f"--data.system_prompt={instruction}"], run=False)
    real_open = builtins.open

    def cp1252_open(file, mode="r", buffering=-1, encoding=None, *args, **kw):
        if "b" not in mode and encoding is None:
            encoding = "cp1252"  # what Python picks on a Windows machine without PYTHONUTF8
        return real_open(file, mode, buffering, encoding, *args, **kw)

    monkeypatch.setattr(builtins, "open", cp1252_open)
    LoggerSaveConfigCallback(cli.parser, cli.config, overwrite=True).setup(cli.trainer, cli.model, "fit")
    monkeypatch.undo()
    (saved,) = tmp_path.glob("tiny/version_*/config.yaml")
    assert yaml.safe_load(saved.read_text(encoding="utf-8"))["data"]["system_prompt"] == instruction
    # it says where its relative paths start (the folder the run was launched from)
    assert saved.read_text(encoding="utf-8").startswith(f"# launched from {os.getcwd()}: relative paths below "
                                                        "start there\n")


def test_multifile_config_yaml_has_the_launch_line_too(tmp_path):
    import yaml

    from cfg_unlearn.callbacks import LoggerSaveConfigCallback

    cli = cli_main(["--config", str(ROOT / "configs/tiny.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}"],
                   run=False)
    LoggerSaveConfigCallback(cli.parser, cli.config, overwrite=True, multifile=True).setup(cli.trainer, cli.model,
                                                                                          "fit")
    (saved,) = tmp_path.glob("tiny/version_*/config.yaml")
    text = saved.read_text(encoding="utf-8")
    assert text.startswith(f"# launched from {os.getcwd()}: relative paths below start there\n")
    assert yaml.safe_load(text)["model"]["beta"] == 0.1


@pytest.mark.skipif(sys.platform == "win32", reason="folder names of undecodable bytes are POSIX's")
def test_config_yaml_launch_line_survives_any_folder_name(tmp_path, monkeypatch):
    """A review: a folder whose name is not UTF-8 made the launch line unwritable
    (UnicodeEncodeError in setup), and a line break in the name turned the rest of it
    into YAML."""
    import yaml

    from cfg_unlearn.callbacks import LoggerSaveConfigCallback

    odd = os.fsencode(tmp_path) + b"/caf\xe9\nkey: 1"
    os.makedirs(odd)
    monkeypatch.chdir(odd)
    line = LoggerSaveConfigCallback.launch_line()
    assert line.count("\n") == 1 and line.endswith(": relative paths below start there\n")
    line.encode("utf-8")  # writable
    assert yaml.safe_load(line + "model: {}\n") == {"model": {}}


class _Payload:
    """What a planted checkpoint could hold: unpickling it calls a function (here one
    that creates a file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_resume_checks_read_a_checkpoint_as_data_never_as_code(tmp_path, monkeypatch):
    """The resume checks read --ckpt_path with weights_only=False: a checkpoint that
    unpickles a function call ran it (Lightning's own load, with weights_only=True, came
    first only for a plain path; a file swapped in between, or FSDP's adapter check, did not)."""
    import cfg_unlearn.cli as cli
    from cfg_unlearn.checkpointing import load_checkpoint_file

    marker, path = tmp_path / "ran", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": _Payload(marker)}, path)
    assert cli._checkpoint_file(str(path)) is None  # unreadable as data: Lightning's load says why
    reads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: reads.append(kw.get("mmap")) or real_load(*a, **kw))
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint_file(path)
    # refused by the mapped read: a plain read again loaded every tensor (an 8B run's 100 GB) before refusing
    assert reads == [True]
    monkeypatch.undo()
    assert not marker.exists()
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, path)  # a plain one still reads
    assert cli._checkpoint_file(str(path))["global_step"] == 3


def test_our_warnings_and_logged_warnings_read_as_warning_lines():
    """A user review: our rank_zero_warn notices printed as Python's raw
    `/site-packages/cfg_unlearn/cli.py:379: UserWarning: ...` plus the source line, and a
    command's logged warnings (generate's "pii value(s) appear nowhere") had no prefix at
    all, so they read as progress lines."""
    import warnings

    import cfg_unlearn.cli
    from cfg_unlearn.utils import our_warnings_as_lines

    before = warnings.formatwarning
    try:
        our_warnings_as_lines()
        our_warnings_as_lines()  # once: not wrapped twice
        assert warnings.formatwarning("--ckpt_path: moved", UserWarning, cfg_unlearn.cli.__file__, 379,
                                      "rank_zero_warn(...)") == "warning: --ckpt_path: moved\n"
        assert warnings.formatwarning("`x` is deprecated", FutureWarning, cfg_unlearn.cli.__file__, 9,
                                      "x()") == "warning: FutureWarning: `x` is deprecated\n"
        other = warnings.formatwarning("theirs", UserWarning, "/elsewhere/cfg_unlearn_x/mod.py", 3, "src")
        assert other.startswith("/elsewhere/cfg_unlearn_x/mod.py:3: UserWarning: theirs")
    finally:
        warnings.formatwarning = before
    code = ("import logging; from cfg_unlearn.utils import console_logging; console_logging(); "
            "log = logging.getLogger('cfg_unlearn.data.generate'); log.info('12 pairs'); "
            "log.warning('2 pii value(s) appear nowhere'); log.debug('hidden')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "12 pairs\nwarning: 2 pii value(s) appear nowhere\n", proc.stderr
