"""
``--via ssh://`` in memory: the ssh command lines, ssh's stderr in words, the session's life
(one child for many connections, restarted on the backoff after it was up, a failed login not
retried by itself) against a fake reactor whose "ssh" is driven by the test, and the CA picked from
the login node's certificate folder. End to end with the real ssh: ``test_via_ssh_hub.py``.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from jds.bastion import SSHVia, SSHViaError
from jds.cluster_ca import ca_beside, pick_ca
from jds.openssh import (
    SSHDestination,
    base_command,
    by_hand,
    describe_ssh_failure,
    last_stderr_line,
    master_command,
    remote_command,
)
from jds.refusal import Refusal

DEST = SSHDestination("login-node", "ada", 2222)


def test_the_master_command_never_prompts_and_forwards_to_a_unix_socket() -> None:
    args = master_command(["ssh", "-F", "cfg"], DEST, "/d/ctl", [("/d/hub0.sock", "hub.site", 8000)])
    assert args[:3] == ["ssh", "-F", "cfg"]
    assert args[-3:] == ["-p", "2222", "ada@login-node"]
    options = {args[i + 1] for i, arg in enumerate(args) if arg == "-o"}
    assert {"BatchMode=yes", "ExitOnForwardFailure=yes", "ServerAliveInterval=15", "ServerAliveCountMax=3",
            "StreamLocalBindUnlink=yes", "ControlPersist=no"} <= options  # fmt: skip
    assert {"-N", "-T", "-n", "-M"} <= set(args)
    assert args[args.index("-S") + 1] == "/d/ctl"
    assert args[args.index("-L") + 1] == "/d/hub0.sock:hub.site:8000"


def test_an_ipv6_hub_is_bracketed_in_the_forward() -> None:
    args = master_command(["ssh"], SSHDestination("b"), "/d/ctl", [("/d/s", "fd00::1", 443)])
    assert args[args.index("-L") + 1] == "/d/s:[fd00::1]:443"
    assert args[-1] == "b" and "-p" not in args


def test_a_remote_command_uses_the_masters_session_and_is_quoted_for_the_remote_shell() -> None:
    args = remote_command(["ssh"], DEST, "/d/ctl", ["cat", "--", "/a b/c'd"])
    assert args[args.index("-S") + 1] == "/d/ctl"
    assert "ControlMaster=no" in args and "-M" not in args
    assert args[-1] == "cat -- '/a b/c'\"'\"'d'"
    assert args[-3:-1] == ["ada@login-node", "--"]


def test_the_ssh_command_is_split_as_a_shell_would_with_tilde_expanded() -> None:
    home = os.path.expanduser("~")
    assert base_command("ssh -F ~/work/ssh_config -i 'my key'") == ["ssh", "-F", f"{home}/work/ssh_config", "-i", "my key"]
    with pytest.raises(ValueError, match="--ssh-command is empty"):
        base_command("  ")
    with pytest.raises(ValueError):
        base_command("ssh -F 'unbalanced")
    assert by_hand(["ssh", "-F", "a b"], DEST) == "ssh -F 'a b' -p 2222 ada@login-node"


def test_the_last_stderr_line_is_the_reason_not_a_warning() -> None:
    text = "Warning: Permanently added '[x]:22' (ED25519) to the list of known hosts.\r\nada@x: Permission denied (publickey).\n\n"
    assert last_stderr_line(text) == "ada@x: Permission denied (publickey)."
    assert last_stderr_line("ssh: Could not resolve hostname nowhere: Name or service not known\n") == (
        "Could not resolve hostname nowhere: Name or service not known"
    )
    assert last_stderr_line("Warning: only this\n") == "Warning: only this"
    assert last_stderr_line("") == ""


@pytest.mark.parametrize(
    ("line", "reason", "words"),
    [
        ("ada@login-node: Permission denied (publickey).", "via-login-refused", "ssh-add"),
        ("Host key verification failed.", "via-host-key", "check the fingerprint"),
        ("Could not resolve hostname login-node: Name or service not known", "via-unresolvable", "--via"),
        ("connect to host login-node port 2222: Connection refused", "via-unreachable", "not reachable"),
        ("channel 2: open failed: connect failed: Connection refused", "via-hub-unreachable", "--hub"),
        ("something new", "via-failed", "to see why"),
    ],
)
def test_each_ssh_failure_is_one_sentence_quoting_ssh_and_saying_what_to_run(line: str, reason: str, words: str) -> None:
    sentence, got = describe_ssh_failure(line, DEST, "ssh -p 2222 ada@login-node", "hub.site:8000")
    assert got == reason
    assert f'"{line}"' in sentence and words in sentence
    if reason != "via-hub-unreachable":
        assert "'ssh -p 2222 ada@login-node'" in sentence
    else:
        assert "hub.site:8000" in sentence


def test_ssh_exiting_silently_is_still_a_sentence() -> None:
    sentence, reason = describe_ssh_failure("", DEST, "ssh login-node", "h:1", 255)
    assert "exited with status 255 without saying why" in sentence and reason == "via-failed"


# the session against a fake reactor ------------------------------------------------------------


class _Transport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []
        self.stdin_closed = False

    def closeStdin(self) -> None:  # noqa: N802
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:  # noqa: N802
        self.signals.append(name)


class _Exited:
    def __init__(self, code: int) -> None:
        self.exitCode = code


class FakeSSHReactor(MemoryReactorClock):
    """``spawnProcess`` records each "ssh"; the test makes it write stderr, create sockets, exit."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[str, str]]] = []

    def spawnProcess(self, proto, executable, args, env=None, **kw):  # noqa: N802
        proto.makeConnection(_Transport(1000 + len(self.spawned)))
        self.spawned.append((proto, list(args), dict(env or {})))
        return proto.transport

    def come_up(self, sockets: list[socket.socket]) -> None:
        """The last ssh logged in: its forwards' sockets appear."""
        args = self.spawned[-1][1]
        for i, arg in enumerate(args):
            if arg == "-L":
                server = socket.socket(socket.AF_UNIX)
                server.bind(args[i + 1].rsplit(":", 2)[0])
                sockets.append(server)

    def exit(self, stderr: bytes, code: int = 255) -> None:
        proto = self.spawned[-1][0]
        proto.errReceived(stderr)
        proto.processEnded(Failure(_Exited(code)))


@dataclass
class Spec:
    host: str = "login-node"
    user: str | None = None
    port: int | None = None


@pytest.fixture
def via():
    reactor = FakeSSHReactor()
    made = SSHVia(reactor, Spec(), "ssh -F cfg", ready_timeout=5.0)
    sockets: list[socket.socket] = []
    made.sockets = sockets  # type: ignore[attr-defined]
    yield made
    for s in sockets:
        s.close()
    finish(made)


def finish(via: SSHVia) -> None:
    """Stop the via and let its "ssh" exit, so that its socket directory is removed."""
    reactor: FakeSSHReactor = via.reactor
    done: list[object] = []
    via.stop().addBoth(done.append)
    if via._child is not None:
        reactor.exit(b"", 0)
    reactor.advance(0)
    assert done


def _connect(via: SSHVia) -> tuple[list[Any], list[Failure]]:
    got: list[Any] = []
    failed: list[Failure] = []
    via.endpoint("hub.site", 8000).connect(Factory.forProtocol(Protocol)).addCallbacks(got.append, failed.append)
    return got, failed


def test_one_ssh_child_carries_every_connection(via: SSHVia, monkeypatch: pytest.MonkeyPatch) -> None:
    reactor: FakeSSHReactor = via.reactor
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "secret-hub-token")
    first = [_connect(via) for _ in range(5)]
    assert len(reactor.spawned) == 1
    proto, args, env = reactor.spawned[0]
    assert proto.transport.stdin_closed
    assert "JUPYTERHUB_API_TOKEN" not in env and not any("secret-hub-token" in arg for arg in args)
    directory = Path(args[args.index("-S") + 1]).parent
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert via.status()["state"] == "starting"
    reactor.come_up(via.sockets)  # type: ignore[attr-defined]
    reactor.advance(0.5)
    status = via.status()
    assert status["since"] is not None and status.pop("since")
    assert status == {
        "kind": "ssh", "address": "ssh://login-node", "source": "", "destination": "login-node", "state": "up",
        "restarts": 0, "pid": 1000, "last_error": None,
    }  # fmt: skip
    later = [_connect(via) for _ in range(5)]
    assert len(reactor.spawned) == 1
    unix = [c[0] for c in reactor.unixClients]
    assert len(unix) == 10 and set(unix) == {args[args.index("-L") + 1].rsplit(":", 2)[0]}
    assert all(not failed for _, failed in first + later)


def test_a_refused_login_fails_with_the_sentence_and_is_not_retried_by_itself(via: SSHVia) -> None:
    reactor: FakeSSHReactor = via.reactor
    got, failed = _connect(via)
    reactor.exit(b"Warning: Permanently added 'x'\r\nbastion-user@127.0.0.1: Permission denied (publickey).\r\n")
    assert not got and len(failed) == 1 and failed[0].check(SSHViaError)
    refusal = via.explain(failed[0])
    assert refusal is not None and refusal.status == 502 and refusal.reason == "via-login-refused"
    assert '"bastion-user@127.0.0.1: Permission denied (publickey)."' in refusal.message
    assert "'ssh -F cfg login-node'" in refusal.message
    assert via.status()["state"] == "down" and via.status()["last_error"] == refusal.message
    reactor.advance(60)
    assert len(reactor.spawned) == 1  # no login attempts by itself
    # the next need tries again once the backoff allows (0.5 s after the first attempt: long past)
    _connect(via)
    assert len(reactor.spawned) == 2 and via.status()["restarts"] == 1
    reactor.exit(b"bastion-user@127.0.0.1: Permission denied (publickey).\n")
    # a need right after that attempt gets the sentence at once, without a third login
    _, failed = _connect(via)
    assert not failed  # on the next reactor turn, as a TCP connect's failure would be
    reactor.advance(0)
    assert len(reactor.spawned) == 2 and failed and "Permission denied" in failed[0].getErrorMessage()


def test_a_session_that_dies_is_started_again_on_the_backoff(via: SSHVia) -> None:
    reactor: FakeSSHReactor = via.reactor
    _connect(via)
    reactor.come_up(via.sockets)  # type: ignore[attr-defined]
    reactor.advance(0.1)
    assert via.status()["state"] == "up"
    reactor.exit(b"Connection to 127.0.0.1 closed by remote host.\n")
    assert via.status()["state"] == "down" and "closed by remote host" in via.status()["last_error"]
    waiting, failed = _connect(via)  # waits for the restart rather than failing
    assert not waiting and not failed
    reactor.advance(0.49)
    assert len(reactor.spawned) == 1
    reactor.advance(0.02)
    assert len(reactor.spawned) == 2 and via.status()["restarts"] == 1
    for s in via.sockets:  # type: ignore[attr-defined]
        s.close()
    reactor.come_up(via.sockets)  # type: ignore[attr-defined]
    reactor.advance(0.2)
    assert via.status()["state"] == "up" and via.status()["last_error"] is None
    assert len(reactor.unixClients) == 2 and not failed


def test_a_session_that_never_comes_up_is_killed_at_the_deadline(via: SSHVia) -> None:
    reactor: FakeSSHReactor = via.reactor
    _, failed = _connect(via)
    reactor.advance(5.1)
    assert failed and "did not set up its forward within 5 s" in failed[0].getErrorMessage()
    assert reactor.spawned[0][0].transport.signals == ["TERM"]


def test_a_channel_the_bastion_could_not_open_explains_the_closed_connection(via: SSHVia) -> None:
    reactor: FakeSSHReactor = via.reactor
    _connect(via)
    reactor.come_up(via.sockets)  # type: ignore[attr-defined]
    reactor.advance(0.1)
    assert via.explain(Failure(ConnectionDone())) is None
    reactor.spawned[0][0].errReceived(b"channel 3: open failed: connect failed: Connection refused\n")
    refusal = via.explain(Failure(ConnectionDone()))
    assert refusal is not None and refusal.reason == "via-hub-unreachable" and "hub.site:8000" in refusal.message
    reactor.advance(6)
    assert via.explain(Failure(ConnectionDone())) is None


def test_port_22_is_left_to_the_ssh_config_and_check_names_the_forward(via: SSHVia) -> None:
    assert SSHVia(via.reactor, Spec(port=22), "ssh").destination.args() == ["login-node"]
    assert SSHVia(via.reactor, Spec(user="ada", port=2222), "ssh").destination.args() == ["-p", "2222", "ada@login-node"]
    reactor: FakeSSHReactor = via.reactor
    lines: list[str] = []
    failed: list[Failure] = []
    via.check("hub.site", 8000).addCallbacks(lines.append, failed.append)
    reactor.come_up(via.sockets)  # type: ignore[attr-defined]
    reactor.advance(0.1)
    # the probe: a connection through the forward that ssh keeps open (the bastion opened its channel)
    probe = reactor.unixClients[-1][1].buildProtocol(None)
    probe.makeConnection(StringTransport())
    reactor.advance(1.0)
    assert lines == [
        "ssh to login-node logged in (pid 1000); its channel to hub.site:8000 (a name the bastion resolves) is open"
    ]
    # a channel the bastion could not open: ssh closes the probe and says why on stderr, a moment later
    via.check("hub.site", 8000).addCallbacks(lines.append, failed.append)
    probe = reactor.unixClients[-1][1].buildProtocol(None)
    probe.makeConnection(StringTransport())
    probe.connectionLost(Failure(ConnectionDone()))
    reactor.spawned[0][0].errReceived(b"channel 4: open failed: connect failed: Name or service not known\n")
    assert len(lines) == 1 and failed and failed[0].check(Refusal) and failed[0].value.reason == "via-hub-unreachable"
    assert "Name or service not known" in failed[0].value.message


def test_check_fails_with_the_refusal() -> None:
    reactor = FakeSSHReactor()
    via = SSHVia(reactor, Spec(), "ssh")
    failed: list[Failure] = []
    via.check("hub.site", 8000).addErrback(failed.append)
    reactor.exit(b"Host key verification failed.\n")
    assert failed and failed[0].check(Refusal) and failed[0].value.reason == "via-host-key"
    finish(via)


def test_stop_ends_the_child() -> None:
    reactor = FakeSSHReactor()
    via = SSHVia(reactor, Spec(), "ssh")
    _connect(via)
    done: list[object] = []
    via.stop().addCallback(done.append)
    assert reactor.spawned[0][0].transport.signals == ["TERM"] and not done
    reactor.exit(b"", 0)
    assert done and via.status()["state"] == "stopped"
    assert via._dir is None


# the cluster CA -------------------------------------------------------------------------------


def test_only_ca_certificates_are_kept_from_the_folder(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("hub.site")
    ca_pem = ca.cert_pem.bytes()
    picked = pick_ca([
        ("n:/certs/hub.pem", leaf.cert_chain_pems[0].bytes()),
        ("n:/certs/ca.pem", ca_pem),
        ("n:/certs/bundle.pem", leaf.cert_chain_pems[0].bytes() + ca_pem),
        ("n:/certs/README", b"not a certificate"),
    ])  # fmt: skip
    assert picked is not None and len(picked.found) == 1
    fingerprint, subject, where = picked.found[0]
    assert where == "n:/certs/ca.pem" and "trustme" in subject
    assert len(fingerprint) == 95 and fingerprint.count(":") == 31
    assert picked.pem.count(b"BEGIN CERTIFICATE") == 1
    assert pick_ca([("n:/certs/hub.pem", leaf.cert_chain_pems[0].bytes())]) is None
    assert ca_beside(tmp_path / "conf" / "hub-token") == tmp_path / "conf" / "cluster-ca.pem"


class FakeLoginNode:
    """``run()`` of a via whose login node has ``files`` (path -> bytes); records every command."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.commands: list[list[str]] = []
        self.destination = SSHDestination("login-node")

    def run(self, argv: list[str]):
        from twisted.internet.defer import succeed

        self.commands.append(argv)
        if argv[0] == "ls":
            folder = argv[-1]
            names = sorted(p[len(folder):] for p in self.files if p.startswith(folder))
            if not names:
                return succeed((b"", f"ls: cannot access '{folder}': No such file or directory\n".encode(), 2))
            return succeed(("".join(f"{n}\n" for n in names).encode(), b"", 0))
        path = argv[-1]
        if path in self.files:
            return succeed((self.files[path], b"", 0))
        return succeed((b"", f"cat: {path}: No such file or directory\n".encode(), 1))


def _fetched(node: FakeLoginNode, path: str | None = None) -> Any:
    from jds.cluster_ca import fetch_cluster_ca

    results: list[Any] = []
    fetch_cluster_ca(node, path).addBoth(results.append)
    return results[0]


def test_the_ca_is_read_from_the_folder_without_reading_keys() -> None:
    from jds.cluster_ca import CA_FOLDER, ClusterCA

    ca = trustme.CA()
    leaf = ca.issue_cert("hub.site")
    node = FakeLoginNode({
        CA_FOLDER + "ca.pem": ca.cert_pem.bytes(),
        CA_FOLDER + "hub.pem": leaf.cert_chain_pems[0].bytes(),
        CA_FOLDER + "hub.key": leaf.private_key_pem.bytes(),
    })  # fmt: skip
    found = _fetched(node)
    assert isinstance(found, ClusterCA) and found.found[0][2] == f"login-node:{CA_FOLDER}ca.pem"
    assert not any("hub.key" in " ".join(argv) for argv in node.commands)
    assert node.commands[0] == ["ls", "-1", CA_FOLDER]


def test_a_missing_folder_or_file_is_one_sentence() -> None:
    from jds.cluster_ca import CA_FOLDER, ClusterCAError

    failure = _fetched(FakeLoginNode({}))
    assert isinstance(failure, Failure) and failure.check(ClusterCAError)
    assert CA_FOLDER in str(failure.value) and "--ca-cert ssh:PATH" in str(failure.value)
    failure = _fetched(FakeLoginNode({}), "/etc/site/ca.pem")
    assert failure.check(ClusterCAError) and "Cannot read /etc/site/ca.pem on login-node" in str(failure.value)
    only_leaf = FakeLoginNode({"/etc/site/hub.pem": trustme.CA().issue_cert("h").cert_chain_pems[0].bytes()})
    failure = _fetched(only_leaf, "/etc/site/hub.pem")
    assert failure.check(ClusterCAError) and "No CA certificate" in str(failure.value)


def test_an_ssh_command_that_is_not_installed_is_named() -> None:
    reactor = FakeSSHReactor()
    via = SSHVia(reactor, Spec(), "no-such-ssh-program -F cfg")
    _, failed = _connect(via)
    assert not failed and not reactor.spawned
    reactor.advance(0)
    assert failed and "'no-such-ssh-program' (from --ssh-command) is not installed" in failed[0].getErrorMessage()
    assert via.explain(failed[0]).reason == "via-ssh-missing"
    finish(via)


def _request_through(via: SSHVia) -> StringTransport:
    """A GET from the IDE through the proxy resource, its hub connections made through ``via``."""
    from jds.paths import HubTarget
    from jds.proxy import HubProxyResource
    from jds.site import LocalSite
    from jds.tls import HubTLSPolicy

    reactor = via.reactor
    target = HubTarget(host="hub.site", port=8000, user="alice")
    policy = HubTLSPolicy(reactor, target.host, target.port, target.verify_name, None, via=via)
    site = LocalSite(HubProxyResource(target, policy, reactor), reactor=reactor)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /api/kernelspecs HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
    return transport


@pytest.mark.parametrize(
    "refused",
    [b"bastion-user@127.0.0.1: Permission denied (publickey).\n", b"Host key verification failed.\n"],
)
def test_a_request_that_meets_a_refused_login_is_answered_at_once_not_retried(via: SSHVia, refused: bytes) -> None:
    """Retrying for 10 s would start ssh about four times for a refusal only the user can change."""
    reactor: FakeSSHReactor = via.reactor
    answer = _request_through(via)
    assert len(reactor.spawned) == 1
    reactor.exit(refused)
    reactor.advance(0)
    for _ in range(40):  # the retry window and then some: no new login, whatever waits
        reactor.advance(0.5)
        if via._child is not None:
            reactor.exit(refused)
    assert len(reactor.spawned) == 1, "ssh was started again for the same request"
    head, _, body = answer.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 "), answer.value()
    error = json.loads(body)
    assert error["reason"] in ("via-login-refused", "via-host-key") and refused.strip().decode() in error["message"]


def test_a_request_that_meets_an_unreachable_bastion_is_retried_on_the_backoff(via: SSHVia) -> None:
    """A network failure may pass: the request is sent again, each attempt starting ssh no sooner than the backoff."""
    reactor: FakeSSHReactor = via.reactor
    answer = _request_through(via)
    unreachable = b"ssh: connect to host login-node port 22: Connection refused\n"
    for _ in range(40):
        if via._child is not None:
            reactor.exit(unreachable)
        reactor.advance(0.5)
    assert len(reactor.spawned) >= 3, "each retry may start ssh again"
    head, _, body = answer.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ") and json.loads(body)["reason"] == "via-unreachable", answer.value()
