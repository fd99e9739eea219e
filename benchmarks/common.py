"""What the benchmark scripts share: the command line and the alternating timer."""

from __future__ import annotations

import argparse
import statistics
import time


def parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    """A command line with ``--threads`` (default 2, this machine's cores) and ``--repeats``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=repeats)
    return p


def alternate(ours, theirs, repeats: int) -> tuple[float, float]:
    """Median seconds of ``ours()`` and ``theirs()`` after a warm-up of each, run in turn so
    that both see the same machine state."""
    ours(), theirs()
    a, b = [], []
    for _ in range(repeats):
        for fn, store in ((ours, a), (theirs, b)):
            t0 = time.perf_counter()
            fn()
            store.append(time.perf_counter() - t0)
    return statistics.median(a), statistics.median(b)
