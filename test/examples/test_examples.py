#!/usr/bin/env python3
"""Tests of examples/ over loopback, as a user runs them.

usage: test_examples.py BUILD_DIR
Prints "examples: N passed, N failed" and exits non-zero on any failure.
"""
import http.server
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

BUILD = sys.argv[1] if len(sys.argv) > 1 else "build"
EXAMPLES = os.path.join(BUILD, "examples")
results = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, limit=10.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError("server exited with %s" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("port %d never opened" % port)


def start(name, *args):
    proc = subprocess.Popen([os.path.join(EXAMPLES, name)] + list(args),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    return proc


def stop(proc, sig=signal.SIGTERM):
    proc.send_signal(sig)
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "hung"


def test(fn):
    try:
        fn()
        results.append((fn.__name__, None))
        print("ok   %s" % fn.__name__, file=sys.stderr)
    except Exception as e:  # a failed check or an unexpected error
        results.append((fn.__name__, e))
        print("FAIL %s: %s" % (fn.__name__, e), file=sys.stderr)
    return fn


class Client:
    """One echo client: sends its messages one after the other and checks
    that each comes back byte-exactly before sending the next."""

    def __init__(self, port, sizes, rng):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.msgs = [rng.randbytes(n) for n in sizes]
        self.cur = 0
        self.out = memoryview(self.msgs[0])
        self.got = bytearray()

    def events(self):
        ev = selectors.EVENT_READ
        if self.out:
            ev |= selectors.EVENT_WRITE
        return ev

    def on_ready(self, mask):
        if mask & selectors.EVENT_WRITE and self.out:
            n = self.sock.send(self.out[:1 << 20])
            self.out = self.out[n:]
        if mask & selectors.EVENT_READ:
            data = self.sock.recv(1 << 20)
            if not data:
                raise AssertionError("server closed early")
            self.got += data
            want = self.msgs[self.cur]
            if len(self.got) > len(want):
                raise AssertionError("more bytes than sent")
            if len(self.got) == len(want):
                if bytes(self.got) != want:
                    raise AssertionError("echo differs (%d bytes)" % len(want))
                self.got = bytearray()
                self.cur += 1
                if self.cur < len(self.msgs):
                    self.out = memoryview(self.msgs[self.cur])
        return self.cur == len(self.msgs)


@test
def echo_server_100_clients_1B_to_4MiB():
    port = free_port()
    proc = start("echo_server", str(port))
    try:
        wait_port(port, proc)
        rng = random.Random(7)
        clients = []
        for i in range(100):
            big = 4 << 20 if i % 10 == 0 else 256 << 10
            sizes = [1, 1500, 65536, big]
            rng.shuffle(sizes)
            clients.append(Client(port, sizes, rng))
        sel = selectors.DefaultSelector()
        for c in clients:
            sel.register(c.sock, c.events(), c)
        live = len(clients)
        deadline = time.monotonic() + 120
        while live:
            if time.monotonic() > deadline:
                raise AssertionError("%d clients unfinished" % live)
            for key, mask in sel.select(1.0):
                c = key.data
                if c.on_ready(mask):
                    sel.unregister(c.sock)
                    c.sock.close()
                    live -= 1
                else:
                    sel.modify(c.sock, c.events(), c)
        assert proc.poll() is None, "server died"
    finally:
        rc = stop(proc)
    assert rc == 0, "exit status %s on SIGTERM" % rc


@test
def echo_server_exits_0_on_sigint():
    port = free_port()
    proc = start("echo_server", str(port))
    wait_port(port, proc)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"ping")
    assert s.recv(4) == b"ping"
    rc = stop(proc, signal.SIGINT)
    s.close()
    assert rc == 0, "exit status %s on SIGINT" % rc


@test
def echo_server_usage_error():
    rc = subprocess.run([os.path.join(EXAMPLES, "echo_server")],
                        stderr=subprocess.PIPE).returncode
    assert rc == 2, rc


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@test
def http_client_fetches_a_page():
    body = b"hello from the test server\n" * 500
    root = os.path.join(BUILD, "http-root")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "page.txt"), "wb") as f:
        f.write(body)
    handler = lambda *a, **k: Quiet(*a, directory=root, **k)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        out = subprocess.run(
            [os.path.join(EXAMPLES, "http_client"),
             str(srv.server_address[1]), "localhost", "/page.txt"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    finally:
        srv.shutdown()
    assert out.returncode == 0, out.stderr
    head, _, got = out.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head[:40]
    assert got == body, "body differs (%d vs %d bytes)" % (len(got), len(body))


@test
def http_client_refused_exits_1():
    out = subprocess.run([os.path.join(EXAMPLES, "http_client"),
                          str(free_port())],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         timeout=30)
    assert out.returncode == 1, out.returncode
    assert b"refused" in out.stderr.lower(), out.stderr


@test
def http_client_unknown_host_exits_1():
    out = subprocess.run([os.path.join(EXAMPLES, "http_client"), "80",
                          "nonexistent.invalid"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         timeout=60)
    assert out.returncode == 1, out.returncode


def http_client_run(*args, timeout=30):
    return subprocess.run([os.path.join(EXAMPLES, "http_client")]
                          + [str(a) for a in args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout)


@test
def http_client_gives_up_on_a_silent_server():
    # A server that accepts and never answers: the documentation's client
    # waits for ever; ours gives up after --timeout without progress.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        start_t = time.monotonic()
        out = http_client_run("--timeout", "0.5", srv.getsockname()[1])
        took = time.monotonic() - start_t
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert b"no progress" in out.stderr, out.stderr
    assert 0.4 <= took < 10, took


@test
def http_client_slow_server_is_progress():
    # The timeout is for a stall, not for the whole response: a response
    # that trickles in, a piece every 0.2 s, arrives whole with a 1 s one.
    body = b"".join(b"piece %d\n" % i for i in range(10))
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)

        def serve():
            conn, _ = srv.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
                for i in range(0, len(body), 8):
                    time.sleep(0.2)
                    conn.sendall(body[i:i + 8])

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        out = http_client_run("--timeout", "1", srv.getsockname()[1])
        t.join(10)
    assert out.returncode == 0, (out.returncode, out.stderr)
    assert out.stdout.partition(b"\r\n\r\n")[2] == body, out.stdout


@test
def http_client_usage_errors():
    # exit 2, nothing sent: a port out of range, a host or path that would
    # add a header to the request (CR LF) or break its line (a space), a
    # timeout that is not a positive number
    for args in (["0"], ["65536"], ["80x"], ["80", "a b"],
                 ["80", "localhost", "/x\r\nX-Evil: 1"],
                 ["--timeout", "0", "80"], ["--timeout", "nan", "80"],
                 ["80", "localhost", "/", "extra"]):
        out = http_client_run(*args)
        assert out.returncode == 2, (args, out.returncode)
        assert b"usage" in out.stderr, (args, out.stderr)
    # a path that would make the request longer than its buffer
    out = http_client_run("80", "localhost", "/" + "x" * 2000)
    assert out.returncode == 2, out.returncode
    assert b"usage" in out.stderr, out.stderr


def one_shot_server(family, host, answer):
    """A server that takes one connection, reads its request (up to the
    blank line) and calls answer(conn, request) in a thread; returns the
    listening socket and the thread, whose `request` attribute has it."""
    srv = socket.socket(family)
    srv.bind((host, 0))
    srv.listen(1)

    def run():
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(10)
            req = b""
            while b"\r\n\r\n" not in req:
                got = conn.recv(4096)
                if not got:
                    break
                req += got
            t.request = req
            answer(conn, req)
    t = threading.Thread(target=run, daemon=True)
    t.request = None
    t.start()
    return srv, t


@test
def http_client_no_response_exits_1():
    # The server accepts, reads the request and ends the connection without
    # a byte of response: closed, or reset (SO_LINGER 0).  Both are a
    # failed fetch (curl: "empty reply from server"), not a success.
    def close(conn, req):
        pass

    def reset(conn, req):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                        struct.pack("ii", 1, 0))
    for answer in (close, reset):
        srv, t = one_shot_server(socket.AF_INET, "127.0.0.1", answer)
        with srv:
            out = http_client_run("--timeout", "10", srv.getsockname()[1])
            t.join(10)
        assert out.returncode == 1, (answer.__name__, out.returncode,
                                     out.stderr)
        assert b"without a response" in out.stderr, out.stderr
        assert out.stdout == b"", out.stdout


@test
def http_client_host_header():
    # Host names the port when it is not 80, and an IPv6 address in
    # brackets (RFC 7230, 5.4), so that a server can parse it.
    def ok(conn, req):
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nok")
    cases = [(socket.AF_INET, "127.0.0.1", "127.0.0.1")]
    if socket.has_ipv6:
        cases.append((socket.AF_INET6, "::1", "[::1]"))
    for family, host, shown in cases:
        try:
            srv, t = one_shot_server(family, host, ok)
        except OSError:
            continue  # no IPv6 loopback here
        with srv:
            port = srv.getsockname()[1]
            out = http_client_run("--timeout", "10", port, host, "/p")
            t.join(10)
        assert out.returncode == 0, (host, out.returncode, out.stderr)
        want = b"GET /p HTTP/1.0\r\nHost: %s:%d\r\n\r\n" % (
            shown.encode(), port)
        assert t.request == want, (t.request, want)
        assert out.stdout.endswith(b"ok"), out.stdout


@test
def echo_server_mt_3_threads_60_clients():
    port = free_port()
    proc = start("echo_server_mt", str(port), "3")
    try:
        wait_port(port, proc)
        rng = random.Random(11)
        clients = [Client(port, [1, 1500, 256 << 10], rng) for _ in range(60)]
        sel = selectors.DefaultSelector()
        for c in clients:
            sel.register(c.sock, c.events(), c)
        live = len(clients)
        deadline = time.monotonic() + 60
        while live:
            if time.monotonic() > deadline:
                raise AssertionError("%d clients unfinished" % live)
            for key, mask in sel.select(1.0):
                c = key.data
                if c.on_ready(mask):
                    sel.unregister(c.sock)
                    c.sock.close()
                    live -= 1
                else:
                    sel.modify(c.sock, c.events(), c)
        assert proc.poll() is None, "server died"
    finally:
        rc = stop(proc)
    assert rc == 0, "exit status %s on SIGTERM" % rc


@test
def servers_refuse_a_bad_port():
    # A usage error (exit 2) before anything listens: atoi read "80x" as
    # port 80 and "0" (or "x") as port 0, any free port, so a typo gave a
    # server listening where nobody would find it.
    for name in ("echo_server", "echo_server_mt", "line_server",
                 "http_server", "resp_server", "smtp_server"):
        for port in ("0", "x", "80x", "65536", "-1"):
            try:
                out = subprocess.run([os.path.join(EXAMPLES, name), port],
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, timeout=10)
            except subprocess.TimeoutExpired:
                raise AssertionError("%s %s: still running" % (name, port))
            assert out.returncode == 2, (name, port, out.returncode)


@test
def echo_server_mt_usage_errors():
    exe = os.path.join(EXAMPLES, "echo_server_mt")
    assert subprocess.run([exe], stderr=subprocess.PIPE).returncode == 2
    for threads in ("0", "2x", "1025"):
        assert subprocess.run([exe, "1", threads], stderr=subprocess.PIPE,
                              timeout=10).returncode == 2, threads


@test
def embed_demo_runs_to_completion():
    out = subprocess.run([os.path.join(EXAMPLES, "embed_demo")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (b"echo: ping 1\necho: ping 2\n"
                          b"map detached: yes; the application's timer "
                          b"ticked: yes\n"), out.stdout


@test
def embedding_guide_shows_embed_demo():
    root = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    with open(os.path.join(root, "docs", "embedding.md")) as f:
        page = f.read()
    with open(os.path.join(root, "examples", "embed_demo.c")) as f:
        program = f.read()
    assert "```c\n" + program + "```" in page, \
        "docs/embedding.md does not show examples/embed_demo.c as it is"



def tool(name):
    """The path of a client program, or None (the test is then skipped)."""
    import shutil
    return shutil.which(name)


def skipped(name, why):
    print("skip %s: %s" % (name, why), file=sys.stderr)


def run(cmd, timeout=60, **kw):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=timeout, **kw)


class Server:
    """An example server on a free port, stopped with SIGTERM (exit 0)."""

    def __init__(self, name):
        self.port = free_port()
        self.proc = start(name, str(self.port))
        wait_port(self.port, self.proc)

    def stop(self):
        rc = stop(self.proc)
        assert rc == 0, "exit status %s on SIGTERM" % rc


@test
def http_server_with_curl():
    if not tool("curl"):
        return skipped("http_server_with_curl", "no curl")
    srv = Server("http_server")
    base = "http://127.0.0.1:%d" % srv.port
    try:
        out = run(["curl", "-s", "-i", base + "/"])
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(b"HTTP/1.1 200 OK"), out.stdout[:60]
        assert out.stdout.endswith(b"Hello from uvasyncore\n"), out.stdout
        # HTTP/1.1 keep-alive: two URLs over one connection.
        out = run(["curl", "-s", "-v", base + "/a", base + "/b"])
        assert out.stdout == b"Hello from uvasyncore\n" * 2, out.stdout
        assert b"Re-using existing connection" in out.stderr or \
            b"Reusing existing connection" in out.stderr, out.stderr[-300:]
        # HTTP/1.0 closes unless asked to keep the connection.
        out = run(["curl", "-s", "-i", "--http1.0", base + "/"])
        assert b"Connection: close" in out.stdout, out.stdout
        out = run(["curl", "-s", "-i", "--http1.0", "-H",
                   "Connection: keep-alive", base + "/"])
        assert b"Connection: keep-alive" in out.stdout, out.stdout
        # POST bodies come back byte-exactly (count terminator), small and
        # large, binary.
        body = random.Random(3).randbytes(3 << 20)
        path = os.path.join(BUILD, "post-body.bin")
        with open(path, "wb") as f:
            f.write(body)
        out = run(["curl", "-s", "--data-binary", "@" + path, base + "/echo"])
        assert out.stdout == body, "POST echo differs (%d bytes)" % \
            len(out.stdout)
        out = run(["curl", "-s", "-d", "x=1", base + "/echo"])
        assert out.stdout == b"x=1", out.stdout
    finally:
        srv.stop()


@test
def http_server_with_wrk():
    if not tool("wrk"):
        return skipped("http_server_with_wrk", "no wrk")
    srv = Server("http_server")
    try:
        out = run(["wrk", "-t1", "-c20", "-d1s",
                   "http://127.0.0.1:%d/" % srv.port], timeout=30)
        text = out.stdout.decode()
        assert out.returncode == 0, out.stderr
        assert "Requests/sec" in text, text
        assert "Socket errors" not in text, text
        assert "Non-2xx" not in text, text
    finally:
        srv.stop()


@test
def resp_server_with_redis_cli():
    cli = tool("redis-cli")
    if not cli:
        return skipped("resp_server_with_redis_cli", "no redis-cli")
    srv = Server("resp_server")

    def r(*args, stdin=None):
        out = run([cli, "-p", str(srv.port)] + list(args), input=stdin)
        assert out.returncode == 0, out.stderr
        return out.stdout.rstrip(b"\n")

    try:
        assert r("PING") == b"PONG"
        assert r("FLUSHALL") == b"OK"
        assert r("SET", "k", "v1") == b"OK"
        assert r("GET", "k") == b"v1"
        assert r("GET", "missing") == b""
        assert r("INCR", "n") == b"1"
        assert r("INCR", "n") == b"2"
        assert r("INCR", "k").startswith(b"ERR"), r("INCR", "k")
        assert r("ECHO", "hello world") == b"hello world"
        assert r("DBSIZE") == b"2"
        assert r("DEL", "k", "n", "nope") == b"2"
        assert r("DBSIZE") == b"0"
        # Binary-safe values: -x reads the last argument from stdin.
        blob = bytes(range(256)) * 64 + b"\r\n\0tail"
        assert r("-x", "SET", "bin", stdin=blob) == b"OK"
        out = run([cli, "-p", str(srv.port), "--raw", "GET", "bin"])
        assert out.stdout[:-1] == blob, "binary value differs"
        assert r("NOSUCH", "x").startswith(b"ERR unknown command")
        # Inline and pipelined commands over one raw connection.
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"PING\r\nECHO  spaced\r\n*2\r\n$4\r\nECHO\r\n$3\r\nx\ny\r\n"
                  b"QUIT\r\n")
        got = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        s.close()
        assert got == b"+PONG\r\n$6\r\nspaced\r\n$3\r\nx\ny\r\n+OK\r\n", got
    finally:
        srv.stop()


@test
def resp_server_with_redis_benchmark():
    bench = tool("redis-benchmark")
    if not bench:
        return skipped("resp_server_with_redis_benchmark", "no redis-benchmark")
    srv = Server("resp_server")
    try:
        for extra in ([], ["-P", "16"]):
            out = run([bench, "-p", str(srv.port), "-t", "ping,set,get",
                       "-n", "20000", "-c", "50", "-q"] + extra, timeout=120)
            text = out.stdout.decode().replace("\r", "\n")
            assert out.returncode == 0, out.stderr
            for name in ("PING_INLINE", "PING_MBULK", "SET", "GET"):
                assert "%s: " % name in text and "requests per second" in text, \
                    text[-400:]
        assert run(["redis-cli", "-p", str(srv.port), "DBSIZE"]).stdout \
            .strip() == b"1", "redis-benchmark's key:__rand_int__ was not set"
    finally:
        srv.stop()


def line_server_echoes(*flags):
    """Lines split across sends (a line in three pieces, three lines in
    one send, an empty line) come back byte-exactly, in order; the
    server exits 0 on SIGTERM."""
    port = free_port()
    proc = start("line_server", str(port), *flags)
    wait_port(port, proc)
    pieces = [b"hel", b"lo wo", b"rld\n", b"a\nbb\n\nccc\nd", b"dd\n",
              bytes(range(10)) + bytes(range(11, 256)) + b"\n"]
    want = b"".join(pieces)
    try:
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(10)
        for p in pieces:
            s.sendall(p)
            time.sleep(0.01)  # separate segments, so separate reads
        got = b""
        while len(got) < len(want):
            chunk = s.recv(4096)
            assert chunk, "closed after %r" % got
            got += chunk
        s.close()
        assert got == want, got
    finally:
        rc = stop(proc)
    assert rc == 0, "exit status %s on SIGTERM" % rc


@test
def line_server_echoes_lines():
    line_server_echoes()


@test
def line_server_batch_echoes_lines():
    line_server_echoes("--batch")


@test
def line_server_usage_error():
    for args in ([], ["1", "--nope"]):
        rc = subprocess.run([os.path.join(EXAMPLES, "line_server")] + args,
                            stderr=subprocess.PIPE).returncode
        assert rc == 2, (args, rc)


@test
def http_server_survives_empty_header_block():
    """\r\n\r\n as the first bytes: a 400 and a close, not a crash
    (found_headers wrote through a NULL buffer); the server answers the
    next client."""
    srv = Server("http_server")
    try:
        s = socket.create_connection(("127.0.0.1", srv.port), 10)
        s.sendall(b"\r\n\r\n")
        got = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        s.close()
        assert got.startswith(b"HTTP/1.0 400 "), got
        s = socket.create_connection(("127.0.0.1", srv.port), 10)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert b"200 OK" in s.recv(4096)
        s.close()
    finally:
        srv.stop()


failed = sum(1 for _, e in results if e is not None)
print("examples: %d passed, %d failed" % (len(results) - failed, failed))
sys.exit(1 if failed else 0)
