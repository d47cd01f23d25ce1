"""
A CPU-time sampling profiler for the proxy: ``python -m benchmarks.cpusampler STACKS twistd-args...``
runs twistd with a ``setitimer(ITIMER_PROF)`` timer that fires after every ``INTERVAL`` of CPU time
the process uses (user + system), records the Python stack it interrupted, and writes the stacks in
collapsed form (``frame;frame;frame count``, as py-spy's ``--format raw``) to STACKS when twistd stops.

Why not only py-spy: it samples wall-clock time and decides "idle" from the thread's state, which
it could not read on the benchmark machine (a VM): 30-50 % of its samples sat in ``epoll.poll``
and the thread pool's ``Condition.wait``. A CPU-time timer counts only time the proxy really spends,
and, unlike cProfile, costs the same per sample whatever the number of function calls, so small
functions are not inflated.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
from pathlib import Path

INTERVAL = 0.001  # seconds of CPU time between samples


def _frames(frame) -> str:
    names = []
    while frame is not None:
        code = frame.f_code
        names.append(f"{code.co_name} ({code.co_filename}:{code.co_firstlineno})")
        frame = frame.f_back
    return ";".join(reversed(names))


def main() -> None:
    out = Path(sys.argv[1])
    counts: collections.Counter[str] = collections.Counter()

    def sample(signum, frame) -> None:
        counts[_frames(frame)] += 1

    def dump() -> None:
        signal.setitimer(signal.ITIMER_PROF, 0)
        with open(out, "w") as handle:
            for stack, count in counts.items():
                handle.write(f"{stack} {count}\n")

    from twisted.application import app
    from twisted.scripts.twistd import run

    exit_with_signal = app._exitWithSignal

    def dump_then_exit(sig: int) -> None:
        dump()
        exit_with_signal(sig)

    app._exitWithSignal = dump_then_exit  # twistd re-raises SIGTERM after the reactor stops
    signal.signal(signal.SIGPROF, sample)
    signal.setitimer(signal.ITIMER_PROF, INTERVAL, INTERVAL)
    sys.argv = ["twistd", *sys.argv[2:]]
    try:
        run()
    finally:
        dump()
        os._exit(0)


if __name__ == "__main__":
    main()
