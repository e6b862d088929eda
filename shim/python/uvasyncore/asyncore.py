"""asyncore on uvasyncore: the removed stdlib module, its readiness wait on libuv.

Every Python-level behaviour of CPython 3.11's asyncore is kept: the classes
and their methods (each may be overridden), the read/write/_exception/
readwrite wrappers, socket_map (a plain dict the application may pass, swap
or inspect), loop/poll/poll2.  What changed is the wait of a pass: instead of
select()/poll() over every channel, a uvasyncore._core.Poller per map keeps
one libuv watcher per fd and asks Python for a channel's interest only when it
may have changed (docs/python.md says exactly when).
"""

import os
import select
import socket
import sys
import time
import warnings
from errno import (EALREADY, EINPROGRESS, EWOULDBLOCK, ECONNRESET, EINVAL,
                   ENOTCONN, ESHUTDOWN, EISCONN, EBADF, ECONNABORTED, EPIPE,
                   EAGAIN, errorcode)

from uvasyncore import _core
from uvasyncore._core import Poller

__all__ = ['ExitNow', 'close_all', 'compact_traceback', 'dispatcher',
           'dispatcher_with_send', 'loop', 'poll', 'poll2', 'poll3', 'read',
           'readwrite', 'socket_map', 'write']
if os.name == 'posix':
    __all__ += ['file_dispatcher', 'file_wrapper']

# Errors that mean "the peer went away": such an OSError closes the channel
# instead of reaching handle_error.
_DISCONNECTED = frozenset({ECONNRESET, ENOTCONN, ESHUTDOWN, ECONNABORTED,
                           EPIPE, EBADF})

# The default map: channels created without map= live here.
socket_map = {}

_POLLIN = getattr(select, 'POLLIN', 0x001)
_POLLPRI = getattr(select, 'POLLPRI', 0x002)
_POLLOUT = getattr(select, 'POLLOUT', 0x004)
_POLLERR = getattr(select, 'POLLERR', 0x008)
_POLLHUP = getattr(select, 'POLLHUP', 0x010)
_POLLNVAL = getattr(select, 'POLLNVAL', 0x020)
_POLL_CLOSE = _POLLHUP | _POLLERR | _POLLNVAL


def _strerror(err):
    """os.strerror(err), or a name for codes the C library does not know."""
    try:
        return os.strerror(err)
    except (ValueError, OverflowError, NameError):
        return errorcode.get(err, "Unknown error %s" % err)


class ExitNow(Exception):
    """Raised in a handler to leave the loop; never passed to handle_error."""


_reraised_exceptions = (ExitNow, KeyboardInterrupt, SystemExit)


# ---- the per-map pollers --------------------------------------------------
#
# id(map) -> _Watch.  The map is held so that its id stays its own; the
# entry goes when its map is empty (_forget_if_empty).

class _Watch:
    __slots__ = ('map', 'poller', 'foreign')

    def __init__(self, map):
        self.map = map
        self.poller = Poller()
        # Keys that are no file descriptor (a test's mock socket): kept in
        # the map, never reported ready.
        self.foreign = set()


_pollers = {}

# Predicates of the base classes: a channel that uses them is asked for its
# interest only after something that they read changed (asynchat adds its
# own).  A channel overriding either one is asked every pass.
_default_readable = set()
_default_writable = set()


def _watch_of(map):
    watch = _pollers.get(id(map))
    if watch is None or watch.map is not map:
        watch = _pollers[id(map)] = _Watch(map)
    return watch


def _forget_if_empty(map):
    # An empty map needs no poller; what the poller may still watch (a
    # channel put in by hand and closed through another map, or the
    # channels of a map emptied by hand) is stale: let it go, as the
    # original's map let them go.
    if map:
        return
    watch = _pollers.get(id(map))
    if watch is not None and watch.map is map:
        del _pollers[id(map)]
        for fd in watch.poller.fds():
            watch.poller.remove(fd)


def _is_default(obj, name, defaults):
    """Whether obj.name is its class's name and that is one of defaults
    (not overridden in the class, nor set on the instance)."""
    cls = type(obj)
    method = getattr(cls, name, None)
    if method not in defaults:
        return False
    # The base classes' predicates are C method descriptors: obj.name is
    # a builtin bound method, equal to the class's bound to obj unless the
    # instance has its own.
    return getattr(obj, name, None) == method.__get__(obj, cls)


def _asks_python(obj):
    """Whether obj's interest must be asked for every pass: its readable or
    writable is not a base class's (overridden in its class or set on the
    instance).  Not through obj.__dict__: asking for it makes CPython keep a
    real dict for the instance, and every attribute access slower."""
    return not (_is_default(obj, 'readable', _default_readable) and
                _is_default(obj, 'writable', _default_writable))


def _add(watch, fd, obj):
    watch.foreign.discard(fd)
    try:
        watch.poller.add(fd, obj, _asks_python(obj))
    except (TypeError, ValueError, OverflowError):
        watch.foreign.add(fd)


def _watch(map, fd, obj):
    watch = _watch_of(map)
    _add(watch, fd, obj)
    return watch.poller


def _synced_poller(map):
    """The map's poller, first brought in line with the map if the map was
    changed behind add_channel/del_channel (the sizes then differ)."""
    watch = _watch_of(map)
    poller = watch.poller
    if len(poller) + len(watch.foreign) == len(map):
        return poller
    for fd in poller.fds():
        if map.get(fd) is not poller.get(fd):
            poller.remove(fd)
    watch.foreign.intersection_update(map)
    for fd, obj in list(map.items()):
        if fd not in watch.foreign and poller.get(fd) is not obj:
            _add(watch, fd, obj)
    return poller


# ---- dispatching one event --------------------------------------------------

def read(obj):
    try:
        obj.handle_read_event()
    except _reraised_exceptions:
        raise
    except:
        obj.handle_error()


def write(obj):
    try:
        obj.handle_write_event()
    except _reraised_exceptions:
        raise
    except:
        obj.handle_error()


def _exception(obj):
    try:
        obj.handle_expt_event()
    except _reraised_exceptions:
        raise
    except:
        obj.handle_error()


def readwrite(obj, flags):
    """Dispatches one poll() result: read, write, priority data, then close
    for a hang-up or error.  A disconnection error closes the channel.
    (poll2() runs the same in C while this function is not replaced.)"""
    try:
        if flags & _POLLIN:
            obj.handle_read_event()
        if flags & _POLLOUT:
            obj.handle_write_event()
        if flags & _POLLPRI:
            obj.handle_expt_event()
        if flags & _POLL_CLOSE:
            obj.handle_close()
    except OSError as e:
        if e.errno in _DISCONNECTED:
            obj.handle_close()
        else:
            obj.handle_error()
    except _reraised_exceptions:
        raise
    except:
        obj.handle_error()


_readwrite, _read, _write, _exception_orig = readwrite, read, write, _exception


def _handler_failed(obj, exc, use_poll):
    """The except clauses of readwrite (use_poll) or of read/write/
    _exception, for an exception exc that a handler raised while the poller
    ran them in C (Poller.dispatch).  exc is current in handle_error."""
    try:
        raise exc
    except OSError as e:
        if not use_poll:
            obj.handle_error()
        elif e.errno in _DISCONNECTED:
            obj.handle_close()
        else:
            obj.handle_error()
    except _reraised_exceptions:
        raise
    except:
        obj.handle_error()


# ---- one pass, and the loop -------------------------------------------------

def poll(timeout=0.0, map=None):
    """One pass with select()'s semantics: every readable channel's read,
    then every writable one's write, then the exceptional ones."""
    if map is None:
        map = socket_map
    if not map:
        _forget_if_empty(map)
        return
    poller = _synced_poller(map)
    if read is _read and write is _write and _exception is _exception_orig:
        # The same calls, run by the poller without these functions'
        # frames (_handler_failed runs their except clauses).
        poller.dispatch(timeout, False, map, _handler_failed)
        return
    ready = poller.wait(timeout, False)
    readers = [fd for fd, flags in ready if flags & 1]
    writers = [fd for fd, flags in ready if flags & 2]
    expts = [fd for fd, flags in ready if flags & 4]
    for fds, handler in ((readers, read), (writers, write),
                         (expts, _exception)):
        for fd in fds:
            obj = map.get(fd)
            if obj is not None:
                handler(obj)


def poll2(timeout=0.0, map=None):
    """One pass with poll()'s semantics: readwrite() per ready channel."""
    if map is None:
        map = socket_map
    if timeout is not None:
        # Milliseconds for select.poll's poll(), made first of all as the
        # original makes them (an empty map too): int() raises for inf,
        # NaN or a str, and a timeout above -0.001 s is 0, no wait.
        timeout = int(timeout * 1000)
    if not map:
        _forget_if_empty(map)
        return
    poller = _synced_poller(map)
    if readwrite is _readwrite:
        # readwrite per channel, run by the poller without its frame.
        poller.dispatch(timeout, True, map, _handler_failed)
        return
    for fd, flags in poller.wait(timeout, True):
        obj = map.get(fd)
        if obj is not None:
            readwrite(obj, flags)


poll3 = poll2


def loop(timeout=30.0, use_poll=False, map=None, count=None):
    """Runs passes while the map has channels, at most count of them."""
    if map is None:
        map = socket_map
    poll_fun = poll2 if use_poll and hasattr(select, 'poll') else poll
    if count is None:
        while map:
            poll_fun(timeout, map)
    else:
        while map and count > 0:
            poll_fun(timeout, map)
            count -= 1
    # A map emptied by hand: its channels go now, not at a later pass.
    _forget_if_empty(map)


# ---- dispatcher -------------------------------------------------------------

class dispatcher:

    debug = False
    connected = False
    accepting = False
    connecting = False
    closing = False
    addr = None
    ignore_log_types = frozenset({'warning'})
    # The Poller watching this channel (None when not in a map).
    _ac_poller = None

    def __init__(self, sock=None, map=None):
        self._map = socket_map if map is None else map
        self._fileno = None
        if not sock:
            self.socket = None
            return
        # A socket from a blocking source must not block the loop.
        sock.setblocking(False)
        self.set_socket(sock, map)
        self.connected = True
        try:
            self.addr = sock.getpeername()
        except OSError as err:
            if err.errno in (ENOTCONN, EINVAL):
                # Not connected (yet): a socket may be passed unconnected.
                self.connected = False
            else:
                # A broken socket would be polled forever: drop it.
                self.del_channel(map)
                raise

    def __repr__(self):
        parts = [self.__class__.__module__ + "." + self.__class__.__qualname__]
        if self.accepting and self.addr:
            parts.append('listening')
        elif self.connected:
            parts.append('connected')
        if self.addr is not None:
            try:
                parts.append('%s:%d' % self.addr)
            except TypeError:
                parts.append(repr(self.addr))
        return '<%s at %#x>' % (' '.join(parts), id(self))

    def _ac_touch(self):
        # A predicate's input changed outside this channel's own events:
        # have the poller ask readable()/writable() again.
        poller = self._ac_poller
        if poller is not None and self._fileno is not None:
            poller.touch(self._fileno)

    def add_channel(self, map=None):
        if map is None:
            map = self._map
        # Watched first: a channel whose poller cannot be made (no fd left
        # for its loop: OSError) is not left in the map.
        self._ac_poller = _watch(map, self._fileno, self)
        map[self._fileno] = self

    def del_channel(self, map=None):
        fd = self._fileno
        if map is None:
            map = self._map
        if fd in map:
            del map[fd]
        poller = self._ac_poller
        if poller is not None:
            self._ac_poller = None
            watch = _pollers.get(id(map))
            if watch is not None and watch.map is map:
                watch.foreign.discard(fd)
            try:
                if poller.get(fd) is self:
                    poller.remove(fd)
            except (TypeError, ValueError, OverflowError):
                pass
            _forget_if_empty(map)
        self._fileno = None

    def create_socket(self, family=socket.AF_INET, type=socket.SOCK_STREAM):
        self.family_and_type = family, type
        sock = socket.socket(family, type)
        sock.setblocking(False)
        self.set_socket(sock)

    def set_socket(self, sock, map=None):
        self.socket = sock
        self._fileno = sock.fileno()
        self.add_channel(map)

    def set_reuse_addr(self):
        # Best effort: some sockets cannot have it.
        try:
            sock = self.socket
            flag = sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, flag | 1)
        except OSError:
            pass

    # Predicates asked before each wait: return True.  This method and the
    # others taken from _core (recv, send, handle_read_event,
    # handle_write_event) are the original's Python methods written in C
    # (shim/python/_core.c shows each one's Python beside it): they call
    # the channel's other methods by name, as the original, so overrides
    # are honoured; a message on the base classes no longer pays a Python
    # frame for each of them.
    readable = _core.dispatcher_readable
    writable = _core.dispatcher_writable

    # Socket methods.

    def listen(self, num):
        self.accepting = True
        self._ac_touch()
        if os.name == 'nt' and num > 5:
            num = 5
        return self.socket.listen(num)

    def bind(self, addr):
        self.addr = addr
        return self.socket.bind(addr)

    def connect(self, address):
        self.connected = False
        self.connecting = True
        self._ac_touch()
        err = self.socket.connect_ex(address)
        if (err in (EINPROGRESS, EALREADY, EWOULDBLOCK)
                or err == EINVAL and os.name == 'nt'):
            self.addr = address
            return
        if err not in (0, EISCONN):
            raise OSError(err, errorcode[err])
        self.addr = address
        self.handle_connect_event()

    def accept(self):
        """(conn, addr), or None when there was nothing to accept after all."""
        try:
            conn, addr = self.socket.accept()
        except TypeError:
            return None
        except OSError as why:
            if why.errno in (EWOULDBLOCK, ECONNABORTED, EAGAIN):
                return None
            raise
        return conn, addr

    # send(data): the bytes sent; 0 when the socket would block or the peer
    # went away (then handle_close() ran).  recv(buffer_size): the data;
    # b'' when the peer closed or went away (handle_close() ran).
    send = _core.dispatcher_send
    recv = _core.dispatcher_recv

    def close(self):
        self.connected = False
        self.accepting = False
        self.connecting = False
        self.del_channel()
        if self.socket is None:
            return
        try:
            self.socket.close()
        except OSError as why:
            if why.errno not in (ENOTCONN, EBADF):
                raise

    # Logging.

    def log(self, message):
        sys.stderr.write('log: %s\n' % str(message))

    def log_info(self, message, type='info'):
        if type not in self.ignore_log_types:
            print('%s: %s' % (type, message))

    # Event handlers: the events as the poll functions report them ...

    # A read event: handle_accept() when listening, else handle_read()
    # (after handle_connect_event() if a connect was under way).
    handle_read_event = _core.dispatcher_handle_read_event

    def handle_connect_event(self):
        err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err != 0:
            raise OSError(err, _strerror(err))
        self.handle_connect()
        self.connected = True
        self.connecting = False
        self._ac_touch()

    # A write event: ignored when listening, else handle_write() (after
    # handle_connect_event() if a connect was under way).
    handle_write_event = _core.dispatcher_handle_write_event

    def handle_expt_event(self):
        # Priority data and a pending socket error look alike to select():
        # the error closes the channel.
        err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err != 0:
            self.handle_close()
        else:
            self.handle_expt()

    def handle_error(self):
        nil, t, v, tbinfo = compact_traceback()
        try:
            self_repr = repr(self)
        except:
            self_repr = '<__repr__(self) failed for object at %0x>' % id(self)
        self.log_info(
            'uncaptured python exception, closing channel %s (%s:%s %s)' % (
                self_repr, t, v, tbinfo),
            'error')
        self.handle_close()

    # ... and what an application overrides.

    def handle_expt(self):
        self.log_info('unhandled incoming priority event', 'warning')

    def handle_read(self):
        self.log_info('unhandled read event', 'warning')

    def handle_write(self):
        self.log_info('unhandled write event', 'warning')

    def handle_connect(self):
        self.log_info('unhandled connect event', 'warning')

    def handle_accept(self):
        pair = self.accept()
        if pair is not None:
            self.handle_accepted(*pair)

    def handle_accepted(self, sock, addr):
        sock.close()
        self.log_info('unhandled accepted event', 'warning')

    def handle_close(self):
        self.log_info('unhandled close event', 'warning')
        self.close()


class _OutBuffer(bytearray):
    """dispatcher_with_send's queued output once it holds more than one
    send's data: appended to in place, written from the front (CPython's
    bytearray drops a prefix without moving the rest).  Never handed out:
    reading out_buffer turns it into bytes."""

    __slots__ = ()


class dispatcher_with_send(dispatcher):
    """A dispatcher that buffers what send() could not write at once."""

    # What send() could not write yet.  The original kept it in a bytes
    # out_buffer that it rebuilt on every send (out_buffer + data) and every
    # write (out_buffer[sent:]): a copy of everything queued, each time,
    # quadratic in the output waiting for a slow reader (16 MiB queued in
    # 8 KiB sends: 0.97 s of copying).  Here it is the original's bytes
    # (_ac_obuf) while at most one send's data waits, and an _OutBuffer
    # (_ac_oq, else None) once more does: each byte is copied a bounded
    # number of times (the same 16 MiB: 0.07 s).  out_buffer is a property
    # over them, read and assigned as before.  (No class-level defaults for
    # the two: CPython 3.11 does not specialize loads of instance attributes
    # that shadow class attributes; each takes the slow generic lookup.)

    @property
    def out_buffer(self):
        """The output not yet written (bytes), as in the original;
        assigning it replaces that output."""
        queue = self._ac_oq
        if queue is not None:
            # Kept as bytes until more is queued: code that reads it over
            # and over (while d.out_buffer: poll()) pays one copy per write,
            # as the original did, not one per read.
            self._ac_obuf = bytes(queue)
            self._ac_oq = None
        return self._ac_obuf

    @out_buffer.setter
    def out_buffer(self, value):
        self._ac_obuf = value
        self._ac_oq = None
        # writable() reads it: assigned from outside this channel's
        # handlers, the poller must ask again.
        self._ac_touch()

    def __init__(self, sock=None, map=None):
        dispatcher.__init__(self, sock, map)
        self.out_buffer = b''

    # initiate_send(): one write of the queued output.  In C (_core.c) the
    # usual case, the original's
    #     sent = dispatcher.send(self, buf[:65536])   # buf: out_buffer
    #     if sent and sent == len(buf): out_buffer = b''
    # and the other cases here (_ac_sent_part, _ac_send_from_queue).
    initiate_send = _core.dws_initiate_send

    def _ac_sent_part(self, buf, sent):
        # initiate_send after dispatcher.send wrote `sent` bytes of buf, the
        # original's out_buffer (_ac_obuf): not all of it, or not counted
        # by a plain int.
        if sent and sent == len(buf):
            self._ac_obuf = b''
        elif self._ac_obuf is not buf or self._ac_oq is not None:
            # A handler changed the output meanwhile (send() may call
            # handle_close): as the original, from what is there now.
            self.out_buffer = self.out_buffer[sent:]
        elif sent and sent < len(buf):
            # Written in pieces from here on: no copy of the rest each.
            self._ac_oq = _OutBuffer(memoryview(buf)[sent:])
            self._ac_obuf = b''
        else:
            self._ac_obuf = buf[sent:]

    def _ac_send_from_queue(self, queue):
        # initiate_send with more than one send's data queued (_ac_oq).
        sent = dispatcher.send(self, bytes(queue[:65536]))
        if self._ac_oq is not queue:
            self.out_buffer = self.out_buffer[sent:]
            return
        if sent:
            del queue[:sent]
        if not queue:
            self._ac_oq = None

    def handle_write(self):
        self.initiate_send()

    # (not self.connected) or the length of the queued output.
    writable = _core.dws_writable

    # send(data): the debug log, then, nothing being queued (the usual
    # case, in C), the original's out_buffer + data and initiate_send();
    # with output queued, _ac_send_queued.  writable() reads whether
    # out_buffer is empty: when a send changes that (typically from
    # another channel's handler), the poller is told (_ac_touch) to ask
    # again.  (Within this channel's own events it is asked again anyway.)
    send = _core.dws_send

    def _ac_send_queued(self, data):
        # send() with output queued: appended to the queue in place.
        buf = self._ac_obuf
        if not buf:
            queue = self._ac_oq
            queue += data
        else:
            queue = _OutBuffer(buf)
            queue += data
            self._ac_oq = queue
            self._ac_obuf = b''
        self.initiate_send()
        if self._ac_oq is None and not self._ac_obuf:
            self._ac_touch()


_core.register(dispatcher)
_default_readable.add(dispatcher.readable)
_default_writable.add(dispatcher.writable)
_default_writable.add(dispatcher_with_send.writable)


# ---- helpers ------------------------------------------------------------------

def compact_traceback():
    """((file, function, line), type, value, info) of the exception being
    handled, the location being its innermost frame."""
    t, v, tb = sys.exc_info()
    if not tb:
        raise AssertionError("traceback does not exist")
    frames = []
    while tb:
        code = tb.tb_frame.f_code
        frames.append((code.co_filename, code.co_name, str(tb.tb_lineno)))
        tb = tb.tb_next
    del tb
    info = ' '.join('[%s|%s|%s]' % f for f in frames)
    return frames[-1], t, v, info


def close_all(map=None, ignore_all=False):
    """Closes every channel of map (an EBADF is always ignored, other
    errors unless ignore_all), then empties map."""
    if map is None:
        map = socket_map
    for x in list(map.values()):
        try:
            x.close()
        except OSError as err:
            if err.errno != EBADF and not ignore_all:
                raise
        except _reraised_exceptions:
            raise
        except:
            if not ignore_all:
                raise
    map.clear()
    _forget_if_empty(map)


# ---- file descriptors as channels (pipes, terminals) -----------------------

if os.name == 'posix':
    class file_wrapper:
        """Enough of a socket's interface over a file descriptor (a dup of
        the one given) for dispatcher's methods."""

        def __init__(self, fd):
            self.fd = os.dup(fd)

        def __del__(self):
            if self.fd >= 0:
                warnings.warn("unclosed file %r" % self, ResourceWarning,
                              source=self)
            self.close()

        def recv(self, *args):
            return os.read(self.fd, *args)

        def send(self, *args):
            return os.write(self.fd, *args)

        def getsockopt(self, level, optname, buflen=None):
            # Only what dispatcher asks: no pending error.
            if (level == socket.SOL_SOCKET and optname == socket.SO_ERROR
                    and not buflen):
                return 0
            raise NotImplementedError("Only asyncore specific behaviour "
                                      "implemented.")

        read = recv
        write = send

        def close(self):
            if self.fd < 0:
                return
            fd, self.fd = self.fd, -1
            os.close(fd)

        def fileno(self):
            return self.fd

    class file_dispatcher(dispatcher):

        def __init__(self, fd, map=None):
            dispatcher.__init__(self, None, map)
            self.connected = True
            try:
                fd = fd.fileno()
            except AttributeError:
                pass
            self.set_file(fd)
            os.set_blocking(fd, False)

        def set_file(self, fd):
            self.socket = file_wrapper(fd)
            self._fileno = self.socket.fileno()
            self.add_channel()


# repr() and handle_error's messages name the classes as the original did.
for _cls in (dispatcher, dispatcher_with_send, ExitNow):
    _cls.__module__ = 'asyncore'
if os.name == 'posix':
    file_wrapper.__module__ = file_dispatcher.__module__ = 'asyncore'
del _cls
