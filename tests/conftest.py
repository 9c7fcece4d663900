"""Shared fixtures. Tests never touch the network: the hub and W&B are forced offline
and every model is the tiny one built from the synthetic world."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The default tiny model, built once per test session."""
    from cfg_unlearn.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")
