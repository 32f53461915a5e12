"""The README stays in step with the code it documents."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sisyphus.config import OPTIONS, Option

README = (Path(__file__).parent.parent / "README.md").read_text()


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_every_option_is_in_the_configuration_table(option: Option) -> None:
    """Each setting's flag and variable appear in the README's configuration table."""
    rows = [line for line in README.splitlines() if line.startswith(f"| `{option.flag} ")]
    assert len(rows) == 1, option.flag
    assert f"`{option.env}`" in rows[0]
    default = "(none)" if option.default in (None, ()) else f"`{option.default}`"
    assert default in rows[0]


OPERATIONS = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()


def systemd_unit() -> str:
    """The unit file shown in docs/operations.md (its one ```ini block)."""
    blocks = re.findall(r"```ini\n(.*?)```", OPERATIONS, re.DOTALL)
    assert len(blocks) == 1
    return str(blocks[0])


def test_systemd_unit_has_no_trailing_comments() -> None:
    """Each comment in the documented unit has its own line: a `# ...` after a value breaks it."""
    unit = systemd_unit()
    assert "[Service]" in unit
    for line in unit.splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";", "[")):
            _key, sep, value = line.partition("=")
            assert sep, line
            assert " #" not in value and "\t#" not in value, line
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["LimitNOFILE"] == "20000"
    assert settings["TimeoutStopSec"] == "15"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """Where systemd-analyze is installed, the documented unit passes `systemd-analyze verify`."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # Point the unit at what exists here; everything else is checked as written.
    unit = tmp_path / "sisyphus@3001.service"
    unit.write_text(
        systemd_unit()
        .replace("/opt/sisyphus/.venv/bin/sisyphus", sys.executable)
        .replace("EnvironmentFile=/etc/sisyphus/env", f"EnvironmentFile=-{tmp_path}/env")
        .replace("User=sisyphus", "User=root")
    )
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert str(unit) not in done.stderr, done.stderr  # no "Failed to parse ..., ignoring"


def documented_metrics() -> dict[str, tuple[str, str]]:
    """Every metric /metrics exposes: exposed name -> (type, HELP text)."""
    from sisyphus.metrics import COUNTER_HELP
    from sisyphus.server.ops import BROKER_COUNTER_HELP, GAUGE_HELP, HISTOGRAM_HELP

    metrics = {f"sisyphus_{name}": ("gauge", help) for name, help in GAUGE_HELP.items()}
    for name, help in {**COUNTER_HELP, **BROKER_COUNTER_HELP}.items():
        metrics[f"sisyphus_{name}_total"] = ("counter", help)
    for name, help in HISTOGRAM_HELP.items():
        metrics[f"sisyphus_{name}"] = ("histogram", help)
    return metrics


@pytest.mark.parametrize(("metric", "row"), sorted(documented_metrics().items()))
def test_every_metric_is_in_the_operations_table_with_its_help(
    metric: str, row: tuple[str, str]
) -> None:
    """docs/operations.md lists each metric with its type and the HELP text /metrics shows."""
    kind, help = row
    assert f"| `{metric}` | {kind} | {help} |" in OPERATIONS


def test_operations_shows_a_p99_latency_query() -> None:
    """The docs give the PromQL for p99 delivery latency, on the histogram's real name."""
    assert (
        "histogram_quantile(0.99, sum by (le) (rate(sisyphus_delivery_latency_seconds_bucket"
        in (OPERATIONS)
    )
