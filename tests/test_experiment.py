"""study/experiment.py (with study/regimes.py and study/report.py): how runs are read (policy iterations, the success level, weights changed), and a quick
experiment end to end: its table, plots, reuse of finished runs, and the same numbers when rerun from scratch."""

import dataclasses
import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

import experiment
import regimes
import report
import train
from engine import checks, hf, settings


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_policy_iterations_are_counted_from_the_start_of_the_policy_stage(tmp_path):
    # a two-stage run: base eval, 4 RWML steps (eval at its end), then 4 GRPO steps evaluated every 2
    records = [{"step": 0, "stage": "base", "eval/success": 0.0}]
    records += [{"step": s, "stage": "rwml", "train/loss": 1.0} for s in range(1, 5)]
    records += [{"step": 4, "stage": "rwml", "eval/success": 0.05}]
    for s in range(5, 9):
        records.append({"step": s, "stage": "grpo", "train/loss": 1.0})
        if s % 2 == 0:
            records.append({"step": s, "stage": "grpo", "eval/success": {6: 0.3, 8: 0.5}[s]})
    evals = experiment.evaluations(_write(tmp_path / "m.jsonl", records))
    assert [r["iteration"] for r in evals] == [None, 0, 2, 4]
    assert experiment.iterations_to(evals, 0.05) == 0
    assert experiment.iterations_to(evals, 0.3) == 2
    assert experiment.iterations_to(evals, 0.6) is None


def test_a_world_model_only_run_has_no_policy_iterations(tmp_path):
    records = [{"step": 0, "stage": "base", "eval/success": 0.0}, {"step": 1, "stage": "wm-sft", "train/loss": 1.0},
               {"step": 1, "stage": "wm-sft", "eval/success": 0.0}]
    assert [r["iteration"] for r in experiment.evaluations(_write(tmp_path / "m.jsonl", records))] == [None, None]


def test_weights_changed_is_the_share_of_changed_kernel_weights():
    rng = np.random.default_rng(0)
    shapes = {"q": (8, 8), "k": (8, 4), "v": (8, 4), "o": (8, 8), "gate": (8, 16), "up": (8, 16), "down": (16, 8)}

    def layer():
        return {"attn": {m: {"kernel": rng.normal(size=shapes[m])} for m in ("q", "k", "v", "o")},
                "mlp": {m: {"kernel": rng.normal(size=shapes[m])} for m in ("gate", "up", "down")}}

    before = {"layers_0": layer(), "layers_1": layer(), "embed": {"embedding": rng.normal(size=(10, 8))}}
    after = jax.tree.map(np.copy, before)
    after["layers_0"]["attn"]["q"]["kernel"][0, :3] *= 1.01  # 3 changed by 1%
    after["layers_1"]["mlp"]["down"]["kernel"][2, 1] += 1.0  # 1 changed
    after["layers_1"]["mlp"]["up"]["kernel"][0, 0] *= 1 + 1e-4  # below eta = 1e-3: not counted
    after["embed"]["embedding"] += 1.0  # not a kernel of q, k, v, o, gate, up, down
    total = 2 * sum(np.prod(s) for s in shapes.values())
    overall, detail = experiment.weights_changed(before, after)
    assert overall == pytest.approx(4 / total)
    assert detail["q"][0] == pytest.approx(3 / 64) and detail["down"][1] == pytest.approx(1 / 128)


def test_quick_experiment_writes_its_table_reuses_finished_runs_and_reproduces(tmp_path, monkeypatch, embedded_cache):
    monkeypatch.setenv("RWML_JAX_CACHE", str(embedded_cache))
    args = experiment.ExperimentArgs(quick=True, seeds=(0,), methods=("GRPO", "RWML", "RWML -> GRPO"), eval_samples=2,
                                     out=str(tmp_path / "first"))
    first = experiment.run_experiment(args)
    lines = first["table"].splitlines()
    assert lines[0].startswith("| method | Pass@1 | Pass@2 |")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| base", "| GRPO", "| RWML", "| RWML -> GRPO"]
    for name in ("results.md", "results.json", "success.png", "summary.png", "weight_change.png"):
        assert (tmp_path / "first" / name).stat().st_size > 0
    assert 0.0 <= first["data"]["GRPO"]["pass@1"][0] <= 1.0
    assert first["data"]["GRPO"]["weights_changed"][0] > 0  # two updates at lr 1e-3 move the weights
    assert first["data"]["RWML"]["reached"] == ["n/a"]

    # the RWML row is read from RWML -> GRPO's first stage: the same parameters as RWML run alone, bit for bit
    alone = tmp_path / "alone"
    run = dataclasses.replace(experiment.run_args(args, "RWML -> GRPO", 0, alone), method="rwml")
    train.main(run)
    row = json.loads((tmp_path / "first" / "rwml-then-grpo" / "seed0" / "summary-rwml.json").read_text())
    for a, b in zip(jax.tree.leaves(hf.load_checkpoint(alone / "model")[1]),
                    jax.tree.leaves(hf.load_checkpoint(row["model"])[1])):
        np.testing.assert_array_equal(a, b)
    last = [json.loads(line) for line in (alone / "metrics.jsonl").read_text().splitlines() if "eval/success" in line][-1]
    assert row["pass@1"] == last["eval/pass@1"] and row["wm_exact_inline"] == last["eval/wm_accuracy_inline"]

    # a rerun in the same folder trains nothing and prints the same table
    marker = tmp_path / "first" / "grpo" / "seed0" / "trained.json"
    stamp = marker.stat().st_mtime_ns
    assert experiment.run_experiment(args)["table"] == first["table"]
    assert marker.stat().st_mtime_ns == stamp

    # what git keeps of the study (its .gitignore: each run's record, not its models or checkpoints), as a fresh
    # clone has it, gives the same numbers without training; a row whose summary is out of date trains again
    first_folder, kept = tmp_path / "first", tmp_path / "clone"
    files = [path.relative_to(first_folder) for path in first_folder.rglob("*") if path.is_file()]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=Path(__file__).parents[1], text=True,
                             input="".join(f"study/runs/regime/{f}\n" for f in files), capture_output=True).stdout
    for relative in files:
        if f"study/runs/regime/{relative}" not in ignored.splitlines():
            (kept / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(first_folder / relative, kept / relative)
    assert (kept / "grpo" / "seed0" / "metrics.jsonl").exists() and not list(kept.rglob("model*"))
    assert not list(kept.rglob("checkpoints"))
    assert experiment.run_experiment(dataclasses.replace(args, out=str(kept)))["data"] == first["data"]
    assert not (kept / "grpo" / "seed0" / "model").exists()
    summary = kept / "grpo" / "seed0" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "version": -1}))
    again = experiment.run_experiment(dataclasses.replace(args, out=str(kept), methods=("GRPO",)))
    assert again["data"]["GRPO"] == first["data"]["GRPO"] and (kept / "grpo" / "seed0" / "model").exists()

    # stopped after its first stage (its last checkpoint gone, as a kill before it was written leaves the run), a
    # run resumes from the stage's checkpoint and ends with the same numbers
    folder = tmp_path / "first" / "rwml-then-grpo" / "seed0"
    checkpoints = sorted((folder / "checkpoints").glob("[0-9]*"), key=lambda p: int(p.name))
    assert len(checkpoints) == 2  # the end of RWML and the end of GRPO (checkpoint_every = eval_every = 5 > steps)
    shutil.rmtree(checkpoints[-1])
    shutil.rmtree(folder / "model")
    for done in [folder / "trained.json", *folder.glob("summary*.json")]:
        done.unlink()
    assert experiment.run_experiment(args)["data"] == first["data"]
    assert json.loads((folder / "trained.json").read_text())["resumed"]
    # from scratch in another folder, the same seed gives the same numbers
    again = experiment.run_experiment(experiment.ExperimentArgs(quick=True, seeds=(0,), methods=("GRPO",),
                                                                eval_samples=2, out=str(tmp_path / "second")))
    assert again["data"]["GRPO"] == first["data"]["GRPO"]


def test_an_unknown_method_is_refused():
    with pytest.raises(settings.UsageError, match="unknown method"):
        experiment.run_experiment(experiment.ExperimentArgs(methods=("GRPO", "PPO")))


def test_every_row_has_a_distinct_shell_safe_folder():
    for regime in regimes.REGIMES.values():
        folders = [experiment.slug(regimes.FIRST_STAGE_OF.get(name, name)) for name in regime.rows]
        assert all(re.fullmatch(r"[a-z0-9-]+", folder) for folder in folders), folders
        assert len(set(folders)) == len(folders) - sum(name in regimes.FIRST_STAGE_OF for name in regime.rows)
    assert experiment.slug("GRPO, SPA's prompt") == "grpo-spas-prompt"


def test_a_run_whose_data_cannot_train_it_ends_with_one_message_and_exit_status_2(monkeypatch, capsys):
    import sys

    def too_few(args):
        raise train.DataError("only 0 valid transitions from 2 rollouts. Fix: raise --wm-tasks.")

    monkeypatch.setattr(experiment, "run_experiment", too_few)
    monkeypatch.setattr(sys, "argv", ["experiment.py"])
    with pytest.raises(SystemExit) as exit_:
        experiment.cli()
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and stderr.startswith("error: only 0 valid transitions") and "Traceback" not in stderr


def test_a_runs_args_json_matches_its_settings_though_train_filled_update_tokens(tmp_path):
    """train.main writes args.json with --update-tokens filled from the memory free; the settings experiment.py
    compares it with leave it unset. The same run must still count as the same (and resume), not start again."""
    settings = dataclasses.asdict(train.settle(experiment.run_args(experiment.ExperimentArgs(quick=True), "GRPO", 0,
                                                                   tmp_path)))
    assert settings["update_tokens"] is None
    assert experiment.same_settings(dict(settings, update_tokens=32768, progress=True), settings)
    assert not experiment.same_settings(dict(settings, learning_rate=0.5), settings)
    # a run from before a setting existed (its default keeps the old behaviour) is the same run
    assert experiment.same_settings({k: v for k, v in settings.items() if k != "grid_size"}, settings)
    assert not experiment.same_settings({}, settings)


# ---- the regimes (issue 20): one condition changed each, claims as paired differences with 95% intervals ----


def test_a_claims_effect_is_the_mean_paired_difference_with_its_student_t_interval():
    runs = lambda values: [{"seed": seed, "pass@1": value} for seed, value in enumerate(values)]
    regime = regimes.Regime("x", {}, (("A beats B", "A", "B"), ("A beats C", "A", "C"), ("C beats B", "C", "B")),
                               ("eval/success", "success"))
    results = {"A": runs([0.5, 0.7, 0.6, 0.8, 0.4]), "B": runs([0.4, 0.4, 0.4, 0.4, 0.4]),
               "C": runs([0.5, 0.7, 0.6, 0.8, 0.5])}
    found = {e["claim"]: e for e in report.effects(regime, results)}
    # A - B: 0.1, 0.3, 0.2, 0.4, 0.0 -> mean 0.2, sample sd 0.158114, t(0.975, 4) = 2.776445 (a t table)
    assert found["A beats B"]["difference"] == pytest.approx(0.2)
    assert found["A beats B"]["half_width"] == pytest.approx(2.776445 * 0.158114 / 5 ** 0.5, rel=1e-5)
    assert found["A beats B"]["verdict"] == "holds"
    assert found["A beats C"]["verdict"] == "not shown (the interval holds 0)"  # 0, 0, 0, 0, -0.1
    assert found["C beats B"]["verdict"] == "holds"
    reversed_ = report.effects(regimes.Regime("x", {}, (("B beats A", "B", "A"),), ("k", "k")), results)
    assert reversed_[0]["verdict"] == "reversed" and reversed_[0]["difference"] == pytest.approx(-0.2)
    # seeds are paired: a control missing a seed leaves that seed out
    results["B"] = results["B"][:3]
    assert report.effects(regime, results)[0]["seeds"] == 3


def test_every_regime_row_is_its_method_plus_the_condition_and_a_valid_run(tmp_path):
    for name, regime in regimes.REGIMES.items():
        assert len(regime.seeds) >= (3 if name == "papers" else 5 if regime.claims else 2)
        for claim, treatment, control in regime.claims:
            assert treatment in regime.rows and control in regime.rows, (name, claim)
    sparse = regimes.REGIMES["sparse-rewards"].rows
    assert sparse["PaW, 6x6"] == {"method": "paw", "grid_size": 6, "max_turns": 20}
    known = regimes.REGIMES["world-knowledge"].rows
    assert known["RWML -> GRPO"] == regimes.METHODS["RWML -> GRPO"]
    assert known["RWML -> GRPO, no dynamics"] == {**regimes.METHODS["RWML -> GRPO"], "pretrain_dynamics": False}
    for name in regimes.STUDY:  # every row is a run train.py accepts
        args = experiment.ExperimentArgs(regime=name, out=str(tmp_path / name))
        if name == "spa":
            _calibration(tmp_path / "spa-calibration")
        regime = experiment.regime_of(args)
        for row in regime.rows:
            checks.check(train.settle(experiment.run_args(args, row, 0, Path("/nonexistent"))))


def test_the_readout_is_each_runs_first_value_in_its_policy_stage(tmp_path):
    records = [{"step": 0, "stage": "base", "eval/success": 0.0}, {"step": 1, "stage": "spa-sft", "train/loss": 1.0},
               {"step": 2, "stage": "grpo", "train/invalid": 0.25}, {"step": 3, "stage": "grpo", "train/invalid": 0.1}]
    _write(tmp_path / "metrics.jsonl", records)
    assert report.first_policy_value(tmp_path, "train/invalid") == 0.25
    assert report.first_policy_value(tmp_path, "train/clipped_token_ratio") is None
    regime = regimes.REGIMES["spa-calibration"]
    text, data = report.readout_text(regime, {"row": [{"folder": str(tmp_path)}, {"folder": str(tmp_path)}]})
    assert data == {"row": [0.25, 0.25]} and "- row: 0.250 ± 0.000" in text


def test_the_mechanism_pairs_each_stages_kth_value_across_seeds_whose_stage_lengths_differ(tmp_path):
    """Two seeds whose world-model stage ends at different steps: their RL evaluations share no step number, yet the
    k-th of each stage is paired; a step logged twice (a resume) counts once, at its last value."""
    key = "eval/wm_accuracy_direct"
    seeds = {"a": [(0, "base", 0.0), (50, "rwml", 0.4), (55, "grpo", 0.2), (60, "grpo", 0.1)],
             "b": [(0, "base", 0.2), (54, "rwml", 0.6), (59, "grpo", 0.4), (59, "grpo", 0.3), (64, "grpo", 0.0)]}
    for seed, records in seeds.items():
        (tmp_path / seed).mkdir()
        _write(tmp_path / seed / "metrics.jsonl", [{"step": step, "stage": stage, key: value, "train/loss": 1.0}
                                                   for step, stage, value in records])
    assert report.measurements(tmp_path / "a", key) == {(0, 0): 0.0, (1, 0): 0.4, (2, 0): 0.2, (2, 1): 0.1}
    assert report.measurements(tmp_path / "b", key) == {(0, 0): 0.2, (1, 0): 0.6, (2, 0): 0.3, (2, 1): 0.0}
    assert report.measurements(tmp_path / "a", "train/invalid") == {}
    regime = regimes.REGIMES["world-knowledge"]
    runs = {"row": [{"folder": str(tmp_path / seed)} for seed in seeds]}
    path = report.plot_mechanism(regime, runs, tmp_path)
    assert path == tmp_path / "mechanism.png" and path.stat().st_size > 0
    assert [key for key, _ in regime.mechanism] == ["eval/wm_accuracy", key, "eval/wm_accuracy_inline"]
    # one value a row (spa-calibration's single RL iteration): a bar a row
    (tmp_path / "one").mkdir()
    _write(tmp_path / "one" / "metrics.jsonl", [{"step": 9, "stage": "grpo", "train/invalid": 0.5}])
    calibration = regimes.REGIMES["spa-calibration"]
    path = report.plot_mechanism(calibration, {"row": [{"folder": str(tmp_path / "one")}]}, tmp_path / "one")
    assert path.stat().st_size > 0
    assert report.plot_mechanism(calibration, {"row": [{"folder": str(tmp_path / "a")}]}, tmp_path) is None


def _calibration(folder: Path, rates: dict | None = None) -> None:
    """A spa-calibration results.json whose readout holds `rates` (row -> per-seed invalid rates; others 0.5)."""
    folder.mkdir(parents=True, exist_ok=True)
    readout = {name: [0.5, 0.5] for name in regimes.REGIMES["spa-calibration"].rows}
    (folder / "results.json").write_text(json.dumps({"readout": {**readout, **(rates or {})}}))


def test_spas_sft_strength_is_the_strongest_that_keeps_actions_valid(tmp_path):
    no_sft, margin = regimes.NO_SFT, regimes.VALID_MARGIN
    rates = {no_sft: [0.12, 0.14], "SPA SFT, 1 epochs, lr 1e-04": [0.13, 0.13],
             "SPA SFT, 5 epochs, lr 1e-04": [0.13 + margin - 0.001, 0.13 + margin - 0.001],  # 5e-4: within the margin
             "SPA SFT, 2 epochs, lr 3e-04": [0.13, 0.13 + 2 * margin + 0.002],  # 6e-4, but its mean is past it
             "SPA SFT, 1 epochs, lr 3e-04": [0.10, None]}  # a seed without a value is left out of the mean
    readout = {name: [0.5, 0.5] for name in regimes.REGIMES["spa-calibration"].rows} | rates
    setting, why = regimes.spa_strength(readout)
    assert setting == {"spa.epochs": 5, "spa.learning_rate": 1e-4}
    assert why.startswith("SPA SFT, 5 epochs, lr 1e-04 (") and "the strongest" in why
    stronger = readout | {"SPA SFT, 1 epochs, lr 1e-03": [0.1, 0.1]}  # 1e-3 > 5e-4
    assert regimes.spa_strength(stronger)[0] == {"spa.epochs": 1, "spa.learning_rate": 1e-3}
    # none valid: the least invalid, and the reason says so
    setting, why = regimes.spa_strength({**{n: [0.5, 0.5] for n in readout}, no_sft: [0.1, 0.1],
                                            "SPA SFT, 2 epochs, lr 1e-04": [0.3, 0.3]})
    assert setting == {"spa.epochs": 2, "spa.learning_rate": 1e-4} and "the least invalid" in why
    with pytest.raises(settings.UsageError, match="spa-calibration"):
        regimes.spa_strength({no_sft: [0.1, 0.1]})
    # the regime reads the calibration beside its own folder, and only SPA's row changes
    args = experiment.ExperimentArgs(regime="spa", out=str(tmp_path / "study" / "spa"))
    with pytest.raises(settings.UsageError, match="Fix: run `python study/experiment.py --regime spa-calib"):
        experiment.regime_of(args)
    _calibration(tmp_path / "study" / "spa-calibration", rates)
    regime = experiment.regime_of(args)
    calibrated = {"spa.epochs": 5, "spa.learning_rate": 1e-4}
    assert regime.rows["SPA -> GRPO"] == {**regimes.METHODS["SPA -> GRPO"], **calibrated}
    assert regime.rows["GRPO, SPA's prompt"] == regimes.METHODS["GRPO, SPA's prompt"]
    assert "SPA SFT, 5 epochs, lr 1e-04" in regime.condition
    run = train.settle(experiment.run_args(args, "SPA -> GRPO", 0, tmp_path))
    assert (run.spa.epochs, run.spa.learning_rate) == (5, 1e-4)


def test_a_chunk_whose_hours_are_spent_starts_no_run_and_says_how_many_are_left(tmp_path, capsys):
    args = experiment.ExperimentArgs(regime="unpredictable-observations", quick=True, seeds=(0, 1), methods=("GRPO",),
                                     out=str(tmp_path / "study"), hours=1e-9)
    assert experiment.run_experiment(args) == {"left": 2}
    assert "run the same command again to go on" in capsys.readouterr().out
    assert not list((tmp_path / "study").glob("*/seed*"))


@pytest.mark.parametrize("regime, rows, condition", [
    ("world-knowledge", ("GRPO, no dynamics", "PaW, no dynamics"), {"pretrain_dynamics": False}),
    ("sparse-rewards", ("GRPO, 5x5", "PaW, 5x5"), {"grid_size": 5, "max_turns": 16}),
    ("unpredictable-observations", ("GRPO", "PaW"), {"observation": "grid+coordinates"}),
    ("unseen-coordinates", ("GRPO", "PaW"), {"observation": "grid+coordinates", "pretrain_observation": "grid"}),
    ("spa", ("SPA -> GRPO", "GRPO, SPA's prompt"), {"spa.learning_rate": 3e-4}),  # the calibration written below
])
def test_each_regime_runs_end_to_end_at_tiny_sizes(regime, rows, condition, tmp_path, monkeypatch, embedded_cache):
    """The plumbing only (one update, an embedded default of one pretraining step: each regime's is its own, and
    compiling each new batch shape is most of a step's cost): the regime's condition reaches train.py, and the
    table, the claim's effect and the mechanism plot are written."""
    monkeypatch.setenv("RWML_JAX_CACHE", str(embedded_cache))
    shorter = {"max_new_tokens": 48} if regime == "spa" else {}  # SPA's 256-token responses: the plumbing needs fewer
    tiny = {"iterations": 1, "pretrain_steps": 1, "pretrain_episodes": 40, **shorter}
    monkeypatch.setattr(experiment, "QUICK", {**regimes.QUICK, **tiny})
    out = tmp_path / regime
    valid = {regimes.NO_SFT: [0.1, 0.1], "SPA SFT, 1 epochs, lr 3e-04": [0.1, 0.1]}  # 1 epoch: QUICK's
    _calibration(tmp_path / "spa-calibration", valid)
    result = experiment.run_experiment(experiment.ExperimentArgs(regime=regime, quick=True, seeds=(0,), methods=rows,
                                                                 eval_samples=2, out=str(out)))
    for row in rows:
        chosen = json.loads((out / experiment.slug(row) / "seed0" / "trained.json").read_text())["settings"]
        if regime == "spa" and row != "SPA -> GRPO":
            continue  # only SPA's row takes the calibrated SFT
        assert {k: functools.reduce(dict.get, k.split("."), chosen) for k in condition} == condition
    assert [line.split(" | ")[0] for line in result["table"].splitlines()[2:]] == ["| base", *(f"| {r}" for r in rows)]
    expected = [claim for claim, treatment, control in regimes.REGIMES[regime].claims
                if treatment in rows and control in rows]
    assert expected and [e["claim"] for e in result["effects"]] == expected
    assert result["effects"][0]["verdict"] == "one seed: no interval"
    assert result["cpu_seconds"] > 0
    text = (out / "results.md").read_text()
    assert text.startswith(f"Condition changed: {regimes.REGIMES[regime].condition}") and "CPU time" in text
    if regime == "spa":
        assert "SPA SFT, 1 epochs, lr 3e-04 (10.0% invalid, without SFT 10.0%; the strongest" in text
    assert (out / "mechanism.png").stat().st_size > 0
