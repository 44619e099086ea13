"""Replay every tau2-bench task's gold actions through the project's adapter (envs.Tau2) and tau2's evaluators.

    python study/benchmarks/tau2_gold.py                      # retail, airline, telecom (solo): ~4 minutes on 2 cores
    python study/benchmarks/tau2_gold.py --envs tau2-airline --workers 1

For each task of the domain (train and test splits together), two conversations:
  gold       the agent sends envs.tau2.gold_actions (each gold tool call, a request to confirm before a write, the
             information to communicate, a closing; telecom solo: the phone's actions done by the agent, then `done`)
             against the ScriptedUser. Every one must end with tau2's reward 1.
  last cut   the same without the last gold action. Its database reward (tau2's EnvironmentEvaluator on the adapter's
             messages) must equal that of tau2's own replay: the gold actions but the last, called straight on a
             tau2 environment (the customer's actions as the customer's), no adapter in between.
"""

import argparse
import multiprocessing
import time

from envs import tau2

ENVIRONMENTS: dict[str, tau2.Tau2] = {}


def own_replay_db_reward(env: tau2.Tau2, task) -> float:
    """The database reward of a trajectory built directly on tau2: each gold action but the last through a fresh
    environment's get_response, by its own requestor (solo off), then tau2's EnvironmentEvaluator."""
    message, _, (environment_evaluator, _, _) = tau2.import_tau2()
    environment = env.domain.environment()
    initial = task.initial_state
    environment.set_state(initialization_data=initial.initialization_data if initial else None,
                          initialization_actions=initial.initialization_actions if initial else None, message_history=[])
    messages = []
    for index, action in enumerate((task.evaluation_criteria.actions or [])[:-1]):
        call = message.ToolCall(id=f"gold_{index}", name=action.name, arguments=dict(action.arguments),
                                requestor=action.requestor)
        sender = message.UserMessage if action.requestor == "user" else message.AssistantMessage
        messages += [sender(role=action.requestor, tool_calls=[call]), environment.get_response(call)]
    return environment_evaluator.calculate_reward(environment_constructor=env.domain.environment, task=task,
                                                  full_trajectory=messages, solo_mode=False).db_check.db_reward


def check(item: tuple[str, int]) -> tuple[str, float, float, float, int]:
    """(task id, gold reward, the adapter's last-cut DB reward, tau2's own last-cut DB reward, gold turns)."""
    name, index = item
    if name not in ENVIRONMENTS:
        ENVIRONMENTS[name] = tau2.Tau2(name, split="base", max_steps=100)
    env = ENVIRONMENTS[name]
    _, (environment_evaluator, _, _) = tau2.import_tau2()[1:]
    steps, gold = tau2.play_gold(env, index)
    tau2.play_gold(env, index, drop_last=True)
    cut = environment_evaluator.calculate_reward(environment_constructor=env.domain.environment, task=env.task,
                                                 full_trajectory=env.messages, solo_mode=env.solo).db_check.db_reward
    return env.task.id, gold, cut, own_replay_db_reward(env, env.task), len(steps)


def replay(name: str, workers: int) -> None:
    count = len(tau2.Tau2(name, split="base").tasks)
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        results = pool.map(check, [(name, i) for i in range(count)], chunksize=4)
    seconds = time.perf_counter() - start
    won = sum(gold == 1.0 for _, gold, _, _, _ in results)
    zero_own = sum(own == 0.0 for *_, own, _ in results)
    agree = sum(cut == own for _, _, cut, own, _ in results)
    turns = sum(t for *_, t in results) / count
    print(f"{name}: gold {won}/{count} reward 1 ({turns:.1f} turns on average); last gold action cut: DB reward 0 "
          f"in tau2's own replay {zero_own}/{count}, the adapter's equal to it {agree}/{count}; {seconds:.0f} s with "
          f"{workers} workers")
    for task_id, gold, cut, own, _ in results:
        if gold != 1.0 or cut != own:
            print(f"   task {task_id}: gold {gold}, cut {cut} (tau2's own {own})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=list(tau2.TAU2_ENVS))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(f"load {open('/proc/loadavg').read().split()[0]}")
    for env_name in args.envs:
        replay(env_name, args.workers)
