"""Replay every game's stored expert walkthrough through envs.AlfWorld and count the wins.

    python study/benchmarks/alfworld_walkthroughs.py                      # valid_seen and valid_unseen, ~4 minutes
    python study/benchmarks/alfworld_walkthroughs.py --splits train --workers 2

Checks the adapter end to end on the real games: every walkthrough must win, with the success
reward on its last step only and no step flagged invalid. Games run in worker processes.
"""

import argparse
import functools
import time

import envs
import rollout


def replay(split: str, workers: int) -> None:
    games = envs.alfworld_games(split)
    plans = [envs.alfworld_walkthrough(game) for game in games]
    start = time.perf_counter()
    failures = []
    with rollout.EnvBatch(functools.partial(envs.AlfWorld, split), len(games), workers) as batch:
        batch.reset(list(range(len(games))))
        finished = {}
        for step in range(max(len(plan) for plan in plans)):
            moves = {i: [plan[step]] for i, plan in enumerate(plans) if step < len(plan)}
            for i, (_, reward, done, info) in batch.play(moves).items():
                last = step == len(plans[i]) - 1
                if info["invalid_action"] or done != last or (reward > 0) != last:
                    failures.append((games[i].parent.parent.name, step, plans[i][step], reward, done))
                if last:
                    finished[i] = info["won"]
    won = sum(finished.values())
    seconds = time.perf_counter() - start
    print(f"{split}: {won}/{len(games)} walkthroughs won, {len(failures)} anomalies, {seconds:.0f} s with {workers} workers")
    for failure in failures[:10]:
        print("  ", failure)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", nargs="+", default=["valid_seen", "valid_unseen"])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    for split in args.splits:
        replay(split, args.workers)
