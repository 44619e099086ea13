"""The LLM-judge reward, the RWML paper's ablation (methods.md section 2.8): its answer parsing against answers built
with a known score, its rubric prompt, a judge loaded from a saved tiny checkpoint and run end to end against the
project's sampler called prompt by prompt, and the command line's refusals.

The rule for an answer (reward.judge_score): exactly one JSON object, text around it ignored; its "score" a JSON number
in [0, 1]. Several objects, a score outside [0, 1] (not clipped), a string, a boolean, NaN or infinity: no score.
"""

import json
import math
import os
import sys

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import reward
import rollout
import rwml
import sampler
import train

FUZZ = settings(max_examples=200, deadline=None, database=None, derandomize=bool(os.environ.get("CI")),
                suppress_health_check=[HealthCheck.too_slow])

# text a judge may write around its object: anything without braces (an object can only start at a "{")
around = st.text(st.characters(blacklist_characters="{}", blacklist_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["", "<json>", "</json>", "```json\n", "\n```", "Here is my grade: ", " score: 1 ", '"score": 0.5'])
scores = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.integers(-3, 3),
                   st.sampled_from([0, 1, 0.0, 1.0, 0.5, -0.0, 1.0000001, -1e-9, True, False]), st.none(),
                   st.text(max_size=5), st.sampled_from(["0.5", "1"]), st.lists(st.floats(0, 1), max_size=2))
extra = st.dictionaries(st.sampled_from(["coverage", "specificity", "confidence", "status", "note"]),
                        st.one_of(st.floats(0, 1), st.text(max_size=8), st.dictionaries(st.text(max_size=3),
                                                                                       st.integers(), max_size=2)))
objects = st.tuples(extra, st.booleans(), scores).map(lambda x: {**x[0], **({"score": x[2]} if x[1] else {})})


def expected_score(parts: list) -> float | None:
    """The score the rule gives an answer made of these objects (the text around them has no braces)."""
    if len(parts) != 1 or "score" not in parts[0]:
        return None
    score = parts[0]["score"]
    if type(score) not in (int, float) or not math.isfinite(score) or not 0 <= score <= 1:
        return None
    return float(score)


@FUZZ
@given(st.lists(objects, max_size=3), st.lists(around, min_size=4, max_size=4))
@example([{"score": 1}], ["", "", "", ""])
@example([{"score": 0.7, "coverage": {"score": 1}}], ["<json>", "", "", "</json>"])
@example([{"score": 7}], ["", "", "", ""])
@example([{"score": 0.5}, {"score": 0.5}], ["", " ", "", ""])
def test_a_judge_answer_scores_only_as_one_object_with_a_number_in_the_unit_interval(parts, texts):
    answer = texts[0] + "".join(json.dumps(part) + text for part, text in zip(parts, texts[1:]))
    assert reward.judge_score(answer) == expected_score(parts)


@FUZZ
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("utf-8", "replace"))
       | st.lists(st.sampled_from(['{', '}', '"score"', ':', '1', '0.5', '[', ']', ',', '"', 'NaN', '1e999', ' ',
                                   '<json>', 'true', '9' * 5000]), max_size=40).map("".join))
@example("{" * 100_000)
@example('{"score": ' + "9" * 5000 + "}")
def test_judge_score_never_raises_and_is_none_or_in_the_unit_interval(answer):
    score = reward.judge_score(answer)
    assert score is None or (isinstance(score, float) and 0 <= score <= 1)


def test_the_rubric_prompt_holds_the_triplet_the_prediction_and_the_four_criteria():
    prompt = reward.judge_prompt("put a mug in the sink", "You are in the kitchen.", "go to sink 1",
                                 "You arrive at sink 1.", "You arrive at sink 1. On the sink 1, you see a mug 2.")
    for piece in ("The agent's task: put a mug in the sink", "The observation: You are in the kitchen.",
                  "The agent's action: go to sink 1", "The predicted next observation: You arrive at sink 1.\n",
                  "The actual next observation: You arrive at sink 1. On the sink 1, you see a mug 2."):
        assert piece in prompt
    for criterion in ("Coverage", "Specificity", "Confidence", "Task status"):
        assert f"{criterion}, up to" in prompt
    assert "vague" in prompt and "completed, not yet completed or failed" in prompt
    assert "JSON object" in prompt and '"score": <their sum>}' in prompt and "from 0 to 1" in prompt


ANSWERS = {'{"score": 1}': 1.0, '{"score": 0.5}': 0.5, '{"score": 0}': 0.0, '{"score": 2}': None, "no grade": None}


def test_a_judge_from_a_saved_checkpoint_scores_each_prediction_and_counts_parse_failures(tmp_path):
    """A tiny random judge whose tokenizer holds whole answers, loaded as --judge-model loads it and sampled for one
    token: each prediction's reward is the score of the answer the project's sampler gives its prompt alone (greedy),
    0 for an answer with none, counted; a response without a prediction is not judged. The logs hold the judge's mean
    score, the failures and the baseline's mean reward."""
    import model as lm
    from conftest import tiny_command_policy
    from engine import hf, setup, sharding

    triplets = [rollout.Transition(task="reach the goal", history=(), state=f"state {i}", action=a,
                                   next_state=f"state {i} after {a}", reward=0.0, invalid=False,
                                   trajectory=i, turn=0, group=i)
                for i, a in enumerate(["Up", "Down", "Left", "Right", "Up", "Down"])]
    responses = [f"<think> </think> <next_state> {guess} </next_state>"
                 for t in triplets for guess in (t.next_state, "the player moves", f"{t.state} again")]
    responses[4] = "no prediction here"
    config, tokenizer = tiny_command_policy([reward.judge_prompt("reach the goal", "s", "a", "p", "q")], list(ANSWERS))
    params = lm.init_params(config, jax.random.key(1))
    hf.save_checkpoint(tmp_path / "judge", config, params, tokenizer)
    tokenizer = hf.load_tokenizer(tmp_path / "judge")  # as the judge reads: it may split a prompt otherwise
    # a random model says much the same to every prompt: two answers take the places (tied embeddings, a little longer)
    # of the two tokens it picks most, so that it answers some prompts with a score and some without
    prompts = [rollout.encode_prompt(tokenizer, reward.judge_prompt(t.task, t.state, t.action, reward.extract_tag(r) or "",
                                                                    t.next_state))
               for r, t in zip(responses, [t for t in triplets for _ in range(3)])]
    first = sampler.generate(params, config, prompts, jax.random.key(0), sampler.SamplingParams(0.0, max_new_tokens=1),
                             stop_token_ids=sampler.stop_token_ids(tokenizer, config), pad_token_id=tokenizer.pad_token_id)
    picked, counts = np.unique(np.asarray(first.tokens[:, 0]), return_counts=True)
    embedding = params["embed"]["embedding"]
    for answer, token in zip(['{"score": 0.5}', "no grade"], picked[np.argsort(-counts)]):
        embedding = embedding.at[tokenizer.convert_tokens_to_ids(answer)].set(1.5 * embedding[token])
    params["embed"]["embedding"] = embedding
    hf.save_checkpoint(tmp_path / "judge", config, params)
    args = train.settle(train.Args(method="rwml", wm_reward="judge", judge_model=str(tmp_path / "judge"),
                                   out=str(tmp_path / "run")))
    judge = setup.load_judge(args, sharding.make_mesh())._replace(
        sampling=sampler.SamplingParams(0.0, max_new_tokens=1), batch_size=4)
    exact = lambda texts, targets: (np.array([float(reward.extract_tag(x) == y) for x, y in zip(texts, targets)],
                                             np.float32), np.zeros(len(texts), np.float32))
    logged = {}
    rewards, distances = rwml.score_texts(responses, triplets, 3, rwml.judge_scorer(judge, baseline=exact), logged)

    expected, failures = [], 0
    for response, triplet in zip(responses, [t for t in triplets for _ in range(3)]):
        prediction = reward.extract_tag(response)
        if prediction is None:
            expected.append(0.0)
            continue
        prompt = reward.judge_prompt(triplet.task, triplet.state, triplet.action, prediction, triplet.next_state)
        ids = rollout.encode_prompt(tokenizer, prompt)
        out = sampler.generate(judge.params, config, [ids], jax.random.key(9), sampler.SamplingParams(0.0, max_new_tokens=1),
                               stop_token_ids=sampler.stop_token_ids(tokenizer, config), pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(np.asarray(out.tokens[0])[np.asarray(out.mask[0])], skip_special_tokens=True)
        score = ANSWERS.get(answer)
        failures += score is None
        expected.append(score or 0.0)
    np.testing.assert_allclose(rewards, expected)
    np.testing.assert_allclose(distances, 1.0 - np.asarray(expected))
    assert 0.5 in expected and 0 < failures < len(responses) - 1  # this seed's judge answers some prompts with a score, some without
    assert logged == {"judge_score": pytest.approx(np.mean(expected)), "judge_parse_failures": failures,
                      "cosine_reward": pytest.approx(np.mean([1.0 if i % 3 == 0 else 0.0 for i in range(18)]))}


def test_a_triplet_scorer_serves_the_scorers_by_kind_and_keeps_its_penalties():
    """tau2-bench's dict of scorers by kind takes a TripletScorer beside a plain Scorer: each reads its own rows
    (the TripletScorer the whole triplets), its logs get the kind's name; the penalties keep it a TripletScorer."""
    tool = rollout.Transition("t", (), "s", "call", "{}", 0.0, False, 0, 0, 0, kind="tool")
    user = rollout.Transition("t", (), "s", "hello", "hi there", 0.0, False, 0, 1, 0, kind="user")
    seen = []

    def by_action(responses, triplets):
        seen.extend(t.action for t in triplets)
        return np.full(len(responses), 0.5, np.float32), np.full(len(responses), 0.5, np.float32), {"judged": 1.0}

    scorer = {"tool": lambda r, t: (np.ones(len(r), np.float32), np.zeros(len(r), np.float32)),
              "user": rwml.TripletScorer(by_action)}
    logged = {}
    rewards, distances = rwml.score_texts(["a", "b", "c", "d"], [tool, user], 2, scorer, logged)
    assert rewards.tolist() == [1, 1, 0.5, 0.5] and distances.tolist() == [0, 0, 0.5, 0.5]
    assert seen == ["hello", "hello"] and logged == {"judged_user": 1.0}
    penalised = rwml.penalised_scorer(rwml.TripletScorer(by_action), lambda text: len(text.split()), no_thinking=0.1)
    assert isinstance(penalised, rwml.TripletScorer)
    assert penalised.score(["<think> x </think>"], [user])[0].tolist() == pytest.approx([0.4])


@pytest.mark.parametrize("flags, message", [
    (["--method", "rwml", "--wm-reward", "judge"], "--wm-reward judge needs the judge"),
    (["--method", "rwml", "--judge-model", "some/judge"], "--judge-model some/judge is the judge of --wm-reward judge"),
    (["--method", "grpo", "--wm-reward", "judge", "--judge-model", "some/judge"], "has no RWML stage"),
    (["--method", "wm-sft", "--judge-model", "some/judge"], "has no RWML stage"),
    (["--method", "rwml", "--wm-reward", "judge", "--judge-model", "/nowhere/judge"], "--judge-model /nowhere/judge"),
])
def test_a_judge_without_its_counterpart_or_without_rwml_is_refused(flags, message, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setenv("RWML_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["train.py", *flags, "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        train.cli()
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "cache").exists()
