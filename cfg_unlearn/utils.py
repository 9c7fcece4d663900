"""Small helpers shared across the package."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, NoReturn


log = logging.getLogger(__name__)

#: suffix of the temp files ``atomic_open`` writes next to their target (``.<name>.<random>.tmp``)
TMP_SUFFIX = ".tmp"


class ConfigError(ValueError):
    """A setting the user gave cannot work (an option's value, a missing input): ``train.py``
    prints it as one line and exits with status 2, like a malformed data row, instead of
    a traceback through Lightning. A ValueError, so callers of the API catch it as one."""


class TrainingDiverged(FloatingPointError):
    """The training loss is NaN or infinite: every later step, checkpoint and evaluation
    would be of NaN weights (whose empty answers score as leaking nothing). ``train.py``
    prints it as one line and exits with status 1."""


class NonFiniteWeights(TrainingDiverged, ValueError):
    """The model's weights (or the scores they give) are NaN or infinite: a diverged
    update, or an overflowing cast. A ``ValueError`` too, so the commands that report
    bad input in one line (``chat``, ``generate``) report this one the same way."""


class Terminated(SystemExit):
    """SIGTERM as an exception (:func:`sigterm_raises`): the code it stops cleans up
    after itself (temp files, staged folders) and the process exits with status 143, as
    a process killed by SIGTERM does."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """In the block, SIGTERM raises :class:`Terminated` (in the main thread, where Python
    runs handlers); the handler before is put back after it. By default Python dies at
    once: no ``finally`` ran, so a command stopped by a scheduler or ``kill`` left its
    temp files, and subtract and export a staged copy of a whole model, behind.
    Lightning, during a fit, calls this handler after its own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def hf_progress_bars_off(off: bool = True) -> Iterator[None]:
    """transformers' own bars ("Loading weights", "Writing model shards") off in the
    block when ``off``, as they were after it: a command's ``--quiet`` turned off its own
    bars and left these. ``off=False`` leaves them as they are (a user's
    ``HF_HUB_DISABLE_PROGRESS_BARS`` included)."""
    if not off:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class OutputBusy(OSError):
    """Another process holds :func:`exclusive_lock` on an output: it is writing there."""


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, busy: str, *, shared: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the block, or
    raise :class:`OutputBusy` with the message ``busy`` at once if another process holds
    it. The operating system releases it when its holder exits, a killed one included,
    so it never goes stale (``flock`` on POSIX, ``msvcrt.locking`` on Windows). Where the
    file system cannot lock (some NFS, CIFS or Lustre mounts) or the file cannot be
    opened, the block runs unlocked with a warning: a lock is a guard, not a requirement.

    ``shared=True`` takes a reader's lock instead, which only an exclusive holder refuses
    (two readers copy from one folder at once); Windows' ``msvcrt`` has no shared lock,
    so there it is exclusive."""
    import errno

    fh, locked = None, False
    try:
        fh = open(path, "a+b")  # noqa: SIM115 - held for the block
        if os.name == "nt":
            import msvcrt

            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fh.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        locked = True
    except OSError as e:
        held = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, getattr(errno, "EDEADLOCK", errno.EDEADLK))
        if fh is not None and e.errno in held:  # (an open refused with EACCES is no holder)
            fh.close()
            raise OutputBusy(busy) from None
        log.warning("cannot lock %s (%s): another process writing there would not be noticed", path, e.strerror)
    try:
        yield
    finally:
        if locked and os.name == "nt":  # Windows frees a lock left on a closed file only later
            import msvcrt

            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        if fh is not None:
            fh.close()  # releases a POSIX lock


class _ConsoleFormatter(logging.Formatter):
    """A command's log lines as it prints them: the message, with ``warning:`` (or
    ``error:``) before one that is, so that it reads as one among the progress lines."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


def console_logging(level: int = logging.INFO) -> None:
    """``logging.basicConfig`` for a command (stderr, ``level``), through
    :class:`_ConsoleFormatter`; a no-op where logging was configured already, as
    basicConfig is."""
    handler = logging.StreamHandler()
    handler.setFormatter(_ConsoleFormatter("%(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _format_warning(message, category, filename, lineno, line=None, *, _default=None) -> str:  # noqa: ANN001
    """``warnings.formatwarning`` for a warning this package raises (``rank_zero_warn``
    points at our own line): ``warning: <message>``, not ``/site-packages/.../cli.py:379:
    UserWarning: <message>`` and the source line; others' warnings as before."""
    if os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep):
        # another package's warning about a call of ours (a FutureWarning whose stacklevel
        # points here) keeps its category: it is theirs, not a notice of ours
        return f"warning: {message}\n" if category is UserWarning else f"warning: {category.__name__}: {message}\n"
    return _default(message, category, filename, lineno, line)


def our_warnings_as_lines() -> None:
    """Install :func:`_format_warning` (once; Lightning installs its own formatter on
    import, which stays in charge of its warnings and everyone else's)."""
    import functools
    import warnings

    if getattr(warnings.formatwarning, "func", None) is not _format_warning:
        warnings.formatwarning = functools.partial(_format_warning, _default=warnings.formatwarning)


def short_usage(prog: str, positionals: Sequence[str] = ()) -> str:
    """The line a usage error ends with, in place of argparse's usage of every option
    (a dozen lines above the one that says what is wrong)."""
    return f"usage: {' '.join([prog, '[options]', *positionals])}   ({prog} -h lists them)\n"


class CommandParser(argparse.ArgumentParser):
    """argparse's parser with a usage error reported as the error first and one usage
    line, not the usage of every option before it."""

    def error(self, message: str) -> NoReturn:
        # positionals shown: "the following arguments are required: dir" does not say it is no --dir
        shown = [a.metavar or a.dest.upper() for a in self._actions if not a.option_strings]
        self.exit(2, f"{self.prog}: error: {message}\n{short_usage(self.prog, shown)}")


def command_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of a ``cfg-unlearn`` command: flags in full only (``allow_abbrev`` off,
    as ``train.py``'s). argparse took ``--guid 2`` for ``--guidance-scale 2``, until another
    flag starting with ``--guid`` would make the same command line an error."""
    return CommandParser(prog=prog, description=description, allow_abbrev=False)


def nearest_existing(path: str | None) -> str | None:
    """``path`` or its nearest folder above that exists (``""``, the working folder, for
    a relative path none of whose folders does); None for None."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_input_file(setting: str, path: str | os.PathLike | None) -> None:
    """Refuse a data file that a setting names and that does not exist, naming the
    setting (the data module and GuidanceEval call it in ``setup``, before the model
    loads): a run's saved
    ``config.yaml`` keeps its paths as given, so ``validate --config run/config.yaml``
    from another folder looked for them there and said only "cannot open". A relative
    path's message says where it was looked for. A path that exists but is no readable
    file is left to the reader, which says why."""
    if not path or os.path.exists(path):  # "" reads as unset, as the callers read it
        return
    where = "" if os.path.isabs(path) else (f" (relative paths start at the working directory {os.getcwd()}, "
                                            "not at the config file's folder; a run's config.yaml names the folder "
                                            "it was launched from on its first line)")
    raise ConfigError(f"{setting}: no such file: {os.fspath(path)}{where}")


def exit_with_error(parser, message: str) -> NoReturn:
    """A command's error about its input (a bad row, a missing model), exit status 2, in
    argparse's own form ``<prog>: error: <message>`` but without the usage lines: the
    command line was well formed, the data was not."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def dataclass_from(value, cls: type, name: str):
    """``value`` as the dataclass ``cls``: a mapping (a Python user's ``{"r": 8}``) is
    built into one, an unknown field named; None and instances pass through."""
    import dataclasses
    from collections.abc import Mapping

    if not isinstance(value, Mapping):
        return value
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ConfigError(f"{name}: unknown field(s) {', '.join(map(repr, unknown))}; {cls.__name__} has "
                          f"{', '.join(sorted(fields))}")
    return cls(**value)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Persist a rename: fsync the directory entry (POSIX; a no-op where unsupported)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def process_umask() -> int:
    """The process umask, read without changing it where /proc allows (``os.umask`` is
    process-wide: setting it to read it races with threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def open_modes(directory: str | os.PathLike) -> None:
    """Give ``directory`` and everything under it the modes ``open``/``mkdir`` would
    (``0o666``/``0o777`` less the umask). ``mkdtemp`` makes an output directory owner-only
    and safetensors writes ``model.safetensors`` as ``0600``, so a model published for a
    team would be unreadable to it; a user who wants private outputs sets ``umask 077``."""
    mask = process_umask()
    root = Path(directory)
    for path in (root, *root.rglob("*")):
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new empty temp file beside ``path`` (``.<name>.<8 random>.tmp``, what
    :data:`_TEMP_FILE` recognises): its open descriptor and its name."""
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)


def _write_mode(data: str | bytes) -> tuple[str, str | None]:
    """The ``open`` mode and encoding that write ``data``: bytes as they are, text as UTF-8."""
    return ("wb", None) if isinstance(data, bytes) else ("w", "utf-8")


@contextlib.contextmanager
def _temp_file(path: Path, mode: str, encoding: str | None) -> Iterator[tuple[IO, str]]:
    """A temp file (``.<name>.<random>.tmp``) next to ``path``, with the mode a plain
    ``open(path, "w")`` would leave: an existing file's mode is kept, a new file gets
    ``0o666 & ~umask`` (``mkstemp`` alone would make every output ``0600``, unreadable to
    the teammates a shared umask lets in; a user who wants private outputs sets ``umask
    077``). Yields the open file and its name; closed when the block ends, removed if it
    raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(path)
    try:
        # text as written ("\n"): Windows' newline translation turned csv's "\r\n" rows into
        # "\r\r\n" (a blank row after each) and every JSONL line into CRLF
        newline = None if "b" in mode else ""
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as fh:  # owns fd from here: closed on any exit
            if hasattr(os, "fchmod"):
                try:
                    perms = path.stat().st_mode & 0o7777
                except OSError:
                    perms = 0o666 & ~process_umask()
                os.fchmod(fh.fileno(), perms)
            yield fh, tmp
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                fsync: bool = True) -> Iterator[IO]:
    """Write ``path`` so that readers see the old file or the new one, never half of one:
    yield a temp file (:func:`_temp_file`: ``.<name>.<random>.tmp``, in the same directory,
    with the mode ``open`` would give); on a clean exit flush, fsync, rename it onto
    ``path`` and fsync the directory; on any exception (KeyboardInterrupt included)
    remove it."""
    path = Path(path)
    with _temp_file(path, mode, encoding) as (fh, tmp):
        yield fh
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """``data`` to ``path`` through :func:`atomic_open` (text as UTF-8)."""
    mode, encoding = _write_mode(data)
    with atomic_open(path, mode, encoding=encoding) as fh:
        fh.write(data)


def atomic_write_files(files: Sequence[tuple[str | os.PathLike, str | bytes]]) -> None:
    """Several outputs that belong together (``(path, data)`` each, text as UTF-8), all
    or none: every file is written to its temp file and fsynced first, so a full disk or
    a bad path replaces none of them; then they are renamed in the given order (put a
    summary that names the rest last) with SIGINT and SIGTERM held (:func:`signals_held`),
    each existing file kept under a second name and put back if a later rename fails
    (:func:`_replace_together`). Renamed
    one by one as they were, a Ctrl-C or an error after the first left a set of a new
    file beside old ones (SAFT's new kept rows beside the old run's removed rows and
    summary; a new contaminated set beside the old labels, one of them now wrong)."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files:
            with _temp_file(Path(path), *_write_mode(data)) as (fh, tmp):
                staged.append((tmp, Path(path)))
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        with signals_held():
            _replace_together(staged)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    for directory in dict.fromkeys(path.parent for _, path in staged):
        fsync_dir(directory)


def _replace_together(staged: Sequence[tuple[str, Path]]) -> None:
    """Rename each temp file onto its path; if one rename fails, undo the ones before it.
    An existing file keeps a second name (a hard link, a temp name) until the end, to be
    put back: the path itself always holds the old file or the new one, never nothing
    (renamed aside instead, a reader found no file, and a kill in between left the only
    copy under a temp name). Where hard links are not supported it is copied."""
    done: list[tuple[Path, str | None]] = []  # replaced, with the old file's second name
    try:
        for tmp, path in staged:
            aside = _second_name(path) if path.is_file() or path.is_symlink() else None
            try:
                os.replace(tmp, path)
            except BaseException:  # this one is as it was: only its second name goes
                if aside is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(aside)
                raise
            done.append((path, aside))
    except BaseException:
        for path, aside in reversed(done):
            with contextlib.suppress(OSError):
                if aside is not None:
                    os.replace(aside, path)
                elif path.is_file():
                    os.unlink(path)
        raise
    for _, aside in done:
        if aside is not None:
            with contextlib.suppress(OSError):
                os.unlink(aside)


def _second_name(path: Path) -> str:
    """A hard link to ``path`` under a temp name beside it (a copy where links fail)."""
    fd, aside = _temp_beside(path)
    os.close(fd)
    try:
        os.unlink(aside)
        try:
            os.link(path, aside)
        except OSError:  # no hard links here (some network or FUSE file systems)
            shutil.copy2(path, aside, follow_symlinks=False)  # a link stays a link
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(aside)
        raise
    return aside


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the block (a few renames that must all happen, or
    none), then deliver the ones that came, to the handlers there were, SIGTERM first.
    The handlers are put back SIGTERM first too, so a Ctrl-C until its own handler is
    back is still held, and a held SIGTERM is delivered even when a new Ctrl-C interrupts
    the putting back. Python runs signal handlers in the main thread only: elsewhere the
    block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    order = (signal.SIGTERM, signal.SIGINT)
    before = {}
    for signum in order:
        handler = signal.getsignal(signum)
        if handler is not None:  # None: set outside Python, and it could not be put back
            before[signum] = signal.signal(signum, lambda n, _frame: came.append(n))
    try:
        yield
    finally:
        try:
            for signum in order:
                if signum in before:
                    signal.signal(signum, before[signum])
        finally:
            for signum in order:
                if signum in came:
                    signal.raise_signal(signum)


def check_writable_file(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse, before any work, an output file that :func:`atomic_open` could not write:
    its temp file is made where it would be (same directory, same name) and removed at
    once. A read-only folder, one the user may not write to, or a name too long for the file
    system, then fails before minutes of decoding, not after. The folder must exist.
    ``flag``: the option that named the file, for the message."""
    path = Path(path)
    try:
        fd, tmp = _temp_beside(path)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write there: {e.strerror}") from None
    os.close(fd)
    os.unlink(tmp)


#: the temp files :func:`atomic_open` writes: ``.<name>.<8 random>.tmp``
_TEMP_FILE = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(TMP_SUFFIX))


def leftovers(out: Path) -> list[Path]:
    """What runs that were killed with no chance to clean up (SIGKILL, the OOM killer)
    may have left for ``out``: temp files in it (:func:`atomic_open`), and its staged
    (``.<name>.tmp-*``, :func:`staged_dir`) or set-aside (``.<name>.old-*``,
    :func:`publish_dir`) folders beside it. A run still at work has them too."""
    found = [p for p in out.iterdir() if p.is_file() and _TEMP_FILE.fullmatch(p.name)] if out.is_dir() else []
    if out.parent.is_dir():
        beside = re.compile(re.escape(f".{out.name}.") + r"(?:tmp|old)-[a-z0-9_]{8}")
        found += [p for p in out.parent.iterdir() if p.is_dir() and beside.fullmatch(p.name)]
    return sorted(found)


def _warn_leftovers(out: Path, left: list[Path]) -> None:
    old = [p for p in left if p.name.startswith(f".{out.name}.old-")]
    if old and not out.exists():  # killed between publish_dir's renames: the previous output's only copy
        log.warning("%s is missing and %s holds the output it had: a run was killed while replacing it; rename "
                    "it back to keep it", out, old[0])
    log.warning("%d temp file(s) or folder(s) of a run that was killed (or is still at work) are in or beside %s "
                "(%.1f MB): %s; no run reads them: check them, then delete them", len(left), out,
                sum(map(_disk_bytes, left)) / 1e6, ", ".join(str(p) for p in left[:5]) + (", ..." if len(left) > 5 else ""))


def _disk_bytes(path: Path) -> int:
    with contextlib.suppress(OSError):
        return sum(f.stat().st_size for f in (path.rglob("*") if path.is_dir() else [path]) if f.is_file())
    return 0


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """One file or folder under two names: the same device and inode where both exist (a
    case-insensitive disk, macOS's and Windows', takes "Models/leaky" for "models/leaky",
    which ``resolve()`` does not spell alike), else the same resolved path."""
    a, b = Path(a), Path(b)
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return a.resolve() == b.resolve()
    if sa.st_ino and sb.st_ino:  # some Windows drives (network, cloud) give every file inode 0
        return os.path.samestat(sa, sb)
    return a.resolve() == b.resolve()


def is_torch_save_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` has the layout of a ``torch.save`` file: a zip archive with its
    central directory (every torch since 1.6), or a pickle (the legacy format). Checked
    before ``torch.load``, whose error for anything else (a file cut short, a
    ``.safetensors``, a YAML) is a traceback that advises ``weights_only=False``, which
    would not help and would run the file's code."""
    import zipfile

    with open(path, "rb") as f:
        legacy = f.read(1) == b"\x80"  # a pickle's PROTO opcode
    return legacy or zipfile.is_zipfile(path)


#: why a file :func:`is_torch_save_file` refuses is no checkpoint
NOT_TORCH_SAVE = ("not a checkpoint torch can read (no complete zip archive: a file cut short by a full disk or a "
                  "killed copy, or another format, such as a model's .safetensors); give a .ckpt that Lightning saved")


def checkpoints_in(directory: str | os.PathLike, limit: int = 3) -> list[str]:
    """The first ``limit`` ``.ckpt`` files of a directory given where a checkpoint file
    belongs, or of its ``checkpoints`` folder (a run folder), as paths to give instead."""
    d = Path(directory)
    for folder in (d, d / "checkpoints"):
        with contextlib.suppress(OSError):
            found = sorted(p.name for p in folder.iterdir() if p.name.endswith(".ckpt"))
            if found:
                return [str(folder / n) for n in found[:limit]]
    return []


def is_model_dir(path: Path) -> bool:
    """Whether ``path`` looks like a model folder, the only kind of folder ``--overwrite``
    replaces whole: an export (``cfg_unlearn.json``), or a model's or adapter's config with
    weights beside it (a ``config.json`` alone is any project's)."""
    if (path / "cfg_unlearn.json").is_file():
        return True
    config = any((path / name).is_file() for name in ("config.json", "adapter_config.json"))
    return config and any(p.is_file() for pattern in ("*.safetensors", "*.bin") for p in path.glob(pattern))


def check_out_dir(out: Path, overwrite: bool, inputs: Iterable[str | os.PathLike], *, staged: bool = True) -> None:
    """Refuse, before any work, to write over a non-empty directory (unless
    ``overwrite``; a ``staged`` output, which replaces the whole folder, replaces only a
    model folder, :func:`is_model_dir`), or over an input: an ``out`` that is one of
    ``inputs`` or contains one (the output replaces ``out`` only at the end, and then the
    inputs are gone).
    Where the output will be written is tried too: beside ``out`` for a ``staged``
    output (:func:`staged_dir` renames a finished directory into place); else, when ``out``
    is still to be made, in its nearest existing parent (a writer into an existing ``out``
    tries it itself: :func:`check_writable_file`)."""
    cwd = Path.cwd()
    if same_path(out, cwd) or any(same_path(out, d) for d in cwd.resolve().parents):  # "--out ." renamed into itself
        raise ValueError(f"--out {out} is the current directory or holds it; give a directory of its own")
    for p in map(Path, inputs):
        if same_path(out, p):
            raise ValueError(f"--out {out} is one of the inputs ({p}); write the result elsewhere")
        if any(same_path(out, d) for d in p.resolve().parents):
            raise ValueError(f"--out {out} contains the input {p}: writing there could replace or delete it; "
                             "write elsewhere")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, so the directory cannot be made")
    left = leftovers(out)
    if left:
        _warn_leftovers(out, left)
    # files written into out (not staged) ignore a killed run's temp files there: they
    # blocked every rerun, "not empty" with nothing to see; a staged output replaces the
    # whole folder, so anything in it counts
    if out.exists() and not overwrite and any(staged or p not in left for p in out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    if staged and overwrite and out.is_dir() and not is_model_dir(out):
        # the staged output replaces the whole folder: `--out ~/thesis --overwrite` (a typo,
        # a wrong variable) deleted whatever was there
        names = sorted(p.name for p in out.iterdir() if p not in left)
        if names:
            raise FileExistsError(f"{out} holds files that are not a model ({', '.join(names[:3])}"
                                  f"{', ...' if len(names) > 3 else ''}); --overwrite replaces only a model folder "
                                  "(a previous output): remove them yourself or pick another --out")
    if not staged and out.is_dir():
        return
    try:  # the temp directory made where it will be: a read-only place fails now, not after the work
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent if out.parent.exists() else existing))
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there: {e.strerror}") from None


def publish_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished temp directory to ``out`` by rename (atomic on one
    filesystem). An existing output (a directory, or a file) is renamed aside first and
    deleted only after the new one is in place, so at no time does ``out`` hold a mix of
    the two; a kill between the two renames leaves both, the old one under
    ``.<name>.old-*``. The renames are fsynced."""
    if out.is_dir() and not any(out.iterdir()):  # empty, as check_out_dir counts it
        if out.is_symlink():
            out.unlink()  # the link is replaced, its (empty) target left alone
        else:
            out.rmdir()
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        try:
            os.rename(out, old / out.name)
        except BaseException:  # refused (on Windows, a file in it is open): nothing moved
            old.rmdir()
            raise
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old / out.name, out)  # put the previous output back
            old.rmdir()
            raise
        fsync_dir(out.parent)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)
        fsync_dir(out.parent)


@contextlib.contextmanager
def staged_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Write an output directory as a whole: yields a temp directory beside ``out``; when
    the block ends it gets the modes ``mkdir``/``open`` would have given
    (:func:`open_modes`) and replaces ``out`` (:func:`publish_dir`). On any exception it
    is deleted, and ``out`` is as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        open_modes(tmp)  # mkdtemp (and safetensors) make them owner-only
        publish_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """``model.eval()`` for the block, then every submodule back in its *own* mode:
    ``model.train(was_training)`` would put modules the user or Lightning left in eval
    (frozen dropout, a reference) into training mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
