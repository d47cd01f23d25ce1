"""
What the benchmark reads about a server process from ``/proc``: CPU time, resident memory, the
peak since the last reset, and whether each of its TCP sockets has ``TCP_NODELAY`` set.

Linux only. Everything takes a pid; nothing here starts or stops a process.
"""

from __future__ import annotations

import ctypes
import os
import socket
from dataclasses import dataclass

__all__ = ["Snapshot", "nodelay_report", "reset_peak", "snapshot"]

_TICK = 1.0 / os.sysconf("SC_CLK_TCK")
_SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture since 5.6


@dataclass(frozen=True)
class Snapshot:
    """CPU seconds (user + system, and the system part) and memory in KiB of one process."""

    cpu: float
    system: float
    rss_kib: int
    hwm_kib: int

    def cpu_since(self, earlier: Snapshot) -> float:
        return self.cpu - earlier.cpu


def _cpu_seconds(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat", "rb") as handle:
        stat = handle.read()
    # The command name (field 2) may contain spaces: count fields after its closing parenthesis.
    fields = stat[stat.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) * _TICK, stime * _TICK


def _memory_kib(pid: int) -> tuple[int, int]:
    rss = hwm = 0
    with open(f"/proc/{pid}/status", "rb") as handle:
        for line in handle:
            if line.startswith(b"VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith(b"VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def snapshot(pid: int) -> Snapshot:
    rss, hwm = _memory_kib(pid)
    return Snapshot(*_cpu_seconds(pid), rss, hwm)


def reset_peak(pid: int) -> bool:
    """Make VmHWM start again from the current RSS (``clear_refs`` 5); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def _tcp_inodes() -> dict[str, str]:
    """Socket inode -> state for every TCP socket on the machine (from /proc/net/tcp{,6})."""
    inodes = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as handle:
                next(handle)
                for line in handle:
                    fields = line.split()
                    inodes[fields[9]] = fields[3]
        except OSError:
            continue
    return inodes


def nodelay_report(pid: int) -> tuple[int, int] | None:
    """
    ``(with TCP_NODELAY, connected TCP sockets)`` of process ``pid``, or None when the kernel does
    not let us look (``pidfd_getfd`` needs Linux 5.6 and ptrace rights over the process).
    Listening sockets are left out: the option matters only on connections.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    tcp = _tcp_inodes()
    with_option = total = 0
    try:
        for fd_name in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd_name}")
            except OSError:
                continue
            if not link.startswith("socket:["):
                continue
            state = tcp.get(link[8:-1])
            if state is None or state == "0A":  # not TCP, or LISTEN
                continue
            copy = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(fd_name), 0)
            if copy < 0:
                return None
            try:
                sock = socket.socket(fileno=copy)
                try:
                    total += 1
                    with_option += bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                finally:
                    sock.detach()
            finally:
                os.close(copy)
    finally:
        os.close(pidfd)
    return with_option, total
