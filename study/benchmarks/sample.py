"""A generation demo: load a checkpoint (or build a random tiny one offline), sample from a chat prompt, report speed.

    python study/benchmarks/sample.py                                        # a random 2-layer Qwen2, offline
    python study/benchmarks/sample.py --model Qwen/Qwen2.5-0.5B-Instruct --temperature 0.7
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tyro

import model as lm
import sampler
from engine import hf


def tiny_random_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """A random 2-layer Qwen2 with a small BPE tokenizer: lets the demo run offline in seconds."""
    texts = ["You are an agent in a grid world. Move up, down, left or right to reach the goal."]
    tokenizer = hf.train_tokenizer(texts, vocab_size=300)
    config = lm.Config(
        model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, tie_word_embeddings=True,
        eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id,
    )
    return hf.save_checkpoint(folder, config, lm.init_params(config, jax.random.key(seed)), tokenizer)


@dataclasses.dataclass
class DemoArgs:
    """Generate from a chat prompt and report speed (a demo of loading and sampling)."""

    model: str = "tiny"
    """a Hugging Face checkpoint folder or Hub id; 'tiny' builds a random 2-layer Qwen2 offline"""
    prompt: str = "You are an agent in a grid world. Move to the goal."
    """the user message, wrapped in the tokenizer's chat template"""
    batch: int = 4
    """copies of the prompt sampled side by side"""
    max_new_tokens: int = 32
    """tokens sampled per row at most"""
    temperature: float = 1.0
    """0 for greedy"""
    top_p: float = 1.0
    """nucleus sampling mass (1.0: off)"""
    seed: int = 0
    """the sampling key"""
    dtype: str = "float32"
    """parameter dtype: float32 or bfloat16"""


def main(args: DemoArgs) -> None:
    folder = tiny_random_checkpoint(Path.home() / ".cache" / "rwml-jax" / "tiny-random-qwen2") if args.model == "tiny" else args.model
    config, params = hf.load_checkpoint(folder, jnp.dtype(args.dtype))
    tokenizer = hf.load_tokenizer(folder)
    print(f"{config.model_type}: {lm.count_params(params):,} parameters, {config.num_layers} layers, vocab {config.vocab_size}"
          + (" (random weights: expect noise)" if args.model == "tiny" else ""))
    messages = [{"role": "user", "content": args.prompt}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    sampling = sampler.SamplingParams(args.temperature, args.top_p, max_new_tokens=args.max_new_tokens)
    for attempt in ("compile + run", "run"):
        start = time.perf_counter()
        out = sampler.generate(params, config, [prompt] * args.batch, jax.random.key(args.seed), sampling)
        jax.block_until_ready(out.tokens)
        seconds = time.perf_counter() - start
        print(f"{attempt}: {seconds:.2f} s, {int(out.mask.sum()) / seconds:,.0f} new tokens/s")
    for row in range(args.batch):
        ids = np.asarray(out.tokens[row])[np.asarray(out.mask[row])]
        mean_logprob = float(out.logprobs[row][out.mask[row]].mean())
        print(f"[{row}] ({len(ids)} tokens, mean log-prob {mean_logprob:.2f}) {tokenizer.decode(ids)!r}")


if __name__ == "__main__":
    main(tyro.cli(DemoArgs))
