"""The one validator of every configuration dataclass (the trainer's and each agent's).

A field states its rule where it is declared, `hidden: int = rule(256, POSITIVE_INT)`, so a subclass that changes a
default (SVG's config over SAC's) keeps the rule, and the message names the spec key the user wrote. Rules that
relate several fields are a config's `relations(section)`: the messages of the ones broken.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Rule:
    holds: Callable[[Any], bool]
    says: str  # "must be <says>"


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


BOOL = Rule(lambda v: isinstance(v, bool), "true or false")
POSITIVE_INT = Rule(lambda v: _integer(v) and v >= 1, "a positive integer")
NON_NEGATIVE_INT = Rule(lambda v: _integer(v) and v >= 0, "a non-negative integer")
POSITIVE = Rule(lambda v: _number(v) and v > 0, "> 0")
NON_NEGATIVE = Rule(lambda v: _number(v) and v >= 0, ">= 0")
FINITE = Rule(_number, "a finite number")
FINITE_OR_UNSET = Rule(lambda v: v is None or _number(v), "a finite number or unset")
UNIT_CLOSED = Rule(lambda v: _number(v) and 0 <= v <= 1, "in [0, 1]")
UNIT_RIGHT_OPEN = Rule(lambda v: _number(v) and 0 <= v < 1, "in [0, 1)")
UNIT_LEFT_OPEN = Rule(lambda v: _number(v) and 0 < v <= 1, "in (0, 1]")


def rule(default: Any, check: Rule) -> Any:
    """A dataclass field with `default` that `validate` holds to `check`."""
    return dataclasses.field(default=default, metadata={"rule": check})


def validate(config: Any, section: str) -> None:
    """Raise ValueError naming `section.field` for the first field that breaks its rule, then for the first broken
    relation between fields."""
    for field in dataclasses.fields(config):
        check = field.metadata.get("rule")
        value = getattr(config, field.name)
        if check is not None and not check.holds(value):
            raise ValueError(f"{section}.{field.name} must be {check.says}, got {value!r}")
    relations = getattr(config, "relations", None)
    for message in relations(section) if relations else ():
        raise ValueError(message)
