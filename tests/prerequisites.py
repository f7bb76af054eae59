"""What the suite needs from the machine beyond Python packages, and the one command that gets it.

``make test`` runs this before pytest: a missing Chromium, PostgreSQL or systemd-analyze stops the run
with the command to install them, instead of tests skipped in silence (the browser test)
or failing one by one (the PostgreSQL store).  Exit status 0 when all is there, else 2.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

#: Debian packages, and what each provides.
NEEDED = {
    "chromium": "headless Chromium for the console's browser test (FLEETLOG_CHROMIUM to use another)",
    "postgresql": "initdb and pg_ctl for the PostgreSQL store's private servers",
    "postgresql-contrib": "pg_trgm for PostgreSQL search",
    "systemd": "systemd-analyze, which verifies the unit files in deploy/systemd",
}


def chromium() -> str:
    return os.environ.get("FLEETLOG_CHROMIUM", "/usr/bin/chromium")


def missing() -> list[str]:
    """The Debian packages this machine lacks for the suite."""
    lacking = []
    if not Path(chromium()).exists():
        lacking.append("chromium")
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb") and not shutil.which("initdb"):
        lacking += ["postgresql", "postgresql-contrib"]
    if not shutil.which("systemd-analyze"):
        lacking.append("systemd")
    return lacking


def main() -> int:
    lacking = missing()
    if not lacking:
        return 0
    print("make test needs what this machine lacks:", file=sys.stderr)
    for package in lacking:
        print(f"  {package}: {NEEDED[package]}", file=sys.stderr)
    sudo = "" if os.geteuid() == 0 else "sudo "
    print(f"\nInstall it with:\n  {sudo}apt-get update && {sudo}apt-get install -y {' '.join(lacking)}"
          "\n(or run `bash .ci/run`, which installs it), then `make test` again.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
