"""Graders in the shapes of OpenAI's hosted graders API, run locally.

- `validate(grader, *, models=None, embed=None) -> dict`: the grader normalized, or
  `GraderError` whose message (and `param`) names the field;
- `grade(grader, sample, item=None, *, chat=None, embed=None, limits=...) -> GradeResult`:
  one grading (reward, error flags, execution time, sub-rewards, judge token usage);
- `reward_from_grader(grader, ...)` / `reward_function(grader, ...)`: a grader as a GRPO reward.

Grader types: string_check, text_similarity, python (sandboxed: `python_grader`), score_model
and label_model (a judge this server serves, through an injected `chat`), multi (a formula over
sub-graders, parsed safely: `formula`). Templates: `templates`.
"""

from finesmith.graders.grading import TYPES, grade, uses_models, validate
from finesmith.graders.python_grader import DEFAULT_LIMITS, PythonLimits, sandbox_report
from finesmith.graders.result import ERROR_DETAILS, ERROR_FLAGS, GradeResult, GraderError, no_errors
from finesmith.graders.reward import reward_from_grader, reward_function

__all__ = ["DEFAULT_LIMITS", "ERROR_DETAILS", "ERROR_FLAGS", "GradeResult", "GraderError", "PythonLimits", "TYPES",
           "grade", "no_errors", "reward_from_grader", "reward_function", "sandbox_report", "uses_models",
           "validate"]
