"""experiment.py: the three papers' claims, rerun side by side at toy scale, over seeds.

    python experiment.py                       # toy FrozenLake, 3 seeds, every method below
    python experiment.py --env sokoban
    python experiment.py --quick               # tiny sizes: the plumbing in a few minutes (CI)

The claims under test (methods.md):

    RWML  (2.)  RWML then policy RL beats policy RL alone, and beats WM SFT then policy RL;
                RWML changes fewer weights than WM SFT
    PaW   (3.)  GRPO + PaW beats GRPO; its clipped MAE beats cross-entropy; adaptive lambda beats lambda = 1
    SPA   (4.)  SFT on self-play with the true states in the reasoning, then RL, beats RL from the base model

Every method is `train.py` with its defaults; no method gets a setting another does not (the flags set
here are the evaluation's, shared by all, and SPA's baseline takes SPA's prompt, actions per turn and
response length, so that the self-play SFT is the only difference). Each (method, seed) run keeps its folder under
--out, marked finished by `trained.json`; a rerun skips finished runs with the same settings, so an
interrupted experiment continues where it stopped (an unfinished run starts again from scratch).

Reported per method, as mean ± std over seeds (std over seeds, ddof 0):
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

Output in --out: results.md (the table), results.json, success.png (held-out success against the
policy-RL iteration), summary.png (bars with seed spread), weight_change.png (by layer and module, mean over seeds).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path
from typing import Literal

import jax
import numpy as np

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


@dataclasses.dataclass
class ExperimentArgs:
    """Rerun base, GRPO, PaW (and its ablations), WM SFT, RWML, the two-stage methods and SPA over seeds."""

    env: Literal["frozenlake", "sokoban"] = "frozenlake"
    """the toy environment (the embedded default model of train.py)"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """one run per method and seed"""
    methods: tuple[str, ...] = ROWS
    """which rows of the table to run (names as in ROWS)"""
    out: str | None = None
    """the experiment folder (default runs/experiment-<env>, or runs/experiment-<env>-quick)"""
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
    """train.py's arguments for one run: the method's switches, the seed, and the shared evaluation flags."""
    shared = {"env": args.env, "seed": seed, "out": str(out), "eval.samples": args.eval_samples,
              "eval.every": args.eval_every, "eval.wm_every": 1_000_000, "checkpoint_every": args.eval_every,
              "tensorboard": False, "progress": False, "cache": args.cache}
    if args.quick:
        shared.update(QUICK)
    return settings.override(train.Args(), {**METHODS[name], **shared})


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

    return {"method": name, "seed": run.seed, "success_level": args.success_level, "model": str(model_folder),
            "base_model": f"base ({game.prompt_name} prompt)", "base": numbers(first, "base"),
            **numbers(last, "after"),
            "reached": iterations_to(evals, args.success_level) if policy else "n/a",
            "weights_changed": changed, "weight_change": {module: list(f) for module, f in by_module.items()},
            "curve": [(r["iteration"], r["eval/success"]) for r in evals if r["iteration"] is not None]}


# settings that do not change what a run computes or records (train.py's list: a resumed run continues bit for bit,
# a moved folder is the same run, and args.json's update_tokens, filled by train.main, matches a command left unset)
NEUTRAL_SETTINGS = settings.OUTPUT_SETTINGS


def same_settings(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k not in NEUTRAL_SETTINGS} == {
        k: v for k, v in b.items() if k not in NEUTRAL_SETTINGS}


def run_one(args: ExperimentArgs, name: str, seed: int, out: Path, scorer) -> dict:
    """Train the run behind one (row, seed) with train.main, unless its folder holds a finished run with the same
    settings (trained.json); an interrupted one with the same settings resumes from its last checkpoint (every
    eval_every steps). Then summarise the row (cached in summary[-<row>].json)."""
    source = FIRST_STAGE_OF.get(name, name)
    folder = out / slug(source) / f"seed{seed}"
    run = train.settle(run_args(args, source, seed, folder))
    chosen = dataclasses.asdict(run)
    trained_file = folder / "trained.json"
    trained = json.loads(trained_file.read_text()) if trained_file.exists() else {}
    if not same_settings(trained.get("settings", {}), chosen):
        saved = folder / "args.json"
        resume = ((folder / "checkpoints").exists() and saved.exists()
                  and same_settings(json.loads(saved.read_text()), chosen))
        if not resume:  # a run with other settings starts again: every summary comes from one clean run
            shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        train.main(dataclasses.replace(run, resume=resume))
        # a resumed run's seconds are its last attempt's
        trained = {"settings": chosen, "seconds": time.perf_counter() - started, "resumed": resume}
        trained_file.write_text(json.dumps(trained, indent=1) + "\n")
    summary_file = folder / ("summary.json" if source == name else f"summary-{slug(name)}.json")
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    if summary.get("version") != SUMMARY_VERSION or summary.get("success_level") != args.success_level:
        stage = 0 if source != name else None
        summary = {**summarise(args, name, run, folder, scorer, stage), "version": SUMMARY_VERSION}
        summary_file.write_text(json.dumps(summary, indent=1) + "\n")
    return {**summary, "folder": str(folder), "seconds": trained["seconds"]}


def mean_std(values) -> str:
    values = np.asarray(values, np.float64)
    return f"{values.mean():.3f} ± {values.std():.3f}"


def base_rows(results: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """One row per distinct base model (SPA's prompt has its own embedded default), from the first method using it."""
    rows = {}
    for runs in results.values():
        rows.setdefault(runs[0]["base_model"], [r["base"] for r in runs])
    return rows if len(rows) > 1 else {"base": next(iter(rows.values()))}


def table(args: ExperimentArgs, results: dict[str, list[dict]]) -> tuple[str, dict]:
    """The markdown table (mean ± std over seeds) and the same numbers as data."""
    k = args.eval_samples
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
    axis.set_title(f"{args.env}: mean over {len(args.seeds)} seeds (band: min to max)")
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


def run_experiment(args: ExperimentArgs) -> dict:
    """Every (method, seed) run, then the table and the plots; returns {"table", "data", "seconds"}."""
    unknown = [name for name in args.methods if name not in ROWS]
    if unknown:
        raise settings.UsageError(f"unknown method(s) {unknown}. Fix: choose from {list(ROWS)}.")
    out = Path(args.out or f"runs/experiment-{args.env}{'-quick' if args.quick else ''}")
    out.mkdir(parents=True, exist_ok=True)
    scorer = rwml.cosine_scorer(train.make_embedder("minilm"), train.settle(run_args(args, "GRPO", 0, out)).tau_d)
    started = time.perf_counter()
    results = {}
    for name in args.methods:
        results[name] = [run_one(args, name, seed, out, scorer) for seed in args.seeds]
    text, data = table(args, results)
    seconds = sum({r["folder"]: r["seconds"] for runs in results.values() for r in runs}.values())
    (out / "results.md").write_text(f"{text}\n{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), "
                                    f"{args.env}; training time summed over runs {seconds / 60:.1f} min.\n")
    (out / "results.json").write_text(json.dumps({"args": dataclasses.asdict(args), "table": data}, indent=1) + "\n")
    plot(args, results, out)
    changes = {name: {module: np.mean([r["weight_change"][module] for r in results[name]], 0)
                      for module in rwml.MODULES.values()} for name in ("WM SFT", "RWML") if name in results}
    if changes:  # the mean over seeds
        rwml.plot_weight_change(changes, str(out / "weight_change.png"))
    print(text)
    print(f"{out / 'results.md'}; wall {(time.perf_counter() - started) / 60:.1f} min")
    return {"table": text, "data": data, "seconds": seconds}


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
