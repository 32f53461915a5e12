"""The README stays in step with the code it documents."""

from __future__ import annotations

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
