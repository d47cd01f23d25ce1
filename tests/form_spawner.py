"""
A spawner with an options form, as HPC hubs have (batchspawner's partition and GPUs, KubeSpawner's
profiles): the test hub of ``test_profiles_hub.py`` runs it. It writes every start's
``user_options`` to ``record_file`` (one JSON line each, with the user's name) for the test to read, and refuses a start
the way such spawners do when an option is out of range: an HTTP 400 whose message names it.
"""

from __future__ import annotations

import json

from jupyterhub.spawner import SimpleLocalProcessSpawner
from tornado import web
from traitlets import Unicode

MAX_GPUS = 4
FORM = """
<label for="partition">Partition</label>
<select name="partition" id="partition"><option value="cpu">cpu</option><option value="gpu">gpu</option></select>
<label for="gpus">GPUs</label>
<input name="gpus" id="gpus" type="number" value="0">
"""


class FormSpawner(SimpleLocalProcessSpawner):
    record_file = Unicode(config=True, help="Where each start's user_options are appended, one JSON line.")
    options_form = FORM

    async def start(self):
        with open(self.record_file, "a", encoding="utf-8") as record:
            record.write(json.dumps({"user": self.user.name, "user_options": self.user_options}) + "\n")
        gpus = self.user_options.get("gpus", 0)
        count = gpus[0] if isinstance(gpus, list) and gpus else gpus
        try:
            count = int(count)
        except (TypeError, ValueError):
            raise web.HTTPError(400, f"gpus: {count!r} is not a number of GPUs") from None
        if count > MAX_GPUS:
            raise web.HTTPError(400, f"gpus: {count} is more than the {MAX_GPUS} this partition has")
        return await super().start()
