"""The `calculate_output` formulas of multi graders, parsed and evaluated safely (never `eval`).

A formula is an arithmetic expression over the sub-graders' keys: numbers, `+ - * /`, powers
(`^` as the hosted graders write it, or `**`), unary minus, parentheses, and the functions
`min`, `max` (two or more arguments), `abs`, `floor`, `ceil`, `exp`, `sqrt` and `log` (natural
log; `log(x, base)` too). Python's `ast` parses it; only those node types are accepted, every
name must be a sub-grader's key, and it is evaluated by walking the tree with floats.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Collection, Mapping

MAX_FORMULA_CHARS = 2000
FUNCTIONS = {
    "min": (min, 2, None), "max": (max, 2, None), "abs": (abs, 1, 1), "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1), "exp": (math.exp, 1, 1), "sqrt": (math.sqrt, 1, 1), "log": (math.log, 1, 2),
}
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b}
_UNARY = {ast.UAdd: lambda a: a, ast.USub: lambda a: -a}


class FormulaError(ValueError):
    """A formula that cannot be parsed, names something unknown, or cannot be computed."""


def parse(formula: str, names: Collection[str]) -> ast.Expression:
    """The checked syntax tree of `formula`, whose variables must be in `names`.

    Raises:
        FormulaError: not a formula of the accepted form (the message says what is wrong).
    """
    if not isinstance(formula, str) or not formula.strip():
        raise FormulaError("is empty; write e.g. (a + b) / 2 over the sub-graders' keys")
    if len(formula) > MAX_FORMULA_CHARS:
        raise FormulaError(f"is {len(formula)} characters, over the limit of {MAX_FORMULA_CHARS}")
    try:
        tree = ast.parse(formula.strip().replace("^", "**"), mode="eval")
    except SyntaxError as exc:
        raise FormulaError(f"is not a valid formula: {exc.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        raise FormulaError("is nested too deeply") from None
    try:
        _check(tree.body, frozenset(names))
    except RecursionError:
        raise FormulaError("is nested too deeply") from None
    return tree


def _check(node: ast.AST, names: frozenset[str]) -> None:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise FormulaError(f"may hold numbers only, not {node.value!r}")
    elif isinstance(node, ast.Name):
        if node.id not in names:
            known = ", ".join(sorted(names)) or "none"
            raise FormulaError(f"uses '{node.id}', which is not a sub-grader (the sub-graders are: {known})")
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            raise FormulaError(f"uses the operator {_symbol(node.op)}; only + - * / and ^ are allowed")
        _check(node.left, names)
        _check(node.right, names)
    elif isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            raise FormulaError(f"uses the operator {_symbol(node.op)}; only + - * / and ^ are allowed")
        _check(node.operand, names)
    elif isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            shown = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            raise FormulaError(f"calls '{shown}'; the functions are {', '.join(FUNCTIONS)}")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise FormulaError(f"{node.func.id}() takes plain arguments only")
        _, low, high = FUNCTIONS[node.func.id]
        if len(node.args) < low or (high is not None and len(node.args) > high):
            wanted = f"{low}" if low == high else (f"{low} or more" if high is None else f"{low} to {high}")
            raise FormulaError(f"{node.func.id}() takes {wanted} arguments, not {len(node.args)}")
        for arg in node.args:
            _check(arg, names)
    else:
        raise FormulaError(f"contains '{ast.unparse(node)}'; only numbers, sub-grader keys, + - * / ^, "
                           f"parentheses and {', '.join(FUNCTIONS)} are allowed")


def _symbol(op: ast.AST) -> str:
    return {ast.Mod: "%", ast.FloorDiv: "//", ast.BitXor: "^", ast.BitAnd: "&", ast.BitOr: "|",
            ast.LShift: "<<", ast.RShift: ">>", ast.MatMult: "@", ast.Not: "not", ast.Invert: "~"}.get(
        type(op), type(op).__name__)


def evaluate(tree: ast.Expression, values: Mapping[str, float]) -> float:
    """The value of a parsed formula with `values` for its names.

    Raises:
        FormulaError: division by zero, a math domain error (log of 0, sqrt of a negative),
            an overflow, or a result that is not a finite real number.
    """
    try:
        result = _eval(tree.body, values)
    except ZeroDivisionError:
        raise FormulaError("divides by zero") from None
    except OverflowError:
        raise FormulaError("overflows") from None
    except ValueError as exc:
        raise FormulaError(f"is undefined for these scores ({exc})") from None
    except RecursionError:
        raise FormulaError("is nested too deeply") from None
    if isinstance(result, complex) or not math.isfinite(result):
        raise FormulaError(f"gives {result}, not a finite real number")
    return float(result)


def _eval(node: ast.AST, values: Mapping[str, float]) -> float:
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(values[node.id])
    if isinstance(node, ast.BinOp):
        result = _BINARY[type(node.op)](_eval(node.left, values), _eval(node.right, values))
        if isinstance(result, complex):
            raise ValueError("a negative number to a fractional power")
        return result
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_eval(node.operand, values))
    if isinstance(node, ast.Call):
        function = FUNCTIONS[node.func.id][0]
        return float(function(*(_eval(arg, values) for arg in node.args)))
    raise FormulaError(f"contains '{ast.unparse(node)}'")  # parse() lets nothing else through
