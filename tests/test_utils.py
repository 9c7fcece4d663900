"""``utils.atomic_open``: the one atomic-write mechanism behind every output file."""

import os
import stat
from pathlib import Path

import pytest
import torch

from cfg_unlearn.utils import TMP_SUFFIX, atomic_open, atomic_write, open_modes, process_umask

pytestmark = pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX file modes")


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_process_umask_reads_the_umask_without_changing_it(umask_027):
    assert process_umask() == 0o027
    assert process_umask() == 0o027


def test_new_file_gets_the_mode_open_would_give_not_mkstemps_0600(tmp_path, umask_027):
    atomic_write(tmp_path / "metrics.json", "{}")
    with open(tmp_path / "plain.json", "w") as fh:  # what a plain open leaves, for reference
        fh.write("{}")
    assert _mode(tmp_path / "metrics.json") == 0o640 == _mode(tmp_path / "plain.json")


def test_open_modes_undoes_owner_only_modes_below_a_directory(tmp_path, assert_open_modes):
    """mkdtemp makes a directory 0700 and safetensors writes weights 0600: a published
    model gets the modes open/mkdir would have given it."""
    import tempfile

    import safetensors.torch
    import torch

    out = Path(tempfile.mkdtemp(dir=tmp_path))
    safetensors.torch.save_file({"w": torch.zeros(2)}, out / "model.safetensors")
    (out / "sub").mkdir(mode=0o700)
    (out / "sub" / "a.json").write_text("{}")
    (out / "sub" / "a.json").chmod(0o600)
    open_modes(out)
    assert_open_modes(out)


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o660])
def test_rewriting_keeps_an_existing_files_mode(tmp_path, umask_027, mode):
    path = tmp_path / "pairs.jsonl"
    path.write_text("old\n")
    path.chmod(mode)
    atomic_write(path, "new\n")
    assert path.read_text() == "new\n" and _mode(path) == mode


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(TMP_SUFFIX)] == []


def test_check_out_dir_refuses_what_it_cannot_publish_to(tmp_path, monkeypatch):
    """Refused up front (they failed after the work, or with a traceback): `--out .` or a
    parent of the working directory (renamed into itself: `OSError` and a `..old-*`
    directory left per attempt), a file, a path under a file."""
    from cfg_unlearn.utils import check_out_dir

    work = tmp_path / "work"
    work.mkdir()
    (work / "afile").write_text("")
    monkeypatch.chdir(work)
    for out, why in ((".", "is the current directory or holds it"), ("..", "is the current directory or holds it"),
                     ("afile", "afile is a file; give a directory"), ("afile/sub", "is a file, so the directory")):
        with pytest.raises(ValueError, match=why):
            check_out_dir(Path(out), True, ())
    check_out_dir(Path("new/sub"), False, ())  # a path still to make is fine
    (work / "full").mkdir()
    (work / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        check_out_dir(Path("full"), False, ())
    assert sorted(p.name for p in work.iterdir()) == ["afile", "full"]  # nothing made or left behind
    # a name the file system cannot hold (its staged temp directory's is longer still)
    with pytest.raises(ValueError, match="cannot write there: File name too long"):
        check_out_dir(Path("d" * 250), False, ())
    assert sorted(p.name for p in work.iterdir()) == ["afile", "full"]


def test_check_writable_file_tries_the_temp_file_atomic_open_would_write(tmp_path):
    """generate found an unwritable --out only after decoding every record, and lost them."""
    from cfg_unlearn.utils import check_writable_file

    check_writable_file(tmp_path / "pairs.jsonl")
    assert list(tmp_path.iterdir()) == []  # the probe is removed
    with pytest.raises(ValueError, match=r"--out .*: cannot write there: File name too long"):
        check_writable_file(tmp_path / ("p" * 250 + ".jsonl"))
    with pytest.raises(ValueError, match="cannot write there: No such file or directory"):
        check_writable_file(tmp_path / "missing" / "pairs.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_eval_mode_puts_every_module_back_in_its_own_mode():
    """model.train(was_training) put modules left in eval (frozen dropout, a reference)
    into training mode; an exception inside the block restores them too."""
    from cfg_unlearn.utils import eval_mode

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model[1].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("inside")
    assert model.training and not model[1].training


def test_publish_dir_replaces_a_link_to_an_empty_folder_not_the_folder(tmp_path):
    """out.rmdir() on a symlink raised NotADirectoryError."""
    from cfg_unlearn.utils import publish_dir

    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "out"
    link.symlink_to(target)
    new = tmp_path / "new"
    new.mkdir()
    (new / "f").write_text("x")
    publish_dir(new, link, overwrite=True)
    assert not link.is_symlink() and (link / "f").read_text() == "x" and target.is_dir()
    # without --overwrite too: check_out_dir counts the link to an empty folder as empty
    link2 = tmp_path / "out2"
    link2.symlink_to(target)
    new2 = tmp_path / "new2"
    new2.mkdir()
    publish_dir(new2, link2, overwrite=False)
    assert not link2.is_symlink() and link2.is_dir() and target.is_dir()


def test_check_out_dir_tries_beside_out_only_for_a_staged_output(tmp_path, monkeypatch):
    """SAFT writes into an existing out, which may sit in a folder it cannot write: only
    a staged output (renamed into place from beside out) needs the parent."""
    import errno
    import tempfile

    from cfg_unlearn.utils import check_out_dir

    out = tmp_path / "out"
    out.mkdir()
    real = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kw):  # the parent is read-only (root ignores chmod)
        if dir is not None and Path(dir) == tmp_path:
            raise OSError(errno.EACCES, "Permission denied")
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    check_out_dir(out, False, (), staged=False)
    with pytest.raises(ValueError, match="cannot write there: Permission denied"):
        check_out_dir(out, False, ())
    with pytest.raises(ValueError, match="cannot write there: Permission denied"):  # still to be made: in the parent
        check_out_dir(tmp_path / "new", False, (), staged=False)


def _rename_then(fail_at: int, action):
    """os.replace that runs ``action`` instead of its ``fail_at``-th call onto a kept file
    (temp -> target renames counted: calls whose source is a temp file)."""
    real, calls = os.replace, []

    def replace(src, dst):
        if str(src).endswith(TMP_SUFFIX) and not str(dst).endswith(TMP_SUFFIX):
            calls.append(dst)
            if len(calls) == fail_at:
                action()
        return real(src, dst)
    return replace


def _set(tmp_path, texts):
    return [(tmp_path / name, text) for name, text in texts.items()]


def test_atomic_write_files_puts_the_old_set_back_when_a_rename_fails(tmp_path, monkeypatch):
    """Renamed one by one, an error after the first left the new kept rows beside the
    old removed rows and summary (and a new contaminated set beside its old labels)."""
    from cfg_unlearn import utils

    utils.atomic_write_files(_set(tmp_path, {"kept.jsonl": "old kept", "removed.jsonl": "old removed"}))

    def fail():
        raise OSError("disk gone")
    monkeypatch.setattr(utils.os, "replace", _rename_then(2, fail))
    with pytest.raises(OSError, match="disk gone"):
        utils.atomic_write_files(_set(tmp_path, {"kept.jsonl": "new", "removed.jsonl": "new", "saft.json": "new"}))
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"kept.jsonl": "old kept",
                                                                   "removed.jsonl": "old removed"}


def test_atomic_write_files_holds_ctrl_c_until_every_file_is_renamed(tmp_path, monkeypatch):
    import signal

    from cfg_unlearn import utils

    utils.atomic_write_files(_set(tmp_path, {"a.jsonl": "old", "b.jsonl": "old"}))
    monkeypatch.setattr(utils.os, "replace", _rename_then(1, lambda: signal.raise_signal(signal.SIGINT)))
    with pytest.raises(KeyboardInterrupt):
        utils.atomic_write_files(_set(tmp_path, {"a.jsonl": "new", "b.jsonl": "new", "c.json": "new"}))
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"a.jsonl": "new", "b.jsonl": "new", "c.json": "new"}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back


def test_atomic_write_files_keeps_modes_and_writes_bytes(tmp_path, umask_027):
    from cfg_unlearn.utils import atomic_write_files

    (tmp_path / "a.txt").write_text("old")
    (tmp_path / "a.txt").chmod(0o600)
    atomic_write_files([(tmp_path / "a.txt", "new"), (tmp_path / "b.png", b"\x89PNG")])
    assert (tmp_path / "a.txt").read_text() == "new" and _mode(tmp_path / "a.txt") == 0o600
    assert (tmp_path / "b.png").read_bytes() == b"\x89PNG" and _mode(tmp_path / "b.png") == 0o640


def test_leftovers_of_a_killed_run_neither_block_a_rerun_nor_go_unmentioned(tmp_path, caplog):
    """A run killed outright (SIGKILL, the OOM killer) leaves its temp files: saft then
    refused every rerun ("exists and is not empty"), though `ls` showed nothing, and a
    subtract's staged copy of a whole model stayed beside --out with no word."""
    from cfg_unlearn.utils import check_out_dir

    out = tmp_path / "saft"
    out.mkdir()
    (out / ".kept.jsonl.k2j_9xq1.tmp").write_text("half")
    (tmp_path / ".saft.tmp-ab12cd34").mkdir()
    (tmp_path / ".saft.tmp-ab12cd34" / "model.safetensors").write_bytes(b"x" * 2_000_000)
    (tmp_path / ".other.tmp-ab12cd34").mkdir()  # another output's
    (tmp_path / ".saft.v2.tmp-ab12cd34").mkdir()  # another output's too, whose name extends this one's
    with caplog.at_level("WARNING"):
        check_out_dir(out, False, (), staged=False)  # saft writes its files into --out
    assert "2 temp file(s) or folder(s) of a run that was killed (or is still at work) are in or beside" in caplog.text
    assert "(2.0 MB)" in caplog.text and ".kept.jsonl.k2j_9xq1.tmp" in caplog.text
    assert ".other" not in caplog.text and ".saft.v2" not in caplog.text
    with pytest.raises(FileExistsError):  # a staged output replaces the whole folder: anything in it counts
        check_out_dir(out, False, ())
    (out / "notes.txt").write_text("mine")  # anything else still counts
    with pytest.raises(FileExistsError):
        check_out_dir(out, False, (), staged=False)


def test_a_previous_output_left_set_aside_is_named_as_one_to_keep(tmp_path, caplog):
    """Killed between publish_dir's two renames: --out is missing and its previous
    output's only copy is in .<name>.old-*: the warning must not only say "delete"."""
    from cfg_unlearn.utils import check_out_dir

    (tmp_path / ".model.old-gl5s19sw" / "model").mkdir(parents=True)
    with caplog.at_level("WARNING"):
        check_out_dir(tmp_path / "model", False, ())
    assert f"{tmp_path / 'model'} is missing and {tmp_path / '.model.old-gl5s19sw'} holds the output it had" in caplog.text
    assert "rename it back" in caplog.text


def test_atomic_write_files_never_leaves_a_path_without_a_file(tmp_path, monkeypatch):
    """The old file was renamed aside before the new one went in: a reader found no file
    (37,766 times in a polling test), and a kill in between left the only copy under a
    temp name. Each path now holds the old file or the new one at every rename."""
    from cfg_unlearn import utils

    utils.atomic_write_files(_set(tmp_path, {"a.jsonl": "old", "b.jsonl": "old"}))
    real, present = os.replace, []

    def replace(src, dst):
        if str(src).endswith(TMP_SUFFIX) and not str(dst).endswith(TMP_SUFFIX):
            present.append((Path(dst).name, Path(dst).exists()))
        return real(src, dst)
    monkeypatch.setattr(utils.os, "replace", replace)
    utils.atomic_write_files(_set(tmp_path, {"a.jsonl": "new", "b.jsonl": "new"}))
    assert present == [("a.jsonl", True), ("b.jsonl", True)]
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"a.jsonl": "new", "b.jsonl": "new"}


def test_signals_held_delivers_sigterm_first_and_puts_both_handlers_back():
    import signal

    from cfg_unlearn import utils

    with utils.sigterm_raises():
        with pytest.raises(utils.Terminated), utils.signals_held():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is utils._raise_terminated
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_while_the_handlers_are_put_back_leaves_no_handler_holding(monkeypatch):
    """A Ctrl-C right after SIGINT's handler was put back left the loop with SIGTERM's
    holding handler still installed: every later SIGTERM was swallowed."""
    import signal

    from cfg_unlearn import utils

    real = signal.signal

    def put_back_then_ctrl_c(signum, handler):
        previous = real(signum, handler)
        if signum == signal.SIGINT and handler is signal.default_int_handler:
            signal.raise_signal(signal.SIGINT)
        return previous

    with utils.sigterm_raises():
        monkeypatch.setattr(signal, "signal", put_back_then_ctrl_c)
        with pytest.raises(KeyboardInterrupt), utils.signals_held():
            pass
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGTERM) is utils._raise_terminated


def test_an_input_under_another_name_is_still_an_input(tmp_path):
    """check_out_dir compared resolved spellings: on a case-insensitive disk (macOS,
    Windows) --out Models/leaky passed for the input models/leaky, and subtract replaced
    its own --finetuned. Compared as files now (a hard link stands in for the other case)."""
    from cfg_unlearn.utils import check_out_dir

    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    os.link(data, tmp_path / "DATA.jsonl")
    with pytest.raises(ValueError, match="is one of the inputs"):
        check_out_dir(tmp_path / "DATA.jsonl", True, [data])


def test_publish_dir_refused_leaves_no_empty_old_folder(tmp_path, monkeypatch):
    """On Windows renaming a folder with an open file (a model chat is serving) fails:
    an empty .<name>.old-* folder was left per attempt."""
    from cfg_unlearn import utils

    out, new = tmp_path / "model", tmp_path / "new"
    out.mkdir()
    (out / "w").write_text("old")
    new.mkdir()
    real = os.rename

    def in_use(src, dst):
        if Path(src) == out:
            raise PermissionError("in use")
        return real(src, dst)

    monkeypatch.setattr(utils.os, "rename", in_use)
    with pytest.raises(PermissionError):
        utils.publish_dir(new, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "new"]


def test_text_outputs_are_written_as_given_not_with_windows_newlines(tmp_path, monkeypatch):
    """Text mode on Windows turns every "\\n" into "\\r\\n": the GuidanceEval sample CSVs
    (csv rows end in "\\r\\n") got a blank row after each, and every JSONL line a CR."""
    from cfg_unlearn import utils

    real = os.fdopen

    def windows_fdopen(fd, mode="r", *args, **kw):
        if "b" not in mode:
            kw.setdefault("newline", "\r\n")  # what newline=None means on Windows
        return real(fd, mode, *args, **kw)

    monkeypatch.setattr(utils.os, "fdopen", windows_fdopen)
    utils.atomic_write(tmp_path / "step.csv", "a,b\r\nc,d\r\n")
    utils.atomic_write(tmp_path / "pairs.jsonl", '{"id": 1}\n')
    assert (tmp_path / "step.csv").read_bytes() == b"a,b\r\nc,d\r\n"
    assert (tmp_path / "pairs.jsonl").read_bytes() == b'{"id": 1}\n'


def test_atomic_write_files_rolls_back_with_copies_where_hard_links_fail(tmp_path, monkeypatch):
    """Without hard links the old file is copied aside. A rename that failed left its
    file untouched, yet the rollback put the copy over it (a new inode: other links and
    the owner lost; a symlink came back as a plain file)."""
    from cfg_unlearn import utils

    (tmp_path / "real.jsonl").write_text("old a")
    (tmp_path / "a.jsonl").symlink_to("real.jsonl")
    (tmp_path / "b.jsonl").write_text("old b")
    inode_b = (tmp_path / "b.jsonl").stat().st_ino

    def no_links(src, dst):
        raise OSError("hard links not supported")

    def fail():
        raise OSError("disk gone")
    monkeypatch.setattr(utils.os, "link", no_links)
    monkeypatch.setattr(utils.os, "replace", _rename_then(2, fail))
    with pytest.raises(OSError, match="disk gone"):
        utils.atomic_write_files(_set(tmp_path, {"a.jsonl": "new", "b.jsonl": "new"}))
    assert (tmp_path / "a.jsonl").is_symlink() and (tmp_path / "a.jsonl").read_text() == "old a"
    assert (tmp_path / "b.jsonl").stat().st_ino == inode_b and (tmp_path / "b.jsonl").read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "real.jsonl"]


def test_same_path_does_not_trust_inode_0(tmp_path, monkeypatch):
    """Some Windows drives (network, cloud) give every file inode 0: samefile said any
    two paths were one, and every existing --out was refused as the current directory."""
    from cfg_unlearn import utils

    (tmp_path / "results").mkdir()
    real = os.stat

    def inode_0(path, *a, **kw):
        st = real(path, *a, **kw)
        return os.stat_result((st.st_mode, 0, 7, *st[3:10]))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(utils.os, "stat", inode_0)
    assert not utils.same_path(Path("results"), Path.cwd())
    utils.check_out_dir(Path("results"), True, ())


def test_hf_progress_bars_off_puts_them_back_as_they_were():
    """After an exception too, and bars a user had turned off stay off."""
    from transformers.utils import logging as hf_logging

    from cfg_unlearn.utils import hf_progress_bars_off

    assert hf_logging.is_progress_bar_enabled()
    with pytest.raises(KeyboardInterrupt), hf_progress_bars_off():
        assert not hf_logging.is_progress_bar_enabled()
        raise KeyboardInterrupt
    assert hf_logging.is_progress_bar_enabled()
    with hf_progress_bars_off(False):
        assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with hf_progress_bars_off():
            pass
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_exclusive_lock_refuses_a_second_holder_until_the_first_lets_go(tmp_path):
    from cfg_unlearn.utils import OutputBusy, exclusive_lock

    lock = tmp_path / "out.lock"
    with exclusive_lock(lock, "busy"):
        with pytest.raises(OutputBusy, match="^busy$"), exclusive_lock(lock, "busy"):
            pass
    with exclusive_lock(lock, "busy"):  # released: taken again
        pass


@pytest.mark.skipif(os.name == "nt", reason="flock is the POSIX path")
def test_exclusive_lock_runs_unlocked_where_the_file_system_cannot_lock(tmp_path, monkeypatch, caplog):
    """Some NFS, CIFS and Lustre mounts refuse flock (ENOLCK, ENOSYS): every demo there was
    refused as if another one were running (review)."""
    import errno
    import fcntl

    from cfg_unlearn.utils import exclusive_lock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with exclusive_lock(tmp_path / "out.lock", "busy"):
        ran.append(True)
    assert ran and "cannot lock" in caplog.text and "No locks available" in caplog.text
