#!/usr/bin/env python3
"""CPython asynchat line echo server, the model of examples/line_server.c.

Usage: py_asynchat_line.py PORT

A dispatcher accepts on 127.0.0.1:PORT (listen backlog 4096, as the C
peers); each connection is an async_chat with the terminator b"\\n" whose
collect_incoming_data appends to a list and whose found_terminator pushes
the joined line plus b"\\n". Runs asyncore.loop(use_poll=True). Exits 0 on
SIGINT or SIGTERM.
"""
import signal
import sys
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import asynchat
    import asyncore


class LineHandler(asynchat.async_chat):
    """Sends every line back."""

    def __init__(self, sock):
        asynchat.async_chat.__init__(self, sock)
        self.set_terminator(b"\n")
        self.ibuffer = []

    def collect_incoming_data(self, data):
        self.ibuffer.append(data)

    def found_terminator(self):
        line = b"".join(self.ibuffer)
        self.ibuffer = []
        self.push(line + b"\n")


class LineServer(asyncore.dispatcher):
    """Accepts connections and gives each a LineHandler."""

    def __init__(self, host, port):
        asyncore.dispatcher.__init__(self)
        self.create_socket()
        self.set_reuse_addr()
        self.bind((host, port))
        self.listen(4096)

    def handle_accepted(self, sock, addr):
        LineHandler(sock)


def stop(signum, frame):
    """Ends the loop on SIGINT or SIGTERM, even if SIGINT was ignored by the
    parent (background jobs of a non-interactive shell)."""
    raise KeyboardInterrupt


def main():
    if len(sys.argv) != 2:
        sys.stderr.write("usage: py_asynchat_line.py PORT\n")
        return 2
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    LineServer("127.0.0.1", int(sys.argv[1]))
    try:
        asyncore.loop(use_poll=True)
    except KeyboardInterrupt:
        pass
    asyncore.close_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
