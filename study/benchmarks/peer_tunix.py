"""google-tunix on the same work as this project's benchmarks: run by the tunix virtual environment's python.

    /work/venv-tunix/bin/python study/benchmarks/peer_tunix.py CHECKPOINT_DIR BATCH.npz [--generate N] [--prefill] [--grpo]

study/benchmarks/generation.py and study/benchmarks/grpo_step.py start it with `--tunix-python PYTHON`, after writing the
checkpoint and the batch; it may also be run by hand on their files. It imports only numpy, jax, flax, optax and tunix
(never this project's modules: the tunix environment may hold other jax versions), and prints its timings as one JSON
line starting with "PEER_JSON " at the end.

The environment (study/benchmarks/peer.py): python -m venv /work/venv-tunix;
/work/venv-tunix/bin/pip install google-tunix==0.1.7 (it brings its own jax, flax and optax; torch is not needed).

What runs, all tunix's own code, float32 parameters and compute:
  model     tunix.models.qwen2.model.Qwen2, loaded by tunix.models.qwen2.params.create_model_from_safe_tensors from the
            HF Qwen2 safetensors folder; the ModelConfig is filled from the folder's config.json (tunix has presets
            only for released sizes).
  generate  tunix.generate.sampler.Sampler.__call__ with temperature 1, top_p 1.0 (tunix's "top_p" mode, whose
            1.0 / no top_k path draws with jax.random.categorical over the whole vocabulary; temperature alone would
            be greedy), no log-probs returned (the GRPO learner recomputes them), echo off. Its KV cache holds
            prompt + new tokens. The call includes tunix's Python side: "tokenizing" the prompt strings and decoding
            the outputs to text, through a stand-in tokenizer whose strings are the ids written out (tunix's sampler
            takes strings only). Pad id -1 (the random prompts may contain any real id, and tunix derives masks from
            the pad id) and EOS id -1, so no row stops early: exactly batch x N tokens come out. Like this project's
            sampler, tunix runs one prefill and then N single-token forward passes, the last one's logits unused.
  prefill   the same call with 1 new token.
  grpo      one update as tunix's GRPO learner computes it: the loss is the learner's own closure around
            tunix.rl.algo_core.grpo_loss_fn (the registered "grpo" policy loss: per-token log-probs of the completion
            by tunix.rl.common.compute_per_token_logps, clipped ratio, KL by common.compute_kl_divergence, aggregation
            by common.aggregate_loss), with GRPOConfig(beta, epsilon, loss_agg_mode "token-mean",
            kl_loss_mode "low_var_kl" = k3); the step is the learner's actor trainer, tunix.rl.trainer.Trainer (a
            PeftTrainer): its jit_train_and_eval_step gives nnx.jit(_train_step, donate optimizer), i.e.
            nnx.value_and_grad of that loss, optax.global_norm of the gradient and nnx.Optimizer.update. Assembled
            here instead of a full GRPOLearner (whose RLCluster would also own a rollout engine and a reference
            model): the TrainExample is built directly from the batch's arrays (prompt ids, completion ids and mask,
            the batch's old and reference log-probs of the completion tokens, one advantage per row), and the
            trainer's jitted step is called directly instead of through Trainer.train's data loop. The optimizer is
            the project's: clip_by_global_norm(1.0) then adamw(lr, 0.9, 0.999, weight_decay 0.01).
            tunix's default aggregation is sequence-mean-token-mean and its default KL is "kl" (k1); both are set here
            to the project's token-mean and k3. tunix does not clamp the KL's log-ratio (kl_clamp_value None), the
            project clamps it at +-20: equal on any batch whose |log pi - log pi_ref| < 20.

Where the work differs from this project's (the same number of tokens comes out; the first-step GRPO loss
agrees to ~1e-6 relative):
  - tunix's Qwen2 returns float32 logits for every position it is given. Its prefill therefore projects all prompt
    positions onto the vocabulary (ours only the last one), and its GRPO forward builds [batch, prompt + completion,
    vocab] logits at once, then keeps the completion's; ours projects only the completion's positions (the columns
    the loss reads), in chunks of 512 under jax.checkpoint (a single chunk, as here, is not recomputed).
  - tunix's GRPO loss also computes the full-vocabulary entropy of the completion (a logged aux value, not in the
    loss); ours computes the entropy of every token too (a logged metric).
  - ours is train.py's update, grpo.LengthSortedUpdate (jitted gradient and optimizer step, one micro-batch here,
    donating the train state, with a skip of non-finite updates); tunix's is one nnx.jit(_train_step) donating the
    optimizer.
  - sampling: both jit a prefill and a while-loop decode; tunix builds its sampling state eagerly in Python on each
    call and converts ids to text and back around it; ours also returns each token's log-prob and entropy.

Timings: the first call (compile included) apart, then the median of --repeats calls, each waited for; the GRPO step
gets a second warm-up call, because tunix's jitted train step compiles again on its second call (see time_grpo).
"""

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

warnings.filterwarnings("ignore")
logging.getLogger("absl").setLevel(logging.ERROR)

from tunix.generate import sampler as sampler_lib  # noqa: E402
from tunix.models.qwen2 import model as qwen2_model  # noqa: E402
from tunix.models.qwen2 import params as qwen2_params  # noqa: E402
from tunix.rl import algo_core  # noqa: E402
from tunix.rl import trainer as rl_trainer  # noqa: E402
from tunix.rl.grpo import grpo_learner  # noqa: E402
from tunix.sft import peft_trainer  # noqa: E402

from timing import timed  # noqa: E402  (beside this script; imports only jax)

PAD_ID = -1  # never a real id: tunix's sampler and log-prob code derive masks from `tokens != pad_id`
EOS_ID = -1  # never sampled: no row stops early


def model_config(folder: Path) -> qwen2_model.ModelConfig:
    """tunix's Qwen2 ModelConfig from an HF config.json (transformers 4.x or 5.x layout)."""
    hf = json.loads((folder / "config.json").read_text())
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    if hf.get("rope_scaling"):
        raise ValueError(f"tunix's Qwen2 has no RoPE scaling; config.json has {hf['rope_scaling']}")
    return qwen2_model.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        rope_theta=rope_theta,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        use_tied_embedding=hf.get("tie_word_embeddings", False),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    )


def load_model(folder: Path):
    config = model_config(folder)
    return qwen2_params.create_model_from_safe_tensors(str(folder), config, mesh=None, dtype=jnp.float32), config


class IdsTokenizer:
    """tunix's sampler takes prompt strings: these strings are the token ids written out, so no tokenizer is needed."""

    def encode(self, text, **_):
        return [int(t) for t in text.split()]

    def decode(self, ids, **_):
        return " ".join(str(int(t)) for t in ids)

    def bos_id(self):
        return None  # no BOS is prepended

    def eos_id(self):
        return EOS_ID

    def pad_id(self):
        return PAD_ID


def time_generation(model, config, prompts: np.ndarray, new_tokens: int, repeats: int, seed: int = 0) -> dict:
    batch, prompt_length = prompts.shape
    cache = sampler_lib.CacheConfig(cache_size=prompt_length + new_tokens, num_layers=config.num_layers,
                                    num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
    sampler = sampler_lib.Sampler(transformer=model, tokenizer=IdsTokenizer(), cache_config=cache)
    strings = [" ".join(map(str, row)) for row in prompts.tolist()]
    out = {}

    def run():
        out["result"] = sampler(strings, max_generation_steps=new_tokens, max_prompt_length=prompt_length,
                                temperature=1.0, top_p=1.0, top_k=None, seed=seed, eos_tokens=[EOS_ID])

    first, seconds = timed(run, repeats)
    produced = sum(len(t) for t in out["result"].tokens)
    if produced != batch * new_tokens:
        raise RuntimeError(f"tunix produced {produced} tokens, not {batch} x {new_tokens}")
    return {"seconds": seconds, "first": first, "tokens": produced, "tokens_per_s": produced / seconds}


def time_grpo(model, batch: dict, beta: float, epsilon: float, learning_rate: float, repeats: int) -> dict:
    prompt_length = int(batch["prompt_length"])
    tokens = batch["tokens"].astype(np.int32)
    if not batch["token_mask"].all():
        raise ValueError("this peer takes unpadded rows only (tunix derives masks from the pad id)")
    completion = slice(prompt_length, None)
    example = grpo_learner.TrainExample(
        prompt_ids=jnp.asarray(tokens[:, :prompt_length]),
        prompt_mask=jnp.ones((tokens.shape[0], prompt_length), jnp.int32),
        completion_ids=jnp.asarray(tokens[:, completion]),
        completion_mask=jnp.asarray(batch["loss_mask"][:, completion], jnp.float32),
        advantages=jnp.asarray(batch["advantages"][:, prompt_length], jnp.float32),  # one per row, as the learner's
        ref_per_token_logps=jnp.asarray(batch["ref_logprobs"][:, completion], jnp.float32),
        old_per_token_logps=jnp.asarray(batch["old_logprobs"][:, completion], jnp.float32),
    )
    algo_config = grpo_learner.GRPOConfig(num_generations=2, beta=beta, epsilon=epsilon, loss_agg_mode="token-mean",
                                          kl_loss_mode="low_var_kl")
    algo_config.temperature = 1.0  # GRPOLearner.__init__ copies the rollout temperature here

    # As GRPOLearner.__init__ wraps the registered policy loss for its actor trainer.
    policy_loss_fn = algo_core.grpo_loss_fn
    loss_fn = lambda model, train_example, algo_config: policy_loss_fn(  # noqa: E731
        model, train_example, algo_config=algo_config, pad_id=PAD_ID, eos_id=EOS_ID)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(learning_rate, 0.9, 0.999, weight_decay=0.01))
    trainer = rl_trainer.Trainer(model=model, optimizer=optimizer,
                                 training_config=peft_trainer.TrainingConfig(eval_every_n_steps=10**9),
                                 custom_checkpoint_metadata_fn=lambda: {})
    trainer.with_loss_fn(loss_fn, has_aux=True)
    trainer.with_gen_model_input_fn(lambda x: {"train_example": x, "algo_config": algo_config})
    train_step, _ = trainer.jit_train_and_eval_step()
    losses = []

    def run():
        loss, aux, grad_norm = train_step(example)
        jax.block_until_ready((loss, aux, grad_norm))
        losses.append((float(loss), float(aux["pg_loss"]), float(aux["kl_loss"]), float(grad_norm)))

    # Two warm-up calls: the first call commits the optimizer state that nnx.Optimizer created uncommitted (its step
    # count) to the device, so the second call compiles the step again (as the second step of a tunix run would, on
    # one CPU device; on a mesh the trainer shards the optimizer state before the first call).
    first, seconds = timed(run, repeats, warmups=2)
    loss, pg_loss, kl_loss, grad_norm = losses[0]
    return {"seconds": seconds, "first": first, "loss": loss, "pg_loss": pg_loss, "kl_loss": kl_loss,
            "grad_norm": grad_norm, "losses": [entry[0] for entry in losses]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="HF Qwen2 safetensors folder")
    parser.add_argument("batch", type=Path, help=".npz: prompts [b, p] for generation; tokens, token_mask, loss_mask, "
                        "old_logprobs, ref_logprobs, advantages [b, t] and prompt_length for --grpo")
    parser.add_argument("--generate", type=int, default=0, help="time generating this many new tokens per prompt")
    parser.add_argument("--prefill", action="store_true", help="time generation of 1 new token (prefill only)")
    parser.add_argument("--grpo", action="store_true", help="time one GRPO update on the batch")
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--epsilon", type=float, default=0.2)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from importlib.metadata import version
    report = {"peer": "google-tunix", "version": version("google-tunix"), "jax": jax.__version__,
              "flax": version("flax"), "platform": jax.devices()[0].platform, "python": sys.version.split()[0]}
    data = dict(np.load(args.batch))
    model, config = load_model(args.checkpoint)
    report["parameters"] = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
    if args.generate:
        report["generate"] = time_generation(model, config, data["prompts"], args.generate, args.repeats)
    if args.prefill:
        report["prefill"] = time_generation(model, config, data["prompts"], 1, args.repeats)
    if args.grpo:
        report["grpo"] = time_grpo(model, data, args.beta, args.epsilon, args.learning_rate, args.repeats)
    print("PEER_JSON " + json.dumps(report), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
