"""Arbitrary model output never breaks a parser, an environment or the rollout loop, and is scored by the rules.

Property-based (hypothesis): the text a model may write is random bytes decoded with replacement, any unicode,
very long text, and the tags the parsers look for, unclosed, repeated, nested or empty, mixed with real actions.
Each parser is checked against a re-derivation written here with str.find (not the module's regular expressions),
and each environment against its own list of admissible actions.
"""

import os
import re

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import envs
import reward
import rollout
import sampler
import spa

# CI runs the same examples every time (a failure there is reproducible); a local run explores new ones
FUZZ = settings(max_examples=150, deadline=None, database=None, derandomize=bool(os.environ.get("CI")),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

TAGS = ["<answer>", "</answer>", "<action>", "</action>", "<next_state>", "</next_state>", "<think>", "</think>",
        "<observation>", "</observation>", "<prediction>", "</prediction>", "<", ">", "</", "||", " || "]
FRAGMENTS = ["Up", "up", " DOWN ", "Left", "right", "place 1 at (0, 2)", "PLACE 04 at(1,0)", "3 at (2, 1)",
             "place 9 at (9, 9)", "place 0 at (0, 0)", "go to desk 1", "look", " ", "\n", "\t", "\u00a0", "\u2003",
             "\x00", "\ufffd", "\U0001f600", "\u0663", "0" * 12 + "1", "1" * 5000]

numbers = st.one_of(st.integers(0, 9).map(str), st.sampled_from(["01", "\u0663", "\uff11", "-1", "1.0", ""]),
                    # digit runs around the limits: 9-10 digits, and Python's int() refusing over 4,300
                    st.tuples(st.sampled_from("0123456789"), st.sampled_from([2, 9, 10, 4300, 4301, 6000])).map(
                        lambda x: x[0] * x[1]))
placements = st.tuples(st.sampled_from(["place ", "PLACE", "", "put "]), numbers, numbers, numbers).map(
    lambda x: f"{x[0]}{x[1]} at ({x[2]}, {x[3]})")
random_bytes = st.binary(max_size=300).map(lambda data: data.decode("utf-8", errors="replace"))
tagged = st.lists(st.one_of(st.sampled_from(TAGS), st.sampled_from(FRAGMENTS), placements, st.text(max_size=8)),
                  max_size=24).map("".join)
very_long = st.tuples(st.one_of(st.sampled_from(TAGS + FRAGMENTS[:-1]), st.text(max_size=10)),
                      st.integers(0, 4000)).map(lambda x: x[0] * x[1])
model_output = st.one_of(st.text(max_size=200), random_bytes, tagged, placements, very_long, st.just(""))
action_like = st.one_of(placements, st.sampled_from(FRAGMENTS), tagged, model_output)  # what an environment is sent


# ---- re-derivations of the parsers, with str.find ----

def between(text: str, opening: str, closing: str) -> str | None:
    """What lies between the first `opening` and the first `closing` after it; None if either is missing."""
    start = text.find(opening)
    end = text.find(closing, start + len(opening)) if start >= 0 else -1
    return text[start + len(opening):end] if end >= 0 else None


def expected_answer(text: str, max_actions: int) -> list[str]:
    inside = between(text, "<answer>", "</answer>")
    return [] if inside is None else [a.strip() for a in inside.split("||") if a.strip()][:max_actions]


def expected_tag(text: str, tag: str, block: str) -> str | None:
    opening, closing = f"<{tag}>", f"</{tag}>"
    if block == "one":
        if text.count(opening) != 1 or text.count(closing) != 1:
            return None
        inside = between(text, opening, closing)
        return inside.strip() or None if inside is not None else None
    if opening not in text:  # "last": what follows the last opening tag, up to the last closing tag within it
        return None
    after = text.split(opening)[-1]
    return after.rsplit(closing, 1)[0].strip() or None if closing in after else None


@FUZZ
@given(model_output, st.integers(1, 12))
def test_grid_answers_parse_as_the_first_answer_tag_split_on_bars(text, max_actions):
    actions = envs.parse_answer(text, max_actions)
    assert actions == expected_answer(text, max_actions)
    assert all(a and a == a.strip() and "||" not in a for a in actions)


@FUZZ
@given(model_output)
def test_alfworld_action_is_the_first_action_tag(text):
    inside = between(text, "<action>", "</action>")
    assert envs.parse_action(text) == ([inside.strip()] if inside is not None and inside.strip() else [])


@FUZZ
@given(model_output, st.sampled_from(["next_state", "observation", "prediction"]), st.sampled_from(reward.BLOCKS))
def test_next_state_extraction_takes_the_last_or_the_only_closed_nonempty_block(text, tag, block):
    assert reward.extract_tag(text, tag, block) == expected_tag(text, tag, block)


class CharacterCounts:
    """A deterministic stand-in embedder: each text's counts of a few characters (plus one), as a unit vector."""

    def embed(self, texts, max_tokens=None):  # uncut: a fuzzed prediction's characters all count
        vectors = np.array([[1.0 + t.count(c) for c in "aeiou <>/_"] for t in texts], np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    embed_queries = embed  # no instructions: a query is a document


@FUZZ
@given(st.lists(model_output, min_size=1, max_size=4), st.sampled_from(["S . G", "You see a desk 1."]))
def test_world_model_rewards_score_output_without_a_prediction_zero(responses, target):
    targets = [target] * len(responses)
    rewards, distances = reward.next_state_rewards(responses, targets, CharacterCounts(), tau_d=0.5)
    rouge = reward.rouge_rewards(responses, targets)
    for response, r, d, q in zip(responses, rewards, distances, rouge):
        assert r in (0.0, 1.0) and 0.0 <= q <= 1.0 and np.isfinite(d)
        if expected_tag(response, "next_state", "last") is None:
            assert r == 0.0 and d == 1.0 and q == 0.0


@FUZZ
@given(model_output)
def test_spa_keeps_only_the_reasoning_from_any_output(text):
    reasoning = spa.own_reasoning(text)
    assert reasoning == " ".join(reasoning.split())
    assert "<observation>" not in reasoning and "<prediction>" not in reasoning


# ---- every environment scores each action by its own admissible list ----

def canonical(action: str, game: str) -> str:
    """An action as the admissible list writes it, for comparing: lower case; for Sudoku, no whitespace, no
    leading zeros and the optional 'place' put back."""
    if game != "sudoku":
        return action.strip().lower()
    text = re.sub(r"(?<![0-9])0+(?=[0-9])", "", "".join(action.lower().split()))
    return text if text.startswith("place") else "place" + text


@FUZZ
@given(st.sampled_from(sorted(envs.GRID_ENVS)), st.integers(0, 50), action_like)
@example("sudoku", 0, "place " + "1" * 4301 + " at (0, 2)")  # found by this test: int() refused 4,301 digits
def test_grid_environments_take_an_action_exactly_when_it_is_admissible(game, seed, text):
    env = envs.GRID_ENVS[game](max_steps=100)
    observation, info = env.reset(seed)
    actions = envs.parse_answer(text) or [text]  # the parsed actions, else the raw text sent as one action
    for action in actions:
        admissible = {canonical(a, game) for a in info["admissible_actions"]}
        before = observation
        observation, step_reward, done, info = env.step(action)
        assert info["invalid_action"] == (canonical(action, game) not in admissible), action
        if info["invalid_action"]:  # an invalid action costs the penalty and changes nothing
            assert step_reward == -0.1 and observation == before and not info["won"]
        if done:
            break


@FUZZ
@given(st.sampled_from(sorted(envs.GRID_ENVS)), model_output)
def test_a_turn_of_inadmissible_actions_costs_each_its_penalty_and_no_action_is_one(game, text):
    env = envs.GRID_ENVS[game](max_steps=100)
    before, info = env.reset(0)
    admissible = {canonical(a, game) for a in info["admissible_actions"]}
    actions = [a for a in envs.parse_answer(text) if canonical(a, game) not in admissible]
    observation, total, _, info = rollout.play_turn(env, actions)
    assert info["invalid_action"] and total == pytest.approx(-0.1 * max(1, len(actions)))
    assert observation == before


def test_alfworld_takes_any_text_as_a_command_and_scores_it_by_its_admissible_commands(alfworld_data):
    env = envs.AlfWorld("valid_seen", data_root=alfworld_data, max_steps=10_000)
    _, info = env.reset(0)

    @settings(FUZZ, max_examples=40)
    @given(model_output)
    def check(text):
        nonlocal info
        actions = envs.parse_action(text) or [text]
        admissible = info["admissible_actions"]
        _, step_reward, done, info = env.step(actions[0])
        assert info["invalid_action"] == (actions[0].strip() not in admissible)
        if info["invalid_action"]:
            assert step_reward == pytest.approx(-0.1 + 10.0 * info["won"])
        assert not done

    check()


# ---- the rollout loop with a scripted policy ----

@pytest.fixture(scope="module")
def lake_tokenizer():
    from engine import hf

    texts = [envs.FrozenLake().reset(s)[0] for s in range(10)] + [envs.FrozenLake.rules, *FRAGMENTS[:12], *TAGS]
    return hf.train_tokenizer(texts, vocab_size=300)


def scripted(scripts: list[list[int]], stop_ids: list[int]):
    """A stand-in for sampler.generate that answers each call's rows with the next scripts, as the sampler
    would: cut to max_new_tokens, pad id after the first stop token, mask up to and including it."""
    calls = iter(range(10**6))

    def generate(params, config, prompts, key, sampling, stop_token_ids, pad_token_id):
        call, width = next(calls), sampling.max_new_tokens
        tokens = np.full((len(prompts), width), pad_token_id, np.int32)
        mask = np.zeros((len(prompts), width), bool)
        for row in range(len(prompts)):
            ids = scripts[(call * len(prompts) + row) % len(scripts)][:width]
            stop = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids) - 1)
            tokens[row, :stop + 1], mask[row, :stop + 1] = ids[:stop + 1], True
        zeros = np.zeros((len(prompts), width), np.float32)
        prompt = np.zeros((len(prompts), 1), np.int32)
        return sampler.Completion(prompt, prompt.astype(bool), tokens, zeros - 1.0, zeros, mask)

    return generate


@settings(FUZZ, max_examples=40)
@given(st.data())
def test_the_rollout_loop_plays_any_output_and_scores_what_it_could_not_parse_invalid(lake_tokenizer, monkeypatch,
                                                                                         data):
    tokenizer = lake_tokenizer
    vocabulary = len(tokenizer)
    as_text = model_output.map(lambda text: tokenizer.encode(text, add_special_tokens=False))
    as_ids = st.lists(st.integers(0, vocabulary - 1), max_size=40)  # what a random model samples, specials too
    scripts = data.draw(st.lists(st.one_of(as_text, as_ids).filter(len), min_size=1, max_size=8))
    stop_ids = [tokenizer.eos_token_id]
    monkeypatch.setattr(sampler, "generate", scripted(scripts, stop_ids))
    config = type("Config", (), {"eos_token_ids": tuple(stop_ids), "max_position_embeddings": 32768})()
    batch = rollout.EnvBatch(lambda: envs.FrozenLake(max_steps=100), 4)  # 3 turns of up to 10 actions never run out
    trajectories = rollout.rollout(None, config, tokenizer, batch, [0, 1], 2, jax.random.key(0),
                                   prompt=envs.grid_prompt(envs.FrozenLake.rules), parse=envs.parse_answer, max_turns=3,
                                   sampling=sampler.SamplingParams(1.0, max_new_tokens=64))
    for trajectory in trajectories:
        assert 1 <= len(trajectory.turns) <= 3
        for turn in trajectory.turns:
            assert turn.response_text == tokenizer.decode(turn.response_ids, skip_special_tokens=True)
            assert turn.actions == envs.parse_answer(turn.response_text)
            if not any(a.strip().lower() in ("up", "down", "left", "right") for a in turn.actions):
                assert turn.invalid and turn.reward == pytest.approx(-0.1 * max(1, len(turn.actions)))
                assert turn.next_observation == turn.observation and not turn.won
