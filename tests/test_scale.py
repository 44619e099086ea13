"""study/benchmarks/scale.py, run as its command line at --small sizes: each configuration's rows are all there and make
sense, its model FLOPs are those of the batch it describes, and the wall-clock budget stops a run and skips the rest."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import model as lm
from engine import estimates

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["0.5b:bfloat16", "1.5b:float32"]  # both stand-in models and both dtypes in two processes (~25 s)


def run_scale(tmp_path, *argv) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "scale.json"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(ROOT / "study" / "benchmarks" / "scale.py"), "--small", "--json", str(out), *argv],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done, json.loads(out.read_text())


def test_small_run_reports_every_configuration_with_the_flops_of_its_batch(tmp_path):
    done, result = run_scale(tmp_path, "--configs", *CONFIGS)
    assert result["device"]["backend"] == "cpu" and result["skipped"] == []
    rows = {(row["model"] + ":" + row["dtype"], row["phase"]): row for row in result["rows"]}
    assert set(rows) == {(config, phase) for config in CONFIGS for phase in ("sampling", "update")}
    for row in rows.values():
        assert "error" not in row, row
        assert row["peak_memory_gib"] > 0
    for config in CONFIGS:
        sampling, update = rows[config, "sampling"], rows[config, "update"]
        assert sampling["new_tokens"] == sampling["rows"] * result["workload"]["response"]  # no stop token
        for seconds in ("prefill_s", "whole_s"):
            assert math.isfinite(sampling[seconds]) and sampling[seconds] > 0
        # the decode is the difference of two medians: on a busy machine a stand-in's few ms of decode can come out
        # below 0 (-1.4 ms in CI beside another job), so only its definition is checked here
        assert sampling["decode_s"] == sampling["whole_s"] - sampling["prefill_s"]
        assert math.isfinite(sampling["tokens_per_s"]) and sampling["tokens_per_s"] > 0
        for seconds in ("update_s", "reference_s"):
            assert math.isfinite(update[seconds]) and update[seconds] > 0
        assert 0 < update["mfu"] < 1 and math.isfinite(update["loss"]) and update["skipped"] == 0
        assert math.isclose(update["mfu"], update["model_flops"] / update["update_s"] / update["matmul_peak"])

        # the batch the row describes: rows of [h_t ; a_t ; o_{t+1}] padded to `width`, the update's loss reading the
        # action and (every row selected) the observation tokens
        shape = (update["rows"], update["width"])
        token_mask, scored = np.zeros(shape, bool), np.zeros(shape, bool)
        token_mask[:, :update["row_tokens"]] = True
        scored[:, update["history_tokens"]:update["row_tokens"]] = True
        assert update["history_tokens"] + update["action_tokens"] + update["observation_tokens"] == update["row_tokens"]
        config_fields = {**update["config"], "eos_token_ids": tuple(update["config"]["eos_token_ids"])}
        assert update["model_flops"] == estimates.training_flops(lm.Config(**config_fields), token_mask, scored)
        assert f"{config.split(':')[0]:>4} {config.split(':')[1]:<8} update" in done.stdout  # printed as measured


def test_budget_stops_the_running_configuration_and_skips_the_rest(tmp_path):
    done, result = run_scale(tmp_path, "--budget-s", "1", "--configs", "0.5b:float32", "1.5b:float32")
    assert result["skipped"] == ["1.5b:float32"]
    assert [row["phase"] for row in result["rows"]] == ["sampling", "update"]
    assert all(row["error"].startswith("stopped at --budget-s during ") for row in result["rows"])
    assert "1.5b float32  skipped" in done.stdout
