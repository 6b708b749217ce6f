"""Render the configuration reference (docs/configuration.md) from `SETTINGS`."""

from __future__ import annotations

from .config import SETTINGS

__all__ = ["render_configuration_reference"]

_HEADER = """# Configuration reference

Generated from `deeperhub/config.py` by `bin/deeperhub config-reference`; a
test fails when this page and the code disagree.

Each setting is read from its environment variable if set and non-empty, else
from `etc/deeperhub.toml` (section and key as in the first column), else its
default. `DEEPERHUB_CONFIG_FILE` names another TOML file. An invalid value
stops start-up with exit code 78 and a message naming the setting, the value
and what is allowed.

| setting | environment variable | default | allowed | meaning |
|---|---|---|---|---|
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_configuration_reference() -> str:
    """Return the Markdown table of every setting."""
    rows = []
    for setting in SETTINGS:
        default_value = setting.default
        if isinstance(default_value, tuple):
            default_value = ", ".join(default_value)
        default = "(empty)" if default_value == "" else f"`{default_value}`"
        if setting.key == "auth.secret_key":
            default = "(generated in dev)"
        env = f"`{setting.env}`" if setting.env else ""
        rows.append(
            f"| `{setting.key}` | {env} | {default} | "
            f"{_cell(setting.describe_allowed())} | {_cell(setting.help)} |"
        )
    return _HEADER + "\n".join(rows) + "\n"
