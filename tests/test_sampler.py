"""sampler.py: greedy against transformers' generate, log-probs against teacher forcing, and the sampling rules
against their definitions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import model as M
import sampler
from engine import hf

PROMPT_LENGTHS = (5, 11, 17)  # different lengths: left padding and per-row positions matter


def prompts(lengths=PROMPT_LENGTHS, seed=0, vocab=128):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3", "llama3"])
def test_greedy_generation_equals_transformers_generate(hf_checkpoint, architecture):
    folder, reference = hf_checkpoint(architecture, tied=architecture == "qwen2")
    config, params = hf.load_checkpoint(folder)
    new_tokens = 24  # 17 + 24 positions: past llama3's original context of 16
    for seed in range(10):  # the first prompt batch whose greedy path has no near-tie in the reference
        batch = prompts(seed=seed)
        tokens, mask = M.left_pad(batch, max(PROMPT_LENGTHS), pad_id=0)
        with torch.no_grad():
            out = reference.generate(
                input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                eos_token_id=None, output_scores=True, return_dict_in_generate=True,
            )
        top2 = torch.stack(out.scores, 1).topk(2, -1).values
        if (top2[..., 0] - top2[..., 1]).min() > 1e-3:
            break
    else:
        pytest.fail("every prompt batch has a near-tie in the reference: greedy comparison would be fragile")
    expected = out.sequences[:, tokens.shape[1]:].numpy()

    ours = sampler.generate(params, config, batch, jax.random.key(0), sampler.SamplingParams(temperature=0, max_new_tokens=new_tokens),
                      stop_token_ids=())
    np.testing.assert_array_equal(np.asarray(ours.tokens), expected)
    assert np.asarray(ours.mask).all()


def test_a_groups_shared_prompt_is_prefilled_once_and_its_rows_decode_as_the_prompt_alone(hf_checkpoint, monkeypatch):
    """12 rows of 3 distinct prompts (a group's G rollouts of one task): 4 rows prefilled (3 to a power of two), and
    each row's greedy tokens and log-probs are those of its prompt generated alone."""
    folder, _ = hf_checkpoint("qwen2", tied=True)
    config, params = hf.load_checkpoint(folder)
    distinct = prompts(seed=2)
    order = [2, 0, 1, 0, 2, 1, 1, 0, 2, 0, 1, 2]
    prefilled, prefill = [], sampler._prefill
    monkeypatch.setattr(sampler, "_prefill", lambda params, config, tokens, *rest: (
        prefilled.append(tokens.shape[0]) or prefill(params, config, tokens, *rest)))
    greedy = sampler.SamplingParams(temperature=0, max_new_tokens=12)
    alone = sampler.generate(params, config, distinct, jax.random.key(0), greedy, stop_token_ids=())
    shared = sampler.generate(params, config, [distinct[i] for i in order], jax.random.key(0), greedy, stop_token_ids=())
    assert prefilled == [3, 4]  # distinct prompts alone are prefilled as they come
    np.testing.assert_array_equal(np.asarray(shared.prompt_tokens), np.asarray(alone.prompt_tokens)[order])
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(alone.tokens)[order])
    for name in ("logprobs", "entropies"):
        np.testing.assert_allclose(getattr(shared, name), np.asarray(getattr(alone, name))[order], atol=1e-5)


@pytest.mark.parametrize("sampling", [sampler.SamplingParams(1.0, max_new_tokens=20), sampler.SamplingParams(0.7, top_p=0.9, top_k=50, max_new_tokens=20),
                                      sampler.SamplingParams(0.0, max_new_tokens=20)], ids=["t1", "t0.7-top-p-top-k", "greedy"])
def test_sampled_logprobs_equal_teacher_forced_logprobs(hf_checkpoint, sampling):
    folder, _ = hf_checkpoint("qwen3")
    config, params = hf.load_checkpoint(folder)
    out = sampler.generate(params, config, prompts(seed=1), jax.random.key(1), sampling, stop_token_ids=(5, 9))
    sequence = jnp.concatenate([out.prompt_tokens, out.tokens], 1)
    sequence_mask = jnp.concatenate([out.prompt_mask, out.mask], 1)
    temperature = sampling.temperature or 1.0
    logprobs, entropies = M.token_logprobs(params, config, sequence, sequence_mask, temperature=temperature, chunk_size=8)
    prompt_length = out.prompt_tokens.shape[1]
    completion = np.asarray(out.mask)
    assert completion.sum() > 10
    np.testing.assert_allclose(np.asarray(out.logprobs)[completion], np.asarray(logprobs[:, prompt_length:])[completion], atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.entropies)[completion], np.asarray(entropies[:, prompt_length:])[completion], atol=1e-4)


def test_rows_finish_at_their_first_stop_token_which_stays_in_the_mask(hf_checkpoint):
    folder, _ = hf_checkpoint("qwen2")
    config, params = hf.load_checkpoint(folder)
    greedy = sampler.SamplingParams(temperature=0, max_new_tokens=16)
    free = np.asarray(sampler.generate(params, config, prompts(), jax.random.key(0), greedy, stop_token_ids=()).tokens)
    stop = int(free[0, 3])  # the token row 0 emits at step 3; make it a stop token
    first_stop = [int(np.argmax(row == stop)) if (row == stop).any() else None for row in free]
    # the pad id equals the stop id, as in Qwen: masks must not be derived from it
    out = sampler.generate(params, config, prompts(), jax.random.key(0), greedy, stop_token_ids=(stop,), pad_token_id=stop)
    tokens, mask, logprobs = map(np.asarray, (out.tokens, out.mask, out.logprobs))
    for row, end in enumerate(first_stop):
        if end is None:
            assert mask[row].all()
            np.testing.assert_array_equal(tokens[row], free[row])
        else:
            np.testing.assert_array_equal(mask[row], np.arange(16) <= end)
            np.testing.assert_array_equal(tokens[row, : end + 1], free[row, : end + 1])
            assert (tokens[row, end + 1:] == stop).all() and (logprobs[row, end + 1:] == 0).all()
    assert first_stop[0] <= 3


def test_sampling_with_a_fixed_key_is_reproducible(hf_checkpoint):
    folder, _ = hf_checkpoint("llama3")
    config, params = hf.load_checkpoint(folder)
    sampling = sampler.SamplingParams(temperature=1.0, max_new_tokens=12)
    first = sampler.generate(params, config, prompts(), jax.random.key(7), sampling, stop_token_ids=())
    again = sampler.generate(params, config, prompts(), jax.random.key(7), sampling, stop_token_ids=())
    other = sampler.generate(params, config, prompts(), jax.random.key(8), sampling, stop_token_ids=())
    np.testing.assert_array_equal(first.tokens, again.tokens)
    np.testing.assert_array_equal(first.logprobs, again.logprobs)
    assert not np.array_equal(first.tokens, other.tokens)


def test_prompts_of_nearby_lengths_share_one_padded_shape(hf_checkpoint):
    folder, _ = hf_checkpoint("qwen2")
    config, params = hf.load_checkpoint(folder)
    assert [M.bucket_length(n) for n in (1, 16, 17, 32, 33, 100)] == [16, 16, 32, 32, 64, 128]
    sampling = sampler.SamplingParams(temperature=0, max_new_tokens=4)
    shapes = {sampler.generate(params, config, prompts((n,)), jax.random.key(0), sampling).prompt_tokens.shape for n in (3, 9, 16)}
    assert shapes == {(1, 16)}


def test_a_memory_budget_samples_the_rows_in_batches_each_as_it_would_be_sampled_alone(hf_checkpoint, monkeypatch):
    """batch_bytes of 2.5 rows (row_bytes at the prompts' bucket): 7 prompts go in batches of 2, 2, 2 and 1; greedy,
    every row is what one batch of all 7 gives; at temperature 1, batch i is what that batch alone gives with
    fold_in(key, i)."""
    folder, _ = hf_checkpoint("qwen2", tied=True)
    config, params = hf.load_checkpoint(folder)
    batch = prompts((5, 11, 17, 3, 9, 14, 7), seed=3)
    bucket = M.bucket_length(17, 16)
    greedy = sampler.SamplingParams(temperature=0, max_new_tokens=10)
    budget = int(2.5 * sampler.row_bytes(config, bucket, greedy.max_new_tokens))
    assert sampler.rows_per_batch(config, bucket, dataclasses.replace(greedy, batch_bytes=budget)) == 2
    assert sampler.rows_per_batch(config, bucket, dataclasses.replace(greedy, batch_bytes=1)) == 1
    assert sampler.rows_per_batch(config, bucket, greedy) == 0  # no budget: one batch
    decoded, decode = [], sampler._decode
    monkeypatch.setattr(sampler, "_decode", lambda params, config, cache, *rest: (
        decoded.append(cache.k[0].shape[0]) or decode(params, config, cache, *rest)))
    whole = sampler.generate(params, config, batch, jax.random.key(0), greedy, stop_token_ids=())
    parts = sampler.generate(params, config, batch, jax.random.key(0), dataclasses.replace(greedy, batch_bytes=budget),
                             stop_token_ids=())
    assert decoded == [7, 2, 2, 2, 1]
    for name in ("prompt_tokens", "prompt_mask", "tokens", "mask"):
        np.testing.assert_array_equal(getattr(parts, name), getattr(whole, name))
    for name in ("logprobs", "entropies"):
        np.testing.assert_allclose(getattr(parts, name), getattr(whole, name), atol=1e-5)

    sampling = sampler.SamplingParams(temperature=1.0, max_new_tokens=10, batch_bytes=budget)
    parts = sampler.generate(params, config, batch, jax.random.key(4), sampling, stop_token_ids=())
    alone = dataclasses.replace(sampling, batch_bytes=0)
    for i, start in enumerate(range(0, 7, 2)):
        rows = slice(start, start + 2)
        one = sampler.generate(params, config, batch[rows], jax.random.fold_in(jax.random.key(4), i), alone,
                               stop_token_ids=())
        np.testing.assert_array_equal(np.asarray(parts.tokens)[rows], one.tokens)
        np.testing.assert_allclose(np.asarray(parts.logprobs)[rows], one.logprobs, atol=1e-5)


# ---- the sampling rules, on a small vocabulary, against their definitions ----
# 40,000 draws: a frequency's standard error is at most 0.0025, so a 0.012 tolerance is ~5 sigma.
DRAWS, TOLERANCE = 40_000, 0.012
LOGITS = np.log(np.array([0.40, 0.25, 0.15, 0.10, 0.06, 0.04]))


def frequencies(sampling, seed=0):
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (DRAWS, LOGITS.size))
    tokens, logprobs, entropies = map(np.asarray, sampler.sample_token(logits, jax.random.key(seed), sampling))
    return np.bincount(tokens, minlength=LOGITS.size) / DRAWS, tokens, logprobs, entropies


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_samples_softmax_of_logits_over_temperature(temperature):
    expected = np.exp(LOGITS / temperature) / np.exp(LOGITS / temperature).sum()
    observed, _, _, entropies = frequencies(sampler.SamplingParams(temperature=temperature))
    np.testing.assert_allclose(observed, expected, atol=TOLERANCE)
    np.testing.assert_allclose(entropies, -(expected * np.log(expected)).sum(), atol=1e-5)


def test_draws_spread_over_many_blocks_follow_the_distribution_and_never_take_a_zero_probability_token():
    """sampler.categorical picks a block of 256 tokens, then a token in it: with mass in five blocks (and blocks and
    tokens of probability 0 between them, and a vocabulary that is not a multiple of the block) the frequencies are
    the probabilities'."""
    vocab, probs = 1100, np.zeros(1100)
    probs[[3, 255, 256, 700, 1099]] = [0.30, 0.10, 0.25, 0.20, 0.15]
    probs[900:950] = 0.0002  # 50 small ones
    probs /= probs.sum()
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (DRAWS, vocab))
    tokens = np.asarray(sampler.categorical(jax.random.key(0), logits))
    observed = np.bincount(tokens, minlength=vocab) / DRAWS
    assert observed[probs == 0].sum() == 0
    np.testing.assert_allclose(observed[probs > 0.01], probs[probs > 0.01], atol=TOLERANCE)
    np.testing.assert_allclose(observed[900:950].sum(), probs[900:950].sum(), atol=TOLERANCE)


def test_top_p_samples_the_smallest_nucleus_renormalised():
    # mass before each token: 0, .40, .65, .80, ... -> top_p = 0.7 keeps the first three (mass 0.80)
    observed, tokens, logprobs, _ = frequencies(sampler.SamplingParams(temperature=1.0, top_p=0.7))
    np.testing.assert_allclose(observed, np.array([0.40, 0.25, 0.15, 0, 0, 0]) / 0.80, atol=TOLERANCE)
    assert observed[3:].sum() == 0
    # the returned log-prob is that of the full distribution (what training recomputes), not the nucleus
    np.testing.assert_allclose(logprobs, LOGITS[tokens], atol=1e-6)


def test_top_k_samples_the_k_most_likely_renormalised():
    observed, _, _, _ = frequencies(sampler.SamplingParams(temperature=1.0, top_k=2))
    np.testing.assert_allclose(observed, np.array([0.40, 0.25, 0, 0, 0, 0]) / 0.65, atol=TOLERANCE)


def test_greedy_takes_the_argmax_and_reports_temperature_one_logprobs():
    observed, _, logprobs, _ = frequencies(sampler.SamplingParams(temperature=0))
    np.testing.assert_array_equal(observed, [1, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(logprobs, np.log(0.40), atol=1e-6)
