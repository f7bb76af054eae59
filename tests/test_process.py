"""fleetlog.process: the restart policy shared by ``up`` and the gateway pool, with real child processes."""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fleetlog.backoff import Backoff
from fleetlog.process import (
    HEALTHY_RUN,
    PLANNED_EXIT_MIN_RUN,
    Child,
    Supervisor,
    give_memory_back,
    raise_descriptor_limit,
    stop_children,
    tend,
)
from tests.helpers import wait_until

PY = sys.executable


def exits(code: int) -> list[str]:
    return [PY, "-c", f"import sys; sys.exit({code})"]


def finished(child: Child) -> None:
    assert child.process is not None
    child.process.wait(10)


def test_a_crash_loop_backs_off_and_a_long_healthy_run_resets_the_backoff() -> None:
    child = Child("crasher", exits(3), backoff=Backoff(initial=0.05, cap=0.2))
    tend(child, time.monotonic())  # never started: starts now
    assert child.starts == 1
    finished(child)
    ceilings = []
    for attempt in range(4):
        ceilings.append(child.backoff.ceiling())
        now = time.monotonic()
        tend(child, now)  # it exited: a restart is scheduled, not done
        assert child.starts == attempt + 1 and not child.alive() and child.backoff.attempts == attempt + 1
        assert 0 <= child.next_start - now <= ceilings[-1]
        if child.next_start > now:
            tend(child, now)  # too early: nothing happens
            assert child.starts == attempt + 1
        time.sleep(max(0.0, child.next_start - time.monotonic()))
        tend(child, time.monotonic())  # due: started again
        assert child.starts == attempt + 2
        finished(child)
    assert ceilings == [0.05, 0.1, 0.2, 0.2]  # doubling, capped
    # It ran for longer than HEALTHY_RUN before this exit: the crash loop is over, from the start again.
    tend(child, child.started_at + HEALTHY_RUN + 1)
    assert child.backoff.attempts == 1 and child.next_start - (child.started_at + HEALTHY_RUN + 1) <= 0.05


def test_a_planned_exit_after_a_long_run_restarts_at_once_and_a_quick_one_does_not() -> None:
    planned = Child("worker", exits(0), backoff=Backoff(initial=0.5, cap=2.0))
    tend(planned, time.monotonic())
    finished(planned)
    later = planned.started_at + PLANNED_EXIT_MIN_RUN + 1  # e.g. --max-runtime ended it
    tend(planned, later)
    assert planned.next_start == later and planned.backoff.attempts == 0
    quick = Child("worker", exits(0), backoff=Backoff(initial=0.5, cap=2.0))
    tend(quick, time.monotonic())
    finished(quick)
    tend(quick, quick.started_at + 0.1)  # exit 0 at once is a fault, not a plan: backed off
    assert quick.backoff.attempts == 1


def test_each_start_gets_its_own_environment_and_runs_in_its_own_process_group(tmp_path: Path) -> None:
    out = tmp_path / "env"
    script = (f"import os; open({str(out)!r}, 'a').write("
              "os.environ['NODE'] + ' ' + str(os.getpgid(0) == os.getpid()) + '\\n')")
    child = Child("pool-child", [PY, "-c", script], env=dict(os.environ),
                  env_for_start=lambda starts: {"NODE": f"gw-{starts}"})
    for _ in range(2):
        child.start()
        finished(child)
    assert out.read_text().splitlines() == ["gw-0 True", "gw-1 True"]


def test_stop_children_terms_every_child_at_once_and_kills_what_does_not_stop() -> None:
    polite = Child("polite", [PY, "-c", "import time; time.sleep(60)"])
    stubborn = Child("stubborn", [PY, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, "
                                           "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"])
    for child in (polite, stubborn):
        child.start()
    assert stubborn.process is not None
    time.sleep(0.5)  # let the stubborn one ignore SIGTERM before it is sent
    began = time.monotonic()
    stop_children([polite, stubborn], timeout=1.0)
    took = time.monotonic() - began
    assert polite.process is not None and polite.process.returncode == -signal.SIGTERM
    assert stubborn.process.returncode == -signal.SIGKILL
    assert took < 10  # the one timeout for all, not one per child


STUBBORN = [PY, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                     "print('ready', flush=True); time.sleep(60)"]


def test_the_supervisor_stops_in_order_and_a_second_signal_kills_what_it_waits_for() -> None:
    stubborn = Child("stubborn", STUBBORN)
    polite = Child("polite", [PY, "-c", "import time; time.sleep(60)"])
    supervisor = Supervisor([stubborn, polite], logger=logging.getLogger("test"), forcing="forced",
                            force_on={signal.SIGINT})
    supervisor.start()
    time.sleep(0.5)  # let the stubborn one ignore SIGTERM before it is sent
    supervisor.shutdown.handle(signal.SIGTERM)
    assert supervisor.stopping.is_set() and not supervisor.forced
    stopping = threading.Thread(target=supervisor.stop, args=(30.0,), kwargs={"in_order": True})
    stopping.start()
    time.sleep(0.5)
    assert polite.alive(), "in order: the second waits for the first to stop"
    supervisor.shutdown.handle(signal.SIGINT)
    stopping.join(10)
    assert not stopping.is_alive() and supervisor.forced
    assert stubborn.process is not None and stubborn.process.returncode == -signal.SIGKILL
    assert polite.process is not None and polite.process.returncode == -signal.SIGKILL


def test_a_child_dies_with_its_supervisor(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: a supervisor killed with SIGKILL leaves no child behind."""
    pid_file = tmp_path / "child.pid"
    supervisor = subprocess.Popen([PY, "-c", (
        "import sys, time\n"
        "from fleetlog.process import Child\n"
        f"child = Child('sleeper', [sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "child.start()\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.process.pid))\n"
        "time.sleep(120)\n")])
    try:
        assert wait_until(lambda: pid_file.exists() and pid_file.read_text() != "", 15)
        child_pid = int(pid_file.read_text())
        supervisor.kill()
        supervisor.wait(10)

        def gone() -> bool:
            try:
                os.kill(child_pid, 0)
            except ProcessLookupError:
                return True
            return Path(f"/proc/{child_pid}/stat").read_text().split()[2] == "Z"  # a zombie is dead
        assert wait_until(gone, 10)
    finally:
        supervisor.kill()


def test_a_child_started_from_a_thread_outlives_the_thread() -> None:
    """The parent-death signal follows the forking *thread*: a child started from a pool
    thread (a test's ``asyncio.to_thread(server.start)``) used to get SIGTERM when that thread
    ended.  Started elsewhere than the main thread, it is left to its owner's shutdown path."""
    child = Child("sleeper", [PY, "-c", "import time; time.sleep(120)"])
    starter = threading.Thread(target=child.start)
    starter.start()
    starter.join(10)
    try:
        assert child.process is not None
        time.sleep(0.5)  # the signal, were it set, comes as soon as the thread is gone
        assert child.process.poll() is None
    finally:
        stop_children([child], 5)


def test_the_descriptor_limit_is_raised_to_the_hard_limit_and_memory_can_be_given_back() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        raised = raise_descriptor_limit()
        assert raised == resource.getrlimit(resource.RLIMIT_NOFILE)[0] > min(256, hard) or hard <= 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert give_memory_back() is True  # glibc's malloc_trim, present on Debian
