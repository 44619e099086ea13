"""train.py: one command for every method, sharded across devices, resumable.

    python train.py --method paw                          # the embedded default: FrozenLake, CPU, minutes
    python train.py --method rwml-grpo --env alfworld --model Qwen/Qwen2.5-7B-Instruct

A method is a sequence of stages (settings.STAGES); each stage is a row of `STAGE_TABLE`: where its data comes from,
its optimizer's learning rate, its objective, and how a step makes its batch. Every stage composes the pure pieces of
the modules at this level under `jit`, with parameters and optimizer state sharded FSDP-style over a (data x fsdp)
device mesh and the batch split over all devices:

    grpo          policy RL: rollouts, group advantages, grpo's objective          (methods.md section 1, eqs. 1-13)
    paw           policy RL with PaW's world-model loss: paw's objective         (methods.md section 3, eq. 22)
    wm-sft        WM SFT on the model's own transitions: rwml.sft_objective       (methods.md section 2.5, eq. 20)
    rwml          RWML: too-easy filter, G predictions a triplet, cosine or judge reward, grpo's objective (section 2)
    spa-sft       SPA's SFT on self-play with the true states in the reasoning     (section 4)

and the methods: grpo, paw, wm-sft, rwml, rwml-grpo and wm-sft-grpo (the world-model stage, then GRPO from its
parameters with a fresh optimizer), spa (spa-sft, then GRPO).

Without --model, the model is the embedded default (engine/pretrain.py): a tiny Qwen2 pretrained on transcripts of
random play in the chosen environment, built once and cached. Every setting is in engine/settings.py (`--help`
prints them): those left unset take the papers' values for a Hugging Face model, and the embedded default's recipe
for the tiny model.

The machinery is the engine's (engine/): the settings and their checks, the run's folder, resume and checkpoints
(run.py, checkpoints.py), evaluation before training, every --eval.every steps and at the end (evaluate.py), metrics
(logs.py: metrics.jsonl, TensorBoard, the progress bar, curves.png), the mesh and the memory-sized updates
(sharding.py, microbatch.py), and Hugging Face I/O (hf.py). The final model is exported in Hugging Face format to
<out>/model, and a two-stage method's first-stage model to <out>/model-stage0-<stage> (e.g. the RWML model that
policy RL starts from). One run over several processes (--distributed; policy RL only) is multihost.py's.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

import jax
import numpy as np

import engine
import envs
import grpo
import model as lm
import multihost
import paw
import rollout
import rwml
import sampler
import spa
from engine import checkpoints, checks, embedders, estimates, logs, run as runs, settings, sharding
from engine.run import DataError, Run

Args, UsageError, settle, override = settings.Args, settings.UsageError, settings.settle, settings.override


# --------------------------------------------------------------------------------------------
# The policy stages: env -> rollout -> advantages -> rows -> update -> log
# --------------------------------------------------------------------------------------------


def policy_steps(run: Run, index: int, name: str, state, reference, update, reference_of, start: int, data):
    """GRPO or PaW: each step plays `groups` tasks x G, scores whole trajectories (their returns, methods.md eq. 1),
    and updates on every turn. PaW's rows carry the next observation, weighed by paw.weigh."""
    args, stage = run.args, STAGE_TABLE[name]
    sampling = stage_sampling(args.temperature, args.max_new_tokens)
    with rollout.EnvBatch(run.game.make_env, args.groups * args.group_size, args.workers) as environments:
        for step in range(start, args.iterations):
            timings = {}
            tasks = [train_task(args, index, step, group) for group in range(args.groups)]
            trajectories = rollout.rollout(state.params, run.config, run.tokenizer, environments, tasks,
                                           args.group_size, run.step_key(index, step), prompt=run.game.prompt,
                                           parse=run.game.parse, max_turns=args.max_turns, sampling=sampling,
                                           history=args.history, timings=timings, user=run.game.user)
            advantages, keep, stats = grpo.trajectory_advantages(trajectories, args.estimator,
                                                                 args.filter_zero_variance)
            rows = rollout.turn_rows(trajectories, with_observation=stage.weigh is not None, pad_id=run.pad_id,
                                     min_rows=run.mesh.size)
            batch = grpo.batch(rows, advantages, keep)
            if stage.weigh is not None:
                batch = stage.weigh(args, batch, rows, stats)
            if reference_of is not None:
                batch = batch._replace(ref_logprobs=reference_of(batch.tokens, batch.token_mask, batch.action_mask))
            with rollout.stopwatch(timings, "update"):
                state, metrics = update(state, batch)
                metrics = {name: float(value) for name, value in metrics.items()}  # float() waits for the update
            metrics.update({f"seconds_{part}": seconds for part, seconds in timings.items()},
                           **rollout.episode_stats(trajectories), rows=float(batch.tokens.shape[0]),
                           zero_variance_groups=float(np.mean(stats.zero_variance)),
                           groups_without_success=groups_without_success(trajectories))
            finish_step(run, index, name, step, state, reference, metrics)
    return state


def paw_weigh(args: Args, batch: grpo.Batch, rows: rollout.Rows, stats: grpo.GroupStats) -> grpo.Batch:
    """PaW's world-model part of a policy batch: the entropy selection and each group's lambda (eq. 28)."""
    return paw.weigh(batch, rows, paw.world_model_weights(stats.mean, args.paw), args.paw)[0]


def groups_without_success(trajectories) -> float:
    """The share of groups in which no rollout won: with sparse rewards their advantages carry no success to learn
    from (invalid-action penalties may still vary, so such a group need not have zero variance)."""
    won = {}
    for trajectory in trajectories:
        won[trajectory.group] = won.get(trajectory.group, False) or trajectory.won
    return float(np.mean([not any_won for any_won in won.values()]))


def train_task(args: Args, stage: int, step: int, group: int) -> int:
    """The task (reset seed) of a group: a function of the position, so a resumed run replays the same data."""
    return 1_000_000 * (args.seed + 1) + 100_000 * stage + step * args.groups + group


# --------------------------------------------------------------------------------------------
# The world-model and SFT stages: their data, then epochs over it
# --------------------------------------------------------------------------------------------


def rwml_steps(run: Run, index: int, name: str, state, reference, update, reference_of, start: int, data):
    """RWML (methods.md section 2.4): G predictions of each triplet of a batch, the binary cosine reward (eq. 18, less
    the authors' tau2-bench penalties where set), group advantages and the GRPO update (rwml.rwml_update), over
    wm_epochs seeded shuffles of the triplets."""
    args, train = run.args, data["train"]
    scorer = world_model_scorer(args, args.tau_d, run.setup.judge)
    count_tokens = lambda text: len(run.tokenizer(text, add_special_tokens=False)["input_ids"])
    penalise = lambda scorer: rwml.penalised_scorer(scorer, count_tokens, args.wm_thinking_penalty,
                                                    args.wm_status_penalty, args.wm_prediction)
    scorer = {kind: penalise(s) for kind, s in scorer.items()} if isinstance(scorer, dict) else penalise(scorer)
    sampling = stage_sampling(1.0, args.wm_max_new_tokens)
    cfg = rwml.RWMLConfig(args.wm_group_size, sampling, args.filter_zero_variance)
    for step in range(start, run.stage_lengths[index]):
        rows = epoch_rows(args.seed, index, step, len(train), args.wm_batch)
        state, metrics = rwml.rwml_update(state, update, run.tokenizer, run.config, [train[i] for i in rows], scorer,
                                          run.step_key(index, step), cfg, reference_of)
        finish_step(run, index, name, step, state, reference, metrics)
    return state


def world_model_scorer(args: Args, tau_d: float, judge: rwml.Judge | None = None):
    """RWML's reward (methods.md eqs. 18-19): the binary cosine reward at tau_d; on tau2-bench, a scorer per kind of
    next state: ROUGE-L rounded to 0.2 for tool responses (eq. 19), the cosine reward for the customer's replies.
    --wm-reward judge: the LLM judge's score for every kind (section 2.8), that reward computed beside it for the logs."""
    cosine = rwml.cosine_scorer(embedders.make_embedder(args.embedder), tau_d, args.wm_prediction,
                                args.wm_prediction_tokens)
    if args.env in envs.TAU2_ENVS:
        cosine = {"tool": rwml.rouge_scorer(0.2, args.wm_prediction), "user": cosine}
    if args.wm_reward == "judge":
        return rwml.judge_scorer(judge, baseline=cosine, block=args.wm_prediction)
    return cosine


def sft_steps(run: Run, index: int, name: str, state, reference, update, reference_of, start: int, data):
    """WM SFT or SPA's SFT: cross-entropy (methods.md eq. 20) over epochs of seeded shuffles of the stage's examples
    (rwml.train_sft, the loop of every SFT)."""
    batch_size = settings.get(run.args, STAGE_TABLE[name].batch)
    batches = (data["batch"](epoch_rows(run.args.seed, index, step, data["count"], batch_size))
               for step in range(start, run.stage_lengths[index]))
    return rwml.train_sft(state, update, batches, lambda i, state, metrics: finish_step(
        run, index, name, start + i, state, reference, metrics))


def world_model_data(run: Run, index: int, name: str, params, too_easy: bool) -> dict:
    """The stage's triplets from the current model's own play (90/10 split; with too_easy, RWML's too-easy
    subsampling), saved to the run folder so a resumed stage trains on exactly the same data."""
    args = run.args
    path = run.out / f"stage{index}-{name}-triplets.json"
    if path.exists():
        data = json.loads(path.read_text())
        train, validation = triplets_from_json(data["train"]), triplets_from_json(data["validation"])
    else:
        trajectories = self_play(run, index, params, args.wm_tasks, args.wm_rollouts, args.wm_max_turns)
        view = run.game.world_model_view or (lambda t: t)  # as the world-model prompt shows a transition
        if args.wm_invalid_steps == "drop":
            triplets = rwml.triplets_from_rollouts(trajectories, args.history, view)
        else:
            triplets = [view(t) for t in rollout.transitions(trajectories, args.history)]
        if len(triplets) < 2:
            raise DataError(f"only {len(triplets)} valid transitions from {len(trajectories)} rollouts: too few to "
                            "train a world model on. Fix: raise --wm-tasks, or --wm-invalid-steps keep.")
        train, validation = rwml.split_triplets(triplets, 0.1, args.seed)
        summary = {"triplets": len(triplets), "train": len(train), "validation": len(validation)}
        if too_easy and args.too_easy_filter:
            scorer = world_model_scorer(args, args.filter.tau_d, run.setup.judge)
            optimizer = grpo.make_optimizer(args.sft_learning_rate, args.weight_decay, args.max_grad_norm)
            train, filtered = rwml.too_easy_subsample(params, run.config, run.tokenizer, train, validation, scorer,
                                                      optimizer, jax.random.fold_in(run.data_key(index), 1),
                                                      args.filter, args.seed)
            summary.update(filtered)
        data = {"train": [t._asdict() for t in train], "validation": [t._asdict() for t in validation],
                "summary": summary}
        path.write_text(json.dumps(data))
    prompts, labels = rwml.wm_sft_examples(run.tokenizer, train, direct=True)
    batch = lambda indices: rwml.sft_batch(rollout.rows([prompts[i] for i in indices], [labels[i] for i in indices],
                                                        pad_id=run.pad_id))
    return {"summary": data["summary"], "train": train, "count": len(train), "batch": batch}


def triplets_from_json(rows) -> list[rollout.Transition]:
    return [rollout.Transition(**{**row, "history": tuple(tuple(pair) for pair in row["history"])}) for row in rows]


def spa_data(run: Run, index: int, name: str, params) -> dict:
    """SFT examples from the current model's self-play (spa.py), saved so a resumed stage reuses them."""
    args = run.args
    path = run.out / f"stage{index}-spa-examples.json"
    if path.exists():
        data = json.loads(path.read_text())
        examples, summary = [spa.Example(**e) for e in data["examples"]], data["summary"]
    else:
        trajectories = self_play(run, index, params, args.spa.tasks, args.spa.rollouts, args.spa.max_turns)
        examples, summary = spa.self_play_examples(trajectories, run.game.make_env, run.tokenizer, args.spa)
        if not examples:
            raise DataError(f"self-play left no SFT examples ({summary}). Fix: raise --spa.tasks, or "
                            "--spa.no-format-filter.")
        path.write_text(json.dumps({"examples": [e._asdict() for e in examples], "summary": summary}))
    batch = lambda indices: spa.sft_batch([examples[i] for i in indices], run.pad_id, args.spa.mask_world_model)
    return {"summary": summary, "count": len(examples), "batch": batch}


def self_play(run: Run, index: int, params, tasks: int, rollouts: int, max_turns: int) -> list[rollout.Trajectory]:
    """A stage's data rollouts: `tasks` training tasks x `rollouts` at temperature 1, with the stage's data key."""
    args = run.args
    seeds = [train_task(args, index, 0, task) for task in range(tasks)]
    sampling = stage_sampling(1.0, args.max_new_tokens)
    with rollout.EnvBatch(run.game.make_env, tasks * rollouts, args.workers) as environments:
        return rollout.rollout(params, run.config, run.tokenizer, environments, seeds, rollouts, run.data_key(index),
                               prompt=run.game.prompt, parse=run.game.parse, max_turns=max_turns, sampling=sampling,
                               history=args.history, user=run.game.user)


def stage_sampling(temperature: float, max_new_tokens: int) -> sampler.SamplingParams:
    """A stage's sampling, its batches of rows sized to half the memory free when the stage starts
    (estimates.sampling_bytes): a large model's KV cache for every episode at once need not fit."""
    return sampler.SamplingParams(temperature, max_new_tokens=max_new_tokens, batch_bytes=estimates.sampling_bytes())


def epoch_rows(seed: int, stage: int, step: int, count: int, batch_size: int) -> np.ndarray:
    """The example indices of an epoch-based stage's step: a seeded shuffle per epoch, in batches of batch_size
    (the last filled cyclically, so every batch has one shape). A function of the step, so resuming replays it."""
    epoch, position = divmod(step, math.ceil(count / batch_size))
    order = np.random.default_rng([seed, stage, epoch]).permutation(count)
    return np.resize(np.roll(order, -position * batch_size), batch_size)


# --------------------------------------------------------------------------------------------
# The table of stages
# --------------------------------------------------------------------------------------------


def step_config(args: Args, budget: int | None = None, temperature: float | None = None,
                beta: str = "loss.beta") -> grpo.StepConfig:
    """How an update's loss is computed (its micro-batches are engine/microbatch.py's). budget: the stage's most new
    tokens per response (default --max-new-tokens), Dr.GRPO's constant unless --max-length is set; temperature: the
    log-probs' (default --temperature, the rollouts'); beta: the setting that holds the KL coefficient."""
    loss = dataclasses.replace(args.loss, max_length=args.loss.max_length or budget or args.max_new_tokens,
                               beta=settings.get(args, beta))
    dtype = None if args.compute_dtype == "float32" else args.compute_dtype
    return grpo.StepConfig(loss, args.temperature if temperature is None else temperature, remat=args.remat,
                           compute_dtype=dtype)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: its data (None: policy RL, which plays as it goes), its learning rate and schedule, how its update
    computes log-probs (step_config) and its loss (objective), and its steps. rate, epochs and batch name settings
    (settings.get)."""

    step_config: Callable  # (args) -> grpo.StepConfig
    objective: Callable  # (model config, step config, args) -> grpo.Objective
    steps: Callable  # (run, index, name, state, reference, update, reference_of, start, data) -> final state
    rate: str
    data: Callable | None = None  # (run, index, name, params) -> {"summary", "count", ...}
    epochs: str | None = None
    batch: str | None = None
    schedule: str = "constant"
    reference: bool = False  # its loss has the KL term to the reference (when the setting `beta` names is > 0)
    beta: str = "loss.beta"
    weigh: Callable | None = None  # policy RL: PaW's world-model part of the batch


STAGE_TABLE = {
    "grpo": Stage(step_config, lambda config, step, args: grpo.grpo_objective(config, step), policy_steps,
                  rate="learning_rate", reference=True),
    "paw": Stage(step_config, lambda config, step, args: paw.paw_objective(config, step, args.paw), policy_steps,
                 rate="learning_rate", reference=True, weigh=paw_weigh),
    # the world model's predictions are sampled at temperature 1, so the ratio's log-probs (and the reference's) are too
    "rwml": Stage(lambda args: step_config(args, args.wm_max_new_tokens, temperature=1.0, beta="wm_beta"),
                  lambda config, step, args: grpo.grpo_objective(config, step), rwml_steps, rate="wm_learning_rate",
                  reference=True, data=functools.partial(world_model_data, too_easy=True), epochs="wm_epochs",
                  batch="wm_batch", beta="wm_beta"),
    "wm-sft": Stage(lambda args: step_config(args, temperature=1.0),
                    lambda config, step, args: rwml.sft_objective(config, step), sft_steps, rate="sft_learning_rate",
                    data=functools.partial(world_model_data, too_easy=False), epochs="wm_epochs", batch="wm_batch"),
    "spa-sft": Stage(lambda args: step_config(args, temperature=1.0),
                     lambda config, step, args: rwml.sft_objective(config, step), sft_steps, rate="spa.learning_rate",
                     data=spa_data, epochs="spa.epochs", batch="spa.batch", schedule="cosine"),
}


def finish_step(run: Run, index: int, name: str, step: int, state, reference, metrics: dict):
    """run.finish_step with the stage's evaluation schedule (policy RL every --eval.every steps, the other stages
    every --eval.wm-every) and its learning-rate flag, the fix when its updates keep failing."""
    stage = STAGE_TABLE[name]
    every = run.args.eval.every if stage.data is None else run.args.eval.wm_every
    run.finish_step(index, name, step, state, reference, metrics, every=every, rate_flag=settings.flag_name(stage.rate))


def run_stage(run: Run, index: int, name: str, params, start: int, latest: int | None, data):
    """One stage from step `start`: its optimizer (AdamW), state and reference placed on the mesh (restored from
    checkpoint `latest` when resuming inside it), its memory-sized update, then its steps. Returns the parameters."""
    args, stage = run.args, STAGE_TABLE[name]
    optimizer = grpo.make_optimizer(settings.get(args, stage.rate), args.weight_decay, args.max_grad_norm,
                                    schedule=stage.schedule, total_steps=run.stage_lengths[index])
    state = sharding.place(grpo.init_state(params, optimizer), run.mesh)
    uses_reference = stage.reference and settings.get(args, stage.beta) > 0
    reference = sharding.place(params, run.mesh) if uses_reference else None
    if latest is not None:
        state, reference = run.restore(latest, state, reference)
    if start >= run.stage_lengths[index]:  # resumed at the stage's end: nothing left to train
        return state.params
    step = stage.step_config(args)
    update = sharding.sized_update(stage.objective(run.config, step, args), optimizer, state, run.mesh,
                                   args.update_tokens, run.config)
    reference_of = None
    if uses_reference:  # log pi_ref at the update's temperature, in its micro-batches: it fits where the update does
        logprobs = jax.jit(lambda params, tokens, mask, positions: lm.token_logprobs(
            params, run.config, tokens, mask, step.temperature, positions=positions)[0])
        reference_of = functools.partial(update.map_rows, functools.partial(logprobs, reference))
    return stage.steps(run, index, name, state, reference, update, reference_of, start, data).params


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(args: Args) -> dict:
    """Run the method; returns the first and last evaluation. With --distributed every process of the run calls it
    with the same settings (multihost.py): the same program, one set of files."""
    if args.distributed:  # before any other JAX call
        multihost.initialize(args.coordinator, args.num_processes, args.process_id)
    args = settle(args)
    checks.check(args)
    multihost.barrier("settings checked")  # every process has read a resumed run's args.json before it is rewritten
    print(f"settings (those not at their defaults; all in {Path(args.out) / 'args.json'}):\n{settings.settings_block(args)}")
    setup = engine.prepare(args, chunk_size=step_config(args).chunk_size)
    print(f"{args.method} on {args.env}: {setup.config.model_type} from {setup.folder} "
          f"({lm.count_params(setup.params):,} parameters), mesh {dict(setup.mesh.shape)} over "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s) in {jax.process_count()} process(es), out "
          f"{args.out}")
    if args.update_tokens is None:
        print(f"updates in micro-batches of at most {setup.update_tokens_why}; --update-tokens to change")
    stages = settings.STAGES[args.method]
    policy = {index: setup.args.iterations for index, name in enumerate(stages) if STAGE_TABLE[name].data is None}
    while True:
        run, latest, position = runs.open_run(setup, policy)
        try:
            params = run_stages(run, setup.params, latest, position)
            run.checkpoints.close()
            checkpoints.export_model(run.out / "model", run.config, params, run.tokenizer)
            break
        except checkpoints.UnreadableCheckpoint as error:  # raised by a restore, before any update: open it again
            runs.set_aside(run.checkpoints, error)
            run.checkpoints.close()
        finally:
            run.close()
    before, after = run.logger.evaluations[0], run.logger.evaluations[-1]
    if multihost.is_primary():
        logs.plot_curves(run.out / "metrics.jsonl", run.out / "curves.png")
    print(f"task success before {before['eval/success']:.3f} -> after {after['eval/success']:.3f}; world-model "
          f"accuracy (inline) {before['eval/wm_accuracy_inline']:.3f} -> {after['eval/wm_accuracy_inline']:.3f}, "
          f"(RWML prompt) {before['eval/wm_accuracy']:.3f} -> {after['eval/wm_accuracy']:.3f}")
    print(f"metrics {run.out / 'metrics.jsonl'}, plot {run.out / 'curves.png'}, model {run.out / 'model'}")
    return {"before": before, "after": after}


def run_stages(run: Run, params, latest: int | None, position: dict):
    """Evaluate the base model (a fresh run), then run each stage from `position` on; returns the final parameters."""
    stages = settings.STAGES[run.args.method]
    if run.global_step == 0:
        run.evaluate(jax.device_put(params), "base")
    params = sharding.place(params, run.mesh)
    for index, name in enumerate(stages):
        if index < position["stage"]:
            continue
        stage, data = STAGE_TABLE[name], None
        if stage.data is not None:  # a data stage's length is known once its data is
            data = stage.data(run, index, name, params)
            run.set_length(index, epoch_steps(settings.get(run.args, stage.epochs), data["count"],
                                              settings.get(run.args, stage.batch)))
            run.logger.write(f"{name} data: {data['summary']}")
        resumed_here = index == position["stage"] and latest is not None
        start = position["step"] if index == position["stage"] else 0
        params = run_stage(run, index, name, params, start, latest if resumed_here else None, data)
        if index < len(stages) - 1:  # what the next stage starts from (e.g. the RWML model before policy RL)
            checkpoints.export_model(run.out / f"model-stage{index}-{name}", run.config, params, run.tokenizer)
    return params


def epoch_steps(epochs: int, count: int, batch_size: int) -> int:
    return epochs * math.ceil(count / batch_size)


FILESYSTEM_FAULTS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG)


def write_fault(message: str) -> None:
    """One line and exit status 2 after a write failed, without the orderly exit: it would wait on the writers still
    running in the background (Orbax's, TensorBoard's), which report the same fault again, each with a traceback."""
    print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)


def cli() -> None:
    args = settings.parse()
    try:
        main(args)
    except (settings.UsageError, DataError, checkpoints.NotFiniteError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except checkpoints.WriteError as error:
        write_fault(f"error: {error}")
    except OSError as error:  # one of the run's own files (metrics, TensorBoard, the model) on a disk that filled
        if error.errno not in FILESYSTEM_FAULTS:
            raise
        out = Path(settle(args).out)
        write_fault(f"error: could not write {error.filename or f'in {out}'}: {error.strerror}; "
                    f"{checkpoints.complete(out / 'checkpoints')}. {checkpoints.WRITE_FIX}")
    except KeyboardInterrupt:  # 130 = 128 + SIGINT, as a shell reports an interrupted command
        print(f"interrupted. To continue from the last checkpoint, run the same command with --resume --out "
              f"{settle(args).out}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
