"""The one timing harness, used by every suite: compile apart, warm-up, synchronised calls,
interleaved rounds, medians and IQR.

Every call is synchronised (`jax.block_until_ready`, or `torch.cuda.synchronize`), so what is
timed is the computation, not its dispatch. The methods are timed in interleaved rounds (a few
calls of each method per round, round after round), so a slow drift of a shared machine's speed
falls on all methods alike and the ratios measured in one run stay honest.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import methods as M


@dataclasses.dataclass
class Budget:
    rounds: int  # interleaved rounds
    seconds_per_method: float  # steady-state timing budget per method (spread over the rounds)
    max_calls_per_round: int = 200


QUICK = Budget(rounds=5, seconds_per_method=0.6)
FULL = Budget(rounds=9, seconds_per_method=3.0)
TINY = Budget(rounds=2, seconds_per_method=0.02, max_calls_per_round=3)


def one_call(rounds: int) -> Budget:
    """One call per method and round: for calls that take seconds (a curvature answer)."""
    return Budget(rounds=rounds, seconds_per_method=0.0, max_calls_per_round=1)


@dataclasses.dataclass
class Method:
    """What is timed: `run()`, or `run(setup())` where the method has a per-call set-up (an
    operator built from the arrays), which is then timed apart from `run`."""

    run: Callable[..., Any]
    setup: Callable[[], Any] | None = None
    framework: str = "jax"  # "jax" or "torch": each framework's calls are timed in a block


@dataclasses.dataclass
class Timing:
    compile_s: float  # building, set-up and the first call: tracing, compilation, first run
    output: Any  # the first call's output (as `keep` made it), for the caller's error check
    run_s: list[float] = dataclasses.field(default_factory=list)
    setup_s: list[float] = dataclasses.field(default_factory=list)

    def summary(self) -> dict:
        """The timing fields of a record: medians, the IQR and minimum of a whole call (set-up
        included), the sample count and the compile time; `setup_s` and `total_s` (time to
        answer) only where the method has a set-up."""
        run = np.asarray(self.run_s)
        setup = np.asarray(self.setup_s) if self.setup_s else np.zeros_like(run)
        total = run + setup
        out = {"median_s": float(np.median(run))}
        if self.setup_s:
            out |= {"setup_s": float(np.median(setup)), "total_s": float(np.median(total))}
        return out | {"spread_s": float(np.percentile(total, 75) - np.percentile(total, 25)),
                      "min_s": float(total.min()), "n_samples": int(total.size),
                      "compile_s": self.compile_s}


def measure(names: list[str], build: Callable[[str], Method | None], device: str,
            budget: Budget, settle: dict[str, Callable[[], Any]] | None = None,
            keep: Callable[[Any], Any] | None = None,
            progress: Callable[[str, str], None] | None = None) -> dict[str, Timing]:
    """Times each method `build(name)` returns (None: it does not apply); by name, in order.

    The first call, with the build, is the compile time; a second, warm call sizes the rounds
    (unless one call per round is all the budget allows). `settle` maps a framework to the
    untimed call that opens its block in every round; by default it is the block's first method.
    `keep` turns the first call's output into what `Timing.output` holds (a host copy, so that
    no device memory is held through the rounds).
    `progress(name, stage)` hears "compile" before each build and "round i/n" before each round.
    """

    def call(m: Method, timing: Timing | None = None):
        t0 = time.perf_counter()
        state = m.setup() if m.setup else None
        if m.setup:
            M.synchronize(state, device)
        t1 = time.perf_counter()
        out = m.run(state) if m.setup else m.run()
        M.synchronize(out, device)
        if timing is not None:
            timing.run_s.append(time.perf_counter() - t1)
            if m.setup:
                timing.setup_s.append(t1 - t0)
        return out, time.perf_counter() - t0

    built, timings, quota = {}, {}, {}
    per_round = budget.seconds_per_method / budget.rounds
    for name in names:
        if progress:
            progress(name, "compile")
        t0 = time.perf_counter()
        m = build(name)
        if m is None:
            continue
        out, _ = call(m)
        built[name] = m
        timings[name] = Timing(compile_s=time.perf_counter() - t0,
                               output=keep(out) if keep else out)
        calls = 1
        if budget.max_calls_per_round > 1:
            estimate = call(m)[1]
            calls = int(min(budget.max_calls_per_round, max(1, per_round / max(estimate, 1e-7))))
        quota[name] = calls

    # Interleaved rounds. Each method gets k calls per round, k sized to the budget, and within a
    # framework the calls of its methods are spread evenly through the round (call-level round
    # robin), so a burst of load from a neighbour falls on every method in proportion. The two
    # frameworks take turns in blocks, each opened by an untimed call: torch's OpenMP workers
    # spin-wait after each parallel region and would slow whichever JAX call came next (measured
    # 8x on a 2-core machine), and XLA's thread pool would do the same to torch.
    blocks = []
    for framework in ("jax", "torch"):
        mine = [n for n in quota if built[n].framework == framework]
        schedule = sorted(((i + 0.5) / quota[n], j, n) for j, n in enumerate(mine)
                          for i in range(quota[n]))
        if schedule:
            first = built[schedule[0][2]]
            opener = (settle or {}).get(framework) or (lambda first=first: call(first)[0])
            blocks.append((opener, [n for _, _, n in schedule]))
    for r in range(budget.rounds):
        if progress and built:
            progress(next(iter(built)), f"round {r + 1}/{budget.rounds}")
        for opener, block in blocks:
            M.synchronize(opener(), device)  # untimed: settle the thread pools
            for name in block:
                call(built[name], timings[name])
    return timings
