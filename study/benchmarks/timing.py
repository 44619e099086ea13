"""Wall-clock timing shared by the benchmark scripts: the first call (compile included) apart from the rest."""

import statistics
import time

import jax


def timed(fn, repeats: int, warmups: int = 1) -> tuple[float, float]:
    """(seconds of the first call, median seconds of `repeats` calls after `warmups` calls) of fn(). More than one
    warm-up is for code that compiles again on its second call (google-tunix's train step on a CPU)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(warmups - 1):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def timed_steps(step_fn, state, batch, repeats: int = 3) -> tuple[float, float]:
    """timed() of training steps state, metrics = step_fn(state, batch), each waited for; the state carries on."""
    carried = [state]

    def one_step():
        carried[0], metrics = step_fn(carried[0], batch)
        jax.block_until_ready(metrics)

    return timed(one_step, repeats)
