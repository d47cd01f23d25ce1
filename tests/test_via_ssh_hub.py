"""
Issue 19, ``--via ssh://``, against the real hub: the proxy reaches it through the system's OpenSSH
client and a bastion (``tests/sshd.py``, an asyncssh server run as its own process) that alone can
resolve the hub's name, ``hub.cluster.invalid``. That the name works at all proves the traffic went
through the bastion: this machine cannot resolve it (``.invalid`` is reserved for that).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
import test_faults_hub
from hub import (
    JupyterHubProcess,
    ProxyFactory,
    ProxyProcess,
    clean_environ,
    dump,
    poll,
    run_in_kernel,
    saved_profiles,
    venv_script,
)
from ssh_bastion import HUB_NAME, SSHBastion
from test_faults_hub import LogWatch, auth, start_kernel, status_document
from test_reconnect_hub import Fault, assert_next_cell_runs, forty_lines_through, kernel_socket

kernels = test_faults_hub.kernels


@pytest.fixture
def bastion(tmp_path: Path) -> Iterator[SSHBastion]:
    made = SSHBastion(tmp_path / "bastion").start()
    yield made
    made.stop()


def via_args(hub: JupyterHubProcess, bastion: SSHBastion) -> list[str]:
    """The hub by a name only the bastion resolves; TLS still verified end to end for the hub's name."""
    return ["--hub", f"https://{HUB_NAME}:{hub.port}", "--via", bastion.via, "--ssh-command", bastion.ssh_command]


def through_bastion(proxy: ProxyFactory, hub: JupyterHubProcess, bastion: SSHBastion, *extra: str) -> ProxyProcess:
    hub.start_server("alice")
    return proxy.for_hub(hub, extra_args=[*via_args(hub, bastion), *extra]).wait_checked()


def ssh_children(p: ProxyProcess) -> list[psutil.Process]:
    assert p.proc is not None
    return [c for c in psutil.Process(p.proc.pid).children(recursive=True) if c.name() == "ssh"]


def test_rest_and_a_kernel_cell_through_the_bastion_on_one_login(
    hub: JupyterHubProcess, proxy: ProxyFactory, bastion: SSHBastion
) -> None:
    p = through_bastion(proxy, hub, bastion)
    token = hub.alice_token
    specs = requests.get(f"{p.url}/api/kernelspecs", headers=auth(token), timeout=60)
    assert specs.status_code == 200, dump(specs)
    assert "python3" in specs.json()["kernelspecs"]
    for _ in range(20):
        listing = requests.get(f"{p.url}/api/contents", headers=auth(token), timeout=60)
        assert listing.status_code == 200, dump(listing)
    assert run_in_kernel(p.url, token, "print(sum(range(10)))") == "45\n"
    # the start-up checks, twenty requests, a kernel start, its WebSocket and its deletion: one login
    assert bastion.logins == 1, bastion.logins_path.read_text()
    [child] = ssh_children(p)
    via = status_document(p, token)["via"]
    assert via["kind"] == "ssh" and via["state"] == "up" and via["restarts"] == 0, via
    assert via["pid"] == child.pid and via["destination"] == "login-node"


def test_no_credential_in_the_ssh_child_the_log_or_status(
    hub: JupyterHubProcess, proxy: ProxyFactory, bastion: SSHBastion
) -> None:
    token = hub.alice_token
    p = through_bastion(proxy, hub, bastion)
    assert requests.get(f"{p.url}/api/status", headers=auth(token), timeout=60).status_code == 200
    [child] = ssh_children(p)
    command = child.cmdline()
    assert "-L" in command and "BatchMode=yes" in command
    forward = command[command.index("-L") + 1]
    socket_dir = Path(forward.split(":", 1)[0]).parent
    assert socket_dir.stat().st_mode & 0o777 == 0o700
    assert not any(c.laddr.port for c in child.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN)
    environment = child.environ()
    secrets = [token]
    for secret in secrets:
        assert secret and secret not in " ".join(command)
        assert not any(secret in value for value in environment.values())
        assert secret not in p.log_text()
        assert secret not in json.dumps(status_document(p, token)["via"])


def test_a_bastion_restarted_in_the_middle_of_a_cell(
    hub: JupyterHubProcess, proxy: ProxyFactory, bastion: SSHBastion, kernels: list[str]
) -> None:
    """The bastion dies (SIGKILL) at the cell's third line and is back 3 s later on the same port."""
    p = through_bastion(proxy, hub, bastion)
    token = hub.alice_token
    ide = kernel_socket(p, start_kernel(p.url, token, kernels), token)
    watch = LogWatch(p)
    [before] = ssh_children(p)
    forty_lines_through(ide, Fault(bastion.kill, bastion.start, 3.0), 90)
    watch.wait_for(r"the ssh session to login-node ended")
    watch.wait_for(r"reconnected after")
    assert_next_cell_runs(ide)
    via = status_document(p, token)["via"]
    assert via["state"] == "up" and via["restarts"] >= 1, via
    [after] = ssh_children(p)
    assert after.pid != before.pid and via["pid"] == after.pid
    assert not [line for line in watch.lines() if "Traceback" in line]
    ide.ws.close()


def run_check(hub: JupyterHubProcess, bastion: SSHBastion, state: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    command = [
        venv_script("jupyter-dev-server"), "check", "--user", "alice", "--json", "--ca-cert", str(hub.ca_path),
        "--tls-name", hub.tls_name, *via_args(hub, bastion),
    ]  # fmt: skip
    extra = {"XDG_STATE_HOME": str(state), "JUPYTERHUB_API_TOKEN": hub.alice_token}
    result = subprocess.run(command, capture_output=True, text=True, timeout=90, env=clean_environ(extra))
    steps = {step["name"]: step for step in json.loads(result.stdout or "[]")}
    return result.returncode, steps


@pytest.mark.parametrize(
    ("case", "said", "reason"),
    [
        ("key not authorised", "Permission denied (publickey).", "via-login-refused"),
        ("unknown host key", "Host key verification failed.", "via-host-key"),
    ],
)
def test_a_refused_ssh_login_is_named_in_the_502_and_in_check(
    hub: JupyterHubProcess, proxy: ProxyFactory, tmp_path: Path, case: str, said: str, reason: str
) -> None:
    bastion = SSHBastion(tmp_path / "bastion", authorise=case != "key not authorised",
                         known=case != "unknown host key").start()  # fmt: skip
    try:
        hub.start_server("alice")
        p = proxy.for_hub(hub, extra_args=via_args(hub, bastion))
        poll(lambda: "check via: " in p.log_text() or None, 60, "the start-up check's via line", 0.1, p.log_text)
        before = bastion.connections
        assert before >= 1  # the start-up check's attempt
        began = time.monotonic()
        answer = requests.get(f"{p.url}/api/kernelspecs", headers=auth(hub.alice_token), timeout=60)
        took = time.monotonic() - began
        # answered at once, not after 10 s of retries that each started ssh again for the same refusal
        assert bastion.connections - before <= 1, bastion.logins_path.read_text()
        assert took < 5, took
        assert answer.status_code == 502, dump(answer)
        error = answer.json()
        assert error["reason"] == reason and said in error["message"], error
        assert f"'{bastion.ssh_command} login-node'" in error["message"], error
        poll(lambda: error["message"] in p.log_text() or None, 30, "the sentence in the log", 0.1, p.log_text)

        code, steps = run_check(hub, bastion, tmp_path / "state")
        assert code != 0
        assert steps["via"]["ok"] is False and said in steps["via"]["detail"], steps
        assert "connect" not in steps or steps["connect"]["ok"] is not True
        assert bastion.logins == 0
    finally:
        bastion.stop()


def test_check_names_the_via_before_connect(hub: JupyterHubProcess, bastion: SSHBastion, tmp_path: Path) -> None:
    hub.start_server("alice")
    code, steps = run_check(hub, bastion, tmp_path / "state")
    assert code == 0, steps
    names = list(steps)
    assert names.index("via") < names.index("connect")
    assert "login-node" in steps["via"]["detail"] and steps["via"]["ok"] is True


def test_login_reads_the_cluster_ca_over_the_session(hub: JupyterHubProcess, tmp_path: Path) -> None:
    """No --ca-cert: login lists the login node's certs folder, keeps the CA only, saves it 0644."""
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "jupyterhub_ca.pem").write_bytes(hub.ca_path.read_bytes())
    (certs / "hub.crt").write_bytes(_leaf_of(hub))
    (certs / "hub.key").write_text("-----BEGIN PRIVATE KEY-----\nnot for reading\n-----END PRIVATE KEY-----\n")
    bastion = SSHBastion(tmp_path / "bastion", certs=certs).start()
    try:
        hub.create_user("dora")
        token_file = tmp_path / "config" / "hub-token"
        command = [
            venv_script("jupyter-dev-server"), "login", "--user", "dora", "--tls-name", hub.tls_name,
            "--password-stdin", "--token-file", str(token_file), *via_args(hub, bastion),
        ]  # fmt: skip
        done = subprocess.run(command, input="any\n", capture_output=True, text=True, timeout=120,
                              env=clean_environ({"XDG_STATE_HOME": str(tmp_path / "state"),
                                                 "XDG_CONFIG_HOME": str(tmp_path / "xdg-config")}))  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        saved = token_file.parent / "cluster-ca.pem"
        assert saved.read_bytes().count(b"BEGIN CERTIFICATE") == 1
        assert saved.stat().st_mode & 0o777 == 0o644
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        ca = x509.load_pem_x509_certificate(hub.ca_path.read_bytes())
        assert x509.load_pem_x509_certificate(saved.read_bytes()) == ca
        fingerprint = ca.fingerprint(hashes.SHA256()).hex().upper()
        shown = done.stdout + done.stderr
        assert ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)) in shown
        assert ca.subject.rfc4514_string() in shown
        commands = bastion.commands
        assert any(c.startswith("ls ") for c in commands) and not any("hub.key" in c for c in commands), commands
        # one login for listing, reading and the token
        assert bastion.logins == 1
        # the saved profile, which the bare command runs, reaches the hub the same way, with the saved CA
        profile = saved_profiles(tmp_path / "xdg-config")["default"]
        assert profile["ca-cert"] == str(saved)
        assert profile["ssh-command"] == bastion.ssh_command
        assert profile["via"].startswith(bastion.via)
        # the daemon and check find it there: check with no --ca-cert, the token file beside it
        check = subprocess.run(
            [venv_script("jupyter-dev-server"), "check", "--user", "dora", "--json", "--tls-name", hub.tls_name,
             "--token-file", str(token_file), *via_args(hub, bastion)],
            capture_output=True, text=True, timeout=90, env=clean_environ({"XDG_STATE_HOME": str(tmp_path / "state")}),
        )  # fmt: skip
        steps = {step["name"]: step for step in json.loads(check.stdout or "[]")}
        assert steps["tls"]["ok"] is True and str(saved) in steps["tls"]["detail"], steps
    finally:
        bastion.stop()


def _leaf_of(hub: JupyterHubProcess) -> bytes:
    """The hub's own certificate (not a CA), as it would sit in the certs folder beside the CA."""
    import ssl

    return ssl.get_server_certificate(("127.0.0.1", hub.port)).encode()


def test_a_hub_the_bastion_cannot_reach_is_named_in_the_502_and_in_check(
    hub: JupyterHubProcess, proxy: ProxyFactory, bastion: SSHBastion, tmp_path: Path
) -> None:
    """A hub name the bastion cannot resolve either: ssh logs in, and its channel to the hub fails."""
    args = ["--hub", f"https://nowhere.cluster.invalid:{hub.port}", "--via", bastion.via,
            "--ssh-command", bastion.ssh_command]  # fmt: skip
    p = proxy.for_hub(hub, extra_args=args)
    answer = requests.get(f"{p.url}/api/status", headers=auth(hub.alice_token), timeout=60)
    assert answer.status_code == 502, dump(answer)
    error = answer.json()
    assert error["reason"] == "via-hub-unreachable", error
    assert "open failed: connect failed: Name or service not known" in error["message"], error
    assert "nowhere.cluster.invalid" in error["message"] and "--hub" in error["message"]
    command = [
        venv_script("jupyter-dev-server"), "check", "--user", "alice", "--json", "--ca-cert", str(hub.ca_path),
        "--tls-name", hub.tls_name, *args,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=90,
                            env=clean_environ({"XDG_STATE_HOME": str(tmp_path / "state")}))  # fmt: skip
    steps = {step["name"]: step for step in json.loads(result.stdout or "[]")}
    assert result.returncode != 0 and steps["via"]["ok"] is False, steps
    assert "Name or service not known" in steps["via"]["detail"], steps


def test_a_silent_bastion_is_noticed_and_the_next_cell_runs_on_the_same_socket(
    hub: JupyterHubProcess, proxy: ProxyFactory, bastion: SSHBastion, kernels: list[str]
) -> None:
    """
    The bastion freezes (SIGSTOP: no FIN, no RST) between cells. ssh's ServerAlive notices (here every
    1 s, twice: options given in --ssh-command come first, and ssh keeps the first value it reads),
    the session is started again once the bastion is back, and the kernel socket carries on.

    (Output a kernel sends *while* the link is silent goes into the hub side's old connection, which
    jupyter_server still believes open, and is not replayed: as with any silent hub link.)
    """
    hub.start_server("alice")
    args = via_args(hub, bastion)
    args[-1] = f"{bastion.ssh_command} -o ServerAliveInterval=1 -o ServerAliveCountMax=2"
    p = proxy.for_hub(hub, extra_args=args).wait_checked()
    token = hub.alice_token
    ide = kernel_socket(p, start_kernel(p.url, token, kernels), token)
    watch = LogWatch(p)
    assert bastion.proc is not None
    pid = bastion.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        frozen = time.monotonic()
        with pytest.raises(AssertionError, match="not done"):  # the IDE reads on meanwhile
            ide.read_until(lambda msg: False, 6)
        [ended] = watch.wait_for(r"the ssh session to login-node ended", timeout=1)
        assert "not responding" in ended, ended
        assert time.monotonic() - frozen < 10
    finally:
        os.kill(pid, signal.SIGCONT)
    watch.wait_for(r"reconnected after", timeout=60)
    assert_next_cell_runs(ide)
    assert status_document(p, token)["via"]["restarts"] >= 1
    ide.ws.close()
