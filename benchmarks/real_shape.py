"""Peak GPU memory and step time of a shipped config on a random-init model of a real shape.

Memory and speed depend on a model's shapes, not on its weights. So this builds a model of a
named architecture (Llama-3.1-8B, Llama-3.2-1B, Qwen2.5-0.5B) with random weights and the
offline tiny tokenizer (its ids fit every vocabulary), runs ``train.py fit --config CONFIG``
on it with the synthetic world for a few optimizer steps, then one validation with the
guidance evaluation (and the config's checkpoint), and prints:

- seconds per optimizer step and pairs per second, over the steps after the first
  (which holds CUDA warm-up and compilation);
- peak GPU memory allocated and reserved by torch (the fit's, on rank 0);
- seconds of the validation (loss + guidance decoding at every configured scale).

Nothing is downloaded. An 8B model takes ~16 GB of disk in a temporary folder for the run.

    python benchmarks/real_shape.py --config configs/llama3.1-8b-lora.yaml --arch llama3.1-8b
    python benchmarks/real_shape.py --config configs/llama3.1-8b-fsdp-full.yaml --arch llama3.2-1b \\
        -- --trainer.devices 1
    python benchmarks/real_shape.py --config configs/tiny.yaml --arch tiny -- --trainer.accelerator cpu

Arguments after ``--`` go to ``train.py fit`` as they are. Figures are for the machine that
ran them; compare configs only within one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULT_ENV = "REAL_SHAPE_RESULT"  # where StepStats writes its figures (a JSON file)

#: Shapes of the published configs (their config.json on the hub). RoPE scaling is left
#: out: it changes no shape and no cost.
ARCHS: dict[str, dict] = {
    "llama3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                        rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False),
    "llama3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                        rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True),
    # for trying this script on a CPU
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048),
}


class StepStats(L.Callback):
    """Times optimizer steps (without any validation that runs between them) and the
    validations; reads torch's peak GPU memory. Rank 0 writes the figures as JSON to the
    file named by ``$REAL_SHAPE_RESULT`` at the end of training."""

    def __init__(self) -> None:
        self.step_seconds: list[float] = []  # optimizer step k: from the end of step k-1 (or the start)
        self.step_pairs: list[int] = []
        self.val_seconds: list[float] = []
        self._mark: float | None = None  # where the running step's time starts
        self._pairs = 0
        self._last_step = 0
        self._val_start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._mark is None:
            self._sync(pl_module)
            self._mark = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._pairs += len(batch["id"]) * trainer.world_size
        if trainer.global_step != self._last_step:  # an optimizer step was taken
            self._last_step = trainer.global_step
            self._sync(pl_module)
            now = time.perf_counter()
            self.step_seconds.append(now - self._mark)
            self.step_pairs.append(self._pairs)
            self._mark, self._pairs = now, 0

    def on_validation_start(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        seconds = time.perf_counter() - self._val_start
        if not trainer.sanity_checking:
            self.val_seconds.append(seconds)
        if self._mark is not None:
            self._mark += seconds  # a validation inside a step's window is not step time

    def on_train_end(self, trainer, pl_module) -> None:  # before teardown moves the module to the CPU
        if trainer.global_rank != 0:
            return
        steady, pairs = self.step_seconds[1:], self.step_pairs[1:]  # the first holds the warm-up
        cuda = pl_module.device.type == "cuda"
        gib = 2**30
        result = {
            "optimizer_steps": len(self.step_seconds),
            "first_step_s": round(self.step_seconds[0], 4) if self.step_seconds else None,
            "s_per_step": round(sum(steady) / len(steady), 4) if steady else None,
            "pairs_per_s": round(sum(pairs) / sum(steady), 3) if steady else None,
            "pairs_per_step": pairs,
            "validation_s": [round(s, 1) for s in self.val_seconds],
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(pl_module.device) / gib, 2) if cuda else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(pl_module.device) / gib, 2) if cuda else None,
            "device": torch.cuda.get_device_name(pl_module.device) if cuda else "cpu",
            "trainable_params": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            "params": sum(p.numel() for p in pl_module.parameters()),
        }
        Path(os.environ[RESULT_ENV]).write_text(json.dumps(result))

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


def random_model(arch: str, device: str | torch.device):
    """A random-init model of ``arch`` in bfloat16 on ``device``, and the tiny tokenizer
    (its bos/eos/pad ids set in the model's config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from cfg_unlearn.tiny import TinySpec, default_corpus, train_tokenizer

    tokenizer = train_tokenizer(default_corpus(), TinySpec().vocab_size)
    shape = dict(ARCHS[arch])
    if len(tokenizer) > shape["vocab_size"]:
        raise SystemExit(f"the tiny tokenizer ({len(tokenizer)} ids) does not fit {arch}'s vocabulary")
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(shape.pop("model_type"), **shape, **ids)
    torch.manual_seed(0)
    with torch.device(device):  # random init of 8B: seconds on a GPU, minutes on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.update(**ids)
    return model, tokenizer


def build_model(arch: str, out: Path) -> int:
    """:func:`random_model` saved to ``out``; returns its number of parameters."""
    model, tokenizer = random_model(arch, "cuda" if torch.cuda.is_available() else "cpu")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the fit runs in a child process: leave it the GPU (this one keeps its context)
    return n


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a YAML config of configs/")
    ap.add_argument("--arch", required=True, choices=sorted(ARCHS))
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps (>= 2: the first is warm-up)")
    ap.add_argument("--people", type=int, default=50, help="people in the synthetic world")
    ap.add_argument("--probes", type=int, default=32, help="leak probes and questions in the validation")
    a = ap.parse_args(argv)
    if a.steps < 2:
        ap.error("--steps must be >= 2: the first step is warm-up, not timed")
    config = Path(a.config).resolve()
    if not config.is_file():
        ap.error(f"--config {a.config}: no such file")

    with tempfile.TemporaryDirectory(prefix="real_shape_") as tmp:
        model_dir = Path(tmp) / a.arch
        t0 = time.perf_counter()
        n = build_model(a.arch, model_dir)
        print(f"{a.arch}: {n / 1e9:.2f}B random-init parameters, built in {time.perf_counter() - t0:.0f} s",
              flush=True)
        accumulate = _accumulation(config, extra)
        cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(config),
               "--model.model", str(model_dir),
               "--data.train_file", "null", "--data.world.seed", "0", "--data.world.n_people", str(a.people),
               "--eval.probes_file", "null", "--eval.qa_file", "null",
               "--eval.max_probes", str(a.probes), "--eval.max_questions", str(a.probes),
               "--trainer.max_steps", str(a.steps), "--trainer.limit_val_batches", "4",
               # one validation (loss + guidance evaluation) after the last step
               "--trainer.val_check_interval", str(a.steps * accumulate), "--trainer.num_sanity_val_steps", "0",
               "--trainer.callbacks+=real_shape.StepStats", *extra]
        result_file = Path(tmp) / "result.json"
        path = os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, RESULT_ENV: str(result_file), "PYTHONPATH": path}
        t0 = time.perf_counter()
        # the fit's own output (its progress bars) goes through: a run killed midway shows where
        proc = subprocess.run(cmd, cwd=tmp, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not result_file.is_file():
            raise SystemExit(f"train.py fit failed (exit {proc.returncode})")
        result = {"config": str(Path(a.config)), "arch": a.arch, "params_b": round(n / 1e9, 3),
                  "accumulate_grad_batches": accumulate, "extra": extra, "fit_wall_s": round(wall, 1),
                  **json.loads(result_file.read_text())}
    print(json.dumps(result, indent=1))


def _accumulation(config: Path, extra: list[str]) -> int:
    """The run's ``accumulate_grad_batches``: from ``extra`` if given there, else the config."""
    import yaml

    for i, arg in enumerate(extra):
        if arg.startswith("--trainer.accumulate_grad_batches"):
            return int(arg.split("=", 1)[1] if "=" in arg else extra[i + 1])
    return int((yaml.safe_load(config.read_text()).get("trainer") or {}).get("accumulate_grad_batches") or 1)


if __name__ == "__main__":
    main()
