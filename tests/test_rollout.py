"""The rollout loop: the exact ids and log-probs it records, its groups, and the transitions it gives."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import tiny_command_policy, recording

import envs
import model as lm
import rollout
import sampler

ANSWERS = [f"<answer>{a}</answer>" for a in ("Up", "Down", "Left", "Right", "Up || Right", "Down || Left")]


RecordingLake = recording(envs.FrozenLake)


@pytest.fixture(scope="module")
def tiny_policy():
    """A random tiny Qwen2 whose tokenizer has whole answers as tokens, so its near-uniform random play
    sends real actions (6 of ~300 tokens: about one turn in five)."""
    texts = [envs.FrozenLake().reset(s)[0] for s in range(30)] + [envs.FrozenLake.rules]
    config, tokenizer = tiny_command_policy(texts, ANSWERS)
    return lm.init_params(config, jax.random.key(0)), config, tokenizer


def play_lake(tiny_policy, groups=3, group_size=4, max_turns=4):
    params, config, tokenizer = tiny_policy
    batch = rollout.EnvBatch(RecordingLake, groups * group_size)
    trajectories = rollout.rollout(params, config, tokenizer, batch, list(range(groups)), group_size, jax.random.key(0),
                                   prompt=envs.grid_prompt(envs.FrozenLake.rules), parse=envs.parse_answer,
                                   max_turns=max_turns, sampling=sampler.SamplingParams(1.0, max_new_tokens=12))
    return trajectories, batch


def test_recorded_action_ids_decode_to_exactly_the_actions_sent(tiny_policy):
    params, config, tokenizer = tiny_policy
    trajectories, batch = play_lake(tiny_policy)
    sent_any = 0
    for trajectory, env in zip(trajectories, batch.environments):
        sent = []
        for turn in trajectory.turns:
            decoded = tokenizer.decode(turn.response_ids, skip_special_tokens=True)
            assert decoded == turn.response_text
            actions = envs.parse_answer(decoded)
            assert actions == turn.actions
            sent.extend(actions or [""])
            sent_any += len(actions)
        assert env.received[: len(sent)] == sent[: len(env.received)]
    assert sent_any > 5  # random play did send real actions


def test_recorded_logprobs_equal_teacher_forced_logprobs(tiny_policy):
    params, config, _ = tiny_policy
    trajectories, _ = play_lake(tiny_policy, groups=2, group_size=2, max_turns=2)
    teacher_forced = jax.jit(lm.token_logprobs, static_argnames=("config", "chunk_size"))
    for turn in (t for trajectory in trajectories for t in trajectory.turns):
        sequence = np.concatenate([turn.prompt_ids, turn.response_ids])
        end, start = len(sequence), len(turn.prompt_ids)
        padded = np.zeros((1, 512), np.int32)  # right padding: one compilation, no effect on earlier tokens
        padded[0, :end] = sequence
        logprobs, entropies = teacher_forced(params, config, padded, (np.arange(512) < end)[None], chunk_size=64)
        np.testing.assert_allclose(turn.response_logprobs, logprobs[0, start:end], atol=1e-4)
        np.testing.assert_allclose(turn.response_entropies, entropies[0, start:end], atol=1e-4)


def test_groups_share_their_start_and_finished_games_stop(tiny_policy):
    trajectories, _ = play_lake(tiny_policy, groups=3, group_size=4, max_turns=6)
    for group in range(3):
        members = [t for t in trajectories if t.group == group]
        assert len(members) == 4 and len({m.turns[0].observation for m in members}) == 1
    for trajectory in trajectories:
        assert all(not t.done for t in trajectory.turns[:-1])  # nothing is played after done
        assert trajectory.turns[-1].done or len(trajectory.turns) == 6


def test_transitions_carry_the_history_window(tiny_policy):
    trajectories, _ = play_lake(tiny_policy, max_turns=4)
    records = rollout.transitions(trajectories, history=2)
    assert len(records) == sum(len(t.turns) for t in trajectories)
    for record in records:
        turns = trajectories[record.trajectory].turns
        assert record.state == turns[record.turn].observation and record.next_state == turns[record.turn].next_observation
        assert len(record.history) == min(record.turn, 2)
        if record.turn:
            assert record.history[-1][0] == turns[record.turn - 1].observation


def test_an_episode_whose_next_prompt_would_pass_the_context_ends_before_that_turn(tiny_policy):
    """A context that holds the first turn's prompt and max_new_tokens, not the second's (its history is longer):
    every episode plays the same first turn as without the limit, then ends there, marked context_full, unless its
    first turn finished it."""
    params, config, tokenizer = tiny_policy
    unlimited, _ = play_lake(tiny_policy, groups=1, group_size=4, max_turns=3)
    (first,) = {len(t.turns[0].prompt_ids) for t in unlimited}  # one group: one first prompt
    assert all(len(t.turns[1].prompt_ids) > first for t in unlimited if len(t.turns) > 1)
    short = dataclasses.replace(config, max_position_embeddings=first + 12)
    batch = rollout.EnvBatch(RecordingLake, 4)
    limited = rollout.rollout(params, short, tokenizer, batch, [0], 4, jax.random.key(0),
                              prompt=envs.grid_prompt(envs.FrozenLake.rules), parse=envs.parse_answer, max_turns=3,
                              sampling=sampler.SamplingParams(1.0, max_new_tokens=12))
    for whole, cut in zip(unlimited, limited):
        assert len(cut.turns) == 1
        np.testing.assert_array_equal(cut.turns[0].response_ids, whole.turns[0].response_ids)
        assert cut.context_full == (not cut.turns[0].done) and not whole.context_full
    assert rollout.episode_stats(limited)["context_full"] == np.mean([not t.turns[0].done for t in limited])
    assert any(t.context_full for t in limited)
