"""What a grading returns, and the errors graders raise.

`GradeResult` mirrors the hosted graders API's run response: a reward, the grader's name and
type, the error flags (`errors`, the hosted API's 14 fields), the execution time, the
sub-graders' rewards (multi graders) and the judge models' token usage (model graders).
A grading that fails does not raise: its reward is 0.0, one flag is set and `message` says
what happened in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finesmith.errors import FinesmithError

ERROR_FLAGS = (
    "formula_parse_error",
    "invalid_variable_error",
    "model_grader_parse_error",
    "model_grader_refusal_error",
    "model_grader_server_error",
    "other_error",
    "python_grader_runtime_error",
    "python_grader_server_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
)
ERROR_DETAILS = (
    "model_grader_server_error_details",
    "python_grader_runtime_error_details",
    "python_grader_server_error_type",
)


def no_errors() -> dict[str, Any]:
    """The hosted API's `metadata.errors` object with nothing wrong."""
    errors: dict[str, Any] = {flag: False for flag in ERROR_FLAGS}
    errors.update({detail: None for detail in ERROR_DETAILS})
    return dict(sorted(errors.items()))


class GraderError(FinesmithError):
    """A grader definition that cannot be used; the message names the field (`param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}" if param else message)
        self.param = param or None
        self.reason = message


class GradingFailure(Exception):
    """One grading went wrong: `flag` is the hosted error flag to set, `details` the extra
    error fields (e.g. `python_grader_runtime_error_details`), `message` one line."""

    def __init__(self, flag: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.flag, self.message, self.details = flag, message, details


@dataclass
class GradeResult:
    """The outcome of one grading (see the module docstring)."""

    name: str
    type: str
    reward: float = 0.0
    errors: dict[str, Any] = field(default_factory=no_errors)
    message: str | None = None  # one line: the first thing that went wrong; None when nothing did
    execution_time: float = 0.0
    sub_rewards: dict[str, float] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    token_usage: dict[str, int] | None = None
    usage_per_model: dict[str, dict[str, int]] = field(default_factory=dict)
    sampled_model_name: str | None = None
    passed: bool | None = None  # reward >= pass_threshold (when the grader has one); label in passing_labels

    @property
    def ok(self) -> bool:
        """True when no error flag is set."""
        return not any(self.errors.get(flag) for flag in ERROR_FLAGS)

    def fail(self, failure: GradingFailure) -> "GradeResult":
        """Mark this result failed by `failure`: reward 0, its flag and details set, its message kept."""
        self.reward = 0.0
        self.passed = False if self.passed is not None else None
        self.errors[failure.flag] = True
        for key, value in failure.details.items():
            if key in self.errors and value is not None:
                self.errors[key] = value
        if self.message is None:
            self.message = failure.message
        return self

    def run_response(self) -> dict[str, Any]:
        """The body of `POST /v1/fine_tuning/alpha/graders/run`, in the hosted API's shape."""
        return {
            "reward": self.reward,
            "metadata": {
                "name": self.name,
                "type": self.type,
                "errors": dict(self.errors),
                "execution_time": self.execution_time,
                "scores": dict(self.scores),
                "token_usage": dict(self.token_usage) if self.token_usage else None,
                "sampled_model_name": self.sampled_model_name,
            },
            "sub_rewards": dict(self.sub_rewards),
            "model_grader_token_usage_per_model": {k: dict(v) for k, v in self.usage_per_model.items()},
        }


def add_usage(total: dict[str, int] | None, usage: dict[str, Any] | None) -> dict[str, int] | None:
    """`total` plus `usage` (prompt/completion/total/cached tokens), field by field."""
    if not usage:
        return total
    out = dict(total or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cached_tokens": 0})
    for key in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens"):
        value = usage.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            out[key] = out.get(key, 0) + value
    if not usage.get("total_tokens"):
        out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    return out
