#!/usr/bin/env python3
"""Differential test: the same scenarios through CPython 3.11's asyncore
(test/diff/scenarios.py) and through uvasyncore (diff-scenarios, a C
program), in select and poll mode; the handler-call traces must match
channel by channel (spec D-, E-, L-, W- items; the order of different
channels' events inside one pass may differ by design).

    run_diff.py PATH-TO-diff-scenarios [SCENARIO ...]

Prints one line per case and "diff: N passed, N failed".  Exit status 77
(skipped) when this Python has no asyncore.  With AC_DIFF_WRAPPER set
(for example "valgrind --error-exitcode=9 -q"), the C program runs under
that wrapper and a non-zero status of it fails the case.
"""
import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import scenarios  # noqa: E402  (same directory)

# What each scenario pins down (spec items), shown with failures.
ITEMS = {
    "echo": "D-11 D-13 D-14 D-16 D-17 D-18 L-14 (connect, write, read, "
            "EOF, close)",
    "refused": "D-11 D-16 D-17 E-02 E-03 L-15 (refused connect)",
    "refused_ro": "D-16 D-17 L-15 (refused connect, read interest only)",
    "eof": "D-14 D-16 D-17 (data then EOF)",
    "with_send": "W-02 W-03 W-04 W-05 D-11 (queued before connect, 1 MiB)",
    "chain": "D-21 D-12 (handle_accept chained to the default)",
    "reset": "E-02 E-03 Q-11 (DISCONNECTED errno from a handler)",
    "fail": "E-02 E-03 (application failure from a handler)",
    "exit": "E-01 (ExitNow leaves the loop, map as it is)",
    "unix": "D-11 step 4 (AF_UNIX connect completes at once)",
    "unix_eof": "D-14 (AF_UNIX data then EOF, select mode)",
    "banner": "D-16 D-17 D-18 (data waiting when the connect completes: "
              "connect, read, write in one pass)",
    "reconnect": "D-15 D-04 D-11 (handle_close reconnects the same "
                 "object, 5 times)",
}


def per_channel(text):
    """Lines grouped by their first word, order kept within a group."""
    groups = {}
    for line in text.splitlines():
        if line.strip():
            groups.setdefault(line.split()[0], []).append(line)
    return groups


def run(cmd):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def compare(name, mode, c_prog, wrapper):
    rc, want, err = run([sys.executable, "-W", "ignore",
                         os.path.join(HERE, "scenarios.py"), name, mode])
    if rc != 0:
        return "CPython side failed (%d): %s" % (rc, err.strip())
    rc, got, err = run(wrapper + [c_prog, name, mode])
    if rc != 0:
        return "C side failed (%d): %s" % (rc, err.strip())
    w, g = per_channel(want), per_channel(got)
    problems = []
    for chan in sorted(set(w) | set(g)):
        if w.get(chan, []) != g.get(chan, []):
            problems.append("  channel %s\n    CPython: %s\n    ours:    %s"
                            % (chan, w.get(chan, []), g.get(chan, [])))
    return "\n".join(problems)


def main(argv):
    if scenarios.asyncore is None:
        print("diff: skipped (no asyncore in this Python)")
        return 77
    c_prog = argv[1]
    wrapper = shlex.split(os.environ.get("AC_DIFF_WRAPPER", ""))
    names = argv[2:] or scenarios.SCENARIOS
    passed = failed = 0
    for name in names:
        for mode in scenarios.MODES.get(name, ("select", "poll")):
            problem = compare(name, mode, c_prog, wrapper)
            if problem:
                failed += 1
                print("FAIL %s %s [%s]\n%s" % (name, mode, ITEMS.get(name),
                                               problem))
            else:
                passed += 1
                print("ok   %s %s" % (name, mode))
    print("diff: %d passed, %d failed" % (passed, failed))
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
