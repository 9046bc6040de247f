"""Write or check requirements.lock against the public package index alone.

    python deploy/lock.py            # resolve the project and its extras, write the lock
    python deploy/lock.py --upgrade  # the same, letting every pin move to the newest that fits
    python deploy/lock.py --check    # resolve the lock as it is; fail if any pin cannot be had

Without --upgrade the current pins are kept where they still fit (as
pip-compile does), so a new dependency does not move the others.

Both run pip's own resolver cut off from every local setting: ``--isolated``
(no environment variables, no user configuration) and PIP_CONFIG_FILE set to
the null device (which makes pip skip the site-wide configuration files too),
so no local wheel folder, mirror or extra index is seen; with ``--dry-run
--report`` nothing is installed and, where the index serves wheel metadata on
its own, nothing large is downloaded. A pin only this machine could satisfy
(a ``+cpu`` local version from a local folder, say) fails the check, and so
does a dependency added to pyproject.toml that the lock does not fit.

The lock is for CPython 3.11 on Linux x86_64, the platform CI and the images
use. It has no hashes: it is a constraints file for installs of the project
itself (``pip install -c requirements.lock -e .``), and a hash in a
constraints file puts pip in hash-checking mode, which refuses the project's
own folder ("Can't verify hashes ... because they point to directories").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
EXTRAS = "train,test,bench,edge,s3,batch,convert,tracing"
OWN = "flywheel-ml"
HEADER = f"""\
# Exact versions for CI and the images (pip install -c requirements.lock).
# Written by `python deploy/lock.py` from a resolve of .[{EXTRAS}] against the
# public index alone (CPython 3.11, Linux x86_64); `make test` checks that it
# still resolves there. Edit pyproject.toml, then run the script again.
"""


def resolve(args: list[str], python: str = sys.executable) -> dict:
    """Run pip's resolver isolated from local configuration; the report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [python, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed",
               "--quiet", "--report", str(report), *args]
        env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"pip could not resolve {' '.join(args)} from the public index:\n{proc.stderr}")
        return json.loads(report.read_text())


def pins(report: dict) -> list[str]:
    found = {(item["metadata"]["name"], item["metadata"]["version"]) for item in report["install"]}
    return sorted((f"{name}=={version}" for name, version in found if name.lower() != OWN), key=str.lower)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="resolve the lock as it is instead of writing it")
    parser.add_argument("--upgrade", action="store_true", help="do not keep the current pins")
    parser.add_argument("--lock", type=Path, default=LOCK, help="the lock file to check (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.check:
        report = resolve(["-r", str(args.lock)])
        resolve([f".[{EXTRAS}]", "-c", str(args.lock)])  # the project as declared fits the lock
        print(f"{args.lock.name}: {len(report['install'])} packages resolve from the public index alone, "
              f"and .[{EXTRAS}] within them")
        return 0
    keep = ["-c", str(LOCK)] if LOCK.exists() and not args.upgrade else []
    LOCK.write_text(HEADER + "\n".join(pins(resolve([f".[{EXTRAS}]", *keep]))) + "\n")
    print(f"wrote {LOCK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
