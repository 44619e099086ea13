"""model.py, attention.py and engine/hf.py against transformers' PyTorch models: loading, logits, padding, export, and the errors users hit."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ARCHITECTURES, torch_logits

import attention as A
import model as M
from engine import estimates, hf

LOGIT_TOLERANCE = 1e-4  # float32, max abs difference


def random_tokens(shape, vocab=128, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape, dtype=np.int32)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_logits_match_transformers(hf_checkpoint, architecture, tied):
    folder, reference = hf_checkpoint(architecture, tied)
    config, params = hf.load_checkpoint(folder)
    assert config.tie_word_embeddings == tied and ("lm_head" in params) != tied
    # 40 positions: past llama3's original context of 16, where its rope scaling matters
    tokens = random_tokens((2, 40))
    ours = M.logits(params, config, tokens, np.ones_like(tokens, bool))
    np.testing.assert_allclose(ours, torch_logits(reference, tokens), atol=LOGIT_TOLERANCE, rtol=0)


def test_config_fields_are_read_from_the_checkpoint(hf_checkpoint):
    qwen2 = hf.load_checkpoint(hf_checkpoint("qwen2")[0])[0]
    qwen3 = hf.load_checkpoint(hf_checkpoint("qwen3")[0])[0]
    llama = hf.load_checkpoint(hf_checkpoint("llama3")[0])[0]
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.qk_norm, qwen2.head_dim) == (True, False, False, 16)
    assert (qwen3.qkv_bias, qwen3.qk_norm, qwen3.head_dim, qwen3.rope_theta) == (False, True, 32, 1e6)
    assert (llama.rope_type, llama.rope_factor, llama.rope_original_max_positions, llama.rope_theta) == ("llama3", 8.0, 16, 500.0)
    assert llama.eos_token_ids == (2,) and llama.num_kv_heads == 2


def test_sharded_checkpoint_gives_the_same_logits(hf_checkpoint):
    folder, reference = hf_checkpoint("qwen2", False, sharded=True)
    assert (folder / "model.safetensors.index.json").exists() and len(list(folder.glob("*.safetensors"))) > 1
    config, params = hf.load_checkpoint(folder)
    tokens = random_tokens((2, 24), seed=1)
    np.testing.assert_allclose(M.logits(params, config, tokens, np.ones_like(tokens, bool)), torch_logits(reference, tokens),
                               atol=LOGIT_TOLERANCE, rtol=0)


def test_transformers_4_config_layout_reads_the_same(hf_checkpoint, tmp_path):
    """Hub checkpoints carry top-level rope_theta / rope_scaling / torch_dtype; transformers 5 writes rope_parameters."""
    source, _ = hf_checkpoint("llama3")
    folder = tmp_path / "v4"
    shutil.copytree(source, folder)
    raw = json.loads((folder / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
    raw["torch_dtype"] = raw.pop("dtype")
    (folder / "config.json").write_text(json.dumps(raw))
    assert hf.load_checkpoint(folder)[0] == hf.load_checkpoint(source)[0]


def test_left_padding_does_not_change_logits(hf_checkpoint):
    folder, _ = hf_checkpoint("qwen3")
    config, params = hf.load_checkpoint(folder)
    short, long = random_tokens((1, 9), seed=2)[0], random_tokens((1, 20), seed=3)[0]
    tokens, mask = M.left_pad([short, long], 20, pad_id=0)
    padded = M.logits(params, config, tokens, mask)
    alone = M.logits(params, config, short[None], np.ones((1, 9), bool))
    assert np.isfinite(np.asarray(padded)).all()
    np.testing.assert_allclose(padded[0, -9:], alone[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(padded[1], M.logits(params, config, long[None], np.ones((1, 20), bool))[0], atol=1e-5, rtol=0)


def test_left_padded_logits_match_transformers_with_attention_mask(hf_checkpoint):
    folder, reference = hf_checkpoint("llama3")
    config, params = hf.load_checkpoint(folder)
    tokens, mask = M.left_pad([random_tokens((1, 7), seed=4)[0], random_tokens((1, 30), seed=5)[0]], 32, pad_id=0)
    ours = np.asarray(M.logits(params, config, tokens, mask))
    # transformers numbers positions 0..T-1 on padded rows in a plain forward, so compare row by row unpadded
    for row in range(2):
        real = mask[row]
        expected = torch_logits(reference, tokens[row][real][None])[0]
        np.testing.assert_allclose(ours[row][real], expected, atol=LOGIT_TOLERANCE, rtol=0)


@pytest.mark.parametrize("chunk_size", [4, 7, 64])
def test_chunked_logprobs_equal_a_full_log_softmax(hf_checkpoint, chunk_size):
    folder, _ = hf_checkpoint("qwen2", True)
    config, params = hf.load_checkpoint(folder)
    tokens = random_tokens((3, 21), seed=6)
    mask = np.ones_like(tokens, bool)
    temperature = 0.7
    logprobs, entropies = M.token_logprobs(params, config, tokens, mask, temperature=temperature, chunk_size=chunk_size)
    full = np.asarray(M.logits(params, config, tokens, mask), np.float64) / temperature
    log_softmax = full - np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1, keepdims=True)) - full.max(-1, keepdims=True)
    expected = np.take_along_axis(log_softmax[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    expected_entropy = -(np.exp(log_softmax) * log_softmax).sum(-1)[:, :-1]
    assert logprobs.shape == entropies.shape == tokens.shape
    np.testing.assert_array_equal(logprobs[:, 0], 0.0)
    np.testing.assert_allclose(logprobs[:, 1:], expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(entropies[:, 1:], expected_entropy, atol=1e-5, rtol=0)


def test_chunked_logprobs_have_the_gradient_of_the_full_log_softmax(hf_checkpoint):
    folder, _ = hf_checkpoint("qwen2", False)
    config, params = hf.load_checkpoint(folder)
    tokens = random_tokens((2, 13), seed=7)
    mask = np.ones_like(tokens, bool)

    def chunked(p):
        return M.token_logprobs(p, config, tokens, mask, chunk_size=5)[0].sum()

    def full(p):
        log_probs = jax.nn.log_softmax(M.logits(p, config, tokens, mask)[:, :-1], -1)
        return jnp.take_along_axis(log_probs, tokens[:, 1:, None], -1).sum()

    for a, b in zip(jax.tree.leaves(jax.grad(chunked)(params)), jax.tree.leaves(jax.grad(full)(params))):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_scored_positions_list_each_rows_columns_in_order_padded_with_the_width():
    mask = np.zeros((3, 40), bool)
    mask[0, 30:37] = True
    mask[1, [1, 5, 39]] = True
    positions = M.scored_positions(mask, minimum=4)
    assert positions.shape == (3, 8)  # the fullest row's 7 columns, to a power of two
    np.testing.assert_array_equal(positions[0], [30, 31, 32, 33, 34, 35, 36, 40])
    np.testing.assert_array_equal(positions[1], [1, 5, 39, 40, 40, 40, 40, 40])
    np.testing.assert_array_equal(positions[2], 40)  # a row with nothing to score
    assert M.scored_positions(np.ones((2, 12)), minimum=16).shape == (2, 12)  # never wider than the rows


def test_scored_logprobs_and_their_gradient_equal_the_full_ones_on_the_scored_columns(hf_checkpoint):
    """Unembedding only the scored columns (a response's) gives the full computation's log-probs and entropies
    there, 0 elsewhere, and the gradient of any loss that reads only them."""
    folder, _ = hf_checkpoint("qwen2", False)
    config, params = hf.load_checkpoint(folder)
    tokens = random_tokens((3, 19), seed=8)
    mask = np.ones_like(tokens, bool)
    scored = np.zeros(tokens.shape, np.float32)
    scored[0, 11:19], scored[1, 3:6], scored[1, 17] = 1, 1, 1  # row 2 scores nothing
    positions = M.scored_positions(scored, minimum=4)
    weights = np.random.default_rng(9).normal(size=tokens.shape) * scored

    def loss(p, positions):
        logprobs, entropies = M.token_logprobs(p, config, tokens, mask, 0.7, chunk_size=5, positions=positions)
        return (weights * (logprobs + 0.1 * entropies)).sum(), (logprobs, entropies)

    (_, full), full_grads = jax.value_and_grad(loss, has_aux=True)(params, None)
    (_, part), part_grads = jax.value_and_grad(loss, has_aux=True)(params, positions)
    for whole, cut in zip(full, part):
        np.testing.assert_allclose(cut, np.where(scored > 0, whole, 0.0), atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(full_grads), jax.tree.leaves(part_grads)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_training_flops_match_xlas_count_of_the_gradient():
    """MFU's numerator against XLA's own FLOP count of a compiled gradient (plain attention, no remat, no chunks),
    unembedding every token or a quarter of them: within 3% (the rest is elementwise work: norms, softmax)."""
    config = M.Config(model_type="qwen2", vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=2,
                      num_heads=8, num_kv_heads=2, head_dim=32, qkv_bias=True, tie_word_embeddings=True)
    params = M.init_params(config, jax.random.key(0))
    tokens = jnp.asarray(random_tokens((4, 64), seed=10) % config.vocab_size)
    mask = jnp.ones(tokens.shape, bool)
    scored = np.zeros(tokens.shape)
    scored[:, 48:] = 1

    def loss(p, first):
        hidden, _ = M.forward(p, config, tokens, mask, attention="plain")
        return jax.nn.log_softmax(M.unembed(p, config, hidden[:, first:]), -1)[..., 0].sum()

    for first, unembedded in ((0, np.ones(tokens.shape)), (48, scored)):
        analysis = jax.jit(jax.grad(loss), static_argnums=1).lower(params, first).compile().cost_analysis()
        counted = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
        np.testing.assert_allclose(estimates.training_flops(config, mask, unembedded), counted, rtol=0.03)


# ---- blockwise attention: the plain attention's numbers without its [T, T] matrix ----

BLOCK = 8  # small blocks, so short rows span several of them, and row lengths that are no multiple of them


def left_padded_rows(lengths, width, seed):
    rows = [random_tokens((1, n), seed=seed + i)[0] for i, n in enumerate(lengths)]
    return M.left_pad(rows, width, pad_id=0)


@pytest.mark.parametrize("attention", ["blockwise", "fused"])  # fused: jax.nn.dot_product_attention (XLA on a CPU)
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_blockwise_attention_gives_the_plain_logits(hf_checkpoint, architecture, attention):
    config, params = hf.load_checkpoint(hf_checkpoint(architecture)[0])
    tokens, mask = left_padded_rows([37, 21, 5], 37, seed=10)  # 37 = 4 blocks and 5 positions
    plain = np.asarray(M.logits(params, config, tokens, mask, attention="plain"))
    hidden, _ = M.forward(params, config, tokens, mask, attention=attention, attention_block=BLOCK)
    blockwise = np.asarray(M.unembed(params, config, hidden))
    np.testing.assert_allclose(blockwise[mask], plain[mask], atol=1e-5, rtol=0)
    assert np.isfinite(blockwise).all()  # pad positions too: their garbage must not become NaN in a gradient


@pytest.mark.parametrize("attention", ["blockwise", "fused"])
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_blockwise_attention_gives_the_plain_gradients(hf_checkpoint, architecture, attention):
    """The custom VJP (probabilities recomputed block by block) against autodiff through the plain softmax."""
    config, params = hf.load_checkpoint(hf_checkpoint(architecture)[0])
    tokens, mask = left_padded_rows([29, 12], 29, seed=20)
    # a loss on every real token, a row's first too: it is predicted from the last pad slot, whose attention is 0
    weights = np.random.default_rng(3).normal(size=(2, 28)) * mask[:, 1:]

    def loss(p, attention):
        hidden, _ = M.forward(p, config, tokens, mask, attention=attention, attention_block=BLOCK)
        logprobs, _ = M.logprobs_from_hidden(p, config, hidden[:, :-1], tokens[:, 1:])
        return (logprobs * weights).sum()

    plain, blockwise = jax.grad(loss)(params, "plain"), jax.grad(loss)(params, attention)
    for name, a, b in zip(jax.tree_util.tree_leaves_with_path(plain), jax.tree.leaves(plain), jax.tree.leaves(blockwise)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(name[0]))


def attention_inputs(lengths, width, seed=0, kv_heads=2, groups=2, head_dim=16):
    """Random q [b, width, kv_heads, groups, d], k, v [b, width, kv_heads, d] and the mask of left-padded rows."""
    rng = np.random.default_rng(seed)
    mask = np.arange(width)[None, :] >= width - np.asarray(lengths)[:, None]
    q = rng.normal(size=(len(lengths), width, kv_heads, groups, head_dim)).astype(np.float32)
    k, v = (rng.normal(size=(len(lengths), width, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    return q, k, v, mask


@pytest.mark.parametrize("form", ["plain", "blockwise", "fused"])
def test_a_pad_query_attends_to_nothing_in_every_form(form):
    q, k, v, mask = attention_inputs([37, 21, 5, 0], 37)  # 0: a row of padding only
    out = np.asarray(A.attention(q, k, v, jnp.asarray(mask), implementation=form, block=BLOCK))
    assert (out[~mask] == 0).all()
    plain = np.asarray(A.attention(q, k, v, jnp.asarray(mask), implementation="plain"))
    np.testing.assert_allclose(out[mask], plain[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("argument", ["q", "k", "v"])
@pytest.mark.parametrize("form", ["plain", "blockwise"])
def test_attention_gradient_is_the_derivative_of_its_forward_with_pad_rows(form, argument):
    """<vjp(g), d> against a central difference of <g, attention> along a random direction d: a cotangent on every
    query (pad queries too), left-padded rows of several lengths (one all padding), 37 slots: no multiple of the
    block. The blockwise form's custom VJP once recomputed a pad query's probabilities as 1 instead of 1/n."""
    q, k, v, mask = attention_inputs([37, 21, 5, 0], 37, seed=1)
    inputs = {"q": q, "k": k, "v": v}
    rng = np.random.default_rng(2)
    cotangent = rng.normal(size=q.shape).astype(np.float32)
    direction = rng.normal(size=inputs[argument].shape).astype(np.float32)

    def forward(x):
        given = {**inputs, argument: x}
        return A.attention(given["q"], given["k"], given["v"], jnp.asarray(mask), implementation=form, block=BLOCK)

    _, vjp = jax.vjp(forward, inputs[argument])
    derivative = float(jnp.vdot(vjp(jnp.asarray(cotangent))[0], direction))
    h = 1e-2
    along = lambda t: float(jnp.vdot(cotangent, forward(inputs[argument] + t * direction)))
    np.testing.assert_allclose(derivative, (along(h) - along(-h)) / (2 * h), rtol=2e-3, atol=1e-2)


def test_blockwise_attention_fills_the_same_cache_in_a_prefill(hf_checkpoint):
    """The sampler's prefill: queries written at the cache's index, keys over the whole cache."""
    config, params = hf.load_checkpoint(hf_checkpoint("qwen3")[0])
    tokens, mask = left_padded_rows([19, 7], 19, seed=30)
    results = {}
    for attention in ("plain", "blockwise"):
        cache = M.init_cache(config, 2, 19 + 13)
        hidden, cache = M.forward(params, config, tokens, mask, cache, attention=attention, attention_block=BLOCK)
        results[attention] = (np.asarray(hidden), cache)
    (plain, plain_cache), (blockwise, blockwise_cache) = results["plain"], results["blockwise"]
    np.testing.assert_allclose(blockwise[mask], plain[mask], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(blockwise_cache.mask, plain_cache.mask)
    assert int(blockwise_cache.index) == int(plain_cache.index) == 19
    real = np.asarray(plain_cache.mask)  # pad slots hold garbage that no query reads
    for a, b in zip(plain_cache.k + plain_cache.v, blockwise_cache.k + blockwise_cache.v):
        np.testing.assert_allclose(np.asarray(b)[real], np.asarray(a)[real], atol=1e-5, rtol=0)


def test_auto_attention_is_blockwise_only_past_one_block():
    q = jnp.zeros((1, 9, 1, 1, 4))
    kv = jnp.zeros((1, 9, 1, 4))
    blockwise = jax.make_jaxpr(lambda q: A.attention(q, kv, kv, jnp.ones((1, 9), bool), block=8))(q)
    plain = jax.make_jaxpr(lambda q: A.attention(q, kv, kv, jnp.ones((1, 9), bool), block=16))(q)
    assert "custom_vjp" in str(blockwise) and "custom_vjp" not in str(plain)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_exported_checkpoint_opens_in_transformers_with_the_same_logits(hf_checkpoint, tmp_path, architecture, tied):
    import torch
    import transformers

    folder, _ = hf_checkpoint(architecture, tied)
    config, params = hf.load_checkpoint(folder)
    params = jax.tree.map(lambda x: x * 1.01, params)  # a "trained" model, different from the source
    hf.save_checkpoint(tmp_path / "out", config, params, max_shard_bytes=50_000)  # sharded on purpose
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = random_tokens((2, 30), seed=8)
    ours = M.logits(params, config, tokens, np.ones_like(tokens, bool))
    np.testing.assert_allclose(torch_logits(reloaded, tokens), ours, atol=LOGIT_TOLERANCE, rtol=0)
    assert hf.load_checkpoint(tmp_path / "out")[0] == config


def test_bfloat16_parameters_load_and_stay_close(hf_checkpoint):
    folder, reference = hf_checkpoint("qwen2")
    config, params = hf.load_checkpoint(folder, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    tokens = random_tokens((1, 16), seed=9)
    ours = np.asarray(M.logits(params, config, tokens, np.ones_like(tokens, bool)))
    assert ours.dtype == np.float32
    assert np.abs(ours - torch_logits(reference, tokens)).max() < 0.1  # bfloat16 keeps ~3 significant digits


def test_tokenizer_loads_with_its_chat_template(tmp_path):
    tokenizer = hf.train_tokenizer(["You are an agent. Move left.", "<answer>Up || Left</answer>"], vocab_size=280)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    loaded = hf.load_tokenizer(tmp_path)
    text = "You are an agent. Move left, then <answer>Up</answer>!\n"
    assert loaded.decode(loaded(text)["input_ids"]) == text
    chat = loaded.apply_chat_template([{"role": "user", "content": "Move left."}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nMove left.<|im_end|>\n<|im_start|>assistant\n"


WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # PyTorch absent, as for a user (the tests install it)
{}
"""


@pytest.mark.parametrize("code, warns", [
    ("from engine import hf; hf.load_tokenizer(sys.argv[1]).encode('a')", False),
    ("from engine import hf; hf.train_tokenizer(['Move left.'], 280)", False),
    ("import transformers", True),  # the warning, as transformers prints it to anyone else
])
def test_loading_a_tokenizer_without_pytorch_does_not_warn_that_pytorch_is_missing(code, warns, tmp_path):
    """The project never asks transformers for a PyTorch model: only its one warning about that is left out."""
    hf.train_tokenizer(["You are an agent. Move left."], vocab_size=280).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH.format(code), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert ("PyTorch was not found" in done.stdout + done.stderr) == warns


# ---- errors a user can cause: one clear message naming the problem and the fix ----


def test_folder_without_config_json_names_the_problem(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(hf.CheckpointError, match="No config.json"):
        hf.load_checkpoint(tmp_path)


def test_unsupported_architecture_names_it_and_lists_the_supported_ones(tmp_path):
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(hf.CheckpointError, match=r"GPT2LMHeadModel.*'gpt2'.*Supported: Qwen2ForCausalLM"):
        hf.load_checkpoint(tmp_path)


def test_missing_shard_names_the_file(hf_checkpoint, tmp_path):
    source, _ = hf_checkpoint("qwen2", False, sharded=True)
    shutil.copytree(source, tmp_path / "ckpt")
    victim = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(hf.CheckpointError, match=f"Shard '{victim.name}'.*missing"):
        hf.load_checkpoint(tmp_path / "ckpt")


def test_weight_of_the_wrong_shape_names_the_weight_and_both_shapes(hf_checkpoint, tmp_path):
    source, _ = hf_checkpoint("qwen2")
    shutil.copytree(source, tmp_path / "ckpt")
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    raw["intermediate_size"] = 128  # the weights were saved with 96
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(hf.CheckpointError, match=r"mlp\.\w+_proj\.weight.*\(96, 64\).*\(128, 64\)|mlp\.\w+_proj\.weight.*\(64, 96\).*\(64, 128\)"):
        hf.load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_truncated_safetensors_file_names_the_file_and_says_to_download_again(hf_checkpoint, tmp_path, sharded):
    source, _ = hf_checkpoint("qwen2", False, sharded=sharded)
    shutil.copytree(source, tmp_path / "ckpt")
    victim = sorted((tmp_path / "ckpt").glob("model*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])  # an interrupted download
    with pytest.raises(hf.CheckpointError, match=rf"{re.escape(str(victim))}.*(cannot be read|incomplete).*Fix: download"):
        hf.load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_invalid_json_names_the_file(hf_checkpoint, tmp_path, name):
    source, _ = hf_checkpoint("qwen2", False, sharded=True)
    shutil.copytree(source, tmp_path / "ckpt")
    broken = tmp_path / "ckpt" / name
    broken.write_text(broken.read_text()[:-20])  # cut off mid-object
    with pytest.raises(hf.CheckpointError, match=rf"{re.escape(str(broken))} is not valid JSON .*line \d+.*Fix: "):
        hf.load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "num_attention_heads"])
def test_config_without_a_required_key_names_the_key(hf_checkpoint, tmp_path, key):
    source, _ = hf_checkpoint("qwen2")
    shutil.copytree(source, tmp_path / "ckpt")
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del raw[key]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(hf.CheckpointError, match=rf"config.json lacks {key}.*Fix: "):
        hf.load_checkpoint(tmp_path / "ckpt")


def broken_copy(hf_checkpoint, tmp_path, sharded=False):
    source, _ = hf_checkpoint("qwen2", False, sharded=sharded)
    shutil.copytree(source, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_index_naming_a_shard_that_lacks_the_tensor_names_the_shard(hf_checkpoint, tmp_path):
    folder = broken_copy(hf_checkpoint, tmp_path, sharded=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    moved = next(name for name, shard in index["weight_map"].items() if shard == shards[0])
    index["weight_map"][moved] = shards[1]  # an index from another version of the checkpoint
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(hf.CheckpointError, match=rf"{re.escape(str(folder / shards[1]))} lacks the weight "
                                               rf"{re.escape(moved)}.*Fix: download the checkpoint again"):
        hf.load_checkpoint(folder)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_folder_where_a_checkpoint_file_should_be_names_it(hf_checkpoint, tmp_path, name):
    folder = broken_copy(hf_checkpoint, tmp_path)
    (folder / name).unlink()
    (folder / name).mkdir()
    with pytest.raises(hf.CheckpointError, match=rf"{re.escape(str(folder / name))} is a folder.*Fix: "):
        hf.load_checkpoint(folder)


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 0, "head_dim": None}, r"num_attention_heads to 0; it must be a whole number"),
    ({"hidden_size": "64"}, r"hidden_size to '64'; it must be a whole number"),
    ({"num_key_value_heads": 3}, r"4 attention heads, which do not share 3 key-value heads"),
    ({"rope_scaling": "linear"}, r"rope_scaling to 'linear', where transformers writes a JSON object"),
    ({"rope_theta": "fast", "rope_parameters": {"rope_type": "default", "rope_theta": "fast"}},
     r"a value model.py cannot read \(ValueError"),
], ids=["zero heads", "a string size", "uneven groups", "rope_scaling a string", "rope_theta a string"])
def test_config_with_a_value_of_the_wrong_kind_names_it(hf_checkpoint, tmp_path, change, message):
    folder = broken_copy(hf_checkpoint, tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(change)
    raw = {key: value for key, value in raw.items() if value is not None}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(hf.CheckpointError, match=rf"config.json (sets |has |holds ){message}.*Fix: "):
        hf.load_checkpoint(folder)


@pytest.mark.parametrize("value, message", [("int32", "is stored as int32"), ("nan", "not finite")])
def test_an_integer_or_nan_weight_is_refused_on_load(hf_checkpoint, tmp_path, value, message):
    from safetensors.numpy import load_file, save_file

    folder = broken_copy(hf_checkpoint, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    if value == "int32":
        tensors[name] = tensors[name].astype(np.int32)
    else:
        tensors[name][3, 5] = np.nan
    save_file(tensors, folder / "model.safetensors", {"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=rf"{re.escape(name)} in {re.escape(str(folder))}.*{message}.*Fix: "):
        hf.load_checkpoint(folder)


def test_a_bare_hub_id_while_offline_says_offline_not_no_folder():
    with pytest.raises(hf.CheckpointError, match=r"'gpt2'.*not a local folder.*offline.*hf download gpt2"):
        hf.load_checkpoint("gpt2")


def test_folder_without_tokenizer_files_names_the_problem(hf_checkpoint):
    """save_pretrained of a model writes no tokenizer; transformers would quietly build one that encodes nothing."""
    folder, _ = hf_checkpoint("qwen2")
    assert not list(folder.glob("tokenizer*"))
    with pytest.raises(hf.CheckpointError, match=rf"{folder}.*no usable tokenizer.*Fix: .*save_pretrained"):
        hf.load_tokenizer(folder)


def test_hub_id_while_offline_says_how_to_get_the_weights():
    with pytest.raises(hf.CheckpointError, match=r"offline.*hf download no-such-org/no-such-model"):
        hf.load_checkpoint("no-such-org/no-such-model")


def test_hub_id_whose_download_fails_online_says_what_failed_and_not_hf_hub_offline(monkeypatch):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(hf.CheckpointError) as error:
        hf.load_checkpoint("no-such-org/no-such-model")
    message = str(error.value)
    assert "download failed (ConnectionError: Failed to resolve 'huggingface.co')" in message
    assert "HF_HUB_OFFLINE" not in message and "hf download no-such-org/no-such-model" in message


def test_missing_local_folder_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(hf.CheckpointError, match="No checkpoint folder"):
        hf.load_checkpoint(tmp_path / "nowhere" / "model")
