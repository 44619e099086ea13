"""Sampling from the model: a jitted prefill and a jitted decode loop over a KV cache, returning what RL needs.

Prompts of different lengths are left padded (positions count real tokens only), their length
padded to a power-of-two bucket so jit compiles a handful of programs. Each row stops at its own
first stop token. For every sampled token the sampler returns its log-probability and the entropy
of the policy's full distribution at the sampling temperature,

    logprob_t = log softmax(logits_t / T)[token_t],   entropy_t = -sum_v p_v log p_v,

exactly what `model.token_logprobs` recomputes by teacher forcing: that is what keeps the GRPO
ratio pi_theta / pi_old (docs/methods.md eq. 5) at 1 on-policy. The entropy is the H_t of eq. 6 and the full form
of PaW's eq. 23. Top-k and top-p only restrict which token is drawn.

`python study/benchmarks/sample.py` is a small generation demo on a random tiny checkpoint (offline), or on a real
one with `--model Qwen/Qwen2.5-0.5B-Instruct`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import model as lm
import multihost
from attention import ATTENTION_BLOCK


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each token, and how many rows to sample at once. Static under jit: each distinct value compiles
    once."""

    temperature: float = 1.0  # 0 means greedy (argmax)
    top_p: float = 1.0  # nucleus: the smallest set of most likely tokens with mass >= top_p
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    max_new_tokens: int = 64
    batch_bytes: int = 0  # the memory one batch of rows may take (row_bytes each); 0: every row in one batch


class Completion(NamedTuple):
    """A batch of sampled completions. The prompt is kept as fed (left padded) so training never re-tokenizes.

    prompt_tokens, prompt_mask:  [batch, prompt_bucket]  left padded
    tokens:     [batch, max_new_tokens] int32 sampled ids; after a row finishes, its pad id
    logprobs:   [batch, max_new_tokens] float32 log pi(token) under softmax(logits / temperature)
                (temperature 1 when greedy), over the full vocabulary, before top-p / top-k
    entropies:  [batch, max_new_tokens] float32 entropy of that same full distribution
    mask:       [batch, max_new_tokens] bool, True up to and including the first stop token
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    entropies: jax.Array
    mask: jax.Array


def sample_token(logits: jax.Array, key: jax.Array, sampling: SamplingParams):
    """One token per row from logits [b, vocab] float32. Returns (token, its log-prob, entropy).

    The log-prob and entropy are those of softmax(logits / temperature) over the whole vocabulary:
    the distribution training recomputes. Top-k and top-p only restrict which token is drawn.
    """
    greedy = sampling.temperature == 0
    scaled = logits if greedy else logits / sampling.temperature
    log_probs = jax.nn.log_softmax(scaled, axis=-1)
    if greedy:
        token = jnp.argmax(logits, axis=-1)
    else:
        allowed = scaled
        if sampling.top_k > 0:
            kth_largest = jax.lax.top_k(allowed, sampling.top_k)[0][:, -1:]
            allowed = jnp.where(allowed >= kth_largest, allowed, -jnp.inf)
        if sampling.top_p < 1.0:
            allowed = _nucleus(allowed, sampling.top_p)
        token = categorical(key, allowed)
    logprob = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return token.astype(jnp.int32), logprob, entropy


def categorical(key: jax.Array, logits: jax.Array, block: int = 256) -> jax.Array:
    """One draw per row from softmax(logits) [b, vocab], by the inverse of its CDF in two levels: a block of `block`
    tokens by the blocks' masses, then a token within it. Two uniform numbers a row, where jax.random.categorical
    draws Gumbel noise for every entry (151,936 a row for Qwen, most of a CPU decode step's sampling time). A token
    of probability 0 (-inf logit) is never drawn: the chosen block's cumulative mass rises past the uniform draw."""
    b, vocab = logits.shape
    blocks = -(-vocab // block)
    weights = jnp.exp(logits - logits.max(-1, keepdims=True))
    weights = jnp.pad(weights, ((0, 0), (0, blocks * block - vocab))).reshape(b, blocks, block)
    u = jax.random.uniform(key, (2, b))
    cdf = jnp.cumsum(weights.sum(-1), -1)  # [b, blocks]
    chosen = jnp.minimum(jnp.sum(cdf <= (u[0] * cdf[:, -1])[:, None], -1), blocks - 1)
    inner = jnp.cumsum(jnp.take_along_axis(weights, chosen[:, None, None], 1)[:, 0], -1)  # [b, block]
    return chosen * block + jnp.minimum(jnp.sum(inner <= (u[1] * inner[:, -1])[:, None], -1), block - 1)


def _nucleus(logits: jax.Array, top_p: float) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability mass reaches top_p."""
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _prefill(params, config, tokens, token_mask, cache):
    """Run the left-padded prompts through the model; the logits of each row's last token come back."""
    hidden, cache = lm.forward(params, config, tokens, token_mask, cache)
    return lm.unembed(params, config, hidden[:, -1]), cache


@jax.jit
def _copy_rows(logits, cache: lm.KVCache, rows):
    """The prefill's last logits and KV cache of the distinct prompts, row rows[i] for each sampled row i."""
    take = lambda x: x[rows]
    return take(logits), lm.KVCache(tuple(map(take, cache.k)), tuple(map(take, cache.v)), take(cache.mask),
                                    cache.index)


@functools.partial(jax.jit, static_argnames=("config", "sampling", "stop_ids", "pad_id"), donate_argnames=("cache",))
def _decode(params, config, cache, first_logits, next_positions, key, sampling, stop_ids, pad_id):
    """Sample until every row has produced a stop token or max_new_tokens: one XLA while loop. The cache is donated
    and returned, so the loop writes it in place (kept only as an input, XLA copied it into the loop: twice its
    memory)."""
    if config.tie_word_embeddings and jax.default_backend() == "cpu":
        # each step's largest matmul is [batch, hidden] x the [vocab, hidden] embedding; XLA on a CPU runs it ~20%
        # faster (Qwen2.5-0.5B: 38 against 47 ms at batch 8) from a [hidden, vocab] copy, made once per call
        params = {**params, "lm_head": params["embed"]["embedding"].T}
        config = dataclasses.replace(config, tie_word_embeddings=False)
    batch, steps = first_logits.shape[0], sampling.max_new_tokens
    stop_ids = jnp.asarray(stop_ids, jnp.int32)
    empty = lambda dtype: jnp.zeros((batch, steps), dtype)

    def unfinished(carry):
        step, done = carry[0], carry[3]
        return (step < steps) & ~jnp.all(done)

    def decode_one(carry):
        step, cache, step_logits, done, positions, outputs = carry
        token, logprob, entropy = sample_token(step_logits, jax.random.fold_in(key, step), sampling)
        live = ~done
        token = jnp.where(live, token, pad_id)
        outputs = tuple(
            out.at[:, step].set(value)
            for out, value in zip(outputs, (token, jnp.where(live, logprob, 0.0), jnp.where(live, entropy, 0.0), live))
        )
        done = done | jnp.isin(token, stop_ids)
        hidden, cache = lm.forward(params, config, token[:, None], live[:, None], cache, positions[:, None])
        return step + 1, cache, lm.unembed(params, config, hidden[:, 0]), done, positions + 1, outputs

    outputs = (empty(jnp.int32) + pad_id, empty(jnp.float32), empty(jnp.float32), empty(bool))
    carry = (0, cache, first_logits, jnp.zeros(batch, bool), next_positions, outputs)
    _, cache, _, _, _, outputs = jax.lax.while_loop(unfinished, decode_one, carry)
    return outputs, cache


def stop_token_ids(tokenizer, config: lm.Config) -> tuple[int, ...]:
    """Where a chat turn ends: the tokenizer's EOS (e.g. <|im_end|>) and the checkpoint's own EOS ids."""
    return tuple(sorted({tokenizer.eos_token_id, *config.eos_token_ids} - {None}))


def row_bytes(config: lm.Config, prompt_length: int, max_new_tokens: int, dtype_bytes: int = 4) -> int:
    """An upper estimate of the memory one row of a batch takes while it is sampled: its KV cache (keys and values of
    every layer, prompt_length + max_new_tokens slots), the prefill's transient activations of one layer for its
    prompt (attention scores over the cache, or over a block of it once the prompt is longer than a block, four of
    them a head; the MLP's and the residual stream's), and its logits. XLA's memory analysis on CPU, SmolLM2-135M's
    shape, 512 new tokens, in MiB a row (cache + prefill; this estimate): prompts of 256 tokens 34 + 23 (68), 512
    45 + 60 (131), 1,024 68 + 99 (167), 4,096 203 + 367 (599)."""
    c = config
    length = prompt_length + max_new_tokens
    cache = 2 * c.num_layers * c.num_kv_heads * c.head_dim * length * dtype_bytes
    keys = length if prompt_length <= ATTENTION_BLOCK else ATTENTION_BLOCK  # attention.attention's choice: blockwise
    prefill = 4 * prompt_length * (4 * c.num_heads * keys + 3 * c.intermediate_size + 4 * c.hidden_size)
    return cache + prefill + 2 * 4 * c.vocab_size


def rows_per_batch(config: lm.Config, prompt_length: int, sampling: SamplingParams, dtype_bytes: int = 4) -> int:
    """The largest power of two of rows whose row_bytes fit in sampling.batch_bytes (at least one); 0: no limit."""
    if sampling.batch_bytes <= 0:
        return 0
    rows = sampling.batch_bytes // row_bytes(config, prompt_length, sampling.max_new_tokens, dtype_bytes)
    return 1 << max(0, int(rows).bit_length() - 1)


def generate(params: lm.Params, config: lm.Config, prompts: Sequence[Sequence[int]], key: jax.Array,
             sampling: SamplingParams = SamplingParams(), stop_token_ids: Sequence[int] | None = None,
             pad_token_id: int | None = None, min_bucket: int = 16) -> Completion:
    """Sample completions for prompts of different lengths (token id lists).

    stop_token_ids defaults to the config's EOS ids; a row finishes at its first stop token, which
    is kept in its mask. pad_token_id (default: the config's pad, else the first stop id) fills
    the left of the prompts and the right of finished rows; masks never derive from it, because
    Qwen's pad id is its EOS id. With sampling.batch_bytes, the rows are sampled in consecutive batches of
    rows_per_batch (batch i with fold_in(key, i)): memory then grows with the batch, not with the number of prompts.
    """
    stop_ids = tuple(config.eos_token_ids if stop_token_ids is None else stop_token_ids)
    pad_id = next((i for i in (pad_token_id, config.pad_token_id, *stop_ids) if i is not None), 0)
    prompt_length = lm.bucket_length(max(len(p) for p in prompts), min_bucket)
    tokens, mask = lm.left_pad(prompts, prompt_length, pad_id)
    dtype = params["embed"]["embedding"].dtype
    rows = rows_per_batch(config, prompt_length, sampling, jnp.dtype(dtype).itemsize) or len(prompts)
    sampling = dataclasses.replace(sampling, batch_bytes=0)  # one decode program whatever the budget
    if rows >= len(prompts):
        return _sample_rows(params, config, tokens, mask, key, sampling, stop_ids, pad_id)
    parts = [_sample_rows(params, config, tokens[start:start + rows], mask[start:start + rows],
                          jax.random.fold_in(key, start // rows), sampling, stop_ids, pad_id)
             for start in range(0, len(prompts), rows)]
    return Completion(*(jnp.concatenate(field) for field in zip(*parts)))


def _sample_rows(params, config: lm.Config, tokens: np.ndarray, mask: np.ndarray, key: jax.Array,
                 sampling: SamplingParams, stop_ids: tuple[int, ...], pad_id: int) -> Completion:
    """generate's one batch: the prefill of its distinct prompts, then the decode loop over all its rows."""
    # a group's rows share a prompt (a task's G rollouts, RWML's G predictions, Pass@k's attempts): each distinct
    # prompt is prefilled once (padded to a power of two of rows), and its rows start from copies of its KV cache
    _, first, row_of = np.unique(np.concatenate([tokens, mask], 1), axis=0, return_index=True, return_inverse=True)
    prefilled = np.resize(first, lm.bucket_length(len(first), 1))  # repeats rows to fill the power of two
    if len(prefilled) >= len(tokens):
        prefilled, row_of = np.arange(len(tokens)), np.arange(len(tokens))
    cache_dtype = params["embed"]["embedding"].dtype
    cache = lm.init_cache(config, len(prefilled), tokens.shape[1] + sampling.max_new_tokens, cache_dtype)
    first_logits, cache = _prefill(params, config, jnp.asarray(tokens[prefilled]), jnp.asarray(mask[prefilled]), cache)
    if len(prefilled) < len(tokens):
        first_logits, cache = _copy_rows(first_logits, cache, jnp.asarray(row_of.reshape(-1)))
    next_positions = jnp.asarray(mask.sum(-1), jnp.int32)
    (sampled, logprobs, entropies, completion_mask), _ = _decode(
        params, config, cache, first_logits, next_positions, key, sampling, stop_ids, pad_id
    )
    return Completion(jnp.asarray(tokens), jnp.asarray(mask), sampled, logprobs, entropies, completion_mask)


def greedy_match_fractions(params, config: lm.Config, rows: list[tuple[list[int], list[int]]], pad_id: int,
                           batch_size: int = 16) -> np.ndarray:
    """[n] float: the share of each target's tokens that are the argmax after their prefix (teacher forced); a row
    counts in methods.md eq. 30 when its share is 1.

    A fraction of 1 means greedy decoding after the context reproduces the target exactly: greedy
    output equals the target if and only if each target token is the argmax after its prefix. Rows
    are left padded, so every target ends at the right edge and only the last positions are unembedded.
    """
    fractions = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        sequences = [list(context) + list(target) for context, target in chunk]
        tokens, mask = lm.left_pad(sequences, lm.bucket_length(max(map(len, sequences))), pad_id)
        width = min(lm.bucket_length(max(len(target) for _, target in chunk), 8), tokens.shape[1] - 1)
        predicted = multihost.to_host(_argmax_of_last(params, config, tokens, mask, width))  # predicts the last `width` tokens
        fractions += [float(np.mean(predicted[row, width - len(target):] == np.asarray(target)))
                      for row, (_, target) in enumerate(chunk)]
    return np.array(fractions)


def greedy_matches(params, config: lm.Config, rows: list[tuple[list[int], list[int]]], pad_id: int) -> np.ndarray:
    """[n] bool: greedy decoding after each context reproduces its target exactly (the terms of methods.md eq. 30)."""
    return greedy_match_fractions(params, config, rows, pad_id) == 1.0


@functools.partial(jax.jit, static_argnames=("config", "width"))
def _argmax_of_last(params, config, tokens, token_mask, width):
    hidden, _ = lm.forward(params, config, tokens, token_mask)
    return jnp.argmax(lm.unembed(params, config, hidden[:, -width - 1:-1]), -1)
