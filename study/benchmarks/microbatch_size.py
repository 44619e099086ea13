"""Time and peak memory of one GRPO update at several micro-batch sizes (--update-tokens), on a real checkpoint: where
a bigger micro-batch stops buying speed and only costs memory (estimates.busy_tokens' constant on a CPU).

    python study/benchmarks/microbatch_size.py       # SmolLM2-135M-Instruct, 256 to 2,048 tokens: ~30 min on 2 cores
    python study/benchmarks/microbatch_size.py --model Qwen/Qwen2.5-0.5B-Instruct --budgets 512 4096

The update is train.py's (microbatch.LengthSortedUpdate, a k3 KL term, token-mean, clipped AdamW) on `--rows` rows
of `--length` tokens, the last 64 the completion, random tokens (grpo_step.random_batch: old log-probs the model's
own). Each size runs in its own process, so its peak
resident memory (VmHWM) is its own; a micro-batch holds at least one row, so sizes below --length behave as --length.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def one_size(model: str, budget: int, rows: int, length: int, repeats: int) -> dict:
    import jax

    import grpo
    from engine import estimates, hf, microbatch
    from grpo_step import random_batch

    config, params = hf.load_checkpoint(hf.resolve_checkpoint(model))
    batch = random_batch(config, rows, length, 64, params)
    optimizer = grpo.make_optimizer(1e-6)
    objective = grpo.grpo_objective(config, grpo.StepConfig(loss=grpo.LossConfig(beta=0.01, kl_estimator="k3")))
    update = microbatch.LengthSortedUpdate(objective, optimizer, token_budget=budget)
    state = grpo.init_state(params, optimizer)
    before = estimates.memory_gib()["peak_memory_gib"]
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        state, metrics = update(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    return {"first": times[0], "seconds": min(times[1:]), "peak_gib": estimates.memory_gib()["peak_memory_gib"],
            "before_gib": before, "micro_batches": len(update.micro_batches(batch))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a checkpoint folder, Hub id or GGUF")
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="updates timed after the first (compiling) one")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: this size only
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_size(args.model, args.one, args.rows, args.length, args.repeats)))
        return
    print(f"one GRPO update of {args.model}: {args.rows} rows x {args.length} tokens; load average "
          f"{open('/proc/loadavg').read().split()[0]} at the start")
    print(f"{'tokens':>8} {'micro-batches':>14} {'update':>9} {'first':>9} {'peak RSS':>9}")
    for budget in args.budgets:
        child = subprocess.run([sys.executable, __file__, "--one", str(budget), "--model", args.model, "--rows",
                                str(args.rows), "--length", str(args.length), "--repeats", str(args.repeats)],
                               capture_output=True, text=True, check=True)
        r = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{budget:>8,} {r['micro_batches']:>14} {r['seconds']:>8.1f}s {r['first']:>8.1f}s {r['peak_gib']:>7.2f} GiB")
    print(f"load average {open('/proc/loadavg').read().split()[0]} at the end")


if __name__ == "__main__":
    main()
