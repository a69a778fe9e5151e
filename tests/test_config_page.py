"""docs/configuration.md says what the code does: it is the page the settings list writes."""

from __future__ import annotations

from deploy.config_page import PAGE, render
from deploy.settings import SETTINGS


def test_the_configuration_page_is_the_one_the_settings_write() -> None:
    assert PAGE.read_text() == render(), "docs/configuration.md is stale: run .venv/bin/python -m deploy.config_page"


def test_the_page_has_one_row_per_setting() -> None:
    rows = [line for line in render().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [setting.env for setting in SETTINGS]
