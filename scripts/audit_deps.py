"""Audit the pinned dependencies (constraints.txt) for known vulnerabilities with pip-audit.

Run by ``make lint``. It reports every advisory, and fails only on advisories that have a
fixed version to move to (one without a fix cannot be acted on, so it must not block).
When the vulnerability service cannot be reached, or knows none of the packages (a
registry mirror without PyPI's JSON API answers "not found" for every one), it says
loudly that nothing was audited and does not fail: an offline build is not a vulnerable one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def main() -> int:
    cmd = [
        sys.executable,
        "-m",
        "pip_audit",
        "--requirement",
        str(ROOT / "constraints.txt"),
        "--no-deps",  # every package is pinned in the file; nothing to resolve
        "--disable-pip",
        "--format",
        "json",
        "--progress-spinner",
        "off",
    ]
    try:
        # The command is fixed above: this interpreter running pip-audit on constraints.txt.
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)  # noqa: S603
    except subprocess.TimeoutExpired:
        return _not_audited(f"pip-audit took longer than {TIMEOUT_S} s")
    try:
        report = json.loads(run.stdout)
    except ValueError:
        reason = (run.stderr.strip().splitlines() or ["no output"])[-1]
        return _not_audited(reason)
    return summarize(report)


def summarize(report: dict[str, Any]) -> int:
    """Print what pip-audit's JSON report says; 1 when an advisory has a fix to move to, else 0."""
    deps = report.get("dependencies", [])
    audited = [d for d in deps if "skip_reason" not in d]
    if not audited:
        return _not_audited(f"the vulnerability service knew none of the {len(deps)} pinned packages")

    fixable: list[str] = []
    unfixable: list[str] = []
    for dep in audited:
        for vuln in dep.get("vulns", []):
            line = f"{dep['name']} {dep['version']}: {vuln['id']}"
            if vuln.get("fix_versions"):
                fixable.append(f"{line} (fixed in {', '.join(vuln['fix_versions'])})")
            else:
                unfixable.append(f"{line} (no fixed version yet)")
    skipped = len(deps) - len(audited)
    print(f"pip-audit: {len(audited)} pinned packages audited, {skipped} unknown to the service")
    for line in unfixable:
        print(f"  advisory, not blocking: {line}")
    for line in fixable:
        print(f"  ADVISORY WITH A FIX: {line}")
    if fixable:
        print("pip-audit: upgrade the packages above (constraints.txt) to a fixed version")
        return 1
    if not unfixable:
        print("pip-audit: no known vulnerabilities")
    return 0


def _not_audited(reason: str) -> int:
    print("=" * 72)
    print("pip-audit: DEPENDENCIES NOT AUDITED")
    print(f"  {reason}")
    print("  (offline, or the package index has no vulnerability data); not failing the build")
    print("=" * 72)
    return 0


if __name__ == "__main__":
    sys.exit(main())
