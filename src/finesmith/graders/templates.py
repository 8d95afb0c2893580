"""Template strings, as the hosted graders render them: `{{ namespace.variable }}`.

The namespaces are `item` (the dataset row) and `sample` (the model's answer: `output_text`,
`output_json` when the answer is valid JSON, `output_tools`, `choices`). Nested values are
reached with JSON-path-like steps: `{{ item.a.b }}`, `{{ item.list[0] }}`, `{{ item["odd key"] }}`.

A string value is inserted verbatim; anything else (numbers, booleans, null, objects, lists)
as its JSON text. A variable that is not there is a grading error (`invalid_variable_error`,
or `sample_parse_error` for `sample.output_json` when the answer is not JSON), never a crash.
"""

from __future__ import annotations

import json
import re
from typing import Any

from finesmith.graders.result import GraderError, GradingFailure

NAMESPACES = ("item", "sample")
_TAG = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_STEP = re.compile(r"""\.\s*([A-Za-z_$][\w$-]*)|\[\s*(-?\d+)\s*\]|\[\s*"((?:[^"\\]|\\.)*)"\s*\]|\[\s*'([^']*)'\s*\]""")
_HEAD = re.compile(r"\s*([A-Za-z_]\w*)")


def parse_variable(text: str) -> tuple[str, list[str | int]]:
    """`item.a.b[0]` → ("item", ["a", "b", 0]); raises ValueError when it is not a variable."""
    head = _HEAD.match(text)
    if head is None:
        raise ValueError(f"'{{{{{text}}}}}' is not a variable: write {{{{ item.field }}}} or {{{{ sample.output_text }}}}")
    namespace, path, at = head.group(1), [], head.end()
    rest = text.rstrip()
    while at < len(rest):
        step = _STEP.match(rest, at)
        if step is None:
            raise ValueError(f"'{{{{{text}}}}}' is not a variable: write {{{{ item.a.b }}}} or {{{{ item.list[0] }}}}")
        name, index, quoted, single = step.groups()
        if name is not None:
            path.append(name)
        elif index is not None:
            path.append(int(index))
        elif quoted is not None:
            path.append(json.loads(f'"{quoted}"'))
        else:
            path.append(single)
        at = step.end()
    return namespace, path


def variables(template: str) -> list[tuple[str, list[str | int]]]:
    """The variables a template uses; raises ValueError on a malformed one or another namespace."""
    out = []
    for tag in _TAG.finditer(template):
        namespace, path = parse_variable(tag.group(1))
        if namespace not in NAMESPACES:
            raise ValueError(f"'{{{{{tag.group(1)}}}}}' uses the namespace '{namespace}'; the only namespaces "
                             "are item and sample")
        if not path:
            raise ValueError(f"'{{{{{tag.group(1)}}}}}' names a whole namespace; name a variable in it, "
                             f"e.g. {{{{ {namespace}.{'output_text' if namespace == 'sample' else 'field'} }}}}")
        out.append((namespace, path))
    return out


def check_template(template: Any, param: str) -> str:
    """`template` if it is a string whose variables are well formed, else GraderError naming `param`."""
    if not isinstance(template, str):
        raise GraderError(param, f"must be a string, not {type(template).__name__}")
    try:
        variables(template)
    except ValueError as exc:
        raise GraderError(param, str(exc)) from None
    return template


def sample_namespace(model_sample: Any) -> dict[str, Any]:
    """The `sample` namespace of a model's answer: a string (the hosted run API's `model_sample`)
    or a dict that already has `output_text` (and maybe `output_json`, `output_tools`, `choices`)."""
    if isinstance(model_sample, dict):
        sample = dict(model_sample)
        text = sample.get("output_text")
        sample["output_text"] = text if isinstance(text, str) else ("" if text is None else str(text))
        if "output_json" not in sample:
            sample["output_json"] = parse_json(sample["output_text"])
        sample.setdefault("output_tools", [])
        sample.setdefault("choices", [])
        return sample
    text = model_sample if isinstance(model_sample, str) else ("" if model_sample is None else str(model_sample))
    return {"output_text": text, "output_json": parse_json(text), "output_tools": [],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}


def parse_json(text: str) -> Any:
    """The JSON value `text` holds (objects and arrays only), or None."""
    stripped = text.strip()
    if not stripped or stripped[0] not in "{[":
        return None
    try:
        return json.loads(stripped)
    except ValueError:
        return None


_MISSING = object()


def lookup(namespace: str, path: list[str | int], item: Any, sample: dict[str, Any]) -> Any:
    """The value a variable names; GradingFailure when it is not there."""
    value: Any = item if namespace == "item" else sample
    shown = namespace
    if namespace == "sample" and path and path[0] == "output_json" and sample.get("output_json") is None:
        raise GradingFailure("sample_parse_error", "the sample is not valid JSON, so sample.output_json "
                             "(used by the grader) is not available")
    for step in path:
        nxt = _MISSING
        if isinstance(step, int) and isinstance(value, list):
            if -len(value) <= step < len(value):
                nxt = value[step]
            shown += f"[{step}]"
        elif isinstance(value, dict):
            nxt = value.get(str(step), _MISSING)
            shown += f".{step}"
        else:
            shown += f".{step}" if isinstance(step, str) else f"[{step}]"
        if nxt is _MISSING:
            raise GradingFailure("invalid_variable_error", f"the template variable {{{{ {shown} }}}} is not in the "
                                 f"{'item' if namespace == 'item' else 'sample'}")
        value = nxt
    return value


def to_text(value: Any) -> str:
    """A value as a template inserts it: strings verbatim, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def render(template: str, item: Any, sample: dict[str, Any]) -> str:
    """`template` with each `{{ namespace.variable }}` replaced by its value.

    Raises:
        GradingFailure: a variable that is not there (invalid_variable_error / sample_parse_error).
    """
    if "{{" not in template:
        return template

    def replace(tag: re.Match) -> str:
        try:
            namespace, path = parse_variable(tag.group(1))
        except ValueError as exc:
            raise GradingFailure("invalid_variable_error", str(exc)) from None
        if namespace not in NAMESPACES:
            raise GradingFailure("invalid_variable_error", f"the namespace '{namespace}' does not exist; use item "
                                 "or sample")
        return to_text(lookup(namespace, path, item, sample))

    return _TAG.sub(replace, template)
