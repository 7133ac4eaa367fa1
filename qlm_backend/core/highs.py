"""HiGHS process-wide state: the banner its first solver object prints and its thread scheduler.

Shared by every HiGHS user in the process: the QLM planner's assignment LP
(core/policies/qlm/lp.py), the evaluation's attainment upper bound (eval/bound.py) and the CLIs
that solve those LPs.
"""

from __future__ import annotations

import ctypes
import os
import sys

_banner_silenced = False


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # pragma: no cover - no C runtime handle (not Linux/macOS)
        pass


def silence_highs_banner() -> None:
    """HiGHS (1.16) prints "Running HiGHS ... Copyright" on stdout when the first solver object of
    the process is constructed, whatever output_flag says later (the option is only settable once
    the object exists), so it landed in the router's server log and in CLI tables. The core builds
    that first object itself with file descriptor 1 on /dev/null; later objects print nothing.
    Idempotent and cheap after the first call; both solve paths of the planner's LP (highspy and
    PuLP's HiGHS, which constructs a highspy.Highs too: core/policies/qlm/lp.py) call it, so the
    planner's callers do not have to."""
    global _banner_silenced
    if _banner_silenced:
        return
    _banner_silenced = True
    try:
        import highspy
    except ImportError:  # pragma: no cover - the solver is a dependency; nothing to silence
        return
    # Pending output of Python and of C stdio goes to the real stdout first; only the banner is
    # written while fd 1 points at /dev/null (it sits in C stdio's buffer when stdout is not a
    # terminal, hence the flush before restoring).
    try:
        sys.stdout.flush()
    except (AttributeError, ValueError):  # pragma: no cover - stdout replaced or closed
        pass
    _flush_c_stdio()
    try:
        saved = os.dup(1)
    except OSError:  # pragma: no cover - no fd 1 at all: nothing can be printed either
        highspy.Highs()
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
            _flush_c_stdio()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def reset_highs_scheduler() -> bool:
    """HiGHS keeps one thread scheduler per process, started by the first solve with that solve's
    thread count; a later solve asking for another count fails at once ("scheduler has already
    been initialized to use N threads", model status "Not Set", PuLP's "Not Solved"). Something
    else in the process (a library, a capacity estimate) may have solved first with the default
    count, so a solve that comes back unsolved resets the scheduler and runs once more; without
    this every planner LP failed and the planner silently fell back. True if reset."""
    try:
        import highspy

        highspy.Highs.resetGlobalScheduler(True)
    except (ImportError, AttributeError):  # pragma: no cover - older highspy: nothing to reset
        return False
    return True


__all__ = ["reset_highs_scheduler", "silence_highs_banner"]
