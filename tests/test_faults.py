"""Faults outside the program: an --out that cannot be written, a disk that fills at a checkpoint, a damaged newest
checkpoint, --resume where there is nothing to resume. Each is one line on stderr and exit status 2 (or, where the
run can go on, one line saying how it goes on), never a traceback; nothing written before the fault is lost."""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import train
from engine import checkpoints, hf
from test_train import ROOT, TINY_POLICY, TINY_PRETRAIN, run_cli_in_process, run_in_process


@pytest.fixture
def cache(embedded_cache):
    return embedded_cache


def mounted_tmpfs(folder: Path, *options: str):
    """A small filesystem of our own at folder (root only, as in CI's container); the test is skipped without one."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    return folder


def unmount(folder: Path):
    subprocess.run(["umount", str(folder)], capture_output=True)


# --------------------------------------------------------------------------------------------
# --out, checked before anything is written
# --------------------------------------------------------------------------------------------


def test_an_out_that_is_a_file_or_under_a_file_or_too_long_is_refused_before_anything_is_written(
        tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    longest = os.pathconf(tmp_path, "PC_NAME_MAX")
    for out, message in [(a_file, "is a file, not a folder"), (a_file / "run", os.strerror(errno.ENOTDIR)),
                         (tmp_path / ("r" * (longest + 1)), os.strerror(errno.ENAMETOOLONG)),
                         (tmp_path / "new" / ("r" * (longest + 1)) / "run", os.strerror(errno.ENAMETOOLONG))]:
        monkeypatch.setattr(sys, "argv", ["train.py", "--out", str(out)])
        monkeypatch.setenv("RWML_JAX_CACHE", str(tmp_path / "cache"))
        with pytest.raises(SystemExit) as exit_:
            train.cli()
        stderr = capsys.readouterr().err
        assert exit_.value.code == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert stderr.startswith(f"error: --out {out}") and message in stderr and "Fix: choose another --out" in stderr
    assert a_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_an_out_on_a_read_only_filesystem_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    folder = mounted_tmpfs(tmp_path / "ro", "ro", "size=1m")
    try:
        monkeypatch.setattr(sys, "argv", ["train.py", "--out", str(folder / "run")])
        monkeypatch.setenv("RWML_JAX_CACHE", str(tmp_path / "cache"))
        with pytest.raises(SystemExit) as exit_:
            train.cli()
        stderr = capsys.readouterr().err
        assert exit_.value.code == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert "read-only filesystem" in stderr and "Fix: choose another --out" in stderr
        assert not (tmp_path / "cache").exists()
    finally:
        unmount(folder)


# --------------------------------------------------------------------------------------------
# A disk that fills at a checkpoint
# --------------------------------------------------------------------------------------------

FILL = textwrap.dedent("""
    import os, sys


    def fill(folder):
        \"\"\"A file taking every free byte of folder's filesystem. Unbuffered: a buffered file's close would flush
        what the failed write left in its buffer and raise ENOSPC again, here rather than at the checkpoint.\"\"\"
        filler = os.open(os.path.join(folder, "filler"), os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(filler, b"x" * 65536):
                pass
        except OSError:
            pass
        finally:
            os.close(filler)
""")

# train.py's command line, with the disk filled once the checkpoint of step 1 is complete, just before the checkpoint
# of step 2 is written
FILL_BEFORE_STEP_2 = FILL + textwrap.dedent("""
    sys.path.insert(0, os.getcwd())
    from engine import checkpoints
    import train

    save = checkpoints.Checkpoints.save

    def fill_then_save(self, global_step, arrays, position):
        if global_step == 2:
            self.manager.wait_until_finished()
            fill(os.environ["FILL"])
        save(self, global_step, arrays, position)

    checkpoints.Checkpoints.save = fill_then_save
    sys.argv = ["train.py", *sys.argv[1:]]
    train.cli()
""")


def test_a_disk_that_fills_at_a_checkpoint_is_one_line_and_the_checkpoint_before_it_is_kept(cache, tmp_path):
    disk = mounted_tmpfs(tmp_path / "disk", "size=64m")
    try:
        out = disk / "run"
        environment = {**os.environ, "RWML_JAX_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "FILL": str(disk)}
        done = subprocess.run([sys.executable, "-c", FILL_BEFORE_STEP_2, "--method", "grpo", *TINY_PRETRAIN,
                               *TINY_POLICY, "--iterations", "3", "--out", str(out)], cwd=ROOT, env=environment,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert re.fullmatch(f"error: could not write the checkpoint of step 2 in {re.escape(str(out))}/checkpoints: "
                            r"it needs \d+\.\d MiB and 0\.0 MiB are free; the checkpoint of step 1 is complete\. "
                            f"{re.escape(checkpoints.WRITE_FIX)}\n", done.stderr), done.stderr
        kept = checkpoints.Checkpoints(out / "checkpoints")
        assert kept.latest() == 1 and kept.position(1) == {"stage": 0, "step": 1}
        kept.close()
    finally:
        unmount(disk)


CHECKPOINT_ON_A_FULL_DISK = FILL + textwrap.dedent("""
    import numpy as np
    sys.path.insert(0, os.getcwd())
    from pathlib import Path
    from engine import checkpoints

    disk = Path(sys.argv[1])
    if sys.argv[2] == "orbax":  # the disk looks roomy to save()'s own check: Orbax's write is what fails
        roomy = os.statvfs_result((4096, 4096, 2**30, 2**30, 2**30, 0, 0, 0, 0, 255))
        checkpoints.os = type(os)("os_with_a_roomy_disk")
        checkpoints.os.__dict__.update(os.__dict__, statvfs=lambda path: roomy)
    saved = checkpoints.Checkpoints(disk / "checkpoints")
    arrays = {"weights": np.arange(100_000, dtype=np.float32)}
    saved.save(1, arrays, {"stage": 0, "step": 1})
    saved.manager.wait_until_finished()
    fill(disk)
    try:
        saved.save(2, arrays, {"stage": 0, "step": 2})
        saved.close()
    except checkpoints.WriteError as error:
        print(error, flush=True)
        os._exit(3)
""")


@pytest.mark.parametrize("fails", ["before-writing", "orbax"])
def test_a_checkpoint_that_cannot_be_written_is_a_write_error_naming_the_checkpoints_kept(fails, tmp_path):
    """A full disk found by save()'s own check before Orbax starts; or Orbax's own failure (in its writer threads,
    raised at the next save or at close), its threads' logs (absl's logger) dropped: one WriteError either way."""
    disk = mounted_tmpfs(tmp_path / "disk", "size=2m")
    try:
        done = subprocess.run([sys.executable, "-c", CHECKPOINT_ON_A_FULL_DISK, str(disk), fails], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 3, done.stderr
        folder, kept = re.escape(str(disk / "checkpoints")), "the checkpoint of step 1 is complete"
        reason = (r"the checkpoint of step 2 in {folder}: it needs 1\.4 MiB and 0\.0 MiB are free" if fails != "orbax"
                  else f"a checkpoint in {{folder}}: {os.strerror(errno.ENOSPC)}").format(folder=folder)
        assert re.fullmatch(f"could not write {reason}; {kept}. {re.escape(checkpoints.WRITE_FIX)}\n", done.stdout), \
            done.stdout
        assert "ERROR:absl" not in done.stderr, done.stderr
    finally:
        unmount(disk)


def test_any_other_write_that_fails_for_the_filesystem_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """metrics.jsonl, TensorBoard's events, the exported model: a write of the run's own that the filesystem refuses
    is one line naming the file and the checkpoints still whole; any other OSError is a bug and keeps its traceback."""
    out = tmp_path / "run"
    (out / "checkpoints" / "4").mkdir(parents=True)
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    for error in (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "metrics.jsonl")),
                  OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))):
        def fail(args, error=error):
            raise error

        monkeypatch.setattr(train, "main", fail)
        monkeypatch.setattr(sys, "argv", ["train.py", "--out", str(out)])
        train.cli()
        where = out / "metrics.jsonl" if error.filename else f"in {out}"
        assert capsys.readouterr().err == (f"error: could not write {where}: {error.strerror}; the checkpoint of step 4 "
                                           f"is complete. {checkpoints.WRITE_FIX}\n")
    assert exits == [2, 2]

    def bug(args):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    monkeypatch.setattr(train, "main", bug)
    with pytest.raises(OSError, match="Bad file descriptor"):
        train.cli()


# --------------------------------------------------------------------------------------------
# A damaged newest checkpoint; nothing to resume
# --------------------------------------------------------------------------------------------


def damage(checkpoint: Path, part: str):
    if part == "arrays":  # the largest file of its arrays cut short, as a copy or a failing disk leaves it
        largest = max((p for p in (checkpoint / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        with largest.open("r+b") as file:
            file.truncate(largest.stat().st_size // 2)
    else:  # its position, the stage and step it was written at, unreadable
        (checkpoint / "position" / "metadata").write_text("{\"stage\": 0, \"st")


DAMAGED_ARGV = ["--method", "grpo", *TINY_PRETRAIN, *TINY_POLICY, "--iterations", "4", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def whole(embedded_cache, tmp_path_factory):
    """A run that was never interrupted, its checkpoints at steps 2 and 4 (Orbax keeps the last two)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    with pytest.MonkeyPatch.context() as patch:
        run_in_process([*DAMAGED_ARGV, "--out", str(out)], embedded_cache, patch)
    return out


@pytest.mark.parametrize("part", ["arrays", "position"])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_continues_from_the_one_before_it(
        part, whole, cache, tmp_path, monkeypatch, capsys):
    """The run resumed from the checkpoint before the damaged one replays the steps between them exactly (their data
    is a function of the step): it ends with the parameters of the run that was never interrupted."""
    argv, damaged = DAMAGED_ARGV, tmp_path / "damaged"
    shutil.copytree(whole, damaged)
    shutil.rmtree(damaged / "model")  # as if it had stopped right after its last checkpoint
    assert checkpoints.checkpoint_steps(damaged / "checkpoints") == [2, 4]
    damage(damaged / "checkpoints" / "4", part)
    capsys.readouterr()
    run_in_process([*argv, "--out", str(damaged), "--resume"], cache, monkeypatch)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("--resume")]
    assert len(said) == 1 and f"the checkpoint of step 4 in {damaged / 'checkpoints'} cannot be read" in said[0]
    assert said[0].endswith("Continuing from step 2, the newest intact checkpoint.")
    assert (damaged / "checkpoints" / "4.unreadable").is_dir()
    assert checkpoints.checkpoint_steps(damaged / "checkpoints") == [2, 4]  # step 4 written again
    _, expected = hf.load_checkpoint(whole / "model")
    _, resumed = hf.load_checkpoint(damaged / "model")
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    records = [json.loads(line) for line in (damaged / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]


def test_resume_where_no_run_was_started_is_refused(tmp_path, monkeypatch, capsys):
    code, stderr, wrote = run_cli_in_process(["--resume"], tmp_path, monkeypatch, capsys)
    assert code == 2 and stderr.startswith(f"error: --resume: {tmp_path / 'run'} holds no run to resume")
    assert "Fix: leave --resume out" in stderr and len(stderr.strip().splitlines()) == 1 and not wrote
    (tmp_path / "run").mkdir()
    code, stderr, wrote = run_cli_in_process(["--resume"], tmp_path, monkeypatch, capsys)
    assert code == 2 and "holds no run to resume (no args.json)" in stderr
    assert not (tmp_path / "cache").exists() and not any((tmp_path / "run").iterdir())


def test_resume_of_a_run_stopped_before_its_first_checkpoint_says_so_and_starts_from_the_beginning(
        cache, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["--method", "grpo", "--out", str(out), *TINY_PRETRAIN, *TINY_POLICY, "--iterations", "1"]
    run_in_process(argv, cache, monkeypatch)
    fresh = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    shutil.rmtree(out / "checkpoints")
    shutil.rmtree(out / "model")
    capsys.readouterr()
    run_in_process([*argv, "--resume"], cache, monkeypatch)
    assert (f"--resume: no checkpoint in {out / 'checkpoints'} (the run stopped before its first); starting from the "
            "beginning") in capsys.readouterr().out
    again = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {k: v for k, v in again.items() if k.startswith("eval/")} == {
        k: v for k, v in fresh.items() if k.startswith("eval/")}
