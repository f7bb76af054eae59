"""fleetlog.lifecycle: a first signal asks for the orderly stop, a second (of ``force_on``) forces it.

Real child processes take real signals: one thread-based (``signal.signal``, as the
worker and the supervisors), one asyncio (``add_signal_handler``, as the gateway).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

from fleetlog.lifecycle import EXIT_FORCED, Shutdown

#: Waits for a stop, then "drains" for argv[1] seconds; a forced stop exits 130 at once.
THREADED = textwrap.dedent("""
    import os, signal, sys, time
    from fleetlog.lifecycle import EXIT_FORCED, Shutdown

    shutdown = Shutdown(force_on={signal.SIGINT}, on_stop=lambda: print("stopping", flush=True),
                        on_force=lambda: os._exit(EXIT_FORCED)).install()
    print("ready", flush=True)
    while not shutdown.should_exit.wait(0.05):
        pass
    deadline = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < deadline:
        time.sleep(0.05)
    print("drained", flush=True)
""")

#: The same in an event loop; a forced stop cancels the main task and exits 1.
ASYNCIO = textwrap.dedent("""
    import asyncio, sys

    from fleetlog.lifecycle import Shutdown

    async def main() -> None:
        task = asyncio.current_task()
        stop = Shutdown(on_force=task.cancel).install_in(asyncio.get_running_loop())
        print("ready", flush=True)
        await stop.wait()
        await asyncio.sleep(float(sys.argv[1]))
        print("drained", flush=True)

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        sys.exit(1)
""")


def _start(script: str, drain: float) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", script, str(drain)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    return child


def _signal_twice(child: subprocess.Popen[str], first: int, second: int) -> None:
    child.send_signal(first)
    time.sleep(0.3)
    assert child.poll() is None, "the first signal waits for the orderly stop"
    child.send_signal(second)


def test_a_sigterm_runs_the_orderly_stop_to_its_end() -> None:
    child = _start(THREADED, 0.5)
    child.send_signal(signal.SIGTERM)
    assert child.wait(10) == 0
    assert child.stdout is not None and child.stdout.read() == "stopping\ndrained\n"


def test_sigterm_then_sigint_forces_the_exit_at_once() -> None:
    child = _start(THREADED, 30)
    try:
        _signal_twice(child, signal.SIGTERM, signal.SIGINT)
        assert child.wait(5) == EXIT_FORCED
    finally:
        child.kill()
        child.wait()
    assert child.stdout is not None and child.stdout.read() == "stopping\n"


def test_a_second_signal_outside_force_on_changes_nothing() -> None:
    child = _start(THREADED, 1.0)
    _signal_twice(child, signal.SIGINT, signal.SIGTERM)
    assert child.wait(10) == 0
    assert child.stdout is not None and child.stdout.read() == "stopping\ndrained\n"


def test_in_an_event_loop_the_first_signal_sets_the_event_the_second_forces() -> None:
    orderly = _start(ASYNCIO, 0.2)
    orderly.send_signal(signal.SIGINT)
    assert orderly.wait(10) == 0
    forced = _start(ASYNCIO, 30)
    try:
        _signal_twice(forced, signal.SIGTERM, signal.SIGINT)
        assert forced.wait(5) == 1
    finally:
        forced.kill()
        forced.wait()


def test_handle_calls_on_stop_once_then_on_force_once() -> None:
    calls: list[str] = []
    shutdown = Shutdown(force_on={signal.SIGINT}, on_stop=lambda: calls.append("stop"),
                        on_force=lambda: calls.append("force"))
    shutdown.handle(signal.SIGTERM)
    assert shutdown.should_exit.is_set() and not shutdown.force_exit
    shutdown.handle(signal.SIGTERM)  # not in force_on
    assert not shutdown.force_exit
    shutdown.handle(signal.SIGINT)
    shutdown.handle(signal.SIGINT)
    assert shutdown.force_exit
    assert calls == ["stop", "force"]
    assert shutdown.received == [signal.SIGTERM, signal.SIGTERM, signal.SIGINT, signal.SIGINT]


def test_install_and_restore_put_the_previous_handlers_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    shutdown = Shutdown().install()
    try:
        assert signal.getsignal(signal.SIGTERM) == shutdown.handle
    finally:
        shutdown.restore()
    assert signal.getsignal(signal.SIGTERM) == before
