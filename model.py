"""The language model: a Flax decoder-only transformer, the architecture of the Hugging Face checkpoints it runs.

Every method in this project (RWML, PaW, SPA, plain GRPO) trains one of these. It covers the
papers' models: Qwen2 / Qwen2.5 (bias on q, k, v), Qwen3 (RMSNorm on q and k before RoPE, explicit
head_dim) and Llama 3.x (the "llama3" RoPE scaling); all are pre-norm decoders with grouped-query
attention, RMSNorm, SwiGLU and rotary position embeddings:

    x = embed(tokens)
    for each layer:  x = x + attention(rms_norm(x));  x = x + down(silu(gate(h)) * up(h)), h = rms_norm(x)
    logits = rms_norm(x) @ W_out                  (W_out = embed^T when the embeddings are tied)

Everything architectural is a frozen `Config`. Reading it from a checkpoint's config.json and every tensor's
Hugging Face name, shape and layout (`weight_specs`: a transpose plus a reshape each) are `engine/hf_format.py`'s;
loading and saving a checkpoint, with every shape checked, `engine/hf.py`'s.

The attention itself (the plain reference, the blockwise FlashAttention form whose memory grows linearly
with the row's length, cuDNN's fused kernel) lives in `attention.py`.

Sampling lives in `sampler.py`; `token_logprobs` here recomputes, by teacher forcing, exactly the
log-probs and entropies the sampler returns.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attention import ATTENTION_BLOCK, attention

Params = dict[str, Any]  # the Flax parameter pytree, variables["params"]


@dataclasses.dataclass(frozen=True)
class Config:
    """The architecture (engine/hf_format.py reads it from a Hugging Face config.json). Frozen and hashable: a static
    jit argument."""

    model_type: str  # "qwen2" | "qwen3" | "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" | "linear" | "llama3"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_positions: int = 8192  # llama3 only
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None


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
