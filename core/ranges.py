"""Allowed values of a setting, declared beside its dataclass field:

    steps: int = field(default=300, metadata=at_least(1))

`pipelines.config` checks every field that carries a rule when it reads params.yaml (and the
CLI checks its own options with the same rules), so a negative step count, an image size of 0 or
a device named `gpu0` stops with one line naming the file and the key, instead of a traceback
deep inside a stage or, worse, a run that silently does nothing. A rule on a list field applies
to each element; `None` (an optional setting left unset) is never checked.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

RULE_KEY = "allowed"
# what torch accepts and this project runs on; `auto` picks CUDA when present
DEVICE_NAME = re.compile(r"(auto|cpu|mps|(cuda|xpu)(:\d+)?)")
DEVICE_NAMES = "auto, cpu, cuda, cuda:N, mps or xpu"


@dataclass(frozen=True)
class Rule:
    """A predicate on a value and how to say it: `steps` must be `>= 1`."""

    describe: str
    accepts: Callable[[Any], bool]


def _numeric(test: Callable[[float], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and test(v)


def at_least(minimum: float) -> dict:
    return {RULE_KEY: Rule(f">= {minimum}", _numeric(lambda v: v >= minimum))}


def above(minimum: float) -> dict:
    return {RULE_KEY: Rule(f"> {minimum}", _numeric(lambda v: v > minimum))}


def within(lo: float, hi: float, open_lo: bool = False, open_hi: bool = False) -> dict:
    """lo <= v <= hi, with either end excluded when `open_*`; said as `in (0, 1]`."""
    brackets = ("(" if open_lo else "[", ")" if open_hi else "]")

    def test(v: float) -> bool:
        return (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)

    return {RULE_KEY: Rule(f"in {brackets[0]}{lo}, {hi}{brackets[1]}", _numeric(test))}


def device_name() -> dict:
    return {RULE_KEY: Rule(f"a device name ({DEVICE_NAMES})", is_device_name)}


def is_device_name(value: Any) -> bool:
    return isinstance(value, str) and DEVICE_NAME.fullmatch(value) is not None


def problem(metadata: Any, value: Any, where: str) -> str | None:
    """The one-line complaint about `value` under the field's rule, or None when it is allowed."""
    rule = metadata.get(RULE_KEY) if metadata else None
    if rule is None or value is None:
        return None
    values = value if isinstance(value, list) else [value]
    for i, item in enumerate(values):
        if not rule.accepts(item):
            at = f"{where}[{i}]" if isinstance(value, list) else where
            return f"`{at}` must be {rule.describe}, got {item!r}"
    return None
