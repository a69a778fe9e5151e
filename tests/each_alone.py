"""Run every end-to-end test by itself (its own pytest process, its own deployment), to
show that none leans on another having run first::

    .venv/bin/python -m tests.each_alone [PATH ...] [-k EXPRESSION]

PATHs default to every ``tests/test_e2e_*.py``. One line per test (passed or failed, and
seconds), then a summary; exit status 1 if any failed. Each e2e module deploys (about a
minute here), so the whole run takes an hour or more: it is a command, not part of CI.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from testkit.helpers import PROJECT_ROOT


def collect(paths: list[str], keyword: str | None) -> list[str]:
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "e2e", *paths]
    if keyword:
        command += ["-k", keyword]
    listed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, check=False).stdout
    return [line for line in listed.splitlines() if "::" in line]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=None)
    parser.add_argument("-k", dest="keyword", default=None)
    args = parser.parse_args()
    paths = args.paths or sorted(str(p.relative_to(PROJECT_ROOT)) for p in (PROJECT_ROOT / "tests").glob("test_e2e_*.py"))
    tests = collect(paths, args.keyword)
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    failed: list[str] = []
    for test in tests:
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=PROJECT_ROOT,
                                env=env, capture_output=True, text=True, check=False)  # fmt: skip
        outcome = "passed" if result.returncode == 0 else "FAILED"
        print(f"{outcome:7} {time.monotonic() - started:6.0f} s  {test}", flush=True)
        if result.returncode != 0:
            failed.append(test)
            print(result.stdout[-3000:], flush=True)
    print(f"{len(tests) - len(failed)} of {len(tests)} passed alone" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
