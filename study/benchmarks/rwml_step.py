"""Where an RWML step's time goes: sampling the predictions, the embedding reward, and the GRPO update.

    python study/benchmarks/rwml_step.py            # ~2 minutes on 2 CPU cores

Triplets come from replaying ALFWorld valid_seen walkthroughs (real observations as targets);
8 triplets x G = 8 predictions of up to 64 tokens, rewarded with the Flax all-MiniLM-L6-v2;
a random 4-layer, 512-wide Qwen2-shaped model with a BPE tokenizer trained on ALFWorld text.
Times are medians over steps after the first (which compiles).
"""

import functools
import statistics

import jax
import numpy as np

import envs
import grpo
import model as lm
import rollout
import rwml
import sampler
from engine import embedders, hf


def walkthrough_triplets(games=12):
    out = []
    for seed in range(games):
        env = envs.AlfWorld("valid_seen")
        observation, info = env.reset(seed)
        for step, action in enumerate(envs.alfworld_walkthrough(env.game)):
            following, _, _, _ = env.step(action)
            out.append(rollout.Transition(task=info["task"], history=(), state=observation, action=action,
                                          next_state=following, reward=0.0, invalid=False, trajectory=seed, turn=step,
                                          group=0))
            observation = following
    return out


if __name__ == "__main__":
    triplets = walkthrough_triplets()
    tokenizer = hf.train_tokenizer([rwml.world_model_prompt(t) for t in triplets] + [rwml.sft_label(t) for t in triplets],
                                   vocab_size=2048)
    config = lm.Config(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_layers=4,
                       num_heads=8, num_kv_heads=2, head_dim=64, qkv_bias=True, tie_word_embeddings=True,
                       eos_token_ids=(tokenizer.eos_token_id,))
    optimizer = grpo.make_optimizer(1e-6)
    state = grpo.init_state(lm.init_params(config, jax.random.key(0)), optimizer)
    step_fn = jax.jit(functools.partial(grpo.grpo_step, model_config=config, optimizer=optimizer,
                                        step=grpo.StepConfig(grpo.LossConfig(beta=0.0))))
    scorer = rwml.cosine_scorer(embedders.default_embedder(), tau_d=0.2)
    cfg = rwml.RWMLConfig(group_size=8, sampling=sampler.SamplingParams(1.0, max_new_tokens=64))
    rng = np.random.default_rng(0)
    times = {"sampling": [], "reward": [], "update": []}
    for step in range(5):
        chosen = [triplets[i] for i in rng.choice(len(triplets), 8, replace=False)]
        state, metrics = rwml.rwml_update(state, step_fn, tokenizer, config, chosen, scorer, jax.random.key(step), cfg)
        if step:
            for name in times:
                times[name].append(metrics[f"seconds_{name}"])
    medians = {name: statistics.median(values) for name, values in times.items()}
    total = sum(medians.values())
    prompt = np.mean([len(rollout.encode_prompt(tokenizer, rwml.world_model_prompt(t))) for t in triplets])
    print(f"RWML step: {len(triplets)} walkthrough triplets, 8 x G=8 predictions, prompts ~{prompt:.0f} tokens, "
          f"{lm.count_params(state.params) / 1e6:.1f}M-parameter model")
    for name, seconds in medians.items():
        print(f"  {name:9s} {seconds:6.2f} s  {seconds / total:5.1%}")
