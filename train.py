"""train.py: one command for every method, sharded across devices, resumable.

    python train.py --method paw                          # the embedded default: FrozenLake, CPU, minutes
    python train.py --method rwml-grpo --env alfworld --model Qwen/Qwen2.5-7B-Instruct

A method is a sequence of stages; each stage composes the pure pieces of the other modules under
`jit`, with parameters and optimizer state sharded FSDP-style over a (data x fsdp) device mesh and
the batch split over all devices:

    grpo          policy RL: rollouts, group advantages, grpo.grpo_step        (methods.md section 1, eqs. 1-13)
    paw           policy RL with PaW's world-model loss: paw.paw_step            (methods.md section 3, eq. 22)
    wm-sft        WM SFT on the model's own transitions: rwml.sft_step            (methods.md section 2.5, eq. 20)
    rwml          RWML: too-easy filter, G predictions a triplet, cosine reward, grpo_step   (section 2, eqs. 14-18)
    rwml-grpo     RWML, then policy RL (GRPO) from its parameters, with a fresh optimizer
    wm-sft-grpo   WM SFT, then policy RL
    spa           SPA: SFT on self-play with the true states in the reasoning, then policy RL   (section 4)

Without --model, the model is the embedded default (`pretrain.py`): a tiny Qwen2 pretrained on
transcripts of random play in the chosen environment, built once and cached. Every setting is in `settings.py`
(`--help` prints them): those left unset take the papers' values for a Hugging Face model, and the embedded
default's recipe for the tiny model.

Evaluation (`evaluate.py`) runs before training, every --eval.every steps and at the end: task success (Pass@1,
and Pass@k with --eval.samples) on held-out tasks, and world-model accuracy on held-out transitions of random play.
Metrics go to metrics.jsonl, TensorBoard event files and the progress bar, curves.png at the end (`logs.py`).
Orbax checkpoints (`checkpoints.py`: parameters, optimizer state, reference, RNG, stage and step, which fixes the
data position) every --checkpoint-every steps; --resume continues bit for bit; the final model is exported in
Hugging Face format to <out>/model, and a two-stage method's first-stage model to <out>/model-stage0-<stage> (e.g.
the RWML model that policy RL starts from). The device mesh and the memory-sized updates are `sharding.py`'s; one run
over several processes (--distributed; policy RL only) is `multihost.py`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import checkpoints
import envs
import evaluate
import grpo
import logs
import model as lm
import multihost
import paw
import pretrain
import reward
import rollout
import rwml
import sampler
import settings
import sharding
import spa

STAGES = settings.STAGES
Args, UsageError, settle = settings.Args, settings.UsageError, settings.settle  # train.Args(...) in Python


class DataError(Exception):
    """A stage's own data cannot train it (e.g. too few valid transitions), found after the run folder is written:
    printed as one message; exit status 2."""


# --------------------------------------------------------------------------------------------
# The game: environment, prompt, parser
# --------------------------------------------------------------------------------------------


def make_game(args: Args) -> pretrain.Game:
    if args.env == "alfworld":
        make_env = functools.partial(envs.AlfWorld, "train", max_steps=max(args.max_turns, args.wm_max_turns))
        return pretrain.Game("alfworld", "verl-agent", make_env, envs.alfworld_prompt, lambda a: f"<action>{a}</action>",
                             args.history, args.max_turns)
    env_class = grid_env(args, args.max_turns)
    short = args.prompt == "short" or (args.prompt == "auto" and args.model is None)
    state_estimation = args.state_estimation or args.method == "spa"  # SPA keeps state estimation on
    if args.prompt == "coordinates" or (short and args.method == "spa"):
        name, prompt = "grid+coordinates", lambda task, history, step, observation, info: spa.render_state(observation, info)
    elif short:
        name, prompt = "grid", lambda task, history, step, observation, info: observation
    else:
        name = f"ragen{'+coordinates' if state_estimation else ''}-{args.actions_per_turn}-actions"
        prompt = envs.grid_prompt(envs.GRID_ENVS[args.env].rules, state_estimation, args.actions_per_turn)
    size = f"{args.grid_size}x{args.grid_size}" if args.grid_size != settings.GRID_SIZE[args.env] else ""
    observation = "-coordinates" if args.observation == "grid+coordinates" else ""  # the default keeps its name
    return pretrain.Game(args.env + size + observation, name, env_class, prompt, lambda a: f"<answer>{a}</answer>",
                         args.history, args.max_turns)


def grid_env(args: Args, max_steps: int):
    """A grid game of --grid-size whose episodes end after max_steps actions (the turn cap), its observations
    rendered as --observation says."""
    game = envs.GRID_ENVS[args.env]
    if args.observation == "grid+coordinates":
        return functools.partial(envs.WithCoordinates, game, size=args.grid_size, max_steps=max_steps)
    return functools.partial(game, size=args.grid_size, max_steps=max_steps)


def parser_for(args: Args):
    if args.env == "alfworld":
        return envs.parse_action
    return functools.partial(envs.parse_answer, max_actions=args.actions_per_turn)


def eval_env(args: Args):
    if args.env == "alfworld":
        return functools.partial(envs.AlfWorld, args.eval.split, max_steps=args.eval.max_turns)
    return grid_env(args, args.eval.max_turns)


def make_evaluator(args: Args, game: pretrain.Game, tokenizer, config: lm.Config) -> evaluate.Evaluator:
    """The run's evaluation: the game's held-out tasks (ALFWorld: the evaluation split), parsed as in training."""
    held_out = dataclasses.replace(game, make_env=eval_env(args))
    return evaluate.Evaluator(args.eval, held_out, parser_for(args), tokenizer, config, max_new_tokens=args.max_new_tokens,
                              spa_prediction=args.method == "spa", seed=args.seed, workers=args.workers)


def train_task(args: Args, stage: int, step: int, group: int) -> int:
    """The task (reset seed) of a group: a function of the position, so a resumed run replays the same data."""
    return 1_000_000 * (args.seed + 1) + 100_000 * stage + step * args.groups + group


# --------------------------------------------------------------------------------------------
# The updates' settings, from the command line
# --------------------------------------------------------------------------------------------


def step_config(args: Args, budget: int | None = None) -> grpo.StepConfig:
    """How the update's loss is computed (its micro-batches are sized_update's). budget: the stage's most new tokens
    per response (default --max-new-tokens), Dr.GRPO's constant unless --max-length is set."""
    loss = dataclasses.replace(args.loss, max_length=args.loss.max_length or budget or args.max_new_tokens)
    dtype = None if args.compute_dtype == "float32" else args.compute_dtype
    return grpo.StepConfig(loss, args.temperature, remat=args.remat, compute_dtype=dtype)


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------


MAX_SKIPPED_IN_A_ROW = 3  # one non-finite update is skipped (grpo.skip_if_not_finite); this many in a row stop the run


@dataclasses.dataclass
class Run:
    """What every stage shares."""

    args: Args
    game: pretrain.Game
    config: lm.Config
    tokenizer: object
    mesh: Mesh
    out: Path
    key: jax.Array
    evaluator: evaluate.Evaluator
    logger: logs.Logger | None = None
    checkpoints: checkpoints.Checkpoints | None = None
    global_step: int = 0
    stage_lengths: dict = dataclasses.field(default_factory=dict)
    skipped_in_a_row: int = 0
    """updates skipped in a row for a loss or gradient that was not finite (metric skipped)"""

    @functools.cached_property
    def peak_flops(self) -> float:
        """FLOP/s of the mesh's devices at their measured matmul peak in the compute dtype (sharding.matmul_peak)."""
        return sharding.matmul_peak(self.args.compute_dtype) * self.mesh.size

    def stage_index(self, name: str) -> int:
        return STAGES[self.args.method].index(name)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def key_data(self) -> jax.Array:
        """The run's key as checkpointed: replicated over the mesh, a global array that every process saves (from
        numpy: sharding.place says why)."""
        return jax.device_put(np.asarray(jax.random.key_data(self.key)), NamedSharding(self.mesh, PartitionSpec()))

    def evaluate(self, params, stage: str) -> dict:
        metrics = self.evaluator(params, jax.random.key(evaluate.EVAL_SEED))  # one key for every evaluation: less noise between them
        self.logger.log(self.global_step, stage, metrics, prefix="eval")
        return metrics

    def finish_step(self, stage_index: int, stage: str, step: int, state: grpo.TrainState, reference, metrics: dict):
        """Log a step's metrics (and the memory in use and at its peak); evaluate and checkpoint on schedule. Stop
        the run (DataError) after MAX_SKIPPED_IN_A_ROW updates in a row were skipped as not finite."""
        self.global_step += 1
        if "model_flops" in metrics:  # MFU: the update's model FLOPs over its seconds and the devices' measured peak
            metrics["mfu"] = metrics["model_flops"] / max(metrics["seconds_update"], 1e-9) / self.peak_flops
        self.logger.log(self.global_step, stage, dict(metrics, **logs.memory_gib()))
        self.logger.advance()
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if metrics.get("skipped") else 0
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            flag = {"rwml": "--wm-learning-rate", "wm-sft": "--sft-learning-rate",
                    "spa-sft": "--spa.learning-rate"}.get(stage, "--learning-rate")
            raise DataError(f"{stage}: the updates of the last {self.skipped_in_a_row} steps (to step "
                            f"{self.global_step}) had a loss or gradient that is not finite (NaN or infinity) and "
                            f"were skipped (train/skipped in metrics.jsonl); the run stops, its checkpoints hold the "
                            f"finite parameters from before. Fix: start again in another --out with a lower {flag}, "
                            "or with --compute-dtype float32.")
        last = step + 1 == self.stage_lengths[stage_index]
        every = self.args.eval.every if stage in ("grpo", "paw") else self.args.eval.wm_every
        if (step + 1) % every == 0 or last:
            self.evaluate(state.params, stage)
        if self.global_step % self.args.checkpoint_every == 0 or last:
            arrays = {"state": state, "key": self.key_data()}
            if reference is not None:
                arrays["reference"] = reference
            self.checkpoints.save(self.global_step, arrays, {"stage": stage_index, "step": step + 1})


def timed_update(update, state: grpo.TrainState, batch) -> tuple[grpo.TrainState, dict]:
    """update(state, batch), its metrics as floats (which waits for it), and its wall seconds: seconds_update."""
    started = time.perf_counter()
    state, metrics = update(state, batch)
    metrics = {k: float(v) for k, v in metrics.items()}
    return state, dict(metrics, seconds_update=time.perf_counter() - started)


def reference_logprobs_fn(run: Run, temperature: float):
    """(reference params, tokens, mask, positions) -> log pi_ref of the tokens at positions (lm.scored_positions), at
    the temperature the policy's are taken at."""
    return jax.jit(lambda params, tokens, mask, positions: lm.token_logprobs(params, run.config, tokens, mask,
                                                                             temperature, positions=positions)[0])


def policy_stage(run: Run, index: int, name: str, params, start: int, restored: dict | None):
    """GRPO or PaW: each step plays `groups` tasks x G, scores whole trajectories, and updates on every turn."""
    args = run.args
    optimizer = _optimizer(run, name)
    state = sharding.place(grpo.init_state(params, optimizer), run.mesh)
    reference = sharding.place(params, run.mesh) if _uses_reference(args, name) else None
    if restored is not None:
        state, reference = restored["state"], restored.get("reference")
    cfg = args.paw
    step_cfg = step_config(args)
    objective = (paw.paw_objective(run.config, step_cfg, cfg) if name == "paw"
                 else grpo.grpo_objective(run.config, step_cfg))
    update = sharding.sized_update(objective, optimizer, state, run.mesh, args.update_tokens, run.config)
    reference_fn = reference_logprobs_fn(run, args.temperature) if reference is not None else None
    scored = (lambda batch: batch.action_mask) if name == "paw" else (lambda batch: batch.loss_mask)  # the KL's tokens
    sampling = sampler.SamplingParams(args.temperature, max_new_tokens=args.max_new_tokens)
    with rollout.EnvBatch(run.game.make_env, args.groups * args.group_size, args.workers) as environments:
        for step in range(start, args.iterations):
            timings = {}
            seeds = [train_task(args, index, step, group) for group in range(args.groups)]
            key = jax.random.fold_in(jax.random.fold_in(run.key, index), step)
            trajectories = rollout.rollout(state.params, run.config, run.tokenizer, environments, seeds,
                                           args.group_size, key, prompt=run.game.prompt, parse=parser_for(args),
                                           max_turns=args.max_turns, sampling=sampling, history=args.history,
                                           timings=timings)
            advantages, keep, stats = grpo.trajectory_advantages(trajectories, args.estimator,
                                                                 args.filter_zero_variance)
            if name == "paw":
                batch, _ = paw.paw_batch(trajectories, advantages, paw.world_model_weights(stats.mean, cfg), cfg,
                                         run.pad_id, min_rows=run.mesh.size, trajectory_keep=keep)
            else:
                batch = grpo.turn_batch(trajectories, advantages, keep, pad_id=run.pad_id, min_rows=run.mesh.size)
            if reference_fn is not None:  # in the update's micro-batches, so it fits where the update does
                batch = batch._replace(ref_logprobs=update.map_rows(functools.partial(reference_fn, reference),
                                                                    batch.tokens, batch.token_mask, scored(batch)))
            state, metrics = timed_update(update, state, batch)
            metrics.update(rollout.episode_stats(trajectories), seconds_sampling=timings.get("model", 0.0), seconds_env=timings.get("env", 0.0),
                           rows=float(batch.tokens.shape[0]), zero_variance_groups=float(np.mean(stats.zero_variance)),
                           groups_without_success=groups_without_success(trajectories))
            run.finish_step(index, name, step, state, reference, metrics)
    return state.params


def groups_without_success(trajectories) -> float:
    """The share of groups in which no rollout won: with sparse rewards their advantages carry no success to learn
    from (invalid-action penalties may still vary, so such a group need not have zero variance)."""
    won = {}
    for trajectory in trajectories:
        won[trajectory.group] = won.get(trajectory.group, False) or trajectory.won
    return float(np.mean([not any_won for any_won in won.values()]))


def triplets_to_json(triplets) -> list[dict]:
    return [t._asdict() for t in triplets]


def triplets_from_json(rows) -> list[rollout.Transition]:
    return [rollout.Transition(**{**row, "history": tuple(tuple(pair) for pair in row["history"])}) for row in rows]


@functools.cache
def make_embedder(name: str):
    """E of the RWML reward (loaded once per process): "minilm", or a BERT / Qwen3-Embedding checkpoint."""
    if name == "minilm":
        return reward.default_embedder()
    folder = lm.resolve_checkpoint(name)
    if json.loads((folder / "config.json").read_text()).get("model_type") == "bert":
        return reward.BertEmbedder(folder)
    return reward.LastTokenEmbedder(folder)


def self_play(run: Run, index: int, params, tasks: int, rollouts: int, max_turns: int) -> list[rollout.Trajectory]:
    """A stage's data rollouts: `tasks` training tasks x `rollouts` at temperature 1, with a key apart from the step keys."""
    args = run.args
    seeds = [train_task(args, index, 0, task) for task in range(tasks)]
    sampling = sampler.SamplingParams(1.0, max_new_tokens=args.max_new_tokens)
    with rollout.EnvBatch(run.game.make_env, tasks * rollouts, args.workers) as environments:
        return rollout.rollout(params, run.config, run.tokenizer, environments, seeds, rollouts, data_key(run, index),
                               prompt=run.game.prompt, parse=parser_for(args), max_turns=max_turns, sampling=sampling,
                               history=args.history)


def data_key(run: Run, index: int) -> jax.Array:
    """The key of a stage's data collection, apart from its step keys (fold_in(stage key, step))."""
    return jax.random.fold_in(jax.random.fold_in(run.key, index), 2**31 - 1)


def epoch_rows(seed: int, stage: int, step: int, count: int, batch_size: int) -> np.ndarray:
    """The example indices of an epoch-based stage's step: a seeded shuffle per epoch, in batches of batch_size
    (the last filled cyclically, so every batch has one shape). A function of the step, so resuming replays it."""
    epoch, position = divmod(step, math.ceil(count / batch_size))
    order = np.random.default_rng([seed, stage, epoch]).permutation(count)
    return np.resize(np.roll(order, -position * batch_size), batch_size)


def epoch_steps(epochs: int, count: int, batch_size: int) -> int:
    return epochs * math.ceil(count / batch_size)


def world_model_data(run: Run, index: int, name: str, params, scorer) -> dict:
    """The stage's triplets from the current model's own play (90/10 split; RWML: too-easy subsampled),
    saved to the run folder so a resumed stage trains on exactly the same data."""
    args = run.args
    path = run.out / f"stage{index}-{name}-triplets.json"
    if path.exists():
        data = json.loads(path.read_text())
        return {**data, "train": triplets_from_json(data["train"]), "validation": triplets_from_json(data["validation"])}
    trajectories = self_play(run, index, params, args.wm_tasks, args.wm_rollouts, args.wm_max_turns)
    if args.wm_invalid_steps == "drop":
        triplets = rwml.triplets_from_rollouts(trajectories, args.history)
    else:
        triplets = rollout.transitions(trajectories, args.history)
    if len(triplets) < 2:
        raise DataError(f"only {len(triplets)} valid transitions from {len(trajectories)} rollouts: too few to "
                           "train a world model on. Fix: raise --wm-tasks, or --wm-invalid-steps keep.")
    train, validation = rwml.split_triplets(triplets, 0.1, args.seed)
    summary = {"triplets": len(triplets), "train": len(train), "validation": len(validation)}
    if name == "rwml" and args.too_easy_filter:
        optimizer = grpo.make_optimizer(args.sft_learning_rate, args.weight_decay, args.max_grad_norm)
        filter_key = jax.random.fold_in(data_key(run, index), 1)
        train, filtered = rwml.too_easy_subsample(params, run.config, run.tokenizer, train, validation, scorer, optimizer,
                                                  filter_key, args.filter, args.seed)
        summary.update(filtered)
    data = {"train": triplets_to_json(train), "validation": triplets_to_json(validation), "summary": summary}
    path.write_text(json.dumps(data))
    return {**data, "train": train, "validation": validation}


def world_model_stage(run: Run, index: int, name: str, params, start: int, restored: dict | None, data: dict):
    """WM SFT (cross-entropy on the direct-prompt label) or RWML (GRPO on the binary cosine reward), over
    wm_epochs seeded shuffles of the training triplets in batches of wm_batch (epoch_rows)."""
    args = run.args
    train = data["train"]
    optimizer = _optimizer(run, name)
    state = sharding.place(grpo.init_state(params, optimizer), run.mesh)
    reference = sharding.place(params, run.mesh) if _uses_reference(args, name) else None
    if restored is not None:
        state, reference = restored["state"], restored.get("reference")
    if name == "rwml":
        scorer = rwml.cosine_scorer(make_embedder(args.embedder), args.tau_d)
        # its predictions are sampled at temperature 1, so the ratio's log-probs (and the reference's) are too
        objective = grpo.grpo_objective(run.config, dataclasses.replace(step_config(args, args.wm_max_new_tokens),
                                                                        temperature=1.0))
        rwml_cfg = rwml.RWMLConfig(args.wm_group_size, sampler.SamplingParams(1.0, max_new_tokens=args.wm_max_new_tokens),
                                   args.filter_zero_variance)
    else:
        objective = rwml.sft_objective(run.config, dataclasses.replace(step_config(args), temperature=1.0))
        prompts, labels = rwml.wm_sft_examples(run.tokenizer, train, direct=True)
    update = sharding.sized_update(objective, optimizer, state, run.mesh, args.update_tokens, run.config)
    reference_of = None
    if name == "rwml" and reference is not None:  # in the update's micro-batches, so it fits where the update does
        reference_of = functools.partial(update.map_rows, functools.partial(reference_logprobs_fn(run, 1.0), reference))
    for step in range(start, run.stage_lengths[index]):
        rows = epoch_rows(args.seed, index, step, len(train), args.wm_batch)
        key = jax.random.fold_in(jax.random.fold_in(run.key, index), step)
        if name == "rwml":
            state, metrics = rwml.rwml_update(state, update, run.tokenizer, run.config, [train[i] for i in rows],
                                              scorer, key, rwml_cfg, reference_of)
        else:
            batch = rwml.sft_batch([prompts[i] for i in rows], [labels[i] for i in rows], run.pad_id)
            state, metrics = timed_update(update, state, batch)
        run.finish_step(index, name, step, state, reference, metrics)
    return state.params


def spa_data(run: Run, index: int, params) -> dict:
    """SFT examples from the current model's self-play (spa.py), saved so a resumed stage reuses them."""
    args = run.args
    path = run.out / f"stage{index}-spa-examples.json"
    if path.exists():
        data = json.loads(path.read_text())
        return {**data, "examples": [spa.Example(**e) for e in data["examples"]]}
    trajectories = self_play(run, index, params, args.spa.tasks, args.spa.rollouts, args.spa.max_turns)
    examples, summary = spa.self_play_examples(trajectories, run.game.make_env, run.tokenizer, args.spa)
    if not examples:
        raise DataError(f"self-play left no SFT examples ({summary}). Fix: raise --spa.tasks, or --spa.no-format-filter.")
    path.write_text(json.dumps({"examples": [e._asdict() for e in examples], "summary": summary}))
    return {"examples": examples, "summary": summary}


def spa_stage(run: Run, index: int, params, start: int, restored: dict | None, data: dict):
    """SPA's SFT: spa_epochs seeded shuffles of the self-play examples, cosine learning rate to 0."""
    args = run.args
    examples = data["examples"]
    optimizer = _optimizer(run, "spa-sft")
    state = sharding.place(grpo.init_state(params, optimizer), run.mesh)
    if restored is not None:
        state = restored["state"]
    objective = rwml.sft_objective(run.config, dataclasses.replace(step_config(args), temperature=1.0))
    update = sharding.sized_update(objective, optimizer, state, run.mesh, args.update_tokens, run.config)
    for step in range(start, run.stage_lengths[index]):
        rows = epoch_rows(args.seed, index, step, len(examples), args.spa.batch)
        batch = spa.sft_batch([examples[i] for i in rows], run.pad_id, args.spa.mask_world_model)
        state, metrics = timed_update(update, state, batch)
        run.finish_step(index, "spa-sft", step, state, None, metrics)
    return state.params


def _optimizer(run: Run, stage: str):
    """Each stage's optimizer: AdamW, constant rate for RL, cosine decay to 0 for SPA's SFT."""
    args = run.args
    if stage == "spa-sft":
        return grpo.make_optimizer(args.spa.learning_rate, args.weight_decay, args.max_grad_norm, schedule="cosine",
                                   total_steps=run.stage_lengths[run.stage_index(stage)])
    rate = {"rwml": args.wm_learning_rate, "wm-sft": args.sft_learning_rate}.get(stage, args.learning_rate)
    return grpo.make_optimizer(rate, args.weight_decay, args.max_grad_norm)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def load_model(args: Args, game: pretrain.Game, log=print):
    if args.model is None:
        cfg = dataclasses.replace(pretrain.PretrainConfig(), episodes=args.pretrain_episodes, steps=args.pretrain_steps,
                                  dynamics=args.pretrain_dynamics)
        if args.pretrain_observation not in (None, args.observation):  # pretrained on other observations than it meets
            game = make_game(dataclasses.replace(args, observation=args.pretrain_observation))
        folder = pretrain.embedded_default(game, cfg, args.cache, log)
    else:
        folder = lm.resolve_checkpoint(args.model)
    try:
        config, params = lm.load_checkpoint(folder)
        tokenizer = lm.load_tokenizer(folder)
    except lm.CheckpointError as error:
        raise UsageError(str(error)) from error
    return folder, config, params, tokenizer


def main(args: Args) -> dict:
    """Run the method; returns the first and last evaluation. With --distributed every process of the run calls it
    with the same settings (multihost.py): the same program, one set of files."""
    if args.distributed:  # before any other JAX call
        multihost.initialize(args.coordinator, args.num_processes, args.process_id)
    args = settle(args)
    settings.check(args)
    multihost.barrier("settings checked")  # every process has read a resumed run's args.json before it is rewritten
    print(f"settings (those not at their defaults; all in {Path(args.out) / 'args.json'}):\n{settings.settings_block(args)}")
    game = make_game(args)
    folder, config, params, tokenizer = load_model(args, game)
    mesh = sharding.make_mesh(args.mesh_data, args.mesh_fsdp)
    print(f"{args.method} on {args.env}: {config.model_type} from {folder} ({lm.count_params(params):,} parameters), "
          f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s) in "
          f"{jax.process_count()} process(es), out {args.out}")
    if args.update_tokens is None:
        tokens, why = sharding.default_update_tokens(config, lm.count_params(params), args.loss.beta > 0, mesh.size)
        agreed = multihost.smallest(tokens)  # every process must cut its updates alike: to the tightest memory's
        if agreed < tokens:
            tokens, why = agreed, f"{agreed:,} tokens per device (another process's memory)"
        args = dataclasses.replace(args, update_tokens=tokens)
        print(f"updates in micro-batches of at most {why}; --update-tokens to change")
    run, latest, position = open_run(args, game, config, tokenizer, mesh)
    try:
        params = run_stages(run, params, latest, position)
        run.checkpoints.close()
        checkpoints.export_model(run.out / "model", config, params, tokenizer)
    finally:
        run.evaluator.close()
        run.logger.close()
    before, after = run.logger.evaluations[0], run.logger.evaluations[-1]
    if multihost.is_primary():
        logs.plot_curves(run.out / "metrics.jsonl", run.out / "curves.png")
    print(f"task success before {before['eval/success']:.3f} -> after {after['eval/success']:.3f}; world-model "
          f"accuracy (inline) {before['eval/wm_accuracy_inline']:.3f} -> {after['eval/wm_accuracy_inline']:.3f}, "
          f"(RWML prompt) {before['eval/wm_accuracy']:.3f} -> {after['eval/wm_accuracy']:.3f}")
    print(f"metrics {run.out / 'metrics.jsonl'}, plot {run.out / 'curves.png'}, model {run.out / 'model'}")
    return {"before": before, "after": after}


def open_run(args: Args, game: pretrain.Game, config: lm.Config, tokenizer, mesh: Mesh) -> tuple[Run, int | None, dict]:
    """The run folder (args.json; process 0 writes it), the checkpoints, the logger, and where training starts:
    (run, the checkpoint resumed from or None, {"stage", "step"})."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # every process: Orbax's checkpoints go in it
    if multihost.is_primary():
        (out / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2) + "\n")
        if not args.resume:  # a start that failed before its first checkpoint may have left a stage's data: not reused
            for stale in [*out.glob("stage*-triplets.json"), *out.glob("stage*-spa-examples.json")]:
                stale.unlink()
    run = Run(args, game, config, tokenizer, mesh, out, jax.random.key(args.seed),
              make_evaluator(args, game, tokenizer, config))
    run.checkpoints = checkpoints.Checkpoints(out / "checkpoints")
    latest = run.checkpoints.latest() if args.resume else None
    position = {"stage": 0, "step": 0}
    if latest is not None:
        position, run.global_step = run.checkpoints.position(latest), latest
    # stage lengths: policy stages are fixed; a world-model stage's depends on its data, known when it starts
    for index, name in enumerate(STAGES[args.method]):
        if name in ("grpo", "paw"):
            run.stage_lengths[index] = args.iterations
    run.logger = logs.Logger(out, sum(run.stage_lengths.values()), run.global_step, args.tensorboard, args.progress,
                             args.method, writes=multihost.is_primary())
    return run, latest, position


def run_stages(run: Run, params, latest: int | None, position: dict):
    """Evaluate the base model (a fresh run), then run each stage from `position` on; returns the final parameters."""
    args, stages = run.args, STAGES[run.args.method]
    if run.global_step == 0:
        run.evaluate(jax.device_put(params), "base")
    params = sharding.place(params, run.mesh)
    for index, name in enumerate(stages):
        if index < position["stage"]:
            continue
        start = position["step"] if index == position["stage"] else 0
        data = stage_data(run, index, name, params)
        restored = None
        if index == position["stage"] and latest is not None:
            like = {"state": _fresh_state(run, name, params), "key": run.key_data()}
            if _uses_reference(args, name):
                like["reference"] = like["state"].params
            restored = run.checkpoints.restore(latest, like)
            params = restored["state"].params
        if start < run.stage_lengths[index]:
            if name in ("grpo", "paw"):
                params = policy_stage(run, index, name, params, start, restored)
            elif name == "spa-sft":
                params = spa_stage(run, index, params, start, restored, data)
            else:
                params = world_model_stage(run, index, name, params, start, restored, data)
        if index < len(stages) - 1:  # what the next stage starts from (e.g. the RWML model before policy RL)
            checkpoints.export_model(run.out / f"model-stage{index}-{name}", run.config, params, run.tokenizer)
    return params


def stage_data(run: Run, index: int, name: str, params) -> dict | None:
    """A world-model or SFT stage's data (None for policy RL, which plays as it goes), and with it the stage's length."""
    args, data = run.args, None
    if name in ("wm-sft", "rwml"):
        scorer = rwml.cosine_scorer(make_embedder(args.embedder), args.filter.tau_d) if name == "rwml" else None
        data = world_model_data(run, index, name, params, scorer)
        run.stage_lengths[index] = epoch_steps(args.wm_epochs, len(data["train"]), args.wm_batch)
    elif name == "spa-sft":
        data = spa_data(run, index, params)
        run.stage_lengths[index] = epoch_steps(args.spa.epochs, len(data["examples"]), args.spa.batch)
    if data is not None:  # a data stage's length is known once its data is
        if run.logger.bar is not None:
            run.logger.bar.total = sum(run.stage_lengths.values())
        run.logger.write(f"{name} data: {data['summary']}")
    return data


def _uses_reference(args: Args, name: str) -> bool:
    return args.loss.beta > 0 and name in ("grpo", "paw", "rwml")


def _fresh_state(run: Run, name: str, params) -> grpo.TrainState:
    """The shape of a stage's training state (what a checkpoint is restored into)."""
    return sharding.place(grpo.init_state(params, _optimizer(run, name)), run.mesh)


def cli() -> None:
    args = settings.parse()
    try:
        main(args)
    except (settings.UsageError, DataError, checkpoints.NotFiniteError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # 130 = 128 + SIGINT, as a shell reports an interrupted command
        print(f"interrupted. To continue from the last checkpoint, run the same command with --resume --out "
              f"{settle(args).out}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
