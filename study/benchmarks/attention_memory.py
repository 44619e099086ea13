"""How the memory of a gradient grows with length: the plain attention (a [heads, T, T] matrix a layer) against the
blockwise one (attention.py), and the blockwise one with each layer recomputed in the backward pass (--remat), read
from XLA's compiled memory analysis, without running anything.

    python study/benchmarks/attention_memory.py          # ~1 minute on 2 CPU cores

The gradient of the teacher-forced log-probs (model.token_logprobs, summed) of one row, for a 2-layer model of
Qwen2.5-0.5B's width (hidden 896, 14 heads, 2 KV heads, MLP 4,864, vocabulary 151,936, tied embeddings).
Linear memory gives 4x from 1,024 to 4,096 tokens, less with the length-independent part (the embedding's
gradient, the vocabulary chunks).
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import model as lm  # noqa: E402

CONFIG = lm.Config(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=2,
                   num_heads=14, num_kv_heads=2, head_dim=64, qkv_bias=True, tie_word_embeddings=True)


def temporaries(attention: str, length: int, remat: bool = False) -> int:
    """XLA's temporary bytes for the gradient at one length (shapes only: no parameter is allocated)."""
    params = jax.eval_shape(lambda: lm.init_params(CONFIG, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, length), bool)
    logprob = lambda p, t, m: lm.token_logprobs(p, CONFIG, t, m, attention=attention, remat=remat)[0].sum()
    gradient = jax.jit(jax.grad(logprob))
    return gradient.lower(params, tokens, mask).compile().memory_analysis().temp_size_in_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    args = parser.parse_args()
    print(f"gradient of token_logprobs, 2 layers at Qwen2.5-0.5B width, batch 1 ({jax.devices()[0].platform})")
    print("| attention | " + " | ".join(f"T = {n:,}" for n in args.lengths) + " | growth |")
    print("|---|" + "---|" * (len(args.lengths) + 1))
    for attention, remat in (("plain", False), ("blockwise", False), ("blockwise", True)):
        sizes = [temporaries(attention, n, remat) for n in args.lengths]
        cells = " | ".join(f"{size / 2**20:,.0f} MiB" for size in sizes)
        print(f"| {attention}{', remat' if remat else ''} | {cells} | {sizes[-1] / sizes[0]:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
