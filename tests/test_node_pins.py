"""
The Node tools install cleanly on the Node.js the README names: every package in tests/node's lock
file accepts that version in its ``engines`` (an unaccepted one is npm's EBADENGINE warning, and a
risk of a tool that does not run).
"""

from __future__ import annotations

import json
import re

import pytest
from hub import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
LOCK = json.loads((REPO_ROOT / "tests" / "node" / "package-lock.json").read_text(encoding="utf-8"))


def _version(text: str) -> tuple[int, ...]:
    parts = [int(p) for p in text.split(".") if p.isdigit()]
    return tuple(parts + [0] * (3 - len(parts)))


def _comparator(op: str, wanted: str, have: tuple[int, ...]) -> bool:
    if wanted in ("*", "x", ""):
        return True
    given = len(wanted.split("."))
    low = _version(wanted)
    if op in ("", "=", "^", "~"):
        if op == "^" or (op == "" and given == 1):
            high = (low[0] + 1, 0, 0)
        elif op == "~" or (op == "" and given == 2):
            high = (low[0], low[1] + 1, 0)
        else:
            return have == low
        return low <= have < high
    return {">=": have >= low, ">": have > low, "<=": have <= low, "<": have < low}[op]


def satisfies(version: str, spec: str) -> bool:
    """A small semver range check: ``||`` alternatives of space-separated comparators."""
    have = _version(version)
    for alternative in spec.split("||"):
        comparators = re.findall(r"(>=|<=|>|<|\^|~|=)?\s*v?([\d.]+|\*|x)", alternative)
        if comparators and all(_comparator(op, wanted, have) for op, wanted in comparators):
            return True
    return False


@pytest.mark.parametrize(("version", "spec", "ok"), [
    ("20.0.0", ">=20", True), ("20.0.0", ">= 20", True), ("20.0.0", ">=22.12.0", False),
    ("20.0.0", "^16 || ^18 || >=20", True), ("18.2.0", "^16 || ^18 || >=20", True), ("19.0.0", "^16 || ^18", False),
    ("20.1.0", "~20.0.1", False), ("20.0.5", "~20.0.1", True), ("20.0.0", "*", True), ("20.0.0", ">=12 <21", True),
])  # fmt: skip
def test_range_check(version: str, spec: str, ok: bool) -> None:
    assert satisfies(version, spec) is ok


def test_every_locked_package_runs_on_the_readmes_node() -> None:
    named = re.search(r"Node\.js (\d+) or later", README)
    assert named, "the README must name the Node.js version the tools need"
    node = named.group(1)
    assert LOCK["packages"][""]["engines"]["node"] == f">={node}"
    refused = {
        path: package["engines"]["node"]
        for path, package in LOCK["packages"].items()
        if isinstance(package.get("engines"), dict) and "node" in package["engines"]
        and not satisfies(f"{node}.0.0", package["engines"]["node"])
    }
    assert refused == {}, f"these need a newer Node than {node}"
