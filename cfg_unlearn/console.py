"""The ``cfg-unlearn`` console script: the project's own commands (demo, generate,
build-tiny, and export, chat, subtract and saft from their modules) beside ``fit`` and
``validate``, which go to the LightningCLI of :mod:`cfg_unlearn.cli`.

Nothing heavy is imported here at module level: ``cfg-unlearn --version``, a mistyped
command and most ``--help`` pages answer without loading Lightning (about 6 s on a
laptop CPU); each command imports what it needs once its arguments parse."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from cfg_unlearn.utils import (ConfigError, OutputBusy, Terminated, atomic_write_files, check_writable_file,
                               command_parser, console_logging, exit_with_error, hf_progress_bars_off,
                               our_warnings_as_lines, sigterm_raises)

#: LightningCLI's subcommands kept: the module scores pairs only in training and
#: validation steps (``validate`` is the scoring run, GuidanceEval included), so ``test``
#: and ``predict`` would fail after loading the model; argparse refuses them up front
TRAINER_SUBCOMMANDS = ("fit", "validate")


class _NoAdvertisement(logging.Filter):
    """Drops Lightning 2.6's "💡 Tip: ... try installing litlogger" line, printed by every
    Trainer without a LitLogger: an advertisement, not news about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


_NO_ADVERTISEMENT = _NoAdvertisement()


def quiet_third_party_warnings() -> None:
    our_warnings_as_lines()
    # Deprecation chatter from inside jsonargparse/Lightning is not actionable by users.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jsonargparse.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"jsonargparse.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # the empty list PairDataModule.val_dataloader returns when a fit has no validation pairs
    # (data.val_fraction: 0); GuidanceEval says so in words ("this fit runs no validation")
    # (anchored: Lightning's "..., but local rank has zero length" about uneven shards stays)
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero\. Please make sure")
    # rank_zero_info logs through the logger of whichever of fabric / pytorch was imported last
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NO_ADVERTISEMENT)  # a filter is added once, however often called


def as_flags(message: str, parser: argparse.ArgumentParser) -> str:
    """A Python-API check's message with the settings it names spelled as the command's
    flags: ``batch_size must be >= 1`` reads ``--batch-size must be >= 1`` (a name with an
    underscore anywhere, a plain word only before "must", so "one space" stays prose)."""
    import re

    flags = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}

    def flag(m: re.Match) -> str:
        name = m.group(0)
        ours = name in flags and flags[name].startswith("--")
        return flags[name] if ours and ("_" in name or message[m.end():].startswith(" must")) else name

    return re.sub(r"\b[a-z][a-z0-9_]*\b", flag, message)


def lightning_interrupted(e: SystemExit) -> bool:
    """Whether ``e`` is Lightning's exit after a Ctrl-C: it shuts the run down, then
    calls ``exit(1)`` inside its ``except KeyboardInterrupt``."""
    return e.code == 1 and isinstance(e.__context__, KeyboardInterrupt)


def _build_tiny(argv: list[str]) -> None:
    from cfg_unlearn.tiny import TinySpec, build_tiny

    p = command_parser(prog="cfg-unlearn build-tiny", description="Build the offline tiny model.")
    p.add_argument("--out", required=True, help="directory to create (must not exist)")
    p.add_argument("--vocab-size", type=int, default=TinySpec.vocab_size,
                   help="tokens to learn (default %(default)s); the byte alphabet and special tokens set a floor, "
                   "and a small corpus may hold fewer: the size built is recorded in tiny_spec.json")
    p.add_argument("--hidden-size", type=int, default=TinySpec.hidden_size, help="model width (default %(default)s)")
    p.add_argument("--layers", type=int, default=TinySpec.num_hidden_layers, dest="num_hidden_layers", metavar="LAYERS",
                   help="transformer blocks (default %(default)s)")
    p.add_argument("--seed", type=int, default=TinySpec.seed, help="seed of the random weights (default %(default)s)")
    a = p.parse_args(argv)
    if os.path.exists(a.out):
        p.error(f"{a.out} already exists")
    try:
        spec = TinySpec(vocab_size=a.vocab_size, hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers,
                        seed=a.seed)
    except ValueError as e:  # TinySpec's fields, spelled as the flags
        p.error(as_flags(str(e), p))
    print(build_tiny(a.out, spec=spec))


def _generate(argv: list[str]) -> None:
    import json
    import logging

    import torch

    from cfg_unlearn.data.generate import (
        DEFAULT_FALLBACK,
        check_context,
        check_fallback,
        check_generate_settings,
        encode_writer_prompts,
        generate_pairs,
        read_forget_conversations,
        record_pieces,
    )
    from cfg_unlearn.data.schema import PairFormatError, pairs_jsonl
    from cfg_unlearn.models import check_device, load_causal_lm, load_tokenizer, parse_dtype
    from cfg_unlearn.pii import PARTIAL_MIN_CHARS
    from cfg_unlearn.prompts import SAFETY_INSTRUCTION, check_template

    p = command_parser(
        prog="cfg-unlearn generate",
        description="Write pairs (chosen = a PII-free replacement from --model, rejected = the leaky answer) "
        "for forget data: our conversation JSONL (--forget) or the LLM-PC challenge files (--challenge).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--forget", help="conversation JSONL: {id, messages, pii}")
    src.add_argument("--challenge", nargs=2, metavar=("SCRUBBED", "PII"),
                     help="LLM-PC *-scrubbed-data.jsonl and *-pii.jsonl")
    p.add_argument("--model", required=True, help="hub name, local path or tiny:<dir> of the replacement writer")
    p.add_argument("--out", required=True, help="pair JSONL to write (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and --summary-json) if it exists")
    p.add_argument("--summary-json", default=None, metavar="PATH",
                   help="also write the summary's counts as JSON to PATH (atomically), for scripts")
    p.add_argument("--system", default=SAFETY_INSTRUCTION, help="the instruction the writer gets (default %(default)r)")
    p.add_argument("--reminder", default=None, help="text appended to the last user turn")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale for the writer (1 = off)")
    p.add_argument("--space", choices=("logprob", "prob"), default="logprob",
                   help="guidance space when --guidance-scale is not 1 (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=96,
                   help="tokens per candidate at most (default %(default)s); a candidate cut off before its end is "
                   "rejected (truncated)")
    p.add_argument("--accept-truncated", action="store_true",
                   help="keep candidates cut off at --max-new-tokens (counted) instead of rejecting them")
    p.add_argument("--max-attempts", type=int, default=4,
                   help="rounds per record: greedy, then sampling (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature of the rounds after the first (default %(default)s)")
    p.add_argument("--top-p", type=float, default=0.95,
                   help="nucleus sampling threshold of those rounds (default %(default)s)")
    p.add_argument("--fallback", default=DEFAULT_FALLBACK, help="answer used when every attempt leaked (default %(default)r)")
    p.add_argument("--redact-fallback", action="store_true",
                   help="when every attempt leaked, use the leaky answer with its values replaced by plain phrases "
                   "('... at a private number.') if that passes the same checks, else --fallback")
    p.add_argument("--partial-min-chars", type=int, default=PARTIAL_MIN_CHARS,
                   help="reject a candidate holding a piece of a value this long that the prompt does not show "
                   "(a value's words, or runs of its digits), of its own record's values or of one other person's; "
                   "0: whole values only (default %(default)s)")
    p.add_argument("--own-values-only", action="store_true",
                   help="check a candidate against its own record's values only, not every known value of the data")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling rounds (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (default %(default)s)")
    p.add_argument("--dtype", default="auto",
                   help="weights dtype to load: auto (as saved), float32, bfloat16, float16 (default %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the writer runs (default here: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    console_logging(logging.INFO)
    # everything that can be checked without the model, before it loads and decodes for minutes
    given = {"--out": a.out, "--summary-json": a.summary_json}
    if "" in given.values():  # Path("") is the working folder
        p.error(f"{next(f for f, v in given.items() if v == '')} needs a file path")
    outputs = {flag: Path(path) for flag, path in given.items() if path is not None}
    what = {"--out": "pairs", "--summary-json": "summary"}
    for flag, out in outputs.items():
        try:
            out.exists()
        except OSError as e:  # a name longer than the file system takes
            p.error(f"{flag} {out}: {e.strerror}")
        for src in [a.forget] if a.forget else a.challenge:
            if out.resolve() == Path(src).resolve():
                p.error(f"{flag} {out} is one of the inputs; write the {what[flag]} elsewhere")
        if out.is_dir():
            p.error(f"{flag} {out} is a directory; give the path of the file to write")
        if not out.parent.is_dir():
            p.error(f"{flag} {out}: the directory {out.parent} does not exist")
        if out.exists() and not a.overwrite:
            p.error(f"{flag} {out} exists; pass --overwrite to replace it")
    if len(outputs) == 2 and outputs["--out"].resolve() == outputs["--summary-json"].resolve():
        p.error("--summary-json names the --out file; give the summary a file of its own")
    try:
        for flag, out in outputs.items():  # both are written after all the decoding
            check_writable_file(out, flag)
        check_generate_settings(guidance_scale=a.guidance_scale, space=a.space, max_new_tokens=a.max_new_tokens,
                                max_attempts=a.max_attempts, temperature=a.temperature, top_p=a.top_p,
                                partial_min_chars=a.partial_min_chars, batch_size=a.batch_size, seed=a.seed)
        check_fallback(a.fallback)
        parse_dtype(a.dtype)
        check_device(a.device)
    except ValueError as e:
        p.error(as_flags(str(e), p))
    try:
        with hf_progress_bars_off(a.quiet):  # tiny:<dir> builds the model here on first use
            tok = load_tokenizer(a.model)
        check_template(tok, a.system)
    except (ConfigError, ValueError) as e:  # no such model, a directory or file that is none, no pad or EOS token
        exit_with_error(p, f"--model: {e}")
    try:
        if a.forget:
            records = read_forget_conversations(a.forget)
        else:
            from cfg_unlearn.data.llmpc import forget_records, read_challenge

            records = forget_records(read_challenge(*a.challenge))
    except PairFormatError as e:
        exit_with_error(p, str(e))
    if not records:
        source = a.forget or " and ".join(a.challenge)
        with open(a.forget or a.challenge[0], "rb") as fh:  # (read whole above: it opens)
            blank = not any(line.strip() for line in fh)
        exit_with_error(p, f"{source}: " + ("the file is empty" if blank else
                                           "the forget data holds no leaky assistant turn (one with a pii value)"))
    try:
        check_fallback(a.fallback, (v for r in records for v in (*r.pii, *r.known)),
                       None if a.own_values_only else record_pieces(records, a.partial_min_chars))
    except ValueError as e:
        p.error(str(e))
    try:  # every prompt through the chat template before the model loads
        encoded = encode_writer_prompts(tok, records, system=a.system, reminder=a.reminder,
                                        guidance=a.guidance_scale != 1.0)
    except PairFormatError as e:
        exit_with_error(p, str(e))
    try:
        with hf_progress_bars_off(a.quiet):
            model = load_causal_lm(a.model, dtype=a.dtype).to(a.device)
    except (ConfigError, ValueError, OSError) as e:  # e.g. a folder with a tokenizer and no model
        exit_with_error(p, f"--model: {e}")
    try:
        check_context(model, records, encoded, a.max_new_tokens)
    except PairFormatError as e:  # a record too long for the writer's context
        exit_with_error(p, str(e))
    except ValueError as e:  # max_new_tokens alone fills the context
        p.error(str(e))
    try:
        pairs, summary = generate_pairs(
            model, tok, records, system=a.system, reminder=a.reminder, guidance_scale=a.guidance_scale,
            space=a.space, max_new_tokens=a.max_new_tokens, max_attempts=a.max_attempts, temperature=a.temperature,
            top_p=a.top_p, fallback=a.fallback, redact_fallback=a.redact_fallback,
            partial_min_chars=a.partial_min_chars, other_values=not a.own_values_only,
            accept_truncated=a.accept_truncated, seed=a.seed, batch_size=a.batch_size, encoded=encoded,
            progress=not a.quiet,
        )
    except PairFormatError as e:  # checked above; kept for a record that only the model's own checks refuse
        exit_with_error(p, str(e))
    files = [(a.out, pairs_jsonl(pairs))]
    if a.summary_json is not None:  # for scripts; stdout stays lines for people
        files.append((a.summary_json, json.dumps(summary.to_dict(), indent=1) + "\n"))
    try:  # both or neither: a failed summary left new pairs beside an old summary
        atomic_write_files(files)
    except OSError as e:
        exit_with_error(p, f"writing {' and '.join(str(f) for f, _ in files)}: {e}")
    print(summary.line())
    warning = summary.warning()
    if warning:
        print(f"cfg-unlearn generate: warning: {warning}", file=sys.stderr)
    also = f" and the summary to {a.summary_json}" if a.summary_json is not None else ""
    print(f"wrote {len(pairs)} pairs to {a.out}{also}")


def _rate_or_none(text: str) -> float | None:
    """``--stop-leak``'s value: a rate, or ``none`` for no stop."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate such as 0.03, or none; got {text!r}") from None


def _demo(argv: list[str]) -> None:
    from cfg_unlearn.demo import (COND_MODES, DEMO_MARKER, DEMO_OUTPUTS, FALLBACKS, PREVIOUS_RUN, DemoConfig,
                                  LEAK_SETTINGS, check_demo_config, leak_settings_of, run_demo)

    d = DemoConfig()
    p = command_parser(
        prog="cfg-unlearn demo",
        description="The whole method offline on CPU: a synthetic PII world, a tiny model fine-tuned until it leaks, "
        "replacement pairs written by that model, ORPO with conditioning dropout, and leak rate / accuracy of both "
        "models per guidance scale (metrics.json, report.md, leak_vs_guidance.png in --out).",
    )
    p.add_argument("--out", default=d.out,
                   help=f"output directory (default {d.out}); a rerun into it replaces the previous run's outputs when it "
                   "finishes, and puts them back if it fails or is stopped")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seeds the world, the tiny model, the pairs and the training (0 .. 2**32-1; default {d.seed}, "
                   "with --leaky-from its run's)")
    p.add_argument("--people", type=int, default=None,
                   help=f"people in the synthetic world (default {d.people}, with --leaky-from its run's)")
    p.add_argument("--leak-epochs", type=int, default=None,
                   help=f"epochs of fine-tuning that make the model leak (default {d.leak_epochs}, with --leaky-from "
                   "its run's)")
    p.add_argument("--leaky-from", metavar="DIR", default=None,
                   help="the --out of a finished demo: copy its tiny and leaky models instead of building and "
                   "fine-tuning them (about 4 of the 5 minutes), to try other unlearning settings on the same "
                   "leaky model; its seed, people and leak epochs are this run's")
    p.add_argument("--unlearn-epochs", type=int, default=d.unlearn_epochs,
                   help=f"at most this many epochs of ORPO on the pairs (default {d.unlearn_epochs}); see --stop-leak")
    p.add_argument("--stop-leak", type=_rate_or_none, default=d.stop_leak, metavar="RATE",
                   help=f"stop unlearning once the pairs' own prompts, decoded every {d.stop_every} steps, leak at "
                   f"most this share of their values (default {d.stop_leak}; none: train every epoch)")
    p.add_argument("--unlearn-lr", type=float, default=d.unlearn_lr,
                   help=f"ORPO's learning rate (default {d.unlearn_lr})")
    p.add_argument("--beta", type=float, default=d.beta,
                   help=f"ORPO's odds-ratio weight (lambda; default {d.beta}, the paper's)")
    p.add_argument("--baseline-lr", type=float, default=d.baseline_lr,
                   help=f"--compare: learning rate of NPO, gradient ascent, DPO and SFT (default {d.baseline_lr}; ORPO "
                   "without dropout trains at --unlearn-lr)")
    p.add_argument("--cond-dropout", type=float, default=d.cond_dropout,
                   help=f"share of samples trained with the safety instruction blanked (default {d.cond_dropout})")
    p.add_argument("--cond-mode", choices=COND_MODES, default=d.cond_mode,
                   help="dropout: blank the safety instruction of a share --cond-dropout of the samples (same "
                   "targets); swap: put those samples under the negative instruction with chosen and rejected "
                   "swapped (the paper's variant); guidance then contrasts with that same instruction")
    p.add_argument("--fallback", choices=FALLBACKS, default=d.fallback,
                   help="the chosen answer when the leaky model wrote no PII-free replacement: its leaky answer with "
                   "the values replaced by plain phrases (generate --redact-fallback), or the refusal template (default "
                   "%(default)s)")
    p.add_argument("--scales", type=float, nargs="+", default=list(d.scales),
                   help=f"guidance scales to evaluate (default {' '.join(map(str, d.scales))})")
    p.add_argument("--spaces", nargs="+", choices=("logprob", "prob"), default=list(d.spaces),
                   help="guidance spaces to evaluate (default: both)")
    p.add_argument("--compare", action="store_true",
                   help="also train ORPO without dropout, NPO, gradient ascent, DPO and SFT on the same pairs and "
                   "apply model subtraction, and compare them (a few more minutes; comparison.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    quiet_third_party_warnings()
    try:  # the leak stage's settings not given: the copied model's, else the defaults
        source = {} if a.leaky_from is None else leak_settings_of(a.leaky_from)
    except ValueError as e:
        p.error(str(e))
    leak = {k: source.get(k, getattr(d, k)) for k in LEAK_SETTINGS}
    leak.update({k: v for k, v in (("seed", a.seed), ("people", a.people), ("leak_epochs", a.leak_epochs))
                 if v is not None})
    cfg = DemoConfig(out=a.out, **leak, leaky_from=a.leaky_from,
                     unlearn_epochs=a.unlearn_epochs, stop_leak=a.stop_leak, unlearn_lr=a.unlearn_lr, beta=a.beta,
                     baseline_lr=a.baseline_lr,
                     cond_dropout=a.cond_dropout, cond_mode=a.cond_mode, fallback=a.fallback,
                     scales=tuple(a.scales), spaces=tuple(a.spaces), compare=a.compare)
    try:
        check_demo_config(cfg)  # a usage error now, not a traceback after minutes of training
    except ValueError as e:
        p.error(as_flags(str(e), p))
    out = Path(a.out).expanduser()
    had_previous = any((out / name).exists() for name in (PREVIOUS_RUN, f"{PREVIOUS_RUN}.partial", *DEMO_OUTPUTS))

    def stopped() -> str:  # read after the run: what its cleanup could do
        metrics, marker = out / "metrics.json", out / DEMO_MARKER
        if metrics.is_file() and marker.is_file() and metrics.stat().st_mtime >= marker.stat().st_mtime:
            return f"cfg-unlearn demo: interrupted after the run finished; {a.out} holds its outputs\n"
        if (out / PREVIOUS_RUN).is_dir():
            return f"cfg-unlearn demo: interrupted; the previous run's outputs are in {out / PREVIOUS_RUN}\n"
        return (f"cfg-unlearn demo: interrupted; {a.out} holds "
                + ("the previous run's outputs, as they were\n" if had_previous
                   else "the outputs of the stages that finished\n"))

    try:
        with hf_progress_bars_off(a.quiet):
            run_demo(cfg, progress=not a.quiet)
    except OutputBusy as e:
        exit_with_error(p, str(e))
    except KeyboardInterrupt:  # a traceback from inside the fine-tune loop
        p.exit(130, stopped())
    except Terminated as e:
        p.exit(e.code, stopped())
    except SystemExit as e:
        if lightning_interrupted(e):
            p.exit(130, stopped())
        raise


#: commands whose argparse entry point lives in their own module: name -> (module, function)
COMMAND_ENTRY_POINTS = {
    "export": ("cfg_unlearn.export", "main_export"),
    "chat": ("cfg_unlearn.export", "main_chat"),
    "subtract": ("cfg_unlearn.subtract", "main"),
    "saft": ("cfg_unlearn.saft", "main"),
}


COMMANDS_HELP = """\
  demo               the whole method end to end on CPU, offline (report in --out)
  fit/validate       train or score with a YAML config (same as `python train.py ...`)
  generate           write PII-free replacement pairs for forget data with a model
  export             a checkpoint -> a merged Hugging Face model + tokenizer + cfg_unlearn.json
  chat               chat with an exported model (or the demo's), decoded with classifier-free guidance
  subtract           model subtraction: base - alpha * (finetuned - base), tensor by tensor
  saft               score and filter PII-bearing samples from a data set (SAFT)
  build-tiny         build the offline tiny tokenizer + model into a directory"""


#: the end of the message of a fit stopped before Lightning's loop
NOT_STARTED = "; it had not started training, so no checkpoint was saved"


def trainer_command(argv: list[str], prog: str) -> None:
    """``fit``/``validate`` (``python train.py ...`` and ``cfg-unlearn fit ...``):
    :func:`cfg_unlearn.cli.train_main`, imported here, where a Ctrl-C while Lightning
    imports (seconds) is one line rather than a traceback."""
    try:
        from cfg_unlearn.cli import train_main
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted{NOT_STARTED if argv[:1] == ['fit'] else ''}\n")
        sys.exit(128 + signal.SIGINT)
    train_main(argv, prog=prog)


def console_main(argv: list[str] | None = None) -> None:
    """``cfg-unlearn <demo|fit|validate|generate|export|chat|subtract|saft|build-tiny> ...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    our_warnings_as_lines()
    usage = "usage: cfg-unlearn {demo,fit,validate,generate,export,chat,subtract,saft,build-tiny} [options]   (-h after a command for its help)"
    if not argv or argv[0] in ("-h", "--help"):
        # no command at all is a usage error (exit 2): to stderr, like argparse's
        print(usage, COMMANDS_HELP, sep="\n", file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from cfg_unlearn import __version__

        print(f"cfg-unlearn {__version__}")
        sys.exit(0)
    cmd, rest = argv[0], argv[1:]
    if cmd in TRAINER_SUBCOMMANDS:  # Lightning stops a fit at a step's end on SIGTERM: train_main
        trainer_command([cmd, *rest], prog=f"cfg-unlearn {cmd}")
        return
    commands = ("build-tiny", "generate", "demo", *COMMAND_ENTRY_POINTS)
    if cmd not in commands:
        import difflib

        names = [*commands, *TRAINER_SUBCOMMANDS]
        close = [c for c in names if cmd and c.startswith(cmd)][:1] or difflib.get_close_matches(cmd, names, n=1)
        print(f"cfg-unlearn: unknown command {cmd!r}" + (f"; did you mean {close[0]!r}?" if close else "")
              + f"\n{usage}", file=sys.stderr)
        sys.exit(2)
    try:
        with sigterm_raises():  # the other commands clean up after themselves on SIGTERM as on Ctrl-C
            if cmd == "build-tiny":
                _build_tiny(rest)
            elif cmd == "generate":
                _generate(rest)
            elif cmd == "demo":
                _demo(rest)
            else:
                module, function = COMMAND_ENTRY_POINTS[cmd]
                # imported on use: commands pull only their own dependencies
                getattr(importlib.import_module(module), function)(rest)
    except KeyboardInterrupt:  # one line, not a traceback from inside a model's forward (the demo
        # and chat say more themselves)
        sys.stderr.write(f"cfg-unlearn {cmd}: interrupted (outputs are written whole or not at all)\n")
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":  # python -m cfg_unlearn.console ...
    console_main()
