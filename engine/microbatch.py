"""Micro-batches sized to memory: one update's gradient summed over pieces of at most a token budget.

An update's loss is a sum over rows divided by totals of the whole batch (docs/methods.md eq. 13), so any partition
of its rows into micro-batches sums to the same gradient. `LengthSortedUpdate` picks the partition that costs least:
rows sorted by length, each micro-batch cut to its longest row and holding as many rows as the budget allows, its
shapes powers of two so that jit compiles a handful of them.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import grpo
import model as lm
import multihost


def row_lengths(token_mask) -> np.ndarray:
    """[n] each row's length up to its last real token (0 for a row of padding only)."""
    mask = np.asarray(token_mask)
    lengths = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
    lengths[~mask.any(1)] = 0
    return lengths


def plan_micro_batches(lengths: np.ndarray, width: int, token_budget: int, row_multiple: int = 1,
                       min_bucket: int = 16) -> list[tuple[np.ndarray, int]]:
    """(row indices, padded length) of each micro-batch: rows sorted longest first, each micro-batch cut to the power
    of two (>= min_bucket, <= width) holding its longest row, with as many rows as fit in token_budget tokens per
    row_multiple rows (a power of two times row_multiple, at least row_multiple: one row per device). The last
    micro-batch's indices may run short; the caller fills them with padding rows. Rows of padding only are left out
    (but one micro-batch is always planned, so a batch without real rows gives a zero gradient).

    Every real row is in exactly one micro-batch. Shapes are powers of two, so jit compiles a handful of them.
    """
    order = np.argsort(-lengths, kind="stable")
    real = int((lengths > 0).sum())
    plans, start = [], 0
    while start < max(real, 1):
        cut = min(lm.bucket_length(int(lengths[order[start]]), min_bucket), width)
        per_device = 1 << max(0, (token_budget // cut).bit_length() - 1)  # the largest power of two that fits
        rows = row_multiple * min(per_device, lm.bucket_length(-(-(max(real, 1) - start) // row_multiple), 1))
        plans.append((order[start:min(start + rows, max(real, 1))], cut))
        start += rows
    return plans


def micro_batch(batch, indices: np.ndarray, width: int, rows: int):
    """The rows `indices` of batch (a NamedTuple of [n, ...] arrays), cut to `width` columns, and padded with
    all-zero rows (no real token, no loss) to `rows` rows."""
    def take(x):
        x = np.asarray(x)
        piece = x[indices, :width] if x.ndim == 2 else x[indices]
        return np.concatenate([piece, np.zeros((rows - len(indices), *piece.shape[1:]), piece.dtype)])

    return jax.tree.map(take, batch)


class LengthSortedUpdate:
    """update(state, batch) -> (state, metrics): grpo.objective_step's update, its gradient summed over micro-batches
    of at most token_budget tokens per device (plan_micro_batches): one jitted gradient per micro-batch shape.

    A causal model's log-probs of the real tokens do not depend on the padding after them, and every micro-batch's
    loss is divided by the whole batch's totals (methods.md eq. 13), so the summed gradient is the whole batch's: the
    result equals grpo.objective_step's to float rounding (the sum runs in another order). Each micro-batch unembeds
    only the columns its loss reads (objective.scored, lm.scored_positions): the vocabulary projection is a small
    model's largest matmul, and a prompt's columns need none. Sorting by length also saves the padding: a multi-turn
    rollout's turns vary in length several-fold. shard(micro_batch) places each micro-batch (e.g. over a mesh's data
    axes; rows come in multiples of row_multiple, the device count), and state_shardings, when given, keeps the
    state where it is. As in grpo.objective_step, an update whose loss or gradient is not finite is skipped.
    flops(token_mask, scored) -> the update's model FLOPs (estimates.training_flops), when given, adds them to the
    metrics (model_flops): MFU's numerator.
    """

    def __init__(self, objective: grpo.Objective, optimizer: optax.GradientTransformation, token_budget: int,
                 shard: Callable = lambda batch: batch, state_shardings=None, row_multiple: int = 1,
                 min_bucket: int = 16, flops: Callable | None = None):
        self.token_budget, self.shard, self.row_multiple, self.min_bucket = token_budget, shard, row_multiple, min_bucket
        self.scored, self.flops = objective.scored, flops
        self.totals = jax.jit(objective.totals)
        self.gradient = jax.jit(jax.grad(objective.loss, has_aux=True))
        self.add = jax.jit(lambda total, more: jax.tree.map(jnp.add, total, more), donate_argnums=0)

        def finish(state, grads, sums, totals):
            updated, grad_norm = grpo.apply_update(state, grads, optimizer)
            metrics = objective.metrics(sums, totals)
            state, skipped = grpo.skip_if_not_finite(updated, state, metrics["loss"], grad_norm)
            return state, dict(metrics, grad_norm=grad_norm, skipped=skipped)

        shardings = {} if state_shardings is None else dict(in_shardings=(state_shardings, None, None, None),
                                                              out_shardings=(state_shardings, None))
        self.finish = jax.jit(finish, donate_argnums=0, **shardings)

    def micro_batches(self, batch) -> list:
        """The batch's micro-batches, as this update splits it."""
        plans = plan_micro_batches(row_lengths(batch.token_mask), batch.tokens.shape[1], self.token_budget,
                                   self.row_multiple, self.min_bucket)
        return [micro_batch(batch, indices, width, self._rows(indices)) for indices, width in plans]

    def _rows(self, indices) -> int:
        return self.row_multiple * lm.bucket_length(-(-len(indices) // self.row_multiple), 1)

    def __call__(self, state: grpo.TrainState, batch):
        totals = self.totals(batch)
        total = None
        for micro in self.micro_batches(batch):
            micro, positions = self.shard((micro, lm.scored_positions(self.scored(micro), self.min_bucket)))
            more = self.gradient(state.params, micro, totals, positions)
            total = more if total is None else self.add(total, more)
        grads, sums = total
        state, metrics = self.finish(state, grads, sums, totals)
        if self.flops is not None:
            metrics = dict(metrics, model_flops=self.flops(batch.token_mask, self.scored(batch)))
        return state, metrics

    def map_rows(self, fn: Callable, tokens, token_mask, scored=None) -> np.ndarray:
        """fn(tokens, token_mask) -> [rows, time] values, run over the same micro-batches and put back in row order
        ([n, time], zeros past each micro-batch's cut): e.g. the reference log-probs of the KL term. With a mask
        `scored` [n, time], fn(tokens, token_mask, positions) needs only the columns of lm.scored_positions."""
        tokens, token_mask = np.asarray(tokens), np.asarray(token_mask)
        plans = plan_micro_batches(row_lengths(token_mask), tokens.shape[1], self.token_budget, self.row_multiple,
                                   self.min_bucket)
        out = np.zeros(tokens.shape, np.float32)
        for indices, width in plans:
            piece = micro_batch((tokens, token_mask), indices, width, self._rows(indices))
            if scored is not None:
                piece = (*piece, lm.scored_positions(micro_batch(np.asarray(scored), indices, width, len(piece[0])),
                                                     self.min_bucket))
            values = multihost.to_host(fn(*self.shard(piece)))
            out[indices, :width] = values[:len(indices)]
        return out
