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


# The specs that exercise ControllerModifyVolume / VolumeAttributesClass (8 in
# csi-sanity v5.4.0 with --csi.testvolumemutableparameters): both runs check
# that each of them passed rather than was skipped.
MODIFY_SPECS = (
    "should create volume with a volume attribute class",
    "should not create volume with an invalid volume attribute class",
    "ModifyVolume [Controller Server] should fail if no volume id is given",
    "ModifyVolume [Controller Server] should fail if volume does not exist",
    "should fail if specified mutable parameters are not supported by the volume",
    "should modify a volume created without a volume attribute class",
    "should modify a volume created with a volume attribute class",
    "should fail to modify a volume created with a volume attribute class if new mutable "
    "parameters are not supported by volume",
)
# What the runs pass as --csi.testvolumemutableparameters (a YAML map).
MUTABLE_PARAMETERS_YAML = 'maxIOPS: "2000"\nmaxMBps: "50"\n'


def passed_names(path: str) -> list[str]:
    """Names of the specs that passed (not skipped, not failed)."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.find("failure") is None and case.find("error") is None and \
                case.find("skipped") is None and case.get("status") not in ("skipped",
                                                                             "pending"):
            out.append(case.get("name") or "")
    return out


def missing_modify_specs(path: str) -> list[str]:
    """MODIFY_SPECS that did not pass."""
    names = passed_names(path)
    return [spec for spec in MODIFY_SPECS if not any(spec in n for n in names)]


def main(argv: list[str]) -> int:
    passed, failed, skipped, failures = summarize(argv[1])
    for failure in failures:
        print("SANITY-FAILURE", failure)
    for spec in missing_modify_specs(argv[1]):
        print("SANITY-MODIFY-MISSING", spec)
    print(f"SANITY-SUMMARY {passed} {failed} {skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
