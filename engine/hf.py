"""Hugging Face checkpoints: a folder or Hub id resolved, a checkpoint loaded and saved (every tensor and shape checked,
every fault a CheckpointError naming the file and the fix), its tokenizer, and small tokenizers trained here.

The format itself (config.json as a model.Config, each tensor's name and layout) is `hf_format.py`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import model as lm
from engine import gguf
from engine.hf_format import CheckpointError, WeightSpec, config_from_hf, config_to_hf, weight_specs

Params = lm.Params


def _looks_like_hub_id(name: str) -> bool:
    """An "org/name" or bare "name" (gpt2, bert-base-uncased: the Hub's oldest ids) that is not a path."""
    return re.fullmatch(r"([\w.-]+/)?[\w.-]+", name) is not None and not name.startswith((".", "/", "~"))


def cache_root() -> Path:
    """Where the project keeps the checkpoints it makes (embedded defaults, converted GGUF files): $RWML_JAX_CACHE, or
    ~/.cache/rwml-jax."""
    return Path(os.environ.get("RWML_JAX_CACHE") or "~/.cache/rwml-jax").expanduser()


def resolve_checkpoint(model: str | Path, cache: str | Path | None = None) -> Path:
    """A checkpoint folder: a local one; a GGUF file, a folder holding one, or a short name such as
    smollm2-135m-instruct, converted once into `cache` (default cache_root()); or a Hub id downloaded (or found in
    the cache) into one."""
    folder = Path(model).expanduser()
    file = gguf.gguf_file(folder)
    if file is None and not folder.exists() and str(model) in gguf.SHORT_NAMES:
        file = gguf.short_name_file(str(model))
    if file is not None:
        return gguf.converted(file, Path(cache).expanduser() if cache else cache_root())
    if folder.is_dir():
        return folder
    if not _looks_like_hub_id(str(model)):
        raise CheckpointError(f"No checkpoint folder at '{model}'. Fix: pass an existing folder, a .gguf file or a "
                              "Hub id such as Qwen/Qwen2.5-0.5B-Instruct.")
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


def load_checkpoint(model: str | Path, dtype=jnp.float32, backbone: bool = False) -> tuple[lm.Config, Params]:
    """Config and parameters (in `dtype`) from a Hugging Face checkpoint folder or Hub id.

    backbone=True: the decoder without its LM head, for an embedder, which never unembeds. It reads CausalLM
    checkpoints (`model.layers.0...`) and bare backbones (`layers.0...`, no `lm_head` even where config.json says
    untied), as Qwen/Qwen3-Embedding-* and transformers' Qwen3Model.save_pretrained store them; the config returned
    says tied, so the parameters hold no lm_head.
    """
    folder = resolve_checkpoint(model)
    config = config_from_hf(*read_config(folder))
    if backbone:
        config = dataclasses.replace(config, tie_word_embeddings=True)
    prefixed = lambda name: name if not backbone or name.startswith(("model.", "lm_head.")) else f"model.{name}"
    # a tied checkpoint may still store lm_head (a copy of the embedding); rotary_emb.inv_freq is a buffer
    unused = lambda name: (name == "lm_head.weight" and config.tie_word_embeddings) or name.endswith("rotary_emb.inv_freq")
    return config, load_weights(folder, weight_specs(config), prefixed, unused, dtype)


def import_transformers():
    """transformers, imported without the warning it logs when PyTorch is absent ("PyTorch was not found. Models
    won't be available..."): the project asks it only for tokenizers and runs its models in JAX, so a user without
    PyTorch (a test-only dependency) would read a warning about nothing. Its other messages are left as they are."""
    def not_about_pytorch(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found")

    logger = logging.getLogger("transformers")  # the package's own logger, where that warning is logged on import
    logger.addFilter(not_about_pytorch)
    try:
        import transformers
    finally:
        logger.removeFilter(not_about_pytorch)
    return transformers


def load_tokenizer(model: str | Path):
    """The checkpoint's tokenizer (chat template included) through transformers.AutoTokenizer."""
    AutoTokenizer = import_transformers().AutoTokenizer

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


def save_checkpoint(folder: str | Path, config: lm.Config, params: Params, tokenizer=None,
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
    (folder / "config.json").write_text(json.dumps(config_to_hf(config, dtype), indent=2) + "\n")
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

    PreTrainedTokenizerFast = import_transformers().PreTrainedTokenizerFast

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
