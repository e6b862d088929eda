#!/usr/bin/env python3
"""asyncio on uvloop: the echo server, and a line echo server.

Usage: py_uvloop_echo.py PORT [--lines]

The fastest Python event loop there is, beside the asyncore peers: an
asyncio.Protocol on uvloop's loop (Debian python3-uvloop) listening on
127.0.0.1:PORT (backlog 4096, as the other peers).  Echo: data_received
writes what arrived back (transport.write).  --lines: a line protocol in
the style of py_asynchat_line.py: data_received splits the input at b"\\n"
(the partial tail kept for the next read) and writes each complete line plus
b"\\n" back with its own transport.write (uvloop sends the writes of one
loop iteration together).  Exits 0 on SIGINT or SIGTERM.
"""
import asyncio
import signal
import sys

import uvloop


class Echo(asyncio.Protocol):
    """Echoes whatever arrives."""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


class LineEcho(asyncio.Protocol):
    """Sends every line back."""

    def connection_made(self, transport):
        self.transport = transport
        self.tail = b""

    def data_received(self, data):
        lines = (self.tail + data).split(b"\n")
        self.tail = lines.pop()
        for line in lines:
            self.found_line(line)

    def found_line(self, line):
        self.transport.write(line + b"\n")


async def serve(port, protocol):
    """Serves until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set_result, None)
    server = await loop.create_server(protocol, "127.0.0.1", port,
                                      backlog=4096, reuse_address=True)
    async with server:
        await stop


def main():
    args = sys.argv[1:]
    lines = "--lines" in args
    args = [a for a in args if a != "--lines"]
    if len(args) != 1:
        sys.stderr.write("usage: py_uvloop_echo.py PORT [--lines]\n")
        return 2
    uvloop.install()
    asyncio.run(serve(int(args[0]), LineEcho if lines else Echo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
