#!/usr/bin/env bash
# Mutation testing of the controller core (pyproject.toml [tool.mutmut]):
# target/create/snapshots/requests, errors, contract, against the in-process
# unit tests that exercise them. Too slow for CI (hours on 2 shared cores);
# run by hand:   scripts/mutation.sh            (run, then the per-module table)
#                scripts/mutation.sh run 'csi_spdk.controller.snapshots*' ...
#                                               (only the mutants matching these
#                                               fnmatch patterns; earlier results kept)
#                scripts/mutation.sh report     (the table of the last run)
#                scripts/mutation.sh check MUTANT TESTS...
#                                               (one mutant of the last run applied
#                                               to a copy of the working tree, and
#                                               TESTS run against it: how a survivor
#                                               is re-checked against new tests)
# Figures, and the survivors judged equivalent (no test can tell them apart)
# with why: docs/mutation.md.
# mutmut keeps its work in ./mutants (git-ignored); `mutmut show <name>` prints
# one mutant's diff, `mutmut results` the survivors.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mutmut >/dev/null || { echo "mutmut is not installed: pip install '.[test]'" >&2; exit 1; }
# The controller tests talk to the simulator directly (the agent layer adds
# nothing the mutated modules decide, and doubles the time per mutant).
export CSI_SPDK_TEST_AGENT=0
unset CSI_SPDK_TEST_RPC PYTHONPATH
if [ "${1:-}" = check ]; then
  mutant=${2:?usage: scripts/mutation.sh check MUTANT TESTS...}
  shift 2
  copy=$(mktemp -d /tmp/csi-spdk-mutant.XXXXXX)
  trap 'rm -rf "$copy"' EXIT
  tar --exclude=./.git --exclude=./mutants --exclude=./.venv --exclude=./.cache -cf - . |
    tar -xf - -C "$copy"
  mutmut show "$mutant" > "$copy/mutant.diff"
  # mutmut shows a method dedented: match lines with their indentation ignored
  python3 - "$copy" <<'PY'
import pathlib, sys
root = pathlib.Path(sys.argv[1])
diff = (root / "mutant.diff").read_text().splitlines()
path = next(line[4:].strip() for line in diff if line.startswith("--- "))
lines = (root / path).read_text().split("\n")
hunks, cur = [], None
for line in diff:
    if line.startswith("@@"):
        cur = []
        hunks.append(cur)
    elif cur is not None and not line.startswith(("---", "+++")):
        cur.append((line[:1] or " ", line[1:]))
indent = lambda s: len(s) - len(s.lstrip())
for hunk in hunks:
    old = [t for tag, t in hunk if tag in " -"]
    hits = [i for i in range(len(lines) - len(old) + 1)
            if all(lines[i + j].strip() == o.strip() for j, o in enumerate(old))]
    if len(hits) != 1:
        sys.exit(f"the mutant does not apply to {path} ({len(hits)} matches)")
    i, j, off, new = hits[0], 0, 0, []
    for tag, t in hunk:
        if tag in " -" and t.strip():
            off = indent(lines[i + j]) - indent(t)
            if tag == "-":
                break
        j += tag in " -"
    j = 0
    for tag, t in hunk:
        if tag == " ":
            new.append(lines[i + j])
        elif tag == "+":
            new.append(" " * (indent(t) + off) + t.lstrip() if t.strip() else t)
        j += tag in " -"
    lines[i:i + len(old)] = new
(root / path).write_text("\n".join(lines))
PY
  if (cd "$copy" && PYTHONPATH=$copy nice -n "${MUTMUT_NICE:-15}" python3 -m pytest -q -x \
        -p no:cacheprovider "$@"); then
    echo "SURVIVED: $mutant"; exit 1
  fi
  echo "KILLED: $mutant"; exit 0
fi
if [ "${1:-run}" = run ]; then
  shift || true
  start=$(date +%s)
  nice -n "${MUTMUT_NICE:-15}" mutmut run --max-children "${MUTMUT_JOBS:-2}" "$@" || true
  echo "mutmut run took $(( $(date +%s) - start )) s"
fi
python3 - <<'PY'
import json, subprocess, collections

rows = collections.defaultdict(collections.Counter)
res = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True).stdout
for line in res.splitlines():
    line = line.strip()
    if ":" not in line:
        continue
    name, status = line.rsplit(":", 1)
    module = name.split(".x_")[0].split(".xǁ")[0]
    rows[module][status.strip()] += 1
print(f"{'module':40} {'killed':>7} {'(timeout)':>9} {'survived':>8} {'no test':>7} "
      f"{'unchecked':>9} {'kill rate':>9}")
for module in sorted(rows):
    c = rows[module]
    killed = c["killed"] + c["timeout"] + c["segfault"]
    survived, untested, unchecked = c["survived"], c["no tests"], c["not checked"]
    judged = killed + survived + untested      # a mutant no test runs is not killed
    rate = killed / judged if judged else 0.0
    print(f"{module:40} {killed:7} {c['timeout']:9} {survived:8} {untested:7} {unchecked:9} "
          f"{rate:9.1%}")
PY
