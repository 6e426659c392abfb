"""The webhook sink's conditions (``where = ["verifiedCode == 0"]``): parsed once, tested per event.

Pure logic, apart from the sink's HTTP, so the configuration checks them without importing httpx.
``NAME OP VALUE`` with ``==  !=  <  <=  >  >=``. NAME is a member of the event at any depth, or a
dotted path from such a member (``data.personType``); lists are looked into. VALUE is JSON or a bare
word. A number and a string holding a number compare as numbers. The condition holds when any value
found satisfies it. (docs/webhooks.md)
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterator, NamedTuple

import orjson

MAX_DEPTH = 8
_CONDITION = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(==|!=|<=|>=|<|>)\s*(.+?)\s*$")
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}


class ConditionError(ValueError):
    pass


class Condition(NamedTuple):
    path: tuple[str, ...]
    op: str
    value: Any

    def holds(self, body: dict) -> bool:
        return any(_compare(found, self.op, self.value) for found in _lookup(body, self.path))


def parse_condition(text: str) -> Condition:
    match = _CONDITION.match(text)
    if match is None:
        raise ConditionError(f"{text!r}: expected NAME OP VALUE, e.g. 'verifiedCode == 0' (OP: == != < <= > >=)")
    name, op, raw = match.groups()
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = raw
    if isinstance(value, (dict, list)):
        raise ConditionError(f"{text!r}: compare with a number, a string, true, false or null")
    return Condition(tuple(name.split(".")), op, value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _compare(found: Any, op: str, want: Any) -> bool:
    if isinstance(found, (dict, list)):
        return False
    if isinstance(found, bool) or isinstance(want, bool) or found is None or want is None:
        same = found is want or (type(found) is type(want) and found == want)     # 1 is not true
        return {"==": same, "!=": not same}.get(op, False)
    a, b = _number(found), _number(want)
    if a is not None and b is not None and (isinstance(found, (int, float)) or isinstance(want, (int, float))):
        return _OPS[op](a, b)
    if isinstance(found, str) and isinstance(want, str):
        return _OPS[op](found, want)
    return op == "!="


def _anywhere(node: Any, key: str, depth: int = 0) -> Iterator[Any]:
    if depth > MAX_DEPTH:
        return
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            else:
                yield from _anywhere(v, key, depth + 1)
    elif isinstance(node, list):
        for v in node:
            yield from _anywhere(v, key, depth + 1)


def _lookup(body: dict, path: tuple[str, ...]) -> Iterator[Any]:
    values = list(_anywhere(body, path[0]))
    for segment in path[1:]:
        values = [item[segment] for v in values for item in (v if isinstance(v, list) else [v])
                  if isinstance(item, dict) and segment in item]
    for v in values:
        if isinstance(v, list):
            yield from v
        else:
            yield v
