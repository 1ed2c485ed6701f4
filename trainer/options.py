"""Each setting declared once: its dataclass field carries its command-line option.

A field made with ``setting(...)`` holds its help text, its section of ``--help``, its flag
(default: ``--`` and the name with dashes), the default the help shows where the value alone
would not say it, and an argparse ``action`` for switches. ``add_settings`` builds the argparse
options from the dataclass, so a setting is declared, documented and parsed in one place
(``DistillConfig``, ``LossWeights``).
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, field, fields
from typing import Any

#: ``--name`` / ``--no-name``.
SWITCH = argparse.BooleanOptionalAction


def setting(default: Any = MISSING, section: str | None = None, *, help: str,
            flag: str | None = None, shown: str | None = None, action: Any = None,
            metavar: str | None = None, default_factory: Any = MISSING) -> Any:
    """A dataclass field with its command-line option (see the module docstring)."""
    metadata = {"help": help, "section": section, "flag": flag, "shown": shown,
                "action": action, "metavar": metavar}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_of(option: Field) -> str:
    return option.metadata.get("flag") or "--" + option.name.replace("_", "-")


def add_settings(cls: type, group_for: Callable[[str | None], Any], dest_prefix: str = "") -> None:
    """Add an option for every ``setting`` field of ``cls`` to the group ``group_for(section)``.

    Options default to ``argparse.SUPPRESS``: only what the user gave reaches the namespace,
    so a saved config and the dataclass defaults fill the rest.
    """
    hints = typing.get_type_hints(cls)
    for option in fields(cls):
        meta = option.metadata
        if "help" not in meta:
            continue
        group = group_for(meta["section"])
        extra = {"metavar": meta["metavar"]} if meta["metavar"] else {}
        if meta["action"] is not None:  # a switch, or a repeatable option
            suffix = f" (default: {meta['shown']})" if meta["shown"] else ""
            group.add_argument(flag_of(option), dest=dest_prefix + option.name,
                               action=meta["action"], default=argparse.SUPPRESS,
                               help=meta["help"] + suffix, **extra)
            continue
        kind = _value_type(hints[option.name])
        shown = meta["shown"] if meta["shown"] is not None else option.default
        dest = dest_prefix + option.name
        extra.setdefault("metavar", dest.upper() if kind is str else kind.__name__.upper())
        group.add_argument(flag_of(option), dest=dest, type=kind, default=argparse.SUPPRESS,
                           help=f"{meta['help']} (default: {shown})", **extra)


def _value_type(hint: Any) -> type:
    """``int`` for ``int`` and for ``int | None``."""
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
    return kinds[0] if kinds else hint
