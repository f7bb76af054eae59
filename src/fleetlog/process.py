"""Child-process hygiene shared by everything that starts processes."""

from __future__ import annotations

import ctypes
import signal

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when its parent dies, however it dies.

    Linux only (prctl PR_SET_PDEATHSIG); elsewhere it does nothing and the
    parent's own shutdown path is the only guarantee.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
