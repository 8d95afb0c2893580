"""Graders in the shapes of OpenAI's hosted graders API, run locally.

- `validate(grader, *, models=None, embed=None) -> dict`: the grader normalized, or
  `GraderError` whose message (and `param`) names the field;
- `grade(grader, sample, item=None, *, chat=None, embed=None, limits=...) -> GradeResult`:
  one grading (reward, error flags, execution time, sub-rewards, judge token usage);
- `reward_from_grader(grader, ...)` / `reward_function(grader, ...)`: a grader as a GRPO reward.

Grader types: string_check, text_similarity, python (sandboxed: `python_grader`), score_model
and label_model (a judge this server serves, through an injected `chat`), multi (a formula over
sub-graders, parsed safely: `formula`). Templates: `templates`.

`validate`, `grade` and `uses_models` live in `grading`, `reward_from_grader` and
`reward_function` in `reward`, `GradeResult`, `GraderError` and the error flags in `result`,
`PythonLimits` in `python_grader`: import them from there (this package's `__init__` imports
nothing, so its modules can import each other without a cycle).
"""
