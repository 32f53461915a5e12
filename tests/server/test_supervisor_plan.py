"""The supervisor's decisions (sisyphus.server.supervisor.Plan): no processes, no clock."""

from __future__ import annotations

import signal

from sisyphus.server.supervisor import (
    RESTART_CAP_SECONDS,
    STABLE_SECONDS,
    Plan,
    describe_exit,
    restart_delay,
    worker_command,
)


def listening(count: int = 2) -> Plan:
    """A plan whose workers (pids 100, 101, ...) all started at 0 and listen."""
    plan = Plan(count)
    for slot in plan.due(0.0):
        plan.started(slot, 100 + slot, 0.0)
    for pid in list(plan.workers):
        plan.ready(pid)
    assert plan.announced
    return plan


def test_ready_is_announced_once_when_every_worker_listens() -> None:
    plan = Plan(2)
    assert plan.due(0.0) == [0, 1]
    assert plan.due(0.0) == []  # taken off the schedule
    plan.started(0, 100, 0.0)
    plan.started(1, 101, 0.0)
    assert not plan.ready(100)
    assert plan.ready(101)
    assert not plan.ready(101)
    assert not plan.ready(999)  # not one of ours


def test_a_crash_loop_backs_off_up_to_the_cap() -> None:
    """Workers that die young wait twice as long each time, never more than the cap."""
    plan = listening()
    now, pid, delays = 1.0, 100, []
    for _ in range(10):
        delay = plan.exited(pid, now)
        assert delay is not None
        delays.append(delay)
        assert plan.due(now + delay - 0.01) == []
        assert plan.due(now + delay) == [0]
        now += delay
        pid += 10
        plan.started(0, pid, now)
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0]
    assert delays[-1] == RESTART_CAP_SECONDS
    assert delays == sorted(delays)


def test_a_worker_that_lived_well_restarts_soon() -> None:
    """A death after STABLE_SECONDS of listening starts the backoff from its base."""
    plan = listening()
    assert plan.exited(100, 1.0) == 1.0
    plan.due(2.0)
    plan.started(0, 110, 2.0)
    plan.ready(110)
    assert plan.exited(110, 2.0 + STABLE_SECONDS) == restart_delay(0)


def test_a_worker_that_dies_before_the_service_listens_fails_the_start() -> None:
    """The port taken, say: its replacement would fail too, so the supervisor gives up."""
    plan = Plan(2)
    for slot in plan.due(0.0):
        plan.started(slot, 100 + slot, 0.0)
    assert plan.exited(100, 0.5) is None
    assert plan.failed and plan.stopping
    assert plan.due(100.0) == []
    assert not plan.done  # the other one still has to exit
    assert plan.exited(101, 1.0) is None
    assert plan.done


def test_stop_restarts_nothing_and_is_done_when_all_exited() -> None:
    plan = listening(3)
    plan.exited(100, 1.0)  # a restart was due...
    assert sorted(plan.stop()) == [101, 102]
    assert plan.due(1000.0) == []  # ...and is not made
    assert plan.next_due() is None
    assert plan.exited(101, 2.0) is None
    assert not plan.done
    assert plan.exited(102, 2.0) is None
    assert plan.done and not plan.failed


def test_worker_command_ends_with_the_single_process_flags() -> None:
    command = worker_command(["serve", "--workers", "auto", "--redis", "redis://x"])
    assert command[-4:] == ["--workers", "1", "--reuse-port", "yes"]  # the last value wins
    assert command[3:8] == ["serve", "--workers", "auto", "--redis", "redis://x"]


def test_exits_are_described() -> None:
    assert describe_exit(0) == "exited with status 0"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
