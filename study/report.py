"""The study's results: each row's numbers over seeds (mean ± std, or ± the 95% interval), each claim's effect paired by
seed, and the plots (success curves, a summary by row, the mechanism at work).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import scipy.stats

from regimes import POLICY_STAGES, Regime


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


def table(args, results: dict[str, list[dict]], spread: str) -> tuple[str, dict]:
    """The markdown table (mean ± std over seeds, or ± the 95% interval's half-width: the regime's spread) and the
    same numbers as data."""
    k = args.eval_samples
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


def plot(args, results: dict[str, list[dict]], out: Path) -> list[Path]:
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
