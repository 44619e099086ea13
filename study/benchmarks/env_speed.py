"""Environment steps per second, and where rollout time goes on ALFWorld.

    python study/benchmarks/env_speed.py            # ~4 minutes on 2 CPU cores

1. Each built-in grid game: random actions, resetting when an episode ends, in one process.
2. ALFWorld: 8 valid_seen games stepped together with random admissible actions, in this process
   and in a pool of worker processes (rollout.EnvBatch); game loading and resets timed apart.
3. A rollout of 16 ALFWorld games (4 groups of 4, 5 turns, 48 new tokens a turn) with a random
   model and a byte-level BPE tokenizer trained on ALFWorld text: the share of wall time spent
   sampling against stepping the games, for a tiny model and a larger one.
"""

import argparse
import functools
import time

import jax
import numpy as np

import envs
import model as lm
import rollout
import sampler
from engine import hf


def grid_steps_per_second(name, steps=20_000):
    env, rng = envs.GRID_ENVS[name](), np.random.default_rng(0)
    actions = ["Up", "Down", "Left", "Right"] if name != "sudoku" else [f"place {v} at ({r}, {c})" for v in range(1, 5)
                                                                          for r in range(4) for c in range(4)]
    env.reset(0)
    start = time.perf_counter()
    for step in range(steps):
        if env.step(actions[rng.integers(len(actions))])[2]:
            env.reset(step)
    return steps / (time.perf_counter() - start)


def alfworld_steps_per_second(workers, games=8, steps=20):
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    with rollout.EnvBatch(functools.partial(envs.AlfWorld, "valid_seen"), games, workers) as batch:
        starts = batch.reset(list(range(games)))
        loaded = time.perf_counter() - start
        admissible = {i: info["admissible_actions"] for i, (_, info) in enumerate(starts)}
        start = time.perf_counter()
        for _ in range(steps):
            moves = {i: [a[rng.integers(len(a))]] for i, a in admissible.items()}
            for i, (_, _, done, info) in batch.play(moves).items():
                admissible[i] = info["admissible_actions"]
                if done:  # a won game would refuse further steps: stop stepping it
                    del admissible[i]
        seconds = time.perf_counter() - start
    return games * steps / seconds, loaded


def rollout_shares(hidden, layers, tokenizer, workers):
    config = lm.Config(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                       num_layers=layers, num_heads=max(hidden // 64, 4), num_kv_heads=2, head_dim=64 if hidden >= 256 else hidden // 4,
                       qkv_bias=True, tie_word_embeddings=True, eos_token_ids=(tokenizer.eos_token_id,))
    params = lm.init_params(config, jax.random.key(0))
    timings = {}
    with rollout.EnvBatch(functools.partial(envs.AlfWorld, "valid_seen"), 16, workers) as batch:
        start = time.perf_counter()
        trajectories = rollout.rollout(params, config, tokenizer, batch, [0, 1, 2, 3], 4, jax.random.key(0),
                                       prompt=envs.alfworld_prompt, parse=envs.parse_action, max_turns=5,
                                       sampling=sampler.SamplingParams(1.0, max_new_tokens=48), timings=timings)
        total = time.perf_counter() - start
    prompt_tokens = np.mean([len(t.prompt_ids) for trajectory in trajectories for t in trajectory.turns])
    print(f"  {lm.count_params(params) / 1e6:6.1f}M-parameter model ({layers} layers, hidden {hidden}; prompts ~{prompt_tokens:.0f} tokens): "
          f"{total:.1f} s, model {timings['sampling'] / total:.0%}, environments {timings['env'] / total:.0%}, "
          f"other {1 - (timings['sampling'] + timings['env']) / total:.0%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print("built-in games, one process:")
    for name in envs.GRID_ENVS:
        print(f"  {name:10s} {grid_steps_per_second(name):9,.0f} steps/s")
    print("ALFWorld, 8 valid_seen games stepped together:")
    for workers in (0, args.workers):
        rate, loaded = alfworld_steps_per_second(workers)
        print(f"  {'one process' if workers == 0 else f'{workers} workers':12s} {rate:6.1f} steps/s   (load + reset all 8: {loaded:.1f} s)")
    print(f"ALFWorld rollout, 16 games x 5 turns, {args.workers} env workers:")
    corpus = [envs.AlfWorld("valid_seen").reset(i)[0] for i in range(20)] + [envs.alfworld_prompt("", [], 0, "", {})]
    tokenizer = hf.train_tokenizer(corpus, vocab_size=2048)
    for hidden, layers in ((64, 2), (512, 4)):
        rollout_shares(hidden, layers, tokenizer, args.workers)
