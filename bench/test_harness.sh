#!/bin/sh
# bench/test_harness.sh [BUILD_DIR [extra bench/run options]]
#
# Tests the benchmark harness, never timing: runs
# `bench/run --quick --scenario tiny,tiny-line,tiny-resp,tiny-tls` into a scratch
# directory and checks that it exits 0, that latest.json parses and has one
# row per available peer of each protocol (echo, line, and RESP unless
# redis-benchmark is missing, which must then be reported as a skipped
# scenario), that latest.md lists them, and that latest.svg and
# latest-protocols.svg are non-empty SVGs. Then checks the spreads: every
# wall-clock figure has min <= median <= max over the measured repetitions,
# the warm-up runs are kept apart, the run is labelled with its client and
# contention, latest.md flags exactly the "no difference" ratios; the ratio
# logic on made-up numbers; and bench/load's ordinary and --quickack clients.
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

check "bench/run --quick --scenario tiny,tiny-line,tiny-resp,tiny-tls exits 0" \
  "$here/run" --quick --scenario tiny,tiny-line,tiny-resp,tiny-tls \
  --build "$build" --out "$out" "$@"

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
scen = {"echo": "tiny", "line": "tiny-line", "tls": "tiny-tls"}
for p in r["peers"]:
    if p["skip"]:
        continue
    if p["protocol"] == "resp":
        assert not r["resp_rows"] or "%s req/s" % p["name"] in md, p["name"]
    else:
        assert ("| %s | %s |" % (scen[p["protocol"]], p["name"])) in md, \
            p["name"]'

check "the callgrind figures are keys, empty when not selected" \
  pycheck "$out/latest.json" '
for k in ("callgrind", "callgrind_line", "callgrind_line_rr", "callgrind_tls"):
    assert k in r and r[k] == {}, (k, r.get(k))
assert r["meta"]["callgrind_line_rr_setup"]["lines"] == 1'

check "every row has spreads over the measured repetitions" \
  pycheck "$out/latest.json" '
m = r["meta"]
reps = m["reps"]
assert reps >= 3 and m["warmup_reps"] == 1 and m["warmup"] > 0, m
assert m["client"] == "ordinary", m["client"]
assert isinstance(m["contended"], bool) and m["other_cpus"] >= 0, m
assert isinstance(m["callgrind_contended"], bool), m
assert all(x["client"] == "ordinary" for x in r["runs"] if "client" in x)
assert sorted({x["rep"] for x in r["runs"]}) == list(range(1, reps + 1))
assert r["warmup_runs"] and all(x["rep"] == 0 for x in r["warmup_runs"])
for x in r["rows"]:
    sp = x["spread"]["msgs_per_s"]
    assert sp["n"] == x["reps"] == reps, (x["peer"], sp)
    assert sp["min"] <= sp["median"] <= sp["max"], (x["peer"], sp)
    assert sp["median"] == x["msgs_per_s"], x["peer"]
    assert x["spread"]["cpu_us_per_msg"] is not None, x["peer"]
    rs = x["spread"]["ratio_msgs_per_s"]
    if x["reference"]:
        assert rs["min"] == rs["max"] == 1.0, rs
        continue
    assert rs["min"] <= rs["median"] <= rs["max"], (x["peer"], rs)
    assert x["no_difference"] == (rs["min"] <= 1.0 <= rs["max"]), x
for x in r["resp_rows"]:
    assert x["spread"]["rps"]["n"] == reps, x
    assert x["reference"] or isinstance(x["no_difference"], bool), x'

check "latest.md shows [min–max] and flags exactly the no-difference rows" \
  pycheck "$out/latest.json" '
md = open(sys.argv[1].replace("latest.json", "latest.md")).read()
md = md.splitlines()
for x in r["rows"]:
    line = next(l for l in md if l.startswith("| %s | %s |" %
                                              (x["scenario"], x["peer"])))
    cells = line.split(" | ")
    assert "[" in cells[2], line
    if x["reference"]:
        assert cells[3] == "reference", line
    else:
        assert ("no difference" in cells[3]) == x["no_difference"], line'

check "ratio and no-difference logic on made-up numbers" \
  python3 -c "$(cat <<'PY'
import importlib.machinery, importlib.util, sys
loader = importlib.machinery.SourceFileLoader("bench_run", sys.argv[1])
spec = importlib.util.spec_from_loader("bench_run", loader)
b = importlib.util.module_from_spec(spec)
loader.exec_module(b)
assert b.spread([]) is None and b.spread([None]) is None
assert b.spread([3, None, 1, 2]) == {"min": 1, "median": 2, "max": 3, "n": 3}
# faster in every repetition: a difference
s = b.ratio_spread([(110, 100), (105, 100), (120, 100), (108, 100),
                    (112, 100)])
assert (s["min"], s["median"], s["max"], s["n"]) == (1.05, 1.1, 1.2, 5), s
assert s["no_difference"] is False
# the interval spans 1.0: no difference, even with a median of 1.05
s = b.ratio_spread([(105, 100), (99, 100), (110, 100)])
assert s["no_difference"] is True and s["median"] == 1.05, s
# an end exactly at 1.0 counts as spanning it
assert b.ratio_spread([(100, 100), (90, 100)])["no_difference"] is True
assert b.ratio_spread([(80, 100), (90, 100)])["no_difference"] is False
# pairs without a value or with a zero reference are left out
assert b.ratio_spread([(None, 100), (50, 0)]) is None
assert b.ratio_spread([(None, 100), (50, 100)])["n"] == 1
# pairs are formed within a repetition, never across
runs = [{"rep": 1, "v": 10}, {"rep": 2, "v": 30}, {"rep": 3, "v": 12}]
ref = [{"rep": 3, "v": 6}, {"rep": 1, "v": 5}]
assert sorted(b.paired(runs, ref, "v")) == [(10, 5), (12, 6)]


def run(peer, rep, rate, cpu):
    return {"scenario": "s", "peer": peer, "rep": rep, "msgs_per_s": rate,
            "cpu_us_per_msg": cpu}


# rows: the per-pair ratios (0.85-0.95), not the ratio of the medians
# (95 / 100 = 0.95) nor of min and max across repetitions; CPU likewise
runs = [run("uv_echo", i + 1, v, 2.0) for i, v in
        enumerate((100, 200, 100, 200, 100))]
runs += [run("uvasyncore", i + 1, v, c) for i, (v, c) in
         enumerate(((90, 3.0), (180, 3.0), (95, 2.8), (170, 3.2),
                    (92, 3.0)))]
peers = [{"name": "uv_echo", "protocol": "echo"},
         {"name": "uvasyncore", "protocol": "echo"}]
ref, mine = b.median_rows(runs, [{"name": "s", "protocol": "echo"}], peers,
                          {})
assert ref["reference"] and not mine["reference"]
assert mine["spread"]["msgs_per_s"] == {"min": 90, "median": 95,
                                        "max": 180, "n": 5}
sp = mine["spread"]["ratio_msgs_per_s"]
assert (sp["min"], sp["median"], sp["max"]) == (0.85, 0.9, 0.95), sp
assert mine["ratio_msgs_per_s"] == 0.9 and mine["no_difference"] is False
assert mine["cpu_ratio"] == 1.5 and mine["cpu_no_difference"] is False
assert b.fmt_ratio(sp) == "0.90 [0.85–0.95]", b.fmt_ratio(sp)
assert b.fmt_ratio(b.ratio_spread([(99, 100), (101, 100)])) == \
    "1.00 [0.99–1.01] no difference"
assert b.fmt_ratio(sp, reference=True) == "reference"
assert b.fmt_spread({"min": 1, "median": 2, "max": 3, "n": 3}) == "2 [1–3]"


def resp(peer, rep, rps):
    return {"scenario": "r", "peer": peer, "rep": rep, "req_per_s": rps,
            "cpu_us_per_req": 1.0, "tests": {t: {"rps": rps, "p50_ms": 1}
                                             for t in b.RESP_TESTS}}


# RESP rows: ratios per repetition pair too (1.10 and 0.95: no difference)
runs = [resp("redis-server", 1, 100), resp("redis-server", 2, 200),
        resp("uvasyncore-resp", 1, 110), resp("uvasyncore-resp", 2, 190)]
rows = b.resp_rows(runs, [{"name": "r", "protocol": "resp"}],
                   [{"name": "uvasyncore-resp", "protocol": "resp"},
                    {"name": "redis-server", "protocol": "resp"}])
row = next(x for x in rows if x["peer"] == "uvasyncore-resp" and
           x["test"] == "all")
assert row["no_difference"] is True, row
assert row["spread"]["ratio"]["max"] == 1.1, row
# the contention label: 0.5 CPUs of other work in 10 s is contended
c = b.contention((0.0, 100.0, 10.0, 0.3), (10.0, 120.0, 25.0, 1.0))
assert c["other_cpus"] == 0.5 and c["contended"] is True, c
c = b.contention((0.0, 100.0, 10.0, 0.3), (10.0, 115.5, 25.0, 1.0))
assert c["contended"] is False, c
PY
)" "$here/run"

# load_client FLAGS...: runs bench/load (2 connections, 5 messages of
# 100,000 B each) against uv_echo with the flags; prints the "client" of
# its JSON line, or nothing if the run failed.
load_client() {
  python3 -c "$(cat <<'PY'
import json, socket, subprocess, sys, time
build, flags = sys.argv[1], sys.argv[2:]
s = socket.socket()
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()
srv = subprocess.Popen([build + "/bench/uv_echo", str(port)])
try:
    for _ in range(250):
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            break
        except OSError:
            time.sleep(0.02)
    out = subprocess.run([build + "/bench/load", "--port", str(port),
                          "--conns", "2", "--size", "100000", "--msgs", "5"]
                         + flags, stdout=subprocess.PIPE, check=True,
                         timeout=60).stdout
    r = json.loads(out)
    assert r["errors"] == 0 and r["messages"] == 10, r
    print(r["client"])
finally:
    srv.terminate()
    srv.wait()
PY
)" "$build" "$@"
}

check "bench/load is an ordinary client by default" \
  test "$(load_client)" = ordinary
check "bench/load --quickack says so" \
  test "$(load_client --quickack)" = quickack

for svg in latest.svg latest-protocols.svg; do
  check "$svg exists, non-empty" \
    sh -c "test -s '$out/$svg' && grep -q '<svg' '$out/$svg'"
done

echo "harness: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
