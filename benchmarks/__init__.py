"""`make bench`: jupyter-dev-server against direct access and configurable-http-proxy (see README.md).

The benchmarks run real processes with the tests' own harness (``tests/hub.py``, ``tests/tcp_cutter.py``),
imported as the tests import it: with ``tests/`` on ``sys.path``, which this package adds once.
"""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
