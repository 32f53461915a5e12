"""``sisyphus serve --workers N``: N worker processes on one port, under a small supervisor.

Each worker is a plain single-process ``sisyphus serve`` with the same arguments plus
``--workers 1 --reuse-port yes``: the kernel spreads new connects over the workers'
listening sockets (SO_REUSEPORT), and all of them share the one Redis. The supervisor
never touches a request. Its one job is the workers' lives:

- start them, and restart one that dies, after a delay that doubles while workers keep
  dying young, so a crash loop doesn't spin;
- tell systemd ``READY=1`` once every worker listens (each worker's own ``READY=1``
  arrives on the supervisor's private notify socket) and ``STOPPING=1`` at a stop;
- pass SIGTERM/SIGINT on to every worker (each drains) and exit 0 once all have exited;
  a second signal is passed on too, and the workers stop at once;
- give the workers a fresh folder for their metric files (``PROMETHEUS_MULTIPROC_DIR``,
  see :mod:`sisyphus.server.multiproc`), drop a dead worker's gauges, remove it at exit.

:class:`Plan` makes every decision and does no I/O; :class:`Supervisor` is the loop
around it (processes, signals, sockets). Linux only, like SO_REUSEPORT's balancing.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from sisyphus.config import Settings
from sisyphus.server.multiproc import MULTIPROC_ENV
from sisyphus.server.notify import notify

log = logging.getLogger("sisyphus.supervisor")

# Restart delays: 0.5 s after a worker that had lived well, doubling while its
# replacements keep dying young, up to 30 s.
RESTART_BASE_SECONDS = 0.5
RESTART_CAP_SECONDS = 30.0

# A worker that listened and lived this long was healthy: its death starts the backoff anew.
STABLE_SECONDS = 10.0

# Workers still running this long after their --shutdown-timeout are killed.
KILL_GRACE_SECONDS = 5.0

# The loop looks at its workers at least this often, signals or not.
POLL_SECONDS = 1.0

_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_PR_SET_PDEATHSIG = 1


def restart_delay(failures: int) -> float:
    """Seconds before restarting a slot whose workers died young ``failures`` times in a row."""
    return min(RESTART_CAP_SECONDS, RESTART_BASE_SECONDS * 2.0 ** min(failures, 32))


@dataclass
class Worker:
    slot: int
    pid: int
    started: float
    ready: bool = False


class Plan:
    """Which worker to start when, when the service listens, when it is done; no I/O.

    Times are the caller's monotonic clock. Slots are the N places a worker fills; a
    restarted worker takes its dead predecessor's slot (and its backoff).
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.workers: dict[int, Worker] = {}  # by pid
        self._due: dict[int, float] = dict.fromkeys(range(count), 0.0)  # slot -> start at
        self._failures = [0] * count  # young deaths in a row, per slot
        self.announced = False  # the whole service listened once (READY=1 sent)
        self.stopping = False
        self.failed = False  # a worker died before the service ever listened

    def due(self, now: float) -> list[int]:
        """The slots whose worker should start now (taken off the schedule)."""
        if self.stopping:
            return []
        slots = [slot for slot, at in self._due.items() if at <= now]
        for slot in slots:
            del self._due[slot]
        return slots

    def next_due(self) -> float | None:
        return None if self.stopping or not self._due else min(self._due.values())

    def started(self, slot: int, pid: int, now: float) -> None:
        self.workers[pid] = Worker(slot, pid, now)

    def not_started(self, slot: int, now: float) -> float:
        """The worker could not even be spawned: retry its slot later; the delay."""
        return self._schedule(slot, young=True, now=now)

    def ready(self, pid: int) -> bool:
        """Note that worker ``pid`` listens; True when, for the first time, all of them do."""
        worker = self.workers.get(pid)
        if worker is None or worker.ready:
            return False
        worker.ready = True
        if self.announced or self.stopping or len(self.workers) < self.count:
            return False
        self.announced = all(w.ready for w in self.workers.values())
        return self.announced

    def exited(self, pid: int, now: float) -> float | None:
        """Forget a worker that exited; the delay before its slot restarts, or None."""
        worker = self.workers.pop(pid, None)
        if worker is None or self.stopping:
            return None
        if not self.announced:
            # It could not start (the port is taken, say), and its replacement couldn't
            # either: fail like a single process does, and let systemd decide.
            self.failed = True
            self.stop()
            return None
        young = not worker.ready or now - worker.started < STABLE_SECONDS
        return self._schedule(worker.slot, young, now)

    def _schedule(self, slot: int, young: bool, now: float) -> float:
        self._failures[slot] = self._failures[slot] + 1 if young else 0
        delay = restart_delay(self._failures[slot])
        self._due[slot] = now + delay
        return delay

    def stop(self) -> list[int]:
        """Stop starting workers; the pids to pass the signal on to."""
        self.stopping = True
        self._due.clear()
        return list(self.workers)

    @property
    def done(self) -> bool:
        return self.stopping and not self.workers


def worker_command(argv: Sequence[str]) -> list[str]:
    """A worker's command line: the supervisor's own, as one process sharing the port."""
    # The flags come last: argparse keeps a repeated flag's last value.
    return [sys.executable, "-m", "sisyphus", *argv, "--workers", "1", "--reuse-port", "yes"]


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _parent_death_signal() -> Callable[[], None] | None:
    """What a child runs before exec so that it gets SIGTERM (and drains) if the
    supervisor dies without passing a signal on (SIGKILL, a crash)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not in the child
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


class Supervisor:
    """The loop: spawn and reap workers, read their READY=1, pass signals on."""

    def __init__(self, settings: Settings, argv: Sequence[str], folder: str) -> None:
        self.settings = settings
        self.plan = Plan(settings.workers)
        self.command = worker_command(argv)
        self.metrics_dir = os.path.join(folder, "metrics")
        os.mkdir(self.metrics_dir)
        notify_path = os.path.join(folder, "notify")
        # Workers report READY=1 here, as they would to systemd; the kernel tells who sent it.
        self.notify_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_socket.bind(notify_path)
        self.notify_socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.notify_socket.setblocking(False)
        self.env = {**os.environ, MULTIPROC_ENV: self.metrics_dir, "NOTIFY_SOCKET": notify_path}
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.signals: list[int] = []
        self.kill_at: float | None = None
        self._arm = _parent_death_signal()

    def run(self) -> int:
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        # Every signal, SIGCHLD too, writes a byte that wakes the select below.
        signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)
        selector = selectors.DefaultSelector()
        selector.register(self.notify_socket, selectors.EVENT_READ)
        selector.register(wake_read, selectors.EVENT_READ)
        try:
            while not self.plan.done:
                now = time.monotonic()
                for slot in self.plan.due(now):
                    self._start(slot, now)
                for key, _ in selector.select(self._timeout(now)):
                    if key.fileobj is self.notify_socket:
                        self._read_notifications()
                    else:
                        with contextlib.suppress(BlockingIOError):
                            while wake_read.recv(4096):
                                pass
                self._pass_signals_on()
                self._reap()
                self._kill_late()
        finally:
            signal.set_wakeup_fd(-1)
            selector.close()
            wake_read.close()
            wake_write.close()
            self.notify_socket.close()
        if self.plan.failed:
            log.error("a worker could not start: stopped")
            return 1
        log.info("stopped")
        return 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signals.append(signum)

    def _timeout(self, now: float) -> float:
        moments = [now + POLL_SECONDS, self.plan.next_due(), self.kill_at]
        return max(0.0, min(m for m in moments if m is not None) - now)

    def _start(self, slot: int, now: float) -> None:
        try:
            process = subprocess.Popen(
                self.command,
                env=self.env,
                # Its own process group: a Ctrl-C in the terminal reaches the supervisor
                # only, which passes it on once (twice would mean "stop at once").
                process_group=0,
                preexec_fn=self._arm,  # the supervisor runs no threads: safe
            )
        except OSError as exc:
            delay = self.plan.not_started(slot, now)
            log.error("could not start a worker (%s); retrying in %.1f s", exc, delay)
            return
        self.processes[process.pid] = process
        self.plan.started(slot, process.pid, now)
        log.info("started worker pid=%d", process.pid)

    def _read_notifications(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.notify_socket.recvmsg(
                    4096, socket.CMSG_SPACE(_CREDENTIALS.size)
                )
            except BlockingIOError:
                return
            pid = next(
                (
                    _CREDENTIALS.unpack_from(payload)[0]
                    for level, kind, payload in ancillary
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
                ),
                None,
            )
            if pid is None or b"READY=1" not in data.split(b"\n"):
                continue  # STOPPING=1: the supervisor says that itself
            if pid in self.processes:
                log.info("worker pid=%d listening", pid)
            if self.plan.ready(pid):
                settings = self.settings
                log.info(
                    "%d workers listening on http://%s:%d",
                    self.plan.count,
                    settings.host,
                    settings.port,
                    extra={"workers": self.plan.count},
                )
                notify("READY=1")

    def _pass_signals_on(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if not self.plan.stopping:
                log.info("stopping: %d workers drain", len(self.plan.workers))
                notify("STOPPING=1")
                self.plan.stop()
                self.kill_at = (
                    time.monotonic() + self.settings.shutdown_timeout + KILL_GRACE_SECONDS
                )
            else:
                log.warning("second signal: workers stop at once")
            self._signal_all(signum)

    def _signal_all(self, signum: int) -> None:
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    def _reap(self) -> None:
        for pid, process in list(self.processes.items()):
            returncode = process.poll()
            if returncode is None:
                continue
            del self.processes[pid]
            # Its gauges go; its counters stay in the sums (see multiproc.py).
            mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            was_stopping = self.plan.stopping
            delay = self.plan.exited(pid, time.monotonic())
            how = describe_exit(returncode)
            if delay is not None:
                log.warning("worker pid=%d %s; restarting in %.1f s", pid, how, delay)
            elif not was_stopping:  # it died before the service listened: stop the others
                log.error("worker pid=%d %s before listening; stopping", pid, how)
                self.kill_at = time.monotonic() + KILL_GRACE_SECONDS
                self._signal_all(signal.SIGTERM)
            else:
                log.info("worker pid=%d %s", pid, how)

    def _kill_late(self) -> None:
        if self.kill_at is None or time.monotonic() < self.kill_at or not self.processes:
            return
        for pid, process in self.processes.items():
            log.error("worker pid=%d still runs after the stop's deadline: killed", pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        self.kill_at = None


FOLDER_PREFIX = "sisyphus-workers-"


def remove_orphaned_folders(parent: str | None = None) -> None:
    """Remove the folders of supervisors that died without cleaning up (SIGKILL, OOM).

    Each folder's name carries its supervisor's pid; one whose pid no longer runs is
    an orphan. (A reused pid keeps its folder until that process is gone too.)
    """
    parent = parent or tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            pid_text = name.removeprefix(FOLDER_PREFIX).partition("-")[0]
            if not name.startswith(FOLDER_PREFIX) or not pid_text.isdigit():
                continue
            try:
                os.kill(int(pid_text), 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            except PermissionError:
                pass  # another user's live process


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run ``settings.workers`` workers until a signal stops them; the exit status."""
    remove_orphaned_folders()
    prefix = f"{FOLDER_PREFIX}{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        return Supervisor(settings, argv, folder).run()
