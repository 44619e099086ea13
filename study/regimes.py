"""The study's rows and regimes: each method as train.py runs it (METHODS), and each claim of the papers in a regime
its mechanism needs (REGIMES; docs/methods.md section 5.3), one condition changed from the toy default.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from engine import settings

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
                                  "`python study/experiment.py --regime spa-calibration` to the end.")
    valid = [name for name in tried if rate[name] <= rate[NO_SFT] + VALID_MARGIN]
    chosen = (max(valid, key=lambda n: rows[n]["spa.epochs"] * rows[n]["spa.learning_rate"]) if valid
              else min(tried, key=rate.get))
    why = (f"{chosen} ({rate[chosen]:.1%} invalid, without SFT {rate[NO_SFT]:.1%}; "
           + (f"the strongest within {VALID_MARGIN * 100:g} points of it" if valid
              else f"none within {VALID_MARGIN * 100:g} points of it: the least invalid") + ")")
    return {key: rows[chosen][key] for key in ("spa.epochs", "spa.learning_rate")}, why


STUDY = ("unpredictable-observations", "sparse-rewards", "world-knowledge", "spa-calibration", "spa", "unseen-coordinates")
