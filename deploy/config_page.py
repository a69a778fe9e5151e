"""docs/configuration.md, written from the one list of settings (``deploy.settings.SETTINGS``).

    .venv/bin/python -m deploy.config_page      # rewrite the page after changing a setting

tests/test_config_page.py fails while the page and the code disagree.
"""

from __future__ import annotations

from pathlib import Path

from deploy.settings import OWNED_ENGINE_FLAGS, SETTINGS

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

_HEAD = """# Configuration

Every setting of a deployment: its environment variable (seed 000's names where the seed
has one), the flag of the same name (`PTP=2` or `--ptp 2`; a flag wins), its default and
what it does. All values are checked before anything starts; a bad one is refused in one
line naming the setting, its value and what is allowed (exit code 2).

This page is generated from `deploy/settings.py` (`SETTINGS`) by
`.venv/bin/python -m deploy.config_page`; do not edit the table by hand.

| variable | flag | default | meaning |
|---|---|---|---|
"""

_TAIL = """
The startup params pass through to vLLM (for example `--enforce-eager`,
`--max-model-len 4096`), except the flags the deployment owns: {owned};
those are refused with a message saying which setting to use instead.
"""


def render() -> str:
    rows = []
    for setting in SETTINGS:
        default = f"`{setting.default}`" if setting.default is not None else "(unset)"
        meaning = setting.help.replace("|", "\\|")
        rows.append(f"| `{setting.env}` | `{setting.flag}` | {default} | {meaning} |")
    owned = ", ".join(f"`{flag}`" for flag in OWNED_ENGINE_FLAGS)
    return _HEAD + "\n".join(rows) + "\n" + _TAIL.format(owned=owned)


def main() -> None:
    PAGE.write_text(render())
    print(f"written {PAGE}")


if __name__ == "__main__":
    main()
