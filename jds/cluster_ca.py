"""
The cluster CA, read from the login node over the ``--via ssh://`` session by ``login``.

The original tool's README sends users to an administrator for the CA certificate that signs the
hub's, which lives in ``/cm/local/apps/jupyter/current/conf/certs/`` on the login node. Through the
bastion the proxy can read it itself, and trust it for the same reason the user trusts that login
node: ssh checked the login node's host key (known_hosts) before a byte was read, so the file comes
from the machine the user meant. Only CA certificates (basic constraints CA=true) are kept; the
folder also holds the hub's own certificate and key, and no file whose name says "key" is read.
The certificates are saved 0644 beside the hub token, where the daemon and ``check`` find them.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.defer import inlineCallbacks

__all__ = [
    "CA_FILE_NAME",
    "CA_FOLDER",
    "ClusterCA",
    "ClusterCAError",
    "ca_beside",
    "fetch_cluster_ca",
    "pick_ca",
    "save_cluster_ca",
]

CA_FOLDER = "/cm/local/apps/jupyter/current/conf/certs/"
CA_FILE_NAME = "cluster-ca.pem"
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


class ClusterCAError(Exception):
    """No CA certificate could be read; the message says where it looked and what to do."""


@dataclass(frozen=True)
class ClusterCA:
    """CA certificates in PEM, and for each ``(sha256 fingerprint, subject, where it was read)``."""

    pem: bytes
    found: tuple[tuple[str, str, str], ...]

    def describe(self) -> list[str]:
        return [f"{subject}\n  SHA-256 {fingerprint}\n  read from {where}" for fingerprint, subject, where in self.found]


def ca_beside(token_file: str | os.PathLike[str]) -> Path:
    """Where ``login`` saves the cluster CA: next to the hub token it saves."""
    return Path(token_file).expanduser().absolute().parent / CA_FILE_NAME


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def pick_ca(files: list[tuple[str, bytes]]) -> ClusterCA | None:
    """The CA certificates among ``(name, content)`` files, each once; ``None`` if there is none."""
    pems: list[bytes] = []
    found: list[tuple[str, str, str]] = []
    for name, content in files:
        for block in _PEM.findall(content):
            try:
                cert = x509.load_pem_x509_certificate(block)
            except ValueError:
                continue
            if not _is_ca(cert):
                continue
            digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest().upper()
            fingerprint = ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
            if any(fingerprint == seen for seen, _, _ in found):
                continue
            pems.append(cert.public_bytes(Encoding.PEM))
            found.append((fingerprint, cert.subject.rfc4514_string(), name))
    return ClusterCA(b"".join(pems), tuple(found)) if found else None


def _candidates(listing: str) -> list[str]:
    names = [line.strip() for line in listing.splitlines() if line.strip()]
    return [name for name in names if "key" not in name.lower() and not name.startswith(".")]


@inlineCallbacks
def fetch_cluster_ca(via: Any, path: str | None = None):
    """
    Read the CA over ``via`` (a :class:`jds.bastion.SSHVia`): the file ``path`` (``--ca-cert
    ssh:PATH``), or every certificate file in :data:`CA_FOLDER`. Fires with a :class:`ClusterCA`;
    fails with :class:`ClusterCAError`.
    """
    where = via.destination.display
    if path:
        paths = [path]
    else:
        listing, errors, code = yield via.run(["ls", "-1", CA_FOLDER])
        if code != 0:
            said = errors.decode("utf-8", "replace").strip().splitlines()
            raise ClusterCAError(
                f"Cannot list {CA_FOLDER} on {where}" + (f" ({said[-1]})" if said else "") + ": ask the "
                "cluster administrators where the CA certificate is, then pass --ca-cert ssh:PATH (or a local "
                "file with --ca-cert)."
            )
        paths = [posixpath.join(CA_FOLDER, name) for name in _candidates(listing.decode("utf-8", "replace"))]
    files: list[tuple[str, bytes]] = []
    for remote in paths:
        content, errors, code = yield via.run(["cat", "--", remote])
        if code == 0:
            files.append((f"{where}:{remote}", content))
        elif path:
            said = errors.decode("utf-8", "replace").strip().splitlines()
            raise ClusterCAError(f"Cannot read {remote} on {where}" + (f" ({said[-1]})" if said else "") + ".")
    ca = pick_ca(files)
    if ca is None:
        looked = path or f"{CA_FOLDER} ({len(files)} files read)"
        raise ClusterCAError(
            f"No CA certificate (basic constraints CA=true) in {looked} on {where}: ask the cluster "
            "administrators for it, then pass --ca-cert ssh:PATH or --ca-cert FILE."
        )
    return ca


def save_cluster_ca(ca: ClusterCA, path: Path) -> None:
    """Write the CA certificates, readable by all (0644: public certificates, no secret)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(ca.pem)
    os.chmod(partial, 0o644)
    os.replace(partial, path)
