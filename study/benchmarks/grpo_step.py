"""Time per GRPO update, and the FLOP/s it achieves against a matmul peak measured on the same machine.

    python study/benchmarks/grpo_step.py            # ~2 minutes on 2 CPU cores
    python study/benchmarks/grpo_step.py --tunix-python /work/venv-tunix/bin/python   # and google-tunix beside it
    python study/benchmarks/grpo_step.py --model smollm2-135m-instruct --no-random --tunix-python ...  # real weights

Batch 8 x 192 tokens (128 prompt + 64 completion), float32, token-mean loss with a k3 KL term (beta 0.04), clip 0.2,
clipped AdamW, on two checkpoints with random weights: a Qwen2.5-0.5B-shaped one with 4 of its 24 layers and a tiny
one (2 layers, hidden 64, vocab 512). The update is train.py's: microbatch.LengthSortedUpdate (one micro-batch here), which
unembeds only the completion's columns. Model FLOPs are estimates.training_flops (nanoGPT's 6 N + 12 L H Q T a token, the
output projection counted on the completion's tokens, the only ones a loss reads); the chunked log-prob's
recomputation of the output projection is extra work not counted, as in MFU. The peak is estimates.matmul_peak's, the
one train.py's MFU divides by.

With --tunix-python, the same checkpoint (safetensors) and the same batch (.npz) go to study/benchmarks/peer_tunix.py, run
by that python (a virtual environment with google-tunix; see study/benchmarks/peer.py), which times tunix's GRPO update
on them; its time, the ratio (>1: this project is faster) and both first-step losses are printed beside ours.
"""

import argparse
import os
import tempfile
from pathlib import Path

import jax
import numpy as np

import grpo
import model as lm
from engine import estimates, hf, microbatch
from peer import peer_name, qwen2_layout, tunix_times, write_batch
from timing import timed_steps

CONFIG = lm.Config(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=4,
                   num_heads=14, num_kv_heads=2, head_dim=64, qkv_bias=True, tie_word_embeddings=True)
TINY_CONFIG = lm.Config(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, tie_word_embeddings=True)
CONFIGS = {"tiny (2 layers, vocab 512)": TINY_CONFIG, "qwen2.5-0.5b-shaped (4 layers)": CONFIG}


def duration(seconds):
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main(batch, prompt_length, completion_length, repeats, beta=0.04, tunix_python=None, models=(), random=True):
    peak = estimates.matmul_peak("float32")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s (estimates.matmul_peak, float32, same run); "
          f"load average {open('/proc/loadavg').read().split()[0]}")
    for name, config in CONFIGS.items() if random else ():
        step_row(name, config, batch, prompt_length, completion_length, repeats, beta, peak, tunix_python)
    for model in models:  # a real checkpoint's weights (tunix gets them in Qwen2's layout: peer.qwen2_layout)
        config, params = hf.load_checkpoint(hf.resolve_checkpoint(model))
        step_row(f"{model} (its weights)", config, batch, prompt_length, completion_length, repeats, beta, peak,
                 tunix_python, params)
    print(f"load average {open('/proc/loadavg').read().split()[0]} at the end")


def random_batch(config, rows: int, length: int, completion: int, params=None) -> grpo.Batch:
    """A GRPO batch of random tokens, the last `completion` of each row the response, one random advantage a row, no
    world-model term; old log-probs random in [-5, 0], or with `params` the model's own less up to 0.05 (step_row
    says why), and the reference's 0.01 below them."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (rows, length)).astype(np.int32)
    action_mask = np.zeros((rows, length), np.float32)
    action_mask[:, length - completion:] = 1.0
    logp = -rng.uniform(0, 5, (rows, length)).astype(np.float32)
    if params is not None:
        own, _ = jax.jit(lm.token_logprobs, static_argnums=1)(params, config, tokens, np.ones((rows, length), bool))
        logp = np.asarray(own, np.float32) - rng.uniform(0, 0.05, (rows, length)).astype(np.float32)
    advantages = np.repeat(rng.normal(size=(rows, 1)), length, 1).astype(np.float32)
    none = np.zeros(rows, np.float32)  # no world-model term (PaW's)
    return grpo.Batch(tokens, np.ones((rows, length), bool), action_mask, np.zeros_like(action_mask), logp,
                      logp - 0.01, advantages, none, none)


def step_row(name, config, batch, prompt_length, completion_length, repeats, beta, peak, tunix_python=None, params=None):
    """With random weights the batch's old log-probs are random in [-5, 0]; with a real checkpoint's (params given)
    they are the model's own on the batch, less noise of 0.05 (a real update's ratios are near 1): random tokens
    under a trained model score ~-30, and old log-probs 25 nats away would put the KL's log-ratio past the project's
    clamp at 20, which tunix does not clamp, so the two losses would differ."""
    length = prompt_length + completion_length
    data = random_batch(config, batch, length, completion_length, params)
    params = lm.init_params(config, jax.random.key(0)) if params is None else params
    folder = tempfile.TemporaryDirectory() if tunix_python else None
    if folder:  # before the step donates the parameters
        hf.save_checkpoint(Path(folder.name) / "checkpoint", *qwen2_layout(config, jax.device_get(params)))
        write_batch(Path(folder.name) / "batch.npz", prompt_length=prompt_length, tokens=data.tokens,
                    token_mask=data.token_mask, loss_mask=data.action_mask, old_logprobs=data.old_logprobs,
                    ref_logprobs=data.ref_logprobs, advantages=data.advantages)
    optimizer = grpo.make_optimizer(1e-6)
    step_config = grpo.StepConfig(loss=grpo.LossConfig(beta=beta, kl_estimator="k3", aggregation="token-mean"))
    step = microbatch.LengthSortedUpdate(grpo.grpo_objective(config, step_config), optimizer, token_budget=batch * length)
    state = grpo.init_state(params, optimizer)
    losses = []

    def step_keeping_loss(state, data):
        state, metrics = step(state, data)
        losses.append(metrics["loss"])
        return state, metrics

    first, seconds = timed_steps(step_keeping_loss, state, data, repeats)
    achieved = estimates.training_flops(config, data.token_mask, data.action_mask) / seconds
    print(f"grpo_step, {name}: {lm.count_params(params) / 1e6:.2f}M parameters, batch {batch} x {length} tokens "
          f"({prompt_length} prompt + {completion_length} completion), beta {beta} k3, token-mean")
    print(f"  time per step     {duration(seconds)} (median of {repeats}); compile {first - seconds:.1f} s")
    print(f"  model FLOP/s      {achieved / 1e9:.1f} GFLOP/s")
    print(f"  fraction of peak  {achieved / peak:.1%}")
    if folder:
        with folder:
            peer = tunix_times(tunix_python, Path(folder.name) / "checkpoint", Path(folder.name) / "batch.npz",
                               "--grpo", "--beta", beta, "--epsilon", step_config.loss.clip_low, repeats=repeats)
        times, ours = peer["grpo"], float(losses[0])
        print(f"  {peer_name(peer):17} {duration(times['seconds'])} per step (median of {repeats} after 2 warm-ups); "
              f"first call {times['first']:.1f} s")
        print(f"  ratio ours/peer   {times['seconds'] / seconds:.2f}x speed (>1: this project is faster)")
        print(f"  first-step loss   this project {ours:.6f}, tunix {times['loss']:.6f} "
              f"(relative difference {abs(ours - times['loss']) / abs(times['loss']):.1e})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--completion-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--beta", type=float, default=0.04, help="KL-to-reference coefficient (k3)")
    parser.add_argument("--tunix-python", help="a python with google-tunix installed: time tunix's GRPO update on "
                        "the same checkpoint and batch (study/benchmarks/peer_tunix.py) and print it beside ours")
    parser.add_argument("--model", action="append", default=[], help="also a real checkpoint (folder, Hub id, GGUF or "
                        "short name such as smollm2-135m-instruct), on its own weights; may be repeated")
    parser.add_argument("--no-random", action="store_true", help="only the --model rows")
    args = parser.parse_args()
    main(args.batch, args.prompt_length, args.completion_length, args.repeats, args.beta, args.tunix_python,
         args.model, not args.no_random)
