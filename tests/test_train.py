"""train.py: every method from the command line, kill -9 and --resume, sharding over 8 devices, and
clear refusals of bad input. Runs use tiny settings and an embedded default pretrained for seconds."""

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import tyro

import model as lm
import rollout
import rwml
import sampler
import train
from engine import checkpoints, checks, evaluate, hf, logs, pretrain, settings, setup, sharding

ROOT = Path(__file__).resolve().parents[1]
TINY_PRETRAIN = ["--pretrain-steps", "100", "--pretrain-episodes", "300"]
TINY_POLICY = ["--iterations", "2", "--groups", "2", "--group-size", "4", "--eval.episodes", "4",
               "--eval.wm-transitions", "8", "--eval.every", "1", "--checkpoint-every", "1", "--no-progress"]
TINY_WORLD_MODEL = ["--wm-tasks", "3", "--wm-rollouts", "2", "--wm-max-turns", "3", "--wm-epochs", "1",
                    "--wm-batch", "4", "--wm-group-size", "2", "--filter.samples", "2", "--wm-max-new-tokens", "24"]
# the tiny ALFWorld model rarely names an admissible command, so its invalid steps are kept as world-model data
TINY_ALFWORLD = ["--wm-invalid-steps", "keep", "--groups", "1", "--group-size", "2", "--eval.every", "100",
                 "--iterations", "1", "--wm-tasks", "2", "--max-turns", "2", "--max-new-tokens", "8",
                 "--eval.episodes", "1", "--workers", "0", "--pretrain-episodes", "4", "--pretrain-steps", "4",
                 "--eval.wm-transitions", "2"]


@pytest.fixture
def cache(embedded_cache):
    return embedded_cache


def run_cli(argv, cache, env=None):
    """train.py's command line in a subprocess: (exit status, stdout, stderr)."""
    environment = {**os.environ, "RWML_JAX_CACHE": str(cache), "HF_HUB_OFFLINE": "1", **(env or {})}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=900)
    return done.returncode, done.stdout, done.stderr


def run_in_process(argv, cache, monkeypatch):
    monkeypatch.setenv("RWML_JAX_CACHE", str(cache))
    return train.main(tyro.cli(train.Args, args=argv))


def test_pass_at_k_matches_a_hand_worked_example():
    # 5 attempts, 2 correct. Pass@1 = 2/5. Pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10. Pass@3 = 1 - C(3,3)/C(5,3) = 1 - 1/10.
    # Pass@4: any 4 of 5 must include a correct one (only 3 are wrong) = 1.
    assert evaluate.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert evaluate.pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert evaluate.pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert evaluate.pass_at_k(5, 2, 4) == 1.0
    assert evaluate.pass_at_k(5, 0, 3) == 0.0
    # against enumeration of every k-subset of the attempts
    import itertools

    attempts = [1, 0, 0, 1, 0, 0]
    for k in range(1, 7):
        subsets = list(itertools.combinations(attempts, k))
        assert evaluate.pass_at_k(6, 2, k) == pytest.approx(np.mean([any(s) for s in subsets]))


# The two-stage methods run the world-model stages exactly as wm-sft and rwml do alone (same functions, same data),
# and then grpo, so these cover every stage kind but SPA's SFT: grpo, paw, wm-sft and rwml. SPA runs end to end
# in tests/test_spa.py.
COVERING = ["paw", "wm-sft-grpo", "rwml-grpo"]


@pytest.mark.parametrize("method", COVERING)
def test_every_stage_kind_runs_from_the_command_line_on_frozenlake(method, cache, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = ["--method", method, "--out", str(out), *TINY_PRETRAIN, *TINY_POLICY, *TINY_WORLD_MODEL]
    if method == "rwml-grpo":  # RL at 0.7; RWML's predictions are sampled at temperature 1 whatever --temperature says
        argv += ["--temperature", "0.7"]
    result = run_in_process(argv, cache, monkeypatch)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval/success" in r]
    assert evaluations[0]["step"] == 0 and result["before"]["step"] == 0
    steps = [r["step"] for r in records if r["stage"] != "base" and "eval/success" not in r]
    assert steps == list(range(1, len(steps) + 1)) and steps
    expected_stages = settings.STAGES[method]
    assert [s for s in dict.fromkeys(r["stage"] for r in records) if s != "base"] == list(expected_stages)
    for name in ("eval/pass@1", "eval/wm_accuracy", "eval/wm_accuracy_direct", "eval/wm_accuracy_inline"):
        assert 0.0 <= evaluations[-1][name] <= 1.0
    if "rwml" in method:
        assert "train/reward" in next(r for r in records if r["stage"] == "rwml")
    if "paw" in method:
        assert "train/wm_loss" in next(r for r in records if r["stage"] == "paw")
    # every step records the memory in use and its peak so far (this process's resident memory on a CPU)
    trained = [r for r in records if "train/loss" in r]
    assert all(0 < r["train/memory_gib"] <= r["train/peak_memory_gib"] for r in trained)
    # and its model FLOPs, and their share of the measured peak over the update's seconds (MFU)
    assert all(r["train/model_flops"] > 0 and 0 < r["train/mfu"] < 1 for r in trained)
    # every update is on-policy: its log-probs at the sampling temperature equal the sampler's, so the ratio is 1
    on_policy = [r["train/approx_kl_old"] for r in trained if "train/approx_kl_old" in r]
    assert on_policy and max(on_policy) < 1e-5, on_policy
    assert [r["train/peak_memory_gib"] for r in trained] == sorted(r["train/peak_memory_gib"] for r in trained)
    # TensorBoard events carry the same scalars as the JSONL
    event_files = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert event_files
    tags = set()
    for event in _read_events(event_files[0]):
        tags.update(value.tag for value in event.summary.value)
    assert "eval/success" in tags and "train/loss" in tags
    assert (out / "curves.png").stat().st_size > 10_000
    # the exported model is a Hugging Face checkpoint the loader reads back
    config, params = hf.load_checkpoint(out / "model")
    assert hf.load_tokenizer(out / "model").eos_token_id in config.eos_token_ids


def _read_events(path):
    """Records of a TensorBoard event file: length (8 bytes), its CRC (4), data, data CRC (4)."""
    from tensorboardX.proto import event_pb2

    data, offset = Path(path).read_bytes(), 0
    while offset < len(data):
        length = int.from_bytes(data[offset:offset + 8], "little")
        event = event_pb2.Event()
        event.ParseFromString(data[offset + 12:offset + 12 + length])
        yield event
        offset += 12 + length + 4


@pytest.mark.parametrize("method", ["rwml-grpo"])  # two stage kinds on the real games (all of them: FrozenLake above)
def test_every_stage_kind_runs_from_the_command_line_on_alfworld(method, cache, tmp_path, monkeypatch, alfworld_data):
    monkeypatch.setenv("ALFWORLD_DATA", str(alfworld_data))
    out = tmp_path / "run"
    argv = ["--method", method, "--env", "alfworld", "--out", str(out), *TINY_POLICY, *TINY_WORLD_MODEL,
            *TINY_ALFWORLD]
    run_in_process(argv, cache, monkeypatch)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in dict.fromkeys(r["stage"] for r in records) if s != "base"] == list(settings.STAGES[method])
    assert (out / "model" / "config.json").exists()


def _wait_for_checkpoint(folder: Path, process, timeout=600):
    start = time.time()
    while time.time() - start < timeout:
        if process.poll() is not None:
            raise AssertionError(f"training finished before it could be killed:\n{process.stderr.read()}")
        committed = [p for p in folder.glob("checkpoints/*") if p.name.isdigit()]
        if any(int(p.name) >= 2 for p in committed):
            return
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def test_kill_9_then_resume_gives_the_parameters_of_an_uninterrupted_run(cache, tmp_path):
    argv = ["--method", "paw", *TINY_PRETRAIN, *TINY_POLICY, "--iterations", "6", "--checkpoint-every", "2",
            "--eval.every", "3"]
    code, _, stderr = run_cli([*argv, "--out", str(tmp_path / "whole")], cache)
    assert code == 0, stderr
    environment = {**os.environ, "RWML_JAX_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv, "--out", str(interrupted)], cwd=ROOT,
                               env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(interrupted, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "model").exists()  # it really died mid-training
    code, _, stderr = run_cli([*argv, "--out", str(interrupted), "--resume"], cache)
    assert code == 0, stderr
    _, whole = hf.load_checkpoint(tmp_path / "whole" / "model")
    _, resumed = hf.load_checkpoint(interrupted / "model")
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    records = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5, 6]  # each step once, as if never
    assert _tensorboard_scalars(interrupted) == _jsonl_scalars(records)  # interrupted; TensorBoard holds the same


def _tensorboard_scalars(out: Path) -> list:
    """(tag, step, value) of every scalar in every event file of a run, sorted."""
    return sorted((value.tag, event.step, round(value.simple_value, 4))
                  for path in (out / "tensorboard").glob("events.out.tfevents.*")
                  for event in _read_events(path) for value in event.summary.value)


def _jsonl_scalars(records: list) -> list:
    """The same from metrics.jsonl, each name as TensorBoard writes its tag (pass@1 -> pass_1), each value in the
    float32 TensorBoard stores (train/model_flops, ~2e10, loses digits there)."""
    return sorted((re.sub(r"[^-/\w.]", "_", name), r["step"], round(float(np.float32(value)), 4))
                  for r in records for name, value in r.items() if "/" in name)


@pytest.mark.parametrize("closed", [True, False], ids=["ctrl-c", "kill-9"])
def test_after_an_interruption_and_resume_tensorboard_holds_every_step_once(closed, tmp_path):
    """The first run logs steps 1-5 and stops (closing its writer as Ctrl-C does, or not at all as a kill -9 does);
    its last checkpoint was step 4. The resumed run logs 5 and 6: TensorBoard and the JSONL hold 1-6 once each."""
    first = logs.Logger(tmp_path, 6, 0, progress=False)
    for step in range(1, 6):
        first.log(step, "grpo", {"loss": step / 10})
    first.file.close()
    if closed:
        first.writer.close()
    with (tmp_path / "metrics.jsonl").open("a") as log:
        log.write('{"step": 6, "stage": "gr')  # a line the kill cut short
    resumed = logs.Logger(tmp_path, 6, 4, progress=False)
    for step in (5, 6):
        resumed.log(step, "grpo", {"loss": step / 10 + 1})
    resumed.close()
    expected = [("train/loss", s, round(s / 10 + (s > 4), 4)) for s in range(1, 7)]
    assert _tensorboard_scalars(tmp_path) == expected
    assert _jsonl_scalars([json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]) \
        == expected


def test_a_resumed_runs_progress_bar_is_titled_with_the_method_not_a_metric(tmp_path):
    """The resumed Logger rewrites TensorBoard from the records it keeps, each holding metric names: the bar still
    carries the name it was given."""
    first = logs.Logger(tmp_path, 6, 0, progress=False)
    first.log(1, "paw", {"loss": 0.5, "wm_loss": 0.25})
    first.log(1, "paw", {"success": 0.5, "wm_accuracy_inline": 0.75}, prefix="eval")
    first.close()
    resumed = logs.Logger(tmp_path, 6, 1, tensorboard=True, progress=True, name="paw")
    try:
        assert resumed.bar.desc == "paw"  # tqdm keeps desc as given (its ": " is added when it draws the bar)
    finally:
        resumed.close()


def test_the_curves_plot_labels_every_axis_and_gives_the_world_model_loss_its_own():
    records = [{"step": 0, "stage": "base", "time": 0.0, "eval/success": 0.1, "eval/wm_accuracy": 0.2,
                "eval/wm_accuracy_direct": 0.3, "eval/wm_accuracy_inline": 0.4},
               *({"step": step, "stage": "paw", "time": 0.0, "train/return": step / 4, "train/reward": step / 5,
                  "train/wm_loss": 3.0 / step, "train/loss": 0.1} for step in (1, 2, 3)),
               {"step": 3, "stage": "paw", "time": 0.0, "eval/success": 0.5, "eval/wm_accuracy": 0.6,
                "eval/wm_accuracy_direct": 0.7, "eval/wm_accuracy_inline": 0.8}]
    figure = logs.curves_figure(records)
    axes = figure.get_axes()
    assert all(axis.get_ylabel() and axis.get_xlabel() == "step" for axis in axes)
    axis_of = {line.get_label(): axis for axis in axes for line in axis.get_lines()}
    # every series plotted before is still plotted, each with its points
    assert set(axis_of) == {"success", "wm_accuracy", "wm_accuracy_direct", "wm_accuracy_inline", "return", "reward",
                            "wm_loss"}
    wm_loss = next(line for line in axis_of["wm_loss"].get_lines() if line.get_label() == "wm_loss")
    assert list(wm_loss.get_xdata()) == [1, 2, 3] and list(wm_loss.get_ydata()) == [3.0, 1.5, 1.0]
    assert axis_of["wm_loss"] is not axis_of["return"]


SHARDING_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
import grpo, model as lm, paw
from engine import sharding
assert jax.device_count() == 8
config = lm.Config(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, qkv_bias=True)
params = lm.init_params(config, jax.random.key(0))
rng = np.random.default_rng(0)
rows, length = 16, 24
tokens = rng.integers(0, 64, (rows, length)).astype(np.int32)
action = np.zeros((rows, length), np.float32); action[:, 8:14] = 1
observation = np.zeros((rows, length), np.float32); observation[:, 14:20] = 1
token_mask = np.ones((rows, length), bool); token_mask[:, 20:] = False
old = np.where(action > 0, rng.normal(-3, 0.5, (rows, length)), 0).astype(np.float32)
advantages = (action * rng.normal(0, 1, (rows, 1))).astype(np.float32)
batch = grpo.Batch(tokens, token_mask, action, observation, old, np.zeros_like(old), advantages,
                   np.full(rows, 0.7, np.float32), (rng.random(rows) < 0.75).astype(np.float32))
optimizer = grpo.make_optimizer(1e-2)
step = lambda s, b: paw.paw_step(s, b, config, optimizer, grpo.StepConfig(grpo.LossConfig(beta=0.0)))
results = {}
objective = paw.paw_objective(config, grpo.StepConfig(grpo.LossConfig(beta=0.0)))
for name, mesh in (("one", jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))),
                   ("eight", sharding.make_mesh(2, 4)), ("eight, length-sorted", sharding.make_mesh(2, 4))):
    state = sharding.place(grpo.init_state(params, optimizer), mesh)
    if name == "eight, length-sorted":  # 32 tokens a device: two micro-batches of 8 rows of 32, one row per device
        update = sharding.sized_update(objective, optimizer, state, mesh, token_budget=32)
        assert len(update.micro_batches(batch)) == 2
    else:
        shardings = sharding.state_sharding(state, mesh)
        update = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)), out_shardings=(shardings, None),
                         donate_argnums=0)
    for _ in range(2):
        state, metrics = update(state, batch)
    kernel = state.params["layers_0"]["mlp"]["up"]["kernel"]
    results[name] = dict(loss=float(metrics["loss"]), wm_loss=float(metrics["wm_loss"]),
                         params=[np.asarray(x).tolist() for x in jax.tree.leaves(state.params)],
                         spec=list(kernel.sharding.spec), shard=list(kernel.addressable_shards[0].data.shape),
                         shape=list(kernel.shape), devices=len(kernel.sharding.device_set),
                         moment_specs=[list(x.sharding.spec) for x in jax.tree.leaves(state.opt_state)])
json.dump(results, sys.stdout)
"""


def test_a_step_on_8_devices_equals_one_device_and_the_parameters_are_sharded():
    environment = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    one = results["one"]
    for eight in (results["eight"], results["eight, length-sorted"]):
        assert abs(one["loss"] - eight["loss"]) <= 1e-5 and abs(one["wm_loss"] - eight["wm_loss"]) <= 1e-5
        for a, b in zip(one["params"], eight["params"]):
            # Adam divides by the gradient's own size: rounding in a near-zero component moves it by ~1e-5
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=5e-5, rtol=0)
        # [32, 64] up-projection: its largest axis (64) split over the 4-way fsdp axis, replicated over data
        assert eight["spec"] == [None, "fsdp"] and eight["shape"] == [32, 64]
        assert eight["shard"] == [32, 16] and eight["devices"] == 8
        assert sum("fsdp" in spec for spec in eight["moment_specs"]) > len(one["params"])  # Adam's moments too


def test_fsdp_spec_shards_the_largest_divisible_axis_and_replicates_the_rest():
    from jax.sharding import PartitionSpec

    assert sharding.fsdp_spec((896, 4864), 4) == PartitionSpec(None, "fsdp")
    assert sharding.fsdp_spec((151936, 896), 8) == PartitionSpec("fsdp", None)
    assert sharding.fsdp_spec((7, 12), 8) == PartitionSpec()  # nothing divisible: replicated
    assert sharding.fsdp_spec((), 8) == PartitionSpec()


def test_world_model_exact_match_equals_greedy_generation(cache, tmp_path):
    """The teacher-forced check behind world-model accuracy agrees with decoding greedily and comparing: on the
    evaluator's rows, on rows whose target is the model's own greedy output, and on those with one token changed."""
    args = train.settle(tyro.cli(train.Args, args=TINY_PRETRAIN))
    game = setup.make_game(args)
    folder = pretrain.embedded_default(game, pretrain.PretrainConfig(episodes=300, steps=100), cache, log=lambda *_: None)
    config, params = hf.load_checkpoint(folder)
    tokenizer = hf.load_tokenizer(folder)
    evaluator = setup.make_evaluator(settings.override(args, {"eval.wm_transitions": 24}), game, tokenizer, config)
    try:
        row_sets = list(evaluator.wm_rows.values())
    finally:
        evaluator.close()
    contexts = [context for context, _ in row_sets[0][:8]]
    own = sampler.generate(params, config, contexts, jax.random.key(0), sampler.SamplingParams(0.0, max_new_tokens=12),
                           stop_token_ids=(-1,))
    own_rows = [(c, [int(t) for t in own.tokens[i]]) for i, c in enumerate(contexts)]
    changed = [(c, t[:-1] + [(t[-1] + 1) % config.vocab_size]) for c, t in own_rows]
    seen = []
    for rows in [*row_sets, own_rows, changed]:
        matches = sampler.greedy_matches(params, config, rows, tokenizer.pad_token_id)
        longest = max(len(t) for _, t in rows)
        out = sampler.generate(params, config, [c for c, _ in rows], jax.random.key(0),
                               sampler.SamplingParams(0.0, max_new_tokens=longest), stop_token_ids=(-1,))
        greedy = np.asarray(out.tokens)
        expected = [list(greedy[i, :len(t)]) == list(t) for i, (_, t) in enumerate(rows)]
        assert list(matches) == expected
        seen.extend(matches)
    assert any(seen) and not all(seen)  # both outcomes occur: the comparison is not vacuous


def test_dr_grpo_constant_is_the_stage_generation_budget_unless_set():
    """seq-mean-token-sum-norm divides by one constant, the response cap, not the batch's padded width (0)."""
    args = train.settle(tyro.cli(train.Args, args=["--aggregation", "seq-mean-token-sum-norm", "--max-new-tokens", "24",
                                                   "--wm-max-new-tokens", "40"]))
    assert train.step_config(args).loss.max_length == 24
    assert train.step_config(args, budget=args.wm_max_new_tokens).loss.max_length == 40  # RWML's predictions
    assert train.step_config(settings.override(args, {"loss.max_length": 100})).loss.max_length == 100


def test_paw_config_carries_the_paw_flags():
    args = train.settle(tyro.cli(train.Args, args=["--alpha", "0.5", "--rho", "0.3", "--lambda-mode", "fixed",
                                                   "--fixed-lambda", "0.25"]))
    cfg = args.paw
    assert (cfg.alpha, cfg.rho, cfg.lambda_mode, cfg.fixed_lambda, cfg.r_max) == (0.5, 0.3, "fixed", 0.25, 1.0)


@pytest.mark.parametrize("argv, message", [
    (["--method", "ppo"], "ppo"),
    (["--env", "minecraft"], "minecraft"),
    (["--model", "/nonexistent/checkpoint"], "/nonexistent/checkpoint"),
    (["--env", "alfworld"], "No ALFWorld games"),
    (["--method", "spa", "--env", "alfworld"], "SPA needs the true state"),
])
def test_bad_input_prints_one_message_exits_nonzero_and_writes_nothing(argv, message, tmp_path):
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    code, stdout, stderr = run_cli([*argv, "--out", str(out)], cache, env={"ALFWORLD_DATA": str(tmp_path / "empty")})
    assert code != 0
    assert message in stderr and "Traceback" not in stderr
    assert not out.exists() and not cache.exists()


@pytest.mark.parametrize("argv, message", [
    (["--env", "sokoban", "--grid-size", "4"], "--grid-size 4: Sokoban size 4 leaves no room inside the walls"),
    (["--env", "sudoku", "--grid-size", "5"], "--grid-size 5: Sudoku size 5 is not a square"),
    (["--env", "alfworld", "--grid-size", "6"], "--grid-size sets a grid game's map"),
    (["--observation", "grid+coordinates", "--method", "spa"], "--observation grid+coordinates renders"),
    (["--observation", "grid+coordinates", "--prompt", "coordinates"], "--observation grid+coordinates renders"),
    (["--pretrain-observation", "grid+coordinates", "--method", "spa"], "--pretrain-observation grid+coordinates renders"),
    (["--pretrain-observation", "grid", "--model", "/nonexistent"], "--pretrain-observation sets how the embedded"),
    (["--pretrain-steps", "5", "--model", "/nonexistent"], "--pretrain-steps sets how the embedded default"),
    (["--model", "/nonexistent", "--pretrain-episodes", "9", "--no-pretrain-dynamics"],
     "--pretrain-episodes, --no-pretrain-dynamics set how the embedded default"),
])
def test_a_map_the_game_cannot_draw_is_refused_before_anything_is_written(argv, message, tmp_path, monkeypatch, capsys):
    code, stderr, wrote = run_cli_in_process(argv, tmp_path, monkeypatch, capsys)
    assert code == 2 and stderr.startswith(f"error: {message}") and "Fix:" in stderr
    assert "Traceback" not in stderr and not wrote


def test_grid_size_and_turn_cap_reach_the_training_and_held_out_games(tmp_path):
    args = train.settle(settings.override(train.Args(method="grpo", out=str(tmp_path)),
                                          {"grid_size": 6, "max_turns": 20, "eval.max_turns": 12}))
    game = setup.make_game(args)
    env, held_out = game.make_env(), setup.held_out_game(args, game).make_env()
    assert game.name == "frozenlake6x6" and (env.size, env.max_steps) == (6, 20) and held_out.max_steps == 12
    assert len(env.reset(0)[0].splitlines()) == 6
    default = setup.make_game(train.settle(train.Args(method="grpo", out=str(tmp_path))))
    assert default.name == "frozenlake" and (default.make_env().size, default.make_env().max_steps) == (4, 10)


def run_cli_in_process(argv, tmp_path, monkeypatch, capsys):
    """train.cli() on argv with --out in tmp_path: (exit status, stderr, whether anything was written)."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    monkeypatch.setenv("RWML_JAX_CACHE", str(cache))
    monkeypatch.setattr(sys, "argv", ["train.py", *argv, "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        train.cli()
    return exit_.value.code, capsys.readouterr().err, out.exists() or cache.exists()


@pytest.mark.parametrize("argv, message", [
    (["--learning-rate", "nan"], "--learning-rate must be a finite number > 0, not nan"),
    (["--learning-rate", "-1e-6"], "--learning-rate must be a finite number > 0, not -1e-06"),
    (["--wm-learning-rate", "inf"], "--wm-learning-rate must be a finite number > 0, not inf"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be a finite number > 0"),
    (["--clip-low", "1.0"], "--clip-low must be in [0, 1)"),
    (["--clip-high", "-0.2"], "--clip-high must be a finite number >= 0"),
    (["--beta", "nan"], "--beta must be a finite number >= 0"),
    (["--entropy-coef", "inf"], "--entropy-coef must be a finite number"),
    (["--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--eval.temperature", "-1"], "--eval.temperature must be a finite number >= 0"),
    (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--rho", "nan"], "--rho must be in [0, 1]"),
    (["--tau-d", "3"], "--tau-d must be in [0, 2]"),
    (["--filter.tau-d", "-0.1"], "--filter.tau-d must be in [0, 2]"),
    (["--filter.keep-easy", "2"], "--filter.keep-easy must be in [0, 1]"),
    (["--fixed-lambda", "nan"], "--fixed-lambda must be a finite number"),
    (["--r-max", "0"], "--r-max must be a finite number > 0"),
    (["--groups", "0"], "--groups must be at least 1"),
    (["--wm-rollouts", "0"], "--wm-rollouts must be at least 1"),
    (["--mesh-data", "0"], "--mesh-data must be at least 1"),
    (["--max-length", "0"], "--max-length must be at least 1"),
    (["--grid-size", "1"], "--grid-size must be at least 2"),
])
def test_a_number_out_of_range_is_refused_before_anything_is_written(argv, message, tmp_path, monkeypatch, capsys):
    code, stderr, wrote = run_cli_in_process(argv, tmp_path, monkeypatch, capsys)
    assert code == 2 and stderr.startswith(f"error: {message}") and "Fix: pass e.g. --" in stderr
    assert "Traceback" not in stderr and not wrote


def test_every_bad_number_gets_its_own_message(tmp_path, monkeypatch, capsys):
    code, stderr, wrote = run_cli_in_process(["--alpha", "-1", "--beta", "-1", "--learning-rate", "0"], tmp_path,
                                             monkeypatch, capsys)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 3 and not wrote
    assert [line.split()[0].removeprefix("error:") or line.split()[1] for line in lines] == ["--learning-rate",
                                                                                               "--beta", "--alpha"]


@pytest.mark.parametrize("argv, message", [
    (["--method", "grpo", "--group-size", "1"], "--group-size must be at least 2 for policy RL, not 1"),
    (["--method", "paw", "--group-size", "1"], "--group-size must be at least 2 for policy RL, not 1"),
    (["--method", "rwml", "--wm-group-size", "1"], "--wm-group-size must be at least 2 for RWML, not 1"),
])
def test_a_group_of_one_is_refused_for_a_group_relative_method(argv, message, tmp_path, monkeypatch, capsys):
    code, stderr, wrote = run_cli_in_process(argv, tmp_path, monkeypatch, capsys)
    assert code == 2 and stderr.startswith(f"error: {message}") and "nothing is trained" in stderr and not wrote


def test_group_size_one_is_fine_where_no_stage_compares_a_group():
    args = train.settle(tyro.cli(train.Args, args=["--method", "wm-sft", "--group-size", "1"]))
    assert checks.number_problems(args) == []


def test_a_model_folder_without_a_tokenizer_is_refused_before_anything_is_written(hf_checkpoint, tmp_path, monkeypatch,
                                                                                   capsys):
    folder, _ = hf_checkpoint("qwen2")
    code, stderr, wrote = run_cli_in_process(["--model", str(folder)], tmp_path, monkeypatch, capsys)
    assert code == 2 and "no usable tokenizer" in stderr and "Traceback" not in stderr and not wrote


def test_too_few_world_model_transitions_end_with_one_message_and_exit_status_2(tmp_path, monkeypatch, capsys):
    """Found only after the run folder is written, so it is not a UsageError, but still no traceback."""
    import types

    monkeypatch.setattr(train, "self_play", lambda *args, **kwargs: [])  # 0 valid transitions
    args = train.settle(tyro.cli(train.Args, args=["--method", "wm-sft", "--out", str(tmp_path / "run")]))
    stub = types.SimpleNamespace(args=args, out=tmp_path, game=setup.make_game(args))
    monkeypatch.setattr(train, "main", lambda args: train.world_model_data(stub, 0, "wm-sft", None, too_easy=False))
    code, stderr, _ = run_cli_in_process([], tmp_path, monkeypatch, capsys)
    assert code == 2 and stderr.startswith("error: only 0 valid transitions") and "Fix: raise --wm-tasks" in stderr
    assert "Traceback" not in stderr


def test_ctrl_c_prints_how_to_resume_and_exits_130(tmp_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "main", interrupted)
    code, stderr, _ = run_cli_in_process(["--method", "grpo"], tmp_path, monkeypatch, capsys)
    assert code == 130 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert f"--resume --out {tmp_path / 'run'}" in stderr


def test_three_non_finite_updates_in_a_row_stop_the_run_and_nothing_non_finite_is_saved(cache, tmp_path, monkeypatch):
    """Every update's loss made NaN: each is skipped (train/skipped 1, the parameters kept), the third stops the
    run with a DataError, its checkpoints hold the base model's finite parameters, and nothing is exported."""
    import jax.numpy as jnp

    def poisoned(objective, *args, **kwargs):
        loss = lambda *inputs: jax.tree.map(lambda x: x * jnp.nan, objective.loss(*inputs))
        return sized_update(objective._replace(loss=loss), *args, **kwargs)

    sized_update = sharding.sized_update
    monkeypatch.setattr(sharding, "sized_update", poisoned)
    out = tmp_path / "run"
    argv = ["--method", "grpo", "--out", str(out), *TINY_PRETRAIN, *TINY_POLICY, "--iterations", "5",
            "--eval.every", "5"]
    with pytest.raises(train.DataError, match=r"grpo: the updates of the last 3 steps \(to step 3\).*Fix: start "
                                              r"again in another --out with a lower --learning-rate"):
        run_in_process(argv, cache, monkeypatch)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped"] for r in records if "train/loss" in r] == [1.0, 1.0, 1.0]
    assert not (out / "model").exists()
    import orbax.checkpoint as ocp

    args = train.settle(tyro.cli(train.Args, args=argv))
    base = setup.load_model(args, setup.make_game(args), log=lambda *_: None)[2]
    with ocp.CheckpointManager((out / "checkpoints").absolute()) as manager:
        assert manager.all_steps() == [1, 2]
        for step in manager.all_steps():
            saved = manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore()))["arrays"]
            for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(saved["state"]["params"])):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_or_export_holding_a_nan_is_refused_and_nothing_is_written(tmp_path):
    config = lm.Config(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=4, num_kv_heads=2, head_dim=8)
    params = lm.init_params(config, jax.random.key(0))
    assert checkpoints.all_finite(params)
    params["layers_0"]["mlp"]["up"]["kernel"] = params["layers_0"]["mlp"]["up"]["kernel"].at[0, 0].set(np.nan)
    assert not checkpoints.all_finite(params) and not checkpoints.all_finite({"moment": np.array([1.0, np.inf])})
    with pytest.raises(checkpoints.NotFiniteError, match="not finite.*nothing was exported. Fix: "):
        checkpoints.export_model(tmp_path / "model", config, params, tokenizer=None)
    assert not (tmp_path / "model").exists()
    saved = checkpoints.Checkpoints(tmp_path / "checkpoints")
    with pytest.raises(checkpoints.NotFiniteError, match="checkpoint of step 1 holds a number that is not finite.*Fix: "):
        saved.save(1, {"params": params, "key": jax.random.key_data(jax.random.key(0))}, {"stage": 0, "step": 1})
    saved.close()
    assert saved.latest() is None and not any((tmp_path / "checkpoints").iterdir())


def test_a_start_that_fails_before_its_first_checkpoint_does_not_block_the_same_command(cache, tmp_path, monkeypatch):
    """The run folder gets checkpoints/ (Orbax's manager) before anything trains; a failure then must not make
    the same command answer 'already holds a run'."""
    class Failure(Exception):
        pass

    def failing_logger(*args, **kwargs):
        raise Failure

    out = tmp_path / "run"
    argv = ["--method", "grpo", "--out", str(out), *TINY_PRETRAIN, *TINY_POLICY, "--iterations", "1"]
    with monkeypatch.context() as patch:
        patch.setattr(logs, "Logger", failing_logger)
        with pytest.raises(Failure):
            run_in_process(argv, cache, monkeypatch)
    assert (out / "checkpoints").is_dir() and not any((out / "checkpoints").iterdir())
    stale = out / "stage0-spa-examples.json"  # a stage's data from the failed start, made with its settings
    stale.write_text("{}")
    run_in_process(argv, cache, monkeypatch)
    assert (out / "model" / "config.json").exists() and checkpoints.checkpoint_steps(out / "checkpoints") == [1]
    assert not stale.exists()  # a fresh start makes its own


def test_resume_with_other_settings_is_refused_listing_each_change_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    """A paw run's args.json (update_tokens filled, as main writes it), resumed as grpo at another learning rate:
    both changes listed, flag by flag; the neutral ones (--eval.every, --no-progress) are not; args.json is kept."""
    out = tmp_path / "run"
    out.mkdir()
    saved = train.settle(tyro.cli(train.Args, args=["--method", "paw", "--out", str(out)]))
    (out / "args.json").write_text(json.dumps(dict(dataclasses.asdict(saved), update_tokens=4096)))
    before = (out / "args.json").read_bytes()
    code, stderr, _ = run_cli_in_process(["--resume", "--method", "grpo", "--learning-rate", "0.01", "--eval.every", "3",
                                          "--no-progress"], tmp_path, monkeypatch, capsys)
    assert code == 2 and stderr.startswith(f"error: --resume: {out} was run with other settings")
    assert "\n  --method: paw -> grpo\n  --learning-rate: 0.001 -> 0.01\n" in stderr and "Fix: " in stderr
    assert "--eval.every" not in stderr and "--progress" not in stderr and "--update-tokens" not in stderr
    assert [p.name for p in out.iterdir()] == ["args.json"] and (out / "args.json").read_bytes() == before
    assert not (tmp_path / "cache").exists()


def test_resume_may_change_only_how_often_a_run_evaluates_checkpoints_and_where_it_writes():
    saved = train.settle(train.Args(method="grpo"))
    neutral = dict(out="elsewhere", resume=True, checkpoint_every=3, tensorboard=False, progress=False, cache="/c",
                   workers=4, distributed=True, update_tokens=512, **{"eval.every": 7, "eval.wm_every": 2})
    saved_json = dataclasses.asdict(saved)
    assert settings.setting_changes(saved_json, settings.override(saved, neutral)) == []
    changed = settings.override(saved, {"seed": 1, "loss.beta": 0.5, "mesh_data": 2, "eval.episodes": 3})
    assert settings.setting_changes(saved_json, changed) == [("--seed", 0, 1), ("--beta", 0.0, 0.5),
                                                             ("--eval.episodes", 128, 3), ("--mesh-data", 1, 2)]
    # a setting the saved run predates is not compared; one saved before --beta moved into loss still is
    older = {k: v for k, v in saved_json.items() if k not in ("seed", "loss")} | saved_json["loss"]
    assert settings.setting_changes(older, changed)[0] == ("--beta", 0.0, 0.5)
    # with --model, the embedded default's pretraining (saved as numbers by runs from before it was left unset)
    hub = train.settle(train.Args(method="grpo", model="Qwen/Qwen2.5-0.5B-Instruct"))
    before = dataclasses.asdict(hub) | {"pretrain_steps": 300, "pretrain_episodes": 3000}
    assert hub.pretrain_steps is None and settings.setting_changes(before, hub) == []
    assert settings.setting_changes(saved_json | {"pretrain_steps": 5}, saved) == [("--pretrain-steps", 5, 300)]
    # a run from before --wm-prediction scored the only block: resuming it under the authors' last block is a change
    rwml = train.settle(train.Args(method="rwml"))
    predates = {k: v for k, v in dataclasses.asdict(rwml).items() if k != "wm_prediction"}
    assert rwml.wm_prediction == "last"
    assert settings.setting_changes(predates, rwml) == [("--wm-prediction", "one", "last")]
    assert settings.setting_changes(predates, settings.override(rwml, {"wm_prediction": "one"})) == []
    # nor did it cut the prediction: resuming it under the authors' 100 tokens is a change too
    uncut = {k: v for k, v in dataclasses.asdict(rwml).items() if k != "wm_prediction_tokens"}
    assert rwml.wm_prediction_tokens == 100
    assert settings.setting_changes(uncut, rwml) == [("--wm-prediction-tokens", 0, 100)]
    assert settings.setting_changes(uncut, settings.override(rwml, {"wm_prediction_tokens": 0})) == []


@pytest.mark.parametrize("argv", [
    [],  # --model switches on the papers' recipe (lr 1e-6, beta 0.01, 512 new tokens): theirs, not the user's
    ["--seed", "2", "--max-turns", "20", "--beta", "0.5"],  # --eval.max-turns follows --max-turns: not listed
])
def test_every_run_prints_the_flags_it_was_given_and_they_reproduce_its_settings(argv, hf_checkpoint, tmp_path,
                                                                                  monkeypatch, capsys):
    """The block lists the settings that differ from the recipe of the run's --method, --env and --model: the flags
    the user passed (here all of them differ), and no value the recipe or a followed setting filled in."""
    import engine

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    folder, _ = hf_checkpoint("qwen2")
    monkeypatch.setattr(engine, "prepare", stop)  # the block comes before the model is loaded
    given = ["--method", "grpo", "--model", str(folder), "--out", str(tmp_path / "run"), *argv, "--no-progress"]
    with pytest.raises(Stop):
        train.main(tyro.cli(train.Args, args=given))
    printed = capsys.readouterr().out
    assert printed.startswith(f"settings (those not at their defaults; all in {tmp_path / 'run' / 'args.json'}):\n  ")
    block = printed.split(":\n", 1)[1]
    assert shlex.split(block) == given  # given in the order of Args' fields, as the block lists them
    assert train.settle(tyro.cli(train.Args, args=shlex.split(block))) == train.settle(tyro.cli(train.Args, args=given))


def test_the_settings_block_leaves_out_what_the_recipe_and_the_followed_settings_fill():
    """python train.py --method paw (the default method) on the embedded default lists nothing; --seed 2 and
    --max-turns 20 move --out and --eval.max-turns, which follow them, and only the two given are listed."""
    settled = lambda argv: train.settle(settings.parse(argv))
    assert settings.settings_block(settled(["--method", "paw"])).split()[0] == "none"
    given = ["--seed", "2", "--max-turns", "20"]
    assert (settled(given).out, settled(given).eval.max_turns) == ("runs/paw-frozenlake-seed2", 20)
    assert shlex.split(settings.settings_block(settled(given))) == given


def test_pretraining_without_dynamics_shows_the_format_but_never_a_next_state(tmp_path):
    """--no-pretrain-dynamics: play transcripts stop at the response's end, and world-model transcripts answer in
    the world-model format with the state the action was taken in; with dynamics both carry the next state (the play
    transcript's cut to following_chars, the world model's label whole)."""
    game = setup.make_game(train.settle(train.Args(method="grpo", out=str(tmp_path))))
    trajectories, prompts = rollout.random_play(game, 12, seed=0)
    tokenizer = hf.train_tokenizer(pretrain.corpus(game, trajectories, prompts), 400)
    eos = tokenizer.eos_token_id
    turns = [turn for trajectory in trajectories for turn in trajectory.turns]
    for dynamics, cut in ((True, None), (False, None), (True, 7)):  # cut: the play's next observation, not the label
        play, world_model = pretrain.transcripts(game, trajectories, prompts, tokenizer, 0, dynamics, cut)
        assert len(play) == len(turns)
        for (_, target), turn in zip(play, turns):
            response = tokenizer.encode(turn.response_text, add_special_tokens=False) + [eos]
            following = tokenizer.encode(turn.next_observation[:cut], add_special_tokens=False) if dynamics else []
            assert target == response + following
        triplets = rwml.triplets_from_rollouts(trajectories, game.history)
        assert len(world_model) == len(triplets)
        for (_, target), triplet in zip(world_model, triplets):
            state = triplet.next_state if dynamics else triplet.state
            assert tokenizer.decode(target[:-1]) == f"<think> </think>\n<next_state> {state} </next_state>"
            assert target[-1] == eos
    moved = [t for t in triplets if t.state != t.next_state]
    assert moved  # random play moves the player: without dynamics those targets are wrong, as intended


def test_pretrain_observation_pretrains_the_default_on_observations_other_than_those_it_meets(tmp_path, embedded_cache):
    """--observation grid+coordinates --pretrain-observation grid: the run plays with coordinates, from the embedded
    default pretrained on the plain grid (the same checkpoint as the plain default's); without the flag, the default
    is pretrained on what it meets."""
    # the recipes tests/test_experiment.py's regimes build (one pretraining step): the session builds them once
    tiny = {"observation": "grid+coordinates", "pretrain_steps": 1, "pretrain_episodes": 40, "cache": str(embedded_cache)}
    runs = {name: train.settle(settings.override(train.Args(method="grpo", out=str(tmp_path)), {**tiny, **extra}))
            for name, extra in (("same", {}), ("grid", {"pretrain_observation": "grid"}))}
    plain = train.settle(settings.override(train.Args(method="grpo", out=str(tmp_path)),
                                           {**tiny, "observation": "grid"}))
    game = setup.make_game(runs["grid"])
    assert game.name == "frozenlake-coordinates" and "Player (P) is at" in game.make_env().reset(0)[0]
    folders = {name: setup.load_model(run, setup.make_game(run), log=lambda *_: None)[0] for name, run in runs.items()}
    assert folders["grid"] == setup.load_model(plain, setup.make_game(plain), log=lambda *_: None)[0]
    assert folders["same"] != folders["grid"]
    assert folders["same"].name.startswith("frozenlake-coordinates-") and not folders["grid"].name.startswith("frozenlake-c")


def test_groups_without_success_counts_the_groups_where_no_rollout_won():
    import rollout

    def trajectory(group, won):
        turn = rollout.Turn(step=0, observation="", prompt_ids=np.zeros(0, np.int32), response_ids=np.zeros(0, np.int32),
                            response_logprobs=np.zeros(0), response_entropies=np.zeros(0), response_text="", actions=[],
                            next_observation="", next_observation_ids=np.zeros(0, np.int32), reward=float(won),
                            done=True, won=won, invalid=False)
        return rollout.Trajectory(seed=0, group=group, task="", initial_info={}, turns=[turn])

    wins = {0: (False, False, False), 1: (False, True, False), 2: (False, False, False), 3: (True, True, True)}
    trajectories = [trajectory(group, won) for group, row in wins.items() for won in row]
    assert train.groups_without_success(trajectories) == 0.5
