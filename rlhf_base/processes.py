"""Child processes that do not outlive their parent.

A process pool's workers keep running when the process that started them is killed (SIGKILL, the OOM
killer): each finishes its task for nobody, holding a CPU or a GPU (issue 16: a sweep's workers ran on for
65 s). :func:`exit_with_parent`, run first in each child (a pool's `initializer`), ends the child as soon as
its parent is gone.

This module imports nothing heavy on purpose: a spawned worker imports it before anything else it unpickles
(torch, the models), so the watch starts within a second of the worker, not after its imports.
"""

from __future__ import annotations

import os
import threading
import time

__all__ = ["POLL_S", "exit_with_parent"]

#: How often a child checks that its parent is alive (seconds).
POLL_S = 0.5


def exit_with_parent(parent: int) -> None:
    """Start a daemon thread that ends this process (`os._exit(1)`) once process `parent` has died.

    An orphan is re-parented (to init or a subreaper), so `os.getppid()` stops being `parent`. A thread
    polling it works on every POSIX system, where `prctl(PR_SET_PDEATHSIG)` is Linux-only and fires on the
    death of the parent *thread* that forked, not of the parent process.

    Args:
        parent: the parent's PID, read in the parent (`os.getpid()`) and passed down, so that a parent that
            died before this call is noticed too.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
