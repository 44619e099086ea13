"""GRPO as pure functions: group-relative advantages, the clipped surrogate with a KL term, and one update step.

The RL core under every method here (RWML trains its world model with it, policy RL and PaW use it
for actions); `docs/methods.md` section 1 (eqs. 2-13; the return R_i of eq. 1 is
`rollout.Trajectory.total_reward`). For each task, sample a group of G rollouts,
score each with a scalar reward R_i, and give every token of rollout i the advantage (in a multi-turn
rollout, every action token of every turn: `rollout.turn_rows` lays out each turn as a row [prompt ; response],
and `batch` puts each row's advantage on its action tokens)

    A_i = (R_i - mean(R_group)) / (std(R_group) + eps)                         GRPO       (eq. 2)
    A_i =  R_i - mean(R_group)                                                 Dr.GRPO    (eq. 3: no std scaling)
    A_i =  R_i - mean(R_group without i)                                       RLOO       (eq. 4: leave-one-out)

Per loss token, with ratio = pi_theta / pi_old (eq. 5; the usual notation's rho, a name left to PaW's threshold)
and x = log pi_theta - log pi_ref (clamped):

    loss_t = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t - entropy_coef * H_t  (eq. 6)
    KL_t = x (k1) | x^2 / 2 (k2) | exp(-x) - 1 + x (k3)                                                   (eq. 7)

Aggregation, the source of the field's best-known GRPO bugs, is explicit. The loss is always a sum
over loss tokens divided by a denominator fixed by the whole batch:

    token-mean                sum_i sum_t loss_it / (number of loss tokens in the batch)                  (eq. 10)
    seq-mean-token-mean       sum_i (sum_t loss_it / n_i) / (number of sequences with loss tokens)       (eq. 11)
    seq-mean-token-sum-norm   sum_i (sum_t loss_it / max_length) / (number of sequences)   (Dr.GRPO)     (eq. 12)

Dr.GRPO's max_length is one constant, the generation budget (train.py sets it), so that a token's weight does not
depend on how long the other responses were, and its number of sequences is every sequence of the batch (rows of
padding only, added to round the batch up, are not sequences).

`grpo_loss` returns the numerator and the denominator separately, so summing numerators over
micro-batches and dividing once by the batch's denominator is exactly the large-batch loss (eq. 13):
gradient accumulation does not change the update. It also sums, for the logs, approx_kl_old (eq. 8) and
clip_fraction (eq. 9).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import model as lm

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ESTIMATORS = ("grpo", "drgrpo", "rloo")
KL_ESTIMATORS = ("k1", "k2", "k3")


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


class GroupStats(NamedTuple):
    """Per-sample statistics of its group, for logging and filtering. All [n]."""

    mean: jax.Array
    std: jax.Array
    size: jax.Array
    zero_variance: jax.Array  # bool: every reward in the group is the same


def group_stats(rewards: jax.Array, group_ids: jax.Array, std_ddof: int = 1) -> GroupStats:
    """Mean, std and size of each sample's group: mean_g and std_g of methods.md eqs. 2-4. std_ddof=1 is the
    unbiased std, as verl computes it.

    A group whose rewards are all equal gets exactly that value as its mean and exactly 0 as its std: the
    mean's matmul rounds (seven rewards of 0.7 average to 0.7 - 6e-8), and GRPO would amplify that residue
    by 1 / (std + eps) into an advantage of 0.056.
    """
    same_group = (group_ids[:, None] == group_ids[None, :]).astype(jnp.float32)  # [n, n]
    size = same_group.sum(-1)
    zero_variance = (same_group * jnp.abs(rewards[None, :] - rewards[:, None])).max(-1) == 0
    mean = jnp.where(zero_variance, rewards, same_group @ rewards / size)
    squares = same_group @ (rewards - mean) ** 2  # each sample's own mean is its group's mean
    std = jnp.where(zero_variance, 0.0, jnp.sqrt(squares / jnp.maximum(size - std_ddof, 1)))
    return GroupStats(mean, std, size, zero_variance)


def advantages(rewards: jax.Array, group_ids: jax.Array, estimator: str = "grpo", eps: float = 1e-6,
               std_ddof: int = 1, filter_zero_variance: bool = False) -> tuple[jax.Array, jax.Array, GroupStats]:
    """Group-relative advantages [n] for scalar rewards [n] and integer group ids [n]: methods.md eqs. 2-4
    (estimator grpo: eq. 2, drgrpo: eq. 3, rloo: eq. 4).

    Returns (advantages, keep, stats). keep [n] bool is False for samples of zero-variance groups
    when filter_zero_variance is set (their advantage is 0 anyway; dropping them also removes
    their tokens from the token-mean denominator, as DAPO's dynamic sampling does; Dr.GRPO's count of
    sequences still counts them, their rows being real). A group of
    one sample has no baseline, and a group of equal rewards nothing to prefer: their advantage is
    exactly 0, whatever the estimator and eps (with eps = 0, not 0 / 0).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator '{estimator}' is not one of {ESTIMATORS}")
    rewards = rewards.astype(jnp.float32)
    stats = group_stats(rewards, group_ids, std_ddof)
    centred = rewards - stats.mean
    if estimator == "grpo":  # eq. 2
        adv = centred / (stats.std + eps)
    elif estimator == "drgrpo":  # eq. 3
        adv = centred
    else:  # RLOO, eq. 4: R_i - (sum_group - R_i) / (G - 1) = G / (G - 1) * (R_i - mean)
        adv = centred * stats.size / jnp.maximum(stats.size - 1, 1)
    adv = jnp.where((stats.size > 1) & ~stats.zero_variance, adv, 0.0)
    keep = ~stats.zero_variance if filter_zero_variance else jnp.ones_like(rewards, bool)
    return adv, keep, stats


def trajectory_advantages(trajectories: Sequence, estimator: str = "grpo",
                          filter_zero_variance: bool = False) -> tuple[np.ndarray, np.ndarray, GroupStats]:
    """`advantages` (methods.md eqs. 2-4) of the trajectories' returns R_i (rollout.Trajectory's total_reward, eq. 1)
    within their groups (its group), as numpy arrays: one advantage and one keep per trajectory, and the group
    statistics (PaW's lambda, eq. 28, reads their mean)."""
    returns = np.asarray([t.total_reward for t in trajectories], np.float32)
    group_ids = np.asarray([t.group for t in trajectories])
    return jax.device_get(advantages(returns, group_ids, estimator, filter_zero_variance=filter_zero_variance))


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The policy loss of methods.md eqs. 5-7 and 10-12. Defaults follow verl / verl-agent (methods.md section 1.5)."""

    clip_low: float = 0.2
    """eps_low: the ratio is clipped below at 1 - clip_low (eq. 6)"""
    clip_high: float = 0.2
    """eps_high: clipped above at 1 + clip_high (eq. 6); larger than clip_low is DAPO's clip-higher"""
    beta: float = 0.01
    """KL-to-reference coefficient (eq. 6; verl-agent's kl_loss_coef); 0 needs no reference log-probs"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """eq. 7: k1 (log ratio: zero expected gradient as a loss), k2 (half squared log ratio) or k3 (low-variance,
    verl's low_var_kl)"""
    kl_clamp: float = 20.0
    """|log pi - log pi_ref| (eq. 7) and |log pi - log pi_old| (eq. 5) are clamped to this before exponentiating"""
    entropy_coef: float = 0.0
    """entropy bonus: subtracts entropy_coef * H from each token's loss (eq. 6)"""
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """token-mean (eq. 10) | seq-mean-token-mean (eq. 11) | seq-mean-token-sum-norm (eq. 12, Dr.GRPO)"""
    max_length: int = 0
    """L_max, the constant of seq-mean-token-sum-norm (eq. 12): the generation budget (max new tokens); 0 uses the
    batch's padded width, which changes from batch to batch and is not Dr.GRPO's constant"""

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation '{self.aggregation}' is not one of {AGGREGATIONS}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator '{self.kl_estimator}' is not one of {KL_ESTIMATORS}")


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str, clamp: float) -> jax.Array:
    """Per-token estimate of KL(pi_theta || pi_ref) from the sampled tokens' log-probs: k1, k2 or k3 of methods.md
    eq. 7."""
    log_ratio = jnp.clip(logprobs - ref_logprobs, -clamp, clamp)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return jnp.exp(-log_ratio) - 1.0 + log_ratio  # k3: u - 1 - log u with u = pi_ref / pi_theta


def loss_denominator(loss_mask: jax.Array, aggregation: str, token_mask: jax.Array | None = None) -> jax.Array:
    """What the summed token losses of the whole batch are divided by: the denominator of methods.md eq. 10, 11 or
    12, the D of eq. 13.

    token_mask [batch, time] tells sequences from rows of padding only (no real token), which Dr.GRPO's count of
    sequences leaves out; without it every row is a sequence.
    """
    if aggregation == "token-mean":
        return loss_mask.sum()
    if aggregation == "seq-mean-token-mean":
        return (loss_mask.sum(-1) > 0).sum()  # the mean of a sequence without loss tokens is undefined
    if token_mask is None:
        return jnp.asarray(loss_mask.shape[0], jnp.float32)
    return token_mask.any(-1).sum()


class LossTerms(NamedTuple):
    numerator: jax.Array  # scalar: the batch's loss is numerator / denominator
    denominator: jax.Array  # scalar
    token_sums: dict[str, jax.Array]  # per-token quantities summed over loss tokens, for metrics


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, loss_mask, cfg: LossConfig = LossConfig(),
              entropies=None, length=None, token_mask=None) -> LossTerms:
    """The GRPO loss of per-token arrays, all [batch, time]. loss_mask: 1 on the tokens the policy is trained on.

    Per token, the ratio of methods.md eq. 5 and the loss of eq. 6 (KL_t from kl_penalty, eq. 7); summed as
    cfg.aggregation says, eq. 10, 11 or 12, with the numerator and the denominator returned apart (eq. 13).
    token_sums also hold the logged approx_kl_old (eq. 8) and clip_fraction (eq. 9).

    Tokens with mask 0 contribute nothing, to the loss or its gradient, whatever their values.
    length: the sequence length of seq-mean-token-sum-norm when cfg.max_length is 0 (default: these arrays'),
    so a micro-batch cut shorter than its batch keeps the batch's constant. token_mask: the real tokens, so the
    denominator does not count rows of padding as sequences (loss_denominator).
    """
    mask = loss_mask.astype(jnp.float32)
    on = mask > 0
    log_ratio = jnp.where(on, jnp.clip(logprobs - old_logprobs, -cfg.kl_clamp, cfg.kl_clamp), 0.0)
    ratio = jnp.exp(log_ratio)  # eq. 5
    advantages = jnp.where(on, advantages, 0.0)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high) * advantages
    token_loss = -jnp.minimum(unclipped, clipped)  # eq. 6, then its KL and entropy terms
    kl = jnp.zeros_like(token_loss)
    if cfg.beta != 0.0:
        kl = kl_penalty(logprobs, jnp.where(on, ref_logprobs, logprobs), cfg.kl_estimator, cfg.kl_clamp)
        token_loss = token_loss + cfg.beta * kl
    entropy = jnp.zeros_like(token_loss) if entropies is None else jnp.where(on, entropies, 0.0)
    if cfg.entropy_coef != 0.0:
        token_loss = token_loss - cfg.entropy_coef * entropy
    token_loss = jnp.where(on, token_loss, 0.0) * mask

    if cfg.aggregation == "token-mean":  # eq. 10
        numerator = token_loss.sum()
    elif cfg.aggregation == "seq-mean-token-mean":  # eq. 11
        numerator = (token_loss.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)).sum()
    else:  # eq. 12
        numerator = token_loss.sum() / (cfg.max_length or (loss_mask.shape[-1] if length is None else length))

    # eq. 9
    clip_active = ((ratio < 1.0 - cfg.clip_low) & (advantages < 0)) | ((ratio > 1.0 + cfg.clip_high) & (advantages > 0))
    token_sums = {
        "clip_fraction": (clip_active * mask).sum(),
        "kl_ref": (kl * mask).sum(),
        "entropy": (entropy * mask).sum(),
        # eq. 8, k3 of KL(pi_old || pi_theta) from pi_old's samples: ratio - 1 - log ratio, ratio = pi_theta / pi_old
        "approx_kl_old": ((jnp.exp(log_ratio) - 1.0 - log_ratio) * mask).sum(),
        "ratio": (ratio * mask).sum(),
        "tokens": mask.sum(),
    }
    return LossTerms(numerator, loss_denominator(loss_mask, cfg.aggregation, token_mask), token_sums)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


class Batch(NamedTuple):
    """One policy update's data: `batch` builds it from rollout.Rows. Arrays [rows, time] unless said, numpy or on
    the device.

    tokens:            int32 ids exactly as sampled (never re-tokenized)
    token_mask:        bool, real tokens (the model attends to them)
    action_mask:       float, 1 on the tokens the policy is trained on (its sampled actions, through EOS)
    observation_mask:  float, 1 on o_{t+1}'s tokens when the rows carry them (PaW's world-model target)
    old_logprobs:      float32, log pi_old of each token as the sampler returned it
    ref_logprobs:      float32, log pi_ref (unused when beta = 0)
    advantages:        float32, each action token's advantage (its row's)
    wm_lambda:         [rows] float32, PaW's lambda of the row's group (eq. 28)
    selected:          [rows] float32, 1 for the rows PaW's world-model loss reads (S_alpha, eq. 24)

    The last three are PaW's (paw.weigh sets them); plain GRPO leaves them 0 and its loss reads neither the
    observation nor them: PaW with every lambda 0 is GRPO, in one batch type.
    """

    tokens: jax.Array
    token_mask: jax.Array
    action_mask: jax.Array
    observation_mask: jax.Array
    old_logprobs: jax.Array
    ref_logprobs: jax.Array
    advantages: jax.Array
    wm_lambda: jax.Array
    selected: jax.Array


def batch(rows, advantages: np.ndarray, keep: np.ndarray | None = None) -> Batch:
    """A Batch from rollout.Rows (any NamedTuple with its fields) and one advantage per source (per trajectory, or per
    completion): row r's advantage, advantages[rows.source[r]], goes on its action tokens; a source that keep marks
    False (advantages' keep) has no action tokens in the loss. Numpy arrays: they go to the device in the update."""
    row_advantages = rows.per_row(np.asarray(advantages, np.float32))
    action_mask = rows.action_mask if keep is None else rows.action_mask * rows.per_row(keep)[:, None]
    zeros = np.zeros(rows.tokens.shape[0], np.float32)
    return Batch(tokens=rows.tokens, token_mask=rows.token_mask, action_mask=action_mask.astype(np.float32),
                 observation_mask=rows.observation_mask, old_logprobs=rows.logprobs,
                 ref_logprobs=np.zeros(rows.tokens.shape, np.float32),
                 advantages=np.where(rows.action_mask > 0, row_advantages[:, None], np.float32(0)),
                 wm_lambda=zeros, selected=zeros)


class TrainState(NamedTuple):
    step: jax.Array
    params: lm.Params
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """How one update is computed (static under jit)."""

    loss: LossConfig = LossConfig()
    temperature: float = 1.0
    """the sampling temperature: log-probs are recomputed at it, or the on-policy ratio (eq. 5) is not 1"""
    micro_batches: int = 1
    """the batch is split into this many micro-batches whose gradients are summed (same update)"""
    chunk_size: int = 512
    """tokens (the scored positions, flattened) per vocabulary chunk in the log-prob computation (lm.logprobs_from_hidden);
    Qwen's 151,936-token vocabulary makes a chunk of 512 about 0.3 GB of float32 logits"""
    remat: bool = False
    """recompute each transformer block in the backward pass (less memory, more compute)"""
    compute_dtype: str | None = None
    """e.g. bfloat16 compute on float32 parameters; None follows the parameters"""


def make_optimizer(learning_rate: float = 1e-6, weight_decay: float = 0.01, max_grad_norm: float = 1.0,
                   warmup_steps: int = 0, total_steps: int = 0, schedule: str = "constant",
                   b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
    """AdamW after global-norm clipping (methods.md section 1.5); constant (verl's default) or cosine decay to 0, with
    linear warmup."""
    if schedule == "constant":
        rate = optax.constant_schedule(learning_rate)
        if warmup_steps:
            rate = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), rate], [warmup_steps])
    elif schedule == "cosine":
        rate = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1))
    else:
        raise ValueError(f"schedule '{schedule}' is not constant or cosine")
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adamw(rate, b1, b2, weight_decay=weight_decay))


def init_state(params: lm.Params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def policy_logprobs(params, model_config: lm.Config, tokens, token_mask, step: StepConfig, positions=None):
    """log pi and entropy of every token (of the columns `positions` only, when given: lm.scored_logprobs), at the
    sampling temperature (the forward pass of the step): log pi_theta of methods.md eq. 5 and H_t of eq. 6."""
    dtype = None if step.compute_dtype is None else jnp.dtype(step.compute_dtype)
    return lm.token_logprobs(params, model_config, tokens, token_mask, temperature=step.temperature,
                             chunk_size=step.chunk_size, dtype=dtype, remat=step.remat, positions=positions)


class Objective(NamedTuple):
    """An update's loss, split so that any partition of the batch's rows sums to it (methods.md eq. 13).

    totals(batch) -> the batch-wide scalars the loss is normalised by (denominators, the padded length)
    loss(params, micro_batch, totals, positions=None) -> (this micro-batch's share of the batch loss, dict of sums
        for metrics); positions (lm.scored_positions of `scored`) lets it unembed only the columns it reads
    metrics(sums, totals) -> the step's metrics from the sums over all micro-batches
    scored(batch) -> [rows, time] mask of the tokens whose log-probs the loss reads (engine/microbatch.py's update
        scores only those)
    """

    totals: Callable
    loss: Callable
    metrics: Callable
    scored: Callable


def grpo_objective(model_config: lm.Config, step: StepConfig) -> Objective:
    """The GRPO loss of a Batch (grpo_loss), each micro-batch's numerator divided by the whole batch's denominator
    (methods.md eq. 13); token means of the metrics over the batch's loss tokens."""
    cfg = step.loss

    def totals(batch: Batch) -> dict:
        return {"denominator": jnp.maximum(loss_denominator(batch.action_mask, cfg.aggregation, batch.token_mask), 1),
                "length": jnp.float32(batch.tokens.shape[-1])}

    def loss(params, micro: Batch, totals: dict, positions=None):
        logprobs, entropies = policy_logprobs(params, model_config, micro.tokens, micro.token_mask, step, positions)
        terms = grpo_loss(logprobs, micro.old_logprobs, micro.ref_logprobs, micro.advantages, micro.action_mask, cfg,
                          entropies, totals["length"])
        return terms.numerator / totals["denominator"], dict(terms.token_sums, numerator=terms.numerator)

    def metrics(sums: dict, totals: dict) -> dict:
        tokens = jnp.maximum(sums["tokens"], 1)
        means = {name: value / tokens for name, value in sums.items() if name not in ("tokens", "numerator")}
        return dict(means, loss=sums["numerator"] / totals["denominator"], tokens=sums["tokens"])

    return Objective(totals, loss, metrics, scored=lambda batch: batch.action_mask)


def accumulate(loss_fn: Callable, params, batch, micro_batches: int):
    """Sum of gradients and auxiliary sums of `loss_fn(params, micro_batch) -> (loss, aux)` over micro-batches.

    loss_fn must already divide by the whole batch's denominator, so the sum is the batch gradient (methods.md
    eq. 13).
    """
    size = jax.tree.leaves(batch)[0].shape[0]
    if size % micro_batches:
        raise ValueError(f"batch of {size} rows does not split into {micro_batches} micro-batches")
    split = jax.tree.map(lambda x: x.reshape(micro_batches, size // micro_batches, *x.shape[1:]), batch)
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def add(total, micro):
        grads, aux = grad_fn(params, micro)
        return jax.tree.map(jnp.add, total, (grads, aux)), None

    first = jax.tree.map(lambda x: x[0], split)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first))
    total, _ = jax.lax.scan(add, zeros, split)
    return total


def apply_update(state: TrainState, grads, optimizer: optax.GradientTransformation) -> tuple[TrainState, jax.Array]:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), optax.global_norm(grads)


def skip_if_not_finite(updated: TrainState, state: TrainState, loss, grad_norm) -> tuple[TrainState, jax.Array]:
    """(updated, 0.0) when the loss and the gradient's norm are finite; else (state, 1.0): the update is skipped
    (methods.md section 1.5).

    One NaN or infinity in a gradient (e.g. an overflow in bfloat16, a log of 0) would otherwise pass through AdamW's
    moments into every parameter for good; skipped, it costs one step, and the caller counts skips to stop a run that
    keeps producing them."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    return kept, jnp.where(finite, 0.0, 1.0)


def objective_step(objective: Objective, state: TrainState, batch, optimizer: optax.GradientTransformation,
                   micro_batches: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update of an objective: its gradient summed over equal micro-batches (one scan), clipped AdamW; skipped
    (the state returned unchanged, metric skipped = 1) when the loss or the gradient is not finite."""
    totals = objective.totals(batch)
    grads, sums = accumulate(lambda params, micro: objective.loss(params, micro, totals), state.params, batch,
                             micro_batches)
    updated, grad_norm = apply_update(state, grads, optimizer)
    metrics = objective.metrics(sums, totals)
    state, skipped = skip_if_not_finite(updated, state, metrics["loss"], grad_norm)
    return state, dict(metrics, grad_norm=grad_norm, skipped=skipped)


def grpo_step(state: TrainState, batch: Batch, model_config: lm.Config, optimizer: optax.GradientTransformation,
              step: StepConfig = StepConfig()) -> tuple[TrainState, dict[str, jax.Array]]:
    """One GRPO update (methods.md section 1): forward, loss (eqs. 5-12), gradients (over micro-batches, eq. 13),
    clipped AdamW. Pure; jit it with model_config, optimizer and step bound (functools.partial).

    Metrics (token means are over the batch's loss tokens):
      loss            the aggregated GRPO loss (numerator / denominator; eqs. 10-13)
      clip_fraction   share of loss tokens whose ratio is clipped (gradient zeroed by the clip; eq. 9)
      kl_ref          mean per-token KL(pi_theta || pi_ref) by the chosen estimator (eq. 7; 0 when beta = 0)
      entropy         mean full-distribution entropy of pi_theta on loss tokens
      approx_kl_old   mean k3 estimate of KL(pi_old || pi_theta), unbiased under the tokens' sampling policy pi_old
                      (eq. 8): ratio - 1 - log ratio, ratio = pi_theta / pi_old; how far this update's policy moved
      ratio           mean pi_theta / pi_old (1 on-policy)
      grad_norm       global norm of the gradient before clipping
      tokens          number of loss tokens in the batch
      skipped         1 when the loss or the gradient is not finite and the update was skipped (state unchanged)
    """
    return objective_step(grpo_objective(model_config, step), state, batch, optimizer, step.micro_batches)
