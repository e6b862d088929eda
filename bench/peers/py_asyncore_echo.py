#!/usr/bin/env python3
"""CPython asyncore echo server, the model uvasyncore ports to C.

Usage: py_asyncore_echo.py PORT

The echo server of the Python asyncore documentation: a dispatcher accepts
on 127.0.0.1:PORT, each connection is a dispatcher_with_send whose
handle_read does recv(8192) then send(). Runs asyncore.loop(use_poll=True).
The listen backlog is 4096 (the docs use 5) so that 1000 simultaneous
connects are not throttled by SYN retries, as for the C peers. Exits 0 on
SIGINT or SIGTERM.
"""
import signal
import sys
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import asyncore


class EchoHandler(asyncore.dispatcher_with_send):
    """Echoes whatever arrives."""

    def handle_read(self):
        data = self.recv(8192)
        if data:
            self.send(data)


class EchoServer(asyncore.dispatcher):
    """Accepts connections and gives each an EchoHandler."""

    def __init__(self, host, port):
        asyncore.dispatcher.__init__(self)
        self.create_socket()
        self.set_reuse_addr()
        self.bind((host, port))
        self.listen(4096)

    def handle_accepted(self, sock, addr):
        EchoHandler(sock)


def stop(signum, frame):
    """Ends the loop on SIGINT or SIGTERM, even if SIGINT was ignored by the
    parent (background jobs of a non-interactive shell)."""
    raise KeyboardInterrupt


def main():
    if len(sys.argv) != 2:
        sys.stderr.write("usage: py_asyncore_echo.py PORT\n")
        return 2
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    EchoServer("127.0.0.1", int(sys.argv[1]))
    try:
        asyncore.loop(use_poll=True)
    except KeyboardInterrupt:
        pass
    asyncore.close_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
