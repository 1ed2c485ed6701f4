"""Settings dataclasses read back from JSON: unknown keys are refused, by name.

A key the dataclass does not have is a typo or a file written by another version; dropping it
silently would run with a default the user did not choose. The student's config, the
distillation config, the loss weights and the teacher's config all read their JSON this way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def from_known_keys(cls: type[T], data: Mapping[str, Any],
                    error: Callable[[list[str], list[str]], Exception]) -> T:
    """``cls(**data)``, or ``error(unknown keys, known keys)`` raised (both sorted)."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(unknown, sorted(known))
    return cls(**data)


def check_finite_floats(settings: Any, error: Callable[[str, Any], Exception]) -> None:
    """Raise ``error(name, value)`` for the first ``float`` field of the dataclass instance
    ``settings`` that is not a finite number: JSON and argparse both read "NaN" and
    "Infinity", which no check written as ``value < 0`` or ``not value > 0`` refuses."""
    for field in fields(settings):
        if str(field.type).replace(" ", "") not in ("float", "float|None"):
            continue
        value = getattr(settings, field.name)
        if value is None and "None" in str(field.type):
            continue
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value)):
            raise error(field.name, value)
