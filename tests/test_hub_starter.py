"""
ServerStarter in memory: which token starts the server (the proxy's, or in pass-through mode the
request's), and that one spawn serves every waiter whatever token each carries.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from jds.hub import HubAPI, ServerStarter, ServerState
from jds.paths import HubTarget
from jds.refusal import Refusal

TARGET = HubTarget(host="hub", port=443, user="alice")


class RecordingAPI(HubAPI):
    """The hub's answers without a hub: the server starts when asked (201)."""

    started: list[str | None]

    def __init__(self, token: str | None, holder: str = "this proxy holds", log: list | None = None) -> None:
        super().__init__(agent=None, target=TARGET, hub_token=token, holder=holder)  # type: ignore[arg-type]
        self.started = log if log is not None else []
        self.running = False
        self.gate: Deferred | None = None

    def with_token(self, token: str) -> RecordingAPI:
        other = RecordingAPI(token, "the IDE sent", self.started)
        other.gate = self.gate
        return other

    def server_state(self):
        return succeed(ServerState(ready=bool(self.started), pending=None))

    def start(self):
        self.started.append(self._token)
        return self.gate.addCallback(lambda _: 201) if self.gate is not None else succeed(201)


def test_managed_mode_uses_its_own_token() -> None:
    api = RecordingAPI("hub-token")
    starter = ServerStarter(api, Clock())
    assert starter.api_for(b"token ide-token") is api
    assert starter.api_for(None) is api


def test_pass_through_takes_the_requests_token() -> None:
    starter = ServerStarter(RecordingAPI(None), Clock())
    assert starter.api_for(None) is None
    assert starter.api_for(b"Basic abc") is None
    assert starter.api_for(b"token ") is None
    assert starter.api_for(b"token ide-token")._token == "ide-token"
    assert starter.api_for("Bearer ide-token").holder == "the IDE sent"


def test_one_spawn_with_the_first_requests_token_for_every_waiter() -> None:
    api = RecordingAPI(None)
    api.gate = Deferred()
    starter = ServerStarter(api, Clock())
    results: list[object] = []
    for token in ("first", "second", "third", "fourth", "fifth"):
        starter.recover(302, b"/hub/user/alice/api/status", authorization=f"token {token}".encode()).addBoth(
            results.append
        )
    assert api.started == ["first"] and results == []
    api.gate.callback(None)
    assert results == [True] * 5
    assert starter._spawning_api is api, "the IDE's token is let go once the spawn is over"


def test_pass_through_without_a_token_refuses_a_stopped_server() -> None:
    starter = ServerStarter(RecordingAPI(None), Clock())
    failures: list[object] = []
    starter.recover(302, b"/hub/user/alice/api/status", authorization=None).addErrback(failures.append)
    assert failures and failures[0].check(Refusal)
    assert failures[0].value.reason == "server-not-running"
    maybe: list[object] = []
    starter.recover(503, None, authorization=None).addBoth(maybe.append)
    assert maybe == [False], "an answer that only might mean 'stopped' stands"


class UnreadableAPI(RecordingAPI):
    """A hub that will not tell the server's state (a wrong token, or no hub API at all)."""

    def with_token(self, token: str) -> UnreadableAPI:
        return UnreadableAPI(token, "the IDE sent", self.started)

    def server_state(self):
        from twisted.internet.defer import fail

        return fail(Refusal(401, "The hub refused the token ...", "hub-token-refused"))


def test_an_unconfirmed_answer_stands_in_pass_through_but_not_in_managed_mode() -> None:
    passing: list[object] = []
    ServerStarter(UnreadableAPI(None), Clock()).recover(403, None, authorization=b"token wrong").addBoth(passing.append)
    assert passing == [False], "the hub's own 403 goes to the IDE"
    managed: list[object] = []
    ServerStarter(UnreadableAPI("held"), Clock()).recover(403, None).addBoth(managed.append)
    assert managed[0].check(Refusal) and managed[0].value.reason == "hub-token-refused"


class CannedAPI(HubAPI):
    """``json()`` answers from a list, and records what each call sent."""

    def __init__(self, answers: list[tuple[int, object]], user_options: dict | None = None) -> None:
        super().__init__(agent=None, target=TARGET, hub_token="t", user_options=user_options)  # type: ignore[arg-type]
        self.answers = answers
        self.sent: list[tuple[bytes, str, object]] = []

    def json(self, method: bytes, path: str, body: object = None):
        self.sent.append((method, path, body))
        return succeed(self.answers.pop(0))


def _outcome(d: Deferred) -> object:
    results: list[object] = []
    d.addBoth(results.append)
    return results[0]


def test_a_start_sends_the_server_options_as_the_body_in_both_modes() -> None:
    api = CannedAPI([(202, None)], {"partition": "gpu", "gpus": 2})
    assert _outcome(api.start()) == 202
    assert api.sent == [(b"POST", "users/alice/server", {"partition": "gpu", "gpus": 2})]
    # pass-through mode starts with the IDE's token, and the same options
    assert api.with_token("ide").user_options == {"partition": "gpu", "gpus": 2}
    bare = CannedAPI([(201, None)])
    assert _outcome(bare.start()) == 201
    assert bare.sent == [(b"POST", "users/alice/server", None)]  # no body: the hub reuses the last options


def test_a_running_or_stopping_server_is_still_a_400_that_is_not_a_refusal() -> None:
    for message in ("alice is already running", "alice's server is pending stop"):
        assert _outcome(CannedAPI([(400, {"status": 400, "message": message})]).start()) == 400


def test_a_refused_option_is_named() -> None:
    api = CannedAPI([(400, {"message": "gpus: 7 is more than the 4 this partition has"})],
                    {"partition": "gpu", "gpus": 7})  # fmt: skip
    failure = _outcome(api.start())
    assert failure.check(Refusal) and failure.value.status == 503 and failure.value.reason == "spawn-refused"
    assert failure.value.message == (
        "The hub refused to start your server with --server-options gpus:=7: gpus: 7 is more than the 4 this partition has"
    )
    vague = _outcome(CannedAPI([(400, {"message": "Invalid user options"})], {"partition": "gpu"}).start())
    assert "--server-options partition=gpu (the hub names none of them): Invalid user options" in vague.value.message
    none = _outcome(CannedAPI([(400, {"message": "choose a partition"})]).start())
    assert none.value.message.startswith("The hub refused to start your server with no --server-options (hub says: ")
