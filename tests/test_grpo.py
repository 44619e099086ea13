"""grpo.py against a numpy re-derivation of methods.md section 1 (eqs. 2-13), and the properties a GRPO step must
have."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grpo
import model as lm
import rollout
import sampler

# ---- numpy reference ----


def np_advantages(rewards, groups, estimator, eps=1e-6, ddof=1):
    out = np.zeros_like(rewards, dtype=np.float64)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        r = rewards[idx].astype(np.float64)
        n = len(r)
        if n == 1:
            continue
        if estimator == "grpo":
            out[idx] = (r - r.mean()) / (r.std(ddof=ddof) + eps)
        elif estimator == "drgrpo":
            out[idx] = r - r.mean()
        else:
            out[idx] = [r[i] - (r.sum() - r[i]) / (n - 1) for i in range(n)]
    return out


def np_loss(logp, old, ref, adv, mask, clip_low, clip_high, beta, kl, entropy_coef, entropies, aggregation, max_length,
            clamp=20.0, sequences=None):
    """sequences [batch] bool: the rows that are sequences of the batch, not padding (default: every row)."""
    batch, time_ = logp.shape
    sequences = np.ones(batch, bool) if sequences is None else sequences
    per_token = np.zeros((batch, time_))
    for b in range(batch):
        for t in range(time_):
            if mask[b, t] == 0:
                continue
            ratio = np.exp(np.clip(logp[b, t] - old[b, t], -clamp, clamp))
            surrogate = min(ratio * adv[b, t], np.clip(ratio, 1 - clip_low, 1 + clip_high) * adv[b, t])
            x = np.clip(logp[b, t] - ref[b, t], -clamp, clamp)
            penalty = {"k1": x, "k2": x * x / 2, "k3": np.exp(-x) - 1 + x}[kl]
            per_token[b, t] = (-surrogate + beta * penalty - entropy_coef * entropies[b, t]) * mask[b, t]
    if aggregation == "token-mean":
        return per_token.sum() / mask.sum()
    if aggregation == "seq-mean-token-mean":  # the mean over sequences of their token means (those with tokens)
        has_tokens = mask.sum(1) > 0
        return sum(per_token[b].sum() / mask[b].sum() for b in range(batch) if has_tokens[b]) / has_tokens.sum()
    # Dr.GRPO: 1/G sum_i 1/MAX_TOKENS sum_t loss_it, over every sequence of the batch (one without loss tokens too)
    return sum(per_token[b].sum() / max_length for b in range(batch) if sequences[b]) / sequences.sum()


def random_loss_inputs(seed=0, batch=6, time_=9):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.05, 3, (batch, time_))
    old = logp + rng.normal(0, 0.3, (batch, time_))  # ratios on both sides of the clip range
    ref = logp + rng.normal(0, 0.5, (batch, time_))
    adv = np.repeat(rng.normal(0, 1, (batch, 1)), time_, 1)
    mask = (rng.uniform(size=(batch, time_)) < 0.7).astype(np.float64)
    mask[-1] = 0  # a row with no loss tokens
    entropies = rng.uniform(0, 2, (batch, time_))
    return logp, old, ref, adv, mask, entropies


# ---- advantages (methods.md eqs. 2-4) ----


@pytest.mark.parametrize("estimator", grpo.ESTIMATORS)
def test_advantages_match_numpy(estimator):
    rng = np.random.default_rng(1)
    groups = np.array([0] * 8 + [1] * 8 + [2] * 4 + [3])  # includes a group of one
    rewards = rng.integers(0, 3, len(groups)).astype(np.float32) + rng.normal(0, 0.1, len(groups)).astype(np.float32)
    ours, keep, stats = grpo.advantages(jnp.asarray(rewards), jnp.asarray(groups), estimator)
    np.testing.assert_allclose(ours, np_advantages(rewards, groups, estimator), atol=1e-5)
    assert keep.all()
    np.testing.assert_allclose(stats.size, [8] * 16 + [4] * 4 + [1])


def test_zero_variance_groups_get_zero_advantage_and_can_be_filtered():
    groups = jnp.array([0, 0, 0, 1, 1, 1])
    rewards = jnp.array([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    adv, keep, stats = grpo.advantages(rewards, groups, "grpo", filter_zero_variance=True)
    np.testing.assert_array_equal(adv[:3], 0.0)
    np.testing.assert_array_equal(keep, [False] * 3 + [True] * 3)
    np.testing.assert_array_equal(stats.zero_variance, [True] * 3 + [False] * 3)


@pytest.mark.parametrize("estimator", grpo.ESTIMATORS)
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_groups_of_equal_rewards_get_exactly_zero_advantage(estimator, eps):
    """A group with no spread has nothing to prefer: its advantage is exactly 0 (not a rounding residue of the
    mean, amplified by 1 / (std + eps); not 0 / 0 with eps 0), for every estimator and any eps."""
    rng = np.random.default_rng(7)
    for trial in range(200):
        sizes = rng.integers(2, 17, rng.integers(1, 4))
        sizes = np.append(sizes, 50 - sizes.sum())  # one shape for every trial: one compilation
        values = rng.choice([0.7, 0.3, -0.1, 0.1, 1 / 3, 10.0, -0.4], len(sizes))
        equal = rng.random(len(sizes)) < 0.7
        rewards = np.concatenate([np.full(n, v) if same else rng.normal(v, 1.0, n)
                                  for n, v, same in zip(sizes, values, equal)]).astype(np.float32)
        groups = np.repeat(np.arange(len(sizes)), sizes)
        adv, _, stats = grpo.advantages(jnp.asarray(rewards), jnp.asarray(groups), estimator, eps=eps)
        adv = np.asarray(adv)
        on_equal = np.repeat(equal, sizes)
        assert (adv[on_equal] == 0.0).all(), (trial, rewards, adv)
        assert np.isfinite(adv).all()
        np.testing.assert_array_equal(np.asarray(stats.mean)[on_equal], rewards[on_equal])  # the exact value
        np.testing.assert_array_equal(np.asarray(stats.std)[on_equal], 0.0)


def test_seven_rewards_of_0_7_and_four_of_3_with_eps_0_get_zero_advantage():
    adv, _, _ = grpo.advantages(jnp.full(7, 0.7), jnp.zeros(7, jnp.int32))
    np.testing.assert_array_equal(adv, 0.0)  # was 0.056 each
    adv, _, _ = grpo.advantages(jnp.full(4, 3.0), jnp.zeros(4, jnp.int32), eps=0.0)
    np.testing.assert_array_equal(adv, 0.0)  # was NaN


# ---- the turn rows of a multi-turn rollout ----


def played(rewards_per_trajectory, groups, seed=0):
    """Trajectories of random ids (prompts of 3-6 tokens, responses of 1-4, observations of 2-3), one turn a reward."""
    rng = np.random.default_rng(seed)
    ids = lambda low, high: rng.integers(1, 20, rng.integers(low, high + 1)).astype(np.int32)
    out = []
    for index, (rewards, group) in enumerate(zip(rewards_per_trajectory, groups)):
        turns = []
        for step, reward in enumerate(rewards):
            response = ids(1, 4)
            turns.append(rollout.Turn(
                step=step, observation="s", prompt_ids=ids(3, 6), response_ids=response,
                response_logprobs=-rng.uniform(0.1, 2, len(response)).astype(np.float32),
                response_entropies=rng.uniform(0, 2, len(response)), response_text="", actions=["a"],
                next_observation="s2", next_observation_ids=ids(2, 3), reward=reward, done=False, won=False,
                invalid=False))
        out.append(rollout.Trajectory(seed=index, group=group, task="task", initial_info={}, turns=turns))
    return out


def test_trajectory_advantages_are_the_advantages_of_the_returns_within_groups():
    trajectories = played([[1.0, 0.5], [0.0], [2.0, -1.0, 0.0], [0.0, 0.0], [3.0]], [0, 0, 1, 1, 1])
    returns, groups = jnp.array([1.5, 0.0, 1.0, 0.0, 3.0]), jnp.array([0, 0, 1, 1, 1])
    for estimator in grpo.ESTIMATORS:
        adv, keep, stats = grpo.trajectory_advantages(trajectories, estimator, filter_zero_variance=True)
        expected = grpo.advantages(returns, groups, estimator, filter_zero_variance=True)
        assert all(isinstance(x, np.ndarray) for x in (adv, keep, *stats))
        for ours, theirs in zip((adv, keep, *stats), (expected[0], expected[1], *expected[2])):
            np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("with_observation", [False, True])
def test_turn_rows_train_exactly_each_response_with_its_trajectory_advantage(with_observation):
    """rollout.turn_rows then grpo.batch: every turn a row [prompt ; response (; next observation)], its trajectory's
    advantage and the sampler's log-probs on the response, nothing on the rest or on the padding rows."""
    trajectories = played([[0.0, 1.0], [0.0], [1.0, 0.0, 0.0]], [0, 0, 1])
    advantages, keep = np.array([0.5, -0.5, 2.0]), np.array([True, True, False])
    rows = rollout.turn_rows(trajectories, with_observation=with_observation, pad_id=99, min_rows=8)
    batch = grpo.batch(rows, advantages, keep)
    assert all(isinstance(x, np.ndarray) for x in batch)
    assert batch.tokens.shape == (8, 16)  # 6 turns padded to 8 rows; at most 6 + 4 + 3 tokens, bucketed to 16
    turns = [(index, turn) for index, trajectory in enumerate(trajectories) for turn in trajectory.turns]
    for row, (index, turn) in enumerate(turns):
        observation = turn.next_observation_ids if with_observation else np.zeros(0, np.int32)
        start, end = len(turn.prompt_ids), len(turn.prompt_ids) + len(turn.response_ids)
        ids = np.concatenate([turn.prompt_ids, turn.response_ids, observation])
        np.testing.assert_array_equal(batch.tokens[row], np.concatenate([ids, np.full(16 - len(ids), 99)]))
        np.testing.assert_array_equal(batch.token_mask[row], np.arange(16) < len(ids))
        on = (np.arange(16) >= start) & (np.arange(16) < end)
        np.testing.assert_array_equal(batch.action_mask[row], on * float(keep[index]))
        np.testing.assert_array_equal(batch.observation_mask[row], (np.arange(16) >= end) & (np.arange(16) < len(ids)))
        np.testing.assert_array_equal(batch.advantages[row], on * advantages[index])
        np.testing.assert_array_equal(batch.old_logprobs[row][on], turn.response_logprobs)
        np.testing.assert_array_equal(batch.old_logprobs[row][~on], 0.0)
        assert rows.source[row] == index
    assert not batch.token_mask[len(turns):].any() and not batch.action_mask[len(turns):].any()
    assert (rows.source[len(turns):] == -1).all()
    np.testing.assert_array_equal(batch.ref_logprobs, 0.0)
    assert not batch.wm_lambda.any() and not batch.selected.any()  # plain GRPO: no world-model term


def policy_batch(tokens, token_mask, action_mask, old, ref, advantages) -> grpo.Batch:
    """A grpo.Batch of these arrays, without PaW's world-model part."""
    zeros = jnp.zeros(action_mask.shape[0], jnp.float32)
    return grpo.Batch(jnp.asarray(tokens), jnp.asarray(token_mask), jnp.asarray(action_mask),
                      jnp.zeros(action_mask.shape, jnp.float32), *map(jnp.asarray, (old, ref, advantages)), zeros,
                      zeros)


# ---- the loss (methods.md eqs. 5-12) ----


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
@pytest.mark.parametrize("kl", grpo.KL_ESTIMATORS)
def test_loss_matches_numpy(aggregation, kl):
    logp, old, ref, adv, mask, entropies = random_loss_inputs()
    cfg = grpo.LossConfig(clip_low=0.2, clip_high=0.28, beta=0.05, kl_estimator=kl, entropy_coef=0.01,
                          aggregation=aggregation, max_length=12)
    terms = grpo.grpo_loss(*map(jnp.asarray, (logp, old, ref, adv, mask)), cfg, entropies=jnp.asarray(entropies))
    expected = np_loss(logp, old, ref, adv, mask, 0.2, 0.28, 0.05, kl, 0.01, entropies, aggregation, 12)
    np.testing.assert_allclose(terms.numerator / terms.denominator, expected, rtol=1e-5, atol=1e-6)


def test_dr_grpo_divides_each_sequence_by_the_budget_and_averages_over_every_sequence_but_padding():
    """seq-mean-token-sum-norm (methods.md eq. 12) against numpy: the sum of each sequence's token losses /
    max_length, averaged over the batch's sequences (a row without loss tokens counts, rows of padding only do not);
    padding the batch wider or with more padding rows changes nothing, and grpo_objective's denominator is the same
    count."""
    logp, old, ref, adv, mask, entropies = random_loss_inputs(3, batch=8)
    token_mask = np.ones(mask.shape, bool)
    token_mask[-2:] = False  # rows of padding (a batch rounded up to a device multiple)
    mask[-2:] = 0
    mask[3] = 0  # a sequence whose loss tokens were all filtered out: still a sequence
    cfg = grpo.LossConfig(beta=0.05, entropy_coef=0.01, aggregation="seq-mean-token-sum-norm", max_length=32)
    expected = np_loss(logp, old, ref, adv, mask, 0.2, 0.2, 0.05, "k3", 0.01, entropies, cfg.aggregation, 32,
                       sequences=token_mask.any(1))

    def ours(pad_columns=0, pad_rows=0):
        widen = lambda x: np.pad(x, ((0, pad_rows), (0, pad_columns)))
        arrays = [jnp.asarray(widen(x)) for x in (logp, old, ref, adv, mask, entropies)]
        terms = grpo.grpo_loss(*arrays[:5], cfg, entropies=arrays[5], token_mask=jnp.asarray(widen(token_mask)))
        return float(terms.numerator / terms.denominator), float(terms.denominator)

    assert ours() == pytest.approx((expected, 6), rel=1e-5)
    assert ours(pad_columns=23, pad_rows=8) == pytest.approx((expected, 6), rel=1e-5)
    batch = policy_batch(np.zeros(mask.shape, np.int32), token_mask, mask, old, ref, adv)
    assert float(grpo.grpo_objective(TINY, grpo.StepConfig(cfg)).totals(batch)["denominator"]) == 6


def test_kl_estimators_match_their_definitions():
    """k1, k2 and k3 of methods.md eq. 7."""
    logp, ref = jnp.array([-1.0, -2.0, -0.5]), jnp.array([-1.5, -1.0, -0.5])
    x = np.array([0.5, -1.0, 0.0])
    np.testing.assert_allclose(grpo.kl_penalty(logp, ref, "k1", 20.0), x, atol=1e-6)
    np.testing.assert_allclose(grpo.kl_penalty(logp, ref, "k2", 20.0), x**2 / 2, atol=1e-6)
    np.testing.assert_allclose(grpo.kl_penalty(logp, ref, "k3", 20.0), np.exp(-x) - 1 + x, atol=1e-6)
    assert np.isfinite(grpo.kl_penalty(jnp.array([0.0]), jnp.array([-500.0]), "k3", 20.0)).all()  # clamped


def test_approx_kl_old_estimates_kl_of_pi_old_from_pi_theta_under_pi_old_samples():
    """methods.md eq. 8. Tokens are sampled from pi_old. Over a categorical distribution, the metric's expectation
    under pi_old (each outcome a token whose mask is its pi_old probability) is exactly KL(pi_old || pi_theta); a
    large sample agrees."""
    rng = np.random.default_rng(4)
    pi_old, pi_theta = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    exact = float(np.sum(pi_old * np.log(pi_old / pi_theta)))
    assert exact > 0.05 and abs(exact - float(np.sum(pi_theta * np.log(pi_theta / pi_old)))) > 0.01  # not symmetric

    def metric(outcomes, weights):
        logp = jnp.asarray(np.log(pi_theta[outcomes])[None], jnp.float32)
        old = jnp.asarray(np.log(pi_old[outcomes])[None], jnp.float32)
        terms = grpo.grpo_loss(logp, old, logp, jnp.zeros_like(logp), jnp.asarray(weights[None], jnp.float32),
                               grpo.LossConfig(beta=0.0))
        return float(terms.token_sums["approx_kl_old"] / terms.token_sums["tokens"])

    np.testing.assert_allclose(metric(np.arange(6), pi_old), exact, rtol=1e-5)
    samples = rng.choice(6, 200_000, p=pi_old)
    np.testing.assert_allclose(metric(samples, np.ones(len(samples))), exact, rtol=0.05)


def test_clip_fraction_counts_tokens_whose_gradient_the_clip_removes():
    """methods.md eq. 9."""
    logp = jnp.log(jnp.array([[1.5, 0.5, 1.1, 0.7]]))  # ratios against old = 0
    adv = jnp.array([[1.0, -1.0, 1.0, 1.0]])  # clipped: 1.5 with A>0, 0.5 with A<0; not 1.1, not 0.7 with A>0
    terms = grpo.grpo_loss(logp, jnp.zeros_like(logp), logp, adv, jnp.ones_like(logp), grpo.LossConfig(beta=0.0))
    assert float(terms.token_sums["clip_fraction"]) == 2.0


def test_masked_tokens_never_affect_loss_or_gradient():
    logp, old, ref, adv, mask, entropies = map(jnp.asarray, random_loss_inputs(2))
    cfg = grpo.LossConfig(beta=0.1, entropy_coef=0.01)
    garbage = lambda x, scale: jnp.where(mask > 0, x, scale * jax.random.normal(jax.random.key(0), x.shape))

    def loss(lp, ent, o, r, a):
        terms = grpo.grpo_loss(lp, o, r, a, mask, cfg, ent)
        return terms.numerator / terms.denominator

    clean = jax.value_and_grad(loss, argnums=(0, 1))(logp, entropies, old, ref, adv)
    dirty = jax.value_and_grad(loss, argnums=(0, 1))(garbage(logp, 80), garbage(entropies, 80), garbage(old, 80),
                                                     garbage(ref, 80), garbage(adv, 1e4))
    np.testing.assert_array_equal(clean[0], dirty[0])
    for a, b in zip(clean[1], dirty[1]):
        np.testing.assert_array_equal(a, b)
        assert (np.asarray(a)[np.asarray(mask) == 0] == 0).all()


# ---- the step, on a tiny model ----

TINY = lm.Config(model_type="qwen2", vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=True)
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]


def sampled_batch(params, seed=0, group=2, stop=(), max_new_tokens=6):
    prompts = [p for p in PROMPTS for _ in range(group)]
    completion = sampler.generate(params, TINY, prompts, jax.random.key(seed), sampler.SamplingParams(1.0, max_new_tokens=max_new_tokens),
                             stop_token_ids=stop, pad_token_id=0)
    rewards = jax.random.uniform(jax.random.key(seed + 1), (len(prompts),))
    adv, keep, _ = grpo.advantages(rewards, jnp.repeat(jnp.arange(len(PROMPTS)), group))
    return completion, grpo.batch(rollout.completion_rows(completion), adv, keep)


def sgd_step(params, batch, step=grpo.StepConfig(grpo.LossConfig(beta=0.0)), lr=1.0):
    optimizer = optax.sgd(lr)
    step_fn = jax.jit(functools.partial(grpo.grpo_step, model_config=TINY, optimizer=optimizer, step=step))
    state, metrics = step_fn(grpo.init_state(params, optimizer), batch)
    return state.params, metrics


def test_on_policy_gradient_is_the_reinforce_gradient():
    params = lm.init_params(TINY, jax.random.key(0))
    _, batch = sampled_batch(params)
    new_params, metrics = sgd_step(params, batch)  # SGD with lr 1: params - new_params is the gradient
    grads = jax.tree.map(jnp.subtract, params, new_params)
    assert abs(float(metrics["ratio"]) - 1.0) < 1e-5 and float(metrics["clip_fraction"]) == 0.0

    def reinforce(p):  # -sum A * log pi / number of loss tokens
        logp, _ = lm.token_logprobs(p, TINY, batch.tokens, batch.token_mask)
        return -(batch.advantages * logp * batch.action_mask).sum() / batch.action_mask.sum()

    expected = jax.jit(jax.grad(reinforce))(params)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_zero_advantages_without_kl_give_a_zero_gradient():
    params = lm.init_params(TINY, jax.random.key(0))
    _, batch = sampled_batch(params)
    new_params, metrics = sgd_step(params, batch._replace(advantages=jnp.zeros_like(batch.advantages)))
    assert float(metrics["grad_norm"]) == 0.0
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_four_micro_batches_of_two_give_the_update_of_one_batch_of_eight(aggregation):
    """methods.md eq. 13: micro-batch numerators over the whole batch's denominator sum to the batch loss."""
    params = lm.init_params(TINY, jax.random.key(3))
    _, batch = sampled_batch(params, seed=3)
    old_policy = jax.tree.map(lambda x: x * 1.05, params)  # off-policy, so clipping is active on some tokens
    old_logp, _ = lm.token_logprobs(old_policy, TINY, batch.tokens, batch.token_mask)
    ref_logp, _ = lm.token_logprobs(jax.tree.map(lambda x: x * 0.95, params), TINY, batch.tokens, batch.token_mask)
    batch = batch._replace(old_logprobs=old_logp, ref_logprobs=ref_logp)
    loss = grpo.LossConfig(beta=0.01, entropy_coef=0.01, aggregation=aggregation)
    whole, whole_metrics = sgd_step(params, batch, grpo.StepConfig(loss, micro_batches=1), lr=0.1)
    split, split_metrics = sgd_step(params, batch, grpo.StepConfig(loss, micro_batches=4), lr=0.1)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(split)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    for name in whole_metrics:
        np.testing.assert_allclose(whole_metrics[name], split_metrics[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert float(whole_metrics["clip_fraction"]) > 0


def test_a_row_that_ends_in_eos_keeps_the_eos_token_in_the_loss():
    params = lm.init_params(TINY, jax.random.key(0))
    free, _ = sampled_batch(params, seed=5, max_new_tokens=8)
    eos = int(free.tokens[0, 2])  # row 0 emits this at step 2 (or earlier): make it the EOS
    completion, batch = sampled_batch(params, seed=5, stop=(eos,), max_new_tokens=8)
    prompt_length = completion.prompt_tokens.shape[1]
    row = np.asarray(completion.tokens[0])
    end = int(np.argmax(row == eos))
    loss_mask = np.asarray(batch.action_mask[0, prompt_length:])
    assert end <= 2 and loss_mask[end] == 1 and (loss_mask[end + 1:] == 0).all() and (loss_mask[: end + 1] == 1).all()
    # and that token's log-prob moves the loss: the gradient reaches it
    advantages = jnp.ones_like(batch.advantages)

    def loss(logp):
        terms = grpo.grpo_loss(logp, batch.old_logprobs, batch.ref_logprobs, advantages, batch.action_mask,
                               grpo.LossConfig(beta=0.0))
        return terms.numerator / terms.denominator

    grad = np.asarray(jax.grad(loss)(batch.old_logprobs))
    np.testing.assert_allclose(grad[0, prompt_length + end], -1.0 / float(batch.action_mask.sum()), rtol=1e-5)


def test_grpo_learns_a_toy_reward_from_chance_to_above_ninety_percent():
    """Reward: the fraction of sampled tokens equal to TARGET. Chance is 1 / 16."""
    target, group, steps = 7, 8, 60
    params = lm.init_params(TINY, jax.random.key(0))
    optimizer = grpo.make_optimizer(learning_rate=1e-2, weight_decay=0.0)
    step_config = grpo.StepConfig(grpo.LossConfig(beta=0.0))
    step_fn = jax.jit(functools.partial(grpo.grpo_step, model_config=TINY, optimizer=optimizer, step=step_config))
    state = grpo.init_state(params, optimizer)
    prompts = [p for p in PROMPTS for _ in range(group)]
    group_ids = jnp.repeat(jnp.arange(len(PROMPTS)), group)
    sampling = sampler.SamplingParams(1.0, max_new_tokens=8)
    history, start = [], time.perf_counter()
    for iteration in range(steps):
        completion = sampler.generate(state.params, TINY, prompts, jax.random.key(iteration), sampling, stop_token_ids=())
        rewards = (completion.tokens == target).mean(-1)
        history.append(float(rewards.mean()))
        if history[-1] > 0.9:
            break
        adv, keep, _ = grpo.advantages(rewards, group_ids)
        state, metrics = step_fn(state, grpo.batch(rollout.completion_rows(completion), adv, keep))
    assert history[0] < 0.2, history
    assert history[-1] > 0.9, history  # measured: 0.02 -> 0.95 in 7 iterations
    assert time.perf_counter() - start < 60


def test_micro_batches_give_the_same_update_with_the_default_clipped_adamw():
    """The acceptance's setting, with the project's optimizer (AdamW lr 1e-6, global-norm clipping, k3 KL)."""
    params = lm.init_params(TINY, jax.random.key(3))
    _, batch = sampled_batch(params, seed=3)
    optimizer = grpo.make_optimizer()

    def update(micro_batches):
        step = grpo.StepConfig(grpo.LossConfig(), micro_batches=micro_batches)
        step_fn = jax.jit(functools.partial(grpo.grpo_step, model_config=TINY, optimizer=optimizer, step=step))
        return step_fn(grpo.init_state(params, optimizer), batch)[0].params

    for a, b in zip(jax.tree.leaves(update(1)), jax.tree.leaves(update(4))):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)  # measured: 9e-13
