"""The built-in grid environments against their rules and oracles, and action parsing."""

import itertools
import re

import numpy as np
import pytest

import envs
import rollout

# ---- every built-in environment ----


@pytest.mark.parametrize("name", list(envs.GRID_ENVS))
def test_oracle_solves_100_seeded_instances(name):
    for seed in range(100):
        env = envs.GRID_ENVS[name]()
        env.reset(seed)
        plan = env.solve()
        assert plan is not None and len(plan) <= env.max_steps, (seed, plan)
        for action in plan:
            _, _, done, info = env.step(action)
            assert not info["invalid_action"]
        assert done and info["won"], (seed, plan)


@pytest.mark.parametrize("name", list(envs.GRID_ENVS))
def test_the_same_seed_gives_the_same_instance(name):
    first, again, other = (envs.GRID_ENVS[name]().reset(seed)[0] for seed in (7, 7, 8))
    assert first == again
    assert first != other


@pytest.mark.parametrize("name", list(envs.GRID_ENVS))
def test_unrecognised_action_is_an_invalid_step_with_the_penalty(name):
    env = envs.GRID_ENVS[name](invalid_penalty=-0.25)
    before, _ = env.reset(0)
    for junk in ["", "jump", "place 9 at (0, 0)", "Up Up", "\u2603\x00"]:
        observation, reward, done, info = env.step(junk)
        assert info["invalid_action"] and reward == -0.25 and observation == before
    assert env.steps == 5 and not done


@pytest.mark.parametrize("name", list(envs.GRID_ENVS))
def test_episode_ends_at_the_step_limit(name):
    env = envs.GRID_ENVS[name](max_steps=3)
    env.reset(0)
    dones = [env.step("nonsense")[2] for _ in range(3)]
    assert dones == [False, False, True]
    with pytest.raises(RuntimeError):
        env.step("Up")


def parse_grid(text):
    return [row.split(" ") for row in text.split("\n")]


def cells_of(grid, symbols):
    return sorted((r, c) for r, row in enumerate(grid) for c, cell in enumerate(row) if cell in symbols)


def coordinates(text):
    return [tuple(map(int, m)) for m in re.findall(r"\((\d+),(\d+)\)", text)]


# ---- FrozenLake ----


def lake(layout):
    """A FrozenLake in a given layout: P start, G goal, O holes."""
    env = envs.FrozenLake(size=len(layout))
    env.reset(0)
    grid = np.array([row.split(" ") for row in layout])
    env.holes = grid == "O"
    env.player = tuple(np.argwhere(grid == "P")[0])
    env.goal = tuple(np.argwhere(grid == "G")[0])
    return env


def test_frozenlake_hole_ends_the_episode_without_reward():
    env = lake(["P O _", "_ _ _", "_ _ G"])
    observation, reward, done, info = env.step("Right")
    assert done and reward == 0.0 and not info["won"]
    assert parse_grid(observation)[0] == ["_", "X", "_"]


def test_frozenlake_goal_wins_with_reward_one():
    env = lake(["_ _ _", "_ _ P", "_ _ G"])
    observation, reward, done, info = env.step("down")  # case does not matter
    assert done and reward == 1.0 and info["won"] and parse_grid(observation)[2][2] == "√"


def test_frozenlake_edge_keeps_the_player_in_place():
    env = lake(["P _ _", "_ _ _", "_ _ G"])
    for action in ("Up", "Left"):
        env.step(action)
        assert env.player == (0, 0)


def test_frozenlake_maps_are_solvable_from_the_start():
    for seed in range(200):
        env = envs.FrozenLake()
        env.reset(seed)
        assert env.solve() is not None and not env.holes[0, 0] and not env.holes[3, 3]


def test_frozenlake_slippery_moves_as_intended_a_third_of_the_time():
    moves = {"intended": 0, "perpendicular": 0}
    for seed in range(600):
        env = lake(["_ _ _", "_ P _", "_ _ G"])
        env.slippery, env.rng = True, np.random.default_rng(seed)
        env.step("Up")
        moves["intended" if env.player == (0, 1) else "perpendicular"] += env.player in [(1, 0), (1, 2)] or env.player == (0, 1)
    assert abs(moves["intended"] / 600 - 1 / 3) < 0.06  # binomial sd 0.019: ~3 sigma
    assert moves["intended"] + moves["perpendicular"] == 600  # never backwards


def test_frozenlake_state_estimation_matches_the_grid():
    env = envs.FrozenLake()
    observation, info = env.reset(11)
    grid = parse_grid(observation)
    text = info["state_estimation"]
    found = coordinates(text)
    assert found[0] == cells_of(grid, "P")[0] and found[1] == cells_of(grid, "G")[0]
    assert sorted(found[2:]) == cells_of(grid, "O")


# ---- Sokoban ----


def room(layout):
    """A Sokoban level from a layout: # wall, P player, X box, O target."""
    env = envs.Sokoban()
    env.reset(0)
    grid = np.array([row.split(" ") for row in layout])
    env.size = len(layout)
    env.walls = grid == "#"
    env.player = tuple(np.argwhere(grid == "P")[0])
    env.box = tuple(np.argwhere(grid == "X")[0])
    env.target = tuple(np.argwhere(grid == "O")[0])
    return env


def test_sokoban_walls_block_the_player():
    env = room(["# # # #", "# P _ #", "# X O #", "# # # #"])
    _, reward, _, info = env.step("Up")
    assert env.player == (1, 1) and reward == pytest.approx(-0.1) and not info["invalid_action"]


def test_sokoban_box_is_pushed_into_a_free_cell():
    env = room(["# # # # #", "# P X _ #", "# _ _ O #", "# # # # #"])
    observation, reward, _, _ = env.step("Right")
    assert env.player == (1, 2) and env.box == (1, 3) and reward == pytest.approx(-0.1)
    assert parse_grid(observation)[1] == ["#", "_", "P", "X", "#"]


def test_sokoban_box_is_not_pulled():
    env = room(["# # # # #", "# _ P X #", "# _ _ O #", "# # # # #"])
    env.step("Left")
    assert env.player == (1, 1) and env.box == (1, 3)


def test_sokoban_box_against_a_wall_does_not_move():
    env = room(["# # # # #", "# _ P X #", "# _ _ O #", "# # # # #"])
    env.step("Right")
    assert env.player == (1, 2) and env.box == (1, 3)


def test_sokoban_rewards_follow_ragen():
    env = room(["# # # # #", "# P X O #", "# _ _ _ #", "# # # # #"])
    observation, reward, done, info = env.step("Right")  # onto the target: -0.1 + 1 + 10, solved
    assert reward == pytest.approx(10.9) and done and info["won"]
    assert parse_grid(observation)[1] == ["#", "_", "P", "√", "#"]
    env = room(["# # # # # #", "# P X _ _ #", "# _ _ _ O #", "# # # # # #"])
    env.target = (1, 2)  # the box starts on its target; pushing it off costs 1
    env.won = False
    _, reward, done, _ = env.step("Right")
    assert reward == pytest.approx(-1.1) and not done


def test_sokoban_player_on_target_renders_as_s():
    env = room(["# # # # #", "# P O _ #", "# _ X _ #", "# # # # #"])
    observation, *_ = env.step("Right")
    assert parse_grid(observation)[1][2] == "S"


def test_sokoban_state_estimation_matches_the_grid():
    env = envs.Sokoban()
    observation, info = env.reset(5)
    grid = parse_grid(observation)
    assert coordinates(info["state_estimation"]) == [cells_of(grid, "PS")[0], cells_of(grid, "X√")[0], cells_of(grid, "OS√")[0]]


# ---- Sudoku ----


def brute_force_solutions(grid):
    """Count completions by trying every filling of the empty cells (independent of the env's solver)."""
    empty = np.argwhere(grid == 0)
    count = 0
    for values in itertools.product(range(1, 5), repeat=len(empty)):
        filled = grid.copy()
        filled[tuple(empty.T)] = values
        rows = all(sorted(row) == [1, 2, 3, 4] for row in filled)
        cols = all(sorted(col) == [1, 2, 3, 4] for col in filled.T)
        boxes = all(sorted(filled[r:r + 2, c:c + 2].ravel()) == [1, 2, 3, 4] for r in (0, 2) for c in (0, 2))
        count += rows and cols and boxes
    return count


def test_sudoku_puzzles_have_exactly_one_solution():
    for seed in range(20):
        env = envs.Sudoku()
        env.reset(seed)
        assert (env.grid == 0).sum() == 6
        assert brute_force_solutions(env.grid) == 1


def test_sudoku_refuses_to_change_a_clue():
    env = envs.Sudoku()
    before, _ = env.reset(0)
    r, c = np.argwhere(env.clues)[0]
    other = env.grid[r, c] % 4 + 1
    observation, reward, _, info = env.step(f"place {other} at ({r}, {c})")
    assert info["invalid_action"] and observation == before and reward == -0.1


def test_sudoku_rejects_values_outside_one_to_four():
    env = envs.Sudoku()
    env.reset(0)
    r, c = np.argwhere(~env.clues)[0]
    assert env.step(f"place 5 at ({r}, {c})")[3]["invalid_action"]
    assert env.step(f"place 0 at ({r}, {c})")[3]["invalid_action"]


def test_sudoku_is_won_only_when_the_grid_is_complete_and_correct():
    env = envs.Sudoku(max_steps=20)
    env.reset(3)
    plan = env.solve()
    (value, r, c) = re.findall(r"\d+", plan[0])
    wrong = int(value) % 4 + 1
    assert not env.step(f"place {wrong} at ({r}, {c})")[3]["invalid_action"]  # a wrong value may be written
    for action in plan[1:]:
        _, _, done, info = env.step(action)
    assert not done and not info["won"]
    _, reward, done, info = env.step(plan[0])  # and corrected
    assert done and info["won"] and reward == 1.0


def test_sudoku_state_estimation_lists_the_empty_cells():
    env = envs.Sudoku()
    observation, info = env.reset(2)
    assert coordinates(info["state_estimation"]) == cells_of(parse_grid(observation), ".")


# ---- parsing ----


@pytest.mark.parametrize("text, expected", [
    ("<think>go</think><answer>Up || Left</answer>", ["Up", "Left"]),
    ("<answer> Down </answer> trailing", ["Down"]),
    ("<answer>Up||Down||Left</answer>", ["Up", "Down"]),  # capped at max_actions
    ("no tags at all", []), ("", []), ("<answer></answer>", []), ("<answer>|| ||</answer>", []),
    ("<answer>Up", []), ("\x00\ufffd<answer>\u2603</answer>", ["\u2603"]), ("<answer>" + "Up " * 5000, []),
])
def test_parse_answer(text, expected):
    assert envs.parse_answer(text, max_actions=2) == expected


@pytest.mark.parametrize("text, expected", [
    ("<think>x</think><action>go to desk 1</action>", ["go to desk 1"]),
    ("<action>open drawer 2</action><action>look</action>", ["open drawer 2"]),
    ("<action>  </action>", []), ("go to desk 1", []), ("<action>go to", []), ("", []),
])
def test_parse_action(text, expected):
    assert envs.parse_action(text) == expected


def test_malformed_actions_never_crash_an_environment_turn():
    junk = ["", "\x00" * 10, "\ud7ff\ufffd" * 100, "Up" * 10_000, "<answer>", "place at", "(((", "\n\n\n", "\U0001f600"]
    for name, cls in envs.GRID_ENVS.items():
        env = cls(max_steps=100)
        env.reset(1)
        for text in junk:
            _, reward, _, info = rollout.play_turn(env, envs.parse_answer(text) or [text])
            assert info["invalid_action"] and reward == -0.1, (name, text)


def test_with_coordinates_appends_the_state_estimation_of_each_observation_and_plays_the_same_game():
    plain, wrapped = envs.FrozenLake(size=5, max_steps=7), envs.WithCoordinates(envs.FrozenLake, size=5, max_steps=7)
    observation, info = wrapped.reset(3)
    assert observation == f"{plain.reset(3)[0]}\nPlayer (P) is at (0,0); goal (G) is at (4,4); holes (O) are at " + \
        ", ".join(f"({r},{c})" for r, c in np.argwhere(plain.holes)) + "."
    assert wrapped.solve() == plain.solve() and wrapped.size == 5
    for action in plain.solve()[:2]:
        expected, reward, done, _ = plain.step(action)
        observation, reward_w, done_w, info = wrapped.step(action)
        assert observation == f"{expected}\n{info['state_estimation']}" and (reward_w, done_w) == (reward, done)
    assert f"Player (P) is at ({plain.player[0]},{plain.player[1]})" in observation
