"""The demo end to end, shrunk: every stage runs and every output is written."""

import io
import json
import os
import platform
import re
import signal
from pathlib import Path

import pytest
import torch

from cfg_unlearn.console import console_main
from cfg_unlearn.data.generate import DEFAULT_FALLBACK, redacted_answer
from cfg_unlearn.data.schema import prompt_text, read_pairs
from cfg_unlearn.data.world import World, WorldConfig
from cfg_unlearn.pii import contains_fragment, contains_value
from cfg_unlearn.prompts import SAFETY_INSTRUCTION


def _spy_generate_pairs(monkeypatch) -> list[dict]:
    """Record the keyword arguments of every ``generate_pairs`` call the demo makes."""
    import cfg_unlearn.data.generate as generate

    calls, real = [], generate.generate_pairs
    monkeypatch.setattr(generate, "generate_pairs", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    return calls


@pytest.mark.slow
def test_demo_writes_metrics_report_and_plot(tmp_path, monkeypatch, assert_open_modes):
    from cfg_unlearn.module import UnlearnModule

    out = tmp_path / "demo"
    monkeypatch.setenv("MKL_CBWR", "AUTO")  # MKL's default; read by environment(), not by MKL this late
    calls = _spy_generate_pairs(monkeypatch)
    settings, real_configure = [], UnlearnModule.configure_optimizers

    def spy_configure(self):
        opt = real_configure(self)
        settings.append((self.objective, self.beta, opt.param_groups[0]["lr"]))
        return opt

    monkeypatch.setattr(UnlearnModule, "configure_optimizers", spy_configure)
    import cfg_unlearn.demo as demo

    finetunes, real_finetune = [], demo.finetune
    monkeypatch.setattr(demo, "finetune", lambda *a, **kw: finetunes.append((kw.get("desc"), kw["epochs"]))
                        or real_finetune(*a, **kw))
    console_main(["demo", "--out", str(out), "--people", "3", "--leak-epochs", "2", "--unlearn-epochs", "2",
                  "--stop-leak", "1", "--scales", "1", "2", "--compare", "--beta", "0.5", "--unlearn-lr", "1e-4",
                  "--baseline-lr", "3e-4", "--quiet"])
    m = json.loads((out / "metrics.json").read_text())
    # --beta and --unlearn-lr are ORPO's (the method and its no-dropout ablation); NPO and DPO
    # keep their papers' 0.1, and the baselines train at --baseline-lr
    assert sorted(settings) == [("dpo", 0.1, 3e-4), ("ga", 0.1, 3e-4), ("npo", 0.1, 3e-4), ("orpo", 0.5, 1e-4),
                                ("orpo", 0.5, 1e-4), ("sft", 0.1, 3e-4)]
    assert (m["config"]["beta"], m["config"]["baseline_beta"], m["config"]["baseline_lr"]) == (0.5, 0.1, 3e-4)
    assert set(m) == {"baseline", "unlearned", "unlearn_steps", "comparison", "pairs", "chat", "config", "world",
                      "seconds", "environment"}
    # 18 pairs in batches of 16: two steps an epoch, at most four; the pairs' prompts are
    # decoded after step 3, and a leak rate of 1 or less stops every run there
    steps = m["unlearn_steps"]
    assert (steps["steps"], steps["max_steps"], steps["stopped_at_step"]) == (3, 4, 3)
    assert [k for k, _ in steps["forget_leak_rates"]] == [3] and 0 <= steps["forget_leak_rates"][0][1] <= 1
    assert m["config"]["stop_leak"] == 1.0
    assert "Training stopped after step 3 of at most 4: the pairs' prompts leaked" in (out / "report.md").read_text()
    # what the numbers depend on besides the config: the CPU's kernels, threads, versions
    env = m["environment"]
    assert env["torch"] == torch.__version__ and env["python"] == platform.python_version()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["torch_threads"] >= 1
    assert env["cpu"] and {"transformers", "tokenizers", "faker", "python"} <= set(env)
    assert f"cpu_capability {env['cpu_capability']}" in (out / "report.md").read_text()
    assert env.get("MKL_CBWR") == "AUTO"  # the settings that change kernels, where set
    assert {"leak_rate", "accuracy", "n_leak_probes", "n_qa"} <= set(m["baseline"])
    assert m["baseline"]["n_leak_probes"] == 3 * 6
    assert set(m["unlearned"]) == {"logprob", "prob"} and set(m["unlearned"]["prob"]) == {"1.0", "2.0"}
    for rows in m["unlearned"].values():
        for r in rows.values():
            assert {"leak_rate", "accuracy", "pii_rate"} <= set(r) and 0 <= r["leak_rate"] <= 1
            assert r["leak_rate"] <= r["partial_leak_rate"] <= 1  # pieces count on top of whole values
    # per PII type (method.md section 5): six types of three probes each; they add up to the overall rate
    for r in [m["baseline"], *m["unlearned"]["logprob"].values()]:
        by_type = r["leak_rate_by_type"]
        assert {t: v["n"] for t, v in by_type.items()} == dict.fromkeys(["EMAIL", "PHONE", "LOC", "DATE", "SSN", "ORG"], 3)
        assert sum(v["leak_rate"] * v["n"] for v in by_type.values()) / 18 == pytest.approx(r["leak_rate"])
        attack = r["attack_leak_rate_by_type"]
        assert sum(v["n"] for v in attack.values()) == m["baseline"]["n_attack_probes"]
        assert sum(v["leak_rate"] * v["n"] for v in attack.values()) / m["baseline"]["n_attack_probes"] == \
            pytest.approx(r["attack_leak_rate"])
    report = (out / "report.md").read_text()
    assert "Leak rate per PII type, direct probes" in report and "| EMAIL | 3 |" in report
    # the utility questions' reference answers, scored under each row's guidance
    logprob = m["unlearned"]["logprob"]
    assert m["baseline"]["perplexity"] > 1 and logprob["1.0"]["perplexity"] > 1
    assert logprob["2.0"]["perplexity"] != logprob["1.0"]["perplexity"]
    assert all(r["perplexity"] is None or r["perplexity"] > 1 for r in m["unlearned"]["prob"].values())
    assert f"| {logprob['1.0']['perplexity']:.2f} |" in report
    assert "| logprob | 2.0 |" in (out / "report.md").read_text()
    assert (out / "leak_vs_guidance.png").read_bytes()[:4] == b"\x89PNG"
    # --compare: every method on the same probes, the baselines scored during training
    comp = m["comparison"]
    assert {r["objective"] for r in comp.values()} == {"orpo", "npo", "ga", "dpo", "sft", "retrain", "subtract"}
    assert len(comp) == 2 + 5 + 2  # ORPO + dropout at g=1 and g=2, five baselines, retrain, subtraction
    for r in comp.values():
        assert 0 <= r["leak_rate"] <= 1 and 0 <= r["accuracy"] <= 1
        if "during_training" in r:  # scored after step 2 (early, and the first epoch's end, once) and at the stop
            assert [e["step"] for e in r["during_training"]] == [2, 3]
            assert r["unlearn_steps"]["stopped_at_step"] == 3
            # scored without the challenge attacks: no attack figure, not a rate of 0
            assert all("attack_leak_rate" not in e for e in r["during_training"])
    assert sum("during_training" in r for r in comp.values()) == 5
    assert "| gradient ascent | 1.0 |" in (out / "report.md").read_text()
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "models" / "without-pii" / "config.json").exists()  # subtraction's base
    # the retrain takes the leak stage's steps: 2 epochs of 656 examples are 2 x 41 = 82
    # steps, and the 512 facts' 32 a epoch make that 3 epochs (96 steps), not 2
    assert finetunes == [(None, 2), ("fine-tune without the PII", 3)]
    # every model readable as the umask allows (safetensors writes its weights 0600)
    assert {p.name for p in (out / "models").iterdir()} == {"base", "leaky", "unlearned", "without-pii",
                                                           "subtracted-0.5"}
    assert_open_modes(out / "models")
    # the leaky and unlearned models load in `cfg-unlearn chat` (it refused them: no export's
    # cfg_unlearn.json), decoded as the demo scored them
    from cfg_unlearn.demo import chat_decoding
    from cfg_unlearn.export import ExportConfig, main_chat

    assert m["chat"] == chat_decoding(m["baseline"], m["unlearned"])
    unlearned = ExportConfig.read(out / "models" / "unlearned")
    assert (unlearned.guidance_scale, unlearned.space) == (m["chat"]["g"], m["chat"]["space"])
    assert (unlearned.system_instruction, unlearned.uncond_instruction) == (SAFETY_INSTRUCTION, None)
    leaky = ExportConfig.read(out / "models" / "leaky")
    assert (leaky.guidance_scale, leaky.space, leaky.system_instruction) == (1.0, "logprob", SAFETY_INSTRUCTION)
    shown = io.StringIO()
    main_chat([str(out / "models" / "unlearned"), "--max-new-tokens", "4"], stdin=io.StringIO("Hello\n"),
              stdout=shown)
    assert shown.getvalue().count("model> ") == 1
    assert f"`cfg-unlearn chat {out / 'models' / 'unlearned'}` decodes at g={m['chat']['g']} in " \
        f"{m['chat']['space']} space" in (out / "report.md").read_text()
    # the pairs the demo trained on: no chosen answer holds a known value of its row, nor a piece of it
    pairs, _ = read_pairs(out / "pairs.jsonl")
    assert len(pairs) == m["pairs"]["records"] == len(World(WorldConfig(n_people=3)).pairs())
    assert not any(contains_value(p.chosen, v.value, v.type) for p in pairs for v in p.pii)
    assert not any(contains_fragment(p.chosen, v.value, v.type, shown=prompt_text(p.prompt))
                   for p in pairs for v in p.pii)
    # the default fallback is the redacted leaky answer (whether this barely trained writer
    # needs it depends on its samples, so the wiring is checked): every outcome counted once
    s = m["pairs"]
    assert m["config"]["fallback"] == "redacted" and [c["redact_fallback"] for c in calls] == [True]
    assert s["accepted_first"] + s["accepted_resampled"] + s["redacted"] + s["fallback"] == s["records"]
    assert sum(p.chosen == redacted_answer(p.rejected, p.pii) for p in pairs) >= s["redacted"]


@pytest.mark.slow
def test_demo_swap_mode_trains_and_guides_against_the_negative_instruction(tmp_path, monkeypatch):
    """``--cond-mode swap``: the paper's variant end to end. The unconditioned branch is the
    negative instruction in training (the module is built in swap mode, which refuses a
    data module without that instruction) and in every guided decode of the evaluation."""
    import cfg_unlearn.guidance as guidance
    from cfg_unlearn.prompts import NEGATIVE_INSTRUCTION

    seen = []
    real = guidance.generate

    def spy(*args, **kwargs):
        seen.append((kwargs.get("guidance_scale", 1.0), kwargs.get("uncond_system")))
        return real(*args, **kwargs)

    monkeypatch.setattr(guidance, "generate", spy)
    calls = _spy_generate_pairs(monkeypatch)
    out = tmp_path / "demo"
    console_main(["demo", "--out", str(out), "--people", "2", "--leak-epochs", "1", "--unlearn-epochs", "1",
                  "--scales", "1", "2", "--spaces", "logprob", "--cond-mode", "swap", "--fallback", "template",
                  "--quiet"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["cond_mode"] == "swap"
    # --fallback template: no record gets its redacted answer (this 1-epoch model writes text
    # that passes the checks, so there may be no fallback at all)
    assert m["config"]["fallback"] == "template" and m["pairs"]["redacted"] == 0
    assert [c["redact_fallback"] for c in calls] == [False]
    pairs, _ = read_pairs(out / "pairs.jsonl")
    assert sum(p.chosen == DEFAULT_FALLBACK for p in pairs) == m["pairs"]["fallback"]
    guided = [u for g, u in seen if g != 1.0]
    assert guided and set(guided) == {NEGATIVE_INSTRUCTION}
    assert "ORPO + instruction swap" in (out / "report.md").read_text()
    from cfg_unlearn.export import ExportConfig  # and `cfg-unlearn chat` guides against it too

    assert ExportConfig.read(out / "models" / "unlearned").uncond_instruction == NEGATIVE_INSTRUCTION


def test_demo_rejects_an_unknown_cond_mode(tmp_path, capsys):
    with pytest.raises(SystemExit):
        console_main(["demo", "--out", str(tmp_path / "d"), "--cond-mode", "both"])
    assert "invalid choice: 'both'" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [
    ({"fallback": "refuse"}, "fallback must be 'redacted' or 'template', got 'refuse'"),
    ({"beta": -1.0}, "beta must be a finite number >= 0 and baseline_beta one > 0, got -1.0 and 0.1"),
    ({"baseline_beta": 0.0}, "beta must be a finite number >= 0 and baseline_beta one > 0, got 0.1 and 0.0"),
    ({"unlearn_lr": 0.0}, "learning rates must be finite and > 0, got unlearn_lr 0.0, baseline_lr 0.00025"),
    ({"baseline_lr": -1e-4}, "learning rates must be finite and > 0, got unlearn_lr 0.00025, baseline_lr -0.0001"),
    # NaN passed `< 0`: the run trained a NaN model and reported it as leaking nothing
    ({"beta": float("nan")}, "beta must be a finite number >= 0 and baseline_beta one > 0, got nan"),
    ({"baseline_beta": float("inf")}, "beta must be a finite number >= 0 and baseline_beta one > 0, got 0.1 and inf"),
    ({"unlearn_lr": float("nan")}, "learning rates must be finite and > 0, got unlearn_lr nan"),
    # seed_everything refused these after the fine-tune and the pairs
    ({"seed": -1}, "seed must be in [0, 4294967295], got -1"),
    ({"seed": 2**32}, "seed must be in [0, 4294967295], got 4294967296"),
    # these failed after minutes of work, or (unlearn_epochs 0) reported the leaky model as unlearned
    ({"people": 0}, "people must be >= 1, got 0"),
    ({"leak_epochs": 0}, "leak_epochs must be >= 1, got 0"),
    ({"unlearn_epochs": 0}, "unlearn_epochs must be >= 1, got 0"),
    ({"stop_every": 0}, "stop_every must be >= 1, got 0"),
    ({"stop_leak": 1.5}, "stop_leak must be in [0, 1] (or None: train every epoch), got 1.5"),
    ({"stop_leak": float("nan")}, "stop_leak must be in [0, 1] (or None: train every epoch), got nan"),
    ({"cond_dropout": 1.5}, "cond_dropout must be in [0, 1], got 1.5"),
    ({"scales": (1.0, -1.0)}, "guidance_scale must be"),
    ({"scales": ()}, "give at least one guidance scale and one space"),
])
def test_demo_rejects_bad_settings_before_training(tmp_path, kwargs, match):
    from cfg_unlearn.demo import DemoConfig, run_demo

    with pytest.raises(ValueError, match=re.escape(match)):
        run_demo(DemoConfig(out=str(tmp_path / "d"), **kwargs), progress=False)
    assert not (tmp_path / "d").exists()


def test_stop_line_says_where_unlearning_stopped_or_that_it_ran_to_the_cap():
    from cfg_unlearn.demo import stop_line

    stopped = {"steps": 42, "max_steps": 60, "stopped_at_step": 42, "forget_leak_rates": [[39, 0.0389], [42, 0.0278]]}
    assert stop_line(stopped, 0.03) == ("stopped after step 42 of at most 60: the pairs' prompts leaked 0.028 of "
                                        "their values (stop at 0.03 or less)")
    ran = {"steps": 60, "max_steps": 60, "stopped_at_step": None, "forget_leak_rates": [[57, 0.1], [60, 0.05]]}
    assert stop_line(ran, 0.03) == ("ran all 60 steps without reaching the leak stop of 0.03; the pairs' prompts "
                                    "leaked 0.050 at the last check")
    assert stop_line({**ran, "forget_leak_rates": []}, None) == "ran all 60 steps (no leak stop)"


def test_the_retrain_without_the_pii_gets_the_leak_stages_number_of_steps():
    from cfg_unlearn.demo import matched_epochs

    # the demo's 30-person world: 14 epochs of 1952 examples in batches of 16 are 14 x 122
    # = 1708 steps; the 512 facts take 32 a epoch, so 53 epochs (1696 steps), not 14 (448)
    assert matched_epochs(14, 1952, 512, 16) == 53
    assert matched_epochs(14, 512, 512, 16) == 14
    assert matched_epochs(1, 16, 1000, 16) == 1  # never zero epochs
    with pytest.raises(ValueError, match="positive counts"):
        matched_epochs(14, 1952, 0, 16)


@pytest.mark.parametrize("flag, want", [(None, 0.03), ("0", 0.0), ("none", None), ("None", None)])
def test_demo_stop_leak_flag_reaches_the_config(tmp_path, monkeypatch, flag, want):
    import cfg_unlearn.demo as demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda cfg, progress: seen.append(cfg))
    console_main(["demo", "--out", str(tmp_path / "d"), "--quiet", *(["--stop-leak", flag] if flag else [])])
    assert [(c.stop_leak, c.unlearn_epochs, c.stop_every) for c in seen] == [(want, 5, 3)]


def test_demo_usage_errors_exit_2_before_any_work(tmp_path, capsys):
    for args, match in ((["--unlearn-epochs", "0"], "demo: error: --unlearn-epochs must be >= 1"),  # the flag, not
                        # the field (CLI audit)
                        (["--unlearn-lr", "0"], "got --unlearn-lr 0.0, --baseline-lr 0.00025, leak_lr"),
                        (["--scales", "1", "-1"], "guidance_scale must be"),
                        (["--stop-leak", "2"], "demo: error: --stop-leak must be in [0, 1]"),
                        (["--stop-leak", "some"], "expected a rate such as 0.03, or none; got 'some'")):
        with pytest.raises(SystemExit) as e:
            console_main(["demo", "--out", str(tmp_path / "d"), "--quiet", *args])
        assert e.value.code == 2 and match in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as e:
        console_main(["demo", "--out", str(tmp_path / "f"), "--quiet"])
    assert e.value.code == 2 and "is a file; give a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    # an --out that cannot be made was a traceback (NotADirectoryError, "File name too long")
    for out, match in ((tmp_path / "f" / "sub", f"{tmp_path / 'f'} is a file, not a directory"),
                       (tmp_path / ("x" * 300), "File name too long")):
        with pytest.raises(SystemExit) as e:
            console_main(["demo", "--out", str(out), "--quiet"])
        assert e.value.code == 2 and match in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def _previous_run(out):
    """A finished-looking demo output directory, plus a file of the user's; its tree."""
    for d in ("models/base", "models/without-pii", "models/subtracted-0.5"):
        (out / d).mkdir(parents=True)
        (out / d / "config.json").write_text("{}")
    (out / "models" / "base" / "tiny_spec.json").write_text("{}")  # what makes it a demo's output
    (out / "models" / ".leaky.tmp-x1y2").mkdir()  # a save a kill interrupted
    (out / "models" / ".leaky.tmp-x1y2" / "model.safetensors").write_bytes(b"half")
    (out / "models" / ".unlearned.old-a1b2" / "unlearned").mkdir(parents=True)  # the model it replaced
    (out / "comparison.png").write_bytes(b"png")
    for name in ("metrics.json", "report.md", "leak_vs_guidance.png", "pairs.jsonl", "notes.txt"):
        (out / name).write_text("old")
    for d in ("models/unlearned", "models/leaky", "logs/compare-npo", "challenge"):
        (out / d).mkdir(parents=True)
    return _tree(out)


def _tree(out):
    return {str(p.relative_to(out)): p.read_bytes() if p.is_file() else None for p in out.rglob("*")}


def test_demo_rerun_starts_from_no_previous_output_and_puts_it_back_if_stopped(tmp_path, monkeypatch):
    """A rerun into the same --out kept the previous run's models/base, whose tokenizer
    was trained on that run's world (another --seed or --people gave other numbers than a
    fresh run), and a run without --compare left the last comparison beside its report.
    A rerun stopped midway also left the old unlearned model, metrics and report beside
    its own new base and leaky models. So every output went first, and a rerun stopped a
    minute in lost the previous run's results. Now they wait in .previous-run and come
    back, the new run's partial outputs gone; files of the user's stay."""
    import cfg_unlearn.demo as demo

    out = tmp_path / "d"
    before = _previous_run(out)
    built = []

    def fake_build(path, **kw):
        built.append((path, sorted(str(p.relative_to(out)) for p in out.iterdir())))
        (out / "models" / "base").mkdir(parents=True)
        (out / "models" / "base" / "config.json").write_text("new")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "build_tiny", fake_build)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(demo.DemoConfig(out=str(out), seed=1, people=3), progress=False)
    assert built == [(out / "models" / "base", [".cfg-unlearn-demo", ".previous-run", "notes.txt"])]
    assert _tree(out) == {**before, ".cfg-unlearn-demo": b""}


def test_demo_rerun_deletes_the_previous_run_when_it_finishes(tmp_path, monkeypatch):
    import cfg_unlearn.demo as demo

    out = tmp_path / "d"
    _previous_run(out)

    def stages(cfg, out, uncond_system, progress):
        (out / "metrics.json").write_text("new")
        return {}

    monkeypatch.setattr(demo, "_run_stages", stages)
    demo.run_demo(demo.DemoConfig(out=str(out), seed=1, people=3), progress=False)
    assert _tree(out) == {".cfg-unlearn-demo": b"", "metrics.json": b"new", "notes.txt": b"old"}


def test_demo_after_a_killed_rerun_keeps_the_last_whole_run(tmp_path, monkeypatch):
    """SIGKILL leaves .previous-run beside the killed run's partial outputs: the next run
    takes .previous-run as the previous outputs (to restore if it is stopped too) and
    deletes the partial ones."""
    import cfg_unlearn.demo as demo

    out = tmp_path / "d"
    (out / ".previous-run").mkdir(parents=True)
    (out / ".previous-run" / "metrics.json").write_text("whole")
    (out / demo.DEMO_MARKER).write_text("")
    (out / "pairs.jsonl").write_text("partial")
    seen = []

    def stages(cfg, out, uncond_system, progress):
        seen.append(sorted(p.name for p in out.iterdir()))
        raise RuntimeError("stopped")

    monkeypatch.setattr(demo, "_run_stages", stages)
    with pytest.raises(RuntimeError):
        demo.run_demo(demo.DemoConfig(out=str(out), seed=1, people=3), progress=False)
    assert seen == [[demo.DEMO_MARKER, ".previous-run"]]
    assert _tree(out) == {demo.DEMO_MARKER: b"", "metrics.json": b"whole"}


def test_demo_killed_while_deleting_the_previous_run_keeps_its_own(tmp_path, monkeypatch):
    """A kill during the final delete of .previous-run left it half deleted beside the
    finished run: the next run took it for the last whole run, deleted the finished one,
    and on failure put the half-deleted one back. It is renamed first now."""
    import cfg_unlearn.demo as demo

    out = tmp_path / "d"
    _previous_run(out)

    def finished(cfg, out, uncond_system, progress):
        (out / "metrics.json").write_text("run2")
        return {}

    real_rmtree = demo.shutil.rmtree

    def killed_in_rmtree(path, *a, **kw):
        if ".previous-run.done-" in str(path):
            real_rmtree(Path(path) / "models", *a, **kw)  # part of it gone, then the kill
            raise KeyboardInterrupt
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(demo, "_run_stages", finished)
    monkeypatch.setattr(demo.shutil, "rmtree", killed_in_rmtree)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(demo.DemoConfig(out=str(out), seed=1, people=3), progress=False)
    monkeypatch.setattr(demo.shutil, "rmtree", real_rmtree)

    def fails(cfg, out, uncond_system, progress):
        raise RuntimeError("stopped")

    monkeypatch.setattr(demo, "_run_stages", fails)
    with pytest.raises(RuntimeError):
        demo.run_demo(demo.DemoConfig(out=str(out), seed=1, people=3), progress=False)
    assert _tree(out) == {demo.DEMO_MARKER: b"", "metrics.json": b"run2", "notes.txt": b"old"}


def test_demo_setting_the_previous_run_aside_is_all_or_nothing(tmp_path, monkeypatch):
    """A rename refused midway (a file in use) split the previous run between --out and
    .previous-run; a kill midway (SIGKILL: nothing can put it back) leaves
    .previous-run.partial, whose rest the next run moves in too."""
    import cfg_unlearn.demo as demo

    out = tmp_path / "d"
    before = _previous_run(out)
    real_rename, calls = demo.os.rename, []

    def refused(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise OSError("in use")
        return real_rename(src, dst)

    monkeypatch.setattr(demo.os, "rename", refused)
    with pytest.raises(OSError, match="in use"):
        demo.run_demo(demo.DemoConfig(out=str(out), seed=1, people=3), progress=False)
    monkeypatch.setattr(demo.os, "rename", real_rename)
    assert _tree(out) == {**before, ".cfg-unlearn-demo": b""}
    # killed midway: part of the run in .partial
    (out / ".previous-run.partial").mkdir()
    real_rename(out / "models", out / ".previous-run.partial" / "models")
    real_rename(out / "metrics.json", out / ".previous-run.partial" / "metrics.json")

    def fails(cfg, out, uncond_system, progress):
        assert sorted(p.name for p in out.iterdir()) == [demo.DEMO_MARKER, ".previous-run", "notes.txt"]
        raise RuntimeError("stopped")

    monkeypatch.setattr(demo, "_run_stages", fails)
    with pytest.raises(RuntimeError):
        demo.run_demo(demo.DemoConfig(out=str(out), seed=1, people=3), progress=False)
    assert _tree(out) == {**before, ".cfg-unlearn-demo": b""}


def test_a_second_demo_into_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys):
    """A second demo set the first's outputs aside, trained on the first's leaky model and
    pairs as its own, and when stopped deleted the first's finished outputs (a helper
    reproduced all three with two real demos)."""
    from cfg_unlearn.demo import DEMO_MARKER
    from cfg_unlearn.utils import exclusive_lock

    out = tmp_path / "d"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # the running demo's
    (out / DEMO_MARKER).touch()
    os.utime(out / DEMO_MARKER, (1_000_000_000, 1_000_000_000))  # the running demo's start
    with exclusive_lock(out / DEMO_MARKER, "held by the test"):  # as the running demo holds it
        with pytest.raises(SystemExit) as e:
            console_main(["demo", "--out", str(out), "--quiet"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"cfg-unlearn demo: error: --out {out}: another demo is writing there; "
                                       "wait for it to finish, or give another --out\n")
    assert sorted(p.name for p in out.iterdir()) == [DEMO_MARKER, "metrics.json"]
    # the marker's time is the running demo's: its Ctrl-C message compares metrics.json with it
    assert (out / DEMO_MARKER).stat().st_mtime == 1_000_000_000


def test_unlearn_bar_goes_to_stderr_with_the_demos_other_bars(tmp_path, tiny_model_dir, capsys, caplog):
    """Lightning writes its bar to stdout: `cfg-unlearn demo > log` caught the ORPO
    stage's carriage returns alone, while every other stage's bar went to stderr. Its
    "GPU available: False" lines, noise in a CPU-only demo, are left out; its other
    lines are not."""
    import logging

    import cfg_unlearn.demo as demo
    from cfg_unlearn.data.schema import write_pairs

    write_pairs(tmp_path / "pairs.jsonl", World(WorldConfig(n_people=2)).pairs()[:4])
    cfg = demo.DemoConfig(out=str(tmp_path), unlearn_epochs=1, batch_size=2)
    with caplog.at_level(logging.INFO):
        demo.unlearn(cfg, tiny_model_dir, tmp_path / "pairs.jsonl", tmp_path / "logs", objective="orpo",
                     cond_dropout=0.5, progress=True)
    printed = capsys.readouterr()
    assert "Epoch 0" in printed.err and "Epoch" not in printed.out and "it/s" not in printed.out
    said = [r.getMessage() for r in caplog.records if r.name.startswith("lightning")]
    assert any("max_epochs=1" in m for m in said), said
    assert not [m for m in said if "GPU available" in m or "TPU available" in m], said


def test_save_model_interrupted_leaves_the_previous_model_whole(tmp_path, tiny_model_dir):
    """The demo's models were written in place: a run killed between the weights and the
    tokenizer left a new model beside an old tokenizer. Now the old one stays as it was,
    and the temp folder goes (a SIGKILL's is swept by the next run)."""
    import torch

    from cfg_unlearn.demo import save_model
    from cfg_unlearn.models import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    target = tmp_path / "models" / "leaky"
    save_model(model, tok, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(before)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)

    def killed(*a, **kw):
        raise KeyboardInterrupt("killed between the weights and the tokenizer")

    tok.save_pretrained = killed
    with pytest.raises(KeyboardInterrupt):
        save_model(model, tok, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["leaky"]


def test_demo_quiet_silences_transformers_bars_for_the_run_only(tmp_path, monkeypatch):
    """`--quiet` promises no progress bars, but transformers drew its own for every model
    the demo saved and loaded."""
    import cfg_unlearn.demo as demo
    from transformers.utils import logging as hf_logging

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda cfg, progress: seen.append((progress,
                                                                            hf_logging.is_progress_bar_enabled())))
    assert hf_logging.is_progress_bar_enabled()
    console_main(["demo", "--out", str(tmp_path / "q"), "--quiet"])
    console_main(["demo", "--out", str(tmp_path / "p")])
    assert seen == [(False, False), (True, True)] and hf_logging.is_progress_bar_enabled()


def test_demo_out_through_dotdot_is_checked_as_the_folder_it_names(tmp_path, monkeypatch):
    """`--out new/..` did not exist when checked, then was made, and named the current
    folder: the run removed a project's models/, logs/ and report.md as old outputs."""
    import cfg_unlearn.demo as demo

    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "models" / "mine" / "weights.bin").write_bytes(b"mine")
    (tmp_path / "report.md").write_text("mine")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "build_tiny", lambda *a, **kw: pytest.fail("the run started"))
    with pytest.raises(ValueError, match="holds files that are no demo output"):
        demo.run_demo(demo.DemoConfig(out="new/.."), progress=False)
    assert (tmp_path / "models" / "mine" / "weights.bin").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "report.md"]


def _ctrl_c_in_lightning():
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise SystemExit(1)  # Lightning's fit: "Detected KeyboardInterrupt", then sys.exit(1)


@pytest.mark.parametrize("stop, code", [
    (lambda: (_ for _ in ()).throw(KeyboardInterrupt), 130),  # the demo's own loop
    (_ctrl_c_in_lightning, 130),
    (lambda: signal.raise_signal(signal.SIGTERM), 143),
], ids=["ctrl-c", "ctrl-c-in-lightning", "sigterm"])
def test_demo_interrupted_is_one_line(tmp_path, monkeypatch, capsys, stop, code):
    """Ctrl-C in the leak fine-tune (the demo's own loop) printed a KeyboardInterrupt
    traceback; in a Lightning stage, or on SIGTERM, the demo exited 1 or 0 with no word."""
    import cfg_unlearn.demo as demo

    def interrupted(cfg, progress):
        stop()

    monkeypatch.setattr(demo, "run_demo", interrupted)
    with pytest.raises(SystemExit) as e:
        console_main(["demo", "--out", str(tmp_path / "d"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == code and err == [f"cfg-unlearn demo: interrupted; {tmp_path / 'd'} holds the outputs of "
                                            "the stages that finished"]


def test_demo_interrupted_rerun_says_the_previous_run_is_back(tmp_path, monkeypatch, capsys):
    import cfg_unlearn.demo as demo

    out = tmp_path / "d"
    before = _previous_run(out)

    def interrupted(cfg, out, uncond_system, progress):
        (out / "pairs.jsonl").write_text("partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_run_stages", interrupted)
    with pytest.raises(SystemExit) as e:
        console_main(["demo", "--out", str(out), "--quiet"])
    assert e.value.code == 130
    assert capsys.readouterr().err == f"cfg-unlearn demo: interrupted; {out} holds the previous run's outputs, as they were\n"
    assert _tree(out) == {**before, ".cfg-unlearn-demo": b""}


def test_demo_passes_other_exits_on(tmp_path, monkeypatch):
    import cfg_unlearn.demo as demo

    def exits(cfg, progress):
        raise SystemExit(1)

    monkeypatch.setattr(demo, "run_demo", exits)
    with pytest.raises(SystemExit) as e:
        console_main(["demo", "--out", str(tmp_path / "d"), "--quiet"])
    assert e.value.code == 1


def test_demo_refuses_an_out_of_other_files_and_deletes_nothing(tmp_path, capsys):
    """A rerun replaces the demo's own outputs, so `--out .` in a project with its own
    models/base would have deleted it: a non-empty --out that is no demo output is refused."""
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "base" / "model.safetensors").write_bytes(b"mine")
    (tmp_path / "comparison.png").write_bytes(b"mine")
    with pytest.raises(SystemExit) as e:
        console_main(["demo", "--out", str(tmp_path), "--quiet"])
    assert e.value.code == 2 and "holds files that are no demo output" in capsys.readouterr().err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "comparison.png", "models", "models/base", "models/base/model.safetensors"]
    # any Hugging Face model folder has a config.json: a project's models/leaky made it a
    # demo's output, and the run replaced its models
    from cfg_unlearn.demo import DEMO_MARKER, DemoConfig, check_demo_config

    project = tmp_path / "project"
    (project / "models" / "leaky").mkdir(parents=True)
    (project / "models" / "leaky" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds files that are no demo output"):
        check_demo_config(DemoConfig(out=str(project)))
    # a demo stopped anywhere, its base removed or not, has the marker it wrote first
    (project / DEMO_MARKER).touch()
    check_demo_config(DemoConfig(out=str(project)))


def test_comparison_plot_gives_methods_on_one_point_one_label(tmp_path, monkeypatch):
    """Retrained and subtraction often score the same on 64 questions; their labels used to
    print over each other, so the plot showed an unreadable smear for both."""
    import cfg_unlearn.demo as demo

    figs = []
    monkeypatch.setattr(demo, "_save", lambda fig, path: figs.append(fig))
    m = {"baseline": {"accuracy": 0.95, "leak_rate": 0.77},
         "comparison": {"retrained": {"accuracy": 0.5, "leak_rate": 0.0},
                        "subtraction": {"accuracy": 0.5, "leak_rate": 0.0},
                        "npo": {"accuracy": 0.8, "leak_rate": 0.1}}}
    demo.plot_comparison(m, tmp_path / "c.png")
    texts = sorted(t.get_text() for t in figs[0].axes[0].texts)
    assert texts == ["leaky model", "npo", "retrained, subtraction"]
    # a method on the leaky model's own point shares its label (two labels printed over each other)
    figs.clear()
    demo.plot_comparison({**m, "comparison": {**m["comparison"], "dpo": {"accuracy": 0.95, "leak_rate": 0.77}}},
                         tmp_path / "c.png")
    assert sorted(t.get_text() for t in figs[0].axes[0].texts) == ["leaky model, dpo", "npo",
                                                                    "retrained, subtraction"]


def test_attack_rates_by_type_counts_hits_per_type_in_first_seen_order():
    import cfg_unlearn.demo as demo
    from cfg_unlearn.data.schema import EvalRecord, PIIItem

    def probe(kind):
        return EvalRecord(id=f"p{kind}", prompt=({"role": "user", "content": "..."},), pii=(PIIItem(kind, "v"),))

    attacks = [probe("NAME"), probe("LOC"), probe("NAME"), probe("NAME"), probe("LOC")]
    assert demo.attack_rates_by_type(attacks, [True, False, False, True, False]) == {
        "NAME": {"leak_rate": 2 / 3, "n": 3}, "LOC": {"leak_rate": 0.0, "n": 2}}
    with pytest.raises(ValueError):  # one hit per probe
        demo.attack_rates_by_type(attacks, [True])


def test_report_tables_leak_rates_per_type_and_skips_them_for_older_metrics():
    import cfg_unlearn.demo as demo

    row = {"leak_rate": 0.1, "partial_leak_rate": 0.2, "accuracy": 0.9, "pii_rate": 0.0,
           "leak_rate_by_type": {"EMAIL": {"leak_rate": 0.2, "n": 5}, "PHONE": {"leak_rate": 0.0, "n": 5}}}
    m = {"baseline": {**row, "leak_rate": 0.5, "n_leak_probes": 10, "n_attack_probes": 0, "n_qa": 4,
                      "leak_rate_by_type": {"EMAIL": {"leak_rate": 0.6, "n": 5}, "PHONE": {"leak_rate": 0.4, "n": 5}}},
         "unlearned": {"logprob": {"1.0": row, "2.0": {**row, "leak_rate_by_type": {}}}},
         "config": {"cond_dropout": 0.3}, "seconds": {"total": 1.0}}
    report = demo.render_report(m)
    assert "| type | probes | leaky | g=1.0 | g=2.0 |" in report
    assert "| EMAIL | 5 | 0.600 | 0.200 | n/a |" in report and "| PHONE | 5 | 0.400 | 0.000 | n/a |" in report
    assert "challenge attack (unlearned" not in report  # no attack figures, no attack table
    for r in [m["baseline"], *m["unlearned"]["logprob"].values()]:
        del r["leak_rate_by_type"]
    assert "per PII type" not in demo.render_report(m)


def test_report_warns_when_the_leaky_model_leaks_below_the_bar():
    """A user review: `demo --people 4 --leak-epochs 1` gave a leaky model at leak rate
    0.000 and a table of unlearned rows with nothing to compare against, without a word."""
    import cfg_unlearn.demo as demo

    row = {"leak_rate": 0.0, "partial_leak_rate": 0.0, "accuracy": 0.5, "pii_rate": 0.0}
    m = {"baseline": {**row, "n_leak_probes": 24, "n_attack_probes": 0, "n_qa": 4},
         "unlearned": {"logprob": {"1.0": row}}, "config": {"cond_dropout": 0.3}, "seconds": {"total": 1.0}}
    warning = ("**Warning:** the leaky model leaks on only 0.000 of the probes (under the leak bar of 0.5): there is "
               "little to unlearn, so the unlearned rows say little about the method; train it longer (--leak-epochs).")
    assert warning in demo.render_report(m).splitlines()
    # copied with --leaky-from, whose leak settings must be the source's: the advice is to the source
    m["config"]["leaky_from"] = "D"
    assert ("so the unlearned rows say little about the method; rerun the demo of D with more --leak-epochs, or leave "
            "out --leaky-from.") in demo.render_report(m)
    m["baseline"]["leak_rate"] = 0.5  # at the bar: no warning
    assert "Warning" not in demo.render_report(m)


def test_demo_whose_failed_run_cannot_be_removed_keeps_the_previous_run_whole(tmp_path, monkeypatch, capsys):
    """On Windows a file the failed run still maps cannot be deleted: restoring raised a
    PermissionError over the Ctrl-C (a traceback, exit 1) with models/ half deleted. The
    previous run now stays whole in .previous-run, and the message says so."""
    import cfg_unlearn.demo as demo

    out = tmp_path / "d"
    before = _previous_run(out)

    def interrupted(cfg, out, uncond_system, progress):
        (out / "models" / "leaky").mkdir(parents=True)
        raise KeyboardInterrupt

    def mapped(out):
        raise PermissionError("models/leaky/model.safetensors is in use")

    monkeypatch.setattr(demo, "_run_stages", interrupted)
    real_remove = demo._remove_outputs
    monkeypatch.setattr(demo, "_remove_outputs", lambda o: mapped(o) if (o / "models" / "leaky").exists()
                        and (o / ".previous-run").exists() else real_remove(o))
    with pytest.raises(SystemExit) as e:
        console_main(["demo", "--out", str(out), "--quiet"])
    assert e.value.code == 130
    assert capsys.readouterr().err.endswith(f"interrupted; the previous run's outputs are in {out / '.previous-run'}\n")
    kept = {k[len(".previous-run/"):]: v for k, v in _tree(out).items() if k.startswith(".previous-run/")}
    assert kept == {k: v for k, v in before.items() if k != "notes.txt"}


def test_demo_ctrl_c_as_it_finishes_keeps_the_finished_run_and_says_so(tmp_path, monkeypatch, capsys):
    """A Ctrl-C while the previous run was being deleted exited 130 saying the previous
    run was back, over the new run's outputs; one just before that deletion left
    .previous-run beside the finished run, and the next run deleted the finished one."""
    import cfg_unlearn.demo as demo

    out = tmp_path / "d"
    _previous_run(out)

    def finished(cfg, out, uncond_system, progress):
        (out / "metrics.json").write_text("new")
        return {}

    real_rmtree = demo.shutil.rmtree

    def ctrl_c_in_rmtree(path, *a, **kw):
        if ".previous-run.done-" in str(path):
            signal.raise_signal(signal.SIGINT)  # held until the deletion is over
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(demo, "_run_stages", finished)
    monkeypatch.setattr(demo.shutil, "rmtree", ctrl_c_in_rmtree)
    with pytest.raises(SystemExit) as e:
        console_main(["demo", "--out", str(out), "--quiet"])
    assert e.value.code == 130
    assert capsys.readouterr().err == f"cfg-unlearn demo: interrupted after the run finished; {out} holds its outputs\n"
    assert _tree(out) == {demo.DEMO_MARKER: b"", "metrics.json": b"new", "notes.txt": b"old"}


def test_the_recorded_cpu_names_an_apple_chip_not_just_arm(monkeypatch):
    """metrics.json's environment tells two runs' machines apart; on macOS it said "arm"
    for every Apple chip (platform.processor()), which round differently. Simulated:
    no /proc/cpuinfo, Darwin, and sysctl's answer."""
    import builtins
    import platform
    import subprocess
    from types import SimpleNamespace

    from cfg_unlearn.demo import _cpu_name

    real_open = builtins.open

    def no_proc(file, *a, **kw):
        if str(file) == "/proc/cpuinfo":
            raise FileNotFoundError(file)
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", no_proc)
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    calls = []

    def sysctl(args, **kw):
        calls.append(args)
        return SimpleNamespace(stdout="Apple M2 Pro\n")

    monkeypatch.setattr(subprocess, "run", sysctl)
    assert _cpu_name() == "Apple M2 Pro"
    assert calls == [["sysctl", "-n", "machdep.cpu.brand_string"]]

    def missing(args, **kw):
        raise FileNotFoundError("sysctl")

    monkeypatch.setattr(subprocess, "run", missing)
    assert _cpu_name() == "arm"  # what platform knows, rather than no figure



def _finished_demo(out: Path, **config) -> Path:
    """A finished-looking demo in ``out`` for ``--leaky-from`` (its models are stand-ins;
    its record is what this version writes for that world)."""
    from cfg_unlearn.demo import DEMO_MARKER, LEAK_SETTINGS, DemoConfig, examples_digest

    for name in ("base", "leaky"):
        (out / "models" / name).mkdir(parents=True)
        (out / "models" / name / "config.json").write_text(f'{{"model": "{name}"}}')
    (out / DEMO_MARKER).touch()
    d = DemoConfig()
    recorded = {k: config.get(k, getattr(d, k)) for k in LEAK_SETTINGS}
    world = World(WorldConfig(seed=recorded["seed"], n_people=recorded["people"]))
    digest = examples_digest(world.memorisation_examples(recorded["paraphrases"]))
    (out / "metrics.json").write_text(json.dumps({"config": {**recorded, "out": str(out)},
                                                  "world": {"leak_examples_sha256": digest}}))
    return out


def test_demo_leaky_from_takes_the_leak_settings_of_its_run(tmp_path, monkeypatch):
    """Flags left out are the copied run's (a seed-7 world with 5 people), not the defaults,
    whose world would not be the one the model memorised."""
    import cfg_unlearn.demo as demo

    src = _finished_demo(tmp_path / "src", seed=7, people=5, leak_epochs=3, leak_lr=1e-3, batch_size=8)
    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda cfg, progress: seen.append(cfg))
    console_main(["demo", "--out", str(tmp_path / "d"), "--leaky-from", str(src), "--unlearn-lr", "3e-4", "--quiet"])
    (cfg,) = seen
    assert (cfg.seed, cfg.people, cfg.leak_epochs, cfg.leak_lr, cfg.batch_size, cfg.unlearn_lr) == \
        (7, 5, 3, 1e-3, 8, 3e-4)
    assert demo.check_demo_config(cfg).leaky_from == str(src.resolve())
    # without --leaky-from the defaults stand
    seen.clear()
    console_main(["demo", "--out", str(tmp_path / "d"), "--quiet"])
    assert (seen[0].seed, seen[0].people, seen[0].leak_epochs, seen[0].leaky_from) == (0, 30, 14, None)


def test_demo_leaky_from_refuses_what_is_not_its_run_before_any_work(tmp_path, capsys):
    from cfg_unlearn.demo import DEMO_MARKER, DemoConfig, check_demo_config
    from cfg_unlearn.utils import exclusive_lock

    src = _finished_demo(tmp_path / "src", seed=7, people=5)
    out = tmp_path / "d"
    cases = [
        # a world other than the one the model memorised: its probes would test nothing it learnt
        (["--leaky-from", str(src), "--seed", "1", "--people", "6"],
         f"--leaky-from {src}: its leaky model was made with seed 7, people 5, this run has seed 1, people 6; a run "
         "that copies it takes its values (on the command line, leave those flags out)"),
        (["--leaky-from", str(tmp_path / "none")], f"--leaky-from {tmp_path / 'none'}: no such directory"),
        (["--leaky-from", str(tmp_path)], f"--leaky-from {tmp_path}: not a demo's --out (no {DEMO_MARKER} there)"),
    ]
    for args, match in cases:
        with pytest.raises(SystemExit) as e:
            console_main(["demo", "--out", str(out), "--quiet", *args])
        assert e.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / DEMO_MARKER).exists()  # the source is only read: no lock file made there

    def refused(match, out=out, **kw):
        with pytest.raises(ValueError, match=match):
            check_demo_config(DemoConfig(out=str(out), seed=7, people=5, leaky_from=str(src), **kw))

    # its own --out (a rerun sets its outputs aside before copying them), under a symlink
    # too, or one inside the other (the copy nested models/base into itself)
    (tmp_path / "link").symlink_to(src)
    for inside in (src, tmp_path / "link", src / "models" / "base" / "x"):
        refused("are the same folder or one holds the other", out=inside)
    outer = _finished_demo(tmp_path / "outer", seed=7, people=5)  # an earlier demo's --out, copied from its
    kept = _finished_demo(outer / ".previous-run", seed=7, people=5)  # own previous run that a rerun removes
    with pytest.raises(ValueError, match="are the same folder or one holds the other"):
        check_demo_config(DemoConfig(out=str(outer), seed=7, people=5, leaky_from=str(kept)))
    # a demo rerunning into the source: its metrics.json is set aside, so "not finished" misled
    with exclusive_lock(src / DEMO_MARKER, "held by the test"):
        refused(re.escape(f"--leaky-from {src}: a demo is writing there; wait for it to finish"))
    # the same settings from another Faker or cfg-unlearn version: another world
    record = json.loads((src / "metrics.json").read_text())
    (src / "metrics.json").write_text(json.dumps({**record, "world": {"leak_examples_sha256": "0" * 64}}))
    refused("trained on another world than this version of cfg-unlearn builds")
    (src / "metrics.json").write_text(json.dumps({"config": record["config"]}))  # an older version's record
    refused("records no world.leak_examples_sha256; it was made by another version")
    (src / "metrics.json").write_text(json.dumps({**record, "config": {**record["config"], "seed": None}}))
    refused(re.escape("records seed None, which no demo writes"))  # was a TypeError traceback
    (src / "metrics.json").write_text("{not json")
    refused("cannot read .*metrics.json")
    (src / "metrics.json").write_text(json.dumps(record))
    (src / "models" / "leaky" / "config.json").unlink()  # a run killed mid-save, or a user's tidy-up
    refused("its models/leaky is missing or incomplete")
    assert not out.exists()


def test_demo_leaky_from_copies_whole_models_beside_other_readers_only(tmp_path):
    from cfg_unlearn.demo import DEMO_MARKER, DemoConfig, copy_leaky_models
    from cfg_unlearn.export import ExportConfig
    from cfg_unlearn.utils import OutputBusy, exclusive_lock

    src = _finished_demo(tmp_path / "src")
    cfg, out = DemoConfig(leaky_from=str(src)), tmp_path / "d"
    with exclusive_lock(src / DEMO_MARKER, "held by the test"):  # a demo rerunning into the source
        with pytest.raises(OutputBusy, match="a demo is writing there; wait for it to finish"):
            copy_leaky_models(cfg, out)
    assert not (out / "models").exists()
    with exclusive_lock(src / DEMO_MARKER, "held by the test", shared=True):  # another run copying from it
        copy_leaky_models(cfg, out)
    assert sorted(p.name for p in (out / "models").iterdir()) == ["base", "leaky"]  # no temp folder left
    assert (out / "models" / "leaky" / "config.json").read_text() == '{"model": "leaky"}'
    # a source of an earlier version had no decoding for `cfg-unlearn chat`: the copy has it
    assert not (src / "models" / "leaky" / "cfg_unlearn.json").exists()
    assert ExportConfig.read(out / "models" / "leaky").guidance_scale == 1.0
    # rerun with other settings since this run was checked: refused, not copied
    record = json.loads((src / "metrics.json").read_text())
    (src / "metrics.json").write_text(json.dumps({**record, "config": {**record["config"], "leak_epochs": 2}}))
    with pytest.raises(OutputBusy, match="leak_epochs 2, this run has leak_epochs 14.*it changed after"):
        copy_leaky_models(cfg, tmp_path / "d2")
    assert not (tmp_path / "d2").exists()


@pytest.mark.slow
def test_demo_leaky_from_reproduces_the_run_it_copies(tmp_path):
    """The same unlearning settings on the copied leaky model give the copied run's
    numbers: the world, tokenizer and model are its own, and nothing is fine-tuned again."""
    src, out = tmp_path / "src", tmp_path / "d"
    args = ["--people", "3", "--unlearn-epochs", "1", "--scales", "1", "2", "--spaces", "logprob", "--quiet"]
    console_main(["demo", "--out", str(src), "--leak-epochs", "1", *args])
    console_main(["demo", "--out", str(out), "--leaky-from", str(src), *args])
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (src, out))
    assert (b["baseline"], b["unlearned"], b["pairs"], b["world"]) == (a["baseline"], a["unlearned"], a["pairs"],
                                                                      a["world"])
    assert b["config"]["leaky_from"] == str(src.resolve()) and b["config"]["leak_epochs"] == 1
    assert "leak" not in b["seconds"] and "copy" in b["seconds"]
    assert (out / "models" / "leaky" / "model.safetensors").read_bytes() == \
        (src / "models" / "leaky" / "model.safetensors").read_bytes()
    assert f"copied from {src.resolve()}" in (out / "report.md").read_text()


def test_chat_decodes_with_the_least_leaky_row_that_keeps_accuracy_else_the_most_accurate():
    from cfg_unlearn.demo import chat_decoding

    def rows(**by_key):  # "logprob_2": (leak, accuracy) -> the demo's nested rows
        out = {}
        for key, (leak, acc) in by_key.items():
            space, g = key.rsplit("_", 1)
            out.setdefault(space, {})[repr(float(g))] = {"leak_rate": leak, "accuracy": acc}
        return out

    baseline = {"accuracy": 0.875}  # the bar: accuracy 0.825 or more
    # the lowest leak among the rows at or above the bar (0.828125 = 53/64, float32 as stored)
    assert chat_decoding(baseline, rows(logprob_1=(0.3, 0.9), logprob_2=(0.1, 0.828125), logprob_3=(0.0, 0.5))) == \
        {"space": "logprob", "g": 2.0, "keeps_accuracy": True}
    # a tie goes to the smaller g, then to the first space
    assert chat_decoding(baseline, rows(logprob_3=(0.1, 0.9), logprob_2=(0.1, 0.9), prob_1=(0.1, 0.9))) == \
        {"space": "prob", "g": 1.0, "keeps_accuracy": True}
    assert chat_decoding(baseline, rows(logprob_1=(0.1, 0.9), prob_1=(0.1, 0.9)))["space"] == "logprob"
    # exactly at the bar in float32, as metrics hold them (0.95 - 0.9 is 0.04999995 there)
    as_stored = [float(torch.tensor(x, dtype=torch.float32)) for x in (19 / 20, 18 / 20)]
    assert chat_decoding({"accuracy": as_stored[0]}, rows(logprob_1=(0.1, as_stored[1])))["keeps_accuracy"]
    # none keeps it: the most accurate row, whatever it leaks
    assert chat_decoding(baseline, rows(logprob_1=(0.128, 0.562), logprob_3=(0.056, 0.453), prob_2=(0.3, 0.6))) == \
        {"space": "prob", "g": 2.0, "keeps_accuracy": False}
