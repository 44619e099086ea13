"""--distributed for real: two processes on this machine, one CPU device each, joined over localhost with gloo
collectives, run GRPO through train.py and end where one process with the same two devices ends."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from engine import hf
from test_train import TINY_PRETRAIN  # the embedded default the other tests build: one cache for the session

ROOT = Path(__file__).resolve().parents[1]
# two updates of one task x 2 rollouts, a checkpoint after each (Orbax's multi-process save), a one-turn evaluation
# before and after (at the rollouts' temperature: the sampler compiled for training serves it); the token budget is
# fixed (its default comes from each process's free memory) and large enough for one micro-batch, so each update
# compiles once
ARGV = ["--method", "grpo", *TINY_PRETRAIN, "--iterations", "2", "--groups", "1", "--group-size", "2",
        "--eval.episodes", "1", "--eval.wm-transitions", "1", "--eval.max-turns", "1", "--eval.temperature", "1.0",
        "--eval.every", "100", "--checkpoint-every", "1", "--update-tokens", "4096", "--no-progress"]
# compiling is most of these runs' time: LLVM without optimisations halves it, the same in all three processes
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count="
TIMEOUT = 300  # seconds a run may take before it is killed (a process waiting on a dead peer would wait for minutes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(argv, cache, devices: int) -> subprocess.Popen:
    environment = {**os.environ, "RWML_JAX_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": f"{XLA_FLAGS}{devices}"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(processes: list[subprocess.Popen]) -> list[str]:
    """Every process's output once all have exited 0; on a failure or a timeout, all are killed."""
    try:
        outputs = [process.communicate(timeout=TIMEOUT)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-4000:]
    return outputs


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_the_parameters_of_one_process_on_the_same_devices(embedded_cache, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    cluster = ["--distributed", "--coordinator", f"localhost:{free_port()}", "--num-processes", "2"]
    # all three at once (pretrain.py's lock lets one of them build the embedded default if the cache lacks it)
    outputs = finish([start([*ARGV, "--out", str(one)], embedded_cache, devices=2),
                      *[start([*ARGV, "--out", str(two), *cluster, "--process-id", str(i)], embedded_cache, devices=1)
                        for i in range(2)]])[1:]
    assert all("mesh {'data': 1, 'fsdp': 2} over 2 cpu device(s) in 2 process(es)" in o for o in outputs), outputs[0]
    # The same SPMD program on the same (data 1 x fsdp 2) mesh, its collectives over gloo instead of in process: a sum
    # of two shards is one addition either way, so nothing is reordered and the results agree exactly in practice;
    # 1e-6 leaves room for a collective that sums in another order, and is far below any one update's change
    _, alone = hf.load_checkpoint(one / "model")
    _, together = hf.load_checkpoint(two / "model")
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(together), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)
    measured = ("time", "train/seconds_update", "train/seconds_sampling", "train/seconds_env", "train/memory_gib",
                "train/peak_memory_gib", "train/mfu")  # this process's clock and memory, not the computation's
    expected, got = records(one), records(two)
    assert [(r["step"], r["stage"]) for r in got] == [(r["step"], r["stage"]) for r in expected]  # each line once
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([b[k] for k in a if k not in measured + ("stage",)],
                                   [a[k] for k in a if k not in measured + ("stage",)], rtol=1e-6, atol=1e-6)
    # one process wrote the files: one TensorBoard writer; every process saved its checkpoints' shards
    assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert json.loads((two / "args.json").read_text())["process_id"] == 0
