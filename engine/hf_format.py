"""The Hugging Face format of model.py's decoders: config.json as a `model.Config`, and each tensor's name and layout.

`config_from_hf` reads config.json in both layouts that exist (transformers 4.x: top-level rope_theta /
rope_scaling; 5.x: rope_parameters) and refuses, with a CheckpointError naming the fix, what model.py does not
implement; `config_to_hf` writes the 4.x layout that transformers and vLLM read.

Our weights are einsum-shaped ([hidden, heads, head_dim] for q, [heads, head_dim, hidden] for o), so
converting a Hugging Face tensor is a transpose plus a reshape: `weight_specs` spells out, for every tensor a
config implies, its Hugging Face name and shape, where it lives in our parameters, and the conversion both
ways. `engine/hf.py`'s `load_checkpoint` and `save_checkpoint` read and write through it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

import model as lm

# model_type in config.json -> the architecture name transformers writes beside it.
SUPPORTED_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",  # Qwen2, Qwen2.5
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",  # Llama 3.x
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def config_from_hf(hf: dict, where: str = "config.json") -> lm.Config:
    """A model.Config from a transformers config dict (either layout); unsupported features raise CheckpointError."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{where} holds a {type(hf).__name__}, not a JSON object. "
                              "Fix: use the config.json that save_pretrained wrote with the weights.")
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if model_type not in SUPPORTED_ARCHITECTURES:
        names = ", ".join(f"{arch} (model_type '{t}')" for t, arch in SUPPORTED_ARCHITECTURES.items())
        raise CheckpointError(
            f"{where} describes {'/'.join(architectures) or 'a model'} (model_type '{model_type}'), "
            f"which model.py does not implement. Supported: {names}. "
            "Fix: use a Qwen2/Qwen2.5, Qwen3 or Llama 3 checkpoint."
        )
    unsupported = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "use_sliding_window": bool(hf.get("use_sliding_window", False)),
        "mlp_bias": bool(hf.get("mlp_bias", False)),
    }
    for key, bad in unsupported.items():
        if bad:
            raise CheckpointError(
                f"{where} sets {key}={hf[key]!r}, which model.py does not implement. "
                "Fix: use a checkpoint with the standard setting (silu, no sliding window, no MLP bias)."
            )
    # transformers 5 writes rope_parameters (theta included); 4.x writes rope_theta + rope_scaling.
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise CheckpointError(
                f"{where} sets {key} to {hf[key]!r}, where transformers writes a JSON object (e.g. "
                '{"rope_type": "linear", "factor": 2.0}) or null. Fix: correct it, or use the config.json that '
                "save_pretrained wrote with the weights."
            )
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise CheckpointError(
            f"{where} asks for rope_type '{rope_type}'; model.py implements default, linear and llama3. "
            "Fix: remove the rope scaling from config.json if you do not need long contexts."
        )
    missing = [key for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if key not in hf]
    if missing:
        raise CheckpointError(
            f"{where} lacks {', '.join(missing)}, which the architecture needs. "
            "Fix: use the config.json that save_pretrained wrote with the weights (download it again if it was cut)."
        )
    sizes = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             *[key for key in ("num_key_value_heads", "head_dim") if hf.get(key) is not None]]
    for key in sizes:
        if isinstance(hf[key], bool) or not isinstance(hf[key], int) or hf[key] < 1:
            raise CheckpointError(
                f"{where} sets {key} to {hf[key]!r}; it must be a whole number of at least 1. "
                "Fix: use the config.json that save_pretrained wrote with the weights."
            )
    if hf.get("head_dim") is None and hf["hidden_size"] % hf["num_attention_heads"]:
        raise CheckpointError(
            f"{where} has no head_dim, and hidden_size {hf['hidden_size']} does not split into "
            f"num_attention_heads {hf['num_attention_heads']} heads. Fix: add the model's head_dim to config.json."
        )
    if hf["num_attention_heads"] % (hf.get("num_key_value_heads") or hf["num_attention_heads"]):
        raise CheckpointError(
            f"{where} has {hf['num_attention_heads']} attention heads, which do not share "
            f"{hf['num_key_value_heads']} key-value heads evenly (grouped-query attention needs a multiple). "
            "Fix: use the config.json that save_pretrained wrote with the weights."
        )
    try:
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        bias = bool(hf.get("attention_bias", False))
        num_heads = hf["num_attention_heads"]
        return lm.Config(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_positions=int(rope.get("original_max_position_embeddings", 8192)),
            qkv_bias=bias or model_type == "qwen2",  # Qwen2 always has q/k/v bias, never o bias
            o_bias=bias and model_type != "qwen2",
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
        )
    except (TypeError, ValueError) as error:  # a value of the wrong kind, e.g. rope_theta "fast"
        raise CheckpointError(f"{where} holds a value model.py cannot read ({type(error).__name__}: {error}). "
                              "Fix: use the config.json that save_pretrained wrote with the weights.") from error


def config_to_hf(config: lm.Config, dtype: str = "float32") -> dict:
    """The config.json transformers and vLLM read: the 4.x layout that Hub checkpoints carry."""
    rope_scaling = None
    if config.rope_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": config.rope_factor}
    elif config.rope_type == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": config.rope_factor,
            "low_freq_factor": config.rope_low_freq_factor,
            "high_freq_factor": config.rope_high_freq_factor,
            "original_max_position_embeddings": config.rope_original_max_positions,
        }
    hf = {
        "architectures": [SUPPORTED_ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids[0] if len(config.eos_token_ids) == 1 else list(config.eos_token_ids) or None,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": dtype,
    }
    if config.model_type != "qwen2":
        hf["attention_bias"] = config.o_bias
    return hf


# --------------------------------------------------------------------------------------------
# The tensor name map
# --------------------------------------------------------------------------------------------


class WeightSpec(NamedTuple):
    """One stored tensor: its Hugging Face name and shape, where it lives in our params, the conversions."""

    hf_name: str
    path: tuple[str, ...]  # where it lives in our params
    hf_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray] | None = None  # None: read, never written (reward.py's BERT)


def weight_specs(config: lm.Config) -> list[WeightSpec]:
    """Every tensor the config implies, with the conversion both ways. HF Linear weights are [out, in]."""
    c = config
    hidden, ffn, head = c.hidden_size, c.intermediate_size, c.head_dim
    same = lambda w: w
    transpose = lambda w: w.T

    def heads_in(n):  # [n*head, hidden] -> [hidden, n, head]
        return lambda w: w.T.reshape(hidden, n, head), lambda w: w.reshape(hidden, n * head).T

    def heads_bias(n):  # [n*head] -> [n, head]
        return lambda b: b.reshape(n, head), lambda b: b.reshape(n * head)

    heads_out = (lambda w: w.T.reshape(c.num_heads, head, hidden), lambda w: w.reshape(c.num_heads * head, hidden).T)
    specs = [WeightSpec("model.embed_tokens.weight", ("embed", "embedding"), (c.vocab_size, hidden), same, same)]
    for i in range(c.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers_{i}"
        attention = [("q", c.num_heads), ("k", c.num_kv_heads), ("v", c.num_kv_heads)]
        for name, n in attention:
            specs.append(WeightSpec(f"{hf}self_attn.{name}_proj.weight", (ours, "attn", name, "kernel"), (n * head, hidden), *heads_in(n)))
            if c.qkv_bias:
                specs.append(WeightSpec(f"{hf}self_attn.{name}_proj.bias", (ours, "attn", name, "bias"), (n * head,), *heads_bias(n)))
        specs.append(WeightSpec(f"{hf}self_attn.o_proj.weight", (ours, "attn", "o", "kernel"), (hidden, c.num_heads * head), *heads_out))
        if c.o_bias:
            specs.append(WeightSpec(f"{hf}self_attn.o_proj.bias", (ours, "attn", "o", "bias"), (hidden,), same, same))
        if c.qk_norm:
            for name in ("q_norm", "k_norm"):
                specs.append(WeightSpec(f"{hf}self_attn.{name}.weight", (ours, "attn", name, "scale"), (head,), same, same))
        specs += [
            WeightSpec(f"{hf}mlp.gate_proj.weight", (ours, "mlp", "gate", "kernel"), (ffn, hidden), transpose, transpose),
            WeightSpec(f"{hf}mlp.up_proj.weight", (ours, "mlp", "up", "kernel"), (ffn, hidden), transpose, transpose),
            WeightSpec(f"{hf}mlp.down_proj.weight", (ours, "mlp", "down", "kernel"), (hidden, ffn), transpose, transpose),
            WeightSpec(f"{hf}input_layernorm.weight", (ours, "attn_norm", "scale"), (hidden,), same, same),
            WeightSpec(f"{hf}post_attention_layernorm.weight", (ours, "mlp_norm", "scale"), (hidden,), same, same),
        ]
    specs.append(WeightSpec("model.norm.weight", ("final_norm", "scale"), (hidden,), same, same))
    if not c.tie_word_embeddings:
        specs.append(WeightSpec("lm_head.weight", ("lm_head",), (c.vocab_size, hidden), transpose, transpose))
    return specs
