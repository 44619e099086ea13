"""experiment.py: the three papers' claims, rerun side by side at toy scale, over seeds.

    python study/experiment.py                       # toy FrozenLake, 3 seeds, every method below
    python study/experiment.py --env sokoban
    python study/experiment.py --quick               # tiny sizes: the plumbing in a few minutes (CI)
    python study/experiment.py --regime study --hours 2.5   # the regimes below, 5 seeds each, in chunks of 2.5 h

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
folders, study/runs/<regime>, are tracked in git without their models (.gitignore), so a fresh clone goes on too.

Reported per method, as mean ± std over seeds (ddof 0; in the regimes below, ± the half-width of the 95% interval):
    Pass@1 and Pass@k   held-out success at the end (k = --eval-samples, unbiased estimator)
    reached             policy-RL iterations until held-out success first reaches --success-level
                        (evaluated every --eval-every iterations; "not reached" seeds are counted apart)
    WM accuracy         RWML's measure: the share of held-out random-play transitions whose greedy
                        prediction scores reward 1 (1 - cos(E(s'), E(s_hat)) <= tau_d, MiniLM), in RWML's
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
import train
from engine import embedders, hf, settings, setup
from regimes import FIRST_STAGE_OF, POLICY_STAGES, QUICK, REGIMES, STUDY, Regime, spa_strength
from report import effects, effects_text, plot, plot_mechanism, readout_text, table

STUDY_RUNS = Path(__file__).resolve().parent / "runs"  # the study's tracked records: study/runs/<regime>


def regime_folder(args: ExperimentArgs) -> Path:
    """--out, else runs/experiment-<env>[-quick] (papers), study/runs/<regime> (the study's, tracked) or
    runs/study-quick/<regime>."""
    if args.out:
        return Path(args.out)
    if args.regime == "papers":
        return Path(f"runs/experiment-{args.env}{'-quick' if args.quick else ''}")
    return Path("runs/study-quick") / args.regime if args.quick else STUDY_RUNS / args.regime


def regime_of(args: ExperimentArgs) -> Regime:
    """The regime's rows and claims. SPA's reads its SFT strength from spa-calibration's results.json, in the folder
    beside its own (study/runs/spa-calibration for study/runs/spa)."""
    regime = REGIMES[args.regime]
    if args.regime != "spa":
        return regime
    calibration = regime_folder(args).parent / "spa-calibration" / "results.json"
    if not calibration.exists():
        raise settings.UsageError(f"--regime spa takes SPA's SFT strength from {calibration}, which does not exist. "
                                  "Fix: run `python study/experiment.py --regime spa-calibration` first (--regime study "
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
    """the experiment folder (default runs/experiment-<env>[-quick], study/runs/<regime>, or runs/study-quick/<regime>)"""
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
              "tensorboard": False, "progress": False, "cache": args.cache,
              # what the study's tracked runs scored (before the authors' last block and their 100-token cut)
              "wm_prediction": "one", "wm_prediction_tokens": 0}
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
    """RWML's world-model accuracy (methods.md eq. 31: greedy; reward 1 when 1 - cos <= tau_d, eq. 18) on the run's
    held-out transitions (the evaluation's, engine/setup.py), in RWML's prompt and in WM SFT's direct prompt, for each
    {name: (config, params)}."""
    config = next(iter(models.values()))[0]
    evaluator = setup.make_evaluator(run, game, tokenizer, config)
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
        stage_name = settings.STAGES[run.method][stage]
        evals = [{**r, "iteration": None} for r in evals if r["stage"] in ("base", stage_name)]
        model_folder = folder / f"model-stage{stage}-{stage_name}"
    first, last = evals[0], evals[-1]
    game = setup.make_game(run)
    base = hf.load_checkpoint(setup.load_model(run, game, log=lambda *_: None)[0])
    trained = hf.load_checkpoint(model_folder)
    accuracy = world_model_reward_accuracy(run, game, {"base": base, "after": trained},
                                           hf.load_tokenizer(model_folder), scorer)
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
    """Whether two runs' settings train the same; one a run lacks (it predates the setting) takes the value it had
    then (settings.BEFORE_THE_SETTING), or, where the default kept the old behaviour, is not compared, as in
    settings.setting_changes."""
    a, b = (settings.as_saved(x) if x else x for x in (a, b))
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
    first = train.settle(run_args(args, names[0], 0, out))  # the reward its runs trained with
    scorer = rwml.cosine_scorer(embedders.make_embedder("minilm"), first.tau_d, first.wm_prediction,
                                first.wm_prediction_tokens)
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
    text, data = table(args, results, regime.spread)
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
