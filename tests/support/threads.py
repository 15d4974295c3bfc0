"""Concurrent calls for the thread-safety tests."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_in_threads(n: int, fn: Callable[[int], object]) -> list[Exception]:
    """Runs ``fn(0)``, ..., ``fn(n - 1)`` each in its own thread, all released at once by a barrier so that the
    calls overlap, and returns the exceptions they raised: a thread's exception would otherwise vanish."""
    errors: list[Exception] = []
    start = threading.Barrier(n)

    def worker(i: int) -> None:
        start.wait()
        try:
            fn(i)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return errors
