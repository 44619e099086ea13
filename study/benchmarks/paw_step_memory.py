"""Peak memory and time of one PaW step on a Qwen2.5-0.5B-shaped model (24 layers, random weights) on ALFWorld-length
rows, at several lengths, with and without rematerialisation (and optionally bfloat16 compute).

    python study/benchmarks/paw_step_memory.py                 # 1,024 / 2,560 / 4,096 tokens, float32: ~15 min on 2 cores
    python study/benchmarks/paw_step_memory.py --lengths 2560 --settings float32 float32+remat bfloat16

A row of 2,560 tokens is 2,048 prompt tokens (h_t) and 512 response tokens: a 384-token action, then the 128-token
next observation that PaW's world-model loss reads (other lengths keep these shares). Each setting runs in its own
process, so its peak resident memory (ru_maxrss) is its own. Reported per setting: XLA's compiled temporaries (the
activations the backward pass keeps: what the blockwise attention keeps linear in length and remat trades for
compute), the process's peak resident memory (parameters, AdamW's moments and gradients included), compile time and
the time of one step after compiling.
"""

import argparse
import functools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {"float32": ("float32", False), "float32+remat": ("float32", True), "bfloat16": ("bfloat16", False),
            "bfloat16+remat": ("bfloat16", True)}


def one_setting(dtype: str, remat: bool, rows: int, length: int) -> dict:
    import jax
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import grpo
    import model as lm
    import paw

    config = lm.Config(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                       num_heads=14, num_kv_heads=2, head_dim=64, qkv_bias=True, tie_word_embeddings=True)
    action, observation = length * 3 // 20, length // 20  # 2560 tokens: 2048 prompt, 384 action, 128 observation
    prompt = length - action - observation
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (rows, length)).astype(np.int32)
    action_mask = np.zeros((rows, length), np.float32)
    action_mask[:, prompt:prompt + action] = 1
    observation_mask = np.zeros((rows, length), np.float32)
    observation_mask[:, prompt + action:] = 1
    old = (-rng.uniform(0, 5, (rows, length)) * action_mask).astype(np.float32)
    advantages = (rng.normal(size=(rows, 1)) * action_mask).astype(np.float32)
    batch = grpo.Batch(tokens, np.ones((rows, length), bool), action_mask, observation_mask, old, np.zeros_like(old),
                       advantages, np.full(rows, 0.5, np.float32), np.ones(rows, np.float32))
    optimizer = grpo.make_optimizer(1e-6)
    step = grpo.StepConfig(grpo.LossConfig(beta=0.0), remat=remat, compute_dtype=None if dtype == "float32" else dtype)
    state = grpo.init_state(lm.init_params(config, jax.random.key(0)), optimizer)
    # the state donated, as train.py's updates do: the new parameters and moments take the old ones' memory
    update = jax.jit(functools.partial(paw.paw_step, model_config=config, optimizer=optimizer, step=step),
                     donate_argnums=0)
    start = time.perf_counter()
    compiled = update.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    start = time.perf_counter()
    try:
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        step_seconds = time.perf_counter() - start
    except jax.errors.JaxRuntimeError as error:  # e.g. the temporaries do not fit in this machine's memory
        step_seconds, metrics = None, {"loss": float("nan"), "error": str(error).splitlines()[0][:120]}
    return {"dtype": dtype, "remat": remat, "rows": rows, "parameters": lm.count_params(state.params),
            "temp_gib": memory.temp_size_in_bytes / 2**30,
            "arguments_gib": memory.argument_size_in_bytes / 2**30,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "compile_s": compile_seconds, "step_s": step_seconds, "loss": float(metrics["loss"]),
            "error": metrics.get("error") if isinstance(metrics, dict) else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1, help="rows per step")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2560, 4096], help="tokens per row")
    parser.add_argument("--settings", nargs="+", default=["float32"], choices=list(SETTINGS))
    parser.add_argument("--one", nargs=3, metavar=("DTYPE", "REMAT", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_setting(args.one[0], args.one[1] == "1", args.rows, int(args.one[2]))))
        return
    print(f"PaW step, Qwen2.5-0.5B-shaped (24 layers), {args.rows} row(s) a step, one process per setting; "
          f"load {open('/proc/loadavg').read().split()[0]}")
    print("| tokens | compute | remat | XLA temporaries | peak resident | compile | step |")
    print("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        for setting in args.settings:
            dtype, remat = SETTINGS[setting]
            done = subprocess.run([sys.executable, __file__, "--rows", str(args.rows),
                                   "--one", dtype, str(int(remat)), str(length)], capture_output=True, text=True)
            if done.returncode:
                lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
                print(f"| {length:,} | {dtype} | {'yes' if remat else 'no'} | failed: {lines[-1][:160]} |", flush=True)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            step = f"{r['step_s']:.0f} s" if r["step_s"] is not None else f"did not run: {r['error']}"
            print(f"| {length:,} | {dtype} | {'yes' if remat else 'no'} | {r['temp_gib']:.2f} GiB | "
                  f"{r['peak_rss_gib']:.2f} GiB | {r['compile_s']:.0f} s | {step} |", flush=True)


if __name__ == "__main__":
    main()
