"""
Run the hub-facing tests (marker ``hub``) against each JupyterHub virtualenv that ``make test-compat``
built, one after the other, and end with one line per hub: ``jupyterhub 3.1: N passed, N failed``.

pytest and the proxy under test run from this interpreter's venv; only the hub and the single-user
servers come from ``.compat/hub-<version>`` (the harness reads ``JDS_TEST_HUB_PREFIX``). Each run's
resolved versions are printed from the venv's ``versions.txt`` (what the README's table quotes).
Exit status: 0 only if every run passed and ran at least one test.

``--lean-args`` (CI: ``make test-compat COMPAT_LEAN=1``) are added for every venv except those named
by ``--full``: CI runs every hub test against JupyterHub 3.1 and leaves the files named in the
Makefile's ``COMPAT_LEAN_ARGS`` out for the others (``.ci/run`` says why).

Usage: python .ci/test_compat.py [--pytest-args "..."] [--lean-args "..." --full 3.1] VENV [VENV ...]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What the README's "Works with" table names for each venv.
SHOWN = ("jupyterhub", "jupyter_server", "jupyter-server", "notebook", "jupyterlab", "ipykernel", "jupyter_client")


@dataclass
class Outcome:
    name: str
    passed: int
    failed: int
    seconds: float
    versions: str

    def line(self) -> str:
        return f"{self.name}: {self.passed} passed, {self.failed} failed"


def resolved(venv: Path) -> str:
    """``jupyterhub 3.1.1, jupyter_server 1.24.0, ...`` from the venv's ``pip freeze``."""
    pins = {}
    for line in (venv / "versions.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and name.lower().replace("-", "_") in {s.replace("-", "_") for s in SHOWN}:
            pins[name.lower().replace("-", "_")] = version
    order = [s.replace("-", "_") for s in SHOWN]
    return ", ".join(f"{name} {pins[name]}" for name in dict.fromkeys(order) if name in pins)


def counts(junit: Path) -> tuple[int, int]:
    """(passed, failed) from pytest's JUnit XML; errors count as failures, skips as neither."""
    if not junit.exists():
        return 0, 1
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return tests - failed - skipped, failed


def run(venv: Path, pytest_args: list[str]) -> Outcome:
    name = "jupyterhub " + venv.name.removeprefix("hub-")
    versions = resolved(venv)
    print(f"\n=== {name} ({versions})", flush=True)
    junit = venv / "junit.xml"
    junit.unlink(missing_ok=True)
    env = {**os.environ, "JDS_TEST_HUB_PREFIX": str(venv.resolve())}
    started = time.monotonic()
    # a temporary directory of its own: pytest-of-<user> is shared with any other pytest on the machine
    command = [
        sys.executable, "-m", "pytest", "-m", "hub", f"--junitxml={junit}", f"--basetemp={venv / 'tmp'}",
        "-p", "no:cacheprovider", *pytest_args,
    ]  # fmt: skip
    code = subprocess.run(command, cwd=REPO, env=env).returncode
    passed, failed = counts(junit)
    if code != 0 and failed == 0:
        failed = 1  # pytest itself failed (collection, usage): count it
    if "--ignore" in " ".join(pytest_args):
        name += " (lean)"
    return Outcome(name, passed, failed, time.monotonic() - started, versions)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments for every run")
    parser.add_argument("--lean-args", default="", help="extra pytest arguments for the venvs not named by --full")
    parser.add_argument("--full", action="append", default=[], help="a hub version (3.1) that runs without --lean-args")
    parser.add_argument("venvs", nargs="+", type=Path)
    args = parser.parse_args()
    outcomes = []
    for venv in args.venvs:
        lean = [] if venv.name.removeprefix("hub-") in args.full else shlex.split(args.lean_args)
        outcomes.append(run(venv, shlex.split(args.pytest_args) + lean))
    print("\n=== make test-compat (README's \"Works with\" rows)")
    for outcome in outcomes:
        print(f"| {outcome.name.split()[1]} | {outcome.versions} |  ({outcome.seconds:.0f} s)")
    for outcome in outcomes:
        print(outcome.line())
    ok = all(o.failed == 0 and o.passed > 0 for o in outcomes)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
