"""
Saved profiles against a real hub, run as a user would from a new shell with its own
``XDG_CONFIG_HOME``/``XDG_STATE_HOME``: ``login`` saves the profile and the bare command runs it;
two profiles side by side; the command line beats the profile; ``config`` says where each setting
came from and never shows a token. The hub's spawner has an options form (``tests/form_spawner.py``,
which records each start's ``user_options``): ``--server-options`` reach it in managed and
pass-through mode, ``check`` reports the options a form start chose, a refused option is named in
the 503.
"""

from __future__ import annotations

import json
import re
import shlex
import stat
import subprocess
from collections.abc import Iterator
from html import unescape
from pathlib import Path
from typing import Any

import hub
import pytest
import requests
from hub import (
    JupyterHubProcess,
    ProxyProcess,
    clean_environ,
    poll,
    ready_address,
    saved_profiles,
    stop_pid,
    tail,
    venv_script,
)

from jds.options import NO_HUB

PASSWORD = "correct horse battery staple"
TESTS = Path(__file__).resolve().parent
USERS = ("erin", "frank", "gina", "hana", "ivan")
HTTP_TIMEOUT = 180


def _hub_config(record: Path) -> str:
    return f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from form_spawner import FormSpawner
c.JupyterHub.spawner_class = FormSpawner
c.FormSpawner.record_file = {str(record)!r}
c.JupyterHub.authenticator_class = 'shared-password'
c.SharedPasswordAuthenticator.user_password = {PASSWORD!r}
"""


@pytest.fixture(scope="module")
def form_hub(tmp_path_factory: pytest.TempPathFactory, test_ca: hub.TestCA) -> Iterator[JupyterHubProcess]:
    directory = tmp_path_factory.mktemp("form-hub")
    running = JupyterHubProcess(directory, test_ca, extra_config=_hub_config(directory / "user_options.jsonl"))
    running.record_path = directory / "user_options.jsonl"  # type: ignore[attr-defined]
    try:
        running.start()
        for user in USERS:
            running.create_user(user)
        yield running
    finally:
        running.stop()


def started_with(form_hub: JupyterHubProcess, user: str) -> list[Any]:
    """The user_options of each start of ``user``'s server, as the spawner received them."""
    path: Path = form_hub.record_path  # type: ignore[attr-defined]
    lines = path.read_text().splitlines() if path.exists() else []
    return [entry["user_options"] for entry in map(json.loads, lines) if entry["user"] == user]


def shell_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A new login shell's: no virtual environment on PATH, the test's own XDG folders."""
    env = clean_environ({
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        **extra,
    })  # fmt: skip
    env.pop("VIRTUAL_ENV", None)
    return env


def run(tmp_path: Path, *args: str, stdin: str = "", **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([venv_script("jupyter-dev-server"), *args], input=stdin, capture_output=True, text=True,
                          timeout=HTTP_TIMEOUT, env=shell_env(tmp_path, **extra))  # fmt: skip


def login(form_hub: JupyterHubProcess, tmp_path: Path, user: str, *extra: str) -> subprocess.CompletedProcess[str]:
    done = run(tmp_path, "login", "--hub", form_hub.url, "--user", user, "--ca-cert", str(form_hub.ca_path),
               "--tls-name", form_hub.tls_name, "--password-stdin", *extra, stdin=PASSWORD + "\n")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def printed_command(done: subprocess.CompletedProcess[str]) -> str:
    return re.search(r"^  (\S*jupyter-dev-server\b.*)$", done.stdout, re.MULTILINE).group(1)


def profiles(tmp_path: Path) -> dict[str, Any]:
    return saved_profiles(tmp_path / "config")


def listen_port(profile: dict[str, Any]) -> int:
    return int(re.fullmatch(r"tcp:(\d+):interface=127\.0\.0\.1", profile["listen"]).group(1))


class Daemon:
    """A printed command, run as printed from a new shell; its log in a file; stopped by its pid."""

    def __init__(self, command: str, tmp_path: Path, name: str = "daemon") -> None:
        self.log = tmp_path / f"{name}.log"
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(shlex.split(command), stdout=sink, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=tmp_path, env=shell_env(tmp_path))  # fmt: skip

    def ready(self) -> tuple[str, str]:
        """``(base URL, local token)`` once the daemon prints the IDE's URL."""

        def printed() -> re.Match[str] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n{tail(self.text())}")
            return ProxyProcess.READY_LINE.search(self.text())

        found = poll(printed, 60, "the daemon's URL", 0.2, lambda: tail(self.text()))
        port, token = ready_address(found)
        return f"http://127.0.0.1:{port}", token

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_pid(self.proc, 30)


def contents(base: str, token: str) -> requests.Response:
    return requests.get(f"{base}/api/contents", headers={"Authorization": f"token {token}"}, timeout=HTTP_TIMEOUT)


def test_login_then_the_bare_command_serves_and_check_passes(form_hub: JupyterHubProcess, tmp_path: Path) -> None:
    done = login(form_hub, tmp_path, "erin")
    config = tmp_path / "config" / "jupyter-dev-server" / "config.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600 and stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    token = (tmp_path / "config" / "jupyter-dev-server" / "hub-token").read_text().strip()
    assert token not in config.read_text() and token not in done.stdout + done.stderr
    profile = profiles(tmp_path)["default"]
    assert profile["user"] == "erin" and profile["tls-name"] == form_hub.tls_name
    assert profile["token-file"] == str(tmp_path / "config" / "jupyter-dev-server" / "hub-token")
    # The one command that runs it: the script alone, by its absolute path (a new shell has no PATH to it).
    command = printed_command(done)
    assert shlex.split(command) == [venv_script("jupyter-dev-server")]

    daemon = Daemon(command, tmp_path)
    try:
        base, local = daemon.ready()
        assert base == f"http://127.0.0.1:{listen_port(profile)}"  # the port login chose and saved
        listing = contents(base, local)  # the proxy starts erin's stopped server (managed mode)
        assert listing.status_code == 200, listing.text
        assert started_with(form_hub, "erin") == [{}]

        checked = run(tmp_path, "check")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "FAIL" not in checked.stdout and "PASS  kernelspecs" in checked.stdout
        status = run(tmp_path, "status")
        assert status.returncode == 0, status.stderr
        assert "managed mode" in status.stdout and "erin" in status.stdout

        shown = run(tmp_path, "config", JUPYTERHUB_API_TOKEN=token)
        assert shown.returncode == 0, shown.stderr
        assert token not in shown.stdout + shown.stderr
        assert re.search(rf"^  user +erin +\(profile default in {re.escape(str(config))}\)$", shown.stdout, re.M)
        assert re.search(r"^  token-file +.*\(env JUPYTERHUB_API_TOKEN\)$", shown.stdout, re.M)
        assert re.search(r"^  spawn-timeout +600 +\(default\)$", shown.stdout, re.M)
        document = json.loads(run(tmp_path, "config", "--json", "--user", "other").stdout)
        assert document["profile"] == "default" and document["file"] == str(config)
        assert document["settings"]["user"] == {"value": "other", "origin": "option"}
        assert document["settings"]["hub"]["origin"] == f"profile default in {config}"
        assert token not in daemon.text()
    finally:
        daemon.stop()
        form_hub.stop_server("erin")


def test_two_profiles_side_by_side(form_hub: JupyterHubProcess, tmp_path: Path) -> None:
    first = login(form_hub, tmp_path, "frank", "--profile", "frank")
    second = login(form_hub, tmp_path, "gina", "--profile", "gina")
    saved = profiles(tmp_path)
    assert listen_port(saved["frank"]) != listen_port(saved["gina"])
    assert saved["frank"]["token-file"] != saved["gina"]["token-file"]
    assert shlex.split(printed_command(first))[1:] == ["--profile", "frank"]

    daemons = [Daemon(printed_command(first), tmp_path, "frank"), Daemon(printed_command(second), tmp_path, "gina")]
    try:
        (frank_url, frank_local), (gina_url, gina_local) = (daemon.ready() for daemon in daemons)
        assert (frank_url, gina_url) == tuple(f"http://127.0.0.1:{listen_port(saved[n])}" for n in ("frank", "gina"))
        assert frank_local != gina_local  # each its own local token file (local-token-frank, local-token-gina)
        for base, local in ((frank_url, frank_local), (gina_url, gina_local)):
            assert contents(base, local).status_code == 200
        assert contents(frank_url, gina_local).status_code in (401, 403)
        for name in ("frank", "gina"):
            status = run(tmp_path, "status", "--profile", name)
            assert status.returncode == 0, status.stderr
            assert f"/user/{name}/" in status.stdout
    finally:
        for daemon in daemons:
            daemon.stop()
        form_hub.stop_server("frank")
        form_hub.stop_server("gina")


def test_no_profile_and_no_hub_is_one_sentence(tmp_path: Path) -> None:
    for command, name in (((), "jupyter-dev-server"), (("check",), "jupyter-dev-server check")):
        done = run(tmp_path, *command)
        assert done.returncode == 2
        assert done.stderr.splitlines() == [f"{name}: {NO_HUB}"]
    missing = run(tmp_path, "--profile", "nope")
    assert missing.returncode == 2 and "login --profile nope" in missing.stderr


def _submit_spawn_form(form_hub: JupyterHubProcess, user: str, fields: dict[str, str]) -> None:
    """What the user does in a browser: sign in, open the spawn page, choose, press Start."""
    session = requests.Session()
    ca = str(form_hub.ca_path)  # per request: a session's own is overridden by REQUESTS_CA_BUNDLE
    url = form_hub.url
    page = session.get(f"{url}/hub/login", timeout=60, verify=ca)
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text)
    signed = session.post(f"{url}/hub/login", data={"username": user, "password": PASSWORD,
                                                    **({"_xsrf": xsrf.group(1)} if xsrf else {})}, timeout=60, verify=ca)
    assert signed.status_code == 200, signed.text[:500]
    form = session.get(f"{url}/hub/spawn/{user}", timeout=60, verify=ca)
    assert form.status_code == 200 and 'name="partition"' in form.text
    action = unescape(re.search(r'<form[^>]*id="spawn_form"[^>]*action="([^"]+)"', form.text).group(1))
    started = session.post(f"{url}{action}" if action.startswith("/") else action, data=fields, timeout=120,
                           verify=ca)
    assert started.status_code == 200, started.text[:500]
    poll(lambda: (form_hub.server_model(user) or {}).get("ready") or None, 90, f"{user}'s server", 0.2)


def test_spawn_options_reach_the_spawner_and_a_refused_one_is_named(
    form_hub: JupyterHubProcess, tmp_path: Path
) -> None:
    user = "hana"
    done = login(form_hub, tmp_path, user, "--profile", "gpu", "--server-options", "partition=gpu",
                 "--server-options", "gpus:=2")  # fmt: skip
    assert profiles(tmp_path)["gpu"]["server_options"] == {"partition": "gpu", "gpus": 2}

    # Managed mode: the proxy starts the stopped server with the profile's options, as typed.
    daemon = Daemon(printed_command(done), tmp_path, "gpu")
    try:
        base, local = daemon.ready()
        assert contents(base, local).status_code == 200
        assert started_with(form_hub, user)[-1] == {"partition": "gpu", "gpus": 2}
        checked = run(tmp_path, "check", "--profile", "gpu")
        assert checked.returncode == 0, checked.stdout
        assert "PASS  options      the proxy starts your server with --server-options partition=gpu, gpus:=2" in (
            checked.stdout)
        # the running daemon says which profile it runs and what a start sends; never a token
        shown = run(tmp_path, "status", "--profile", "gpu", "--json")
        assert shown.returncode == 0, shown.stderr
        report = json.loads(shown.stdout)
        assert (report["profile"], report["server_options"]) == ("gpu", {"partition": "gpu", "gpus": 2})
        held = Path(profiles(tmp_path)["gpu"]["token-file"]).read_text().strip()
        assert local not in shown.stdout and held not in shown.stdout
        text = run(tmp_path, "status", "--profile", "gpu").stdout
        assert "  profile:    gpu\n" in text and "  starts:     with --server-options partition=gpu, gpus:=2" in text
    finally:
        daemon.stop()
        form_hub.stop_server(user)

    # An option on the command line beats the profile's; the hub refuses it, the 503 names it.
    daemon = Daemon(printed_command(done) + " --server-options gpus:=7", tmp_path, "refused")
    try:
        base, local = daemon.ready()
        refused = contents(base, local)
        assert refused.status_code == 503, refused.text
        assert refused.json()["reason"] == "spawn-refused"
        message = refused.json()["message"]
        assert "--server-options gpus:=7" in message and "more than the 4" in message, message
        assert started_with(form_hub, user)[-1] == {"gpus": 7}
    finally:
        daemon.stop()

    # A start from the hub's spawn form in a browser; then a profile without options: check names the
    # form's fields, and the proxy's start (no options) gets the hub's reuse of them.
    _submit_spawn_form(form_hub, user, {"partition": "cpu", "gpus": "1"})
    assert started_with(form_hub, user)[-1] == {"partition": ["cpu"], "gpus": ["1"]}
    form_hub.stop_server(user)
    plain = login(form_hub, tmp_path, user, "--profile", "plain")
    checked = run(tmp_path, "check", "--profile", "plain")
    assert re.search(r"^PASS  options +your hub's spawner takes options: .* chose partition, gpus;", checked.stdout,
                     re.M), checked.stdout  # fmt: skip
    assert '--server-options partition=...' in checked.stdout
    daemon = Daemon(printed_command(plain), tmp_path, "plain")
    try:
        base, local = daemon.ready()
        assert contents(base, local).status_code == 200
        assert started_with(form_hub, user)[-1] == {"partition": ["cpu"], "gpus": ["1"]}
    finally:
        daemon.stop()
        form_hub.stop_server(user)


def test_pass_through_mode_sends_the_options_too(form_hub: JupyterHubProcess, tmp_path: Path) -> None:
    user = "ivan"
    daemon = Daemon(shlex.join([
        venv_script("jupyter-dev-server"), "--hub", form_hub.url, "--user", user, "--ca-cert", str(form_hub.ca_path),
        "--tls-name", form_hub.tls_name, "--listen", "tcp:0:interface=127.0.0.1",
        "--server-options", "partition=gpu", "--server-options", "gpus:=1",
    ]), tmp_path, "pass-through")  # fmt: skip
    try:
        base, _ = daemon.ready()
        token = form_hub.new_token(user)
        listing = contents(base, token)  # the IDE's own token starts the server
        assert listing.status_code == 200, listing.text
        assert started_with(form_hub, user) == [{"partition": "gpu", "gpus": 1}]
    finally:
        daemon.stop()
        form_hub.stop_server(user)
