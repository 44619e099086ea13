"""Causal attention over padded rows, in three forms behind one `attention` function.

    out_i = sum_j softmax_j(q_i . k_j / sqrt(d)) v_j,   over the real key slots j at or before query slot i

- `plain_attention`: the formula written out, the readable reference; it holds the [t, s] scores.
- `blockwise_attention`: FlashAttention's online softmax over 512 x 512 blocks, with a custom VJP (FlashAttention-2's
  backward) that recomputes each block's probabilities from the saved logsumexp, so the memory of long rows grows
  linearly with their length, in the forward pass and the backward pass.
- `fused_attention`: cuDNN's fused flash attention (jax.nn.dot_product_attention) on a GPU in 16-bit compute.

A query at a pad slot (left padding, the end of a right-padded row, a finished row in the decode) attends to
nothing: its output is exactly 0 in every form, and so is its gradient. (The softmax of a row whose scores are
all masked is uniform over garbage, and the forms would each make different garbage of it.)

Queries come grouped ([b, t, kv_heads, groups, d]: query head h reads kv head h // groups, grouped-query
attention); keys and values are [b, s, kv_heads, d]. model.py's `Attention` layer projects, rotates (RoPE) and
caches them, then calls `attention`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

MASKED_SCORE = -1e30  # finite: a softmax over masked scores only is uniform, not NaN (its row is then zeroed)
ATTENTION_BLOCK = 512  # query and key positions per block of the blockwise attention


def attention_mask(kv_mask: jax.Array, query_offset, queries: int) -> jax.Array:
    """[b, t, s] bool: query i (at slot query_offset + i) sees key slot j iff its own slot and j are real and
    j <= its slot."""
    return _visible(kv_mask, jax.lax.dynamic_slice_in_dim(kv_mask, query_offset, queries, 1), query_offset, 0)


def _visible(kv_mask, query_mask, query_start, key_start):
    """[b, t, s] bool: which keys (slots key_start + j, real where kv_mask) each query (slot query_start + i, real where
    query_mask) sees: real keys at or before a real query."""
    query_slots = query_start + jnp.arange(query_mask.shape[1])
    key_slots = key_start + jnp.arange(kv_mask.shape[1])
    causal = key_slots[None, None, :] <= query_slots[None, :, None]
    return query_mask[:, :, None] & kv_mask[:, None, :] & causal


def plain_attention(q, k, v, kv_mask, query_offset=0):
    """softmax(q k^T / sqrt(d)) v with the causal and padding mask, written out: the readable reference.

    q [b, t, kv_heads, groups, d] (query head h = kv head h // groups, grouped-query attention);
    k, v [b, s, kv_heads, d]; kv_mask [b, s] bool. Returns [b, t, kv_heads, groups, d].
    Holds the [b, heads, t, s] scores (and, under autodiff, keeps them for the backward pass).
    """
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
    attend = attention_mask(kv_mask, query_offset, q.shape[1])
    scores = jnp.where(attend[:, None, None], scores / math.sqrt(q.shape[-1]), MASKED_SCORE)
    # a pad query's row is all masked: uniform, zeroed here (elsewhere a masked score's probability is 0 already)
    probs = jnp.where(attend[:, None, None], jax.nn.softmax(scores, axis=-1), 0.0).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(q.dtype))


def _blocks(x, size: int, axis: int = 1, fill=0):
    """Pad x along `axis` to a multiple of size."""
    extra = -x.shape[axis] % size
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=fill)


def _block_scores(q_block, k_block, query_mask_block, kv_mask_block, query_start, key_start):
    """Masked, scaled scores [b, kv_heads, groups, bq, bk] float32 of one query block against one key block, and
    which of them are seen ([b, bq, bk] bool)."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q_block, k_block.astype(q_block.dtype), preferred_element_type=jnp.float32)
    attend = _visible(kv_mask_block, query_mask_block, query_start, key_start)
    return jnp.where(attend[:, None, None], scores / math.sqrt(q_block.shape[-1]), MASKED_SCORE), attend


def _key_blocks_seen(query_block, query_offset, block: int, key_blocks: int):
    """How many key blocks (from the first) query block `query_block` can see: the causal mask skips the rest."""
    last_slot = query_offset + (query_block + 1) * block - 1
    return jnp.minimum(key_blocks, last_slot // block + 1)


def _query_mask(kv_mask, query_offset, queries: int, block: int):
    """[b, queries padded to blocks] bool: whether each query's own slot holds a real token."""
    return _blocks(jax.lax.dynamic_slice_in_dim(kv_mask, query_offset, queries, 1), block, fill=False)


def _blockwise_forward(q, k, v, kv_mask, query_offset, block):
    """(output, logsumexp) by an online softmax over key blocks, one query block at a time."""
    queries = q.shape[1]
    query_mask = _query_mask(kv_mask, query_offset, queries, block)
    q, k, v, kv_mask = _blocks(q, block), _blocks(k, block), _blocks(v, block), _blocks(kv_mask, block, fill=False)
    key_blocks = k.shape[1] // block
    batch, _, kv_heads, groups, head_dim = q.shape

    def one_query_block(i):
        q_block, query_mask_block = (jax.lax.dynamic_slice_in_dim(x, i * block, block, 1) for x in (q, query_mask))

        def add_key_block(j, carry):
            out, running_max, total = carry
            k_block, v_block, mask_block = (jax.lax.dynamic_slice_in_dim(x, j * block, block, 1) for x in (k, v, kv_mask))
            scores, _ = _block_scores(q_block, k_block, query_mask_block, mask_block, query_offset + i * block,
                                      j * block)
            new_max = jnp.maximum(running_max, scores.max(-1))
            probs = jnp.exp(scores - new_max[..., None])
            rescale = jnp.exp(running_max - new_max)
            total = total * rescale + probs.sum(-1)
            update = jnp.einsum("bkgts,bskd->bkgtd", probs.astype(q.dtype), v_block.astype(q.dtype),
                                preferred_element_type=jnp.float32)
            return out * rescale[..., None] + update, new_max, total

        stats = (batch, kv_heads, groups, block)
        init = (jnp.zeros((*stats, head_dim), jnp.float32), jnp.full(stats, MASKED_SCORE, jnp.float32),
                jnp.zeros(stats, jnp.float32))
        out, running_max, total = jax.lax.fori_loop(
            0, _key_blocks_seen(i, query_offset, block, key_blocks), add_key_block, init)
        # a pad query saw only masked scores (its running max never rose): output 0, as plain_attention's
        seen = running_max > MASKED_SCORE
        return jnp.where(seen[..., None], out / total[..., None], 0.0), running_max + jnp.log(total)

    out, logsumexp = jax.lax.map(one_query_block, jnp.arange(q.shape[1] // block))  # [nq, b, k, g, bq, (d)]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, -1, kv_heads, groups, head_dim)  # [b, nq * bq, k, g, d]
    logsumexp = logsumexp.transpose(1, 2, 3, 0, 4).reshape(batch, kv_heads, groups, -1)  # [b, k, g, nq * bq]
    return out[:, :queries].astype(q.dtype), logsumexp[..., :queries]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise(q, k, v, kv_mask, query_offset, block):
    return _blockwise_forward(q, k, v, kv_mask, query_offset, block)[0]


def _blockwise_fwd(q, k, v, kv_mask, query_offset, block):
    out, logsumexp = _blockwise_forward(q, k, v, kv_mask, query_offset, block)
    return out, (q, k, v, kv_mask, query_offset, out, logsumexp)


def _blockwise_bwd(block, residuals, d_out):
    """FlashAttention-2's backward: each block's probabilities recomputed from the saved logsumexp, dQ accumulated
    across key blocks, dK and dV of a key block summed over the query blocks that see it."""
    q, k, v, kv_mask, query_offset, out, logsumexp = residuals
    queries, keys = q.shape[1], k.shape[1]
    query_mask = _query_mask(kv_mask, query_offset, queries, block)
    # D_i = sum_d dO_i O_i: the softmax's Jacobian term, one number per query and head
    delta = jnp.einsum("btkgd,btkgd->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))
    q_pad, d_out_pad = _blocks(q, block), _blocks(d_out, block)
    logsumexp, delta = _blocks(logsumexp, block, axis=3), _blocks(delta, block, axis=3)
    k_pad, v_pad, mask_pad = _blocks(k, block), _blocks(v, block), _blocks(kv_mask, block, fill=False)
    query_blocks, key_blocks = q_pad.shape[1] // block, k_pad.shape[1] // block
    scale = 1.0 / math.sqrt(q.shape[-1])
    compute = q.dtype

    def one_key_block(j, carry):
        d_q, d_k, d_v = carry
        k_block, v_block, mask_block = (jax.lax.dynamic_slice_in_dim(x, j * block, block, 1) for x in (k_pad, v_pad, mask_pad))

        def add_query_block(i, inner):
            d_q, d_k_block, d_v_block = inner
            q_block, d_out_block, query_mask_block = (jax.lax.dynamic_slice_in_dim(x, i * block, block, 1)
                                                      for x in (q_pad, d_out_pad, query_mask))
            lse_block, delta_block = (jax.lax.dynamic_slice_in_dim(x, i * block, block, 3) for x in (logsumexp, delta))
            scores, attend = _block_scores(q_block, k_block, query_mask_block, mask_block, query_offset + i * block,
                                           j * block)
            # the forward's probabilities: 0 where masked, which a pad query's logsumexp would not give (its forward
            # output is 0 whatever its values)
            probs = jnp.where(attend[:, None, None], jnp.exp(scores - lse_block[..., None]), 0.0)  # [b, k, g, bq, bk]
            d_v_block += jnp.einsum("bkgts,btkgd->bskd", probs.astype(compute), d_out_block.astype(compute),
                                    preferred_element_type=jnp.float32)
            d_probs = jnp.einsum("btkgd,bskd->bkgts", d_out_block.astype(compute), v_block.astype(compute),
                                 preferred_element_type=jnp.float32)
            # masked scores are constants in the forward pass (jnp.where): no gradient reaches q or k through them
            d_scores = jnp.where(attend[:, None, None], probs * (d_probs - delta_block[..., None]), 0.0) * scale
            d_q_block = jnp.einsum("bkgts,bskd->btkgd", d_scores.astype(compute), k_block.astype(compute),
                                   preferred_element_type=jnp.float32)
            d_q = jax.lax.dynamic_update_slice_in_dim(
                d_q, jax.lax.dynamic_slice_in_dim(d_q, i * block, block, 1) + d_q_block, i * block, 1)
            d_k_block += jnp.einsum("bkgts,btkgd->bskd", d_scores.astype(compute), q_block.astype(compute),
                                    preferred_element_type=jnp.float32)
            return d_q, d_k_block, d_v_block

        # the first query block whose last query slot reaches this key block's first slot
        first = jnp.clip((j * block - query_offset) // block, 0, query_blocks)
        zeros = jnp.zeros(k_block.shape, jnp.float32)
        d_q, d_k_block, d_v_block = jax.lax.fori_loop(first, query_blocks, add_query_block, (d_q, zeros, zeros))
        d_k = jax.lax.dynamic_update_slice_in_dim(d_k, d_k_block, j * block, 1)
        d_v = jax.lax.dynamic_update_slice_in_dim(d_v, d_v_block, j * block, 1)
        return d_q, d_k, d_v

    init = (jnp.zeros(q_pad.shape, jnp.float32), jnp.zeros(k_pad.shape, jnp.float32), jnp.zeros(v_pad.shape, jnp.float32))
    d_q, d_k, d_v = jax.lax.fori_loop(0, key_blocks, one_key_block, init)
    return (d_q[:, :queries].astype(q.dtype), d_k[:, :keys].astype(k.dtype), d_v[:, :keys].astype(v.dtype), None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q, k, v, kv_mask, query_offset=0, block: int = ATTENTION_BLOCK):
    """plain_attention's result computed `block` queries x `block` keys at a time (FlashAttention's online softmax),
    so memory grows linearly with length: no [t, s] matrix exists in the forward pass or in the backward pass (a
    custom VJP recomputes each block's probabilities from the saved logsumexp). Key blocks wholly in a query
    block's future are skipped. Same shapes and mask as plain_attention; the lengths need not be multiples of block.
    """
    return _blockwise(q, k, v, kv_mask, jnp.asarray(query_offset, jnp.int32), block)


def fused_attention(q, k, v, kv_mask, implementation: str | None = "cudnn"):
    """plain_attention's result from jax.nn.dot_product_attention (implementation "cudnn": cuDNN's fused flash
    attention on an NVIDIA GPU; "xla" anywhere, for tests), for a call without a cache (t = s, query_offset 0) whose
    rows hold their real tokens contiguously: left or right padded, or both, as every batch this project builds is.

    cuDNN masks by sequence lengths counted from the start of a row, and these rows may be left padded: each row is
    rotated so that its real tokens start at 0, attended causally over its length, and rotated back. cuDNN zeroes the
    queries past a row's length (its pad queries); a row of padding only gets length 1 (0 would give NaN, which
    poisons the gradient), and its one query is zeroed here, so every pad query's output is 0, as in the other forms.
    """
    batch, time, kv_heads, groups, head_dim = q.shape
    start = jnp.argmax(kv_mask, axis=1)  # each row's first real token
    length = jnp.maximum(kv_mask.sum(1), 1).astype(jnp.int32)
    rotate = lambda x, shift: jnp.take_along_axis(
        x, ((jnp.arange(time)[None] + shift[:, None]) % time).reshape(batch, time, *[1] * (x.ndim - 2)), axis=1)
    out = jax.nn.dot_product_attention(
        rotate(q.reshape(batch, time, kv_heads * groups, head_dim), start), rotate(k.astype(q.dtype), start),
        rotate(v.astype(q.dtype), start), is_causal=True, query_seq_lengths=length, key_value_seq_lengths=length,
        implementation=implementation)  # query head h reads kv head h // groups, as here
    out = rotate(out, -start).reshape(q.shape)
    return jnp.where(kv_mask[:, :, None, None, None], out, jnp.zeros((), out.dtype))


def _fused_applies(q, k, query_offset) -> bool:
    """cuDNN's flash attention: on a GPU, 16-bit compute, head_dim a multiple of 8 up to 128, no cache."""
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 128 and isinstance(query_offset, int) and query_offset == 0 and q.shape[1] == k.shape[1])


def attention(q, k, v, kv_mask, query_offset=0, implementation: str = "auto", block: int = ATTENTION_BLOCK):
    """Grouped-query causal attention over padded rows (shapes as plain_attention).

    implementation: "plain", "blockwise", "fused" (fused_attention: cuDNN) or "auto": on a GPU in bfloat16 or
    float16 without a cache, fused; else blockwise once the queries span more than one block (long prompts and
    training rows), plain for short rows and the one-token decode steps, where it is faster.
    """
    if implementation == "auto":
        if _fused_applies(q, k, query_offset):
            implementation = "fused"
        else:
            implementation = "blockwise" if q.shape[1] > block else "plain"
    if implementation == "plain":
        return plain_attention(q, k, v, kv_mask, query_offset)
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, kv_mask, query_offset, block)
    if implementation == "fused":
        return fused_attention(q, k, v, kv_mask, "cudnn" if jax.default_backend() == "gpu" else "xla")
    raise ValueError(f"attention implementation '{implementation}' is not auto, plain, blockwise or fused")
