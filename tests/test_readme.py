"""
The README is the first thing a newcomer runs: its commands must exist and its tables must match the
code. Commands and options are extracted from it and checked against the Makefile and ``--help``;
the troubleshooting messages against the source that prints them.
"""

from __future__ import annotations

import functools
import plistlib
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from hub import REPO_ROOT, clean_environ, venv_script

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
SUBCOMMANDS = ("check", "status", "login", "config", "demo", "rotate-token")
# usage.Options adds these to every command; the README need not list them.
BUILT_IN = {"--help", "--version"}


def fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def command_lines(text: str) -> list[str]:
    """Every line of a fenced block, without its trailing comment."""
    lines = []
    for block in fenced_blocks(text):
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                lines.append(line)
    return lines


def makefile_targets() -> set[str]:
    text = (REPO_ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.MULTILINE))


@functools.cache
def help_options(*command: str) -> frozenset[str]:
    """The long options a command's ``--help`` lists."""
    program = venv_script(command[0])
    done = subprocess.run(
        [program, *command[1:], "--help"], capture_output=True, text=True, timeout=60, env=clean_environ()
    )
    assert done.returncode == 0, done.stderr
    return frozenset(re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)", done.stdout, re.MULTILINE))


def test_the_two_commands_are_make_targets() -> None:
    makes = [line for line in command_lines(README) if line.startswith("make ")]
    commands = {shlex.split(line)[1] for line in makes}
    assert {"demo", "test"} <= commands, "the README must show `make demo` and `make test`"
    missing = commands - makefile_targets()
    assert not missing, f"README runs make targets the Makefile lacks: {missing}"
    if shutil.which("make"):
        for target in sorted(commands):
            dry = subprocess.run(["make", "-n", target], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
            assert dry.returncode == 0, dry.stderr


def readme_table_options() -> set[str]:
    section = README.split("## Options", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `--")]
    return {re.match(r"\| `(--[a-z0-9-]+)`", row).group(1) for row in rows}


def test_options_table_matches_help() -> None:
    table = readme_table_options()
    listed = help_options("jupyter-dev-server") - BUILT_IN
    assert table - listed == set(), "in the README's options table but not in --help"
    assert listed - table == set(), "in --help but not in the README's options table"


def _program_options(args: list[str]) -> list[tuple[tuple[str, ...], str]]:
    """``(command, option)`` pairs of one README command line, each option given to the command that parses it."""
    pairs: list[tuple[tuple[str, ...], str]] = []
    if args[0] == "jupyter-dev-server":
        command = ("jupyter-dev-server", args[1]) if len(args) > 1 and args[1] in SUBCOMMANDS else ("jupyter-dev-server",)
        pairs += [(command, arg.split("=")[0]) for arg in args if arg.startswith("--")]
    elif args[0] == "twistd":
        split = args.index("jupyter-dev-server")
        pairs += [(("twistd",), arg.split("=")[0]) for arg in args[1:split] if arg.startswith("--")]
        pairs += [(("jupyter-dev-server",), arg.split("=")[0]) for arg in args[split:] if arg.startswith("--")]
    return pairs


def readme_commands() -> list[list[str]]:
    commands = []
    for line in command_lines(README):
        try:
            args = shlex.split(line)
        except ValueError:
            continue
        if args and args[0] in ("jupyter-dev-server", "twistd"):
            commands.append(args)
    return commands


def test_readme_commands_use_real_options() -> None:
    commands = readme_commands()
    assert any(args[0] == "twistd" for args in commands)
    assert {args[1] for args in commands if len(args) > 1} >= set(SUBCOMMANDS) - {"demo"}
    unknown = [
        f"{' '.join(command)} {option}"
        for args in commands
        for command, option in _program_options(args)
        if option not in help_options(*command)
    ]
    assert unknown == [], "README commands use options their program does not have"


def _source_text() -> str:
    """The package's source with implicitly concatenated string literals joined, as they print."""
    text = "\n".join(path.read_text() for path in sorted((REPO_ROOT / "jds").glob("*.py")))
    return re.sub(r"\"\s*\n\s*f?\"", "", text)


def troubleshooting_rows() -> list[tuple[str, str | None]]:
    section = README.split("## Troubleshooting", 1)[1]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) < 2:
            continue
        message = cells[0].strip("`")
        reason = cells[1].strip("`") if len(cells) == 3 and re.fullmatch(r"`[a-z-]+`", cells[1]) else None
        rows.append((message, reason))
    return rows


@pytest.mark.parametrize(("message", "reason"), troubleshooting_rows(), ids=lambda value: str(value)[:40])
def test_troubleshooting_messages_are_the_ones_printed(message: str, reason: str | None) -> None:
    source = _source_text()
    fragments = [part.strip(" ") for part in message.split("...") if len(part.strip(" .:,()")) >= 4]
    assert fragments
    for fragment in fragments:
        assert fragment in source, f"{fragment!r} is printed nowhere in jds/"
    if reason is not None:
        assert f'"{reason}"' in source, f"no error has the reason {reason!r}"


def test_docs_exist() -> None:
    for path in ("docs/ide/vscode.md", "docs/ide/pycharm.md", "docs/jupyter-dev-server.service"):
        assert (REPO_ROOT / path).is_file(), path
    for target in re.findall(r"\]\(((?:docs|\.\./)[^)#]*)", README):
        assert (REPO_ROOT / target).exists(), f"README links to a missing {target}"
    # Both daily-life files run the default profile that `login` saved: the script, no options.
    unit = (REPO_ROOT / "docs" / "jupyter-dev-server.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.MULTILINE).group(1).split()
    assert Path(exec_start[0]).name == "jupyter-dev-server" and exec_start[1:] == []
    with (REPO_ROOT / "docs" / "org.jupyter-dev-server.plist").open("rb") as file:
        agent = plistlib.load(file)
    assert [Path(arg).name for arg in agent["ProgramArguments"]] == ["jupyter-dev-server"]
    assert agent["RunAtLoad"] is True and agent["Label"] == "org.jupyter-dev-server"
