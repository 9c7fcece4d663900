"""The GPU sizing benchmark runs end to end on a CPU with its tiny shape: the figures it
prints come from the run it made (steps counted, one validation timed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_real_shape_reports_the_run_it_made():
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    runs_before = sorted((ROOT / "runs").rglob("*")) if (ROOT / "runs").exists() else []
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "real_shape.py"), "--config", "configs/llama3.1-8b-lora.yaml",
         "--arch", "tiny", "--steps", "3", "--probes", "4", "--",
         "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.dtype", "float32",
         "--eval.scales", "[1, 2]", "--eval.max_new_tokens", "4", "--trainer.enable_progress_bar", "false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.rindex("\n{") + 1:])
    assert result["arch"] == "tiny" and result["accumulate_grad_batches"] == 8  # from the config
    assert result["optimizer_steps"] == 3 and len(result["validation_s"]) == 1
    assert result["first_step_s"] > 0 and result["s_per_step"] > 0
    # 2 pairs per batch x 8 batches per step, over the timed steps (the first is warm-up)
    assert result["pairs_per_step"] == [16, 16]
    assert result["pairs_per_s"] == pytest.approx(16 / result["s_per_step"], rel=0.01)
    assert result["peak_allocated_gib"] is None and result["device"] == "cpu"
    assert 0 < result["trainable_params"] < result["params"] / 10  # LoRA adapters only
    # the run wrote into its temp folder, not into the repository's runs/
    assert (sorted((ROOT / "runs").rglob("*")) if (ROOT / "runs").exists() else []) == runs_before
