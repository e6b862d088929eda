#!/usr/bin/env python3
"""The reference side of the differential test of uvasyncore's dispatcher
against CPython 3.11's asyncore (spec D-, E-, L-, W- items).

    scenarios.py SCENARIO MODE

runs one scenario (see SCENARIOS) in select or poll mode and prints one
line per handler call, "<channel> <event> [details]".  The C program
test/diff/diff-scenarios.c prints the same lines for the same scenario run
through the library; run_diff.py compares the two per channel (the order
of different channels' events within a pass may differ by design).
"""
import errno
import os
import socket
import sys
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import asyncore
    except ImportError:  # Python 3.12 removed it
        asyncore = None

MAX_PASSES = 3000
RECONNECTS = 5  # reconnect: rounds after the first connection
BANNER = b"220 ready\r\n"
PAYLOAD = 1 << 20  # with_send: bytes sent after the three messages
MESSAGE = b"I'm not dead yet!\n"


def trace(line):
    print(line, flush=True)


def esc(data):
    """Bytes as one printable token."""
    out = []
    for b in data:
        if b == 0x5C:
            out.append("\\\\")
        elif b == 0x0A:
            out.append("\\n")
        elif 0x20 < b < 0x7F:
            out.append(chr(b))
        else:
            out.append("\\x%02x" % b)
    return "".join(out)


def err_name():
    """The current exception as the C side names its codes."""
    exc = sys.exc_info()[1]
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "AC_EFAIL"


def pattern(start, n):
    return bytes((i * 7 + 3) % 251 for i in range(start, start + n))


class State:
    """What the scenario's main needs to know, whatever got closed."""

    def __init__(self):
        self.client_done = False
        self.handler_done = False
        self.accepted = 0
        self.client_port = -1
        self.sock = None  # a socket the server keeps open
        self.rounds = 0  # reconnect: reconnects made
        self.addr = None  # reconnect: the server's address
        self.client = None  # reconnect: the client


class Handler(asyncore.dispatcher if asyncore else object):
    """The server side of a connection: echo, or count and check."""

    def __init__(self, sock, amap, st, how):
        super().__init__(sock, amap)
        self.st = st
        self.how = how
        self.out = b""
        self.total = 0
        self.ok = 1
        trace("handler init connected=%d" % self.connected)

    def writable(self):
        return len(self.out) > 0

    def handle_read(self):
        data = self.recv(65536)
        if self.how == "echo":
            trace("handler handle_read n=%d data=%s" % (len(data), esc(data)))
            self.out += data
            return
        expect = MESSAGE * 3 + pattern(0, PAYLOAD)
        if data != expect[self.total:self.total + len(data)]:
            self.ok = 0
        self.total += len(data)

    def handle_write(self):
        n = self.send(self.out)
        self.out = self.out[n:]
        trace("handler handle_write sent=%d" % n)

    def handle_close(self):
        if self.how == "echo":
            trace("handler handle_close")
        else:
            trace("handler handle_close total=%d ok=%d" % (self.total, self.ok))
        self.close()
        self.st.handler_done = True

    def handle_error(self):
        trace("handler handle_error %s" % err_name())
        self.handle_close()


class Server(asyncore.dispatcher if asyncore else object):
    """A listener on loopback (or an AF_UNIX path)."""

    def __init__(self, amap, st, how, path=None):
        super().__init__(map=amap)
        self.st = st
        self.how = how
        if path:
            self.create_socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.bind(path)
        else:
            self.create_socket(socket.AF_INET, socket.SOCK_STREAM)
            self.set_reuse_addr()
            self.bind(("127.0.0.1", 0))
        self.listen(5)
        self.port = None if path else self.socket.getsockname()[1]

    def writable(self):
        return True  # L-14: never reached on a listener

    def handle_write(self):
        trace("server handle_write")

    def handle_accept(self):
        if self.how == "chain":
            trace("server handle_accept")
        super().handle_accept()

    def handle_accepted(self, sock, addr):
        if self.st.client is not None:  # reconnect: the port of now
            self.st.client_port = self.st.client.socket.getsockname()[1]
        peer = "client" if (not addr or addr[1] == self.st.client_port) \
            else "other"
        if self.how.startswith("unix"):
            peer = "client"
        trace("server handle_accepted peer=%s" % peer)
        self.st.accepted += 1
        if self.how in ("echo", "with_send"):
            Handler(sock, self._map, self.st, self.how)
        elif self.how in ("eof", "unix_eof"):
            sock.send(b"bye")
            sock.close()
        elif self.how in ("reset", "fail"):
            sock.send(b"x")
            self.st.sock = sock
        elif self.how == "unix":
            self.st.sock = sock
        else:
            sock.close()

    def handle_error(self):
        trace("server handle_error %s" % err_name())
        self.close()


class Client(asyncore.dispatcher if asyncore else object):
    """The client side; `how` picks its behaviour."""

    def __init__(self, amap, st, how, addr, family=socket.AF_INET):
        super().__init__(map=amap)
        self.st = st
        self.how = how
        self.sent = False
        self.got = b""
        self.create_socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET:
            st.client_port = self.socket.getsockname()[1]
        self.connect(addr)
        if family == socket.AF_INET:
            st.client_port = self.socket.getsockname()[1]
        trace("client connect returned connected=%d connecting=%d" %
              (self.connected, self.connecting))

    def readable(self):
        return self.how != "unix"

    def writable(self):
        if self.how in ("echo", "exit", "banner"):
            return not self.sent
        return self.how == "refused"  # refused_ro: read interest only

    def handle_connect(self):
        trace("client handle_connect connected=%d connecting=%d" %
              (self.connected, self.connecting))

    def handle_write(self):
        if self.how == "exit":
            trace("client handle_write")
            self.sent = True
            raise asyncore.ExitNow()
        n = self.send(b"hello\n")
        self.sent = True
        trace("client handle_write sent=%d" % n)
        if self.how == "banner" and self.got:
            self.st.client_done = True

    def handle_read(self):
        data = self.recv(64)
        trace("client handle_read n=%d data=%s" % (len(data), esc(data)))
        self.got += data
        if self.how == "banner" and self.sent:
            self.st.client_done = True
        if self.how == "reset":
            raise OSError(errno.ECONNRESET, "reset by the handler")
        if self.how == "fail":
            raise ValueError("handler failed")
        if self.how == "echo" and self.got == b"hello\n":
            trace("client close")
            self.close()
            self.st.client_done = True

    def handle_close(self):
        trace("client handle_close")
        self.close()
        if self.how == "reconnect" and self.st.rounds < RECONNECTS:
            # The reconnect idiom: the same object, a new socket.
            self.st.rounds += 1
            self.create_socket(socket.AF_INET, socket.SOCK_STREAM)
            self.connect(self.st.addr)
            trace("client reconnect connected=%d connecting=%d" %
                  (self.connected, self.connecting))
            return
        self.st.client_done = True

    def handle_error(self):
        trace("client handle_error %s" % err_name())
        self.handle_close()


class WsClient(asyncore.dispatcher_with_send if asyncore else object):
    """A dispatcher_with_send client that queues before the connect."""

    def __init__(self, amap, st, addr):
        super().__init__(map=amap)
        self.st = st
        self.create_socket(socket.AF_INET, socket.SOCK_STREAM)
        self.connect(addr)
        st.client_port = self.socket.getsockname()[1]
        trace("client connect returned connected=%d connecting=%d" %
              (self.connected, self.connecting))
        for _ in range(3):
            self.send(MESSAGE)
        self.send(pattern(0, PAYLOAD))
        # How much the kernel took before the connect was reported is
        # timing; that something is still queued is not.
        trace("client queued pending=%s" %
              ("yes" if self.out_buffer else "no"))

    def readable(self):
        return False

    def handle_connect(self):
        trace("client handle_connect connected=%d connecting=%d" %
              (self.connected, self.connecting))

    def handle_write(self):
        super().handle_write()
        if not self.out_buffer:
            trace("client drained")
            self.close()
            self.st.client_done = True

    def handle_close(self):
        trace("client handle_close")
        self.close()
        self.st.client_done = True

    def handle_error(self):
        trace("client handle_error %s" % err_name())
        self.handle_close()


def run(amap, use_poll, done):
    """Single passes until done() or MAX_PASSES; 'main exit' on ExitNow."""
    for _ in range(MAX_PASSES):
        if done():
            return
        try:
            asyncore.loop(timeout=0.01, use_poll=use_poll, map=amap, count=1)
        except asyncore.ExitNow:
            trace("main exit")
            return
    trace("main gave up")


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def scenario_tcp(how, use_poll):
    amap = {}
    st = State()
    if how in ("refused", "refused_ro"):
        Client(amap, st, how, ("127.0.0.1", closed_port()))
        run(amap, use_poll, lambda: st.client_done)
        trace("main end map_len=%d" % len(amap))
        return
    server = Server(amap, st, how)
    if how == "with_send":
        WsClient(amap, st, ("127.0.0.1", server.port))
        run(amap, use_poll, lambda: st.client_done and st.handler_done)
    elif how == "exit":
        Client(amap, st, how, ("127.0.0.1", server.port))
        run(amap, use_poll, lambda: False)
    elif how == "echo":
        Client(amap, st, how, ("127.0.0.1", server.port))
        run(amap, use_poll, lambda: st.client_done and st.handler_done)
    elif how == "reconnect":
        st.addr = ("127.0.0.1", server.port)
        st.client = Client(amap, st, how, st.addr)
        run(amap, use_poll, lambda: st.client_done)
    else:  # eof, chain, reset, fail
        Client(amap, st, how, ("127.0.0.1", server.port))
        run(amap, use_poll, lambda: st.client_done)
    trace("main end map_len=%d" % len(amap))
    if st.sock is not None:
        st.sock.close()
    asyncore.close_all(amap)


def scenario_banner(use_poll):
    """A banner protocol (SMTP, FTP, POP3): the server's greeting is
    already there when the client's connect completes; the client's first
    pass must see handle_connect, handle_read, handle_write (D-16, D-18).
    The server is a plain socket, outside the map."""
    amap = {}
    st = State()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(5)
    client = Client(amap, st, "banner", lsock.getsockname())
    conn, _ = lsock.accept()
    conn.sendall(BANNER)
    run(amap, use_poll, lambda: st.client_done)
    trace("main end map_len=%d" % len(amap))
    client.close()
    conn.close()
    lsock.close()


def scenario_unix(how, use_poll):
    amap = {}
    st = State()
    path = "/tmp/ac-diff-%d.sock" % os.getpid()
    if os.path.exists(path):
        os.unlink(path)
    Server(amap, st, how, path)
    client = Client(amap, st, how, path, socket.AF_UNIX)
    if how == "unix":
        run(amap, use_poll, lambda: st.accepted > 0)
        client.close()
    else:
        run(amap, use_poll, lambda: st.client_done)
    trace("main end map_len=%d" % len(amap))
    if st.sock is not None:
        st.sock.close()
    asyncore.close_all(amap)
    os.unlink(path)


SCENARIOS = ["echo", "refused", "refused_ro", "eof", "with_send", "chain",
             "reset", "fail", "exit", "unix", "unix_eof", "banner",
             "reconnect"]

# Scenarios that run in one mode only.  unix_eof in poll mode: CPython sees
# POLLIN|POLLHUP and runs handle_read then handle_close in one readwrite
# the read that would see EOF never happens); libuv folds HUP into
# readable, so uvasyncore reads on until EOF (by design, see
# docs/spec-coverage.md, L-15).
MODES = {"unix_eof": ("select",)}


def main():
    if asyncore is None:
        return 77
    name, mode = sys.argv[1], sys.argv[2]
    use_poll = mode == "poll"
    if name.startswith("unix"):
        scenario_unix(name, use_poll)
    elif name == "banner":
        scenario_banner(use_poll)
    else:
        scenario_tcp(name, use_poll)
    return 0


if __name__ == "__main__":
    sys.exit(main())
