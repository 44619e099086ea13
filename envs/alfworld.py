"""ALFWorld: the real `alfworld` games (TextWorld running each game's PDDL), verl-agent's prompt (docs/methods.md
section 3.6) and its <action> parser.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

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
# The prompt and the action
# --------------------------------------------------------------------------------------------

ACTION_TAG = re.compile(r"<action>(.*?)</action>", re.DOTALL)


def parse_action(text: str) -> list[str]:
    """The action inside the first <action>...</action> (ALFWorld), as a one-element list; [] if none or empty."""
    match = ACTION_TAG.search(text)
    action = match.group(1).strip() if match else ""
    return [action] if action else []


def alfworld_prompt(task: str, history: Sequence[tuple[str, str]], step: int, observation: str, info: dict) -> str:
    """The verl-agent ALFWorld prompt (methods.md section 3.6): task, steps so far, the last H observations
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
