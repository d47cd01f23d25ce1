"""
Loaded by the daemon that :mod:`benchmarks.wsmem` starts (this directory is put on its
``PYTHONPATH``; nothing else loads it): on ``SIGUSR2`` it runs the command written in
``$JDS_WSMEM_DIR/command`` and writes its JSON answer to ``$JDS_WSMEM_DIR/answer``. It imports
nothing at start-up but ``os`` and ``signal`` (the daemon leaves the standard library's ``ssl`` out,
see ``jds/cli.py``), so the daemon it measures is the daemon users run.

Commands: ``rss``, ``trim`` (``malloc_trim(0)``: what glibc hands back when asked), ``start [FRAMES]`` (a garbage collection, a census of the objects the collector tracks, then
``tracemalloc`` from here on, keeping FRAMES frames; 0: without it) and ``dump N`` (what was allocated since ``start`` and is still
alive, by allocation site, and the census's growth, each divided by N; then once more after a
full collection, to tell cycles nobody collected yet from what is really held).
"""

import os
import signal

_DIR = os.environ.get("JDS_WSMEM_DIR")
_state: dict = {}


def _census() -> dict:
    import gc
    import sys

    counts: dict[str, list[int]] = {}
    for obj in gc.get_objects():
        kind = type(obj)
        name = f"{kind.__module__}.{kind.__qualname__}"
        entry = counts.setdefault(name, [0, 0])
        entry[0] += 1
        size = sys.getsizeof(obj)
        held = getattr(obj, "__dict__", None) if not isinstance(obj, type) else None
        if isinstance(held, dict):
            size += sys.getsizeof(held)
        entry[1] += size
    return counts


def _mallinfo() -> dict:
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = Mallinfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {name: getattr(info, name) for name, _ in Mallinfo2._fields_}


def _rss_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


_OWN = ("/jds/", "/autobahn/", "/twisted/", "/OpenSSL/", "/txaio/", "/zope/", "/service_identity/",
        "/cryptography/", "/hyperlink/")


def _sites(snapshot, per: int, top: int = 40) -> list:
    """Live bytes by allocation site: the innermost frame, and the innermost jds frame that led there."""
    sites: dict[tuple[str, str], list[int]] = {}
    for trace in snapshot.traces:
        frames = trace.traceback  # oldest first
        inner = frames[-1]
        here = f"{_short(inner.filename)}:{inner.lineno}"
        ours = next((f for f in reversed(frames) if "/jds/" in f.filename), None)
        via = f"{_short(ours.filename)}:{ours.lineno}" if ours is not None else ""
        entry = sites.setdefault((here, via), [0, 0, 0])
        entry[0] += trace.size
        entry[1] += 1
        if trace.size > 512:
            entry[2] += trace.size
    ranked = sorted(sites.items(), key=lambda item: -item[1][0])
    return [{"site": here, "via": via, "bytes_per": b / per, "blocks_per": n / per, "over_512_per": big / per}
            for (here, via), (b, n, big) in ranked[:top]]


def _files(snapshot, per: int) -> list:
    """Live bytes by the file of the innermost frame."""
    files: dict[str, list[int]] = {}
    for trace in snapshot.traces:
        name = _short(trace.traceback[-1].filename)
        entry = files.setdefault(name, [0, 0])
        entry[0] += trace.size
        entry[1] += 1
    ranked = sorted(files.items(), key=lambda item: -item[1][0])
    return [{"file": name, "bytes_per": b / per, "blocks_per": n / per} for name, (b, n) in ranked[:40]]


def _short(filename: str) -> str:
    for marker in _OWN + ("/python3.11/", "/lib/python"):
        at = filename.rfind(marker)
        if at >= 0:
            return filename[at + 1:]
    return filename


def _dump(per: int) -> dict:
    import gc
    import tracemalloc

    answer: dict = {}
    for phase in ("live", "after_collect"):
        if phase == "after_collect":
            answer["collected"] = gc.collect()
        snap = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
        counts = _census()
        base = _state["census"]
        growth = []
        for name, (number, size) in counts.items():
            was = base.get(name, [0, 0])
            if number - was[0] > 0:
                growth.append({"type": name, "count_per": (number - was[0]) / per, "bytes_per": (size - was[1]) / per})
        growth.sort(key=lambda g: -g["bytes_per"])
        traces = snap.traces if snap is not None else []
        answer[phase] = {
            "rss_kib": _rss_kib(),
            "traced_per": sum(t.size for t in traces) / per,
            "traced_over_512_per": sum(t.size for t in traces if t.size > 512) / per,
            "mallinfo": _mallinfo(),
            "sites": _sites(snap, per, 200) if snap is not None else [],
            "files": _files(snap, per) if snap is not None else [],
            "census": growth[:40],
        }
    tracemalloc.stop()
    return answer


def _handle(signum, frame) -> None:
    import gc
    import json
    import tracemalloc

    with open(os.path.join(_DIR, "command")) as handle:
        words = handle.read().split()
    if words[0] == "start":
        gc.collect()
        _state["census"] = _census()
        _state["mallinfo"] = _mallinfo()
        frames = int(words[1]) if len(words) > 1 else 30
        if frames:  # 0: the census and malloc's figures only, without tracemalloc's own allocations
            tracemalloc.start(frames)
        answer = {"rss_kib": _rss_kib(), "mallinfo": _state["mallinfo"]}
    elif words[0] == "dump":
        answer = _dump(int(words[1]))
        answer["mallinfo_start"] = _state["mallinfo"]
    elif words[0] == "trim":  # what glibc would hand back at once if asked
        import ctypes

        before = _rss_kib()
        ctypes.CDLL(None).malloc_trim(0)
        answer = {"rss_before_kib": before, "rss_kib": _rss_kib(), "mallinfo": _mallinfo()}
    elif words[0] == "rss":
        answer = {"rss_kib": _rss_kib(), "mallinfo": _mallinfo()}
    else:
        answer = {"error": f"unknown command {words!r}"}
    temporary = os.path.join(_DIR, "answer.tmp")
    with open(temporary, "w") as handle:
        json.dump(answer, handle)
    os.replace(temporary, os.path.join(_DIR, "answer"))


if _DIR:
    signal.signal(signal.SIGUSR2, _handle)
