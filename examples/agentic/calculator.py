"""The calculator tool of the agentic example: finds a call, evaluates it safely.

Only arithmetic is evaluated: the expression is parsed with ``ast`` and walked node by
node (numbers, + - * / // % **, unary +/-, parentheses); anything else (names, calls,
attributes) is refused, and sizes are bounded, so no model output can run code.
"""

from __future__ import annotations

import ast
import operator
import re

# CALC(...) with up to one level of nested parentheses inside.
CALL_RE = re.compile(r"CALC\(((?:[^()]|\([^()]*\))*)\)")
# A question the agent can answer for the model: "what is <arithmetic>?"
QUESTION_RE = re.compile(r"what is ([0-9+\-*/%(). ]+)\?", re.IGNORECASE)

_MAX_CHARS = 64
_MAX_EXPONENT = 12
_MAX_MAGNITUDE = 1e15

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class ToolError(ValueError):
    """The expression is not plain, bounded arithmetic."""


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; ToolError for anything else."""
    if len(expression) > _MAX_CHARS:
        raise ToolError(f"expression longer than {_MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ToolError(f"not an expression: {expression!r}") from e
    value = _eval(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return round(value, 6) if isinstance(value, float) else value


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ToolError(f"exponent {right} is larger than {_MAX_EXPONENT}")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError as e:
            raise ToolError("division by zero") from e
        if isinstance(value, complex) or abs(value) > _MAX_MAGNITUDE:
            raise ToolError("result out of range")
        return value
    raise ToolError(f"only arithmetic is allowed, not {type(node).__name__}")


def find_call(text: str) -> str | None:
    """The expression of the first complete CALC(...) in ``text``, if any."""
    m = CALL_RE.search(text)
    return m.group(1) if m else None


def find_question(text: str) -> str | None:
    """The arithmetic of the last "what is ...?" in ``text``, if any."""
    found = QUESTION_RE.findall(text)
    return found[-1].strip() if found else None
