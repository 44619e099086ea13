"""engine/microbatch.py: one update over length-sorted micro-batches of a token budget is the whole batch's update
(methods.md eq. 13), checked against grpo.grpo_step on the uncut batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_grpo import TINY, policy_batch

import grpo
import model as lm
from engine import microbatch


def ragged_batch(seed=0, rows=16, width=64):
    """Right-padded rows of lengths 3..width, their second half the response (a quarter of the rows empty, as a batch
    padded to a power of two has)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, width + 1, rows)
    lengths[rng.permutation(rows)[:rows // 4]] = 0
    positions = np.arange(width)
    token_mask = positions < lengths[:, None]
    prompt = (lengths // 2)[:, None]  # the loss reads half of each row: LengthSortedUpdate unembeds only that half
    loss_mask = (token_mask & (positions >= prompt)).astype(np.float32)
    tokens = np.where(token_mask, rng.integers(1, TINY.vocab_size, (rows, width)), 0).astype(np.int32)
    old = -rng.uniform(1, 4, (rows, width)).astype(np.float32) * loss_mask
    advantages = np.repeat(rng.normal(size=(rows, 1)), width, 1).astype(np.float32) * loss_mask
    return policy_batch(tokens, token_mask, loss_mask, old, old - 0.1, advantages)


def test_micro_batches_hold_every_real_row_once_within_the_token_budget():
    batch = ragged_batch(seed=1)
    update = microbatch.LengthSortedUpdate(grpo.grpo_objective(TINY, grpo.StepConfig()), optax.sgd(1.0), token_budget=128)
    pieces = update.micro_batches(batch)
    lengths = np.asarray(batch.token_mask).sum(1)
    for piece in pieces:
        rows, width = piece.tokens.shape
        assert width == lm.bucket_length(int(piece.token_mask.sum(1).max()))  # cut to its longest row
        assert rows * width <= 128 and rows & (rows - 1) == 0  # within the budget, a power of two of rows
    assert [p.tokens.shape for p in pieces][:2] == [(2, 64), (2, 64)]  # the longest rows first, two of 64 at a time
    assert sorted(int(n) for p in pieces for n in p.token_mask.sum(1) if n) == sorted(int(n) for n in lengths if n)
    cut = np.concatenate([np.pad(p.tokens, ((0, 0), (0, 64 - p.tokens.shape[1]))) for p in pieces])
    whole = {row.tobytes() for row in np.asarray(batch.tokens)[lengths > 0]}
    assert {row.tobytes() for row in cut if row.any()} == whole
    # a batch of padding only still gives one (empty) micro-batch, whose gradient is zero
    padding = batch._replace(token_mask=jnp.zeros_like(batch.token_mask), action_mask=jnp.zeros_like(batch.action_mask))
    assert [p.tokens.shape for p in update.micro_batches(padding)] == [(1, 16)]


def test_micro_batches_come_in_multiples_of_the_device_count():
    lengths = np.array([40, 33, 30, 17, 9, 9, 5, 0])
    plans = microbatch.plan_micro_batches(lengths, 64, token_budget=32, row_multiple=2)
    assert [(len(rows), width) for rows, width in plans] == [(2, 64), (2, 32), (3, 16)]  # the last filled to 4
    assert sorted(int(i) for rows, _ in plans for i in rows) == list(range(7))  # the padding row is left out


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_length_sorted_update_is_the_whole_batch_update(aggregation):
    """LengthSortedUpdate against grpo_step on the uncut batch (methods.md eq. 13): the same gradient (SGD with lr 1:
    the update is the gradient; Adam's first step, about lr * sign(g), would hide a wrongly scaled one) and the same
    metrics."""
    params = lm.init_params(TINY, jax.random.key(5))
    batch = ragged_batch(seed=2)
    optimizer = optax.sgd(1.0)
    step = grpo.StepConfig(grpo.LossConfig(beta=0.05, aggregation=aggregation), temperature=0.7)
    whole, expected = jax.jit(functools.partial(grpo.grpo_step, model_config=TINY, optimizer=optimizer, step=step))(
        grpo.init_state(params, optimizer), batch)
    update = microbatch.LengthSortedUpdate(grpo.grpo_objective(TINY, step), optimizer, token_budget=128)
    pieces, metrics = update(grpo.init_state(params, optimizer), batch)
    assert len(update.micro_batches(batch)) >= 4
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(pieces.params)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    assert metrics.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_rows_mapped_over_micro_batches_come_back_in_row_order():
    """The reference log-probs computed in the update's micro-batches equal one pass over the whole batch (on the
    loss tokens only, when those are given)."""
    params = lm.init_params(TINY, jax.random.key(6))
    batch = ragged_batch(seed=3)
    update = microbatch.LengthSortedUpdate(grpo.grpo_objective(TINY, grpo.StepConfig()), optax.sgd(1.0), token_budget=128)
    logprobs = jax.jit(lambda tokens, mask: lm.token_logprobs(params, TINY, tokens, mask)[0])
    mapped = update.map_rows(logprobs, batch.tokens, batch.token_mask)
    whole = np.asarray(logprobs(batch.tokens, batch.token_mask))
    real = np.asarray(batch.token_mask)
    np.testing.assert_allclose(mapped[real], whole[real], atol=1e-5, rtol=0)  # float32 rounding of other shapes
    assert not mapped[~real.any(1)].any()  # rows of padding only are in no micro-batch
    # given the loss tokens, fn gets their positions and scores only those
    at = jax.jit(lambda tokens, mask, positions: lm.token_logprobs(params, TINY, tokens, mask, positions=positions)[0])
    loss = np.asarray(batch.action_mask) > 0
    scored = update.map_rows(at, batch.tokens, batch.token_mask, batch.action_mask)
    np.testing.assert_allclose(scored[loss], whole[loss], atol=1e-5, rtol=0)
    assert not scored[~loss].any()


@pytest.mark.parametrize("field", ["advantages", "old_logprobs"])
def test_an_update_with_a_non_finite_loss_is_skipped_and_leaves_the_state_unchanged(field):
    """One NaN on a loss token makes the loss and the gradient NaN: the state comes back as it went in (parameters,
    AdamW's moments, the step count), and skipped = 1; the same batch without the NaN updates (skipped = 0)."""
    params = lm.init_params(TINY, jax.random.key(7))
    batch = ragged_batch(seed=4)
    row, column = map(int, np.argwhere(np.asarray(batch.action_mask) > 0)[0])
    poisoned = batch._replace(**{field: getattr(batch, field).at[row, column].set(jnp.nan)})
    optimizer = optax.adamw(1e-2)
    update = microbatch.LengthSortedUpdate(grpo.grpo_objective(TINY, grpo.StepConfig()), optimizer, token_budget=128)
    before = jax.device_get(grpo.init_state(params, optimizer))  # a host copy: the update donates its state
    state, metrics = update(grpo.init_state(params, optimizer), poisoned)
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    whole, whole_metrics = jax.jit(functools.partial(grpo.grpo_step, model_config=TINY, optimizer=optimizer))(
        grpo.init_state(params, optimizer), poisoned)  # the one-batch step skips it too
    assert float(whole_metrics["skipped"]) == 1.0 and int(whole.step) == 0
    for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(whole.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state, metrics = update(grpo.init_state(params, optimizer), batch)
    assert float(metrics["skipped"]) == 0.0 and int(state.step) == 1
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(state.params)))
