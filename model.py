"""The language model: a Flax decoder-only transformer that loads and saves Hugging Face checkpoints.

Every method in this project (RWML, PaW, SPA, plain GRPO) trains one of these. It covers the
papers' models: Qwen2 / Qwen2.5 (bias on q, k, v), Qwen3 (RMSNorm on q and k before RoPE, explicit
head_dim) and Llama 3.x (the "llama3" RoPE scaling); all are pre-norm decoders with grouped-query
attention, RMSNorm, SwiGLU and rotary position embeddings:

    x = embed(tokens)
    for each layer:  x = x + attention(rms_norm(x));  x = x + down(silu(gate(h)) * up(h)), h = rms_norm(x)
    logits = rms_norm(x) @ W_out                  (W_out = embed^T when the embeddings are tied)

Everything architectural is read from the checkpoint's config.json into a `Config`, and every tensor's
Hugging Face name, shape and layout is spelled out in `weight_specs`: both live in `hf_format.py`. Loading
and saving, with every shape checked, are here.

The attention itself (the plain reference, the blockwise FlashAttention form whose memory grows linearly
with the row's length, cuDNN's fused kernel) lives in `attention.py`.

Sampling lives in `sampler.py`; `token_logprobs` here recomputes, by teacher forcing, exactly the
log-probs and entropies the sampler returns.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attention import ATTENTION_BLOCK, attention
from hf_format import CheckpointError, Config, WeightSpec, weight_specs

Params = dict[str, Any]  # the Flax parameter pytree, variables["params"]


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class KVCache(NamedTuple):
    """Keys and values of every layer for a batch of sequences, written slot by slot.

    k, v:   one [batch, max_len, kv_heads, head_dim] array per layer
    mask:   [batch, max_len] bool, True where a slot holds a real (non-pad) token
    index:  int32 scalar, the next slot to write (all rows share it: prompts are left padded)
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    index: jax.Array


def init_cache(config: Config, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(zeros(), zeros(), jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


def rope_inverse_frequencies(config: Config) -> np.ndarray:
    """[head_dim // 2] float32 rotation speeds, with the checkpoint's scaling applied."""
    exponents = np.arange(0, config.head_dim, 2, dtype=np.float32) / np.float32(config.head_dim)
    inv_freq = (1.0 / np.float32(config.rope_theta) ** exponents).astype(np.float32)
    if config.rope_type == "linear":
        inv_freq = inv_freq / np.float32(config.rope_factor)
    elif config.rope_type == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones untouched, a smooth band between.
        factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        context = config.rope_original_max_positions
        wavelength = 2 * math.pi / inv_freq
        scaled = np.where(wavelength > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= context / high) & (wavelength <= context / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate x [batch, time, heads, head_dim] by position, in float32, halves layout (as transformers)."""
    angles = positions[:, :, None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [b, t, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    first, second = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-second, first], axis=-1) * sin


class RMSNorm(nn.Module):
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * normed.astype(x.dtype)


class Attention(nn.Module):
    config: Config
    dtype: Any = None
    param_dtype: Any = jnp.float32
    implementation: str = "auto"  # see `attention`
    block: int = ATTENTION_BLOCK

    @nn.compact
    def __call__(self, x, positions, kv_mask, layer_cache, cache_index):
        """x [b, t, hidden], at slots cache_index + [0, t); kv_mask [b, s] bool, the real key slots;
        layer_cache None (then s = t) or (k, v) [b, s, kv_heads, head_dim]."""
        c = self.config
        dense = functools.partial(nn.DenseGeneral, dtype=self.dtype, param_dtype=self.param_dtype)
        q = dense((c.num_heads, c.head_dim), use_bias=c.qkv_bias, name="q")(x)
        k = dense((c.num_kv_heads, c.head_dim), use_bias=c.qkv_bias, name="k")(x)
        v = dense((c.num_kv_heads, c.head_dim), use_bias=c.qkv_bias, name="v")(x)
        if c.qk_norm:  # Qwen3: per-head RMSNorm on q and k, before RoPE
            q = RMSNorm(c.rms_norm_eps, self.param_dtype, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, self.param_dtype, name="k_norm")(k)
        inv_freq = rope_inverse_frequencies(c)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if layer_cache is not None:
            cache_k, cache_v = layer_cache
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, cache_index, 0, 0))
            layer_cache = (k, v)
        batch, time = x.shape[:2]
        groups = c.num_heads // c.num_kv_heads  # query head h reads kv head h // groups
        q = q.reshape(batch, time, c.num_kv_heads, groups, c.head_dim)
        out = attention(q, k, v, kv_mask, cache_index, self.implementation, self.block)
        out = out.reshape(batch, time, c.num_heads, c.head_dim)
        return dense(c.hidden_size, axis=(-2, -1), use_bias=c.o_bias, name="o")(out), layer_cache


class MLP(nn.Module):
    config: Config
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = dense(self.config.intermediate_size, name="gate")(x)
        up = dense(self.config.intermediate_size, name="up")(x)
        return dense(self.config.hidden_size, name="down")(nn.silu(gate) * up)


class Block(nn.Module):
    config: Config
    dtype: Any = None
    param_dtype: Any = jnp.float32
    attention: str = "auto"
    attention_block: int = ATTENTION_BLOCK

    @nn.compact
    def __call__(self, x, positions, kv_mask, layer_cache, cache_index):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        normed = RMSNorm(c.rms_norm_eps, self.param_dtype, name="attn_norm")(x)
        attended, layer_cache = Attention(c, **kw, implementation=self.attention, block=self.attention_block, name="attn")(
            normed, positions, kv_mask, layer_cache, cache_index)
        x = x + attended
        x = x + MLP(c, **kw, name="mlp")(RMSNorm(c.rms_norm_eps, self.param_dtype, name="mlp_norm")(x))
        return x, layer_cache


class Transformer(nn.Module):
    """tokens -> final normed hidden states. `unembed` turns those into logits.

    dtype: the compute dtype (None: follow the parameters); remat: recompute each block in the
    backward pass instead of storing its activations; attention: "auto", "plain" or "blockwise" and its block size
    (`attention`).
    """

    config: Config
    dtype: Any = None
    param_dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"
    attention_block: int = ATTENTION_BLOCK

    @nn.compact
    def __call__(self, tokens, positions, token_mask, cache: KVCache | None = None):
        """tokens, positions [b, t] int; token_mask [b, t] bool. Returns (hidden [b, t, hidden], cache)."""
        c = self.config
        if not c.tie_word_embeddings:  # declared here so `init` creates it; read by `unembed`
            self.param("lm_head", nn.initializers.normal(0.02), (c.hidden_size, c.vocab_size), self.param_dtype)
        x = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="embed")(tokens)
        time = tokens.shape[1]
        if cache is None:  # causal attention over this call's real tokens
            kv_mask, index = token_mask, 0
        else:  # write this call's tokens at cache.index and attend to every earlier real slot
            index = cache.index
            kv_mask = jax.lax.dynamic_update_slice(cache.mask, token_mask, (0, index))
        block = nn.remat(Block) if self.remat else Block
        keys, values = [], []
        for layer in range(c.num_layers):
            layer_cache = None if cache is None else (cache.k[layer], cache.v[layer])
            x, layer_cache = block(c, self.dtype, self.param_dtype, self.attention, self.attention_block,
                                   name=f"layers_{layer}")(
                x, positions, kv_mask, layer_cache, index
            )
            if cache is not None:
                keys.append(layer_cache[0])
                values.append(layer_cache[1])
        x = RMSNorm(c.rms_norm_eps, self.param_dtype, name="final_norm")(x)
        if cache is not None:
            cache = KVCache(tuple(keys), tuple(values), kv_mask, index + time)
        return x, cache


def positions_from_mask(token_mask: jax.Array) -> jax.Array:
    """Positions count real tokens only (as transformers' generate does): left padding shifts nothing."""
    return jnp.maximum(jnp.cumsum(token_mask.astype(jnp.int32), axis=-1) - 1, 0)


def forward(params: Params, config: Config, tokens, token_mask, cache=None, positions=None, dtype=None, remat=False,
            attention: str = "auto", attention_block: int = ATTENTION_BLOCK):
    """Hidden states [b, t, hidden] (and the updated cache) for left- or right-padded tokens."""
    if positions is None:
        positions = positions_from_mask(token_mask)
    model = Transformer(config, dtype=dtype, remat=remat, attention=attention, attention_block=attention_block)
    return model.apply({"params": params}, tokens, positions, token_mask.astype(bool), cache)


def unembed(params: Params, config: Config, hidden: jax.Array) -> jax.Array:
    """Logits in float32 (accumulated in float32 whatever the parameter dtype).

    Tied models multiply by the [vocab, hidden] input embedding directly: no transposed copy of
    the largest matrix in the model.
    """
    if config.tie_word_embeddings:
        weight, spec = params["embed"]["embedding"], "...h,vh->...v"
    else:
        weight, spec = params["lm_head"], "...h,hv->...v"
    return jnp.einsum(spec, hidden, weight.astype(hidden.dtype), preferred_element_type=jnp.float32)


def logits(params: Params, config: Config, tokens, token_mask, attention: str = "auto") -> jax.Array:
    """Full logits [b, t, vocab] in float32. Fine for tests and small vocabularies; training uses token_logprobs."""
    hidden, _ = forward(params, config, tokens, token_mask, attention=attention)
    return unembed(params, config, hidden)


def token_logprobs(params: Params, config: Config, tokens, token_mask, temperature: float = 1.0, chunk_size: int = 256,
                   dtype=None, remat=False, attention: str = "auto", positions=None):
    """Teacher-forced log pi(tokens[t] | tokens[<t]) and the full-distribution entropy at t, both [b, t] float32: the
    log pi_theta of docs/methods.md eq. 5 and the H_t of eq. 6.

    Column 0 has no prediction and is 0. Logits are divided by `temperature`, as when sampling. positions: only these
    columns are scored (`scored_logprobs`), the others are 0.
    """
    hidden, _ = forward(params, config, tokens, token_mask, dtype=dtype, remat=remat, attention=attention)
    return scored_logprobs(params, config, hidden, tokens, temperature, chunk_size, positions)


def scored_logprobs(params: Params, config: Config, hidden, tokens, temperature: float = 1.0, chunk_size: int = 256,
                    positions=None):
    """token_logprobs from the forward pass's hidden states [b, t, hidden]: log-probs and entropies [b, t].

    positions [b, k] int: score only these columns of each row (each in 1..t-1; the value t pads a row that has fewer
    than k) and leave the others 0. The vocabulary projection, the largest matmul of a small model (Qwen2.5-0.5B's
    151,936 x 896 is 136M of its 494M parameters), then runs over the k columns a loss reads (a response's tokens)
    instead of all t: `scored_positions` finds them.
    """
    batch, time = tokens.shape
    if positions is None:
        logprobs, entropies = logprobs_from_hidden(params, config, hidden[:, :-1], tokens[:, 1:], temperature,
                                                   chunk_size)
        first = jnp.zeros((batch, 1), jnp.float32)
        return jnp.concatenate([first, logprobs], 1), jnp.concatenate([first, entropies], 1)
    rows, tokens = jnp.arange(batch)[:, None], jnp.asarray(tokens)
    # token t is predicted from the hidden state at t - 1; a padding position t reads column t - 1, and is dropped below
    chosen = logprobs_from_hidden(params, config, hidden[rows, positions - 1], tokens.at[rows, positions].get(
        mode="fill", fill_value=0), temperature, chunk_size)
    return tuple(jnp.zeros((batch, time), jnp.float32).at[rows, positions].set(x, mode="drop") for x in chosen)


def scored_positions(mask, minimum: int = 16) -> np.ndarray:
    """[rows, k] the columns where mask [rows, t] is nonzero, in order, each row padded with t (no column) to k: a
    power of two (at least `minimum`, at most t) that holds the fullest row, so jit sees a handful of shapes. Numpy,
    computed on the host from a batch's loss masks: the positions of `scored_logprobs`."""
    mask = np.asarray(mask) > 0
    width = mask.shape[1]
    k = min(bucket_length(int(mask.sum(1).max(initial=0)), minimum), width)
    columns = np.argsort(~mask, axis=1, kind="stable")[:, :k]  # a row's scored columns first, in order
    return np.where(np.take_along_axis(mask, columns, 1), columns, width).astype(np.int32)


def logprobs_from_hidden(params: Params, config: Config, hidden, targets, temperature: float = 1.0, chunk_size: int = 256):
    """log softmax(hidden @ W_out / temperature)[targets] and the entropy, both [b, t] float32.

    The vocabulary projection runs over `chunk_size` tokens at a time (the batch's rows and positions flattened)
    inside a rematerialised scan, so [tokens, vocab] float32 logits never exist at once, in the forward pass or the
    backward pass (151,936 x 4 bytes per token otherwise), and this memory does not grow with the batch. Larger
    chunks are faster (fewer, larger matmuls; on 2 CPU cores, Qwen2.5-0.5B's vocabulary: an update 20% faster with
    512 than with 256), and a single chunk is not recomputed.
    """
    batch, time = targets.shape
    tokens = batch * time
    chunk_size = min(chunk_size, tokens)  # fewer tokens than a chunk: one chunk of them, no padding
    steps = -(-tokens // chunk_size)
    padding = steps * chunk_size - tokens
    chunks = (
        jnp.pad(hidden.reshape(tokens, -1), ((0, padding), (0, 0))).reshape(steps, chunk_size, -1),
        jnp.pad(targets.reshape(tokens), (0, padding)).reshape(steps, chunk_size),
    )

    def chunk_logprobs(_, chunk):
        hidden_chunk, target_chunk = chunk
        log_probs = jax.nn.log_softmax(unembed(params, config, hidden_chunk) / temperature, axis=-1)
        chosen = jnp.take_along_axis(log_probs, target_chunk[..., None], axis=-1)[..., 0]
        entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
        return None, (chosen, entropy)

    # one chunk is the network's last step, whose backward pass comes first: nothing to save by recomputing it
    _, (chosen, entropy) = jax.lax.scan(chunk_logprobs if steps == 1 else jax.checkpoint(chunk_logprobs), None, chunks)
    unchunk = lambda x: x.reshape(-1)[:tokens].reshape(batch, time)
    return unchunk(chosen), unchunk(entropy)


def training_flops(config: Config, token_mask, scored) -> float:
    """Model FLOPs of a forward and backward pass (an update's gradient) over rows token_mask [rows, t] whose loss reads
    the tokens of the mask `scored`: nanoGPT's estimate (PaLM's appendix B), 6 N a token for the N weights of the
    matmuls it goes through and 12 L H Q T for its attention in a row of T tokens. The vocabulary projection's weights
    count for the scored tokens only, the only ones unembedded (scored_logprobs). Padding, and what remat or the
    chunked log-probs compute twice, are not model FLOPs: MFU leaves them out."""
    c = config
    lengths = np.asarray(token_mask).sum(1).astype(np.float64)
    layer = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.hidden_size * c.intermediate_size
    attention = 12 * c.num_layers * c.num_heads * c.head_dim
    unembedded = float((np.asarray(scored) > 0).sum())
    return float(6 * c.num_layers * layer * lengths.sum() + attention * (lengths**2).sum()
                 + 6 * c.vocab_size * c.hidden_size * unembedded)


def activation_bytes_per_token(config: Config, attention_block: int = ATTENTION_BLOCK) -> int:
    """A float32 upper estimate of the memory one token of a training row costs in an update's gradient: what the
    backward pass keeps of each layer (the MLP's [intermediate] activations dominate) and a row of attention scores
    (the plain attention's, kept up to one block; the blockwise attention's transient ones). XLA's memory analysis
    on CPU, Qwen2.5-0.5B's width: about 225 KiB a layer in rows of 512 tokens (plain attention) and 127 KiB in rows
    of 2,048 (blockwise); this estimate says 252."""
    c = config
    return 4 * c.num_layers * (10 * c.hidden_size + 7 * c.intermediate_size + 3 * c.num_heads * attention_block)


def init_params(config: Config, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters (normal 0.02, norms 1): for tiny models trained from scratch and tests."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = Transformer(config, param_dtype=dtype).init(key, tokens, tokens, tokens.astype(bool))
    return variables["params"]


def count_params(params: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------------------------
# Padding: many prompt lengths, few compiled shapes
# --------------------------------------------------------------------------------------------


def bucket_length(length: int, minimum: int = 16) -> int:
    """The next power of two (at least `minimum`): prompts of many lengths share a few compilations."""
    return max(minimum, 1 << max(0, length - 1).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [batch, length] right-aligned, and the mask of real tokens."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        if not 0 < len(prompt) <= length:
            raise ValueError(f"prompt {row} has {len(prompt)} tokens; it needs between 1 and {length}")
        tokens[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = True
    return tokens, mask


# --------------------------------------------------------------------------------------------
# Hugging Face checkpoints: loading and saving
# --------------------------------------------------------------------------------------------


def _looks_like_hub_id(name: str) -> bool:
    """An "org/name" or bare "name" (gpt2, bert-base-uncased: the Hub's oldest ids) that is not a path."""
    return re.fullmatch(r"([\w.-]+/)?[\w.-]+", name) is not None and not name.startswith((".", "/", "~"))


def resolve_checkpoint(model: str | Path) -> Path:
    """A local checkpoint folder, or a Hub id downloaded (or found in the cache) into one."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder
    if not _looks_like_hub_id(str(model)):
        raise CheckpointError(f"No checkpoint folder at '{model}'. Fix: pass an existing folder or a Hub id such as Qwen/Qwen2.5-0.5B-Instruct.")
    import huggingface_hub

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(huggingface_hub.snapshot_download(str(model), allow_patterns=patterns))
    except Exception as error:
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            why, online = "the Hub is offline (HF_HUB_OFFLINE is set)", "or go online (unset HF_HUB_OFFLINE)"
        else:
            why = f"the download failed ({type(error).__name__}: {error})"
            online = "or check the id, the network and, for a gated model, your Hugging Face token (hf auth login)"
        raise CheckpointError(
            f"Cannot load '{model}': it is not a local folder, as a Hub id it is not in the Hugging Face cache, and "
            f"{why}. "
            f"Fix: on a machine with internet run `hf download {model} --local-dir DIR` and pass DIR, {online}."
        ) from error


def _read_json(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path} is {'a folder' if path.is_dir() else 'not a regular file'}, not a JSON file. "
                              "Fix: put the file that save_pretrained wrote there.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({error}). Fix: download the checkpoint again, or repair the file "
            "(an interrupted download or a hand edit leaves it cut or malformed)."
        ) from error
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read ({error.strerror or error}). Fix: check the file and its "
                              "permissions, or download the checkpoint again.") from error


def _damaged(file: Path, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"{file} cannot be read as safetensors ({error}): it is incomplete or damaged, as an interrupted "
        "download leaves it. Fix: download the checkpoint again (every *.safetensors file)."
    )


def _open_safetensors(file: Path):
    """safe_open(file), with a damaged file (e.g. a download cut short) named in a CheckpointError."""
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise CheckpointError(f"{file} is {'a folder' if file.is_dir() else 'not a regular file'}, not a "
                              "safetensors file. Fix: download the checkpoint again (every *.safetensors file).")
    try:
        return safe_open(file, "np")
    except (SafetensorError, OSError) as error:
        raise _damaged(file, error) from error


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (single file or sharded with an index)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        contents = _read_json(index)
        weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map. Fix: download the checkpoint again, index included.")
        for shard in sorted(set(weight_map.values())):
            if not isinstance(shard, str) or not (folder / shard).exists():
                raise CheckpointError(
                    f"Shard '{shard}' listed in {index} is missing from {folder}. "
                    "Fix: download the checkpoint again (all model-*.safetensors files)."
                )
        return {name: folder / shard for name, shard in weight_map.items()}
    single = folder / "model.safetensors"
    if single.exists():
        with _open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise CheckpointError(
        f"No model.safetensors or model.safetensors.index.json in {folder} (found: {found}). "
        "Fix: save the model with transformers' save_pretrained (safetensors is its default)."
    )


def read_config(folder: Path) -> tuple[dict, str]:
    """The parsed config.json of a checkpoint folder, and its path for error messages."""
    config_file = folder / "config.json"
    if not config_file.exists():
        raise CheckpointError(
            f"No config.json in {folder}: this is not a Hugging Face model folder. "
            "Fix: point at the folder that save_pretrained wrote (config.json + *.safetensors)."
        )
    return _read_json(config_file), str(config_file)


def load_weights(folder: Path, specs: Sequence[WeightSpec], canonical_name: Callable[[str], str] = lambda name: name,
                 ignored: Callable[[str], bool] = lambda name: False, dtype=jnp.float32) -> Params:
    """The parameters `specs` describe, read from the safetensors in `folder` (one file, or shards with an index):
    every tensor present and of its shape, and every stored tensor read unless `ignored`.

    canonical_name maps a stored name onto the specs' names (checkpoints differ by a prefix); ignored(name) is True
    for tensors that exist but are not used (buffers, a tied lm_head, an encoder's pooler).
    """
    stored = {canonical_name(name): (name, file) for name, file in _tensor_files(folder).items()}
    missing = [s.hf_name for s in specs if s.hf_name not in stored]
    if missing:
        raise CheckpointError(
            f"{folder} lacks {len(missing)} weight(s) that its config.json implies, e.g. {missing[:3]}. "
            "Fix: check that config.json belongs to these weights (a tied or untied lm_head, Qwen2 biases, Qwen3 q/k norms)."
        )
    expected = {s.hf_name for s in specs}
    unexpected = [name for name in stored if name not in expected and not ignored(name)]
    if unexpected:
        raise CheckpointError(
            f"{folder} has weights that loading would ignore, e.g. {unexpected[:3]}, so its outputs would be wrong. "
            "Fix: use a checkpoint of a supported architecture whose config.json matches its weights."
        )
    from safetensors import SafetensorError

    params: Params = {}
    handles = {}
    for spec in specs:
        name, file = stored[spec.hf_name]
        if file not in handles:
            handles[file] = _open_safetensors(file)
        if name not in handles[file].keys():  # a sharded checkpoint's index.json names the shard that holds it
            raise CheckpointError(
                f"{file} lacks the weight {name}, which {folder / 'model.safetensors.index.json'} says it holds. "
                "Fix: download the checkpoint again, index and every shard together (they are from different "
                "versions)."
            )
        try:
            tensor = handles[file].get_tensor(name)
        except (SafetensorError, OSError, TypeError) as error:
            raise _damaged(file, error) from error
        if tuple(tensor.shape) != spec.hf_shape:
            raise CheckpointError(
                f"Weight {name} in {file.name} has shape {tuple(tensor.shape)}, but config.json implies "
                f"{spec.hf_shape}. Fix: the weights and config.json come from different models; use a matching pair."
            )
        if not np.issubdtype(tensor.dtype, np.floating) and tensor.dtype.name != "bfloat16":
            raise CheckpointError(
                f"Weight {name} in {file} is stored as {tensor.dtype.name}; a weight of this model is floating "
                "point (float32, bfloat16 or float16), and a quantized or integer checkpoint would load as "
                "nonsense. Fix: use the unquantized checkpoint."
            )
        value = spec.to_flax(tensor).astype(dtype)
        if not np.isfinite(value.astype(np.float32) if value.dtype.name == "bfloat16" else value).all():
            raise CheckpointError(
                f"Weight {name} in {file} holds a number that is not finite (NaN or infinity): a model with it "
                "gives NaN everywhere. Fix: download the checkpoint again, or export the model from before it "
                "diverged."
            )
        node = params
        for key in spec.path[:-1]:
            node = node.setdefault(key, {})
        node[spec.path[-1]] = jnp.asarray(value)
    return params


def load_checkpoint(model: str | Path, dtype=jnp.float32, backbone: bool = False) -> tuple[Config, Params]:
    """Config and parameters (in `dtype`) from a Hugging Face checkpoint folder or Hub id.

    backbone=True: the decoder without its LM head, for an embedder, which never unembeds. It reads CausalLM
    checkpoints (`model.layers.0...`) and bare backbones (`layers.0...`, no `lm_head` even where config.json says
    untied), as Qwen/Qwen3-Embedding-* and transformers' Qwen3Model.save_pretrained store them; the config returned
    says tied, so the parameters hold no lm_head.
    """
    folder = resolve_checkpoint(model)
    config = Config.from_hf(*read_config(folder))
    if backbone:
        config = dataclasses.replace(config, tie_word_embeddings=True)
    prefixed = lambda name: name if not backbone or name.startswith(("model.", "lm_head.")) else f"model.{name}"
    # a tied checkpoint may still store lm_head (a copy of the embedding); rotary_emb.inv_freq is a buffer
    unused = lambda name: (name == "lm_head.weight" and config.tie_word_embeddings) or name.endswith("rotary_emb.inv_freq")
    return config, load_weights(folder, weight_specs(config), prefixed, unused, dtype)


def load_tokenizer(model: str | Path):
    """The checkpoint's tokenizer (chat template included) through transformers.AutoTokenizer."""
    from transformers import AutoTokenizer

    folder = resolve_checkpoint(model)
    why = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        # a folder without tokenizer files still gives a tokenizer (of the config's model type), with no vocabulary
        if not tokenizer.encode("a", add_special_tokens=False):
            why = "the tokenizer transformers built from it encodes 'a' to no ids"
    except (OSError, ValueError) as error:
        why = f"{type(error).__name__}: {error}"
    if why is not None:
        raise CheckpointError(
            f"{folder} holds no usable tokenizer ({why}; found: {', '.join(sorted(p.name for p in folder.iterdir()))}). "
            "Fix: add the tokenizer of the model these weights come from (tokenizer.json, or tokenizer_config.json "
            f"with its vocabulary files), e.g. AutoTokenizer.from_pretrained(BASE_MODEL).save_pretrained('{folder}')."
        )
    return tokenizer


def save_checkpoint(folder: str | Path, config: Config, params: Params, tokenizer=None,
                    max_shard_bytes: int = 4 * 2**30) -> Path:
    """Write config.json and safetensors (sharded with an index past max_shard_bytes) that transformers and vLLM open."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for spec in weight_specs(config):
        value = params
        for key in spec.path:
            value = value[key]
        tensors[spec.hf_name] = np.ascontiguousarray(spec.to_hf(np.asarray(jax.device_get(value))))
    dtype = str(next(iter(tensors.values())).dtype)
    (folder / "config.json").write_text(json.dumps(config.to_hf(dtype), indent=2) + "\n")
    shards, size = [[]], 0
    for name, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += tensor.nbytes
    for stale in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        stale.unlink()
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(tensors, folder / "model.safetensors", metadata)
    else:
        weight_map = {}
        for i, names in enumerate(shards):
            shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, folder / shard, metadata)
            weight_map.update({n: shard for n in names})
        total = sum(t.nbytes for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


# --------------------------------------------------------------------------------------------
# Small tokenizers
# --------------------------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(texts: Sequence[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts`, with Qwen's special tokens and chat template.

    For tiny models trained from scratch. Byte-level like Qwen's own, so any text round-trips
    exactly, and transformers' AutoTokenizer reads the saved folder back unchanged.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
