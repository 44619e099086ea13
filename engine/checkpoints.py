"""Orbax checkpoints a run resumes from, and the Hugging Face model it exports.

Neither is ever written with a NaN or infinite number in it: a run that diverged keeps its last finite checkpoint.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp

import model as lm
import multihost
from engine import hf


class NotFiniteError(Exception):
    """Parameters (or optimizer state) with a NaN or infinity were about to be written; nothing was."""


@jax.jit
def _leaves_finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def all_finite(tree) -> bool:
    """Whether every floating-point number in tree (parameters, optimizer state, ...) is finite: one device pass."""
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    return not leaves or bool(_leaves_finite(leaves))


def export_model(folder: Path, config: lm.Config, params, tokenizer) -> None:
    """The model in Hugging Face format, written by process 0; refused (NotFiniteError) if a parameter is NaN or
    infinite, nothing written."""
    if not all_finite(params):
        raise NotFiniteError(f"the model to export to {folder} has a parameter that is not finite (NaN or infinity); "
                        "nothing was exported. Fix: start again in another --out with a lower learning rate, or with "
                        "--compute-dtype float32.")
    host = multihost.to_host(params)  # every process gathers (a collective); one writes
    if multihost.is_primary():
        hf.save_checkpoint(folder, config, host, tokenizer)


class WriteError(Exception):
    """A checkpoint could not be written (a full disk, a quota, a filesystem gone read-only); the ones before it are
    complete (Orbax writes each under a temporary name and renames it once whole)."""


class _OrbaxErrors(logging.Filter):
    """Orbax logs each failure of its background writer threads (absl's logger, once a thread, with a traceback)
    and then raises it in the main thread, where save() and close() report it as one WriteError: drop the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


class UnreadableCheckpoint(Exception):
    """A checkpoint that exists but cannot be read back (a file cut short or missing, bytes changed on disk)."""

    def __init__(self, folder: Path, step: int, error: Exception):
        detail = " ".join(str(error).split())
        detail = detail if len(detail) <= 100 else detail[:100] + "..."
        super().__init__(f"the checkpoint of step {step} in {folder} cannot be read ({type(error).__name__}: "
                         f"{detail or 'no detail'})")
        self.step = step


class Checkpoints:
    """Orbax checkpoints named by the global step: the arrays ({state, reference (when the KL term needs it),
    key}) and, as JSON, the position (stage index and step within it, which fixes the data position).

    With several processes every one of them saves and restores (each writes its own shards, process 0 the rest), so
    the arrays must be global ones: on the run's mesh, none on one process's device alone."""

    def __init__(self, folder: Path):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.folder = folder
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
        self.manager = ocp.CheckpointManager(folder.absolute(), options=options)
        if not any(isinstance(f, _OrbaxErrors) for f in logging.getLogger("absl").filters):
            logging.getLogger("absl").addFilter(_OrbaxErrors())

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, global_step: int, arrays: dict, position: dict) -> None:
        """Write a checkpoint; refused (NotFiniteError) if any number in it is NaN or infinite, which no resume could use."""
        if not all_finite(arrays):
            raise NotFiniteError(f"the checkpoint of step {global_step} holds a number that is not finite (NaN or "
                            "infinity) and was not written; the last one written is finite. Fix: start again in "
                            "another --out with a lower learning rate, or with --compute-dtype float32.")
        try:  # the write runs in the background; a failure shows here, at the next save, or at close()
            self.manager.wait_until_finished()  # as Orbax's save does first: the last checkpoint's bytes are down
        except Exception as error:
            raise self.write_error(error) from error
        needed = sum(getattr(leaf, "nbytes", 8) for leaf in jax.tree.leaves(arrays)) + 2**20
        disk = os.statvfs(self.folder)
        if disk.f_bavail * disk.f_frsize < needed:  # refused before Orbax starts: its threads' failure mid-write is
            raise WriteError(  # reported again by each of them (tracebacks at exit), so a full disk is found first
                f"could not write the checkpoint of step {global_step} in {self.folder}: it needs "
                f"{needed / 2**20:.1f} MiB and {disk.f_bavail * disk.f_frsize / 2**20:.1f} MiB are free; "
                f"{complete(self.folder)}. {WRITE_FIX}")
        try:
            self.manager.save(global_step, args=self.ocp.args.Composite(
                arrays=self.ocp.args.StandardSave(arrays), position=self.ocp.args.JsonSave(position)))
        except Exception as error:
            raise self.write_error(error) from error

    def write_error(self, error: Exception) -> WriteError:
        """One line for a failed write: the reason (the operating system's words where Orbax's message carries
        them), the checkpoints that are complete, and the fix."""
        text = str(error)
        reason = next((os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)
                       if os.strerror(code) in text), text.splitlines()[0][:200] if text else type(error).__name__)
        return WriteError(f"could not write a checkpoint in {self.folder}: {reason}; {complete(self.folder)}. "
                          f"{WRITE_FIX}")

    def position(self, global_step: int) -> dict:
        """The position of checkpoint global_step; UnreadableCheckpoint if it cannot be read."""
        try:
            restored = self.manager.restore(global_step, args=self.ocp.args.Composite(
                position=self.ocp.args.JsonRestore()))
            return {"stage": int(restored["position"]["stage"]), "step": int(restored["position"]["step"])}
        except Exception as error:  # whatever Orbax or the JSON reader raise for a damaged file
            raise UnreadableCheckpoint(self.folder, global_step, error) from error

    def restore(self, global_step: int, like: dict) -> dict:
        """The arrays, with the shapes, dtypes and shardings of `like`; UnreadableCheckpoint if they cannot be read
        (or hold a NaN or infinity, which save() never writes: the bytes changed on disk)."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        try:
            restored = self.manager.restore(global_step, args=self.ocp.args.Composite(
                arrays=self.ocp.args.StandardRestore(abstract)))["arrays"]
        except Exception as error:
            raise UnreadableCheckpoint(self.folder, global_step, error) from error
        if not all_finite(restored):
            raise UnreadableCheckpoint(self.folder, global_step, ValueError("a number that is not finite"))
        return restored

    def set_aside(self, global_step: int) -> Path:
        """Rename an unreadable checkpoint to <step>.unreadable (kept for a post-mortem; Orbax no longer lists it),
        so the newest intact one is the latest; process 0 renames, every process then reads the folder again."""
        aside = self.folder / f"{global_step}.unreadable"
        if multihost.is_primary():
            suffix = 1
            while aside.exists():
                aside, suffix = self.folder / f"{global_step}.unreadable.{suffix}", suffix + 1
            (self.folder / str(global_step)).rename(aside)
        multihost.barrier(f"checkpoint {global_step} set aside")
        self.manager.reload()
        return aside

    def close(self):
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception as error:
            raise self.write_error(error) from error


WRITE_FIX = "Fix: free space there (or make it writable), then run the same command with --resume."


def complete(folder: Path) -> str:
    """The checkpoints in folder that a write fault left whole, in words."""
    steps = checkpoint_steps(folder)
    if not steps:
        return "no checkpoint was complete yet"
    if len(steps) == 1:
        return f"the checkpoint of step {steps[0]} is complete"
    return f"the checkpoints of steps {', '.join(map(str, steps))} are complete"


def checkpoint_steps(folder: Path) -> list[int]:
    """The steps of the checkpoints written to folder (Orbax writes each under a temporary name and renames it
    to its step once complete, so a start that failed before its first checkpoint leaves none)."""
    return sorted(int(path.name) for path in folder.glob("*") if path.name.isdigit()) if folder.is_dir() else []
