"""Orbax checkpoints a run resumes from, and the Hugging Face model it exports.

Neither is ever written with a NaN or infinite number in it: a run that diverged keeps its last finite checkpoint.
"""

from __future__ import annotations

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


class Checkpoints:
    """Orbax checkpoints named by the global step: the arrays ({state, reference (when the KL term needs it),
    key}) and, as JSON, the position (stage index and step within it, which fixes the data position).

    With several processes every one of them saves and restores (each writes its own shards, process 0 the rest), so
    the arrays must be global ones: on the run's mesh, none on one process's device alone."""

    def __init__(self, folder: Path):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
        self.manager = ocp.CheckpointManager(folder.absolute(), options=options)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, global_step: int, arrays: dict, position: dict) -> None:
        """Write a checkpoint; refused (NotFiniteError) if any number in it is NaN or infinite, which no resume could use."""
        if not all_finite(arrays):
            raise NotFiniteError(f"the checkpoint of step {global_step} holds a number that is not finite (NaN or "
                            "infinity) and was not written; the last one written is finite. Fix: start again in "
                            "another --out with a lower learning rate, or with --compute-dtype float32.")
        self.manager.save(global_step, args=self.ocp.args.Composite(
            arrays=self.ocp.args.StandardSave(arrays), position=self.ocp.args.JsonSave(position)))

    def position(self, global_step: int) -> dict:
        restored = self.manager.restore(global_step, args=self.ocp.args.Composite(position=self.ocp.args.JsonRestore()))
        return dict(restored["position"])

    def restore(self, global_step: int, like: dict) -> dict:
        """The arrays, with the shapes, dtypes and shardings of `like`."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        restored = self.manager.restore(global_step, args=self.ocp.args.Composite(
            arrays=self.ocp.args.StandardRestore(abstract)))
        return restored["arrays"]

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_steps(folder: Path) -> list[int]:
    """The steps of the checkpoints written to folder (Orbax writes each under a temporary name and renames it
    to its step once complete, so a start that failed before its first checkpoint leaves none)."""
    return sorted(int(path.name) for path in folder.glob("*") if path.name.isdigit()) if folder.is_dir() else []
