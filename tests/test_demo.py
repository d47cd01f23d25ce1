"""
``jupyter-dev-server demo`` as a user runs it: a process that prints a URL and a curl line. A kernel
runs ``print(6*7)`` through that URL, the commands it prints work, and Ctrl-C (SIGINT) leaves no
process and no temporary directory behind.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
from pathlib import Path

import psutil
import requests
from hub import HarnessError, clean_environ, poll, run_in_kernel, stop_pid, tail, venv_script

READY = re.compile(r"IDE URL: (http://127\.0\.0\.1:\d+)/\?token=(\S+)")


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Family:
    """Every process the demo started, seen while it runs (psutil guards against pid reuse)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.members: dict[int, psutil.Process] = {}

    def record(self) -> None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.root).children(recursive=True):
                self.members.setdefault(child.pid, child)

    def alive(self) -> list[str]:
        return [f"{p.pid} {' '.join(p.cmdline())}" for p in self.members.values() if _alive(p)]

    def kill(self) -> None:
        for process in self.members.values():
            if _alive(process):
                with contextlib.suppress(psutil.Error):
                    process.kill()


def test_demo_runs_a_kernel_and_cleans_up(tmp_path: Path) -> None:
    output = tmp_path / "demo.out"
    with output.open("wb") as sink:
        demo = subprocess.Popen(
            [venv_script("jupyter-dev-server"), "demo", "--port", "0"],
            stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
            env=clean_environ({"XDG_CONFIG_HOME": str(tmp_path / "config")}),
        )
    family = Family(demo.pid)
    try:
        def ready() -> re.Match[str] | None:
            family.record()
            if demo.poll() is not None:
                raise HarnessError(f"the demo exited with {demo.returncode}:\n{tail(output.read_text())}")
            return READY.search(output.read_text())

        match = poll(ready, 300, "the demo's IDE URL", 0.2, lambda: tail(output.read_text()))
        base, token = match.group(1), match.group(2)
        text = output.read_text()
        directory = Path(re.search(r"Temporary files: (\S+)", text).group(1))
        assert directory.is_dir()
        family.record()
        pids = {int(pid) for pid in re.findall(r"\bpid (\d+)", text)}
        assert len(pids) == 2 and pids <= set(family.members), (pids, family.members)

        # The curl line it printed lists the kernelspecs.
        curl = re.search(r"curl -s '(\S+)'", text).group(1)
        specs = requests.get(curl, timeout=30)
        assert specs.status_code == 200, specs.text
        assert "python3" in specs.json()["kernelspecs"]

        # A kernel runs through the IDE URL, WebSocket and all.
        assert run_in_kernel(base, token, "print(6*7)") == "42\n"

        # The other commands it printed run as printed in a new shell (no virtual environment on
        # PATH), and no token is on their command lines, where `ps` would show it.
        # They use the profile the demo saved (in the demo's XDG_CONFIG_HOME, as in the user's shell).
        config = tmp_path / "config" / "jupyter-dev-server" / "config.toml"
        assert "[profiles.demo]" in config.read_text()
        fresh = clean_environ({"PATH": "/usr/local/bin:/usr/bin:/bin", "XDG_STATE_HOME": str(tmp_path / "state"),
                               "XDG_CONFIG_HOME": str(tmp_path / "config")})  # fmt: skip
        fresh.pop("VIRTUAL_ENV", None)
        for name in ("status", "check"):
            line = re.search(rf"^  (\S*jupyter-dev-server {name} --profile demo)$", text, re.MULTILINE).group(1)
            assert token not in line and "--token " not in line, line
            done = subprocess.run(["/bin/sh", "-c", line], capture_output=True, text=True, timeout=120, env=fresh)
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
            if name == "status":
                assert "is running" in done.stdout, done.stdout

        # IDEs probe /tree: Notebook 7 answers it.
        tree = requests.get(f"{base}/tree?token={token}", timeout=30)
        assert tree.status_code == 200 and "<html" in tree.text.lower(), tree.status_code

        # The hub token stays with the proxy: it is in no line the demo or the proxy printed.
        hub_token = (directory / "hub-token").read_text().strip()
        assert hub_token not in output.read_text()

        family.record()
        demo.send_signal(signal.SIGINT)
        assert demo.wait(120) == 0, tail(output.read_text())
        assert "Stopped; removed" in output.read_text()
        assert family.alive() == [], "left behind after Ctrl-C"
        assert not directory.exists()
        assert "[profiles.demo]" not in config.read_text()  # its files are gone: so is its profile
    finally:
        if demo.poll() is None:
            stop_pid(demo, 60, signal.SIGINT)
        family.kill()
