"""``--fail-if`` conditions: ``NAME OP NUMBER`` over the report (sans-IO).

``p95_final_latency>1.5`` or ``error_rate>0.01``; several may be given, each as its own flag or
comma-separated. A name is a numeric top-level key of the JSON report (``final_latency_p95_s``,
``wer``, ``sessions_refused`` ...) or one of the short aliases below. A condition on a figure
that could not be measured (no finals, so no latency) counts as holding: a CI gate must not pass
on a run that measured nothing.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any

import attrs

ALIASES = {
    "p50_final_latency": "final_latency_p50_s",
    "p95_final_latency": "final_latency_p95_s",
    "p99_final_latency": "final_latency_p99_s",
    "max_final_latency": "final_latency_max_s",
    "p95_partial_gap": "partial_gap_p95_s",
    "p95_realtime_lag": "realtime_lag_p95_s",
    "max_realtime_lag": "realtime_lag_max_s",
    "refused": "sessions_refused",
    "accepted": "sessions_accepted",
    "lost_utterances": "utterances_lost",
    "unfinalized_clips": "clips_unfinalized",
}

#: Figures that live below the top level, reachable by a name of their own.
NESTED: dict[str, Callable[[dict[str, Any]], Any]] = {
    "memory_growth": lambda r: r.get("memory", {}).get("max_growth_after_warmup_pct"),
}

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}

_CONDITION = re.compile(
    r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*(-?[0-9.]+(?:e-?\d+)?)\s*$"
)


class ConditionError(ValueError):
    pass


@attrs.frozen
class Condition:
    text: str
    name: str  # the report key (aliases resolved)
    op: str
    threshold: float

    def value(self, report: dict[str, Any]) -> Any:
        if self.name in NESTED:
            return NESTED[self.name](report)
        return report.get(self.name)

    def holds(self, report: dict[str, Any]) -> bool:
        value = self.value(report)
        if not isinstance(value, int | float):
            return True  # not measured: fail safe
        return OPERATORS[self.op](float(value), self.threshold)


def parse_conditions(texts: list[str]) -> list[Condition]:
    """Parse ``--fail-if`` arguments (each may hold several, comma-separated)."""
    out = []
    for text in texts:
        for part in text.split(","):
            if not part.strip():
                continue
            match = _CONDITION.match(part)
            if match is None:
                raise ConditionError(
                    f"cannot read condition {part.strip()!r}: expected NAME OP NUMBER, "
                    "e.g. p95_final_latency>1.5"
                )
            name, op, number = match.groups()
            try:
                threshold = float(number)
            except ValueError:
                raise ConditionError(f"not a number in {part.strip()!r}") from None
            out.append(Condition(part.strip(), ALIASES.get(name, name), op, threshold))
    return out


def check_names(conditions: list[Condition], report: dict[str, Any]) -> None:
    """Refuse names the report does not have (a typo must not pass a CI gate silently)."""
    for c in conditions:
        if c.name not in report and c.name not in NESTED:
            known = sorted(
                {k for k, v in report.items() if isinstance(v, int | float | None)}
                | set(ALIASES)
                | set(NESTED)
            )
            raise ConditionError(f"unknown figure {c.name!r} in {c.text!r}; known: {known}")


def failed(conditions: list[Condition], report: dict[str, Any]) -> list[tuple[Condition, Any]]:
    """The conditions that hold, with the value each saw."""
    return [(c, c.value(report)) for c in conditions if c.holds(report)]
