"""
Print a pip constraints file pinning each of setup.cfg's ``install_requires`` to the oldest release
the requirement allows, so ``make test-oldest`` proves the minimums we declare still work.

"The oldest allowed" is the oldest release on the index that satisfies the specifier, not the bound
as written: ``autobahn >= 23.6`` pins 23.6.1, because there is no 23.6.0. Asks the index (``pip index
versions``) once per requirement. Usage: python .ci/oldest_constraints.py [setup.cfg] > constraints.txt
"""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version


def install_requires(setup_cfg: Path) -> list[Requirement]:
    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    lines = parser["options"]["install_requires"].splitlines()
    return [Requirement(line.split("#", 1)[0].strip()) for line in lines if line.split("#", 1)[0].strip()]


def released(name: str) -> list[Version]:
    """Every release of ``name`` the configured index offers (pre-releases left out)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", name],
        capture_output=True, text=True, check=True,
    ).stdout
    match = re.search(r"^Available versions: (.*)$", out, re.MULTILINE)
    if match is None:
        raise SystemExit(f"pip index versions {name} listed no versions:\n{out}")
    versions = []
    for text in match.group(1).split(","):
        try:
            version = Version(text.strip())
        except InvalidVersion:
            continue
        if not version.is_prerelease:
            versions.append(version)
    return versions


def oldest(requirement: Requirement) -> Version:
    allowed = [v for v in released(requirement.name) if requirement.specifier.contains(v)]
    if not allowed:
        raise SystemExit(f"no release of {requirement.name} satisfies {requirement.specifier}")
    return min(allowed)


def main() -> None:
    setup_cfg = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "setup.cfg"
    print("# The oldest releases setup.cfg's install_requires allow; written by .ci/oldest_constraints.py")
    for requirement in install_requires(setup_cfg):
        print(f"{requirement.name}=={oldest(requirement)}")


if __name__ == "__main__":
    main()
