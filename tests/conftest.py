"""Shared fixtures. Tests never touch the network: the hub and W&B are forced offline
and every model is the tiny one built from the synthetic world."""

import os
import signal

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# The Ctrl-C tests raise SIGINT and expect Python's KeyboardInterrupt. A process started in
# the background by a shell without job control (`cmd &` in a script, as some CI runners
# and nohup wrappers do) inherits SIGINT ignored, and Python then installs no handler:
# four of those tests failed so ("DID NOT RAISE KeyboardInterrupt").
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The default tiny model, built once per test session."""
    from cfg_unlearn.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def cpu_args_unless_enough_gpus():
    """``--trainer`` arguments that instantiate a GPU config on this machine: none where it
    has as many CUDA GPUs as the config asks for, else its trainer moved to one CPU (an
    8-GPU config on a 1-GPU machine fails Lightning's device check, as on a CPU)."""
    from pathlib import Path

    import torch
    import yaml

    def args(config: Path) -> list[str]:
        trainer = yaml.safe_load(Path(config).read_text()).get("trainer") or {}
        if trainer.get("accelerator") not in ("gpu", "cuda"):
            return []
        devices = trainer.get("devices", 1)
        wanted = len(devices) if isinstance(devices, list) else devices if isinstance(devices, int) and devices > 0 else 1
        if torch.cuda.device_count() >= wanted:
            return []
        return ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]

    return args


@pytest.fixture
def umask_027():
    """A team umask: outputs must come out group-readable (0o640 files, 0o750 directories)."""
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)



@pytest.fixture
def assert_open_modes(umask_027):
    """Under umask 027, check that every file below a directory is 0o640 and every
    directory 0o750: the modes open/mkdir leave, not mkdtemp's or safetensors' owner-only."""
    import stat
    from pathlib import Path

    def check(directory) -> None:
        root = Path(directory)
        got = {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in (root, *root.rglob("*"))}
        assert got == {k: 0o750 if (root / k).is_dir() else 0o640 for k in got}

    return check
