#!/bin/sh
# bench/test_harness.sh [BUILD_DIR [extra bench/run options]]
#
# Tests the benchmark harness, never timing: runs
# `bench/run --quick --scenario tiny,tiny-line,tiny-resp` into a scratch
# directory and checks that it exits 0, that latest.json parses and has one
# row per available peer of each protocol (echo, line, and RESP unless
# redis-benchmark is missing, which must then be reported as a skipped
# scenario), that latest.md lists them, and that latest.svg and
# latest-protocols.svg are non-empty SVGs.
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

check "bench/run --quick --scenario tiny,tiny-line,tiny-resp exits 0" \
  "$here/run" --quick --scenario tiny,tiny-line,tiny-resp --build "$build" \
  --out "$out" "$@"

check "latest.json parses and has rows" pycheck "$out/latest.json" '
assert r["rows"], "no rows"'

check "one tiny row per available echo peer, none failed" \
  pycheck "$out/latest.json" '
avail = {p["name"] for p in r["peers"]
         if not p["skip"] and p["protocol"] == "echo"}
got = {x["peer"] for x in r["rows"] if x["scenario"] == "tiny"}
assert "uv_echo" in avail, "reference peer uv_echo missing"
assert avail == got, "peers %s, rows %s" % (sorted(avail), sorted(got))
assert all(x["msgs_per_s"] > 0 for x in r["rows"]), "zero throughput"
assert not r["failures"], r["failures"]
for p in r["peers"]:
    print("   peer %-21s %s" % (p["name"], p["skip"] or "ran"))'

check "one tiny-line row per available line peer, lines counted" \
  pycheck "$out/latest.json" '
avail = {p["name"] for p in r["peers"]
         if not p["skip"] and p["protocol"] == "line"}
got = {x["peer"] for x in r["rows"] if x["scenario"] == "tiny-line"}
assert "uv_line" in avail, "reference peer uv_line missing"
assert avail == got, "peers %s, rows %s" % (sorted(avail), sorted(got))
runs = [x for x in r["runs"] if x["scenario"] == "tiny-line"]
# 2 connections x 100 batches x 4 lines, every echo verified by the load
assert all(x["messages"] == 800 and x["batches"] == 200 for x in runs), \
    [(x["peer"], x["messages"]) for x in runs]'

check "tiny-resp: 4 tests and all per available RESP peer, or skipped" \
  pycheck "$out/latest.json" '
import shutil
avail = {p["name"] for p in r["peers"]
         if not p["skip"] and p["protocol"] == "resp"}
if not shutil.which("redis-benchmark") or not avail:
    assert [s for s in r["skipped_scenarios"]
            if s["scenario"] == "tiny-resp"], "tiny-resp not run, not skipped"
    print("   tiny-resp skipped: %s" % r["skipped_scenarios"])
else:
    got = [(x["peer"], x["test"]) for x in r["resp_rows"]]
    want = [(p, t) for p in sorted(avail)
            for t in ("PING_INLINE", "PING_MBULK", "SET", "GET", "all")]
    assert sorted(got) == sorted(want), got
    assert all(x["rps"] > 0 for x in r["resp_rows"]), "zero requests/s"'

check "latest.md has a row per available peer" pycheck "$out/latest.json" '
md = open(sys.argv[1].replace("latest.json", "latest.md")).read()
scen = {"echo": "tiny", "line": "tiny-line"}
for p in r["peers"]:
    if p["skip"]:
        continue
    if p["protocol"] == "resp":
        assert not r["resp_rows"] or "%s req/s" % p["name"] in md, p["name"]
    else:
        assert ("| %s | %s |" % (scen[p["protocol"]], p["name"])) in md, \
            p["name"]'

check "the three callgrind figures are keys, empty when not selected" \
  pycheck "$out/latest.json" '
for k in ("callgrind", "callgrind_line", "callgrind_line_rr"):
    assert k in r and r[k] == {}, (k, r.get(k))
assert r["meta"]["callgrind_line_rr_setup"]["lines"] == 1'

for svg in latest.svg latest-protocols.svg; do
  check "$svg exists, non-empty" \
    sh -c "test -s '$out/$svg' && grep -q '<svg' '$out/$svg'"
done

echo "harness: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
