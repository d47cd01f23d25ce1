"""Fixtures for end-to-end tests: one real JupyterHub per session, proxies per test."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub import JupyterHubProcess, ProxyFactory, TestCA

_timings: dict[str, float] = {}


def pytest_configure(config: pytest.Config) -> None:
    """
    This process, and every process a test starts, gets config and state folders of the run's own:
    ``login`` saves profiles and the daemon its local token there, never in the developer's home
    (a profile left there would change what the next bare command does). Each test then gets its own
    (:func:`own_config_folders`), so one test's saved profile never reaches the next one's daemon.
    """
    for name in ("XDG_CONFIG_HOME", "XDG_STATE_HOME"):
        os.environ[name] = tempfile.mkdtemp(prefix=f"jds-test-{name.lower()}-")


@pytest.fixture(autouse=True)
def own_config_folders(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("xdg")
    for name in ("XDG_CONFIG_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(name, str(folder / name.lower()))


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """The CA that signs the hub's certificate (and an unrelated one for negative tests)."""
    return TestCA(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def hub(
    tmp_path_factory: pytest.TempPathFactory, test_ca: TestCA
) -> Iterator[JupyterHubProcess]:
    """A running hub with user ``alice``, her default server running and ``hub.alice_token``.

    Shared by the whole session because starting it costs seconds; a test that stops alice's
    server or the hub must bring them back (``hub.start_server`` is a no-op when running).
    """
    hub = JupyterHubProcess(tmp_path_factory.mktemp("hub"), test_ca)
    try:
        hub.start()
        hub.create_user("alice")
        hub.start_server("alice")
        _timings.update(hub.timings)
        hub.alice_token = hub.new_token("alice")
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[ProxyFactory]:
    """Start proxies with ``proxy(*args)`` or ``proxy.for_hub(hub)``; all are stopped after."""
    factory = ProxyFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``hub`` every test that runs against the real hub (uses the ``hub`` fixture, directly or
    through another fixture): ``make test-compat`` runs those against each supported JupyterHub."""
    for item in items:
        if "hub" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.hub)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how slow the hub was, to tell a slow machine from a hang in CI logs."""
    if _timings:
        parts = ", ".join(
            f"{name} {seconds:.1f} s" for name, seconds in _timings.items()
        )
        terminalreporter.write_line(f"jupyterhub: {parts}")
