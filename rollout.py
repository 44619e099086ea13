"""The multi-turn rollout loop that every method learns from, what it records, and the rows every update trains on.

`rollout` plays a batch of environments (`envs`), in groups of G copies of one task and seed
(GRPO's groups), turn by turn: build each prompt from the last H turns, sample from the model, parse
the action, step, until done or the turn limit. It records the exact token ids the model saw and
sampled, with their log-probs and entropies: text is never re-tokenized to rebuild what the policy
did. A trajectory's return is `Trajectory.total_reward` (docs/methods.md eq. 1). `transitions` turns the record
into the <s_<=t, a_t, s_{t+1}> triplets (eq. 14) that RWML, PaW and SPA consume; `random_play` records the same
without a model (uniform over the admissible actions). `EnvBatch` holds the environments, in this process or in
worker processes, and steps them a turn at a time.

`Rows` is the one layout every update reads: each row [prompt ; action ; next observation], right padded, with a
mask per role. GRPO's and PaW's batches (`grpo.batch`) and the SFT stages' (`rwml.sft_batch`) are built from it:
`turn_rows` lays out every turn of a rollout, `completion_rows` the sampler's completions (RWML's predictions),
`rows` any prompts and targets (SFT examples).
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
    next_observation    s_{t+1}: the environment's text, what the next prompt shows
    target              s_{t+1} as a world model is taught it (RWML's target, PaW's inline observation), and
                        next_observation_ids its tokens (tokenized alone): the observation itself unless the environment
                        says otherwise (tau2: a tool response masked to its schema)
    kind                what answered the action, where an environment has several sources (tau2: "tool" or "user")
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
    kind: str = ""
    target: str | None = None

    def __post_init__(self):
        if self.target is None:
            self.target = self.next_observation


@dataclasses.dataclass(kw_only=True)
class Trajectory:
    seed: int
    group: int
    task: str
    initial_info: dict
    turns: list[Turn]
    context_full: bool = False  # ended before a turn whose prompt and max_new_tokens would pass the model's context

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
    kind: str = ""  # what answered the action (tau2: "tool" or "user"); next_state is the turn's target


def history_window(turns: Sequence[Turn], step: int, history: int, no_action: str = "") -> list[tuple[str, str]]:
    """The (observation, actions joined with " || ") pairs of the `history` turns before `step`, oldest first:
    the past a prompt shows and a Transition carries. A turn that sent no action shows `no_action`."""
    return [(turn.observation, " || ".join(turn.actions) or no_action) for turn in turns[max(0, step - history):step]]


# --------------------------------------------------------------------------------------------
# The rollout loop
# --------------------------------------------------------------------------------------------


def encode_prompt(tokenizer, text: str | envs.Chat) -> list[int]:
    """Token ids of a user turn: through the tokenizer's chat template when it has one. A Chat (messages and tools,
    envs.tau2_chat_prompt's) goes to the template whole."""
    if isinstance(text, envs.Chat):
        return list(tokenizer.apply_chat_template(text.messages, tools=text.tools, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    return tokenizer.encode(text, add_special_tokens=True)


@contextlib.contextmanager
def stopwatch(timings: dict[str, float], name: str):
    """Add the wall seconds of the `with` block to timings[name]: how every stage times its parts."""
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


class UserModel(NamedTuple):
    """A model that plays the other side of a conversation (tau2-bench's customer, --user-model), sampled by the
    project's sampler wherever an environment waits for it (its info["awaiting_user"] holds the customer's prompt)."""

    params: lm.Params
    config: lm.Config
    tokenizer: Any
    sampling: sampler.SamplingParams = sampler.SamplingParams(temperature=0.0, max_new_tokens=128)


def sample(params: lm.Params, config: lm.Config, tokenizer, prompts: Sequence[Sequence[int]], key: jax.Array,
           sampling: sampler.SamplingParams) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
    """One response per prompt: (ids through the stop token, log-probs, entropies, text without special tokens). The
    batch is padded to a power of two so the sampler compiles a handful of programs."""
    stop_ids = sampler.stop_token_ids(tokenizer, config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    padded = list(prompts) + [prompts[0]] * (lm.bucket_length(len(prompts), 1) - len(prompts))
    out = multihost.to_host(sampler.generate(params, config, padded, key, sampling, stop_token_ids=stop_ids,
                                             pad_token_id=pad_id))
    responses = []
    for row in range(len(prompts)):
        length = int(out.mask[row].sum())
        ids = np.asarray(out.tokens[row, :length])
        responses.append((ids, out.logprobs[row, :length], out.entropies[row, :length],
                          tokenizer.decode(ids, skip_special_tokens=True)))
    return responses


def answer_as_user(environments: EnvBatch, results: dict[int, tuple], user: UserModel | None, key: jax.Array) -> dict:
    """results (index -> an environment's (observation, ..., info)) with those that wait for their customer
    (info["awaiting_user"]) replaced by the environment's result after the user model's reply, sampled in one batch."""
    waiting = sorted(i for i, result in results.items() if result[-1].get("awaiting_user") is not None)
    if not waiting:
        return results
    if user is None:
        raise ValueError("an environment waits for its customer and no user model was given (--user-model)")
    prompts = [encode_prompt(user.tokenizer, results[i][-1]["awaiting_user"]) for i in waiting]
    texts = [text for *_, text in sample(user.params, user.config, user.tokenizer, prompts, key, user.sampling)]
    return {**results, **environments.answer(dict(zip(waiting, texts)))}


def rollout(params: lm.Params, config: lm.Config, tokenizer, environments: EnvBatch, seeds: Sequence[int], group_size: int,
            key: jax.Array, *, prompt: Callable, parse: Callable[[str], list[str]], max_turns: int,
            sampling: sampler.SamplingParams = sampler.SamplingParams(), history: int = 2,
            timings: dict[str, float] | None = None, user: UserModel | None = None) -> list[Trajectory]:
    """Play len(seeds) groups of group_size copies (`environments` holds len(seeds) * group_size).

    Each turn, only the unfinished environments are sampled for. prompt(task, history, step, observation,
    info) builds the user text; parse(response_text) gives the turn's actions. `user` answers for environments that
    wait for a customer model (tau2-bench with --user-model), in batches between the policy's turns. If given,
    `timings` accumulates wall seconds under "sampling" and "env" (reset and steps; the user model's turns count
    as "env"). An episode whose next prompt and sampling.max_new_tokens would pass the model's context
    (config.max_position_embeddings: positions it never saw) ends before that turn, as at the turn cap, and says so
    (Trajectory.context_full; episode_stats' "context_full" is their share).
    """
    timings = {} if timings is None else timings
    if environments.count != len(seeds) * group_size:
        raise ValueError(f"{environments.count} environments for {len(seeds)} groups of {group_size}")
    env_seeds = [seed for seed in seeds for _ in range(group_size)]
    user_key = jax.random.fold_in(key, 1 << 20)
    with stopwatch(timings, "env"):
        starts = dict(enumerate(environments.reset(env_seeds)))
        starts = answer_as_user(environments, starts, user, user_key)
        starts = [(result[0], result[-1]) for _, result in sorted(starts.items())]
    trajectories = [Trajectory(seed=seed, group=i // group_size, task=info.get("task", ""), initial_info=info, turns=[])
                    for i, (seed, (_, info)) in enumerate(zip(env_seeds, starts))]
    current = {i: observation_info for i, observation_info in enumerate(starts)}
    for turn in range(max_turns):
        if not current:
            break
        active, prompts = [], []
        for i in sorted(current):
            observation, info = current[i]
            past = history_window(trajectories[i].turns, turn, history, no_action="(none)")
            ids = encode_prompt(tokenizer, prompt(trajectories[i].task, past, turn, observation, info))
            if len(ids) + sampling.max_new_tokens > config.max_position_embeddings:  # positions it never saw
                trajectories[i].context_full = True
                del current[i]
                continue
            active.append(i)
            prompts.append(ids)
        if not active:
            break
        with stopwatch(timings, "sampling"):
            sampled = sample(params, config, tokenizer, prompts, jax.random.fold_in(key, turn), sampling)
        responses = {i: (*response, parse(response[3])) for i, response in zip(active, sampled)}
        with stopwatch(timings, "env"):
            results = environments.play({i: responses[i][4] for i in active})
            results = answer_as_user(environments, results, user, jax.random.fold_in(user_key, turn + 1))
        for i, prompt_ids in zip(active, prompts):
            ids, logprobs, entropies, text, actions = responses[i]
            next_observation, reward, done, info = results[i]
            target = info.get("target", next_observation)
            next_ids = np.asarray(tokenizer.encode(target, add_special_tokens=False), np.int32)
            trajectories[i].turns.append(Turn(
                step=turn, observation=current[i][0], prompt_ids=np.asarray(prompt_ids, np.int32), response_ids=ids,
                response_logprobs=np.asarray(logprobs), response_entropies=np.asarray(entropies), response_text=text,
                actions=list(actions), next_observation=next_observation, next_observation_ids=next_ids,
                reward=float(reward), done=bool(done), won=bool(info.get("won", False)),
                invalid=bool(info.get("invalid_action", False)), kind=info.get("kind", ""), target=target,
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
                state=turn.observation, action=" || ".join(turn.actions), next_state=turn.target,
                reward=turn.reward, invalid=turn.invalid, trajectory=index, turn=t, group=trajectory.group, kind=turn.kind,
            ))
    return out


def episode_stats(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    turns = [t for trajectory in trajectories for t in trajectory.turns]
    return {
        "success": float(np.mean([t.won for t in trajectories])),
        "return": float(np.mean([t.total_reward for t in trajectories])),
        "turns": float(np.mean([len(t.turns) for t in trajectories])),
        "invalid": float(np.mean([t.invalid for t in turns])) if turns else 0.0,
        "context_full": float(np.mean([t.context_full for t in trajectories])),
    }


def text_turn(game: envs.Game, step: int, observation: str, action: str, following: str, reward: float, done: bool,
              info: dict) -> Turn:
    """A turn played without a model (random play, demonstrations): its text as the game writes it, no token ids."""
    empty = np.zeros(0, np.int32)
    return Turn(step=step, observation=observation, prompt_ids=empty, response_ids=empty, response_logprobs=empty,
                response_entropies=empty, response_text=game.respond(action), actions=[action],
                next_observation=following, next_observation_ids=empty, reward=reward, done=done,
                won=bool(info.get("won")), invalid=bool(info.get("invalid_action")), kind=info.get("kind", ""),
                target=info.get("target", following))


def random_play(game: envs.Game, episodes: int, seed: int) -> tuple[list[Trajectory], list[list[str]]]:
    """Uniformly random admissible actions, recorded as Trajectories (text only: no token ids), and the
    policy prompt of every turn (prompts[episode][turn])."""
    rng = np.random.default_rng(seed)
    env = game.make_env()
    trajectories, prompts = [], []
    for episode in range(episodes):
        reset_seed = seed * 1_000_003 + episode
        observation, info = env.reset(reset_seed)
        trajectory = Trajectory(seed=reset_seed, group=episode, task=info.get("task", ""), initial_info=info, turns=[])
        prompts.append([])
        for step in range(game.max_turns):
            choices = info.get("admissible_actions") or ["(none)"]
            action = str(choices[rng.integers(len(choices))])
            past = history_window(trajectory.turns, step, game.history)
            prompts[-1].append(game.prompt(trajectory.task, past, step, observation, info))
            following, reward, done, info = play_turn(env, [action])
            trajectory.turns.append(text_turn(game, step, observation, action, following, reward, done, info))
            observation = following
            if done:
                break
        trajectories.append(trajectory)
    return trajectories, prompts


# --------------------------------------------------------------------------------------------
# Rows: [prompt ; action ; next observation], the layout every update trains on
# --------------------------------------------------------------------------------------------


class Rows(NamedTuple):
    """Token rows [prompt ; action ; next observation], right padded, numpy arrays [rows, time] unless said.

    tokens            int32 ids exactly as the model saw and sampled them (never re-tokenized)
    token_mask        bool, the real tokens (the model attends to them)
    action_mask       float32, 1 on the action: what the model sampled (a policy's response, RWML's prediction)
                      or what SFT teaches it (a label), EOS included
    observation_mask  float32, 1 on o_{t+1}, the environment's text after the action (PaW's world-model target)
    logprobs          float32, log pi_old of each sampled action token, as the sampler returned it (0 elsewhere)
    entropies         float32, the sampling distribution's entropy at each sampled action token (0 elsewhere)
    source            [rows] int: the trajectory (or completion, or example) each row comes from; -1 for padding
    """

    tokens: np.ndarray
    token_mask: np.ndarray
    action_mask: np.ndarray
    observation_mask: np.ndarray
    logprobs: np.ndarray
    entropies: np.ndarray
    source: np.ndarray

    def per_row(self, values) -> np.ndarray:
        """[rows] values[source] of each row (one value per trajectory, completion or example), 0 for padding."""
        values = np.asarray(values)
        return np.where(self.source >= 0, values[np.maximum(self.source, 0)], np.zeros((), values.dtype))


def rows(prompts: Sequence[Sequence[int]], actions: Sequence[Sequence[int]],
         observations: Sequence[Sequence[int]] | None = None, *, action_keep: Sequence[Sequence[bool]] | None = None,
         logprobs: Sequence[np.ndarray] | None = None, entropies: Sequence[np.ndarray] | None = None,
         source: Sequence[int] | None = None, pad_id: int = 0, min_bucket: int = 16,
         min_rows: int | None = None) -> Rows:
    """Rows [prompt ; action ; observation] of token id lists, right padded to a power-of-two length (at least
    min_bucket) so jit sees a handful of shapes; with min_rows, padded with empty rows to a power of two of rows (at
    least min_rows: one a device), else exactly one row a prompt.

    action_keep[i]: per action token, whether it is in the action mask (SPA's response less its world-model
    contents); logprobs[i], entropies[i]: the sampler's, one per action token; source[i]: where row i comes from
    (default i).
    """
    count = len(prompts)
    observations = [()] * count if observations is None else observations
    longest = max(len(p) + len(a) + len(o) for p, a, o in zip(prompts, actions, observations))
    shape = (count if min_rows is None else lm.bucket_length(count, min_rows), lm.bucket_length(longest, min_bucket))
    tokens, token_mask = np.full(shape, pad_id, np.int32), np.zeros(shape, bool)
    action_mask, observation_mask = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    sampled_logprobs, sampled_entropies = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for row, (prompt, action, observation) in enumerate(zip(prompts, actions, observations)):
        start, end = len(prompt), len(prompt) + len(action)
        tokens[row, :end + len(observation)] = [*prompt, *action, *observation]
        token_mask[row, :end + len(observation)] = True
        action_mask[row, start:end] = 1.0 if action_keep is None else action_keep[row]
        observation_mask[row, end:end + len(observation)] = 1.0
        if logprobs is not None:
            sampled_logprobs[row, start:end] = logprobs[row]
        if entropies is not None:
            sampled_entropies[row, start:end] = entropies[row]
    sources = np.full(shape[0], -1, np.int64)
    sources[:count] = np.arange(count) if source is None else source
    return Rows(tokens, token_mask, action_mask, observation_mask, sampled_logprobs, sampled_entropies, sources)


def turn_rows(trajectories: Sequence[Trajectory], *, with_observation: bool = False, pad_id: int = 0,
              min_bucket: int = 16, min_rows: int = 1) -> Rows:
    """Every turn of every trajectory as a row [prompt ; response], from the exact rollout ids, with the sampler's
    log-probs and entropies on the response; with_observation appends each turn's next observation (PaW's rows
    [h_t ; a_t ; o_{t+1}]). source: the trajectory of each row. Rows padded to a power of two (at least min_rows)."""
    turns = [(index, turn) for index, trajectory in enumerate(trajectories) for turn in trajectory.turns]
    return rows([t.prompt_ids for _, t in turns], [t.response_ids for _, t in turns],
                [t.next_observation_ids for _, t in turns] if with_observation else None,
                logprobs=[t.response_logprobs for _, t in turns], entropies=[t.response_entropies for _, t in turns],
                source=[index for index, _ in turns], pad_id=pad_id, min_bucket=min_bucket, min_rows=min_rows)


def completion_rows(completion: sampler.Completion) -> Rows:
    """The sampler's completions as rows [prompt ; completion]: the prompt left padded as it was fed, the completion
    right padded as it was sampled (their real tokens meet in the middle), its log-probs and entropies kept."""
    prompt_mask = np.asarray(completion.prompt_mask)
    zeros = np.zeros(prompt_mask.shape, np.float32)
    mask = np.asarray(completion.mask)
    return Rows(tokens=np.concatenate([np.asarray(completion.prompt_tokens), np.asarray(completion.tokens)], 1),
                token_mask=np.concatenate([prompt_mask, mask], 1),
                action_mask=np.concatenate([zeros, mask.astype(np.float32)], 1),
                observation_mask=np.zeros((len(mask), prompt_mask.shape[1] + mask.shape[1]), np.float32),
                logprobs=np.concatenate([zeros, np.asarray(completion.logprobs)], 1),
                entropies=np.concatenate([zeros, np.asarray(completion.entropies)], 1), source=np.arange(len(mask)))


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
            elif command == "answer":
                connection.send([environments[i].user_says(text) for i, text in payload])
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
            call = {"reset": lambda e, x: e.reset(x), "answer": lambda e, x: e.user_says(x), "turn": play_turn}[command]
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

    def answer(self, texts: dict[int, str]) -> dict[int, tuple[str, float, bool, dict]]:
        """The customer model's messages to the environments that wait for them (index -> text): each one's result."""
        return self._scatter("answer", texts)

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
