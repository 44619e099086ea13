"""Text environments and the multi-turn rollout loop that every method learns from.

An environment speaks text: `reset(seed)` gives the first observation and an info dict (the task,
the admissible actions where the game has them); `step(action)` gives the next observation, a
reward, done, and info (won, invalid_action). Built in, in pure Python and numpy and deterministic
for a seed, are the grid games of the SPA / RAGEN line (`../shared/docs/methods.md` section 4):
FrozenLake, Sokoban (reverse-play generated, so always solvable) and 4x4 Sudoku (unique solution),
each with an oracle solver and SPA's "state estimation" rendering (the grid plus the coordinates
of its objects). ALFWorld runs the real `alfworld` games.

The rollout loop plays a batch of environments, in groups of G copies of one task and seed (GRPO's
groups), turn by turn: build each prompt, sample from the model, parse the action, step, until done
or the turn limit. It records the exact token ids the model saw and sampled, with their log-probs
and entropies: text is never re-tokenized to rebuild what the policy did. `transitions` turns the
record into the <s_<=t, a_t, s_{t+1}> triplets that RWML, PaW and SPA consume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import re
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import jax
import numpy as np

import model as lm
import sampler

DIRECTIONS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
ACTION_NAMES = {"up": "Up", "down": "Down", "left": "Left", "right": "Right"}


class Env(Protocol):
    def reset(self, seed: int) -> tuple[str, dict]: ...

    def step(self, action: str) -> tuple[str, float, bool, dict]: ...


def _direction(action: str) -> str | None:
    name = action.strip().lower()
    return name if name in DIRECTIONS else None


def _bfs(start, goal_test, neighbours):
    """Shortest list of actions from `start` to a state passing goal_test; None if unreachable."""
    parents = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        if goal_test(state):
            path = []
            while parents[state] is not None:
                state, action = parents[state]
                path.append(action)
            return path[::-1]
        for action, following in neighbours(state):
            if following not in parents:
                parents[following] = (state, action)
                queue.append(following)
    return None


def _coordinates(cells) -> str:
    return ", ".join(f"({r},{c})" for r, c in cells)


# --------------------------------------------------------------------------------------------
# FrozenLake
# --------------------------------------------------------------------------------------------


class FrozenLake:
    """Walk from the start (top left) to the goal (bottom right) over frozen cells without falling in a hole.

    Symbols (RAGEN): P player, _ frozen, O hole, G goal; X the player in a hole, √ the player on the
    goal. Cells are separated by spaces (one token per cell in most tokenizers; RAGEN writes them
    together). Maps are drawn like Gymnasium's generate_random_map (each cell frozen with
    probability frozen_prob) and redrawn until the goal is reachable. Slippery: the intended move
    happens with probability 1/3, each perpendicular move with 1/3, from the reset seed's RNG.
    Reward 1 on reaching the goal; an unrecognised action costs invalid_penalty and changes nothing.
    """

    name = "frozenlake"
    actions = ("Up", "Down", "Left", "Right")
    rules = ("FrozenLake: move the player (P) to the goal (G) across the frozen lake (_) without stepping into a "
             "hole (O). Actions: Up, Down, Left, Right.")

    def __init__(self, size: int = 4, frozen_prob: float = 0.8, slippery: bool = False, max_steps: int = 10,
                 invalid_penalty: float = -0.1):
        self.size, self.frozen_prob, self.slippery = size, frozen_prob, slippery
        self.max_steps, self.invalid_penalty = max_steps, invalid_penalty

    def reset(self, seed: int) -> tuple[str, dict]:
        self.rng = np.random.default_rng(seed)
        n = self.size
        while True:
            holes = self.rng.random((n, n)) > self.frozen_prob
            holes[0, 0] = holes[n - 1, n - 1] = False
            self.holes, self.goal, self.player = holes, (n - 1, n - 1), (0, 0)
            if self.solve() is not None:
                break
        self.steps, self.done, self.won = 0, False, False
        return self.render(), self._info(False)

    def _info(self, invalid: bool) -> dict:
        task = "Reach the goal (G) without falling into a hole (O)."
        return {"task": task, "admissible_actions": list(self.actions), "won": self.won, "invalid_action": invalid,
                "state_estimation": self.state_estimation(), "actions_left": self.max_steps - self.steps}

    def _moved(self, position, direction):
        dr, dc = DIRECTIONS[direction]
        r, c = position[0] + dr, position[1] + dc
        return (r, c) if 0 <= r < self.size and 0 <= c < self.size else position

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self.done:
            raise RuntimeError("step() after the episode ended: call reset()")
        self.steps += 1
        direction = _direction(action)
        reward = 0.0
        if direction is None:
            reward = self.invalid_penalty
        else:
            if self.slippery:
                perpendicular = ("left", "right") if direction in ("up", "down") else ("up", "down")
                direction = (direction, *perpendicular)[self.rng.integers(3)]
            self.player = self._moved(self.player, direction)
            if self.player == self.goal:
                reward, self.won = 1.0, True
        self.done = self.won or bool(self.holes[self.player]) or self.steps >= self.max_steps
        return self.render(), reward, self.done, self._info(direction is None)

    def render(self) -> str:
        rows = []
        for r in range(self.size):
            row = []
            for c in range(self.size):
                cell = "O" if self.holes[r, c] else "G" if (r, c) == self.goal else "_"
                if (r, c) == self.player:
                    cell = {"O": "X", "G": "√"}.get(cell, "P")
                row.append(cell)
            rows.append(" ".join(row))
        return "\n".join(rows)

    def state_estimation(self) -> str:
        holes = [tuple(int(i) for i in cell) for cell in np.argwhere(self.holes)]
        return (f"Player (P) is at ({self.player[0]},{self.player[1]}); goal (G) is at ({self.goal[0]},{self.goal[1]}); "
                f"holes (O) are at {_coordinates(holes) or 'none'}.")

    def solve(self) -> list[str] | None:
        """Shortest action list from the current position (non-slippery dynamics)."""
        def neighbours(position):
            for direction in DIRECTIONS:
                following = self._moved(position, direction)
                if not self.holes[following]:
                    yield ACTION_NAMES[direction], following
        return _bfs(self.player, lambda p: p == self.goal, neighbours)


# --------------------------------------------------------------------------------------------
# Sokoban
# --------------------------------------------------------------------------------------------


class Sokoban:
    """Push the box onto the target. One box, a size x size room with walls all round.

    Symbols (RAGEN): # wall, _ empty, O target, X box, √ box on target, P player, S player on target.
    Rewards (RAGEN): -0.1 per step, +1 for pushing the box onto the target, -1 for pushing it off,
    +10 when solved. Walls block; the player pushes a box into a free cell and never pulls it.
    Levels come from reverse play: the box starts on the target and the player walks backwards,
    pulling it, so every level is solvable; one is kept only if its shortest solution fits in
    max_steps (and is at least min_solution long).
    """

    name = "sokoban"
    actions = ("Up", "Down", "Left", "Right")
    rules = ("Sokoban: push the box (X) onto the target (O). Walls (#) block; empty floor is _; a box on its target "
             "shows as √ and the player on a target as S. You can push a box but not pull it. "
             "Actions: Up, Down, Left, Right.")

    def __init__(self, size: int = 6, max_steps: int = 10, reverse_steps: int = 30, min_solution: int = 2,
                 invalid_penalty: float = -0.1):
        if size < 5:
            raise ValueError(f"Sokoban size {size} leaves no room inside the walls; use 5 or more")
        self.size, self.max_steps, self.reverse_steps = size, max_steps, reverse_steps
        self.min_solution, self.invalid_penalty = min_solution, invalid_penalty

    def reset(self, seed: int) -> tuple[str, dict]:
        self.rng = np.random.default_rng(seed)
        for _ in range(10_000):
            if self._generate():
                break
        else:
            raise RuntimeError(f"no Sokoban level with a solution of {self.min_solution}-{self.max_steps} moves "
                               f"for seed {seed}: loosen min_solution or max_steps")
        self.steps, self.done, self.won = 0, False, False
        return self.render(), self._info(False)

    def _generate(self) -> bool:
        n, rng = self.size, self.rng
        walls = np.ones((n, n), bool)
        position = (int(rng.integers(1, n - 1)), int(rng.integers(1, n - 1)))
        for _ in range(3 * (n - 2) ** 2):  # carve the room by a random walk inside the border
            walls[position] = False
            dr, dc = list(DIRECTIONS.values())[rng.integers(4)]
            position = (min(max(position[0] + dr, 1), n - 2), min(max(position[1] + dc, 1), n - 2))
        floor = [tuple(int(i) for i in cell) for cell in np.argwhere(~walls)]
        if len(floor) < 5:
            return False
        self.walls = walls
        self.target = self.box = floor[rng.integers(len(floor))]
        self.player = floor[rng.integers(len(floor))]
        if self.player == self.box:
            return False
        for _ in range(self.reverse_steps):  # reverse play: move, pulling the box when it is behind
            dr, dc = list(DIRECTIONS.values())[rng.integers(4)]
            following = (self.player[0] + dr, self.player[1] + dc)
            if self.walls[following] or following == self.box:
                continue
            behind = (self.player[0] - dr, self.player[1] - dc)
            if behind == self.box and rng.random() < 0.7:
                self.box = self.player
            self.player = following
        solution = self.solve()
        return self.box != self.target and solution is not None and self.min_solution <= len(solution) <= self.max_steps

    def _info(self, invalid: bool) -> dict:
        return {"task": "Push the box (X) onto the target (O).", "admissible_actions": list(self.actions),
                "won": self.won, "invalid_action": invalid, "state_estimation": self.state_estimation(),
                "actions_left": self.max_steps - self.steps}

    def _push(self, player, box, direction):
        """(player, box) after one move: walls block; a box moves only into a free cell."""
        dr, dc = DIRECTIONS[direction]
        following = (player[0] + dr, player[1] + dc)
        if self.walls[following]:
            return player, box
        if following == box:
            beyond = (box[0] + dr, box[1] + dc)
            if self.walls[beyond]:
                return player, box
            return following, beyond
        return following, box

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self.done:
            raise RuntimeError("step() after the episode ended: call reset()")
        self.steps += 1
        direction = _direction(action)
        if direction is None:
            reward = self.invalid_penalty
        else:
            was_on_target = self.box == self.target
            self.player, self.box = self._push(self.player, self.box, direction)
            now_on_target = self.box == self.target
            reward = -0.1 + (now_on_target and not was_on_target) * 1.0 - (was_on_target and not now_on_target) * 1.0
            if now_on_target:
                reward, self.won = reward + 10.0, True
        self.done = self.won or self.steps >= self.max_steps
        return self.render(), reward, self.done, self._info(direction is None)

    def render(self) -> str:
        rows = []
        height, width = self.walls.shape
        for r in range(height):
            row = []
            for c in range(width):
                cell = (r, c)
                if self.walls[cell]:
                    row.append("#")
                elif cell == self.player:
                    row.append("S" if cell == self.target else "P")
                elif cell == self.box:
                    row.append("√" if cell == self.target else "X")
                else:
                    row.append("O" if cell == self.target else "_")
            rows.append(" ".join(row))
        return "\n".join(rows)

    def state_estimation(self) -> str:
        (pr, pc), (br, bc), (tr, tc) = self.player, self.box, self.target
        return f"Player (P) is at ({pr},{pc}); box (X) is at ({br},{bc}); target (O) is at ({tr},{tc})."

    def solve(self) -> list[str] | None:
        def neighbours(state):
            for direction in DIRECTIONS:
                yield ACTION_NAMES[direction], self._push(*state, direction)
        return _bfs((self.player, self.box), lambda state: state[1] == self.target, neighbours)


# --------------------------------------------------------------------------------------------
# Sudoku
# --------------------------------------------------------------------------------------------


class Sudoku:
    """Fill a 4x4 Sudoku: each row, column and 2x2 box holds 1-4 once. The puzzle has exactly one solution.

    Action: "place V at (R, C)", zero-indexed row and column. Clues cannot be changed and values
    outside 1-4 are refused (invalid, invalid_penalty); other cells may be written and rewritten.
    Reward 1 when the grid is solved. Empty cells render as ".".
    """

    name = "sudoku"
    rules = ("Sudoku: fill the empty cells (.) so that every row, column and 2x2 box contains 1, 2, 3 and 4 once. "
             "Action: place V at (R, C), with zero-indexed row R and column C.")
    # ASCII digits, at most 9 after leading zeros (int() refuses over 4,300; other scripts' digits are not actions)
    ACTION = re.compile(r"(?:place\s*)?0*([0-9]{1,9})\s*at\s*\(\s*0*([0-9]{1,9})\s*,\s*0*([0-9]{1,9})\s*\)", re.IGNORECASE)

    def __init__(self, size: int = 4, empty_cells: int = 6, max_steps: int = 10, invalid_penalty: float = -0.1):
        self.size, self.box = size, int(round(size**0.5))
        if self.box**2 != size:
            raise ValueError(f"Sudoku size {size} is not a square")
        self.empty_cells, self.max_steps, self.invalid_penalty = empty_cells, max_steps, invalid_penalty

    def reset(self, seed: int) -> tuple[str, dict]:
        rng = np.random.default_rng(seed)
        n, b = self.size, self.box
        solution = np.array([[(b * (r % b) + r // b + c) % n + 1 for c in range(n)] for r in range(n)])
        solution = rng.permutation(n)[solution - 1] + 1  # relabel digits
        bands = np.concatenate([band * b + rng.permutation(b) for band in rng.permutation(b)])
        stacks = np.concatenate([stack * b + rng.permutation(b) for stack in rng.permutation(b)])
        solution = solution[bands][:, stacks]
        if rng.random() < 0.5:
            solution = solution.T
        grid = solution.copy()
        removed = 0
        for index in rng.permutation(n * n):
            if removed == self.empty_cells:
                break
            r, c = divmod(int(index), n)
            kept, grid[r, c] = grid[r, c], 0
            if self.count_solutions(grid, limit=2) == 1:
                removed += 1
            else:
                grid[r, c] = kept
        self.solution, self.grid, self.clues = solution, grid, grid > 0
        self.steps, self.done, self.won = 0, False, False
        return self.render(), self._info(False)

    def _info(self, invalid: bool) -> dict:
        task = "Fill the grid so that every row, column and 2x2 box contains 1 to 4 exactly once."
        writable = np.argwhere(~self.clues)  # every legal placement: a value 1-N in a non-clue cell
        admissible = [f"place {v} at ({r}, {c})" for r, c in writable for v in range(1, self.size + 1)]
        return {"task": task, "admissible_actions": admissible, "won": self.won, "invalid_action": invalid,
                "state_estimation": self.state_estimation(), "actions_left": self.max_steps - self.steps}

    def _candidates(self, grid, r, c):
        b = self.box
        used = set(grid[r]) | set(grid[:, c]) | set(grid[r - r % b: r - r % b + b, c - c % b: c - c % b + b].ravel())
        return [v for v in range(1, self.size + 1) if v not in used]

    def count_solutions(self, grid, limit: int = 2) -> int:
        """Solutions of `grid` (0 = empty), counted up to `limit`, by backtracking."""
        empty = np.argwhere(grid == 0)
        if len(empty) == 0:
            return 1
        r, c = empty[0]
        total = 0
        for value in self._candidates(grid, r, c):
            grid[r, c] = value
            total += self.count_solutions(grid, limit - total)
            grid[r, c] = 0
            if total >= limit:
                break
        return total

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self.done:
            raise RuntimeError("step() after the episode ended: call reset()")
        self.steps += 1
        match = self.ACTION.fullmatch(action.strip())
        reward, invalid = 0.0, True
        if match:
            value, r, c = (int(g) for g in match.groups())
            if 1 <= value <= self.size and r < self.size and c < self.size and not self.clues[r, c]:
                self.grid[r, c], invalid = value, False
        if invalid:
            reward = self.invalid_penalty
        elif (self.grid == self.solution).all():
            reward, self.won = 1.0, True
        self.done = self.won or self.steps >= self.max_steps
        return self.render(), reward, self.done, self._info(invalid)

    def render(self) -> str:
        return "\n".join(" ".join(str(v) if v else "." for v in row) for row in self.grid)

    def state_estimation(self) -> str:
        empty = [tuple(int(i) for i in cell) for cell in np.argwhere(self.grid == 0)]
        return f"Empty cells (.) are at {_coordinates(empty) or 'none'}."

    def solve(self) -> list[str]:
        """Placements that complete the current grid (the unique solution's values in the open cells)."""
        return [f"place {self.solution[r, c]} at ({r}, {c})" for r, c in np.argwhere(self.grid != self.solution)]


GRID_ENVS = {"frozenlake": FrozenLake, "sokoban": Sokoban, "sudoku": Sudoku}


# --------------------------------------------------------------------------------------------
# ALFWorld
# --------------------------------------------------------------------------------------------

ALFWORLD_SPLITS = ("train", "valid_seen", "valid_unseen", "valid_train")
ALFWORLD_TASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
                       "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place")


def alfworld_games(split: str, data_root: str | Path | None = None, task_types: Sequence[str] | None = None) -> list[Path]:
    """The sorted game.tw-pddl files of a split, from $ALFWORLD_DATA/json_2.1.1/<split>/ (the standard layout).

    Like alfworld's own lister, it skips the "movable" and "Sliced" task folders.
    """
    if split not in ALFWORLD_SPLITS:
        raise ValueError(f"ALFWorld split '{split}' is not one of {ALFWORLD_SPLITS}")
    unknown = set(task_types or ()) - set(ALFWORLD_TASK_TYPES)
    if unknown:
        raise ValueError(f"unknown ALFWorld task types {sorted(unknown)}; choose from {ALFWORLD_TASK_TYPES}")
    root = Path(data_root or os.environ.get("ALFWORLD_DATA") or "~/.cache/alfworld").expanduser()
    folder = root / "json_2.1.1" / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"No ALFWorld games at {folder}. Fix: run `alfworld-download` (fetches them to ~/.cache/alfworld), "
            "or unpack a copy, e.g. `mkdir -p ~/.cache/alfworld && tar xJf ../shared/alfworld/json_2.1.1.tar.xz "
            "-C ~/.cache/alfworld`, and point ALFWORLD_DATA at the folder that holds json_2.1.1/."
        )
    games = []
    for game in sorted(folder.glob("*/*/game.tw-pddl")):
        task_folder = game.parent.parent.name  # <task_type>-<object>-<mrecep>-<recep>-<scene>
        if "movable" in task_folder or "Sliced" in task_folder:
            continue
        if task_types and task_folder.split("-", 1)[0] not in task_types:
            continue
        games.append(game)
    if not games:
        raise FileNotFoundError(f"No game.tw-pddl files for task types {task_types} under {folder}")
    return games


def alfworld_walkthrough(game_file: str | Path) -> list[str]:
    """The expert plan stored in a game file."""
    import json

    return list(json.loads(Path(game_file).read_text())["walkthrough"])


class AlfWorld:
    """An ALFWorld text game from the real `alfworld` package: TextWorld running the game's PDDL, with
    alfworld's wrappers (AlfredDemangler names objects "drawer 3" as the papers' agents see them).

    reset(seed) plays game games[seed % len(games)] of the split. The first observation is the room
    and "Your task is to: ..."; every step returns the game's own text ("Nothing happens." for a
    command it does not understand, which keeps the game going). A command outside the admissible
    list is an invalid step: it costs invalid_penalty. Winning pays success_reward (10 in PaW and
    verl-agent; RWML's policy RL uses 1). Actions are stripped, not lowercased: the game is
    case-sensitive. Each instance reuses one TextWorld environment across games, because every new
    one loads a private copy of the planner library that is never freed (~4 MB a game).
    """

    name = "alfworld"
    HEADER = "-= Welcome to TextWorld, ALFRED! =-"

    def __init__(self, split: str = "train", data_root: str | Path | None = None, task_types: Sequence[str] | None = None,
                 max_steps: int = 50, success_reward: float = 10.0, invalid_penalty: float = -0.1):
        self.games = alfworld_games(split, data_root, task_types)
        self.max_steps, self.success_reward, self.invalid_penalty = max_steps, success_reward, invalid_penalty
        self.game, self.env = None, None

    def _call(self, method, *args):
        """fast_downward's PDDL translation overwrites sys.argv on load and reset; put it back."""
        import sys

        saved = sys.argv
        try:
            return method(*args)
        finally:
            sys.argv = saved

    def reset(self, seed: int) -> tuple[str, dict]:
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

        game = str(self.games[seed % len(self.games)])
        if self.env is None:
            infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
            self.env = self._call(textworld.start, game, infos, [AlfredDemangler(shuffle=False), AlfredInfos])
        elif game != self.game:
            self._call(self.env.load, game)
        self.game = game
        state = self._call(self.env.reset)
        observation = state.feedback.replace(self.HEADER, "", 1).strip()
        self.task = observation.split("Your task is to: ", 1)[-1].strip()
        self.admissible = list(state.admissible_commands)
        self.steps, self.done, self.won = 0, False, False
        return observation, self._info(False)

    def _info(self, invalid: bool) -> dict:
        return {"task": self.task, "admissible_actions": list(self.admissible), "won": self.won,
                "invalid_action": invalid, "gamefile": self.game}

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self.done:
            raise RuntimeError("step() after the episode ended: call reset()")
        command = action.strip()
        invalid = command not in self.admissible
        state, _, _ = self._call(self.env.step, command)
        self.steps += 1
        self.won = bool(state.won)
        self.admissible = list(state.admissible_commands)
        self.done = self.won or self.steps >= self.max_steps
        reward = self.success_reward * self.won + self.invalid_penalty * invalid
        return state.feedback.strip(), reward, self.done, self._info(invalid)


# --------------------------------------------------------------------------------------------
# Prompts and action parsing
# --------------------------------------------------------------------------------------------

ACTION_TAG = re.compile(r"<action>(.*?)</action>", re.DOTALL)
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def parse_action(text: str) -> list[str]:
    """The action inside the first <action>...</action> (ALFWorld), as a one-element list; [] if none or empty."""
    match = ACTION_TAG.search(text)
    action = match.group(1).strip() if match else ""
    return [action] if action else []


def parse_answer(text: str, max_actions: int = 10) -> list[str]:
    """The actions inside the first <answer>a1 || a2</answer> (grids), at most max_actions; [] if none."""
    match = ANSWER_TAG.search(text)
    if not match:
        return []
    return [a.strip() for a in match.group(1).split("||") if a.strip()][:max_actions]


def alfworld_prompt(task: str, history: Sequence[tuple[str, str]], step: int, observation: str, info: dict) -> str:
    """The verl-agent ALFWorld prompt (methods.md section 3): task, steps so far, the last H observations
    and actions, the current observation, the admissible actions, then <think> and <action>."""
    lines = [f"You are an expert agent operating in the ALFRED embodied environment. Your task is to: {task}"]
    if history:
        lines.append(f"Prior to this step you have taken {step} step(s). Below are the most recent {len(history)} "
                     "observation(s) and the action(s) you took:")
        first = step - len(history) + 1
        for i, (seen, action) in enumerate(history):
            lines.append(f"[Observation {first + i}: {seen}]\n[Action {first + i}: {action}]")
    lines.append(f"You are now at step {step + 1} and your current observation is: {observation}")
    admissible = ", ".join(f"'{a}'" for a in info.get("admissible_actions") or [])
    lines.append(f"Your admissible actions of the current situation are: [{admissible}].")
    lines.append("Now it is your turn to take an action. First reason step by step about the current situation "
                 "inside <think> </think>. Then choose one admissible action and give it inside <action> </action>.")
    return "\n".join(lines)


def grid_prompt(rules: str, state_estimation: bool = True, max_actions_per_turn: int = 2):
    """The RAGEN / SPA grid prompt: the rules, the last H turns, the current state (with SPA's
    coordinates when state_estimation), the actions left, then <think> and <answer>a1 || a2</answer>."""

    def prompt(task: str, history: Sequence[tuple[str, str]], step: int, observation: str, info: dict) -> str:
        lines = [rules]
        for i, (seen, action) in enumerate(history):
            lines.append(f"Turn {step - len(history) + i + 1} state:\n{seen}\nYour actions: {action}")
        lines.append(f"Turn {step + 1} state:\n{observation}")
        if state_estimation:
            lines.append(info["state_estimation"])
        lines.append(f"You have {info['actions_left']} actions left. Give at most {max_actions_per_turn} actions, "
                     "separated by ' || '. First think inside <think> </think>, then give your actions inside "
                     "<answer> </answer>, e.g. <answer>Up || Left</answer>.")
        return "\n".join(lines)

    return prompt


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a user turn: through the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    return tokenizer.encode(text, add_special_tokens=True)


# --------------------------------------------------------------------------------------------
# Batches of environments, in this process or in worker processes
# --------------------------------------------------------------------------------------------


def play_turn(env: Env, actions: Sequence[str]) -> tuple[str, float, bool, dict]:
    """Step a turn's actions in order until done; no action at all is one invalid step.

    The reward is summed over the turn's steps, and the turn is invalid if any of its steps was.
    """
    total, invalid = 0.0, False
    for action in list(actions) or [""]:
        observation, reward, done, info = env.step(action)
        total += reward
        invalid = invalid or info.get("invalid_action", False)
        if done:
            break
    return observation, total, done, {**info, "invalid_action": invalid}


def _worker(connection, make_env: Callable[[], Env], count: int):
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

    def __init__(self, make_env: Callable[[], Env], count: int, workers: int = 0):
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


# --------------------------------------------------------------------------------------------
# The rollout loop, and what comes out of it
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Turn:
    """One model turn: what the policy saw, what it sampled (exact ids), and what the environment did.

    prompt_ids          the token ids fed to the model (chat template applied), unpadded
    response_ids        the sampled ids, through the stop token inclusive
    response_logprobs   log pi_old of each response token at the sampling temperature (float32)
    response_entropies  the policy's full-distribution entropy at each response token
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
    reward: float
    done: bool
    won: bool
    invalid: bool


@dataclasses.dataclass
class Trajectory:
    seed: int
    group: int
    task: str
    initial_info: dict
    turns: list[Turn]

    @property
    def total_reward(self) -> float:
        return float(sum(t.reward for t in self.turns))

    @property
    def won(self) -> bool:
        return bool(self.turns and self.turns[-1].won)


class Transition(NamedTuple):
    """<s_<=t, a_t, s_{t+1}>: what RWML predicts, PaW appends and SPA writes into its reasoning.

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


def transitions(trajectories: Sequence[Trajectory], history: int = 2) -> list[Transition]:
    out = []
    for index, trajectory in enumerate(trajectories):
        for t, turn in enumerate(trajectory.turns):
            earlier = trajectory.turns[max(0, t - history):t] if history else []
            out.append(Transition(
                trajectory.task, tuple((e.observation, " || ".join(e.actions)) for e in earlier), turn.observation,
                " || ".join(turn.actions), turn.next_observation, turn.reward, turn.invalid, index, t, trajectory.group,
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


@contextlib.contextmanager
def _stopwatch(timings: dict[str, float], name: str):
    """Add the wall seconds of the `with` block to timings[name]."""
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def rollout(params: lm.Params, config: lm.Config, tokenizer, environments: EnvBatch, seeds: Sequence[int], group_size: int,
            key: jax.Array, prompt: Callable, parse: Callable[[str], list[str]], max_turns: int,
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
    trajectories = [Trajectory(seed, i // group_size, info.get("task", ""), info, []) for i, (seed, (_, info))
                    in enumerate(zip(env_seeds, starts))]
    current = {i: observation_info for i, observation_info in enumerate(starts)}
    for turn in range(max_turns):
        if not current:
            break
        active = sorted(current)
        prompts = []
        for i in active:
            observation, info = current[i]
            window = trajectories[i].turns[max(0, turn - history):turn] if history else []
            past = [(t.observation, " || ".join(t.actions) or "(none)") for t in window]
            prompts.append(encode_prompt(tokenizer, prompt(trajectories[i].task, past, turn, observation, info)))
        padded = prompts + [prompts[0]] * (lm.bucket_length(len(prompts), 1) - len(prompts))
        with _stopwatch(timings, "model"):
            out = jax.device_get(sampler.generate(params, config, padded, jax.random.fold_in(key, turn), sampling,
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
                turn, current[i][0], np.asarray(prompt_ids, np.int32), ids, np.asarray(logprobs),
                np.asarray(entropies), text, list(actions), next_observation, next_ids, float(reward), bool(done),
                bool(info.get("won", False)), bool(info.get("invalid_action", False)),
            ))
            if done:
                del current[i]
            else:
                current[i] = (next_observation, info)
    return trajectories
