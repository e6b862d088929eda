#!/usr/bin/env python3
"""Differential test of uvasyncore's async_chat parse loop against CPython's
asynchat (spec C-08 to C-14, C-22, P-04).

For each seed this script builds a scenario (a byte stream cut into reads
at random places, an initial terminator, terminator changes between reads,
and what the handlers do at their n-th call: keep, set another terminator,
or discard_buffers), runs it through CPython 3.11's asynchat.async_chat,
and prints the scenario followed by the trace CPython produced.  The C
driver (test/diff/chat-diff.c) reads this, runs the same scenario through
ac_chat_feed and compares the traces line by line.

    chat_diff.py --emit --seeds N [--first S]
"""
import argparse
import random
import sys
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import asynchat
    except ImportError:  # Python 3.12 removed it: nothing to compare with
        asynchat = None

ALPHABET = b"ab\r\nq\x00"


def term_text(t):
    """A terminator as the driver reads it: N, C <n>, B <hex> (B - empty)."""
    if t is None:
        return "N"
    if isinstance(t, int):
        return "C %d" % t
    return "B " + (t.hex() if t else "-")


def random_bytes_term(rng):
    r = rng.random()
    if r < 0.05:
        return b""
    if r < 0.20:  # long, periodic: kept on the heap, deep partial matches
        n = rng.randint(17, 40)
        if rng.random() < 0.5:
            return b"a" * (n - 1) + b"b"
        return (b"ab" * 21)[:n]
    n = rng.choice([1, 1, 2, 2, 2, 3, 3, 4, 5])
    return bytes(rng.choice(ALPHABET) for _ in range(n))


def random_term(rng):
    r = rng.random()
    if r < 0.12:
        return None
    if r < 0.35:
        return rng.choice([0, 1, 2, 3, 5, 8, 13, rng.randint(0, 60)])
    return random_bytes_term(rng)


def random_stream(rng, terms):
    """Fragments of noise and (partial) copies of the terminators."""
    out = bytearray()
    target = rng.choice([40, 200, 800, 2000])
    byte_terms = [t for t in terms if isinstance(t, bytes) and t]
    while len(out) < target:
        r = rng.random()
        if byte_terms and r < 0.45:
            t = rng.choice(byte_terms)
            if rng.random() < 0.3:
                t = t[:rng.randint(0, len(t))]
            out += t
        else:
            out += bytes(rng.choice(ALPHABET)
                         for _ in range(rng.randint(0, 12)))
    return bytes(out)


def random_cuts(rng, n):
    cuts = []
    pos = 0
    mode = rng.random()
    while pos < n:
        if mode < 0.25:
            k = 1
        elif mode < 0.5:
            k = rng.randint(1, 3)
        else:
            k = rng.choice([1, 2, 3, rng.randint(1, 40), rng.randint(1, 400)])
        cuts.append(min(k, n - pos))
        pos += cuts[-1]
    return cuts


def random_action(rng, pool, p_set, p_discard):
    r = rng.random()
    if r < p_discard:
        return "D"
    if r < p_discard + p_set:
        return rng.choice(pool)
    return "K"


def make_scenario(seed):
    rng = random.Random(seed)
    pool = [random_term(rng) for _ in range(rng.randint(1, 4))]
    initial = rng.choice(pool)
    data = random_stream(rng, pool)
    cuts = random_cuts(rng, len(data))
    found_actions = [random_action(rng, pool, 0.6, 0.03)
                     for _ in range(rng.randint(0, 40))]
    collect_actions = [random_action(rng, pool, 0.1, 0.02)
                       for _ in range(rng.randint(0, 40))]
    ops = []
    pos = 0
    for k in cuts:
        if rng.random() < 0.05:
            ops.append(("T", rng.choice(pool)))
        ops.append(("R", data[pos:pos + k]))
        pos += k
    return initial, found_actions, collect_actions, ops


def run_python(initial, found_actions, collect_actions, ops):
    trace = []

    class Chat(asynchat.async_chat):
        def __init__(self):
            asynchat.async_chat.__init__(self)
            self.pending = b""
            self.nfound = 0
            self.ncollect = 0

        def recv(self, n):
            data, self.pending = self.pending, b""
            return data

        def act(self, action, in_collect):
            if action == "D":
                self.discard_buffers()
            elif action != "K":
                # A count in force while collecting: skip (a documented
                # departure, see docs/chat.md).
                if in_collect and isinstance(self.get_terminator(), int) \
                        and self.get_terminator():
                    return
                self.set_terminator(action)

        def collect_incoming_data(self, data):
            trace.append("c " + bytes(data).hex())
            i = self.ncollect
            self.ncollect += 1
            if i < len(collect_actions):
                self.act(collect_actions[i], True)

        def found_terminator(self):
            trace.append("f " + term_text(self.get_terminator()))
            i = self.nfound
            self.nfound += 1
            if i < len(found_actions):
                self.act(found_actions[i], False)

    chat = Chat()
    chat.set_terminator(initial)
    for op, arg in ops:
        if op == "T":
            chat.set_terminator(arg)
        else:
            chat.pending = arg
            chat.handle_read()
    trace.append("z %s %s" % (chat.ac_in_buffer.hex() or "-",
                              term_text(chat.get_terminator())))
    return trace


def action_text(a):
    return a if a in ("K", "D") else "T " + term_text(a)


def emit(seed, out):
    initial, found_actions, collect_actions, ops = make_scenario(seed)
    trace = run_python(initial, found_actions, collect_actions, ops)
    lines = ["S %d" % seed, "I " + term_text(initial)]
    lines += ["F " + action_text(a) for a in found_actions]
    lines += ["C " + action_text(a) for a in collect_actions]
    for op, arg in ops:
        if op == "T":
            lines.append("T " + term_text(arg))
        else:
            lines.append("R " + arg.hex())
    lines.append("E")
    lines += ["X " + t for t in trace]
    lines.append("Z")
    out.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--emit", action="store_true", required=True)
    ap.add_argument("--seeds", type=int, default=3000)
    ap.add_argument("--first", type=int, default=1)
    args = ap.parse_args()
    if asynchat is None:
        print("SKIP: this Python has no asynchat")
        return 77
    out = sys.stdout
    for seed in range(args.first, args.first + args.seeds):
        emit(seed, out)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
