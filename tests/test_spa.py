"""SPA (spa.py): the true states written into self-play responses, the SFT loss mask, and the method end to
end from the command line. States are checked against the environment itself, stepped here."""

import json
import re

import numpy as np
import pytest
import tyro

import envs
import rollout
import spa
import train
from engine import hf

SPAN = {name: re.compile(rf"<{name}>(.*?)</{name}>", re.DOTALL) for name in ("observation", "prediction")}


def scripted_trajectories(env_class, seeds, turns=3):
    """Trajectories as a rollout records them: responses with wrong observation / prediction spans and some
    reasoning, one or two random admissible actions a turn; the first episode opens with an invalid turn,
    and a copy of it is appended (duplicates)."""
    trajectories = []
    for index, reset_seed in enumerate(seeds):
        env = env_class()
        observation, info = env.reset(reset_seed)
        rng = np.random.default_rng(reset_seed)
        trajectory = rollout.Trajectory(seed=reset_seed, group=index, task=info["task"], initial_info=info, turns=[])
        for t in range(turns):
            choices = info["admissible_actions"]
            actions = [str(choices[i]) for i in rng.integers(len(choices), size=1 + t % 2)]
            if t == 0 and index == 0:
                actions = ["Jump"]  # not an action of any grid game: an invalid turn
            text = (f"<think>I see <observation>wrong</observation> so I move "
                    f"<prediction>junk</prediction></think><answer>{' || '.join(actions)}</answer>")
            following, reward, done, info = rollout.play_turn(env, actions)
            prompt_ids = np.array([1000 + index, t], np.int32)  # one prompt per (episode, turn)
            trajectory.turns.append(rollout.Turn(
                step=t, observation=observation, prompt_ids=prompt_ids, response_ids=np.zeros(0, np.int32),
                response_logprobs=np.zeros(0), response_entropies=np.zeros(0), response_text=text, actions=actions,
                next_observation=following, next_observation_ids=np.zeros(0, np.int32), reward=reward, done=done,
                won=bool(info["won"]), invalid=bool(info["invalid_action"])))
            observation = following
            if done:
                break
        trajectories.append(trajectory)
    return trajectories + [trajectories[0]]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [envs.FrozenLake().reset(s)[0] for s in range(50)] + [envs.Sokoban().reset(s)[0] for s in range(50)]
    return hf.train_tokenizer(texts + ["<think> <observation> </observation> <prediction> </prediction> </think>"
                                       " <answer> </answer> Player (P) is at box target holes goal"], vocab_size=400)


@pytest.mark.parametrize("env_class", [envs.FrozenLake, envs.Sokoban, envs.Sudoku])
def test_substituted_spans_are_the_environments_true_states(env_class, tokenizer):
    trajectories = scripted_trajectories(env_class, seeds=[3, 11, 17])
    examples, summary = spa.self_play_examples(trajectories, env_class, tokenizer)
    assert summary["dropped_format"] >= 1 and summary["dropped_duplicate"] >= 1
    checked = set()
    for trajectory in trajectories:
        env = env_class()  # the reference: step the environment here, action by action
        env.reset(trajectory.seed)
        for turn in trajectory.turns:
            state = f"{env.render()}\n{env.state_estimation()}"
            for action in turn.actions:
                if env.step(action)[2]:
                    break
            next_state = f"{env.render()}\n{env.state_estimation()}"
            if turn.invalid:
                continue
            (index, example), = [(i, e) for i, e in enumerate(examples) if e.prompt_ids == list(turn.prompt_ids)]
            assert SPAN["observation"].search(example.text).group(1) == state
            assert SPAN["prediction"].search(example.text).group(1) == next_state
            assert example.text.endswith(f"<answer>{' || '.join(turn.actions)}</answer>")
            assert "so I move" in example.text and "wrong" not in example.text and "junk" not in example.text
            checked.add(index)
    assert len(checked) == len(examples) >= 4


def test_without_the_filters_every_turn_is_kept(tokenizer):
    trajectories = scripted_trajectories(envs.FrozenLake, seeds=[3, 11])
    examples, _ = spa.self_play_examples(trajectories, envs.FrozenLake, tokenizer,
                                         spa.SPAConfig(format_filter=False, dedupe=False))
    assert len(examples) == sum(len(t.turns) for t in trajectories)


@pytest.mark.parametrize("mask_world_model", [False, True])
def test_sft_loss_mask_covers_exactly_the_think_and_answer_spans(mask_world_model, tokenizer):
    trajectories = scripted_trajectories(envs.Sokoban, seeds=[5, 8])
    examples, _ = spa.self_play_examples(trajectories, envs.Sokoban, tokenizer)
    batch = spa.sft_batch(examples, tokenizer.pad_token_id, mask_world_model)
    tokens, loss_mask = np.asarray(batch.tokens), np.asarray(batch.loss_mask)
    for row, example in enumerate(examples):
        prompt = len(example.prompt_ids)
        assert not loss_mask[row, :prompt].any()  # the prompt (the environment's tokens) is never trained on
        assert not loss_mask[row, prompt + len(example.response_ids):].any()
        trained = tokenizer.decode(tokens[row][loss_mask[row] > 0])
        expected = example.text
        if mask_world_model:  # the ablation removes exactly the observation and prediction contents
            expected = expected.replace(example.state, "", 1).replace(example.next_state, "", 1)
        assert trained == expected + tokenizer.eos_token
        spans = re.findall(r"<(think|answer)>", trained)
        assert spans == ["think", "answer"]


def test_prediction_row_ends_at_the_prediction_tag_and_targets_the_next_state(tokenizer):
    examples, _ = spa.self_play_examples(scripted_trajectories(envs.FrozenLake, seeds=[4]), envs.FrozenLake, tokenizer)
    context, target = spa.prediction_row(examples[0])
    assert tokenizer.decode(context).endswith("<prediction>")
    assert tokenizer.decode(target) == examples[0].next_state


def test_spa_runs_end_to_end_and_its_sft_raises_next_state_prediction(tmp_path, monkeypatch, embedded_cache):
    """`--method spa` on FrozenLake (the command-line tests in tests/test_train.py run the other methods; Sokoban's
    and Sudoku's SPA states are checked above): the self-play SFT stage, then GRPO, both evaluated."""
    monkeypatch.setenv("RWML_JAX_CACHE", str(embedded_cache))
    out = tmp_path / "run"
    # 60 pretraining steps: enough for the self-play to write some well-formed SPA turns (5 of 48 when measured; 40
    # steps left 1), fewer than the other tests' 100 because no other test shares this prompt's embedded default
    argv = ["--method", "spa", "--env", "frozenlake", "--out", str(out), "--pretrain-steps", "60",
            "--pretrain-episodes", "300",
            "--spa.tasks", "4", "--spa.rollouts", "4", "--spa.max-turns", "3", "--spa.epochs", "2", "--spa.batch", "8",
            "--iterations", "1", "--groups", "2", "--group-size", "2", "--max-new-tokens", "128",
            "--eval.episodes", "2", "--eval.samples", "2", "--eval.wm-transitions", "16", "--eval.every", "100",
            "--update-tokens", "256", "--no-progress"]  # several micro-batches in every update
    train.main(tyro.cli(train.Args, args=argv))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluations = {r["stage"]: r for r in records if "eval/success" in r}  # the last evaluation of each stage
    assert list(evaluations) == ["base", "spa-sft", "grpo"]
    before, after_sft = evaluations["base"], evaluations["spa-sft"]
    assert after_sft["eval/spa_prediction_token_accuracy"] > before["eval/spa_prediction_token_accuracy"]
    assert after_sft["eval/spa_prediction_accuracy"] >= before["eval/spa_prediction_accuracy"]
    assert {"eval/pass@1", "eval/pass@2"} <= set(evaluations["grpo"])
    assert "<prediction>" in json.loads((out / "stage0-spa-examples.json").read_text())["examples"][0]["text"]
