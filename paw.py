"""PaW: co-training the policy and the world model in one forward pass (arXiv 2606.02388).

One model, one forward pass over [h_t ; a_t ; o_{t+1}], two losses (`docs/methods.md`
section 3, eqs. 22-28): the GRPO loss on the action tokens, and an auxiliary world-model loss on the
next-observation tokens appended after the action. Causal attention keeps o_{t+1} from changing
the action's log-probs.

    L = L_RL + (1 / |S_alpha|) * sum_{j in S_alpha} lambda_{g(j)} * L_WM(j)                    (methods.md eq. 22)

The world-model term is the mean over all the update's selected transitions, each weighted by the lambda of its
trajectory's group g(j). (The paper writes the objective as an expectation over groups,
E_g[L_RL(g) + lambda_g L_WM(S_alpha within g)]; here, as in eq. 22, nothing is averaged per group.)

    L_RL        grpo.grpo_loss over the action tokens of every row, normalised by the whole batch (eqs. 6, 10-12)
    selection   S_alpha (eq. 24): the top alpha (0.75) of the update's transitions, ranked globally by the
                action entropy H(a_t | h_t) (eq. 23) = mean over the action's tokens of the policy's entropy
                (full distribution, from the sampler: no extra forward pass; flag: the paper's
                literal sampled-token -q log q)
    clipped MAE per transition (eq. 25): sum_i m_i (1 - p_i) / |o_{t+1}|, p_i = pi_theta(o_i | h_t, a_t, o_<i),
                m_i = [p_i <= rho] (rho = 0.2, a constant: no gradient through the mask); divided by
                the full observation length. Its gradient with respect to the target logit has
                magnitude p (1 - p), against 1 - p for cross-entropy (eq. 26): tokens the model finds
                unpredictable (p -> 0, noise) pull little. (flag: cross-entropy, the ablation, eq. 27)
    lambda_g    (eq. 28) 1 - mean_return(g) / R_max (R_max = 10 in ALFWorld): groups that already succeed lean
                on RL alone (flags: a fixed lambda; clipping lambda to [0, 1], which the paper leaves open)

Choices the paper leaves open, made here: the observation's tokens are the environment text
tokenized alone (the rollout's `next_observation_ids`), appended straight after the action's last
sampled token (its EOS included), with no separator or chat wrapping; the last step of an episode
is a transition like any other (its o_{t+1} is the final observation); an empty observation
contributes no world-model loss (but is counted in |S_alpha| when selected). Observation probabilities are taken
at temperature 1 (the model's own distribution), whatever the sampling temperature.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import grpo
import model as lm
import rollout


@dataclasses.dataclass(frozen=True)
class PaWConfig:
    alpha: float = 0.75
    """fraction of the update's transitions (highest action entropy) that get the world-model loss (eq. 24)"""
    rho: float = 0.2
    """observation tokens with p > rho are already predicted: masked out of the clipped MAE (eq. 25)"""
    wm_loss: Literal["cmae", "ce"] = "cmae"
    """cmae (clipped MAE, eq. 25) | ce (cross-entropy, the paper's ablation, eq. 27)"""
    entropy_form: Literal["full", "sampled"] = "full"
    """full (the policy's full-distribution entropy) | sampled (the paper's literal -q log q of the sampled token);
    the two forms of eq. 23"""
    lambda_mode: Literal["adaptive", "fixed"] = "adaptive"
    """adaptive (1 - mean group return / r_max) | fixed (fixed_lambda; the paper's ablation uses 1): eq. 28"""
    fixed_lambda: float = 1.0
    """lambda under lambda_mode fixed"""
    r_max: float = 10.0
    """R_max of eq. 28: the maximum return (ALFWorld and WebShop 10, search QA 1)"""
    clip_lambda: bool = False
    """clip the adaptive lambda to [0, 1] (the paper does not say)"""


# --------------------------------------------------------------------------------------------
# The three parts, as pure functions
# --------------------------------------------------------------------------------------------


def action_entropy(response_entropies: Sequence[np.ndarray], response_logprobs: Sequence[np.ndarray],
                   form: str = "full") -> np.ndarray:
    """H(a_t | h_t) per transition [n], methods.md eq. 23: the mean over the action's tokens of the full-distribution
    entropy ("full"), or of -q log q with q the sampled token's probability ("sampled").

    Both come from the rollout (the sampler's entropies and log-probs), so they are of the sampling distribution:
    pi_theta at the rollout temperature, which is pi_theta itself at the default temperature 1."""
    if form == "full":
        return np.array([float(np.mean(e)) if len(e) else 0.0 for e in response_entropies])
    if form == "sampled":
        return np.array([float(np.mean(-np.exp(l) * l)) if len(l) else 0.0 for l in response_logprobs])
    raise ValueError(f"entropy form '{form}' is not full or sampled")


def select_by_entropy(entropies: np.ndarray, alpha: float) -> np.ndarray:
    """[n] bool: S_alpha of methods.md eq. 24, the ceil(alpha * n) highest-entropy transitions of the whole update
    (ties: earlier first)."""
    # rounded first: 0.55 * 100 is 55.00000000000001, whose ceiling would select 56
    count = int(np.ceil(round(alpha * len(entropies), 9)))
    chosen = np.argsort(-np.asarray(entropies), kind="stable")[:count]
    selected = np.zeros(len(entropies), bool)
    selected[chosen] = True
    return selected


def world_model_weights(group_mean_returns: np.ndarray, cfg: PaWConfig = PaWConfig()) -> np.ndarray:
    """lambda per trajectory [n], methods.md eq. 28, from the mean return of its group (grpo.GroupStats.mean, as the
    advantages computed it): 1 - mean_return_g / R_max (or the fixed value)."""
    means = jnp.asarray(group_mean_returns, jnp.float32)  # XLA's float32 division: numpy's can differ in the last bit
    if cfg.lambda_mode == "fixed":
        return np.full(means.shape, cfg.fixed_lambda, np.float32)
    if cfg.lambda_mode != "adaptive":
        raise ValueError(f"lambda_mode '{cfg.lambda_mode}' is not adaptive or fixed")
    weights = 1.0 - means / cfg.r_max
    return np.asarray(jnp.clip(weights, 0.0, 1.0) if cfg.clip_lambda else weights)


def world_model_loss(observation_logprobs: jax.Array, observation_mask: jax.Array, rho: float = 0.2,
                     form: str = "cmae") -> tuple[jax.Array, jax.Array]:
    """Per transition [b]: clipped MAE sum_i [p_i <= rho] (1 - p_i) / |o| (methods.md eq. 25), or cross-entropy
    sum_i -log p_i / |o| (eq. 27).

    observation_logprobs, observation_mask: [b, t]. Also returns the per-row count of observation
    tokens the clip masks out (p > rho), for the clipped-token ratio.
    """
    mask = observation_mask.astype(jnp.float32)
    length = jnp.maximum(mask.sum(-1), 1.0)  # the full observation length, clipped tokens included
    probs = jnp.exp(jnp.where(mask > 0, observation_logprobs, 0.0))
    predictable = jax.lax.stop_gradient(probs > rho)  # the mask is a constant
    clipped = (predictable * mask).sum(-1)
    if form == "cmae":  # eq. 25
        per_token = jnp.where(predictable, 0.0, 1.0 - probs)
    elif form == "ce":  # eq. 27
        per_token = -jnp.where(mask > 0, observation_logprobs, 0.0)
    else:
        raise ValueError(f"world-model loss '{form}' is not cmae or ce")
    return (per_token * mask).sum(-1) / length, clipped


# --------------------------------------------------------------------------------------------
# The batch and the step
# --------------------------------------------------------------------------------------------


def weigh(batch: grpo.Batch, rows: rollout.Rows, trajectory_lambdas: np.ndarray,
          cfg: PaWConfig = PaWConfig()) -> tuple[grpo.Batch, dict]:
    """PaW's part of a batch of turn rows [h_t ; a_t ; o_{t+1}] (rollout.turn_rows with the observations, then
    grpo.batch): the entropy selection S_alpha over all the update's turns (eqs. 23-24), and each row's lambda, its
    trajectory's (eq. 28). A turn whose trajectory grpo.batch dropped from the RL loss (keep) keeps its world-model
    loss. Returns the batch and, per turn, whether it was selected and its action entropy."""
    turns = np.flatnonzero(rows.source >= 0)
    on_action = [rows.action_mask[row] > 0 for row in turns]  # every response token, kept in the RL loss or not
    entropies = action_entropy([rows.entropies[row][on] for row, on in zip(turns, on_action)],
                               [rows.logprobs[row][on] for row, on in zip(turns, on_action)], cfg.entropy_form)
    selected = select_by_entropy(entropies, cfg.alpha)
    chosen = np.zeros(len(rows.source), np.float32)
    chosen[turns] = selected
    return (batch._replace(wm_lambda=rows.per_row(np.asarray(trajectory_lambdas, np.float32)), selected=chosen),
            {"selected": selected, "action_entropy": entropies})


def paw_objective(model_config: lm.Config, step: grpo.StepConfig, cfg: PaWConfig = PaWConfig()) -> grpo.Objective:
    """PaW's loss of a grpo.Batch with its world-model part (weigh), methods.md eq. 22, from one forward pass: the GRPO loss on action tokens, divided by
    the whole batch's denominator (eqs. 10-13), plus the lambda-weighted world-model loss (eq. 25 or 27) summed over
    the selected transitions and divided by their number |S_alpha| in the whole batch (the mean over all selected
    transitions of the update, not a mean over groups)."""
    loss_cfg = step.loss
    dtype = None if step.compute_dtype is None else jnp.dtype(step.compute_dtype)

    def totals(batch: grpo.Batch) -> dict:
        return {"denominator": jnp.maximum(grpo.loss_denominator(batch.action_mask, loss_cfg.aggregation,
                                                                 batch.token_mask), 1),
                "selected": batch.selected.sum(), "length": jnp.float32(batch.tokens.shape[-1]),
                "lambda": (batch.wm_lambda * batch.selected).sum(), "rows": batch.token_mask.any(-1).sum()}

    def loss(params, micro: grpo.Batch, totals: dict, positions=None):
        hidden, _ = lm.forward(params, model_config, micro.tokens, micro.token_mask, dtype=dtype, remat=step.remat)
        logprobs, entropies = lm.scored_logprobs(params, model_config, hidden, micro.tokens, step.temperature,
                                                 step.chunk_size, positions)
        terms = grpo.grpo_loss(logprobs, micro.old_logprobs, micro.ref_logprobs, micro.advantages, micro.action_mask,
                               loss_cfg, entropies, totals["length"])
        observation_logprobs = logprobs
        if step.temperature != 1.0:  # the world model is the model's own distribution
            observation_logprobs = lm.scored_logprobs(params, model_config, hidden, micro.tokens, 1.0,
                                                      step.chunk_size, positions)[0]
        wm, clipped = world_model_loss(observation_logprobs, micro.observation_mask, cfg.rho, cfg.wm_loss)
        wm_numerator = (micro.selected * micro.wm_lambda * wm).sum()
        # eq. 22, this micro-batch's share (eq. 13)
        value = terms.numerator / totals["denominator"] + wm_numerator / jnp.maximum(totals["selected"], 1.0)
        sums = dict(terms.token_sums, rl_numerator=terms.numerator, wm=(micro.selected * wm).sum(),
                    clipped=(micro.selected * clipped).sum(),
                    observation_tokens=(micro.selected * micro.observation_mask.sum(-1)).sum())
        return value, sums

    def metrics(sums: dict, totals: dict) -> dict:
        tokens, selected = jnp.maximum(sums["tokens"], 1), jnp.maximum(totals["selected"], 1.0)
        out = {name: sums[name] / tokens for name in ("clip_fraction", "kl_ref", "entropy", "approx_kl_old", "ratio")}
        out.update(
            loss=sums["rl_numerator"] / totals["denominator"], tokens=sums["tokens"], wm_loss=sums["wm"] / selected,
            clipped_token_ratio=sums["clipped"] / jnp.maximum(sums["observation_tokens"], 1),
            **{"lambda": totals["lambda"] / selected},
            selected_fraction=totals["selected"] / jnp.maximum(totals["rows"], 1),
        )
        return out

    # the tokens read: actions (the RL loss) and the selected rows' next observations (the world-model loss)
    scored = lambda batch: (batch.action_mask > 0) | ((batch.observation_mask > 0) & (batch.selected[:, None] > 0))
    return grpo.Objective(totals, loss, metrics, scored)


def paw_step(state: grpo.TrainState, batch: grpo.Batch, model_config: lm.Config, optimizer,
             step: grpo.StepConfig = grpo.StepConfig(), cfg: PaWConfig = PaWConfig()) -> tuple[grpo.TrainState, dict]:
    """One PaW update (paw_objective, methods.md eq. 22): with every lambda 0 it is exactly grpo_step's update.

    Metrics: grpo_step's, plus wm_loss (mean world-model loss over selected transitions),
    clipped_token_ratio (share of their observation tokens with p > rho), lambda (mean over
    selected transitions) and selected_fraction.
    """
    return grpo.objective_step(paw_objective(model_config, step, cfg), state, batch, optimizer, step.micro_batches)
