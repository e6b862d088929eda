"""asynchat on uvasyncore: async_chat, simple_producer, find_prefix_at_end.

CPython 3.11's asynchat, behaviour for behaviour, over uvasyncore.asyncore.
Input is split at the terminator (a bytes string, a byte count, or None for
"everything"); output is a FIFO of byte strings and producers.
"""

from collections import deque

from uvasyncore import _core, asyncore

__all__ = ['async_chat', 'simple_producer', 'find_prefix_at_end']


class async_chat(asyncore.dispatcher):
    """Reads input up to a terminator, writes a FIFO of buffers and
    producers.  Subclasses provide collect_incoming_data and
    found_terminator."""

    # Bytes read, and written, at most per call.
    ac_in_buffer_size = 65536
    ac_out_buffer_size = 65536

    # str data and terminators are encoded when this is set.
    use_encoding = 0
    encoding = 'latin-1'

    # The input not yet split at the terminator: _ac_ibuf[_ac_ipos:]
    # (chat_input, in C, cuts records off it by moving the offset instead
    # of copying the rest, as the original's ac_in_buffer = ac_in_buffer[n:]
    # did for every record).
    _ac_ibuf = b''
    _ac_ipos = 0

    @property
    def ac_in_buffer(self):
        """The input not yet handed to collect_incoming_data, as in the
        original; assigning it replaces that input."""
        pos = self._ac_ipos
        return self._ac_ibuf[pos:] if pos else self._ac_ibuf

    @ac_in_buffer.setter
    def ac_in_buffer(self, value):
        self._ac_ibuf = value
        self._ac_ipos = 0

    def __init__(self, sock=None, map=None):
        self.ac_in_buffer = b''
        # Collected input, for the default collect_incoming_data.
        self.incoming = []
        self.producer_fifo = deque()
        asyncore.dispatcher.__init__(self, sock, map)

    def collect_incoming_data(self, data):
        raise NotImplementedError("must be implemented in subclass")

    def _collect_incoming_data(self, data):
        self.incoming.append(data)

    def _get_data(self):
        data = b''.join(self.incoming)
        del self.incoming[:]
        return data

    def found_terminator(self):
        raise NotImplementedError("must be implemented in subclass")

    def set_terminator(self, term):
        """term: bytes, an int (that many bytes), or None (no terminator)."""
        if isinstance(term, str) and self.use_encoding:
            term = bytes(term, self.encoding)
        elif isinstance(term, int) and term < 0:
            raise ValueError('the number of received bytes must be positive')
        self.terminator = term

    # return self.terminator (in C, as the methods below taken from _core:
    # shim/python/_core.c has each one's Python beside it).
    get_terminator = _core.chat_get_terminator

    # self.recv(self.ac_in_buffer_size) (BlockingIOError: nothing; another
    # OSError: handle_error()), str data encoded if use_encoding, then
    # _chat_input: the data joined to the input and split at the terminator
    # as the original's loop did, calling get_terminator,
    # collect_incoming_data and found_terminator as it did (the terminator
    # is asked for again after each found_terminator, which may change it),
    # in linear time.
    handle_read = _core.chat_handle_read

    def handle_write(self):
        self.initiate_send()

    def handle_close(self):
        self.close()

    # push(data): the original's (data cut in pieces of at most
    # ac_out_buffer_size into producer_fifo, then initiate_send()), in C,
    # telling the poller when producer_fifo's emptiness changed.
    push = _core.chat_push

    def push_with_producer(self, producer):
        had_output = bool(self.producer_fifo)
        self.producer_fifo.append(producer)
        self.initiate_send()
        self._ac_output_changed(had_output)

    def _ac_output_changed(self, had_output):
        # writable() reads whether producer_fifo is empty: when a push
        # changed that (typically from another channel's handler), the
        # poller asks again.  A push that went out whole changed nothing.
        # (Within this channel's own events it is asked again anyway.)
        if had_output != bool(self.producer_fifo):
            self._ac_touch()

    # readable: return 1 (the terminator may change between reads, so a
    # full ac_in_buffer is no reason to stop reading); writable: return
    # self.producer_fifo or (not self.connected).
    readable = _core.chat_readable
    writable = _core.chat_writable

    def close_when_done(self):
        """Closes the channel once everything pushed so far is sent."""
        had_output = bool(self.producer_fifo)
        self.producer_fifo.append(None)
        self._ac_output_changed(had_output)

    # initiate_send: the original's loop over producer_fifo (b'' skipped,
    # None closes, producers asked for more) up to one send, in C.
    initiate_send = _core.chat_initiate_send

    def discard_buffers(self):
        had_output = bool(self.producer_fifo)
        self.ac_in_buffer = b''
        del self.incoming[:]
        self.producer_fifo.clear()
        self._ac_output_changed(had_output)


asyncore._default_readable.add(async_chat.readable)
asyncore._default_writable.add(async_chat.writable)


class simple_producer:
    """Hands out data in pieces of at most buffer_size bytes."""

    def __init__(self, data, buffer_size=512):
        self.data = data
        self.buffer_size = buffer_size

    def more(self):
        if len(self.data) > self.buffer_size:
            piece = self.data[:self.buffer_size]
            self.data = self.data[self.buffer_size:]
            return piece
        piece, self.data = self.data, b''
        return piece


def find_prefix_at_end(haystack, needle):
    """The length of the longest proper prefix of needle that haystack
    ends with (0 if none)."""
    n = len(needle) - 1
    while n and not haystack.endswith(needle[:n]):
        n -= 1
    return n


for _cls in (async_chat, simple_producer):
    _cls.__module__ = 'asynchat'
del _cls
