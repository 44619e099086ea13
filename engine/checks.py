"""Every input a user can get wrong, checked before anything is written: each number in its range, the settings
that exclude each other, the model, the data and the output folder that a run needs, and a resumed run's settings
against those it was started with. One message a problem, naming the flag and the fix (settings.UsageError).
"""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import jax

import envs
from engine import checkpoints, embedders, hf, pretrain
from engine.settings import STAGES, Args, UsageError, flags, followed, setting_changes, settle


# Every number on the command line: (flag, what it must be, the test, an example for the fix where the run's recipe
# has no value). Checked after settle(), so those the recipe fills hold numbers; one still None (e.g. --max-length)
# is skipped.
AT_LEAST_ONE = ("at least 1", lambda v: v >= 1)
RATE = ("a finite number > 0", lambda v: math.isfinite(v) and v > 0)
FRACTION = ("in [0, 1]", lambda v: math.isfinite(v) and 0 <= v <= 1)
DISTANCE = ("in [0, 2] (1 - cos lies there)", lambda v: math.isfinite(v) and 0 <= v <= 2)
FINITE = ("a finite number", math.isfinite)
NOT_NEGATIVE = ("a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
NUMBER_RULES = [
    ("--iterations", *AT_LEAST_ONE, "150"), ("--groups", *AT_LEAST_ONE, "16"), ("--group-size", *AT_LEAST_ONE, "8"),
    ("--max-turns", *AT_LEAST_ONE, "10"), ("--grid-size", "at least 2", lambda v: v >= 2, "4"), ("--learning-rate", *RATE, "1e-6"), ("--weight-decay", *NOT_NEGATIVE, "0.01"),
    ("--max-grad-norm", *RATE, "1.0"),
    ("--temperature", "a finite number > 0 (log-probs are recomputed at it)", lambda v: math.isfinite(v) and v > 0, "1.0"),
    ("--max-new-tokens", *AT_LEAST_ONE, "512"), ("--history", "at least 0", lambda v: v >= 0, "2"),
    ("--actions-per-turn", *AT_LEAST_ONE, "1"),
    ("--clip-low", "in [0, 1) (the ratio is clipped below at 1 - clip_low)", lambda v: math.isfinite(v) and 0 <= v < 1,
     "0.2"),
    ("--clip-high", *NOT_NEGATIVE, "0.2"), ("--beta", *NOT_NEGATIVE, "0.01"), ("--kl-clamp", *RATE, "20"),
    ("--entropy-coef", *FINITE, "0"), ("--max-length", *AT_LEAST_ONE, "512"),
    ("--alpha", *FRACTION, "0.75"), ("--rho", *FRACTION, "0.2"), ("--fixed-lambda", *FINITE, "1.0"),
    ("--r-max", *RATE, "10"),
    ("--wm-tasks", *AT_LEAST_ONE, "2048"), ("--wm-rollouts", *AT_LEAST_ONE, "3"), ("--wm-max-turns", *AT_LEAST_ONE, "30"),
    ("--wm-epochs", *AT_LEAST_ONE, "2"), ("--wm-batch", *AT_LEAST_ONE, "32"), ("--wm-group-size", *AT_LEAST_ONE, "8"),
    ("--wm-learning-rate", *RATE, "1e-6"), ("--wm-beta", *NOT_NEGATIVE, "0.001"), ("--sft-learning-rate", *RATE, "2e-6"),
    ("--wm-max-new-tokens", *AT_LEAST_ONE, "512"), ("--tau-d", *DISTANCE, "0.2"),
    ("--filter.samples", *AT_LEAST_ONE, "10"), ("--filter.tau-easy", *FRACTION, "0"),
    ("--filter.keep-easy", *FRACTION, "0.1"),
    ("--filter.target-easy-fraction", "a finite number <= 1 (<= 0: use --filter.tau-d)",
     lambda v: math.isfinite(v) and v <= 1, "0.3"),
    ("--filter.tau-d", *DISTANCE, "0.1"), ("--filter.sft-epochs", *AT_LEAST_ONE, "2"),
    ("--filter.sft-batch-size", *AT_LEAST_ONE, "32"), ("--filter.max-new-tokens", *AT_LEAST_ONE, "128"),
    ("--spa.tasks", *AT_LEAST_ONE, "160"), ("--spa.rollouts", *AT_LEAST_ONE, "8"), ("--spa.max-turns", *AT_LEAST_ONE, "5"),
    ("--spa.epochs", *AT_LEAST_ONE, "5"), ("--spa.learning-rate", *RATE, "1e-4"), ("--spa.batch", *AT_LEAST_ONE, "32"),
    ("--eval.every", *AT_LEAST_ONE, "10"), ("--eval.wm-every", *AT_LEAST_ONE, "10"),
    ("--eval.episodes", *AT_LEAST_ONE, "128"),
    ("--eval.temperature", "a finite number >= 0 (0: greedy)", lambda v: math.isfinite(v) and v >= 0, "0.4"),
    ("--eval.samples", *AT_LEAST_ONE, "1"), ("--eval.max-turns", *AT_LEAST_ONE, "10"),
    ("--eval.wm-transitions", *AT_LEAST_ONE, "128"), ("--checkpoint-every", *AT_LEAST_ONE, "10"),
    ("--mesh-data", *AT_LEAST_ONE, "1"),
    ("--mesh-fsdp", "at least 1, or -1 (every device left)", lambda v: v >= 1 or v == -1, "-1"),
    ("--update-tokens", *AT_LEAST_ONE, "4096"), ("--workers", "at least 0 (0: in process)", lambda v: v >= 0, "0"),
    ("--num-processes", *AT_LEAST_ONE, "2"), ("--process-id", "at least 0", lambda v: v >= 0, "0"),
    ("--pretrain-steps", *AT_LEAST_ONE, str(pretrain.PretrainConfig.steps)),
    ("--pretrain-episodes", *AT_LEAST_ONE, str(pretrain.PretrainConfig.episodes)),
]


def number_problems(args: Args) -> list[str]:
    """One message per number out of its range (NaN and infinity included), and per group too small to compare. The
    fix proposes the value the run's recipe gives (what --help printed for its --method, --env and --model: 1e-3 for
    the embedded default's learning rate, not the papers' 1e-6), or the rule's example where it gives none."""
    problems = []
    values = flags(args)
    recipe = flags(settle(Args(method=args.method, env=args.env, model=args.model)))
    # a setting that follows another (--wm-beta follows --beta) and holds its value: the other's message covers it
    following = {"--" + name.replace("_", "-"): value for name, value in followed(args).items()}
    same = lambda a, b: a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    for flag, requirement, ok, example in NUMBER_RULES:
        if flag in following and same(values[flag], following[flag]):
            continue
        if values[flag] is not None and not ok(values[flag]):
            example = example if recipe[flag] is None else recipe[flag]
            problems.append(f"{flag} must be {requirement}, not {values[flag]}. Fix: pass e.g. {flag} {example}.")
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
    grid, tau2 = args.env in envs.GRID_ENVS, args.env in envs.TAU2_ENVS
    if args.method == "spa" and not grid:
        raise UsageError(f"SPA needs the true state of the game (state estimation), which only the grid games render"
                         f"{': a tau2-bench conversation has no state to estimate beyond its text' if tau2 else ''}. "
                         "Fix: --env frozenlake, sokoban or sudoku, or another --method.")
    if not grid and args.grid_size is not None:
        raise UsageError(f"--grid-size sets a grid game's map; {args.env} has no grid. Fix: leave --grid-size out, or "
                         "choose --env frozenlake, sokoban or sudoku.")
    for flag, observation in (("--observation", args.observation), ("--pretrain-observation", args.pretrain_observation)):
        if observation == "grid+coordinates" and (not grid or args.method == "spa" or args.prompt == "coordinates"):
            raise UsageError(f"{flag} {observation} renders a grid game's coordinates into its observations; "
                             f"{f'{args.env} has no grid' if not grid else 'SPA and --prompt coordinates add them to the prompt already'}. "
                             f"Fix: leave {flag} {'at grid' if flag == '--observation' else 'out'}.")
    if tau2:
        try:
            envs.tau2.import_tau2()
        except ImportError as error:
            raise UsageError(f"--env {args.env}: {error}") from error
    if args.user_model is not None and (not tau2 or envs.TAU2_ENVS[args.env][1]):
        raise UsageError(f"--user-model plays the customer of a tau2-bench conversation; {args.env} has "
                         f"{'no customer (solo mode)' if tau2 else 'none'}. Fix: leave --user-model out, or choose "
                         "--env tau2-retail or tau2-airline.")
    judge_problem(args)
    given = [flag for flag, chosen in (("--pretrain-steps", args.pretrain_steps is not None),
                                       ("--pretrain-episodes", args.pretrain_episodes is not None),
                                       ("--pretrain-observation", args.pretrain_observation is not None),
                                       ("--no-pretrain-dynamics", not args.pretrain_dynamics)) if chosen]
    if given and args.model is not None:
        raise UsageError(f"{', '.join(given)} set{'s' if len(given) == 1 else ''} how the embedded default is "
                         f"pretrained, and --model {args.model} replaces it. Fix: leave {', '.join(given)} out, or "
                         "--model.")
    if args.grid_size is not None:
        try:
            envs.GRID_ENVS[args.env](size=args.grid_size)
        except ValueError as error:
            raise UsageError(f"--grid-size {args.grid_size}: {error}. Fix: FrozenLake takes 2 or more, Sokoban 5 or "
                             "more, Sudoku a square (4 or 9).") from error
    if args.model is not None:
        try:
            folder = hf.resolve_checkpoint(args.model, args.cache)
        except (hf.CheckpointError, FileNotFoundError, OSError) as error:
            raise UsageError(str(error)) from error
        if not (folder / "config.json").exists():
            raise UsageError(f"--model {args.model}: no config.json in {folder}. Fix: point at a Hugging Face model "
                             "folder (config.json, safetensors weights and the tokenizer).")
    if args.env == "alfworld":
        try:
            envs.alfworld_games("train")
            envs.alfworld_games(args.eval.split)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(str(error)) from error
    if "rwml" in STAGES[args.method] and args.embedder == "minilm":
        try:
            embedders.minilm_folder()
        except ModuleNotFoundError as error:
            raise UsageError(f"RWML's reward needs a sentence embedder. {error}") from error
    if jax.process_count() > 1 and set(STAGES[args.method]) - {"grpo", "paw"}:
        raise UsageError(f"--method {args.method}: over several processes (--distributed) only policy RL runs so far; "
                         "the world-model and SFT stages gather their data in one process's files, which every "
                         "process would write. Fix: --method grpo or paw, or one process on its devices.")
    devices = jax.device_count()
    fsdp = devices // args.mesh_data if args.mesh_fsdp == -1 else args.mesh_fsdp
    if args.mesh_data * fsdp != devices:
        raise UsageError(f"--mesh-data {args.mesh_data} x --mesh-fsdp {args.mesh_fsdp} does not cover the {devices} "
                         "devices. Fix: make their product the device count (or leave --mesh-fsdp at -1).")
    if (args.wm_batch * args.wm_group_size) % devices or args.wm_batch % devices:
        raise UsageError(f"--wm-batch {args.wm_batch} (x --wm-group-size {args.wm_group_size} for RWML) must split "
                         f"evenly over the {devices} devices. Fix: make it a multiple of {devices}.")
    out = Path(args.out)
    writable_folder(out)
    if not args.resume and checkpoints.checkpoint_steps(out / "checkpoints"):
        raise UsageError(f"{out} already holds a run. Fix: add --resume to continue it, or choose another --out.")
    if args.resume and not (out / "args.json").is_file():
        raise UsageError(f"--resume: {out} holds no run to resume (no args.json{'' if out.is_dir() else '; no folder'})."
                         " Fix: leave --resume out to start a new run there, or point --out at the run's folder.")
    if args.resume:
        changes = setting_changes(json.loads((out / "args.json").read_text()), args)
        if changes:
            listed = "".join(f"\n  {flag}: {old} -> {new}" for flag, old, new in changes)
            raise UsageError(f"--resume: {out} was run with other settings (flag: then -> now):{listed}\nA resumed "
                             f"run continues the same training. Fix: resume with the settings in {out / 'args.json'}, "
                             "or choose another --out for the new ones.")


def judge_problem(args: Args) -> None:
    """--wm-reward judge and --judge-model come together, on a method with RWML, the judge a checkpoint folder."""
    if args.wm_reward == "cosine" and args.judge_model is None:
        return
    if "rwml" not in STAGES[args.method]:
        given = "--wm-reward judge" if args.wm_reward == "judge" else f"--judge-model {args.judge_model}"
        raise UsageError(f"{given}: the LLM judge scores RWML's predictions; --method {args.method} has no RWML stage. "
                         "Fix: --method rwml or rwml-grpo, or leave --wm-reward and --judge-model out.")
    if args.judge_model is None:
        raise UsageError("--wm-reward judge needs the judge: a Hugging Face instruct checkpoint. Fix: add --judge-model "
                         "<folder or Hub id>, e.g. --judge-model Qwen/Qwen2.5-7B-Instruct.")
    if args.wm_reward != "judge":
        raise UsageError(f"--judge-model {args.judge_model} is the judge of --wm-reward judge, and the reward is "
                         f"--wm-reward {args.wm_reward}. Fix: add --wm-reward judge, or leave --judge-model out.")
    try:
        folder = hf.resolve_checkpoint(args.judge_model, args.cache)
    except (hf.CheckpointError, FileNotFoundError, OSError) as error:
        raise UsageError(f"--judge-model {args.judge_model}: {error}") from error
    if not (folder / "config.json").exists():
        raise UsageError(f"--judge-model {args.judge_model}: no config.json in {folder}. Fix: point at a Hugging Face "
                         "model folder (config.json, safetensors weights and the tokenizer).")


def writable_folder(out: Path) -> None:
    """--out must be a folder this process can create and write in, checked without writing: a file in its place (or
    in place of a folder above it), a name longer than the filesystem takes, a read-only filesystem or a folder
    without write permission would otherwise fail at the first file the run writes, after the model has loaded."""
    fix = "Fix: choose another --out (a folder you can write to)."
    try:
        os.stat(out)  # the kernel's verdict on the whole name: ENAMETOOLONG, ENOTDIR (a file above it), ELOOP
    except FileNotFoundError:
        pass
    except OSError as error:
        raise UsageError(f"--out {out}: {error.strerror}. {fix}") from error
    existing = out.absolute()
    while not existing.exists():  # the nearest folder above it that exists: where the run's folders will be made
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, not a folder. {fix}")
    longest = os.pathconf(existing, "PC_NAME_MAX")
    for part in out.absolute().relative_to(existing).parts:
        if len(os.fsencode(part)) > longest:
            raise UsageError(f"--out {out}: {os.strerror(errno.ENAMETOOLONG)} ('{part[:24]}...' has "
                             f"{len(os.fsencode(part))} bytes; this filesystem takes {longest}). {fix}")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise UsageError(f"--out {out}: {existing} is on a read-only filesystem. {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: no permission to write in {existing}. {fix}")
