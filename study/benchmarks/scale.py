"""Sampling and update speed, MFU and peak memory at ALFWorld's lengths, on whatever backend JAX finds (issue 18,
item 4): Qwen2.5-0.5B- and Qwen2.5-1.5B-shaped checkpoints with random weights, in bfloat16 and float32.

    python study/benchmarks/scale.py --json $OUT/scale.json      # the real shapes: ~6-7 minutes on one H100 (below)
    python study/benchmarks/scale.py --small                     # tiny stand-ins: ~35 s on 2 CPU cores

Each configuration (model x dtype) runs in its own process, this script started again with --one, so the peak
memory it reports is its own (logs.memory_gib: the accelerator's peak_bytes_in_use, or VmHWM on a CPU). It measures,
through the code train.py runs:

  sampling  sampler.generate on --sample-rows distinct random prompts of 2,048 tokens (ALFWorld's groups of 8
            rollouts x 2 tasks, every turn's prompt its own: no prompt is shared), 512 new tokens at temperature 1,
            no stop token, the parameters cast to the dtype (the KV cache follows them); its prefill alone (the
            same compiled program); decode = whole - prefill; tokens/s = rows x 512 / whole.
  update    one PaW update as train.py's policy stage runs it (paw.paw_objective, sharding.sized_update with
            estimates.default_update_tokens' budget, clipped AdamW), on 128 turns [h_t ; a_t ; o_{t+1}] of 1,984 +
            512 + 64 = 2,560 tokens, padded to a power of two as grpo.turn_batch pads them (4,096: every micro-batch
            is cut to it), every row selected for the world-model loss, lambda 1, random advantages and old
            log-probs. The KL to a reference is on (beta 0.01, the papers' recipe), so the reference's log-probs are
            computed first in the update's micro-batches (microbatch.LengthSortedUpdate.map_rows, as train.py does) and timed
            apart. bfloat16 means float32 parameters with compute_dtype bfloat16 (train.py's --compute-dtype); the
            reference pass, like train.py's, follows the parameters (float32). MFU = estimates.training_flops of the batch /
            the update's seconds / (estimates.matmul_peak(dtype) x devices), as train.py logs it. The memory held is
            the update's: the training state and the reference. train.py holds two more float32 copies of the
            parameters meanwhile (main's loaded ones, run_stages' placed ones; the row's parameter_gib each).

Warm-up calls (compilation) are timed apart from the measured ones (--repeats, median; default 1). The update's
warm-up is an update on the rows of its first two micro-batches: the same compiled programs as the whole batch's,
without paying for a whole update twice. The processes share one compilation cache, so a model's second dtype
reuses the programs its first compiled (the float32 reference pass, the optimizer's step).

A configuration that fails (out of memory, say) prints its error and the next one runs. Rows are printed as each is
measured, and --json, rewritten after each, holds every row. --budget-s (default 7 minutes) guards the wall time: a
configuration that the time left would not cover (judged by the ones before it) is skipped, saying so, and one still
running at the budget is stopped, keeping the rows it printed and naming the step it was in. The configurations run
in the order of --configs, the likeliest to fit first.

Time on one H100 (989 TFLOP/s dense bfloat16, ~495 TF32, 3.35 TB/s), an estimate: per configuration ~10 s to start a
process and measure the matmul peak; compiling the sampler's prefill and decode loop and the update's gradient,
reference pass and optimizer step ~40-70 s (2.6-4 s, 2.2-3.5 s, 9-11 s, 2-4 s on 2 CPU cores; taken as 2-3x that
on a GPU); sampling ~3-5 s (a decode step reads 1.5 GB of bfloat16 weights and KV cache for the 0.5B, 4.3 GB for
the 1.5B, ~0.5-1.3 ms at full bandwidth, ~2-3 ms with the loop's kernel launches, two calls of 512 steps); the
update of 128 x 4,096 padded tokens, 980 (0.5B) and 3,110 (1.5B) TFLOP of model FLOPs, 1,740 and 5,330 executed
with the padding: ~5 and ~13 s in bfloat16, ~10-15 and ~30 s in float32 (TF32 and the blockwise attention's small
kernels), plus the float32 reference pass ~3 and ~7 s. Altogether ~80, ~75, ~110 and ~115 s: ~6.5 minutes, within
the budget unless compilation is slower than assumed, when the last configuration (1.5B float32, also the one least
likely to fit in 80 GB) is the one stopped.
"""

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's modules, whatever PYTHONPATH says

import jax  # noqa: E402 (importing jax starts no backend: the parent never holds the accelerator)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import grpo  # noqa: E402
import model as lm  # noqa: E402
import paw  # noqa: E402
import sampler  # noqa: E402
from engine import estimates, microbatch, sharding  # noqa: E402
from timing import timed  # noqa: E402

MODELS = {  # Qwen2.5-0.5B and Qwen2.5-1.5B's config.json (both tie their embeddings)
    "0.5b": lm.Config(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                      num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1e6, qkv_bias=True,
                      tie_word_embeddings=True),
    "1.5b": lm.Config(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                      num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=1e6, qkv_bias=True,
                      tie_word_embeddings=True),
}
SMALL_MODELS = {  # two layers each, for a CPU; the same head layout (grouped queries, 2 KV heads)
    "0.5b": lm.Config(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e6, qkv_bias=True,
                      tie_word_embeddings=True),
    "1.5b": lm.Config(model_type="qwen2", vocab_size=512, hidden_size=96, intermediate_size=256, num_layers=2,
                      num_heads=6, num_kv_heads=2, head_dim=16, rope_theta=1e6, qkv_bias=True,
                      tie_word_embeddings=True),
}
CONFIGS = ["0.5b:bfloat16", "0.5b:float32", "1.5b:bfloat16", "1.5b:float32"]  # the likeliest to fit first
BETA = 0.01  # the papers' KL coefficient: the update needs the reference's log-probs


@dataclasses.dataclass(frozen=True)
class Workload:
    """Token counts of one configuration's measurements."""

    prompt: int = 2048
    """tokens in each sampled prompt"""
    response: int = 512
    """new tokens per sampled row; the action tokens of each update row"""
    sample_rows: int = 16
    """rows sampled together"""
    update_rows: int = 128
    """turns in the update"""
    history: int = 1984
    """prompt tokens h_t of each update row"""
    observation: int = 64
    """next-observation tokens o_{t+1} of each update row"""
    repeats: int = 1
    """measured calls after the warm-up (the median is reported)"""

    @property
    def row_tokens(self) -> int:
        return self.history + self.response + self.observation


SMALL = Workload(prompt=64, response=16, sample_rows=4, update_rows=8, history=72, observation=8)


# --------------------------------------------------------------------------------------------
# One configuration, in its own process
# --------------------------------------------------------------------------------------------


def emit(record: dict) -> None:
    """One line for the parent, at once: a row, the device, or {"progress": what starts now}, which the parent names
    if the configuration fails or is stopped there."""
    print("@scale " + json.dumps(record), flush=True)


@functools.cache
def initializer(config: lm.Config):
    """lm.init_params (float32, as train.py loads a checkpoint) as one compiled program: faster than Flax's op by op
    initialisation (3.2 s -> 1.7 s for a --small model on a CPU), the same values."""
    return jax.jit(functools.partial(lm.init_params, config))


def measure_sampling(config: lm.Config, dtype: str, work: Workload) -> dict:
    """The time of sampler.generate, of its prefill alone, and new tokens/s.

    The prefill is timed as generate runs it (its jitted sampler._prefill on the prompts left padded to their bucket,
    into a fresh cache as long as the whole call's), not as a call of generate with max_new_tokens 1: that would
    compile a second prefill (a shorter cache) and a second decode loop, ~10 s a configuration on a CPU."""
    params = jax.tree.map(lambda x: x.astype(dtype), initializer(config)(jax.random.key(0)))
    prompts = np.random.default_rng(1).integers(0, config.vocab_size, (work.sample_rows, work.prompt)).tolist()
    sampling = sampler.SamplingParams(temperature=1.0, max_new_tokens=work.response)
    completions = []

    def generate():
        completions.append(jax.block_until_ready(sampler.generate(params, config, prompts, jax.random.key(0), sampling,
                                                                  stop_token_ids=())))

    def prefill():  # generate's first step: every prompt distinct, so every row prefilled
        tokens, mask = lm.left_pad(prompts, lm.bucket_length(work.prompt), 0)
        cache = lm.init_cache(config, len(prompts), tokens.shape[1] + work.response, jnp.dtype(dtype))
        jax.block_until_ready(sampler._prefill(params, config, jnp.asarray(tokens), jnp.asarray(mask), cache))

    emit({"progress": "sampling: generate (compiling first)"})
    whole_first, whole = timed(generate, work.repeats)
    emit({"progress": "sampling: the prefill alone"})
    _, prefill_seconds = timed(prefill, work.repeats)  # generate compiled it
    tokens = int(completions[-1].mask.sum())  # every row runs to max_new_tokens: no stop token
    return {"rows": work.sample_rows, "prompt_tokens": work.prompt, "new_tokens": tokens,
            "prefill_s": prefill_seconds, "whole_s": whole, "decode_s": whole - prefill_seconds,
            "tokens_per_s": tokens / whole, "compile_s": whole_first - whole,
            "peak_memory_gib": estimates.memory_gib()["peak_memory_gib"]}


def paw_rows(config: lm.Config, work: Workload) -> grpo.Batch:
    """work.update_rows turns [h_t ; a_t ; o_{t+1}] of random tokens, right padded to the power of two
    rollout.turn_rows pads a batch to; every row selected (eq. 24), lambda 1 (eq. 28)."""
    rows, history, action_end = work.update_rows, work.history, work.history + work.response
    width = lm.bucket_length(work.row_tokens)
    rng = np.random.default_rng(0)
    token_mask = np.zeros((rows, width), bool)
    token_mask[:, :work.row_tokens] = True
    tokens = np.where(token_mask, rng.integers(0, config.vocab_size, (rows, width)), 0).astype(np.int32)
    action_mask = np.zeros((rows, width), np.float32)
    action_mask[:, history:action_end] = 1.0
    observation_mask = np.zeros((rows, width), np.float32)
    observation_mask[:, action_end:work.row_tokens] = 1.0
    old_logprobs = (-rng.uniform(0.0, 5.0, (rows, width)) * action_mask).astype(np.float32)
    advantages = (rng.normal(size=(rows, 1)) * action_mask).astype(np.float32)
    return grpo.Batch(tokens, token_mask, action_mask, observation_mask, old_logprobs, np.zeros_like(old_logprobs),
                      advantages, np.ones(rows, np.float32), np.ones(rows, np.float32))


def measure_update(config: lm.Config, dtype: str, work: Workload) -> dict:
    """One PaW update as train.py's policy stage runs it, its reference pass apart; MFU as train.py logs it."""
    mesh = sharding.make_mesh()
    params = initializer(config)(jax.random.key(0))
    # as train.py's main sizes it: with the loaded parameters in memory, before the training state exists
    parameters = lm.count_params(params)
    budget, why = estimates.default_update_tokens(config, parameters, BETA > 0, mesh.size, grpo.StepConfig.chunk_size)
    optimizer = grpo.make_optimizer(1e-6, 0.01, 1.0)  # the papers' rate, train.py's weight decay and clipping
    state = sharding.place(grpo.init_state(params, optimizer), mesh)
    reference = sharding.place(params, mesh)
    del params  # the update holds the state and the reference; train.py holds two more copies (see the docstring)
    step = grpo.StepConfig(grpo.LossConfig(beta=BETA, max_length=work.response), temperature=1.0,
                           compute_dtype=None if dtype == "float32" else dtype)
    update = sharding.sized_update(paw.paw_objective(config, step, paw.PaWConfig()), optimizer, state, mesh, budget,
                                   config)
    # train.py's reference log-probs: the policy's tokens at the sampling temperature, in the parameters' dtype
    reference_fn = jax.jit(lambda params, tokens, mask, positions: lm.token_logprobs(
        params, config, tokens, mask, 1.0, positions=positions)[0])

    def reference_logprobs(batch):
        return update.map_rows(functools.partial(reference_fn, reference), batch.tokens, batch.token_mask,
                               batch.action_mask)

    def timed_update(state, batch):  # as train.py times an update: the metrics read back as floats end it
        start = time.perf_counter()
        state, metrics = update(state, batch)
        metrics = {name: float(value) for name, value in metrics.items()}
        return state, metrics, time.perf_counter() - start

    batch = paw_rows(config, work)
    plans = microbatch.plan_micro_batches(microbatch.row_lengths(batch.token_mask), batch.tokens.shape[1], budget, mesh.size)
    warm = np.concatenate([indices for indices, _ in plans[:2]])  # the first two micro-batches: every program
    warm_batch = jax.tree.map(lambda x: x[warm], batch)
    emit({"progress": f"update: warm-up (compiling) on {len(warm)} row(s), {budget:,} tokens a micro-batch"})
    start = time.perf_counter()
    warm_batch = warm_batch._replace(ref_logprobs=reference_logprobs(warm_batch))
    state, _, _ = timed_update(state, warm_batch)
    jax.block_until_ready(update.totals(batch))  # compiled for the whole batch's shape too
    warm_up = time.perf_counter() - start
    reference_times, update_times = [], []
    for _ in range(work.repeats):
        emit({"progress": f"update: the reference pass over {len(batch.tokens)} row(s)"})
        start = time.perf_counter()
        batch = batch._replace(ref_logprobs=reference_logprobs(batch))
        reference_times.append(time.perf_counter() - start)
        emit({"progress": f"update: the update of {len(batch.tokens)} row(s)"})
        state, metrics, seconds = timed_update(state, batch)
        update_times.append(seconds)
    seconds = statistics.median(update_times)
    memory = estimates.memory_gib()["peak_memory_gib"]
    peak = estimates.matmul_peak(dtype) * mesh.size  # measured before the phases: cached
    shapes = sorted({(len(indices), width) for indices, width in plans}, reverse=True)
    return {"rows": work.update_rows, "row_tokens": work.row_tokens, "width": int(batch.tokens.shape[1]),
            "history_tokens": work.history, "action_tokens": work.response, "observation_tokens": work.observation,
            "token_budget": budget, "token_budget_why": why, "micro_batches": len(plans),
            "micro_batch_shapes": [list(shape) for shape in shapes], "warm_up_s": warm_up,
            "reference_s": statistics.median(reference_times), "update_s": seconds,
            "model_flops": metrics["model_flops"], "matmul_peak": peak, "mfu": metrics["model_flops"] / seconds / peak,
            "loss": metrics["loss"], "skipped": metrics["skipped"], "parameter_gib": 4 * parameters / 2**30,
            "peak_memory_gib": memory}


def device_info(dtypes) -> dict:
    device = jax.devices()[0]
    available, source = estimates.memory_available()
    return {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": device.device_kind,
            "devices": jax.device_count(), "matmul_peak": {dtype: estimates.matmul_peak(dtype) for dtype in dtypes},
            "memory_available_gib": available / 2**30, "memory_source": source}


def run_one(model: str, dtype: str, work: Workload, small: bool, phases: list[str], header: bool) -> None:
    """Measure one configuration, emitting a line per phase (or its error) as soon as it is done."""
    config = (SMALL_MODELS if small else MODELS)[model]
    # the matmul peak (MFU's denominator) first, on an idle device
    device = device_info(["bfloat16", "float32"] if header else [dtype])
    if header:
        emit({"device": device})
    parameters = lm.count_params(jax.eval_shape(initializer(config), jax.random.key(0)))
    common = {"model": model, "dtype": dtype, "parameters": parameters, "config": dataclasses.asdict(config)}
    for phase in phases:
        measure = {"sampling": measure_sampling, "update": measure_update}[phase]
        try:
            emit({**common, "phase": phase, **measure(config, dtype, work)})
        except Exception as error:  # e.g. out of memory: the parent reports it and carries on
            traceback.print_exc()
            emit({**common, "phase": phase, "error": f"{type(error).__name__}: {str(error).strip()[:400]}",
                  "peak_memory_gib": estimates.memory_gib()["peak_memory_gib"]})


# --------------------------------------------------------------------------------------------
# The parent: every configuration in turn, within the budget
# --------------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def describe(row: dict) -> str:
    """One printed line per measured row."""
    name = f"{row['model']:>4} {row['dtype']:<8} {row['phase']:<8}"
    if "error" in row:
        return f"{name} FAILED: {row['error']}"
    if row["phase"] == "sampling":
        return (f"{name} {row['rows']} x {row['prompt_tokens']:,} + {row['new_tokens'] // row['rows']} tokens: "
                f"prefill {duration(row['prefill_s'])}, decode {duration(row['decode_s'])}, "
                f"{row['tokens_per_s']:,.0f} new tokens/s; compile {row['compile_s']:.1f} s; "
                f"peak {row['peak_memory_gib']:.2f} GiB")
    shapes = ", ".join(f"{rows} x {width:,}" for rows, width in row["micro_batch_shapes"])
    return (f"{name} {row['rows']} x {row['row_tokens']:,} tokens (width {row['width']:,}) in {row['micro_batches']} "
            f"micro-batch(es) of {shapes}: update {duration(row['update_s'])}, reference "
            f"{duration(row['reference_s'])}, {row['model_flops'] / 1e12:.3g} TFLOP, MFU {row['mfu']:.1%}; "
            f"warm-up {row['warm_up_s']:.1f} s; peak {row['peak_memory_gib']:.2f} GiB")


def run_configuration(argv: list[str], timeout: float, environment: dict) -> tuple[list[dict], str | None]:
    """Run one --one child, printing its rows as they come: (its rows, and None if it ended well, else why not: the
    stop at the timeout or its exit status, with where it was and its stderr's last lines)."""
    rows, progress = [], "starting"
    with tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, stderr=stderr, text=True,
                                 cwd=ROOT, env=environment)
        stopped = threading.Event()

        def stop():
            stopped.set()
            child.kill()

        timer = threading.Timer(max(timeout, 1.0), stop)
        timer.start()
        try:
            for line in child.stdout:
                if not line.startswith("@scale ") or not line.endswith("\n"):  # not a row, or cut short by the stop
                    continue
                record = json.loads(line[len("@scale "):])
                if "progress" in record:
                    progress = record["progress"]
                    continue
                rows.append(record)
                if "device" in record:
                    print_device(record["device"])
                else:
                    print(describe(record), flush=True)
        finally:  # whatever went wrong here, no child is left running beside the next one
            if child.poll() is None and not stopped.is_set():
                child.kill()
            status = child.wait()
            timer.cancel()
        stderr.seek(0)
        tail = " | ".join(stderr.read().strip().splitlines()[-3:])[-600:]
    if stopped.is_set():
        return rows, f"stopped at --budget-s during {progress}"
    return rows, None if status == 0 else f"exit status {status} during {progress}: {tail}"


def print_device(device: dict) -> None:
    peaks = ", ".join(f"{dtype} {flops / 1e12:.3g} TFLOP/s" for dtype, flops in device["matmul_peak"].items())
    print(f"{device['backend']}: {device['devices']} x {device['device_kind']}; matmul peak a device "
          f"(estimates.matmul_peak) {peaks}; {device['memory_available_gib']:.1f} GiB of {device['memory_source']} "
          "free", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny stand-in models and lengths, for a CPU")
    parser.add_argument("--json", type=Path, help="write every row here (rewritten after each)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock seconds for the whole run")
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS, help="model:dtype, in this order")
    parser.add_argument("--phases", nargs="+", default=["sampling", "update"], choices=["sampling", "update"])
    parser.add_argument("--sample-rows", type=int, help="rows sampled together (default 16; --small 4)")
    parser.add_argument("--update-rows", type=int, help="turns in the update (default 128; --small 8)")
    parser.add_argument("--repeats", type=int, default=1, help="measured calls after each warm-up (median)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # model:dtype, measured in this process
    parser.add_argument("--header", action="store_true", help=argparse.SUPPRESS)  # --one also reports the device
    args = parser.parse_args()
    work = SMALL if args.small else Workload()
    work = dataclasses.replace(work, sample_rows=args.sample_rows or work.sample_rows,
                               update_rows=args.update_rows or work.update_rows, repeats=args.repeats)
    if args.one:
        run_one(*args.one.split(":"), work, args.small, args.phases, args.header)
        return

    started = time.monotonic()
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "n/a"
    print(f"scale: jax {jax.__version__}, python {sys.version.split()[0]}, load average {load}, budget "
          f"{args.budget_s:.0f} s; {'--small stand-ins' if args.small else 'Qwen2.5-0.5B / 1.5B shapes'}: sampling "
          f"{work.sample_rows} x {work.prompt:,} + {work.response} tokens, update {work.update_rows} x "
          f"({work.history:,} + {work.response} + {work.observation}) tokens, beta {BETA}", flush=True)
    result = {"workload": dataclasses.asdict(work), "small": args.small, "budget_s": args.budget_s, "load": load,
              "device": None, "rows": [], "skipped": []}

    def save():
        result["seconds"] = time.monotonic() - started
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")

    # one compilation cache for every configuration's process: a model's two dtypes share programs (the float32
    # reference pass, the optimizer's step), compiled once
    compilation_cache = tempfile.TemporaryDirectory(prefix="scale-jax-cache-")
    environment = {"JAX_COMPILATION_CACHE_DIR": compilation_cache.name, **os.environ}
    durations = {}  # model -> seconds its last configuration took
    for config in args.configs:
        model, dtype = config.split(":")
        elapsed = time.monotonic() - started
        estimate = durations.get(model, max(durations.values(), default=0.0))
        if elapsed + estimate > args.budget_s:
            print(f"{model:>4} {dtype:<8} skipped: {elapsed:.0f} s spent, and ~{estimate:.0f} s more (what the "
                  f"configurations before it took) would pass --budget-s {args.budget_s:.0f}", flush=True)
            result["skipped"].append(config)
            save()
            continue
        argv = ["--one", config, "--phases", *args.phases, "--repeats", str(work.repeats),
                "--sample-rows", str(work.sample_rows), "--update-rows", str(work.update_rows)]
        argv += ["--small"] * args.small + ["--header"] * (result["device"] is None)
        start = time.monotonic()
        try:
            records, failure = run_configuration(argv, args.budget_s - elapsed, environment)
        except Exception as error:  # a bug of this parent's: the configuration fails, the run goes on
            records, failure = [], f"{type(error).__name__}: {error}"
        durations[model] = time.monotonic() - start
        for record in records:
            if "device" in record:
                result["device"] = record["device"]
            else:
                result["rows"].append(record)
        reported = {record.get("phase") for record in records}
        for phase in args.phases:
            if phase not in reported:
                row = {"model": model, "dtype": dtype, "phase": phase, "error": failure or "not reported"}
                result["rows"].append(row)
                print(describe(row), flush=True)
        save()
    print(f"done in {time.monotonic() - started:.0f} s" + (f"; rows in {args.json}" if args.json else ""), flush=True)
    save()
    compilation_cache.cleanup()


if __name__ == "__main__":
    main()
