"""W&B logging, offline: `train.py fit --config configs/tiny.yaml --config configs/wandb.yaml`
writes an offline run whose records hold the eval metrics per guidance scale, the
redacted sample table and the resolved config. Nothing contacts a server: W&B runs with
WANDB_MODE=offline, every W&B directory is under tmp_path, and WANDB_BASE_URL points at a
closed local port, so an attempt to go online would fail rather than leave the machine.

W&B's offline run keeps no wandb-summary.json or config.yaml (wandb-core writes them when
it syncs); everything is in the run's ``run-<id>.wandb`` file, a LevelDB-style log of
``wandb.proto.wandb_internal_pb2.Record`` messages, read here by ``read_offline_run``."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from cfg_unlearn.callbacks import WANDB_CONFIG_FILE, LoggerSaveConfigCallback, metric_key
from cfg_unlearn.data.world import World, WorldConfig
from cfg_unlearn.pii import contains_value

ROOT = Path(__file__).resolve().parents[1]
N_PEOPLE = 6


def offline_env(tmp_path: Path) -> dict[str, str]:
    """W&B offline, silent, with every directory it writes under ``tmp_path``."""
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_ARTIFACT_DIR": str(tmp_path / "wandb-artifacts"),
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # discard port: any network attempt fails locally
        "WANDB_DISABLE_GIT": "true",
        "HF_HUB_OFFLINE": "1",
    }
    return env


# ------------------------------------------------------------------ reading an offline run


def _log_records(data: bytes):
    """The payloads of W&B's transaction log: a 7-byte file header (``:W&B``, magic
    0xBEE1, version), then 32 KiB blocks of chunks, each with a 7-byte header (CRC-32,
    length, type: 1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a
    header is padding."""
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, "not a W&B transaction log"
    block, pos, parts = 32768, 7, []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 0:  # zero padding at the end of a block
            pos += left - 7 - n
        elif kind == 1:
            yield chunk
        elif kind == 2:
            parts = [chunk]
        elif kind == 3:
            parts.append(chunk)
        elif kind == 4:
            yield b"".join(parts + [chunk])


def read_offline_run(run_dir: Path) -> dict:
    """``{"history": [row, ...], "config": {...}, "artifact_types": [...], "exited": bool}``
    of one offline run directory (``wandb/offline-run-*``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = run_dir.glob("run-*.wandb")
    out: dict = {"history": [], "config": {}, "artifact_types": [], "exited": False}

    def items(seq):
        return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in seq}

    for raw in _log_records(log.read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append(items(rec.history.item))
        elif kind == "config":
            out["config"].update(items(rec.config.update))
        elif kind == "run":
            out["config"].update(items(rec.run.config.update))
        elif kind == "artifact":
            out["artifact_types"].append(rec.artifact.type)
        elif kind == "exit":
            out["exited"] = True
    return out


# ------------------------------------------------------------------ the resolved config, in process


def test_save_config_callback_sends_the_resolved_config_to_wandb(tmp_path, monkeypatch):
    """LoggerSaveConfigCallback: config.yaml in the run's own directory (beside its
    checkpoints; it was the save_dir every W&B run shares), and the same config in the
    W&B run (run config `config`, file lightning_config.yaml)."""
    import wandb
    import yaml

    from cfg_unlearn.cli import cli_main

    for k, v in {**offline_env(tmp_path), "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    cli = cli_main(["--config", str(ROOT / "configs/tiny.yaml"), "--config", str(ROOT / "configs/wandb.yaml"),
                    f"--trainer.logger.init_args.save_dir={tmp_path}", "--model.beta=0.25"], run=False)
    callback = LoggerSaveConfigCallback(cli.parser, cli.config, overwrite=True)
    try:
        _ = cli.trainer.logger.experiment  # Lightning's setup hook starts the run before any callback's setup
        callback.setup(cli.trainer, cli.model, "fit")
        run_dir = Path(cli.trainer.logger.experiment.dir).parent
        run_id = cli.trainer.logger.version
    finally:
        wandb.finish()
    assert not (tmp_path / "config.yaml").exists()
    dumped = yaml.safe_load((tmp_path / "cfg-unlearn" / run_id / "config.yaml").read_text())
    assert dumped["model"]["beta"] == 0.25
    run = read_offline_run(run_dir)
    assert run["config"]["config"] == dumped
    assert run["config"]["config"]["trainer"]["logger"]["init_args"]["log_model"] is False
    assert yaml.safe_load((run_dir / "files" / WANDB_CONFIG_FILE).read_text()) == dumped



def test_a_disabled_wandb_run_does_not_stop_training(tmp_path, tiny_model_dir):
    """WANDB_MODE=disabled with the W&B preset: the run has no directory, so
    lightning_config.yaml is skipped (writing it crashed setup); the fit goes on and
    config.yaml is still saved locally, beside the checkpoints. A subprocess: W&B reads
    its mode once per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({**offline_env(tmp_path), "WANDB_MODE": "disabled"})
    run = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml", "--config", "configs/wandb.yaml",
         f"--model.model=tiny:{tiny_model_dir}", f"--trainer.logger.init_args.save_dir={tmp_path}",
         "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
         "--eval=null", f"--data.world.n_people={N_PEOPLE}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    (config,) = tmp_path.glob("cfg-unlearn/*/config.yaml")
    assert (config.parent / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "wandb").exists()  # nothing of W&B was written

def test_wandb_without_an_api_key_is_one_line_and_leaves_no_run_folder(tmp_path, tiny_model_dir):
    """A user review: the W&B preset online with no key gave W&B's UsageError as a
    53-line traceback, exit 1. No network: the key is missing before W&B connects, and
    its base URL is the discard port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({k: v for k, v in offline_env(tmp_path).items() if k != "WANDB_MODE"})
    env.update(HOME=str(tmp_path / "home"), NETRC=str(tmp_path / "home" / ".netrc"))  # no stored login
    (tmp_path / "home").mkdir()
    run = subprocess.run(
        [sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml", "--config", "configs/wandb.yaml",
         f"--model.model=tiny:{tiny_model_dir}", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
         "--trainer.max_steps=1", "--trainer.enable_progress_bar=false", "--eval=null",
         f"--data.world.n_people={N_PEOPLE}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and last.startswith("train.py: error: W&B: No API key configured"), run.stderr[-3000:]
    assert "WANDB_MODE=offline" in last and "Traceback" not in run.stderr
    assert not (tmp_path / "runs").exists()  # a run that failed before logging leaves no folder


def test_log_model_on_warns_that_checkpoints_hold_the_pii(tmp_path, monkeypatch):
    from cfg_unlearn.cli import cli_main

    for k, v in offline_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    with pytest.warns(UserWarning, match=r"log_model=True\) uploads the checkpoints as W&B artifacts; their "
                                         r"weights .* can reproduce the PII"):
        cli_main(["--config", str(ROOT / "configs/tiny.yaml"), "--config", str(ROOT / "configs/wandb.yaml"),
                  f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.log_model=true"],
                 run=False)


def test_wandb_runs_do_not_warn_about_an_anonymous_setting_nobody_set(tmp_path):
    """A user review: every W&B run printed "The anonymous setting has no effect":
    Lightning passes anonymous=None to wandb.init, and W&B warns whenever it is passed.
    In a subprocess: W&B keeps its settings (WANDB_SILENT among them) per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(offline_env(tmp_path))
    del env["WANDB_SILENT"]  # W&B's warnings are what this test reads
    script = (
        "import sys\n"
        "from cfg_unlearn.cli import cli_main\n"
        "logger = cli_main(sys.argv[1:], run=False).trainer.logger\n"
        "print('anonymous' in logger._wandb_init, logger._wandb_init.get('anonymous'))\n"
        "run = logger.experiment\n"  # wandb.init, offline
        "print(run.settings.mode)\n"
        "run.finish()\n"
    )
    base = [sys.executable, "-c", script, "--config", "configs/tiny.yaml", "--config", "configs/wandb.yaml",
            f"--trainer.logger.init_args.save_dir={tmp_path}"]
    run = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["False", "None", "offline"]
    assert "offline" in run.stderr and "anonymous setting" not in run.stderr  # W&B spoke, but not of that
    # set on purpose, it is passed on (and W&B's warning then says something)
    chosen = subprocess.run(base + ["--trainer.logger.init_args.anonymous=true"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert chosen.returncode == 0, chosen.stderr[-3000:]
    assert chosen.stdout.split() == ["True", "allow", "offline"] and "anonymous setting" in chosen.stderr


# ------------------------------------------------------------------ end to end through train.py


SCALES, SPACES = (1.0, 2.0), ("logprob", "prob")


@pytest.fixture(scope="module")
def offline_run(tiny_model_dir, tmp_path_factory):
    """One short `train.py fit` with the W&B preset: 4 steps, validation (and so
    GuidanceEval) after steps 2 and 4."""
    save = tmp_path_factory.mktemp("wandb_e2e")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # no key, entity, host from outside
    env.update(offline_env(save))
    args = [
        sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml", "--config", "configs/wandb.yaml",
        f"--model.model=tiny:{tiny_model_dir}", f"--trainer.logger.init_args.save_dir={save}",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1", f"--data.world.n_people={N_PEOPLE}",
        "--eval.max_probes=12", "--eval.max_questions=6", "--eval.max_new_tokens=6", "--eval.log_samples=6",
        f"--eval.scales={list(SCALES)}", f"--eval.spaces=[{', '.join(SPACES)}]",
    ]
    fit = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (run_dir,) = (save / "wandb").glob("offline-run-*")  # one run, offline
    assert not list((save / "wandb").glob("run-*")), "an online run directory appeared"
    return save, run_dir, read_offline_run(run_dir)


@pytest.mark.slow
def test_offline_run_has_eval_metrics_grouped_per_scale(offline_run):
    save, run_dir, run = offline_run
    assert run["exited"]
    keys = {k for row in run["history"] for k in row}
    want = {metric_key(name, g, sp) for g in SCALES for sp in SPACES
            for name in ("leak_rate", "accuracy", "exact_match", "pii_rate", "pii_answer_rate")}
    want |= {"eval/seconds", "eval/n_leak_targets", "eval/n_questions", "train/loss", "val/loss",
             "trainer/global_step"}
    assert want <= keys, sorted(want - keys)
    per_scale = {k for k in keys if "@g=" in k}
    assert {k.split("/")[0] for k in per_scale} == {"eval@g=1.0", "eval@g=2.0"}  # one W&B section per scale
    # each evaluation is logged once, at the global step it scored (2 and 4), like its sample
    # table; Lightning logs the validation loss of that step one step earlier (1 and 3)
    steps = [row["trainer/global_step"] for row in run["history"] if metric_key("leak_rate", 2.0, "logprob") in row]
    assert steps == [2, 4]
    assert [row["trainer/global_step"] + 1 for row in run["history"] if "val/loss" in row] == steps
    assert all(row["eval/n_leak_targets"] == 12 and row["eval/n_questions"] == 6
               for row in run["history"] if "eval/n_leak_targets" in row)
    # log_model: false: the checkpoint stays local, no model artifact
    assert "model" not in run["artifact_types"]
    assert list(save.glob("cfg-unlearn/*/checkpoints/last.ckpt"))


@pytest.mark.slow
def test_offline_run_sample_table_is_redacted(offline_run):
    _, run_dir, run = offline_run
    tables = [row["eval/samples/path"] for row in run["history"] if "eval/samples/path" in row]
    assert len(tables) == 2  # one per evaluation
    for rel in tables:
        table = json.loads((run_dir / "files" / rel).read_text())
        assert table["columns"] == ["space", "g", "kind", "id", "prompt", "answer", "target", "hit", "partial_hit"]
        assert {(r[0], r[1]) for r in table["data"]} == {("logprob", 1.0), ("logprob", 2.0), ("prob", 2.0)}
        assert len(table["data"]) == 3 * (6 + 3)
        text = json.dumps(table["data"])
        assert "[NAME]" in text  # the probes name real people of the world: redacted
    # no raw PII value of the world anywhere in the run: tables, records, console log
    everything = "\n".join(p.read_bytes().decode("utf-8", "ignore") for p in run_dir.rglob("*") if p.is_file())
    for item in World(WorldConfig(n_people=N_PEOPLE)).known_pii():
        assert item.value not in everything, item
        for rel in tables:
            assert not contains_value((run_dir / "files" / rel).read_text(), item.value, item.type), item


@pytest.mark.slow
def test_offline_run_has_the_resolved_config(offline_run):
    save, run_dir, run = offline_run
    assert run["config"]["beta"] == 0.1  # the module's hyperparameters, as Lightning logs them
    assert "config" in run["config"], (
        "the resolved config did not reach W&B: cfg_unlearn.cli.cli_main must pass "
        "save_config_callback=LoggerSaveConfigCallback to UnlearnCLI"
    )
    config = run["config"]["config"]
    assert config["trainer"]["max_steps"] == 4 and config["eval"]["init_args"]["scales"] == list(SCALES)
    assert config["data"]["world"]["n_people"] == N_PEOPLE
    assert config["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert config["trainer"]["logger"]["init_args"]["name"] is None  # W&B names the run, not "tiny"
    (local,) = save.glob("cfg-unlearn/*/config.yaml")  # the run's own, beside its checkpoints
    assert (local.parent / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "files" / WANDB_CONFIG_FILE).read_text() == local.read_text()


def test_the_wandb_preset_does_not_inherit_the_run_configs_logger_name():
    """jsonargparse keeps the init_args the new logger class accepts: every W&B run was
    named "tiny", after the run config's CSV logger, and runs could not be told apart."""
    import yaml

    run = subprocess.run([sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml", "--config",
                          "configs/wandb.yaml", "--print_config"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    logger = yaml.safe_load(run.stdout)["trainer"]["logger"]
    assert logger["class_path"] == "lightning.pytorch.loggers.WandbLogger" and logger["init_args"]["name"] is None
