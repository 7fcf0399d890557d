"""Summarise a csi-sanity junit file.

One copy for both runs: the host test imports ``summarize``; the guest test
ships this file into the QEMU guest and runs it there (``main`` prints the
lines it parses from the serial console).
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def summarize(path: str) -> tuple[int, int, int, list[str]]:
    """(passed, failed, skipped, failures); pending specs count as skipped."""
    passed = failed = skipped = 0
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            failed += 1
            failures.append(f"{case.get('name')} :: {(bad.get('message') or '')[:400]}")
        elif case.find("skipped") is not None or case.get("status") in ("skipped", "pending"):
            skipped += 1
        else:
            passed += 1
    return passed, failed, skipped, failures


def main(argv: list[str]) -> int:
    passed, failed, skipped, failures = summarize(argv[1])
    for failure in failures:
        print("SANITY-FAILURE", failure)
    print(f"SANITY-SUMMARY {passed} {failed} {skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
