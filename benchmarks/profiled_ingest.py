"""Run ``edgeopt-dashboard ingest`` under cProfile in every thread and write the merged stats on exit.

cProfile sees only the thread that enabled it, and ingest spends its time in three (main, the paho
network thread, the batch writer), so each thread gets its own profiler and the stats are merged.
The timer is the thread's own CPU time, so waiting (locks, select, the database) does not count: the
profile says where ingest's CPU goes, which is what the per-message target is about.

    python benchmarks/profiled_ingest.py OUT.prof ingest --broker ... (the rest as for edgeopt-dashboard)
"""
from __future__ import annotations

import atexit
import cProfile
import pstats
import sys
import threading
import time

profiles: list[cProfile.Profile] = []
_run = threading.Thread.run


def _profiled_run(self) -> None:
    prof = cProfile.Profile(time.thread_time)
    profiles.append(prof)
    prof.enable()
    try:
        _run(self)
    finally:
        prof.disable()


def _dump(out: str) -> None:
    for p in profiles:
        p.disable()
    stats = pstats.Stats(profiles[0])
    for p in profiles[1:]:
        try:
            stats.add(p)
        except TypeError:  # a profiler that never recorded anything
            pass
    stats.dump_stats(out)


if __name__ == "__main__":
    out = sys.argv.pop(1)
    threading.Thread.run = _profiled_run
    main_prof = cProfile.Profile(time.thread_time)
    profiles.append(main_prof)
    atexit.register(_dump, out)
    from edgeopt.dashboard.cli import main

    main_prof.enable()
    main()
