"""experiment.py: the three papers' claims, rerun side by side at toy scale, over seeds.

    python experiment.py                       # toy FrozenLake, 3 seeds, every method below
    python experiment.py --env sokoban
    python experiment.py --quick               # tiny sizes: the plumbing in a few minutes (CI)
    python experiment.py --regime study --hours 2.5   # the regimes below, 5 seeds each, in chunks of 2.5 h

The claims under test (methods.md):

    RWML  (2.)  RWML then policy RL beats policy RL alone, and beats WM SFT then policy RL;
                RWML changes fewer weights than WM SFT
    PaW   (3.)  GRPO + PaW beats GRPO; its clipped MAE beats cross-entropy; adaptive lambda beats lambda = 1
    SPA   (4.)  SFT on self-play with the true states in the reasoning, then RL, beats RL from the base model

Every method is `train.py` with its defaults; no method gets a setting another does not (the flags set
here are the evaluation's, shared by all, and SPA's baseline takes SPA's prompt, actions per turn and
response length, so that the self-play SFT is the only difference). Each (method, seed) run keeps its folder under
--out, marked finished by `trained.json`; a rerun skips finished runs with the same settings, so an
interrupted experiment continues where it stopped (an interrupted run resumes from its last checkpoint). The study's
folders, runs/study/<regime>, are tracked in git without their models (.gitignore), so a fresh clone goes on too.

Reported per method, as mean ± std over seeds (ddof 0; in the regimes below, ± the half-width of the 95% interval):
    Pass@1 and Pass@k   held-out success at the end (k = --eval-samples, unbiased estimator)
    reached             policy-RL iterations until held-out success first reaches --success-level
                        (evaluated every --eval-every iterations; "not reached" seeds are counted apart)
    WM accuracy         RWML's measure: the share of held-out random-play transitions whose greedy
                        prediction scores reward 1 (1 - cos(E(s'), E(s_hat)) < tau_d, MiniLM), in RWML's
                        prompt (what RWML trains) and in WM SFT's direct prompt (what WM SFT trains)
    WM exact, inline    PaW's layout [h ; a ; o']: the share predicted token for token
    weights changed     the share of the q, k, v, o, gate, up, down kernels' weights with
                        |w' - w| > 1e-3 max(|w|, |w'|) against the base model (RWML's measure)
"base" is the model before training (every run evaluates it first; a base row comes from the first method
that starts from it: SPA's prompt, the grid with coordinates, has its own embedded default and base row).

Regimes (--regime; methods.md section 5.3): "papers" is the setting above. At toy scale it lacks conditions the papers'
mechanisms need, so each other regime changes one (REGIMES): the model's world knowledge, the sparsity of rewards, the
predictability of observations, and SPA's SFT strength (spa-calibration measures it, spa uses it). Its rows run over
seeds 0-4, and each claim's effect is reported as the difference in
Pass@1 between two rows, paired by seed, with its 95% interval, and a plot of the mechanism at work (mechanism.png).

Output in --out: results.md (the table, and the claims' effects), results.json, success.png (held-out success against the
policy-RL iteration), summary.png (bars with seed spread), weight_change.png (by layer and module, mean over seeds).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
import time
from pathlib import Path
from typing import Literal

import jax
import numpy as np
import scipy.stats

import model as lm
import rwml
import settings
import train

# name -> train.py settings by dotted name (settings.override). Only the method's own switches: everything else is
# train.py's default for all.
METHODS = {
    "GRPO": dict(method="grpo"),
    "PaW": dict(method="paw"),
    "PaW, cross-entropy": {"method": "paw", "paw.wm_loss": "ce"},
    "PaW, fixed lambda=1": {"method": "paw", "paw.lambda_mode": "fixed", "paw.fixed_lambda": 1.0},
    "WM SFT -> GRPO": dict(method="wm-sft-grpo"),
    "RWML -> GRPO": dict(method="rwml-grpo"),
    "SPA -> GRPO": dict(method="spa"),
    # SPA's RL stage from the base model: SPA's prompt (grid + coordinates, so its own embedded default),
    # two actions a turn and SPA's response length; only the self-play SFT differs
    "GRPO, SPA's prompt": dict(method="grpo", prompt="coordinates", actions_per_turn=2, max_new_tokens=256),
}
# A world-model method alone is the first stage of its two-stage method, computed identically (same seed, data and
# functions; tests/test_experiment.py checks the parameters bit for bit), so its row is read from that run: the
# model train.py exports after the stage, and the evaluation at the stage's end. Half the world-model training time.
FIRST_STAGE_OF = {"WM SFT": "WM SFT -> GRPO", "RWML": "RWML -> GRPO"}
ROWS = ("GRPO", "PaW", "PaW, cross-entropy", "PaW, fixed lambda=1", "WM SFT", "RWML", "WM SFT -> GRPO", "RWML -> GRPO",
        "SPA -> GRPO", "GRPO, SPA's prompt")
POLICY_STAGES = ("grpo", "paw")

# --quick: every size cut down, so the whole pipeline runs in minutes (the numbers mean nothing)
QUICK = {"iterations": 2, "groups": 2, "group_size": 4, "eval.episodes": 4, "eval.wm_transitions": 8, "wm_tasks": 3,
         "wm_rollouts": 2, "wm_max_turns": 3, "wm_epochs": 1, "wm_batch": 4, "wm_group_size": 2, "filter.samples": 2,
         "wm_max_new_tokens": 24, "spa.tasks": 3, "spa.rollouts": 2, "spa.max_turns": 2, "spa.epochs": 1,
         "spa.batch": 4, "spa.format_filter": False, "pretrain_steps": 100, "pretrain_episodes": 300}


@dataclasses.dataclass(frozen=True)
class Regime:
    """One condition a paper's mechanism needs and the toy default lacks, changed alone (docs/methods.md section 5.3):
    its rows (name -> train.py settings: the method's switches and the condition), the claims it tests (the claim,
    the treatment row, the control row: the effect is their difference in final Pass@1, paired by seed), and the
    metrics that show the mechanism at work (metrics.jsonl keys with their labels, one panel each in mechanism.png)."""

    condition: str
    rows: dict[str, dict]
    claims: tuple[tuple[str, str, str], ...]
    mechanism: tuple[tuple[str, str], ...]
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    spread: Literal["std", "interval"] = "interval"  # the table's ± : std over seeds, or the 95% interval of the mean
    readout: tuple[str, str] | None = None  # (metrics.jsonl key, what it is): each row's value at its first RL step


def _rows(names, **condition) -> dict[str, dict]:
    suffix = condition.pop("suffix", "")
    return {name + suffix: {**METHODS[name], **condition} for name in names}


def _claims(suffix: str, *pairs: tuple[str, str, str]) -> tuple[tuple[str, str, str], ...]:
    return tuple((claim + suffix, treatment + suffix, control + suffix) for claim, treatment, control in pairs)


RWML_CLAIMS = (("RWML then GRPO beats GRPO", "RWML -> GRPO", "GRPO"),
               ("RWML then GRPO beats WM SFT then GRPO", "RWML -> GRPO", "WM SFT -> GRPO"))
PAW_CLAIMS = (("PaW beats GRPO", "PaW", "GRPO"),
              ("the clipped MAE beats cross-entropy", "PaW", "PaW, cross-entropy"),
              ("adaptive lambda beats lambda = 1", "PaW", "PaW, fixed lambda=1"))
NO_SFT = "no SFT (GRPO, SPA's prompt)"
VALID_MARGIN = 0.05  # SPA's regime: an SFT setting counts as valid within this of NO_SFT's invalid-action rate
# The map sizes and turn caps were chosen before any method ran, from uniform random play (4,000 maps each): it wins
# 1.1% of 4x4 games (10 turns), 0.5% of 5x5 (16) and 0.1% of 6x6 (20); the cap is twice the fewest moves possible.
SPARSE = ((5, 16), (6, 20))
REGIMES = {
    "papers": Regime(
        "none: the embedded default on 4x4 FrozenLake, as `python train.py` runs it",
        {name: METHODS[FIRST_STAGE_OF.get(name, name)] for name in ROWS},
        (*RWML_CLAIMS, *PAW_CLAIMS, ("SPA then GRPO beats GRPO from SPA's prompt", "SPA -> GRPO", "GRPO, SPA's prompt")),
        (("eval/success", "held-out success"),), seeds=(0, 1, 2), spread="std"),
    "world-knowledge": Regime(
        "the embedded default pretrained without the dynamics (--no-pretrain-dynamics: its play transcripts end at "
        "the response and its world-model ones answer with the current state), beside today's",
        {**_rows(("GRPO", "RWML -> GRPO", "WM SFT -> GRPO", "PaW")),
         **_rows(("GRPO", "RWML -> GRPO", "WM SFT -> GRPO", "PaW"), suffix=", no dynamics", pretrain_dynamics=False)},
        (*_claims("", *RWML_CLAIMS, PAW_CLAIMS[0]), *_claims(", no dynamics", *RWML_CLAIMS, PAW_CLAIMS[0])),
        tuple((f"eval/wm_accuracy{suffix}", f"world-model accuracy, {layout} (held out)") for suffix, layout in
              (("", "RWML's prompt"), ("_direct", "WM SFT's direct prompt"), ("_inline", "inline (PaW)")))),
    "sparse-rewards": Regime(
        "larger FrozenLake maps (" + ", ".join(f"{n}x{n} with {turns} turns" for n, turns in SPARSE) + "), where "
        "nearly every group of random play fails",
        {name: rows for n, turns in SPARSE for name, rows in _rows(
            ("GRPO", "PaW", "PaW, fixed lambda=1", "PaW, cross-entropy"), suffix=f", {n}x{n}", grid_size=n,
            max_turns=turns).items()},
        tuple(claim for n, _ in SPARSE for claim in _claims(f", {n}x{n}", *PAW_CLAIMS)),
        (("train/groups_without_success", "share of groups in which no rollout succeeds"),)),
    "unpredictable-observations": Regime(
        "observations that end with the objects' coordinates (--observation grid+coordinates), which follow from "
        "the move by arithmetic rather than by copying the grid before it",
        {name: {**METHODS.get(name, {"method": "paw", "paw.rho": 1.0}), "observation": "grid+coordinates"}
         for name in ("GRPO", "PaW", "PaW, rho=1")},
        (PAW_CLAIMS[0], ("the clip at rho = 0.2 beats none (rho = 1)", "PaW", "PaW, rho=1")),
        (("train/clipped_token_ratio", "share of observation tokens with p > rho (clipped out of the MAE)"),)),
    # Added after unpredictable-observations finished, from its mechanism alone (its default, pretrained on the same
    # rendering, already put p > rho on 94-95% of observation tokens): the same rows and claims, the coordinates new
    "unseen-coordinates": Regime(
        "observations that end with the objects' coordinates (--observation grid+coordinates), which the embedded "
        "default never saw: it is pretrained on the plain grid (--pretrain-observation grid)",
        {name: {**METHODS.get(name, {"method": "paw", "paw.rho": 1.0}), "observation": "grid+coordinates",
                "pretrain_observation": "grid"} for name in ("GRPO", "PaW", "PaW, rho=1")},
        (PAW_CLAIMS[0], ("the clip at rho = 0.2 beats none (rho = 1)", "PaW", "PaW, rho=1")),
        (("train/clipped_token_ratio", "share of observation tokens with p > rho (clipped out of the MAE)"),)),
    # Not a claim: how strong SPA's SFT can be while the actions its model samples at temperature 1 stay valid (with
    # the default 5 epochs at 1e-3, 54-62% are invalid, the base model's 13-14%). Each row is SPA's self-play and
    # SFT, then one RL iteration, whose rollouts measure it; the SPA regime takes the strongest valid setting.
    "spa-calibration": Regime(
        "SPA's SFT epochs and learning rate (one RL iteration after it, on 16 held-out maps)",
        {**{f"SPA SFT, {epochs} epochs, lr {lr:.0e}": {**METHODS["SPA -> GRPO"], "spa.epochs": epochs,
                                                     "spa.learning_rate": lr, "iterations": 1, "eval.episodes": 16}
            for epochs in (1, 2, 5) for lr in (1e-4, 3e-4, 1e-3)},
         NO_SFT: {**METHODS["GRPO, SPA's prompt"], "iterations": 1, "eval.episodes": 16}},
        (), (("train/invalid", "share of invalid actions in the RL rollouts (temperature 1)"),), seeds=(0, 1),
        readout=("train/invalid", "invalid actions at temperature 1, first RL iteration")),
    # SPA's claim at the SFT strength spa-calibration chose (regime_of: "SPA -> GRPO" gets spa_strength's setting)
    "spa": Regime(
        "SPA's SFT at the strongest setting spa-calibration found to keep sampled actions valid",
        {name: METHODS[name] for name in ("SPA -> GRPO", "GRPO, SPA's prompt")},
        (("SPA then GRPO beats GRPO from SPA's prompt", "SPA -> GRPO", "GRPO, SPA's prompt"),),
        (("train/invalid", "share of invalid actions in the RL rollouts (temperature 1)"),),
        readout=("train/invalid", "invalid actions at temperature 1, first RL iteration")),
}


def spa_strength(readout: dict[str, list[float | None]]) -> tuple[dict, str]:
    """SPA's SFT setting from spa-calibration's readout (each row's invalid-action rate at temperature 1, per seed):
    the strongest (largest epochs x learning rate; the rows' products differ) whose mean rate is within VALID_MARGIN
    of the model without SFT; if none is, the least invalid. The rule looks at validity only and was fixed before the
    calibration ran."""
    rows = REGIMES["spa-calibration"].rows
    rate = {name: float(np.mean([v for v in values if v is not None])) for name, values in readout.items()}
    tried = [name for name in rows if name != NO_SFT and name in rate]
    if NO_SFT not in rate or not tried:
        raise settings.UsageError(f"spa-calibration's results lack {NO_SFT!r} or every SFT row. Fix: run "
                                  "`python experiment.py --regime spa-calibration` to the end.")
    valid = [name for name in tried if rate[name] <= rate[NO_SFT] + VALID_MARGIN]
    chosen = (max(valid, key=lambda n: rows[n]["spa.epochs"] * rows[n]["spa.learning_rate"]) if valid
              else min(tried, key=rate.get))
    why = (f"{chosen} ({rate[chosen]:.1%} invalid, without SFT {rate[NO_SFT]:.1%}; "
           + (f"the strongest within {VALID_MARGIN * 100:g} points of it" if valid
              else f"none within {VALID_MARGIN * 100:g} points of it: the least invalid") + ")")
    return {key: rows[chosen][key] for key in ("spa.epochs", "spa.learning_rate")}, why


def regime_folder(args: ExperimentArgs) -> Path:
    quick = "-quick" if args.quick else ""
    return Path(args.out or (f"runs/experiment-{args.env}{quick}" if args.regime == "papers"
                             else f"runs/study{quick}/{args.regime}"))


def regime_of(args: ExperimentArgs) -> Regime:
    """The regime's rows and claims. SPA's reads its SFT strength from spa-calibration's results.json, in the folder
    beside its own (runs/study/spa-calibration for runs/study/spa)."""
    regime = REGIMES[args.regime]
    if args.regime != "spa":
        return regime
    calibration = regime_folder(args).parent / "spa-calibration" / "results.json"
    if not calibration.exists():
        raise settings.UsageError(f"--regime spa takes SPA's SFT strength from {calibration}, which does not exist. "
                                  "Fix: run `python experiment.py --regime spa-calibration` first (--regime study "
                                  "runs both in turn).")
    setting, why = spa_strength(json.loads(calibration.read_text())["readout"])
    return dataclasses.replace(regime, condition=f"{regime.condition}: {why}",
                               rows={**regime.rows, "SPA -> GRPO": {**regime.rows["SPA -> GRPO"], **setting}})


@dataclasses.dataclass
class ExperimentArgs:
    """Rerun base, GRPO, PaW (and its ablations), WM SFT, RWML, the two-stage methods and SPA over seeds."""

    regime: Literal["papers", "world-knowledge", "sparse-rewards", "unpredictable-observations", "unseen-coordinates",
                    "spa-calibration", "spa", "study"] = "papers"
    """papers: every method as train.py runs it; the others change one condition (REGIMES); study: them all in turn"""
    env: Literal["frozenlake", "sokoban"] = "frozenlake"
    """the toy environment (the embedded default model of train.py)"""
    seeds: tuple[int, ...] | None = None
    """one run per method and seed (default: the regime's, 0-2 for papers, 0-4 for the others)"""
    methods: tuple[str, ...] | None = None
    """which rows of the table to run (default: all the regime's)"""
    out: str | None = None
    """the experiment folder (default runs/experiment-<env>[-quick], or runs/study[-quick]/<regime>)"""
    hours: float | None = None
    """a chunk's budget: start no run that would end past it (judged by the row's finished runs), so a long study
    runs in chunks of this many hours; run the same command again to go on"""
    eval_samples: int = 8
    """held-out episodes per task: Pass@1 and Pass@k for k = this"""
    eval_every: int = 5
    """policy-RL iterations between evaluations (the resolution of `reached`)"""
    success_level: float = 0.2
    """`reached`: the first evaluated iteration with held-out success at or above this"""
    quick: bool = False
    """cut every size down (pipeline check, numbers meaningless)"""
    cache: str | None = None
    """where embedded defaults are cached (train.py --cache)"""


def slug(name: str) -> str:
    """A method's folder name: "RWML -> GRPO" -> "rwml-then-grpo", "GRPO, SPA's prompt" -> "grpo-spas-prompt"."""
    return re.sub(r"[^a-z0-9-]", "", name.lower().replace(" -> ", "-then-").replace(", ", "-").replace(" ", "-"))


def run_args(args: ExperimentArgs, name: str, seed: int, out: Path) -> train.Args:
    """train.py's arguments for one run: the row's settings (the method's switches and the regime's condition), the
    seed, and the shared evaluation flags."""
    shared = {"env": args.env, "seed": seed, "out": str(out), "eval.samples": args.eval_samples,
              "eval.every": args.eval_every, "eval.wm_every": 1_000_000, "checkpoint_every": args.eval_every,
              "tensorboard": False, "progress": False, "cache": args.cache}
    if args.quick:
        shared.update(QUICK)
    return settings.override(train.Args(), {**regime_of(args).rows[name], **shared})


def evaluations(metrics_file: Path) -> list[dict]:
    """The evaluation records, each with the policy-RL iteration it was taken at (None outside policy stages).

    A record's `step` is the global step; a two-stage method's policy iterations start after its
    world-model (or SFT) stage, so they are counted from the first step of the policy stage."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    policy_steps = [r["step"] for r in records if r["stage"] in POLICY_STAGES and "eval/success" not in r]
    start = min(policy_steps) - 1 if policy_steps else None
    evals = [r for r in records if "eval/success" in r]
    for r in evals:
        in_policy = start is not None and (r["stage"] in POLICY_STAGES or r["step"] == start)
        r["iteration"] = r["step"] - start if in_policy else None
    return evals


def iterations_to(evals: list[dict], level: float) -> int | None:
    """The first evaluated policy-RL iteration with success >= level (None: not reached)."""
    for r in evals:
        if r["iteration"] is not None and r["eval/success"] >= level:
            return r["iteration"]
    return None


def weights_changed(before: lm.Params, after: lm.Params, eta: float = 1e-3) -> tuple[float, dict]:
    """RWML's weight-change measure (methods.md eq. 21): the overall share of changed kernel weights, and
    rwml.weight_change's per-module detail."""
    detail = rwml.weight_change(before, after, eta)
    layer = next(k for k in before if k.startswith("layers_"))
    sizes = {name: np.size(before[layer][block][module]["kernel"]) for (block, module), name in rwml.MODULES.items()}
    overall = sum(sizes[name] * fractions.sum() for name, fractions in detail.items()) / (
        sum(sizes.values()) * len(next(iter(detail.values()))))
    return float(overall), detail


SUMMARY_VERSION = 2  # bump when summarise() changes: summaries are recomputed from the saved runs, without retraining


def world_model_reward_accuracy(run: train.Args, game, models: dict, tokenizer, scorer) -> dict[str, float]:
    """RWML's world-model accuracy (methods.md eq. 31: greedy; reward 1 when 1 - cos < tau_d, eq. 18) on the run's
    held-out transitions (train.make_evaluator's), in RWML's prompt and in WM SFT's direct prompt, for each
    {name: (config, params)}."""
    config = next(iter(models.values()))[0]
    evaluator = train.make_evaluator(run, game, tokenizer, config)
    evaluator.close()
    return {f"{name}/{metric}": rwml.world_model_accuracy(params, config, tokenizer, evaluator.triplets, scorer,
                                                          jax.random.key(0), max_new_tokens=run.wm_max_new_tokens,
                                                          direct=direct)
            for name, (config, params) in models.items()
            for metric, direct in (("wm_accuracy", False), ("wm_accuracy_direct", True))}


def summarise(args: ExperimentArgs, name: str, run: train.Args, folder: Path, scorer, stage: int | None = None) -> dict:
    """One finished run's numbers, from its metrics.jsonl and exported model (and the base model it started from);
    with `stage`, those of the run's first stages only, up to and including that one (FIRST_STAGE_OF)."""
    evals = evaluations(folder / "metrics.jsonl")
    model_folder = folder / "model"
    if stage is not None:
        stage_name = train.STAGES[run.method][stage]
        evals = [{**r, "iteration": None} for r in evals if r["stage"] in ("base", stage_name)]
        model_folder = folder / f"model-stage{stage}-{stage_name}"
    first, last = evals[0], evals[-1]
    game = train.make_game(run)
    base = lm.load_checkpoint(train.load_model(run, game, log=lambda *_: None)[0])
    trained = lm.load_checkpoint(model_folder)
    accuracy = world_model_reward_accuracy(run, game, {"base": base, "after": trained},
                                           lm.load_tokenizer(model_folder), scorer)
    k = args.eval_samples
    policy = any(r["iteration"] is not None for r in evals)
    changed, by_module = weights_changed(base[1], trained[1])

    def numbers(record: dict, model: str) -> dict:
        return {"pass@1": record["eval/pass@1"], f"pass@{k}": record[f"eval/pass@{k}"],
                "wm_accuracy": accuracy[f"{model}/wm_accuracy"], "wm_accuracy_direct": accuracy[f"{model}/wm_accuracy_direct"],
                "wm_exact_inline": record["eval/wm_accuracy_inline"]}

    pretrained = [] if run.pretrain_dynamics else ["no dynamics"]
    if run.pretrain_observation not in (None, run.observation):
        pretrained.append(f"pretrained on {run.pretrain_observation}")
    return {"method": name, "seed": run.seed, "success_level": args.success_level, "model": str(model_folder),
            "base_model": f"base ({game.prompt_name} prompt{'' if game.name == run.env else ', ' + game.name}"
                          f"{''.join(', ' + p for p in pretrained)})", "base": numbers(first, "base"),
            **numbers(last, "after"),
            "reached": iterations_to(evals, args.success_level) if policy else "n/a",
            "weights_changed": changed, "weight_change": {module: list(f) for module, f in by_module.items()},
            "curve": [(r["iteration"], r["eval/success"]) for r in evals if r["iteration"] is not None]}


# settings that do not change what a run computes or records (train.py's list: a resumed run continues bit for bit,
# a moved folder is the same run, and args.json's update_tokens, filled by train.main, matches a command left unset)
NEUTRAL_SETTINGS = settings.OUTPUT_SETTINGS


def same_settings(a: dict, b: dict) -> bool:
    """Whether two runs' settings train the same; one a run lacks (it predates the setting, whose default keeps the
    old behaviour) is not compared, as in settings.setting_changes."""
    return bool(a) and bool(b) and all(a[k] == b[k] for k in a.keys() & b.keys() if k not in NEUTRAL_SETTINGS)


def run_one(args: ExperimentArgs, name: str, seed: int, out: Path, scorer) -> dict:
    """Train the run behind one (row, seed) with train.main, unless its folder holds a finished run with the same
    settings (trained.json); an interrupted one with the same settings resumes from its last checkpoint (every
    eval_every steps). Then summarise the row (cached in summary[-<row>].json)."""
    source = FIRST_STAGE_OF.get(name, name)
    folder = out / slug(source) / f"seed{seed}"
    run = train.settle(run_args(args, source, seed, folder))
    chosen = dataclasses.asdict(run)
    trained_file, summary_file = folder / "trained.json", summary_path(folder, name)
    if finished(args, name, seed, out) is None:
        saved = folder / "args.json"
        resume = ((folder / "checkpoints").exists() and saved.exists()
                  and same_settings(json.loads(saved.read_text()), chosen))
        if not resume:  # a run with other settings starts again: every summary comes from one clean run
            shutil.rmtree(folder, ignore_errors=True)
        started, cpu = time.perf_counter(), time.process_time()
        train.main(dataclasses.replace(run, resume=resume))
        # a resumed run's seconds are its last attempt's
        trained = {"settings": chosen, "seconds": time.perf_counter() - started,
                   "cpu_seconds": time.process_time() - cpu, "resumed": resume}
        trained_file.write_text(json.dumps(trained, indent=1) + "\n")
    trained = json.loads(trained_file.read_text())
    if not summary_current(args, summary_file):
        stage = 0 if source != name else None
        cpu = time.process_time()
        summary = {**summarise(args, name, run, folder, scorer, stage), "version": SUMMARY_VERSION}
        summary["cpu_seconds"] = time.process_time() - cpu
        summary_file.write_text(json.dumps(summary, indent=1) + "\n")
    summary = json.loads(summary_file.read_text())
    return {**summary, "folder": str(folder), "seconds": trained["seconds"],
            "training_cpu_seconds": trained.get("cpu_seconds")}


def summary_path(folder: Path, name: str) -> Path:
    """Where a row's summary of its run is cached: a first stage's (FIRST_STAGE_OF) beside its two-stage run's."""
    return folder / ("summary.json" if FIRST_STAGE_OF.get(name, name) == name else f"summary-{slug(name)}.json")


def summary_current(args: ExperimentArgs, summary_file: Path) -> bool:
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    return summary.get("version") == SUMMARY_VERSION and summary.get("success_level") == args.success_level


def finished(args: ExperimentArgs, name: str, seed: int, out: Path) -> dict | None:
    """The trained.json of the run behind (row, seed) if it finished with today's settings, else None. A run whose
    record alone is here (the study's folders are tracked in git without their models: .gitignore) counts only if
    its row's summary is current: summarise() reads the exported model."""
    folder = out / slug(FIRST_STAGE_OF.get(name, name)) / f"seed{seed}"
    trained_file = folder / "trained.json"
    if not trained_file.exists():
        return None
    trained = json.loads(trained_file.read_text())
    if not (folder / "model").exists() and not summary_current(args, summary_path(folder, name)):
        return None
    chosen = dataclasses.asdict(train.settle(run_args(args, FIRST_STAGE_OF.get(name, name), seed, folder)))
    return trained if same_settings(trained.get("settings", {}), chosen) else None


def interval(values, level: float = 0.95) -> tuple[float, float]:
    """The mean over seeds and the half-width of its Student-t interval at `level` (nan for a single seed)."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(scipy.stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1)
                                       / np.sqrt(len(values)))


def spread_text(values, spread: str) -> str:
    """mean ± std over seeds (ddof 0), or mean ± the half-width of its 95% interval."""
    values = np.asarray(values, np.float64)
    half = values.std() if spread == "std" else interval(values)[1]
    return f"{values.mean():.3f}" + ("" if np.isnan(half) else f" ± {half:.3f}")  # one seed: no interval


def effects(regime: Regime, results: dict[str, list[dict]]) -> list[dict]:
    """Each claim whose two rows ran: the difference in final Pass@1 (treatment - control, paired by seed: the same
    seed gives both the same tasks, held-out maps and starting model), its 95% interval, and what it says."""
    out = []
    for claim, treatment, control in regime.claims:
        if treatment not in results or control not in results:
            continue
        control_by_seed = {r["seed"]: r["pass@1"] for r in results[control]}
        differences = [r["pass@1"] - control_by_seed[r["seed"]] for r in results[treatment] if r["seed"] in control_by_seed]
        mean, half = interval(differences)
        verdict = ("one seed: no interval" if np.isnan(half) else "holds" if mean - half > 0
                   else "reversed" if mean + half < 0 else "not shown (the interval holds 0)")
        out.append({"claim": claim, "treatment": treatment, "control": control, "seeds": len(differences),
                    "difference": mean, "half_width": half, "verdict": verdict})
    return out


def effects_text(rows: list[dict]) -> str:
    return "".join(f"- {e['claim']} ({e['treatment']} - {e['control']}): Pass@1 {e['difference']:+.3f}"
                   + ("" if np.isnan(e["half_width"]) else f" ± {e['half_width']:.3f} (95% interval)")
                   + f" over {e['seeds']} seed(s): {e['verdict']}\n" for e in rows)


def base_rows(results: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """One row per distinct base model (SPA's prompt has its own embedded default), from the first method using it."""
    rows = {}
    for runs in results.values():
        rows.setdefault(runs[0]["base_model"], [r["base"] for r in runs])
    return rows if len(rows) > 1 else {"base": next(iter(rows.values()))}


def table(args: ExperimentArgs, results: dict[str, list[dict]]) -> tuple[str, dict]:
    """The markdown table (mean ± std over seeds, or ± the 95% interval's half-width: the regime's spread) and the
    same numbers as data."""
    k, spread = args.eval_samples, regime_of(args).spread
    mean_std = functools.partial(spread_text, spread=spread)
    metrics = ("pass@1", f"pass@{k}", "wm_accuracy", "wm_accuracy_direct", "wm_exact_inline")
    entries = [(name, runs, None, None) for name, runs in base_rows(results).items()]
    entries += [(name, runs, [r["reached"] for r in runs], [r["weights_changed"] for r in runs])
                for name, runs in results.items()]
    lines = [f"| method | Pass@1 | Pass@{k} | iterations to success ≥ {args.success_level:g} | WM accuracy, RWML prompt "
             "| WM accuracy, direct prompt | WM exact, inline | weights changed |", "|---|---|---|---|---|---|---|---|"]
    data = {}
    for name, runs, reached, changed in entries:
        numbers = {m: [r[m] for r in runs] for m in metrics}
        if reached is None or "n/a" in reached:
            reached_text = "n/a"
        else:
            hit = [r for r in reached if r is not None]
            reached_text = (f"{np.mean(hit):.1f} ± {np.std(hit):.1f}" if hit else "not reached") + \
                f" ({len(hit)}/{len(reached)} seeds)"
        cells = [mean_std(numbers["pass@1"]), mean_std(numbers[f"pass@{k}"]), reached_text,
                 mean_std(numbers["wm_accuracy"]), mean_std(numbers["wm_accuracy_direct"]),
                 mean_std(numbers["wm_exact_inline"]),
                 "—" if changed is None else mean_std(changed)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        data[name] = {**numbers, "reached": reached, "weights_changed": changed}
    return "\n".join(lines) + "\n", data


def plot(args: ExperimentArgs, results: dict[str, list[dict]], out: Path) -> list[Path]:
    """success.png: held-out success against the policy-RL iteration (mean, band: min to max over seeds);
    summary.png: final Pass@1, WM accuracy and weights changed per method, one dot per seed."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend is left alone, nothing opens a window

    paths = [out / "success.png", out / "summary.png"]
    figure = Figure(figsize=(7.5, 4.5), layout="tight")
    axis = figure.subplots()
    for name, runs in results.items():
        if not runs[0]["curve"]:
            continue
        iterations = [i for i, _ in runs[0]["curve"]]
        curves = np.array([[s for _, s in r["curve"]] for r in runs])
        line, = axis.plot(iterations, curves.mean(0), marker="o", markersize=3, label=name)
        axis.fill_between(iterations, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.12)
    axis.axhline(args.success_level, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("policy-RL iteration")
    axis.set_ylabel("held-out success (Pass@1)")
    axis.set_title(f"{args.env}, {args.regime}: mean over {len(next(iter(results.values())))} seeds (band: min to max)")
    axis.legend(fontsize=8)
    figure.savefig(paths[0], dpi=120)

    rows = {**base_rows(results), **results}  # a base model's weights changed: 0
    columns = [("Pass@1", "pass@1"), ("WM accuracy, RWML prompt", "wm_accuracy"),
               ("WM accuracy, direct prompt", "wm_accuracy_direct"), ("weights changed", "weights_changed")]
    figure = Figure(figsize=(18, 0.9 + 0.4 * len(rows)), layout="tight")
    axes = figure.subplots(1, 4, sharey=True)
    for axis, (title, metric) in zip(axes, columns):
        for row, (name, runs) in enumerate(rows.items()):
            values = [r.get(metric, 0.0) for r in runs]
            axis.barh(row, np.mean(values), color=f"C{row % 10}", alpha=0.6)
            axis.plot(values, [row] * len(values), "k.", markersize=5)
        axis.set_title(title)
    names = list(rows)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    figure.savefig(paths[1], dpi=120)
    return paths


def first_policy_value(folder: str | Path, key: str) -> float | None:
    """A run's first logged value of `key` in a policy-RL stage (e.g. the invalid-action rate of its first rollouts,
    sampled by the model the earlier stages left)."""
    for line in (Path(folder) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["stage"] in POLICY_STAGES and key in record:
            return record[key]
    return None


def readout_text(regime: Regime, results: dict[str, list[dict]]) -> tuple[str, dict]:
    """The regime's readout per row (mean ± the 95% interval's half-width over seeds), as lines and data."""
    if regime.readout is None:
        return "", {}
    key, label = regime.readout
    data = {name: [first_policy_value(r["folder"], key) for r in runs] for name, runs in results.items()}
    lines = [f"{label} ({key}):"] + [f"- {name}: {spread_text([v for v in values if v is not None], 'interval')}"
                                     for name, values in data.items()]
    return "\n".join(lines) + "\n", data


def measurements(folder: str | Path, key: str) -> dict[tuple[int, int], float]:
    """A run's values of `key` by (its stage's place among the run's stages, its place among that stage's values).
    Stage lengths vary between seeds (RWML's and SPA's stages end with their data), so a step number would pair
    different moments of different seeds; this pairs the k-th value of each stage. A step logged twice (a resume)
    counts once, at its last value."""
    by_stage: dict[str, dict[int, float]] = {}
    for line in (Path(folder) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            by_stage.setdefault(record["stage"], {})[record["step"]] = record[key]
    return {(order, place): values[step] for order, values in enumerate(by_stage.values())
            for place, step in enumerate(sorted(values))}


def plot_mechanism(regime: Regime, results: dict[str, list[dict]], out: Path) -> Path | None:
    """mechanism.png: one panel per mechanism metric, each row's mean over seeds against the metric's values in order,
    stage after stage (each stage as long as its longest seed's; a point averages the seeds that reach it); where
    every row has one value (spa-calibration's single RL iteration), a bar per row with each seed's value. None if
    no row logs any of them."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5 * len(regime.mechanism), 4.5), layout="tight")
    drawn = False
    for axis, (key, label) in zip(figure.subplots(1, len(regime.mechanism), squeeze=False)[0], regime.mechanism):
        rows = {name: [measurements(run["folder"], key) for run in runs] for name, runs in results.items()}
        rows = {name: seeds for name, seeds in rows.items() if any(seeds)}
        if rows and all(len(set().union(*seeds)) == 1 for seeds in rows.values()):
            for place, (name, seeds) in enumerate(rows.items()):
                values = [value for seed in seeds for value in seed.values()]
                axis.barh(place, np.mean(values), color="C0")
                axis.plot(values, [place] * len(values), "k.", label="a seed" if place == 0 else None)
            axis.set_yticks(range(len(rows)), list(rows))
            axis.invert_yaxis()
            axis.set_xlabel(label)
            axis.set_ylabel("row")
            axis.set_title(f"{key}: mean over seeds (bar) and each seed")
        else:
            for name, seeds in rows.items():
                points = sorted(set().union(*seeds))
                length = {order: 1 + max(place for o, place in points if o == order) for order, _ in points}
                start = {order: sum(length[o] for o in length if o < order) for order in length}
                axis.plot([start[order] + place for order, place in points],
                          [np.mean([seed[p] for seed in seeds if p in seed]) for p in points],
                          marker="o", markersize=2, label=name)
            axis.set_xlabel("its values in order, one stage after another")
            axis.set_ylabel(label)
            axis.set_title(f"{key}: mean over seeds" if rows else f"{key}: logged by no row")
        if rows:
            axis.legend(fontsize=7)
            drawn = True
    if not drawn:
        return None
    path = out / "mechanism.png"
    figure.savefig(path, dpi=120)
    return path


# cheapest first; spa after spa-calibration, whose results set its SFT strength; unseen-coordinates, added after the
# first chunks, last
STUDY = ("unpredictable-observations", "sparse-rewards", "world-knowledge", "spa-calibration", "spa", "unseen-coordinates")


def run_experiment(args: ExperimentArgs, deadline: float | None = None) -> dict:
    """Every (row, seed) run of the regime, then the table, the claims' effects and the plots; returns {"table",
    "data", "effects", "seconds", "cpu_seconds"}. With --hours, a run that would end past the chunk's deadline is not
    started: the result then says how many are left ({"left": n}, no table), and the same command goes on later.
    --regime study runs each of STUDY in turn, in one chunk."""
    if deadline is None and args.hours is not None:
        deadline = time.perf_counter() + args.hours * 3600
    if args.regime == "study":
        done = {}
        for name in STUDY:
            done[name] = run_experiment(dataclasses.replace(args, regime=name, out=args.out and f"{args.out}/{name}"),
                                        deadline)
            if done[name].get("left"):
                break
        return done
    regime = regime_of(args)
    names, seeds = args.methods or tuple(regime.rows), args.seeds or regime.seeds
    unknown = [name for name in names if name not in regime.rows]
    if unknown:
        raise settings.UsageError(f"unknown method(s) {unknown} in --regime {args.regime}. Fix: choose from "
                                  f"{list(regime.rows)}.")
    out = regime_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    scorer = rwml.cosine_scorer(train.make_embedder("minilm"), train.settle(run_args(args, names[0], 0, out)).tau_d)
    started = time.perf_counter()
    results, left = {name: [] for name in names}, 0
    for seed in seeds:  # seed by seed: a stopped chunk leaves whole seeds, each pairing every row
        for name in names:
            if deadline is not None and finished(args, name, seed, out) is None:
                known = [r["seconds"] for r in results[name]]  # the row's runs so far: the next one's estimate
                if time.perf_counter() + (np.median(known) if known else 0.0) > deadline:
                    left += 1
                    continue
            results[name].append(run_one(args, name, seed, out, scorer))
    if left:
        print(f"{args.regime}: the chunk's {args.hours} h are spent with {left} run(s) still to do in {out}; run the "
              "same command again to go on (finished runs are kept, an interrupted one resumes)")
        return {"left": left}
    text, data = table(args, results)
    found = effects(regime, results)
    readout, readout_data = readout_text(regime, results)
    runs = {r["folder"]: r for rows in results.values() for r in rows}
    seconds = sum(r["seconds"] for r in runs.values())
    cpu = [r.get("training_cpu_seconds") for r in runs.values()]
    cpu_text = (f"; CPU time (training, all threads) {sum(cpu) / 3600:.2f} h" if None not in cpu
                else "; CPU time not recorded for runs trained before it was")
    (out / "results.md").write_text(
        f"Condition changed: {regime.condition}.\n\n{text}\n{effects_text(found)}{readout}\n{len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}), {args.env}; training time summed over runs {seconds / 60:.1f} min{cpu_text}.\n")
    (out / "results.json").write_text(json.dumps({"args": dataclasses.asdict(args), "table": data, "effects": found,
                                                  "readout": readout_data,
                                                  "seconds": seconds, "cpu_seconds": None if None in cpu else sum(cpu)},
                                                 indent=1) + "\n")
    plot(args, results, out)
    plot_mechanism(regime, results, out)
    changes = {name: {module: np.mean([r["weight_change"][module] for r in results[name]], 0)
                      for module in rwml.MODULES.values()} for name in ("WM SFT", "RWML") if name in results}
    if changes:  # the mean over seeds
        rwml.plot_weight_change(changes, str(out / "weight_change.png"))
    print(text)
    print(effects_text(found) + readout)
    print(f"{out / 'results.md'}; wall {(time.perf_counter() - started) / 60:.1f} min")
    return {"table": text, "data": data, "effects": found, "seconds": seconds,
            "cpu_seconds": None if None in cpu else sum(cpu)}


def cli() -> None:
    import sys

    import tyro

    try:
        run_experiment(tyro.cli(ExperimentArgs))
    except (settings.UsageError, train.DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
