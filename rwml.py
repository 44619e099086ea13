"""RWML: Reinforcement World Model Learning (Yu et al., arXiv 2602.05842), and its WM SFT baseline.

The agent model itself learns to predict the next state, rewarded by how close its prediction is
to the real next state in a pretrained embedding space (`docs/methods.md` section 2, eqs. 14-21):

    triplets <s_<=t, a_t, s_{t+1}> from the model's own rollouts (invalid steps dropped; 90/10 split)   (eq. 14)
    for each triplet, sample G predictions s_hat inside <next_state> ... </next_state>
    reward:  d = 1 - cos(E(s_hat), E(s_{t+1})),   r = 1 if d <= tau_d else 0                             (eq. 18)
    optimise with GRPO (grpo.grpo_step), groups = the G predictions of one triplet

"Too easy" subsampling, which the paper shows is essential: an SFT copy of the model trained on
the 10% validation triplets (the filter model) samples K = 10 predictions per training triplet;
the triplet is easy when its mean reward is > tau_easy (the paper prints ">= 0.0", which would
make every triplet easy; read as "> 0": at least one hit); easy triplets are kept with
probability p = 0.1, all others kept (eqs. 15-16). `calibrate_tau_d` picks the filter's tau_d so that about 30%
of the triplets are easy (eq. 17).

WM SFT, the baseline: the same prompt asking to "directly present" the prediction, and
cross-entropy on the label "<think> </think>\\n<next_state> {s_{t+1}} </next_state>" (eq. 20).

The paper's ablation, an LLM judge's rubric score in place of eq. 18 (`judge_scorer`, --wm-reward judge), is a
TripletScorer: it reads each prediction with its whole triplet, not only the true next state.

`weight_change` is the paper's evidence that RWML forgets less: per layer and module, the
fraction of weights with |w' - w| > eta * max(|w|, |w'|), eta = 1e-3 (eq. 21).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import grpo
import model as lm
import reward
import rollout
import sampler

Triplet = rollout.Transition  # <s_<=t, a_t, s_{t+1}> of methods.md eq. 14, with the task and the H turns before t
Scorer = Callable[[Sequence[str], Sequence[str]], tuple[np.ndarray, np.ndarray]]  # (responses, targets) -> (rewards, distances)


class TripletScorer(NamedTuple):
    """A reward that reads each response's whole triplet, not only its true next state (the LLM judge reads the
    observation and the action too): score(responses, triplets) -> (rewards [n], distances [n], metrics), metrics
    what it logs of itself (floats by name). score_texts takes it wherever it takes a Scorer."""

    score: Callable[[Sequence[str], Sequence[Triplet]], tuple[np.ndarray, np.ndarray, dict]]


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


def triplets_from_rollouts(trajectories: Sequence[rollout.Trajectory], history: int = 2,
                           view: Callable[[Triplet], Triplet] | None = None) -> list[Triplet]:
    """Every step of every trajectory as a triplet (methods.md eq. 14), steps with invalid actions dropped. view: how
    the world-model prompt shows a triplet's past and present (envs.Game.world_model_view); None: whole."""
    kept = [t for t in rollout.transitions(trajectories, history) if not t.invalid]
    return [view(t) for t in kept] if view is not None else kept


def split_triplets(triplets: Sequence[Triplet], validation_fraction: float = 0.1, seed: int = 0):
    """A seeded random (train, validation) split (methods.md section 2.1); validation gets round(fraction * n), at
    least 1."""
    order = np.random.default_rng(seed).permutation(len(triplets))
    size = max(1, int(round(validation_fraction * len(triplets))))
    return [triplets[i] for i in order[size:]], [triplets[i] for i in order[:size]]


def world_model_prompt(triplet: Triplet, direct: bool = False) -> str:
    """The world-model prompt of methods.md section 2.5 (direct=True: WM SFT's "directly present" form)."""
    lines = [f"You are the world model of an interactive environment. The agent's task is to: {triplet.task}"]
    for i, (seen, action) in enumerate(triplet.history):
        lines.append(f"Earlier observation {i + 1}: {seen}\nEarlier action {i + 1}: {action}")
    lines.append(f"Your current observation is: {triplet.state}")
    lines.append(f"Potential action: {triplet.action}")
    if direct:
        lines.append("Predict the immediate next observation after the potential action. Directly present your "
                     "prediction inside <next_state> </next_state>.")
    else:
        lines.append("Predict the immediate next observation after the potential action. First reason briefly "
                     "inside <think> </think>, then give the next observation inside <next_state> </next_state>.")
    return "\n".join(lines)


def sft_label(triplet: Triplet) -> str:
    return f"<think> </think>\n<next_state> {triplet.next_state} </next_state>"


# --------------------------------------------------------------------------------------------
# WM SFT: cross-entropy on the label tokens
# --------------------------------------------------------------------------------------------


class SFTBatch(NamedTuple):
    """[batch, time] arrays: [prompt ; target], right padded (rollout.Rows' layout). loss_mask, the m_{i,t} of
    methods.md eq. 20, covers the target: the label and its EOS."""

    tokens: jax.Array
    token_mask: jax.Array
    loss_mask: jax.Array


def sft_batch(rows: rollout.Rows) -> SFTBatch:
    """The SFT batch of rows (rollout.rows of prompts and targets): the loss covers the action and the observation,
    what the model is taught to write after the prompt."""
    return SFTBatch(rows.tokens, rows.token_mask, rows.action_mask + rows.observation_mask)


def wm_sft_examples(tokenizer, triplets: Sequence[Triplet], direct: bool = True):
    """(prompt ids, label ids) of each triplet; the label ends with the tokenizer's EOS."""
    prompts = [rollout.encode_prompt(tokenizer, world_model_prompt(t, direct)) for t in triplets]
    labels = [tokenizer.encode(sft_label(t), add_special_tokens=False) + [tokenizer.eos_token_id] for t in triplets]
    return prompts, labels


def sft_objective(model_config: lm.Config, step: grpo.StepConfig = grpo.StepConfig()) -> grpo.Objective:
    """Cross-entropy on the label tokens, token mean over the whole batch's label tokens: methods.md eq. 20 (any split
    of the rows into micro-batches sums to it, eq. 13). Log-probs are at step.temperature; eq. 20's temperature 1
    is what train.py passes."""

    def totals(batch: SFTBatch) -> dict:
        return {"denominator": jnp.maximum(batch.loss_mask.sum(), 1.0)}

    def loss(params, micro: SFTBatch, totals: dict, positions=None):
        logprobs, _ = grpo.policy_logprobs(params, model_config, micro.tokens, micro.token_mask, step, positions)
        nll = -(logprobs * micro.loss_mask).sum()
        return nll / totals["denominator"], {"nll": nll, "tokens": micro.loss_mask.sum()}

    def metrics(sums: dict, totals: dict) -> dict:
        return {"loss": sums["nll"] / totals["denominator"], "tokens": sums["tokens"]}

    return grpo.Objective(totals, loss, metrics, scored=lambda batch: batch.loss_mask)


def sft_step(state: grpo.TrainState, batch: SFTBatch, model_config: lm.Config, optimizer,
             step: grpo.StepConfig = grpo.StepConfig()) -> tuple[grpo.TrainState, dict]:
    """One cross-entropy update (sft_objective, methods.md eq. 20), over step.micro_batches equal micro-batches."""
    return grpo.objective_step(sft_objective(model_config, step), state, batch, optimizer, step.micro_batches)


def train_sft(state: grpo.TrainState, update: Callable, batches: Iterable,
              on_step: Callable | None = None) -> grpo.TrainState:
    """Cross-entropy updates (sft_objective, methods.md eq. 20) over `batches` in order: the loop of every SFT here
    (the embedded default's pretraining, WM SFT, the too-easy filter's model, SPA's SFT). update(state, batch) ->
    (state, metrics); after the i-th, on_step(i, state, metrics), the metrics as floats with the update's wall
    seconds."""
    for index, batch in enumerate(batches):
        timings = {}
        with rollout.stopwatch(timings, "update"):
            state, metrics = update(state, batch)
            metrics = {name: float(value) for name, value in metrics.items()}  # float() waits for the update
        if on_step is not None:
            on_step(index, state, dict(metrics, seconds_update=timings["update"]))
    return state


def shuffled_batches(count: int, batch_size: int, epochs: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Indices of `epochs` seeded shuffles of `count` examples, in batches of batch_size (the last partial one
    kept)."""
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(count)
        for start in range(0, count, batch_size):
            yield order[start:start + batch_size]


def train_wm_sft(state: grpo.TrainState, tokenizer, model_config: lm.Config, triplets: Sequence[Triplet], optimizer,
                 epochs: int = 2, batch_size: int = 32, seed: int = 0, step: grpo.StepConfig = grpo.StepConfig(),
                 direct: bool = True, on_step: Callable | None = None) -> grpo.TrainState:
    """WM SFT (methods.md eq. 20, section 2.5) for `epochs` passes over the triplets in seeded shuffled batches (the
    last partial batch kept)."""
    update = jax.jit(functools.partial(sft_step, model_config=model_config, optimizer=optimizer, step=step))
    prompts, labels = wm_sft_examples(tokenizer, triplets, direct)
    batches = (sft_batch(rollout.rows([prompts[i] for i in indices], [labels[i] for i in indices],
                                      pad_id=tokenizer.pad_token_id))
               for indices in shuffled_batches(len(triplets), batch_size, epochs, seed))
    return train_sft(state, update, batches, on_step)


# --------------------------------------------------------------------------------------------
# Predictions, rewards, and the RWML update
# --------------------------------------------------------------------------------------------


def cosine_scorer(embedder, tau_d: float, block: str = "last",
                  prediction_tokens: int = reward.PREDICTION_TOKENS) -> Scorer:
    """The reward of methods.md eq. 18: binary [1 - cos(E(s_hat), E(s)) <= tau_d], s_hat from the response's
    <next_state> block (the last one, or with block "one" the only one: reward.extract_tag) cut to its first
    prediction_tokens tokens (0: not cut); a missing prediction scores 0."""
    return functools.partial(reward.next_state_rewards, embedder=embedder, tau_d=tau_d, block=block,
                             prediction_tokens=prediction_tokens)


def penalised_scorer(scorer: Scorer, count_tokens: Callable[[str], int] | None, no_thinking: float = 0.0,
                     wrong_status: float = 0.0, block: str = "last") -> Scorer:
    """scorer's rewards less the RWML authors' tau2-bench penalties (reward.penalties: no_thinking for a response
    without a <think> span of more than 16 tokens, wrong_status for a prediction that gets the task status wrong);
    its distances unchanged. Both 0 (the default, as in their ALFWorld script) leave the rewards as they are. A
    TripletScorer stays one."""
    def taken(responses: Sequence[str], targets: Sequence[str]) -> np.ndarray:
        return reward.penalties(responses, targets, count_tokens, no_thinking, wrong_status, block=block)

    if isinstance(scorer, TripletScorer):
        def score_triplets(responses: Sequence[str], triplets: Sequence[Triplet]):
            rewards, distances, metrics = scorer.score(responses, triplets)
            return rewards - taken(responses, [t.next_state for t in triplets]), distances, metrics

        return TripletScorer(score_triplets)

    def score(responses: Sequence[str], targets: Sequence[str]):
        rewards, distances = scorer(responses, targets)
        return rewards - taken(responses, targets), distances

    return score


def rouge_scorer(step: float = 0.2, block: str = "last") -> Scorer:
    """The reward of methods.md eq. 19 for structured next states (tau2-bench's tool responses): ROUGE-L F1 of the
    <next_state> block against the true next state, rounded to a multiple of `step`; its distance is 1 - reward (what
    the too-easy filter compares with its tau_d)."""

    def score(responses: Sequence[str], targets: Sequence[str]):
        rewards = reward.rouge_rewards(responses, targets, step, block=block)
        return rewards, 1.0 - rewards

    return score


def predict(params, model_config: lm.Config, tokenizer, triplets: Sequence[Triplet], key, samples: int = 1,
            sampling: sampler.SamplingParams = sampler.SamplingParams(max_new_tokens=128), direct: bool = False):
    """`samples` predictions per triplet (rows grouped by triplet): the Completion and each decoded text."""
    prompts = [rollout.encode_prompt(tokenizer, world_model_prompt(t, direct)) for t in triplets for _ in range(samples)]
    stop_ids = sampler.stop_token_ids(tokenizer, model_config)
    completion = sampler.generate(params, model_config, prompts, key, sampling, stop_token_ids=stop_ids,
                             pad_token_id=tokenizer.pad_token_id)
    tokens, mask = np.asarray(completion.tokens), np.asarray(completion.mask)
    texts = [tokenizer.decode(tokens[row][mask[row]], skip_special_tokens=True) for row in range(len(prompts))]
    return completion, texts


def score_texts(texts: Sequence[str], triplets: Sequence[Triplet], samples: int,
                scorer: Scorer | TripletScorer | dict, metrics: dict | None = None):
    """Rewards and distances of responses grouped `samples` per triplet, each against its triplet's true next state
    (a TripletScorer: against its whole triplet). A dict of scorers scores each response by its triplet's kind
    (tau2-bench: ROUGE for "tool", cosine for "user"). If given, `metrics` receives what TripletScorers log (a dict's:
    each name with "_<kind>" added)."""
    rows = [t for t in triplets for _ in range(samples)]
    if not isinstance(scorer, dict):
        return _scored(scorer, texts, rows, metrics, "")
    kinds = np.array([t.kind for t in rows])
    rewards, distances = np.zeros(len(texts), np.float32), np.ones(len(texts), np.float32)
    for kind in np.unique(kinds):
        if kind not in scorer:
            raise ValueError(f"no scorer for next states of kind '{kind}' (scorers for {sorted(scorer)})")
        chosen = np.flatnonzero(kinds == kind)
        rewards[chosen], distances[chosen] = _scored(scorer[kind], [texts[i] for i in chosen],
                                                     [rows[i] for i in chosen], metrics, f"_{kind}")
    return rewards, distances


def _scored(scorer: Scorer | TripletScorer, texts: Sequence[str], rows: Sequence[Triplet], metrics: dict | None,
            suffix: str):
    if not isinstance(scorer, TripletScorer):
        return scorer(texts, [t.next_state for t in rows])
    rewards, distances, logged = scorer.score(texts, rows)
    if metrics is not None:
        metrics.update({name + suffix: value for name, value in logged.items()})
    return rewards, distances


# --------------------------------------------------------------------------------------------
# The LLM-judge reward, the paper's ablation
# --------------------------------------------------------------------------------------------


class Judge(NamedTuple):
    """An LLM that grades predictions (--judge-model), sampled by the project's sampler: greedy, its answer at most
    128 tokens (a JSON object with five numbers takes about 40), `batch_size` prompts a call."""

    params: lm.Params
    config: lm.Config
    tokenizer: object
    sampling: sampler.SamplingParams = sampler.SamplingParams(temperature=0.0, max_new_tokens=128)
    batch_size: int = 64


def judge_answers(judge: Judge, prompts: Sequence[str]) -> list[str]:
    """The judge's answer to each prompt (text without special tokens), in batches of judge.batch_size."""
    answers = []
    for start in range(0, len(prompts), judge.batch_size):
        encoded = [rollout.encode_prompt(judge.tokenizer, p) for p in prompts[start:start + judge.batch_size]]
        answers += [text for *_, text in rollout.sample(judge.params, judge.config, judge.tokenizer, encoded,
                                                        jax.random.key(0), judge.sampling)]  # greedy: the key is unused
    return answers


def judge_scorer(judge: Judge, baseline: Scorer | dict | None = None, block: str = "last") -> TripletScorer:
    """The LLM-judge reward of the RWML paper's ablation (methods.md section 2.8): the judge reads each prediction
    (the response's <next_state> block, reward.extract_tag) with its triplet's task, observation, action and true
    next observation (reward.judge_prompt) and answers a JSON object whose score in [0, 1] is the reward
    (reward.judge_score); the distance is 1 - reward, what the too-easy filter compares with its tau_d.

    A response without a prediction scores 0 and is not judged. An answer without a usable score scores 0 and is
    counted. Each distinct prompt is judged once (a group's predictions repeat). Metrics: judge_score (the mean
    reward), judge_parse_failures (responses whose answer gave no score), and with a baseline scorer (the cosine
    reward, or tau2-bench's dict by kind) cosine_reward, its mean reward on the same responses, for comparison.
    """

    def score(responses: Sequence[str], triplets: Sequence[Triplet]):
        predictions = [reward.extract_tag(response, "next_state", block) for response in responses]
        prompts = {i: reward.judge_prompt(t.task, t.state, t.action, p, t.next_state)
                   for i, (p, t) in enumerate(zip(predictions, triplets)) if p is not None}
        distinct = list(dict.fromkeys(prompts.values()))
        scores = dict(zip(distinct, map(reward.judge_score, judge_answers(judge, distinct))))
        rewards = np.zeros(len(responses), np.float32)
        failures = 0
        for i, prompt in prompts.items():
            failures += scores[prompt] is None
            rewards[i] = scores[prompt] or 0.0
        metrics = {"judge_score": float(np.mean(rewards)) if len(rewards) else 0.0,
                   "judge_parse_failures": float(failures)}
        if baseline is not None:
            metrics["cosine_reward"] = float(np.mean(score_texts(responses, triplets, 1, baseline)[0]))
        return rewards, 1.0 - rewards, metrics

    return TripletScorer(score)


@dataclasses.dataclass(frozen=True)
class RWMLConfig:
    """The RWML update (ALFWorld defaults of methods.md section 2.4). The reward's threshold tau_d lives in the
    scorer (cosine_scorer), the history H in the triplets (triplets_from_rollouts)."""

    group_size: int = 8
    """G predictions per triplet: one GRPO group"""
    sampling: sampler.SamplingParams = sampler.SamplingParams(temperature=1.0, max_new_tokens=128)
    filter_zero_variance: bool = False
    """drop the predictions of triplets whose G rewards are all equal from the loss (DAPO's dynamic sampling)"""


def rwml_update(state: grpo.TrainState, step_fn: Callable, tokenizer, model_config: lm.Config,
                triplets: Sequence[Triplet], scorer: Scorer, key, cfg: RWMLConfig = RWMLConfig(),
                ref_logprobs_fn: Callable | None = None) -> tuple[grpo.TrainState, dict]:
    """One RWML step (methods.md section 2.4): G predictions per triplet, binary rewards (eq. 18), group advantages
    (eq. 2: grpo.advantages' default estimator, whatever the policy stages use), one grpo_step (eq. 6 aggregated by
    eq. 10, 11 or 12).

    step_fn is grpo.grpo_step with its configuration bound (jitted by the caller), or engine/microbatch.py's update.
    ref_logprobs_fn (tokens, token_mask, action_mask) -> log pi_ref, on the action tokens at least, is needed when
    the loss has a KL term. Metrics add the reward, distance and format rates, and the wall seconds of sampling,
    reward, reference log-probs and update.
    """
    timings = {}
    with rollout.stopwatch(timings, "sampling"):
        completion, texts = predict(state.params, model_config, tokenizer, triplets, key, cfg.group_size, cfg.sampling)
    with rollout.stopwatch(timings, "reward"):
        scorer_metrics = {}  # the LLM judge's own: its mean score, its parse failures, the cosine reward beside it
        rewards, distances = score_texts(texts, triplets, cfg.group_size, scorer, scorer_metrics)
    with rollout.stopwatch(timings, "reference"):
        group_ids = jnp.repeat(jnp.arange(len(triplets)), cfg.group_size)
        advantages, keep, stats = grpo.advantages(jnp.asarray(rewards, jnp.float32), group_ids,
                                                  filter_zero_variance=cfg.filter_zero_variance)
        batch = grpo.batch(rollout.completion_rows(completion), advantages, keep)
        if ref_logprobs_fn is not None:
            batch = batch._replace(ref_logprobs=ref_logprobs_fn(batch.tokens, batch.token_mask, batch.action_mask))
    with rollout.stopwatch(timings, "update"):
        state, metrics = step_fn(state, batch)
        metrics = {k: float(v) for k, v in metrics.items()}  # float() waits for the update to finish
    metrics.update(
        {f"seconds_{part}": seconds for part, seconds in timings.items()},
        reward=float(np.mean(rewards)),
        distance=float(np.mean(distances)),
        # the share ending in a closed, non-empty <next_state> block (what the scorer reads is its own: cosine_scorer)
        format=float(np.mean([reward.extract_tag(t, "next_state") is not None for t in texts])),
        zero_variance_groups=float(np.mean(np.asarray(stats.zero_variance))),
        **scorer_metrics,
    )
    if isinstance(scorer, dict):  # each kind's reward apart (tau2-bench: reward_tool is ROUGE's, reward_user cosine's)
        kinds = np.array([t.kind for t in triplets for _ in range(cfg.group_size)])
        metrics.update({f"reward_{kind}": float(np.mean(np.asarray(rewards)[kinds == kind])) for kind in np.unique(kinds)})
    return state, metrics


def world_model_accuracy(params, model_config: lm.Config, tokenizer, triplets: Sequence[Triplet], scorer: Scorer, key,
                         greedy: bool = True, samples: int = 1, max_new_tokens: int = 128, direct: bool = False,
                         batch_size: int = 64) -> float:
    """Mean binary reward of predictions on (validation) triplets: greedy, methods.md eq. 31 (RWML's world-model
    accuracy), or `samples` at temperature 1."""
    sampling = sampler.SamplingParams(0.0 if greedy else 1.0, max_new_tokens=max_new_tokens)
    samples = 1 if greedy else samples
    total = []
    for start in range(0, len(triplets), batch_size):
        chunk = triplets[start:start + batch_size]
        _, texts = predict(params, model_config, tokenizer, chunk, jax.random.fold_in(key, start), samples, sampling,
                           direct)
        total.extend(score_texts(texts, chunk, samples, scorer)[0])
    return float(np.mean(total))


# --------------------------------------------------------------------------------------------
# "Too easy" subsampling
# --------------------------------------------------------------------------------------------


def filter_distances(filter_params, model_config: lm.Config, tokenizer, triplets: Sequence[Triplet], embedder_scorer,
                     key, samples: int = 10, max_new_tokens: int = 128, batch_size: int = 16) -> np.ndarray:
    """[n, K] distances d_k (methods.md eq. 18, read by eqs. 15 and 17) of the filter model's K sampled predictions to
    each triplet's true next state (1.0 where a prediction has no <next_state> tag). embedder_scorer is a Scorer;
    only distances are kept."""
    sampling = sampler.SamplingParams(1.0, max_new_tokens=max_new_tokens)
    rows = []
    for start in range(0, len(triplets), batch_size):
        chunk = triplets[start:start + batch_size]
        _, texts = predict(filter_params, model_config, tokenizer, chunk, jax.random.fold_in(key, start), samples,
                           sampling, direct=True)
        rows.append(np.asarray(score_texts(texts, chunk, samples, embedder_scorer)[1]).reshape(len(chunk), samples))
    return np.concatenate(rows)


def easy_triplets(distances: np.ndarray, tau_d: float, tau_easy: float = 0.0) -> np.ndarray:
    """[n] bool, methods.md eq. 15: a triplet is too easy when the mean of its K binary rewards is > tau_easy."""
    return (distances < tau_d).mean(axis=1) > tau_easy


def calibrate_tau_d(distances: np.ndarray, target_easy_fraction: float = 0.3, tau_easy: float = 0.0) -> float:
    """The tau_d that makes the easy fraction closest to the target (the paper aims at ~30%): methods.md eq. 17.

    A triplet is easy when more than tau_easy * K of its K distances are < tau_d, that is when its
    k-th smallest distance is < tau_d, k = floor(tau_easy * K) + 1. So the easy fraction at tau_d
    is the fraction of these critical distances below it, and tau_d is placed halfway between two
    of them, where no tie straddles it.
    """
    k = int(np.floor(tau_easy * distances.shape[1])) + 1
    critical = np.sort(np.sort(distances, axis=1)[:, min(k, distances.shape[1]) - 1])
    easy_count = int(round(target_easy_fraction * len(critical)))
    if easy_count == 0:
        return float(critical[0] / 2)
    if easy_count >= len(critical):
        return float(critical[-1] + 1e-6)
    return float((critical[easy_count - 1] + critical[easy_count]) / 2)


def subsample_easy(triplets: Sequence[Triplet], easy: np.ndarray, keep_easy: float = 0.1, seed: int = 0) -> list[Triplet]:
    """All hard triplets, and each easy one with probability keep_easy (seeded): methods.md eq. 16."""
    draws = np.random.default_rng(seed).random(len(triplets))
    return [t for t, is_easy, u in zip(triplets, easy, draws) if not is_easy or u < keep_easy]


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """"Too easy" subsampling (methods.md section 2.2, eqs. 15-17)."""

    samples: int = 10
    """K predictions per training triplet from the filter model"""
    tau_easy: float = 0.0
    """easy when the mean of the K binary rewards is > tau_easy ("> 0": at least one hit; eq. 15)"""
    keep_easy: float = 0.1
    """p: probability of keeping an easy triplet (hard ones are all kept; eq. 16)"""
    target_easy_fraction: float = 0.3
    """calibrate the filter's tau_d so about this fraction is easy (eq. 17); <= 0 keeps tau_d as given"""
    tau_d: float = 0.1
    """the filter's distance threshold when not calibrated (ALFWorld 0.1)"""
    sft_epochs: int = 2
    """passes of the filter model's SFT over the validation triplets"""
    sft_batch_size: int = 32
    """triplets per SFT step of the filter model"""
    max_new_tokens: int = 128
    """length of the filter model's predictions"""


def too_easy_subsample(params, model_config: lm.Config, tokenizer, train: Sequence[Triplet],
                       validation: Sequence[Triplet], scorer: Scorer, optimizer, key, cfg: FilterConfig = FilterConfig(),
                       seed: int = 0) -> tuple[list[Triplet], dict]:
    """"Too easy" subsampling, methods.md section 2.2: the filter model (an SFT copy of params trained on the
    validation triplets, eq. 20) judges each training triplet (eq. 15, its threshold from eq. 17); easy ones are
    kept with probability keep_easy (eq. 16). Returns the kept triplets and a summary.

    scorer provides the distances (its own threshold is not used here).
    """
    filter_state = train_wm_sft(grpo.init_state(params, optimizer), tokenizer, model_config, validation, optimizer,
                                cfg.sft_epochs, cfg.sft_batch_size, seed)
    distances = filter_distances(filter_state.params, model_config, tokenizer, train, scorer, key, cfg.samples,
                                 cfg.max_new_tokens)
    tau_d = calibrate_tau_d(distances, cfg.target_easy_fraction, cfg.tau_easy) if cfg.target_easy_fraction > 0 else cfg.tau_d
    easy = easy_triplets(distances, tau_d, cfg.tau_easy)
    kept = subsample_easy(train, easy, cfg.keep_easy, seed)
    return kept, {"filter_tau_d": tau_d, "easy_fraction": float(easy.mean()), "kept": len(kept), "train": len(train)}


# --------------------------------------------------------------------------------------------
# Weight change
# --------------------------------------------------------------------------------------------

MODULES = {("attn", "q"): "q", ("attn", "k"): "k", ("attn", "v"): "v", ("attn", "o"): "o",
           ("mlp", "gate"): "gate", ("mlp", "up"): "up", ("mlp", "down"): "down"}


def weight_change(before: lm.Params, after: lm.Params, eta: float = 1e-3) -> dict[str, np.ndarray]:
    """Per module (q, k, v, o, gate, up, down): [layers] fraction of kernel weights with
    |w' - w| > eta * max(|w|, |w'|), methods.md eq. 21."""
    layers = sorted((k for k in before if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
    changed = {name: np.zeros(len(layers)) for name in MODULES.values()}
    for index, layer in enumerate(layers):
        for (block, module), name in MODULES.items():
            w = np.asarray(before[layer][block][module]["kernel"], np.float32)
            w2 = np.asarray(after[layer][block][module]["kernel"], np.float32)
            changed[name][index] = np.mean(np.abs(w2 - w) > eta * np.maximum(np.abs(w), np.abs(w2)))
    return changed


def plot_weight_change(changes: dict[str, dict[str, np.ndarray]], path: str) -> str:
    """One panel per method (e.g. {"RWML": weight_change(...), "WM SFT": ...}): changed fraction by layer and module."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend is left alone, nothing opens a window

    figure = Figure(figsize=(4.5 * len(changes), 3.5), layout="tight")
    axes = figure.subplots(1, len(changes), squeeze=False, sharey=True)
    for axis, (title, change) in zip(axes[0], changes.items()):
        for module, fractions in change.items():
            axis.plot(np.arange(len(fractions)), fractions, marker="o", label=module)
        axis.set_title(title)
        axis.set_xlabel("layer")
        axis.set_xticks(np.arange(len(fractions)))
    axes[0][0].set_ylabel("fraction of weights changed")
    axes[0][-1].legend(fontsize=8)
    figure.savefig(path, dpi=120)
    return path
