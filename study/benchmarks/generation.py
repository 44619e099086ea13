"""Generation speed against transformers' PyTorch generate, and the memory the chunked log-prob saves.

    python study/benchmarks/generation.py            # ~3 minutes on 2 CPU cores
    python study/benchmarks/generation.py --tunix-python /work/venv-tunix/bin/python   # and google-tunix at temperature 1
    python study/benchmarks/generation.py --model smollm2-135m-instruct --no-random --tunix-python ...  # real weights

Both frameworks get the same random checkpoint (written by transformers), the same prompts and
greedy decoding with no stop token, so both produce exactly batch x new_tokens tokens. Ours also
returns each token's log-prob and full-distribution entropy; generate returns ids only. Times are
medians of `--repeats` runs after one warm-up; our first call's extra time is the compile time.
Memory is XLA's own account of the compiled program (argument + output + temporary buffers).

The decode roofline: each decode step must read every weight and the KV cache written so far, and do its matmuls,
so at the memory bandwidth measured here (a jitted sum over a 1 GiB array, the best of five) and the matmul peak
(estimates.matmul_peak) a step takes at least max((weight bytes + mean KV-cache bytes) / bandwidth, step FLOPs /
peak). A step's measured time is (generate - prefill alone) / (new tokens - 1), greedy; the share reached is the
roofline's time over it. On a 2-core CPU a batch of 8 rows is already compute-bound: 8 x 896 x 151,936 x 2 FLOPs
of output projection take longer at ~100 GFLOP/s than reading its 545 MB at ~35 GB/s.

With --tunix-python (a python with google-tunix installed; see study/benchmarks/peer.py), each checkpoint also gets the
work of issue 18's table, at temperature 1 (plain sampling from the whole vocabulary, no stop token): this project,
transformers' generate (do_sample, top_k 0, top_p 1) and tunix's sampler (study/benchmarks/peer_tunix.py, run by that
python on the same checkpoint folder and prompts) generating the same number of tokens, and the prefill alone
(1 new token) for this project and tunix.
"""

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import model as M
import sampler
from engine import estimates, hf
from peer import peer_name, qwen2_layout, tunix_times, write_batch
from timing import timed

SHAPES = {
    # Qwen2.5-0.5B's widths and vocabulary, 4 of its 24 layers to fit CPU time
    "qwen2.5-0.5b-shaped (4 layers)": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=4,
                                           num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny (2 layers, vocab 512)": dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def memory_bandwidth(gib: int = 1, repeats: int = 5) -> float:
    """Bytes per second one jitted reduction reads from a `gib` GiB float32 array (the fastest of `repeats`)."""
    x = jnp.ones((gib * 2**28,), jnp.float32)
    total = jax.jit(jnp.sum)
    _, seconds = timed(lambda: total(x).block_until_ready(), repeats)
    return x.nbytes / seconds


def decode_roofline(config, params, batch, prompt_length, new_tokens, ours, bandwidth, peak):
    """Print a greedy decode step's time against the least its memory traffic (at `bandwidth`) and its matmuls (at
    `peak`) need."""
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    context = prompt_length + new_tokens / 2  # the mean position a step attends up to
    mean_cache = batch * context * 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4
    # 2 FLOPs a weight a row (estimates.training_flops' 6 N is forward and backward), attention's 4 L H Q a cached token
    c = config
    layer = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.hidden_size * c.intermediate_size
    flops = batch * (2 * (c.num_layers * layer + c.vocab_size * c.hidden_size)
                     + 4 * c.num_layers * c.num_heads * c.head_dim * context)
    _, whole = timed(lambda: ours(sampler.SamplingParams(temperature=0, max_new_tokens=new_tokens)), 3)
    _, prefill = timed(lambda: ours(sampler.SamplingParams(temperature=0, max_new_tokens=1)), 3)
    step = (whole - prefill) / (new_tokens - 1)
    reading, computing = (weights + mean_cache) / bandwidth, flops / peak
    print(f"  decode roofline      {max(reading, computing) * 1e3:8.2f} ms a step: reading "
          f"{(weights + mean_cache) / 2**20:.0f} MiB of weights and KV cache {reading * 1e3:.2f} ms, "
          f"{flops / 1e9:.2f} GFLOPs {computing * 1e3:.2f} ms")
    print(f"  decode measured      {step * 1e3:8.2f} ms a step: {max(reading, computing) / step:.0%} of the roofline "
          f"({reading / step:.0%} of the bandwidth's)")


def generation(name, shape, batch, prompt_length, new_tokens, repeats, tunix_python=None, bandwidth=None, peak=None,
               model=None):
    """One checkpoint's rows: random weights of `shape`, or `model`'s own (a folder, Hub id, GGUF or short name; tunix
    gets them in Qwen2's layout, peer.qwen2_layout)."""
    torch.manual_seed(0)
    folder = tempfile.TemporaryDirectory()
    if model is None:
        reference = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape)).eval()
        reference.save_pretrained(folder.name)
        config, params = hf.load_checkpoint(folder.name)
    else:
        source = hf.resolve_checkpoint(model)
        reference = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
        config, params = hf.load_checkpoint(source)
        hf.save_checkpoint(folder.name, *qwen2_layout(config, params))
    prompts = np.random.default_rng(0).integers(0, config.vocab_size, size=(batch, prompt_length)).tolist()
    greedy = sampler.SamplingParams(temperature=0, max_new_tokens=new_tokens)

    def ours(sampling=greedy):
        jax.block_until_ready(sampler.generate(params, config, prompts, jax.random.key(0), sampling, stop_token_ids=()).tokens)

    input_ids = torch.tensor(prompts)

    def theirs(sample=False):
        sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
        with torch.no_grad():
            reference.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **sampling,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)

    first, ours_s = timed(ours, repeats)
    _, theirs_s = timed(theirs, repeats)
    tokens = batch * new_tokens
    print(f"{name}: {M.count_params(params) / 1e6:.2f}M parameters, batch {batch} x {prompt_length}-token prompts x {new_tokens} new tokens")
    print(f"  jax (this project)   {tokens / ours_s:8.1f} tokens/s  ({ours_s:.2f} s; compile {first - ours_s:.1f} s)")
    print(f"  transformers+torch   {tokens / theirs_s:8.1f} tokens/s  ({theirs_s:.2f} s)")
    print(f"  ratio jax / torch    {theirs_s / ours_s:8.2f}x")
    decode_roofline(config, params, batch, prompt_length, new_tokens, ours, bandwidth, peak)
    if tunix_python:
        with folder:
            side_by_side(folder.name, prompts, ours, theirs, tokens, new_tokens, repeats, tunix_python)
    else:
        folder.cleanup()


def side_by_side(checkpoint, prompts, ours, theirs, tokens, new_tokens, repeats, tunix_python):
    """Issue 18's rows: temperature 1 for this project, transformers and tunix; the prefill alone for us and tunix."""
    sampling = sampler.SamplingParams(temperature=1.0, max_new_tokens=new_tokens)
    prefill = sampler.SamplingParams(temperature=1.0, max_new_tokens=1)
    _, ours_s = timed(lambda: ours(sampling), repeats)
    _, ours_prefill_s = timed(lambda: ours(prefill), repeats)
    _, theirs_s = timed(lambda: theirs(sample=True), repeats)
    batch_npz = write_batch(Path(checkpoint) / "prompts.npz", prompts=np.asarray(prompts, np.int32))
    peer = tunix_times(tunix_python, checkpoint, batch_npz, "--generate", new_tokens, "--prefill", repeats=repeats)
    name, peer_s, peer_prefill_s = peer_name(peer), peer["generate"]["seconds"], peer["prefill"]["seconds"]
    print(f"  temperature 1, medians of {repeats}:")
    print(f"    jax (this project)   {tokens / ours_s:8.1f} tokens/s  ({ours_s:.2f} s)")
    print(f"    transformers+torch   {tokens / theirs_s:8.1f} tokens/s  ({theirs_s:.2f} s)")
    print(f"    {name:20} {tokens / peer_s:8.1f} tokens/s  ({peer_s:.2f} s; "
          f"first call {peer['generate']['first']:.1f} s)")
    print(f"    ratio jax / tunix    {peer_s / ours_s:8.2f}x speed (>1: this project is faster)")
    print(f"    prefill only (1 new token): jax {ours_prefill_s:.3f} s, tunix {peer_prefill_s:.3f} s, "
          f"ratio {peer_prefill_s / ours_prefill_s:.2f}x")


def logprob_memory(batch, length, chunk_size):
    """From the final hidden states to each target token's log-prob: the vocabulary part alone."""
    shape = SHAPES["qwen2.5-0.5b-shaped (4 layers)"]
    vocab, width = shape["vocab_size"], shape["hidden_size"]
    config = M.Config(model_type="qwen2", vocab_size=vocab, hidden_size=width, intermediate_size=1, num_layers=0,
                      num_heads=14, num_kv_heads=2, head_dim=64, tie_word_embeddings=True)
    params = {"embed": {"embedding": jax.ShapeDtypeStruct((vocab, width), jnp.float32)}}
    hidden = jax.ShapeDtypeStruct((batch, length, width), jnp.float32)
    targets = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def chunked(p, h, t):
        return M.logprobs_from_hidden(p, config, h, t, chunk_size=chunk_size)[0]

    def naive(p, h, t):
        log_probs = jax.nn.log_softmax(M.unembed(p, config, h), axis=-1)
        return jnp.take_along_axis(log_probs, t[..., None], -1)[..., 0]

    def peak(fn):
        stats = jax.jit(fn).lower(params, hidden, targets).compile().memory_analysis()
        total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
        return f"{total / 2**30:5.2f} GiB (temporaries {stats.temp_size_in_bytes / 2**30:4.2f})"

    gradient = lambda fn: jax.grad(lambda p, h, t: fn(p, h, t).sum(), argnums=(0, 1))
    print(f"log-probs of {batch} x {length} tokens from hidden states, vocab {vocab} x {width} "
          "(XLA's compiled buffers: arguments + outputs + temporaries)")
    print(f"  forward:            naive {peak(naive)}   chunked ({chunk_size}) {peak(chunked)}")
    print(f"  forward + backward: naive {peak(gradient(naive))}   chunked ({chunk_size}) {peak(gradient(chunked))}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tunix-python", help="a python with google-tunix installed: add issue 18's temperature-1 "
                        "rows with tunix's sampler (study/benchmarks/peer_tunix.py) on the same checkpoint and prompts")
    parser.add_argument("--model", action="append", default=[], help="also a real checkpoint (folder, Hub id, GGUF or "
                        "short name such as smollm2-135m-instruct), on its own weights; may be repeated")
    parser.add_argument("--no-random", action="store_true", help="only the --model rows")
    args = parser.parse_args()
    bandwidth, peak = memory_bandwidth(), estimates.matmul_peak("float32")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; measured: memory bandwidth {bandwidth / 1e9:.1f} GB/s, matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s; load average {open('/proc/loadavg').read().split()[0]}")
    for name, shape in SHAPES.items() if not args.no_random else ():
        generation(name, shape, args.batch, args.prompt_length, args.new_tokens, args.repeats, args.tunix_python,
                   bandwidth, peak)
    for model in args.model:
        generation(f"{model} (its weights)", None, args.batch, args.prompt_length, args.new_tokens, args.repeats,
                   args.tunix_python, bandwidth, peak, model=model)
    if not args.no_random:
        logprob_memory(batch=4, length=1024, chunk_size=128)
    print(f"load average {open('/proc/loadavg').read().split()[0]} at the end")
