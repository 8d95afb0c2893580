"""`string_check`: compare the rendered input with the rendered reference; 1.0 or 0.0.

Operations, as the hosted graders define them: `eq` (equal, case-sensitive), `ne` (not equal,
case-sensitive), `like` (the input contains the reference, case-sensitive) and `ilike` (contains,
case-insensitive). The strings are compared exactly as rendered: no trimming.
"""

from __future__ import annotations

from typing import Any

from finesmith.graders.result import GraderError
from finesmith.graders.templates import check_template

OPERATIONS = ("eq", "ne", "like", "ilike")


def validate(grader: dict[str, Any], param: str) -> dict[str, Any]:
    operation = grader.get("operation")
    if operation not in OPERATIONS:
        raise GraderError(f"{param}.operation", f"must be one of {', '.join(OPERATIONS)}, not {operation!r}")
    return {"type": "string_check", "name": grader["name"],
            "input": check_template(grader.get("input"), f"{param}.input"),
            "reference": check_template(grader.get("reference"), f"{param}.reference"),
            "operation": operation}


def check(operation: str, text: str, reference: str) -> float:
    """1.0 when `operation` holds between `text` and `reference`, else 0.0."""
    if operation == "eq":
        return float(text == reference)
    if operation == "ne":
        return float(text != reference)
    if operation == "like":
        return float(reference in text)
    if operation == "ilike":
        return float(reference.casefold() in text.casefold())
    raise ValueError(f"unknown string_check operation {operation!r}")
