"""Side by side with google-tunix: run study/benchmarks/peer_tunix.py in tunix's own python on files this project wrote.

study/benchmarks/generation.py and study/benchmarks/grpo_step.py take `--tunix-python PYTHON` (a virtual environment with
google-tunix installed, never a dependency of this project: `python -m venv /work/venv-tunix` then
`/work/venv-tunix/bin/pip install google-tunix==0.1.7`). They write the checkpoint (HF safetensors) and the batch
(.npz) to a temporary folder, time their own work, then call tunix_times() on the same files.
"""

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import numpy as np

PEER_SCRIPT = Path(__file__).with_name("peer_tunix.py")
MARKER = "PEER_JSON "


def write_batch(path, **arrays) -> Path:
    """The .npz peer_tunix.py reads: prompts [b, p] for generation; tokens, token_mask, loss_mask, old_logprobs,
    ref_logprobs, advantages [b, t] and prompt_length for a GRPO step."""
    np.savez(path, **{name: np.asarray(value) for name, value in arrays.items()})
    return Path(path)


def qwen2_layout(config, params):
    """(config, params) of the same network as a Qwen2 checkpoint, for peer_tunix.py (it runs tunix's Qwen2 only): a
    Llama without attention biases or RoPE scaling (SmolLM2's) is a Qwen2 whose q, k and v biases are zero."""
    if config.model_type == "qwen2":
        return config, params
    if config.model_type != "llama" or config.qkv_bias or config.o_bias or config.rope_type != "default":
        raise ValueError(f"no Qwen2 layout for {config.model_type} (qkv_bias {config.qkv_bias}, rope {config.rope_type})")
    layers = {}
    for name, layer in params.items():
        if name.startswith("layers_"):
            attn = {proj: dict(weights) for proj, weights in layer["attn"].items()}
            for proj, heads in (("q", config.num_heads), ("k", config.num_kv_heads), ("v", config.num_kv_heads)):
                attn[proj]["bias"] = np.zeros((heads, config.head_dim), np.float32)
            layers[name] = dict(layer, attn=attn)
    return dataclasses.replace(config, model_type="qwen2", qkv_bias=True), dict(params, **layers)


def tunix_times(python, checkpoint_dir, batch_npz, *options, repeats: int = 3, timeout: float = 3600) -> dict:
    """peer_tunix.py's timings (its JSON report as a dict) of the checkpoint and batch, run by `python`.

    options: peer_tunix.py's flags, e.g. "--generate", "64", "--prefill", "--grpo", "--beta", "0.04". The child gets
    this environment less PYTHONPATH, so that it imports tunix's jax and never this project's modules.
    """
    command = [str(python), str(PEER_SCRIPT), str(checkpoint_dir), str(batch_npz), *map(str, options),
               "--repeats", str(repeats)]
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    reports = [line[len(MARKER):] for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if done.returncode or not reports:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads(reports[-1])


def peer_name(report: dict) -> str:
    return f"google-tunix {report['version']}"
