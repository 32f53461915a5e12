"""The README's walk-through runs as written: one real shell, real processes, curl.

The shell blocks of "Five minutes with Sisyphus" and "In production" are fed, command by
command, to one bash with job control (as a user types them), on a free port instead of
3001. After each command, the lines the README shows must appear in what the shell
prints (ids compared by their place in the sequence; `...` stands for anything).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.redis_server import free_port

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
ID = re.compile(r"\b([0-9a-f]{8})-(\d+)-(\d+)\b")
# A command's printed id (time part: 10 digits) directly followed by another's output.
SHARED_LINE = re.compile(r"(\b[0-9a-f]{8}-\d+-\d{10})(?=\S)")


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)


def walkthrough() -> list[Step]:
    """The shell steps of the five-minute walk-through and the production section."""
    start = README.index("## Five minutes with Sisyphus")
    end = README.index("### With Redis")
    steps: list[Step] = []
    block: list[str] = []
    for line in [*README[start:end].splitlines(), ""]:
        if line.startswith("    "):
            block.append(line[4:])
            continue
        if not block:
            continue
        while block and not block[-1]:
            block.pop()
        for text in block:
            if text.startswith("$ "):
                steps.append(Step(text[2:]))
            elif text:
                steps[-1].expected.append(text)
        block = []
    return steps


class Shell:
    """One bash with job control; everything it and its jobs print, line by line."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            ["bash", "--norc", "--noprofile"],  # noqa: S607 - the user's shell, from PATH
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.send("set -m")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            # Several processes write to one terminal: a command's printed id and curl's
            # next event may share a line, as on screen. Split them apart again.
            text = line.rstrip("\r\n").replace("\r", "")
            self.lines.extend(SHARED_LINE.sub("\\1\n", text).split("\n"))

    def send(self, command: str) -> int:
        """Type one command; wait until the shell is back at its prompt; its exit status."""
        assert self.process.stdin is not None
        marker = f"@@done-{len(self.lines)}-{time.monotonic_ns()}@@"
        self.process.stdin.write(f"{command}\necho {marker} $?\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for line in reversed(self.lines):
                if line.startswith(marker):
                    return int(line.split()[1])
            time.sleep(0.02)
        raise AssertionError(f"{command!r} did not finish:\n" + "\n".join(self.lines))

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write("kill $(jobs -p) 2>/dev/null; exit\n")
            self.process.stdin.flush()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


class Ids:
    """README ids mapped to the ids the run produced, by their place (epoch, sequence)."""

    def __init__(self) -> None:
        self.epochs: dict[str, str] = {}
        self.full: dict[str, str] = {}

    def pattern(self, expected: str, port: int) -> re.Pattern[str]:
        expected = expected.replace(":3001", f":{port}")
        parts = re.split(r"(\.\.\.|\b[0-9a-f]{8}-\d+-\d+\b)", expected)
        regex = ""
        for part in parts:
            match = ID.fullmatch(part)
            if part == "...":
                regex += ".*"
            elif match:
                epoch = self.epochs.get(match[1])
                regex += f"({re.escape(epoch) if epoch else '[0-9a-f]{8}'})-{match[2]}-\\d+"
            else:
                regex += re.escape(part)
        return re.compile(regex)

    def learn(self, expected: str, actual: str) -> None:
        for readme_id, actual_id in zip(ID.findall(expected), ID.findall(actual), strict=False):
            self.epochs.setdefault(readme_id[0], actual_id[0])
            self.full["-".join(readme_id)] = "-".join(actual_id)

    def substitute(self, command: str) -> str:
        return ID.sub(lambda m: self.full.get(m[0], m[0]), command)


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[tuple[Shell, int]]:
    """A fresh shell in a folder whose `.venv` is this test run's environment."""
    if shutil.which("curl") is None:
        pytest.skip("the walk-through uses curl")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SISYPHUS_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The walk-through's port, 3001, may be taken here: the service and the commands'
    # default URL read these, and the README's URLs are rewritten to the same port.
    env["SISYPHUS_PORT"] = str(port)
    env["SISYPHUS_URL"] = f"http://127.0.0.1:{port}"
    # In a terminal curl draws no progress meter; into this pipe it would, so ask it not to.
    (tmp_path / ".curlrc").write_text("silent\nshow-error\n")
    env["CURL_HOME"] = str(tmp_path)
    running = Shell(tmp_path, env)
    yield running, port
    running.close()


def test_readme_walkthrough_runs_as_written(shell: tuple[Shell, int]) -> None:
    """Each README command succeeds and prints what the README shows, in one shell."""
    running, port = shell
    ids = Ids()
    steps = walkthrough()
    assert [s.command.split()[0] for s in steps].count("kill") == 2
    for step in steps:
        command = ids.substitute(step.command).replace("127.0.0.1:3001", f"127.0.0.1:{port}")
        first = len(running.lines)
        status = running.send(command)
        assert status == 0, f"{command!r} exited {status}:\n" + "\n".join(running.lines[first:])
        pending = [line for line in step.expected if line.strip()]
        deadline = time.monotonic() + 10
        used: set[int] = set()
        after = first  # in order where possible; processes sharing a terminal may interleave
        while pending and time.monotonic() < deadline:
            expected = pending[0]
            pattern = ids.pattern(expected, port)
            order = [*range(after, len(running.lines)), *range(first, after)]
            for index in order:
                if index not in used and pattern.fullmatch(running.lines[index]):
                    used.add(index)
                    after = index + 1
                    ids.learn(expected, running.lines[index])
                    pending.pop(0)
                    break
            else:
                time.sleep(0.05)
        assert not pending, (
            f"after {command!r} the README shows {pending[0]!r}; the shell printed:\n"
            + "\n".join(running.lines[first:])
        )
