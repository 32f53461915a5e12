"""The supervisor's metrics folders: one left by a supervisor killed outright is removed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sisyphus.server.supervisor import FOLDER_PREFIX, remove_orphaned_folders


def test_folders_of_supervisors_that_died_are_removed_by_the_next(tmp_path: Path) -> None:
    """A supervisor killed outright leaves its metrics folder; the next one removes it,
    and leaves the folders of supervisors that still run (and anything else) alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f"{FOLDER_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{FOLDER_PREFIX}{os.getpid()}-def"
    other = tmp_path / f"{FOLDER_PREFIX}notapid"
    for folder in (orphan, live, other):
        (folder / "metrics").mkdir(parents=True)
        (folder / "metrics" / "counter_1.db").write_bytes(b"x")
    remove_orphaned_folders(str(tmp_path))
    assert not orphan.exists()
    assert live.exists() and other.exists()
