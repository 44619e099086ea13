"""ALFWorld through envs.AlfWorld: the real games and the alfworld package's own wrappers."""

import functools

import jax
import numpy as np
import pytest
from conftest import tiny_command_policy, recording

import envs
import model as lm
import rollout
import sampler

# CI replays a stated sample: the first game of each task type in each evaluation split (12 games).
# benchmarks/alfworld_walkthroughs.py replays all 140 + 134.


def sample(split, data_root):
    picked = []
    for task_type in envs.ALFWORLD_TASK_TYPES:
        picked.append(envs.alfworld_games(split, data_root, [task_type])[0])
    return picked


@pytest.mark.parametrize("split", ["valid_seen", "valid_unseen"])
def test_walkthroughs_win_a_sample_of_each_task_type(alfworld_data, split):
    games = envs.alfworld_games(split, alfworld_data)
    assert len(games) == {"valid_seen": 140, "valid_unseen": 134}[split]
    chosen = sample(split, alfworld_data)
    seeds = [games.index(game) for game in chosen]
    make = functools.partial(envs.AlfWorld, split, alfworld_data)
    with rollout.EnvBatch(make, len(seeds), workers=2) as batch:  # worker processes, as in training
        starts = batch.reset(seeds)
        plans = [envs.alfworld_walkthrough(game) for game in chosen]
        for (observation, info), game in zip(starts, chosen):
            assert info["gamefile"] == str(game) and "Your task is to: " in observation and info["admissible_actions"]
        results = {}
        for step in range(max(map(len, plans))):
            moves = {i: [plan[step]] for i, plan in enumerate(plans) if step < len(plan)}
            for i, result in batch.play(moves).items():
                assert not result[3]["invalid_action"], (chosen[i], plans[i][step])
                results[i] = result
    for i, (_, reward, done, info) in results.items():
        assert done and info["won"] and reward == 10.0, chosen[i]


def test_an_invalid_action_keeps_the_game_going_with_the_penalty(alfworld_data):
    env = envs.AlfWorld("valid_seen", alfworld_data, invalid_penalty=-0.25)
    env.reset(0)
    for junk in ["fly to the moon", "", "GO TO DESK 1", "<action>look</action>", "\u2603" * 50]:
        observation, reward, done, info = env.step(junk)
        assert observation == "Nothing happens." and reward == -0.25 and not done and info["invalid_action"]
    for action in envs.alfworld_walkthrough(env.game):  # and the game can still be won
        _, reward, done, info = env.step(action)
    assert info["won"] and reward == 10.0


def test_step_limit_ends_the_episode(alfworld_data):
    env = envs.AlfWorld("valid_unseen", alfworld_data, max_steps=2)
    env.reset(3)
    assert [env.step("look")[2] for _ in range(2)] == [False, True]


def test_task_type_filter_and_a_clear_message_for_missing_data(alfworld_data, tmp_path):
    games = envs.alfworld_games("valid_seen", alfworld_data, ["pick_two_obj_and_place"])
    assert games and all(g.parent.parent.name.startswith("pick_two_obj_and_place") for g in games)
    with pytest.raises(FileNotFoundError, match=r"alfworld-download.*ALFWORLD_DATA"):
        envs.alfworld_games("valid_seen", tmp_path)
    with pytest.raises(ValueError, match="task types"):
        envs.alfworld_games("valid_seen", alfworld_data, ["juggle"])


RecordingAlfWorld = recording(envs.AlfWorld)


COMMANDS = ["<action>look</action>", "<action>inventory</action>", "<action>go to desk 1</action>"]


def test_rollout_with_a_tiny_random_model_records_what_the_games_received(alfworld_data):
    games = envs.alfworld_games("valid_seen", alfworld_data)[:2]
    texts = [envs.AlfWorld("valid_seen", alfworld_data).reset(i)[0] for i in range(2)]
    config, tokenizer = tiny_command_policy(texts, COMMANDS, num_layers=1, vocab_size=400)
    params = lm.init_params(config, jax.random.key(1))
    batch = rollout.EnvBatch(functools.partial(RecordingAlfWorld, "valid_seen", alfworld_data), 4)
    trajectories = rollout.rollout(params, config, tokenizer, batch, [0, 1], 2, jax.random.key(0),
                                   prompt=envs.alfworld_prompt, parse=envs.parse_action, max_turns=3,
                                   sampling=sampler.SamplingParams(1.0, max_new_tokens=24))
    teacher_forced = jax.jit(lm.token_logprobs, static_argnames=("config", "chunk_size"))
    for trajectory, env in zip(trajectories, batch.environments):
        assert env.game == str(games[trajectory.seed])
        sent = [(envs.parse_action(tokenizer.decode(t.response_ids, skip_special_tokens=True)) or [""])[0]
                for t in trajectory.turns]
        assert env.received == sent and [t.actions for t in trajectory.turns] == [[a] if a else [] for a in sent]
        for turn in trajectory.turns:
            sequence = np.concatenate([turn.prompt_ids, turn.response_ids])
            assert "Your admissible actions" in tokenizer.decode(turn.prompt_ids)
            padded = np.zeros((1, 4096), np.int32)
            padded[0, :len(sequence)] = sequence
            logprobs, _ = teacher_forced(params, config, padded, (np.arange(4096) < len(sequence))[None], chunk_size=256)
            np.testing.assert_allclose(turn.response_logprobs, logprobs[0, len(turn.prompt_ids):len(sequence)], atol=1e-4)
            assert turn.next_observation == tokenizer.decode(turn.next_observation_ids)
