"""
Kernel starts that take longer than the response timeout, against a real hub, with short limits.

The single-user servers of this hub get two plug-ins, loaded the way real ones are (an entry point,
a server extension): a kernel provisioner that, like the ones that run kernels as Slurm jobs or
Kubernetes pods, answers only once the "job" runs (its launcher waits 8 s in the "queue"), and a
handler that holds a plain request for as many seconds as asked.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import hub
import pytest
import requests
from hub import JupyterHubProcess, ProxyFactory

QUEUED = 8.0

PROVISIONER = '''
"""A kernel provisioner that returns once its kernel runs, as batch-job provisioners do."""
import asyncio, os, sys, time
from pathlib import Path
from jupyter_client.provisioning import LocalProvisioner


class QueuedProvisioner(LocalProvisioner):
    async def launch_kernel(self, cmd, **kwargs):
        info = await super().launch_kernel(cmd, **kwargs)
        running = Path(cmd[-1] + ".running")
        while not running.exists():
            if self.process.poll() is not None:
                raise RuntimeError("the queued kernel's launcher exited")
            await asyncio.sleep(0.1)  # poll, as a provisioner polls its scheduler
        return info


if __name__ == "__main__":  # the launcher: wait in the "queue", say the job runs, become the kernel
    time.sleep(float(os.environ.get("JDS_QUEUED_SECONDS", "8")))  # the batch queue being simulated, not a wait for an event
    Path(sys.argv[-1] + ".running").touch()
    os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", "-f", sys.argv[-1]])
'''

HOLD = '''
"""A server extension whose one handler answers after the seconds asked for."""
import asyncio
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web


class Hold(APIHandler):
    @web.authenticated
    async def get(self):
        seconds = float(self.get_argument("seconds"))
        await asyncio.sleep(seconds)
        self.finish({"held": seconds})


def _jupyter_server_extension_points():
    return [{"module": "jds_hold"}]


def _load_jupyter_server_extension(app):
    app.web_app.add_handlers(".*$", [(url_path_join(app.base_url, "/api/jds-hold"), Hold)])
'''


def _plugins(directory: Path) -> dict[str, str]:
    """Write the plug-ins; return the environment the single-user servers need to find them."""
    code = directory / "python"
    code.mkdir(parents=True)
    (code / "jds_queued.py").write_text(PROVISIONER)
    (code / "jds_hold.py").write_text(HOLD)
    dist = code / "jds_queued-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: jds-queued\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[jupyter_client.kernel_provisioners]\njds-queued = jds_queued:QueuedProvisioner\n"
    )
    spec = directory / "data" / "kernels" / "queued"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "jds_queued", "{connection_file}"],
        "display_name": "Python (queued 8 s)",
        "language": "python",
        "metadata": {"kernel_provisioner": {"provisioner_name": "jds-queued"}},
    }))  # fmt: skip
    config = directory / "config" / "jupyter_server_config.d"
    config.mkdir(parents=True)
    (config / "jds_hold.json").write_text(json.dumps({"ServerApp": {"jpserver_extensions": {"jds_hold": True}}}))
    return {
        "PYTHONPATH": str(code),
        "JUPYTER_PATH": str(directory / "data"),
        "JUPYTER_CONFIG_PATH": str(directory / "config"),
        "JDS_QUEUED_SECONDS": str(QUEUED),
    }


@pytest.fixture(scope="module")
def slow_hub(tmp_path_factory: pytest.TempPathFactory, test_ca: hub.TestCA) -> Iterator[JupyterHubProcess]:
    directory = tmp_path_factory.mktemp("slow-hub")
    environment = _plugins(directory / "plugins")
    hub = JupyterHubProcess(directory / "hub", test_ca, extra_config=textwrap.dedent(f"""
        c.Spawner.environment = {environment!r}
    """))  # fmt: skip
    try:
        hub.start()
        hub.create_user("erin")
        hub.start_server("erin")
        hub.erin_token = hub.new_token("erin")
        yield hub
    finally:
        hub.stop()


def test_kernel_start_outlives_the_response_timeout(slow_hub: JupyterHubProcess, proxy: ProxyFactory) -> None:
    hub = slow_hub
    served = proxy.for_hub(hub, "erin", extra_args=["--response-timeout", "5"])
    auth = {"Authorization": f"token {hub.erin_token}"}

    # A plain request the server holds for 8 s is cut at 5 s with a 504 naming the option.
    began = time.monotonic()
    held = requests.get(f"{served.url}/api/jds-hold?seconds={QUEUED:g}", headers=auth, timeout=60)
    assert held.status_code == 504, held.text
    assert held.json()["reason"] == "hub-no-answer" and "--response-timeout" in held.json()["message"]
    assert time.monotonic() - began < QUEUED
    # (the same request held for less than the limit is answered: the handler itself works)
    quick = requests.get(f"{served.url}/api/jds-hold?seconds=0.1", headers=auth, timeout=60)
    assert quick.status_code == 200 and quick.json() == {"held": 0.1}

    # A session whose kernel waits 8 s in the "queue" gets its answer, as an IDE creates it.
    began = time.monotonic()
    session = requests.post(
        f"{served.url}/api/sessions", headers=auth, timeout=120,
        json={"path": "queued.ipynb", "name": "queued.ipynb", "type": "notebook", "kernel": {"name": "queued"}},
    )  # fmt: skip
    took = time.monotonic() - began
    assert session.status_code == 201, session.text
    assert took >= QUEUED, f"the kernel start took {took:.1f} s: the provisioner did not hold it"
    kernel = session.json()["kernel"]
    assert kernel["name"] == "queued"
    try:
        # and the kernel it started is the one the server lists, running
        listed = requests.get(f"{served.url}/api/kernels/{kernel['id']}", headers=auth, timeout=60)
        assert listed.status_code == 200 and listed.json()["execution_state"] != "dead", listed.text
    finally:
        requests.delete(f"{served.url}/api/sessions/{session.json()['id']}", headers=auth, timeout=60)
