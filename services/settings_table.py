"""Every BATON_* setting, read off the command line's own flags (each `--flag` of a service also comes
from BATON_FLAG): what `baton settings` prints and the README's table holds."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from baton.shared import env


@dataclass
class Setting:
    variable: str
    flag: str | None  # None: environment only
    helps: dict[str, str] = field(default_factory=dict)
    """Command (e.g. `router`, `registry check`) -> what the setting does there."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Command -> its default for this setting."""

    @property
    def help(self) -> str:
        """What it sets: one text, or, where commands say it differently, each with its commands."""
        by_text: dict[str, list[str]] = {}
        for command, text in self.helps.items():
            by_text.setdefault(text, []).append(command)
        if len(by_text) == 1:
            return next(iter(by_text))
        return "; ".join(f"{', '.join(commands)}: {text}" for text, commands in by_text.items())


def settings(parser: argparse.ArgumentParser) -> list[Setting]:
    """Every setting, sorted by variable, with the commands that read it."""
    from baton.services.cli import SETTING_DEFAULTS

    found: dict[str, Setting] = {}
    for command, sub in commands(parser):
        for action in sub._actions:
            if action not in SETTING_DEFAULTS:
                continue
            variable = env.variable(action.option_strings[0])
            help_text = (action.help or "").removesuffix(f" [env {variable}]")
            entry = found.setdefault(variable, Setting(variable, " / ".join(action.option_strings)))
            entry.helps[command] = help_text
            entry.defaults[command] = SETTING_DEFAULTS[action]
    for variable, (default, help_text) in env.ENV_ONLY_SETTINGS.items():
        found[variable] = Setting(variable, None, {"every command": help_text}, {"every command": default})
    return sorted(found.values(), key=lambda s: s.variable)


def variables_of(parser: argparse.ArgumentParser, command: str) -> set[str]:
    """The variables `command` reads (the environment-only ones included)."""
    return {s.variable for s in settings(parser) if command in s.defaults or s.flag is None}


def markdown(parser: argparse.ArgumentParser) -> str:
    """The settings as a Markdown table: variable, flag, default per command, what it sets."""
    rows = ["| Variable | Flag | Default (commands) | What it sets |", "| --- | --- | --- | --- |"]
    for s in settings(parser):
        by_default: dict[str, list[str]] = {}
        for command, default in s.defaults.items():
            by_default.setdefault(_shown(default), []).append(command)
        defaults = "; ".join(f"{value} ({', '.join(commands)})" for value, commands in by_default.items())
        flag = f"`{s.flag}`" if s.flag else "—"
        rows.append(f"| `{s.variable}` | {flag} | {defaults} | {s.help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def _shown(default: Any) -> str:
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "`true`" if default else "`false`"
    return f"`{default}`" if default != "" else '`""`'


def commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, argparse.ArgumentParser]]:
    """(command, its parser) for every command and sub-command, `bench serve` style."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                command = f"{prefix} {name}".strip()
                found.append((command, sub))
                found.extend(commands(sub, command))
    return found
