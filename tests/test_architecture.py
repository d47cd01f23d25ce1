"""
The package's imports run one way, from pure modules up to the command line.

Read from the source with :mod:`ast` (nothing is imported), so a cycle that only an in-function
import closes is caught too, and a module that reaches up a layer fails here before it fails at
import time.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import hmac
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme

PACKAGE = Path(__file__).resolve().parent.parent / "jds"

# Lowest first: a module may import modules of its own layer or of the layers before it.
LAYERS: list[tuple[str, set[str]]] = [
    ("pure", {"jds", "jds.__init__", "jds.paths", "jds.auth", "jds.tokens", "jds.environment", "jds.profiles", "jds.stats", "jds.commands", "jds.logs", "jds.refusal", "jds.hubversions", "jds.reconnect", "jds.sessions", "jds.via", "jds.openssh"}),
    ("hub side", {"jds.tls", "jds.reach", "jds.tunnels", "jds.bastion", "jds.spares", "jds.hubclient", "jds.retry", "jds.hublink", "jds.hub", "jds.errors", "jds.progress", "jds.token_expiry", "jds.cluster_ca"}),
    ("web resources", {"jds.guard", "jds.connections", "jds.login", "jds.upload", "jds.deadlines", "jds.proxy", "jds.relay_frames", "jds.relay_outage", "jds.relay_link", "jds.relay", "jds.status"}),
    ("site assembly", {"jds.site", "jds.options"}),
    ("checks", {"jds.check", "jds.demo", "jds._demohub", "jds.hublogin", "jds.status_command", "jds.config_command"}),
    ("twistd service maker", {"jds.service", "jds.tap"}),
    ("command line", {"jds.cli", "jds.__main__"}),
]


def _module_name(path: Path) -> str:
    return "jds" if path.stem == "__init__" else f"jds.{path.stem}"


def _imports(path: Path) -> list[tuple[str, ast.AST, bool]]:
    """Every jds module ``path`` imports: (module, node, whether the import is inside a function)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: list[tuple[str, ast.AST, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child, inside) for alias in child.names if alias.name.split(".")[0] == "jds")
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").split(".")[0] == "jds":
                if child.module == "jds":
                    # ``from jds import x``: x is a submodule when a file of that name exists
                    for alias in child.names:
                        sub = PACKAGE / f"{alias.name}.py"
                        found.append((f"jds.{alias.name}" if sub.exists() else "jds", child, inside))
                else:
                    found.append((child.module, child, inside))
            visit(child, inside)

    visit(tree, False)
    return found


@functools.cache
def _graph() -> dict[str, list[tuple[str, ast.AST, bool]]]:
    return {_module_name(path): _imports(path) for path in sorted(PACKAGE.glob("*.py"))}


def _layer_of(module: str) -> int:
    for index, (_, members) in enumerate(LAYERS):
        if module in members:
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: place it in one")


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in ``edges`` as the list of modules around it, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = walk(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = walk(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_sees_a_cycle_and_its_absence() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_including_imports_inside_functions() -> None:
    edges = {module: {target for target, _, _ in imports if target != module} for module, imports in _graph().items()}
    assert find_cycle(edges) is None


def test_every_module_is_placed_in_a_layer() -> None:
    for module in _graph():
        _layer_of(module)


@pytest.mark.parametrize("module", sorted(_graph()))
def test_imports_go_only_down_the_layers(module: str) -> None:
    own = _layer_of(module)
    upward = [
        f"{target} ({LAYERS[_layer_of(target)][0]}) at line {node.lineno}"
        for target, node, _ in _graph()[module]
        if _layer_of(target) > own
    ]
    assert not upward, f"{module} ({LAYERS[own][0]}) imports from a higher layer: {upward}"


@pytest.mark.parametrize("module", sorted(_graph()))
def test_an_import_inside_a_function_is_a_commented_lazy_load(module: str) -> None:
    path = PACKAGE / f"{'__init__' if module == 'jds' else module.split('.', 1)[1]}.py"
    lines = path.read_text(encoding="utf-8").splitlines()
    unexplained = []
    for target, node, nested in _graph()[module]:
        if not nested:
            continue
        above = lines[max(0, node.lineno - 4):node.lineno]
        if not any("lazy load" in line for line in above):
            unexplained.append(f"{target} at line {node.lineno}")
    assert not unexplained, f"{module} imports inside a function without a '# lazy load: why' comment: {unexplained}"


def _modules_after(code: str, everything: bool = False) -> dict[str, Any]:
    """
    Run ``code`` in a fresh interpreter and report which jds modules and whether a reactor it
    loaded (``everything``: also every module it loaded, under ``all``).
    """
    probe = (
        "import json, sys\n" + code + "\n"
        "print(json.dumps({'jds': sorted(m for m in sys.modules if m == 'jds' or m.startswith('jds.')),"
        " 'reactor': 'twisted.internet.reactor' in sys.modules"
        + (", 'all': sorted(sys.modules),"
           " 'loaded': sorted(m for m, v in sys.modules.items() if v is not None)" if everything else "") + "}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_scanning_the_twistd_plugin_imports_no_jds_module_and_no_reactor() -> None:
    loaded = _modules_after(
        "from twisted.plugins import jds_plugin as p\n"
        "assert p.jupyterDevServer.tapname == 'jupyter-dev-server', p.jupyterDevServer.tapname"
    )
    assert loaded == {"jds": [], "reactor": False}


def test_the_plugins_options_for_help_import_the_options_but_not_the_daemon() -> None:
    loaded = _modules_after(
        "from twisted.plugins import jds_plugin as p\n"
        "from jds.options import Options\n"
        "assert issubclass(p.jupyterDevServer.options, Options)"
    )
    assert "jds.options" in loaded["jds"]
    assert not {"jds.service", "jds.site", "jds.proxy", "jds.relay", "jds.check"} & set(loaded["jds"])
    assert loaded["reactor"] is False


def test_the_daemon_imports_only_what_it_runs(tmp_path: Path) -> None:
    """
    ``jupyter-dev-server`` as the daemon (the command the README and the systemd unit run), up to
    its service made: no other twistd plugin, nothing of the helper commands (demo, login), no
    autobahn before the first WebSocket. Each of these is RSS the daemon would carry all day.
    """
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    args = ["--nodaemon", "--pidfile=", "jupyter-dev-server", "--hub", "https://127.0.0.1:9", "--user", "alice",
            "--ca-cert", str(ca), "--listen", "tcp:0:interface=127.0.0.1"]
    loaded = _modules_after(
        "from jds.cli import _server_options, leave_out_system_openssl\n"
        "leave_out_system_openssl()\n"
        "config = _server_options()()\n"
        f"config.parseOptions({args!r})\n"
        "assert [c[0] for c in config.subCommands] == ['jupyter-dev-server'], list(config.subCommands)\n"
        "from jds.tap import makeService\n"
        "makeService(config.subOptions)",
        everything=True,
    )
    assert loaded["reactor"] is True
    assert {"jds.service", "jds.site", "jds.proxy"} <= set(loaded["jds"])
    assert not {"jds.demo", "jds._demohub", "jds.hublogin", "jds.status_command", "jds.relay", "jds.relay_frames", "jds.relay_link", "jds.relay_outage"} & set(loaded["jds"])
    plugins = [m for m in loaded["all"] if m.startswith("twisted.plugins.")]
    assert plugins == ["twisted.plugins.jds_plugin"]
    never = ("autobahn", "unittest", "twisted.trial", "twisted.conch", "twisted.words", "twisted.mail", "twisted.names")
    assert not [m for m in loaded["all"] if any(m == name or m.startswith(f"{name}.") for name in never)]
    # the standard library's TLS and OpenSSL hashes: the system's libssl and libcrypto, ~5 MiB of RSS
    assert not {"ssl", "_ssl", "_hashlib"} & set(loaded["loaded"])


def _openssl_modules_after(argv: list[str]) -> dict[str, str]:
    """What ``jupyter-dev-server ARGV`` leaves of ``ssl``, ``_ssl`` and ``_hashlib`` in a fresh interpreter."""
    probe = (
        "import json, sys\n"
        "from jds.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps({m: 'absent' if m not in sys.modules else 'left out' if sys.modules[m] is None"
        " else 'loaded' for m in ('ssl', '_ssl', '_hashlib')}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_daemon_leaves_out_the_system_openssl_and_the_helper_commands_keep_it() -> None:
    """
    The daemon's path through ``main`` (here ``--version``: twistd's own options, Twisted imported)
    keeps the standard library's ``ssl`` and ``_hashlib`` out, and hashes still work with Python's
    own SHA-1 and SHA-256; ``status`` (and the other helpers, ``demo`` runs JupyterHub) keep them.
    """
    assert _openssl_modules_after(["--version"]) == {"ssl": "left out", "_ssl": "absent", "_hashlib": "left out"}
    assert _openssl_modules_after(["status", "--help"]) == {"ssl": "loaded", "_ssl": "loaded", "_hashlib": "loaded"}
    probe = (
        "from jds.cli import leave_out_system_openssl\n"
        "leave_out_system_openssl()\n"
        "import hashlib, hmac\n"
        "print(hashlib.sha1(b'x').hexdigest(), hmac.new(b'k', b'm', hashlib.sha256).hexdigest())"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    # the same digests as OpenSSL's, computed in this process (which has _hashlib)
    assert done.stdout.split() == [hashlib.sha1(b"x").hexdigest(), hmac.new(b"k", b"m", hashlib.sha256).hexdigest()]


def test_architecture_md_lists_the_same_layers() -> None:
    """ARCHITECTURE.md's layer table is this file's LAYERS, in the same order, module for module."""
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    start = next(index for index, row in enumerate(rows) if row.startswith("| layer |"))
    documented = []
    for row in rows[start + 1:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if set(cells[0]) <= {"-"}:
            continue
        if cells[0] == "change":
            break
        documented.append((cells[0], {f"jds.{name}" for name in re.findall(r"`(\w+)`", cells[1])}))
    expected = [(name, members - {"jds", "jds.__init__"}) for name, members in LAYERS]
    assert documented == expected


def test_only_the_vias_open_sockets() -> None:
    """
    Every hub connection comes from ``HubTLSPolicy`` through its via: no other module dials a host
    itself (a stray ``HostnameEndpoint`` would skip ``--via`` and the proxy variables).
    """
    dialling = re.compile(r"\b(HostnameEndpoint|TCP4ClientEndpoint|TCP6ClientEndpoint|clientFromString|connectTCP|connectSSL|create_connection)\s*\(")
    found = {
        path.name
        for path in PACKAGE.glob("*.py")
        if path.name != "_demohub.py" and dialling.search(path.read_text(encoding="utf-8"))
    }
    assert found == {"reach.py"}
