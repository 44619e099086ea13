"""How well a model acts and how well it predicts, on held-out tasks and transitions.

Task success is Pass@1 (and Pass@k with several samples a task, docs/methods.md eq. 29) on held-out seeds of a grid
game or ALFWorld's validation games. World-model accuracy is the share of held-out transitions of random play whose
true next state the model predicts exactly under greedy decoding (teacher-forced argmax, eq. 30), in three layouts:
RWML's prompt (`wm_accuracy`), WM SFT's direct prompt (`wm_accuracy_direct`) and PaW's inline layout [h ; a ; o']
(`wm_accuracy_inline`); under SPA also its <prediction> of the true next state (`spa_prediction_accuracy`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

import envs
import model as lm
import rollout
import rwml
import sampler
import spa
from engine import estimates

EVAL_SEED = 1_000_000_000  # grid games' held-out seeds start here; ALFWorld evaluates games 0..N-1 of its split


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    episodes: int = 128
    """held-out tasks (grid games: seeds from EVAL_SEED; ALFWorld: the first N games of the evaluation split)"""
    samples: int = 1
    """episodes per task; Pass@k is reported for every power of two k <= samples"""
    temperature: float = 0.4
    """sampling temperature (PaW's validation setting)"""
    max_turns: int = 10
    """turns per episode"""
    wm_transitions: int = 128
    """held-out random-play transitions for world-model accuracy"""


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """Unbiased Pass@k from `samples` attempts of which `correct` succeeded: 1 - C(n - c, k) / C(n, k), methods.md
    eq. 29."""
    if k > samples:
        raise ValueError(f"Pass@{k} needs at least {k} samples, not {samples}")
    if samples - correct < k:
        return 1.0
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


class Evaluator:
    """Held-out task success (Pass@k, methods.md eq. 29) and exact world-model accuracy (eq. 30), with fixed tasks and
    transitions for the whole run."""

    def __init__(self, settings: EvalConfig, game: envs.Game, tokenizer,
                 config: lm.Config, *, max_new_tokens: int, spa_prediction: bool = False, seed: int = 0,
                 workers: int = 0):
        """game: the held-out game (its make_env gives ALFWorld's evaluation split; its parser the policy's);
        max_new_tokens: response tokens per turn (the policy's); spa_prediction: also measure SPA's <prediction> of
        the true next state; seed: picks the held-out transitions; workers: environment worker processes."""
        self.settings, self.game, self.tokenizer, self.config = settings, game, tokenizer, config
        self.max_new_tokens = max_new_tokens
        episodes = max(2, math.ceil(2 * settings.wm_transitions / game.max_turns))
        play, play_prompts = (game.demonstrate or rollout.random_play)(game, episodes, EVAL_SEED + seed)
        triplets = rwml.triplets_from_rollouts(play, game.history, game.world_model_view)
        rng = np.random.default_rng(seed)
        self.triplets = [triplets[i] for i in rng.permutation(len(triplets))[:settings.wm_transitions]]
        encode = functools.partial(tokenizer.encode, add_special_tokens=False)
        eos = [tokenizer.eos_token_id]
        self.wm_rows = {}
        for name, direct in (("wm_accuracy", False), ("wm_accuracy_direct", True)):
            self.wm_rows[name] = [(rollout.encode_prompt(tokenizer, rwml.world_model_prompt(t, direct)),
                                   encode(rwml.sft_label(t)) + eos) for t in self.triplets]
        # PaW's layout: the policy's prompt and response, then o_{t+1}
        prompts = [play_prompts[t.trajectory][t.turn] for t in self.triplets]
        self.wm_rows["wm_accuracy_inline"] = [
            (rollout.encode_prompt(tokenizer, prompt) + encode(game.respond(t.action)) + eos, encode(t.next_state))
            for prompt, t in zip(prompts, self.triplets)]
        if spa_prediction:  # SPA's <prediction>: the true s_{t+1} (with coordinates) after the true s_t
            states = {i: spa.true_states(game.make_env, play[i]) for i in {t.trajectory for t in self.triplets}}
            self.wm_rows["spa_prediction_accuracy"] = [spa.prediction_row(spa.make_example(
                tokenizer, rollout.encode_prompt(tokenizer, prompt), *states[t.trajectory][t.turn], "", [t.action]))
                for prompt, t in zip(prompts, self.triplets)]
        self.environments = rollout.EnvBatch(game.make_env, settings.episodes * settings.samples,
                                          min(workers, settings.episodes))

    def __call__(self, params, key) -> dict[str, float]:
        settings = self.settings
        in_order = self.game.name == "alfworld" or self.game.name in envs.TAU2_ENVS  # a split's first N tasks
        seeds = [i if in_order else EVAL_SEED + i for i in range(settings.episodes)]
        sampling = sampler.SamplingParams(settings.temperature, max_new_tokens=self.max_new_tokens,
                                          batch_bytes=estimates.sampling_bytes())  # free now, state held
        trajectories = rollout.rollout(params, self.config, self.tokenizer, self.environments, seeds, settings.samples,
                                       key, prompt=self.game.prompt, parse=self.game.parse, max_turns=settings.max_turns,
                                       sampling=sampling, history=self.game.history, user=self.game.user)
        stats = rollout.episode_stats(trajectories)
        wins = np.array([t.won for t in trajectories]).reshape(settings.episodes, settings.samples).sum(1)
        metrics = {"success": stats["success"], "return": stats["return"], "invalid": stats["invalid"],
                   "turns": stats["turns"], "context_full": stats["context_full"]}
        k = 1
        while k <= settings.samples:
            metrics[f"pass@{k}"] = float(np.mean([pass_at_k(settings.samples, int(c), k) for c in wins]))  # eq. 29
            k *= 2
        for name, rows in self.wm_rows.items():
            fractions = sampler.greedy_match_fractions(params, self.config, rows, self.tokenizer.pad_token_id)
            metrics[name] = float(np.mean(fractions == 1.0))  # eq. 30
            if name == "spa_prediction_accuracy":  # exact matches are rare early on: also the share of tokens
                metrics["spa_prediction_token_accuracy"] = float(np.mean(fractions))
        return metrics

    def close(self):
        self.environments.close()
