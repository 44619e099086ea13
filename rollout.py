"""The multi-turn rollout loop that every method learns from, and what it records.

`rollout` plays a batch of environments (`envs.py`), in groups of G copies of one task and seed
(GRPO's groups), turn by turn: build each prompt from the last H turns, sample from the model, parse
the action, step, until done or the turn limit. It records the exact token ids the model saw and
sampled, with their log-probs and entropies: text is never re-tokenized to rebuild what the policy
did. A trajectory's return is `Trajectory.total_reward` (docs/methods.md eq. 1). `transitions` turns the record
into the <s_<=t, a_t, s_{t+1}> triplets (eq. 14) that RWML, PaW and SPA consume. `EnvBatch` holds the
environments, in this process or in worker processes, and steps them a turn at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

import envs
import model as lm
import multihost
import sampler


# --------------------------------------------------------------------------------------------
# What a rollout records
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class Turn:
    """One model turn: what the policy saw, what it sampled (exact ids), and what the environment did.

    prompt_ids          the token ids fed to the model (chat template applied), unpadded
    response_ids        the sampled ids, through the stop token inclusive
    response_logprobs   log pi_old of each response token at the sampling temperature (float32; eq. 5's pi_old)
    response_entropies  the policy's full-distribution entropy at each response token (PaW's eq. 23 averages it)
    response_text       the response decoded (special tokens dropped): what was parsed
    actions             the actions sent to the environment, parsed from response_text ([] if none)
    observation         s_t, the observation this turn acted on
    next_observation    s_{t+1}, and next_observation_ids its tokens (env text, tokenized alone)
    """

    step: int
    observation: str
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    response_logprobs: np.ndarray
    response_entropies: np.ndarray
    response_text: str
    actions: list[str]
    next_observation: str
    next_observation_ids: np.ndarray
    reward: float  # the turn's steps' rewards, summed; methods.md eq. 1 sums these over the turns
    done: bool
    won: bool
    invalid: bool


@dataclasses.dataclass(kw_only=True)
class Trajectory:
    seed: int
    group: int
    task: str
    initial_info: dict
    turns: list[Turn]

    @property
    def total_reward(self) -> float:
        """R_i of methods.md eq. 1: the undiscounted sum of the turns' rewards (each the sum of its steps')."""
        return float(sum(t.reward for t in self.turns))

    @property
    def won(self) -> bool:
        return bool(self.turns and self.turns[-1].won)


class Transition(NamedTuple):
    """<s_<=t, a_t, s_{t+1}> (methods.md eq. 14): what RWML predicts, PaW appends and SPA writes into its reasoning.

    history: the (observation, action) pairs of the H turns before t, oldest first.
    action: the actions sent at t, joined with " || ". (trajectory, turn) index the exact token ids.
    """

    task: str
    history: tuple[tuple[str, str], ...]
    state: str
    action: str
    next_state: str
    reward: float
    invalid: bool
    trajectory: int
    turn: int
    group: int


def history_window(turns: Sequence[Turn], step: int, history: int, no_action: str = "") -> list[tuple[str, str]]:
    """The (observation, actions joined with " || ") pairs of the `history` turns before `step`, oldest first:
    the past a prompt shows and a Transition carries. A turn that sent no action shows `no_action`."""
    return [(turn.observation, " || ".join(turn.actions) or no_action) for turn in turns[max(0, step - history):step]]


# --------------------------------------------------------------------------------------------
# The rollout loop
# --------------------------------------------------------------------------------------------


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a user turn: through the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    return tokenizer.encode(text, add_special_tokens=True)


@contextlib.contextmanager
def _stopwatch(timings: dict[str, float], name: str):
    """Add the wall seconds of the `with` block to timings[name]."""
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def rollout(params: lm.Params, config: lm.Config, tokenizer, environments: EnvBatch, seeds: Sequence[int], group_size: int,
            key: jax.Array, *, prompt: Callable, parse: Callable[[str], list[str]], max_turns: int,
            sampling: sampler.SamplingParams = sampler.SamplingParams(), history: int = 2,
            timings: dict[str, float] | None = None) -> list[Trajectory]:
    """Play len(seeds) groups of group_size copies (`environments` holds len(seeds) * group_size).

    Each turn, only the unfinished environments are sampled for (the batch is padded to a power of
    two so the sampler compiles a handful of programs). prompt(task, history, step, observation,
    info) builds the user text; parse(response_text) gives the turn's actions. If given, `timings`
    accumulates wall seconds under "model" (sampling) and "env" (reset and steps).
    """
    timings = {} if timings is None else timings
    if environments.count != len(seeds) * group_size:
        raise ValueError(f"{environments.count} environments for {len(seeds)} groups of {group_size}")
    stop_ids = sampler.stop_token_ids(tokenizer, config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    env_seeds = [seed for seed in seeds for _ in range(group_size)]
    with _stopwatch(timings, "env"):
        starts = environments.reset(env_seeds)
    trajectories = [Trajectory(seed=seed, group=i // group_size, task=info.get("task", ""), initial_info=info, turns=[])
                    for i, (seed, (_, info)) in enumerate(zip(env_seeds, starts))]
    current = {i: observation_info for i, observation_info in enumerate(starts)}
    for turn in range(max_turns):
        if not current:
            break
        active = sorted(current)
        prompts = []
        for i in active:
            observation, info = current[i]
            past = history_window(trajectories[i].turns, turn, history, no_action="(none)")
            prompts.append(encode_prompt(tokenizer, prompt(trajectories[i].task, past, turn, observation, info)))
        padded = prompts + [prompts[0]] * (lm.bucket_length(len(prompts), 1) - len(prompts))
        with _stopwatch(timings, "model"):
            out = multihost.to_host(sampler.generate(params, config, padded, jax.random.fold_in(key, turn), sampling,
                                                  stop_token_ids=stop_ids, pad_token_id=pad_id))
        responses = {}
        for row, i in enumerate(active):
            length = int(out.mask[row].sum())
            ids = np.asarray(out.tokens[row, :length])
            text = tokenizer.decode(ids, skip_special_tokens=True)
            responses[i] = (ids, out.logprobs[row, :length], out.entropies[row, :length], text, parse(text))
        with _stopwatch(timings, "env"):
            results = environments.play({i: responses[i][4] for i in active})
        for i, prompt_ids in zip(active, prompts):
            ids, logprobs, entropies, text, actions = responses[i]
            next_observation, reward, done, info = results[i]
            next_ids = np.asarray(tokenizer.encode(next_observation, add_special_tokens=False), np.int32)
            trajectories[i].turns.append(Turn(
                step=turn, observation=current[i][0], prompt_ids=np.asarray(prompt_ids, np.int32), response_ids=ids,
                response_logprobs=np.asarray(logprobs), response_entropies=np.asarray(entropies), response_text=text,
                actions=list(actions), next_observation=next_observation, next_observation_ids=next_ids,
                reward=float(reward), done=bool(done), won=bool(info.get("won", False)),
                invalid=bool(info.get("invalid_action", False)),
            ))
            if done:
                del current[i]
            else:
                current[i] = (next_observation, info)
    return trajectories


# --------------------------------------------------------------------------------------------
# What comes out of it
# --------------------------------------------------------------------------------------------


def transitions(trajectories: Sequence[Trajectory], history: int = 2) -> list[Transition]:
    """Every turn of every trajectory as a Transition, the x_t of methods.md eq. 14 with H = history (invalid steps
    included: rwml.triplets_from_rollouts drops them)."""
    out = []
    for index, trajectory in enumerate(trajectories):
        for t, turn in enumerate(trajectory.turns):
            out.append(Transition(
                task=trajectory.task, history=tuple(history_window(trajectory.turns, t, history)),
                state=turn.observation, action=" || ".join(turn.actions), next_state=turn.next_observation,
                reward=turn.reward, invalid=turn.invalid, trajectory=index, turn=t, group=trajectory.group,
            ))
    return out


def episode_stats(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    turns = [t for trajectory in trajectories for t in trajectory.turns]
    return {
        "success": float(np.mean([t.won for t in trajectories])),
        "return": float(np.mean([t.total_reward for t in trajectories])),
        "turns": float(np.mean([len(t.turns) for t in trajectories])),
        "invalid": float(np.mean([t.invalid for t in turns])) if turns else 0.0,
    }


# --------------------------------------------------------------------------------------------
# Batches of environments, in this process or in worker processes
# --------------------------------------------------------------------------------------------


def play_turn(env: envs.Env, actions: Sequence[str]) -> tuple[str, float, bool, dict]:
    """Step a turn's actions in order until done; no action at all is one invalid step.

    The reward is summed over the turn's steps (their r_t, summed again over turns in eq. 1's return), and the turn is
    invalid if any of its steps was.
    """
    total, invalid = 0.0, False
    for action in list(actions) or [""]:
        observation, reward, done, info = env.step(action)
        total += reward
        invalid = invalid or info.get("invalid_action", False)
        if done:
            break
    return observation, total, done, {**info, "invalid_action": invalid}


def _worker(connection, make_env: Callable[[], envs.Env], count: int):
    environments = [make_env() for _ in range(count)]
    while True:
        command, payload = connection.recv()
        if command == "close":
            break
        try:
            if command == "reset":
                connection.send([environments[i].reset(seed) for i, seed in payload])
            else:
                connection.send([play_turn(environments[i], actions) for i, actions in payload])
        except Exception as error:  # hand the error to the parent instead of dying silently
            connection.send(error)
    connection.close()


class EnvBatch:
    """`count` environments from `make_env`, stepped a turn at a time. With workers > 0 they live in
    that many processes (each owning a contiguous slice), so a slow game does not serialise the batch.
    make_env must be picklable for workers (a module-level class or functools.partial of one)."""

    def __init__(self, make_env: Callable[[], envs.Env], count: int, workers: int = 0):
        self.count, self.workers = count, min(workers, count)
        if self.workers == 0:
            self.environments = [make_env() for _ in range(count)]
            return
        context = multiprocessing.get_context("spawn")  # fork is unsafe once JAX has started threads
        self.owner = np.array_split(np.arange(count), self.workers)
        self.connections, self.processes = [], []
        for indices in self.owner:
            parent, child = context.Pipe()
            process = context.Process(target=_worker, args=(child, make_env, len(indices)), daemon=True)
            process.start()
            self.connections.append(parent)
            self.processes.append(process)

    def _scatter(self, command: str, items: dict[int, Any]) -> dict[int, Any]:
        if self.workers == 0:
            call = (lambda e, x: e.reset(x)) if command == "reset" else play_turn
            return {i: call(self.environments[i], x) for i, x in items.items()}
        sent = []
        for connection, indices in zip(self.connections, self.owner):
            mine = [(int(i), items[int(i)]) for i in indices if int(i) in items]
            if mine:
                connection.send((command, [(i - int(indices[0]), x) for i, x in mine]))
                sent.append((connection, [i for i, _ in mine]))
        results = {}
        for connection, indices in sent:
            try:
                answer = connection.recv()
            except (EOFError, ConnectionError) as error:
                codes = [p.exitcode for p in self.processes]
                raise RuntimeError(f"an environment worker process died (exit codes {codes}); see its error above") from error
            if isinstance(answer, Exception):
                raise answer
            results.update(zip(indices, answer))
        return results

    def reset(self, seeds: Sequence[int]) -> list[tuple[str, dict]]:
        results = self._scatter("reset", dict(enumerate(seeds)))
        return [results[i] for i in range(len(seeds))]

    def play(self, actions: dict[int, Sequence[str]]) -> dict[int, tuple[str, float, bool, dict]]:
        """One turn for the environments named in `actions` (index -> that turn's actions)."""
        return self._scatter("turn", actions)

    def close(self):
        for connection in getattr(self, "connections", []):
            try:
                connection.send(("close", None))
            except (BrokenPipeError, ConnectionError):
                pass
        for process in getattr(self, "processes", []):
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()
