"""The grid games of the SPA / RAGEN line (docs/methods.md section 4.4), in pure Python and numpy, deterministic for a
seed: FrozenLake, Sokoban (reverse-play generated, so always solvable) and 4x4 Sudoku (unique solution), each with an
oracle solver and SPA's "state estimation" rendering (the grid plus the coordinates of its objects); RAGEN's prompt
and its <answer> parser.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Sequence

import numpy as np

DIRECTIONS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
ACTION_NAMES = {"up": "Up", "down": "Down", "left": "Left", "right": "Right"}


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
        if size < 2:
            raise ValueError(f"FrozenLake size {size} puts the goal on the start; use 2 or more")
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


class WithCoordinates:
    """A grid game whose observations end with its state estimation, SPA's coordinates of the objects
    ("Player (P) is at (2,1); ..."): text that follows from the move by arithmetic, where the grid's follows by
    copying the grid before it with a symbol moved. Everything else is the game's own."""

    def __init__(self, game: type, **settings):
        self.env = game(**settings)

    def reset(self, seed: int) -> tuple[str, dict]:
        observation, info = self.env.reset(seed)
        return f"{observation}\n{info['state_estimation']}", info

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        observation, reward, done, info = self.env.step(action)
        return f"{observation}\n{info['state_estimation']}", reward, done, info

    def __getattr__(self, name: str):
        return getattr(self.env, name)


# --------------------------------------------------------------------------------------------
# The prompt and the answer
# --------------------------------------------------------------------------------------------

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def parse_answer(text: str, max_actions: int = 10) -> list[str]:
    """The actions inside the first <answer>a1 || a2</answer> (grids), at most max_actions; [] if none."""
    match = ANSWER_TAG.search(text)
    if not match:
        return []
    return [a.strip() for a in match.group(1).split("||") if a.strip()][:max_actions]


def grid_prompt(rules: str, state_estimation: bool = True, max_actions_per_turn: int = 2):
    """The RAGEN / SPA grid prompt (methods.md section 4.4): the rules, the last H turns, the current state (with SPA's
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
