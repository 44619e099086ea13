"""SPA: self-play world-model finetuning before RL (Chen et al., arXiv 2510.15047; methods.md section 4).

Cold-start the policy with supervised finetuning on its own play, with the true current and next
states written into its reasoning, so it internalises a state representation and the transition
model; then run RL.

    self-play   the base model plays (temperature 1, groups of G, a few turns); for every turn,
                s_t and s_{t+1} are the environment's true states in SPA's state-estimation
                rendering (the grid, then the coordinates of its objects), recovered by replaying
                the episode's actions from its reset seed
    response    <think> <observation>s_t</observation> r <prediction>s_{t+1}</prediction> </think>
                <answer>a1 || a2</answer>, where r is the model's own reasoning (its <think> text,
                any observation or prediction it wrote removed) and a1 || a2 the actions it took.
                A response that had the two spans gets their contents replaced; one that did not
                gets them inserted (a tiny model never writes them before SFT).
    SFT         cross-entropy (methods.md eq. 20, section 4.3) on the response (the think and answer
                spans, observation and prediction included, and the closing EOS); the prompt, which
                holds the environment's tokens, is masked out. mask_world_model=True also masks the
                observation and prediction contents: the paper's "no improvement" ablation, and what
                its released code does.
    RL          train.py's policy stage (grpo_step) with the same prompt, state estimation kept on.
                The paper uses PPO with a learned critic; GRPO's group baseline replaces the critic
                here, as everywhere in this project.

Data filters of the paper's FrozenLake / Sudoku data, as flags: the format filter keeps a turn
only if its answer parsed to at least one action and no action was invalid; de-duplication keeps
one copy of each (prompt, response) pair.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, NamedTuple, Sequence

import envs
import rollout
import rwml

WORLD_MODEL_SPANS = re.compile(r"<(observation|prediction)>.*?</\1>", re.DOTALL)
THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class SPAConfig:
    format_filter: bool = True
    """keep a turn only if it parsed to >= 1 action and none was invalid"""
    dedupe: bool = True
    """keep one copy of each (prompt, response) pair"""


def render_state(observation: str, info: dict) -> str:
    """SPA's state estimation (methods.md section 4.1): the grid, then the coordinates of its objects."""
    return f"{observation}\n{info['state_estimation']}"


def true_states(make_env: Callable[[], envs.Env], trajectory: rollout.Trajectory) -> list[tuple[str, str]]:
    """(s_t, s_{t+1}) of every turn, rendered with state estimation, by replaying the turn actions from the reset seed."""
    env = make_env()
    observation, info = env.reset(trajectory.seed)
    states = []
    for turn in trajectory.turns:
        before = render_state(observation, info)
        observation, _, _, info = rollout.play_turn(env, turn.actions)
        states.append((before, render_state(observation, info)))
    return states


def own_reasoning(response_text: str) -> str:
    """The model's reasoning: its <think> text without any <observation> / <prediction> span, whitespace collapsed."""
    match = THINK.search(response_text)
    return " ".join(WORLD_MODEL_SPANS.sub(" ", match.group(1)).split()) if match else ""


def response_pieces(state: str, next_state: str, reasoning: str, actions: Sequence[str]) -> list[tuple[str, bool]]:
    """The SPA response as (text, is_world_model_content) pieces, in order."""
    middle = f" {reasoning} " if reasoning else " "
    return [("<think> <observation>", False), (state, True), (f"</observation>{middle}<prediction>", False),
            (next_state, True), (f"</prediction> </think> <answer>{' || '.join(actions)}</answer>", False)]


class Example(NamedTuple):
    """One SFT example: the prompt the model saw (exact ids) and the SPA response, tokenized piece by piece so
    the observation and prediction contents are whole tokens: world_model[i] marks response token i as one."""

    prompt_ids: list[int]
    response_ids: list[int]
    world_model: list[bool]
    state: str
    next_state: str
    actions: list[str]
    text: str


def make_example(tokenizer, prompt_ids: Sequence[int], state: str, next_state: str, reasoning: str,
                 actions: Sequence[str]) -> Example:
    ids, world_model = [], []
    pieces = response_pieces(state, next_state, reasoning, actions)
    for text, is_world_model in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        world_model += [is_world_model] * len(piece)
    ids.append(tokenizer.eos_token_id)
    world_model.append(False)
    return Example([int(i) for i in prompt_ids], ids, world_model, state, next_state, list(actions),
                   "".join(t for t, _ in pieces))


def self_play_examples(trajectories: Sequence[rollout.Trajectory], make_env: Callable[[], envs.Env], tokenizer,
                       cfg: SPAConfig = SPAConfig()) -> tuple[list[Example], dict]:
    """SFT examples from every turn of the model's own play, with the true states substituted."""
    examples, seen, dropped = [], set(), {"format": 0, "duplicate": 0}
    for trajectory in trajectories:
        for turn, (state, next_state) in zip(trajectory.turns, true_states(make_env, trajectory)):
            if cfg.format_filter and (not turn.actions or turn.invalid):
                dropped["format"] += 1
                continue
            example = make_example(tokenizer, turn.prompt_ids, state, next_state, own_reasoning(turn.response_text),
                                   turn.actions)
            key = (tuple(example.prompt_ids), example.text)
            if cfg.dedupe and key in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(key)
            examples.append(example)
    turns = sum(len(t.turns) for t in trajectories)
    return examples, {"turns": turns, "examples": len(examples), **{f"dropped_{k}": v for k, v in dropped.items()}}


def sft_batch(examples: Sequence[Example], pad_id: int, mask_world_model: bool = False,
              min_bucket: int = 16) -> rwml.SFTBatch:
    """[prompt ; response] rows, right padded to a power of two; the loss mask (m_{i,t} of methods.md eq. 20) covers
    the response (EOS included), less its observation and prediction contents under mask_world_model."""
    keep = [[not wm for wm in e.world_model] for e in examples] if mask_world_model else None
    return rwml.sft_batch(rollout.rows([e.prompt_ids for e in examples], [e.response_ids for e in examples],
                                       action_keep=keep, pad_id=pad_id, min_bucket=min_bucket))


def prediction_row(example: Example) -> tuple[list[int], list[int]]:
    """(context, target) for the accuracy of the <prediction> (methods.md eq. 30): the prompt and the response up to
    <prediction> (the true observation given), then the true next state's tokens."""
    first = example.world_model.index(True)
    second = example.world_model.index(True, first + example.world_model[first:].index(False))
    end = second + example.world_model[second:].index(False)
    return example.prompt_ids + example.response_ids[:second], example.response_ids[second:end]
