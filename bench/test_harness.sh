#!/bin/sh
# bench/test_harness.sh [BUILD_DIR [extra bench/run options]]
#
# Tests the benchmark harness, never timing: runs
# `bench/run --quick --scenario tiny` into a scratch directory and checks
# that it exits 0, that latest.json parses and has one row per available
# peer, that latest.md lists them, and that latest.svg is a non-empty SVG.
# Prints "harness: P passed, F failed" last; exits 1 if anything failed.
set -u
here=$(cd "$(dirname "$0")" && pwd)
build=${1:-$here/../build}
[ $# -gt 0 ] && shift
out=$(mktemp -d "${TMPDIR:-/tmp}/bench-harness.XXXXXX")
trap 'rm -rf "$out"' EXIT INT TERM
passed=0
failed=0

# check NAME COMMAND...: runs one check and counts it.
check() {
  name=$1
  shift
  if "$@"; then
    passed=$((passed + 1))
    echo "ok: $name"
  else
    failed=$((failed + 1))
    echo "FAIL: $name"
  fi
}

# pycheck FILE PYTHON-CODE: runs code with `r` bound to the parsed JSON.
pycheck() {
  python3 -c "import json, sys
r = json.load(open(sys.argv[1]))
$2" "$1"
}

check "bench/run --quick --scenario tiny exits 0" \
  "$here/run" --quick --scenario tiny --build "$build" --out "$out" "$@"

check "latest.json parses and has rows" pycheck "$out/latest.json" '
assert r["rows"], "no rows"'

check "one tiny row per available peer, none failed" \
  pycheck "$out/latest.json" '
avail = {p["name"] for p in r["peers"] if not p["skip"]}
got = {x["peer"] for x in r["rows"] if x["scenario"] == "tiny"}
assert "uv_echo" in avail, "reference peer uv_echo missing"
assert avail == got, "peers %s, rows %s" % (sorted(avail), sorted(got))
assert all(x["msgs_per_s"] > 0 for x in r["rows"]), "zero throughput"
assert not r["failures"], r["failures"]
for p in r["peers"]:
    print("   peer %-14s %s" % (p["name"], p["skip"] or "ran"))'

check "latest.md has a row per available peer" pycheck "$out/latest.json" '
md = open(sys.argv[1].replace("latest.json", "latest.md")).read()
for p in r["peers"]:
    assert p["skip"] or ("| tiny | %s |" % p["name"]) in md, p["name"]'

check "latest.svg exists, non-empty" \
  sh -c "test -s '$out/latest.svg' && grep -q '<svg' '$out/latest.svg'"

echo "harness: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
