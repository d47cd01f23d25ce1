"""
``jupyter-dev-server login`` against real hubs: one whose authenticator takes passwords (JupyterHub's
SharedPasswordAuthenticator, as PAM or LDAP would), one that signs in through a web page and refuses
the ``auth`` field (the paste path). The command it prints starts the daemon as printed, in an
environment without the virtual environment on PATH, as a new shell would be.
"""

from __future__ import annotations

import datetime
import os
import re
import shlex
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

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

PASSWORD = "correct horse battery staple"
USER = "carol"
PASSWORD_CONFIG = f"""
c.JupyterHub.authenticator_class = 'shared-password'
c.SharedPasswordAuthenticator.user_password = {PASSWORD!r}
"""
# An authenticator that signs in elsewhere (as OAuthenticator does): a "Sign in with" button instead
# of a password form, and no password is ever accepted, so the hub refuses the token API's `auth`.
SSO_CONFIG = """
from jupyterhub.auth import Authenticator
from traitlets import Unicode

class ExampleSSO(Authenticator):
    login_service = Unicode('Example SSO')

    async def authenticate(self, handler, data):
        return None

c.JupyterHub.authenticator_class = ExampleSSO
c.ExampleSSO.allow_all = True
"""


def _hub(directory: Path, ca: hub.TestCA, config: str) -> Iterator[JupyterHubProcess]:
    hub = JupyterHubProcess(directory, ca, extra_config=config)
    try:
        hub.start()
        hub.create_user(USER)
        yield hub
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def password_hub(tmp_path_factory: pytest.TempPathFactory, test_ca: hub.TestCA) -> Iterator[JupyterHubProcess]:
    yield from _hub(tmp_path_factory.mktemp("password-hub"), test_ca, PASSWORD_CONFIG)


@pytest.fixture(scope="module")
def sso_hub(tmp_path_factory: pytest.TempPathFactory, test_ca: hub.TestCA) -> Iterator[JupyterHubProcess]:
    yield from _hub(tmp_path_factory.mktemp("sso-hub"), test_ca, SSO_CONFIG)


def _fresh_shell_env(tmp_path: Path) -> dict[str, str]:
    """What a new login shell has: no virtual environment on PATH, our own XDG directories."""
    env = clean_environ({
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    })  # fmt: skip
    env.pop("VIRTUAL_ENV", None)
    return env


def login(hub: JupyterHubProcess, tmp_path: Path, stdin: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [venv_script("jupyter-dev-server"), "login", "--hub", hub.url, "--user", USER,
         "--ca-cert", str(hub.ca_path), "--tls-name", hub.tls_name, *extra],
        input=stdin, capture_output=True, text=True, timeout=120, env=_fresh_shell_env(tmp_path),
    )  # fmt: skip


def _private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) == 0o600


def _start_printed(command: str, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """Run a printed daemon command as printed (plus a free port), its log in a file."""
    log = tmp_path / "daemon.log"
    with log.open("wb") as sink:
        daemon = subprocess.Popen(
            [*shlex.split(command), "--listen", "tcp:0:interface=127.0.0.1"], stdout=sink,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path, env=_fresh_shell_env(tmp_path),
        )
    return daemon, log


def test_password_login_writes_a_private_token_the_daemon_runs_with(
    password_hub: JupyterHubProcess, tmp_path: Path
) -> None:
    hub = password_hub
    token_file = tmp_path / "hub-token"
    done = login(hub, tmp_path, PASSWORD + "\n", "--password-stdin", "--token-file", str(token_file),
                 "--expires-in", "3d")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert _private(token_file)
    token = token_file.read_text().strip()
    assert token not in done.stdout + done.stderr

    # The hub issued it to carol, named after this machine, for three days.
    me = requests.get(f"{hub.url}/hub/api/user", headers={"Authorization": f"token {token}"},
                      verify=hub.ca_path, timeout=30)  # fmt: skip
    assert me.status_code == 200 and me.json()["name"] == USER
    tokens = hub.api("GET", f"users/{USER}/tokens").json()["api_tokens"]
    ours = [t for t in tokens if t["id"] == me.json()["token_id"]]
    assert ours and ours[0]["note"] == f"jupyter-dev-server on {socket.gethostname()}"
    expires = datetime.datetime.fromisoformat(ours[0]["expires_at"].replace("Z", "+00:00"))
    left = expires - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(days=2, hours=23) < left <= datetime.timedelta(days=3)
    assert "expires " + expires.strftime("%Y-%m-%d") in done.stdout

    # The printed command starts the daemon in managed mode, as printed, from a new shell: the saved
    # profile holds the hub, the CA and the token file.
    command = re.search(r"^  (\S*jupyter-dev-server)$", done.stdout, re.MULTILINE).group(1)
    assert _saved_profile(tmp_path)["token-file"] == str(token_file)
    daemon, log = _start_printed(command, tmp_path)
    try:
        ready = poll(lambda: ProxyProcess.READY_LINE.search(log.read_text()) or _exited(daemon, log),
                     60, "the daemon's URL", 0.2, lambda: tail(log.read_text()))  # fmt: skip
        port, local = ready_address(ready)
        base = f"http://127.0.0.1:{port}"
        assert local and local != token
        hub.start_server(USER)
        listing = requests.get(f"{base}/api/contents", headers={"Authorization": f"token {local}"}, timeout=60)
        assert listing.status_code == 200, listing.text

        # A token that expires within a week: the daemon's log and `status` say how to renew it.
        warning = poll(lambda: re.search(r"The hub token this proxy holds expires .*?: renew it with `([^`]+)`",
                                         log.read_text()), 60, "the expiry warning", 0.2,
                       lambda: tail(log.read_text()))  # fmt: skip
        renew = warning.group(1)
        assert "(in 2 days)" in warning.group(0)
        status = subprocess.run(
            [venv_script("jupyter-dev-server"), "status", "--url", base], capture_output=True, text=True,
            timeout=60, env=_fresh_shell_env(tmp_path),
        )
        assert status.returncode == 0, status.stderr
        assert f"renew it with `{renew}`" in status.stdout
        assert token not in log.read_text()
    finally:
        stop_pid(daemon, 30)

    # The renewal command runs as printed too (no terminal: the password comes from stdin).
    renewed = subprocess.run(shlex.split(renew), input=PASSWORD + "\n", capture_output=True, text=True,
                             timeout=120, env=_fresh_shell_env(tmp_path))  # fmt: skip
    assert renewed.returncode == 0, renewed.stderr
    assert _private(token_file) and token_file.read_text().strip() != token
    assert "expires " + (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=30)).strftime(
        "%Y-%m-%d") in renewed.stdout


def _exited(daemon: subprocess.Popen[bytes], log: Path) -> None:
    if daemon.poll() is not None:
        raise AssertionError(f"the daemon exited with {daemon.returncode}:\n{tail(log.read_text())}")


def test_wrong_password_is_one_sentence_and_exit_1(password_hub: JupyterHubProcess, tmp_path: Path) -> None:
    token_file = tmp_path / "hub-token"
    done = login(password_hub, tmp_path, "not the password\n", "--password-stdin", "--token-file", str(token_file))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"jupyter-dev-server login: The hub did not accept this password for {USER}; run login again."
    ]
    assert not token_file.exists()


def test_default_token_file_is_under_xdg_config_home(password_hub: JupyterHubProcess, tmp_path: Path) -> None:
    done = login(password_hub, tmp_path, PASSWORD + "\n", "--password-stdin")
    assert done.returncode == 0, done.stderr
    token_file = tmp_path / "config" / "jupyter-dev-server" / "hub-token"
    assert _private(token_file)
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    assert _saved_profile(tmp_path)["token-file"] == str(token_file)


def _saved_profile(tmp_path: Path, name: str = "default") -> dict[str, object]:
    return saved_profiles(tmp_path / "config")[name]


def test_sso_hub_reads_a_pasted_token_and_checks_it(sso_hub: JupyterHubProcess, tmp_path: Path) -> None:
    hub = sso_hub
    # The hub really refuses passwords through the token API.
    refused = requests.post(f"{hub.url}/hub/api/users/{USER}/tokens",
                            json={"auth": {"username": USER, "password": "anything"}},
                            verify=hub.ca_path, timeout=30)  # fmt: skip
    assert refused.status_code == 403

    token_file = tmp_path / "hub-token"
    wrong = login(hub, tmp_path, "0123456789abcdef\n", "--token-file", str(token_file))
    assert wrong.returncode == 1
    assert "does not accept that token" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 2
    assert not token_file.exists()

    pasted = hub.new_token(USER, note="made on the token page")
    done = login(hub, tmp_path, pasted + "\n", "--token-file", str(token_file))
    assert done.returncode == 0, done.stderr
    assert "single sign-on" in done.stderr and f"{hub.url.replace('127.0.0.1', hub.tls_name)}/hub/token" in done.stderr
    assert token_file.read_text().strip() == pasted and _private(token_file)
    assert "never expires" in done.stdout  # minted without an expiry
    assert re.search(r"^  \S*jupyter-dev-server$", done.stdout, re.MULTILINE)
    assert _saved_profile(tmp_path)["token-file"] == str(token_file)
    assert os.path.isabs(shlex.split(re.search(r"^  (\S+)", done.stdout, re.MULTILINE).group(1))[0])


def test_a_hub_certificate_the_ca_does_not_sign_is_named_before_any_password(
    password_hub: JupyterHubProcess, tmp_path: Path
) -> None:
    done = subprocess.run(
        [venv_script("jupyter-dev-server"), "login", "--hub", password_hub.url, "--user", USER,
         "--ca-cert", str(password_hub.wrong_ca_path), "--tls-name", password_hub.tls_name, "--password-stdin"],
        input=PASSWORD + "\n", capture_output=True, text=True, timeout=120, env=_fresh_shell_env(tmp_path),
    )  # fmt: skip
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("jupyter-dev-server login: The hub's certificate") and "--ca-cert" in line, line
