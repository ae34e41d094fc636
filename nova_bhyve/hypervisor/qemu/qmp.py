"""A minimal synchronous QMP client (one command per connection).

Why not the qemu.qmp package: it is asyncio-based, and nova-compute may run
under eventlet's monkey patching, where a private asyncio loop per call is
fragile. The QMP framing is a handful of JSON lines, so a few lines suffice.
"""
import json
import socket
import time

from nova_bhyve.hypervisor.base import HypervisorError


class QMPError(HypervisorError):
    def __init__(self, command, error):
        self.error_class = error.get('class')
        super().__init__('QMP %s failed: %s (%s)' % (
            command, error.get('desc'), self.error_class))


def _read_message(f, command):
    """Next reply line, skipping asynchronous events."""
    while True:
        line = f.readline()
        if not line:
            raise HypervisorError(
                'QMP connection closed while waiting for %s' % command)
        msg = json.loads(line)
        if 'event' not in msg:
            return msg


#: connections that QEMU closed before its greeting are tried again this
#: many times in all (nothing was sent on them: always safe); seen once in
#: CI from a sandboxed source QEMU as a migration started (cause not found)
GREETING_ATTEMPTS = 15
GREETING_RETRY_DELAY = 0.2


def execute(path, command, arguments=None, timeout=10.0):
    """Run one QMP ``command`` on the monitor socket at ``path``."""
    for attempt in range(GREETING_ATTEMPTS):
        try:
            return _execute_once(path, command, arguments, timeout)
        except _NoGreeting:
            if attempt + 1 == GREETING_ATTEMPTS:
                raise HypervisorError('no QMP greeting on %s (%d attempts)'
                                      % (path, GREETING_ATTEMPTS))
            time.sleep(GREETING_RETRY_DELAY)


class _NoGreeting(Exception):
    """The monitor closed the connection before greeting: no command was
    sent on it. Seen once from a source QEMU at the moment of a post-copy
    switch, with the next connection answering normally."""


def _execute_once(path, command, arguments, timeout):
    with Session(path, timeout) as session:
        return session.execute(command, arguments)


class Session:
    """One QMP connection for several commands, some of which carry
    descriptors (SCM_RIGHTS), as libvirt hands QEMU what it opened:
    ``add-fd`` puts the descriptor sent with it into an fdset,
    ``getfd`` names it for later commands (``netdev_add fd=NAME``,
    ``migrate fd:NAME``). The commands that consume a descriptor run on the
    same connection as the one that passed it: QEMU may drop an unused
    fdset when the monitor connection that made it closes.

    ``with Session(path) as s: s.execute('add-fd', {'fdset-id': 7},
    fds=[fd])``; raises HypervisorError (QMPError for an error reply)."""

    def __init__(self, path, timeout=10.0):
        self.path = path
        self._timeout = timeout
        self._sock = None
        self._f = None

    def __enter__(self):
        try:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(self._timeout)
            self._sock.connect(self.path)
        except OSError as e:
            self._close()
            raise HypervisorError('cannot reach QMP socket %s: %s'
                                  % (self.path, e))
        try:
            self._f = self._sock.makefile('rb')
            greeting = self._f.readline()
            if not greeting:
                raise _NoGreeting()
            if 'QMP' not in json.loads(greeting):
                raise HypervisorError('no QMP greeting on %s' % self.path)
            self.execute('qmp_capabilities')
        except (OSError, ValueError) as e:
            self._close()
            raise HypervisorError('QMP greeting on %s: %s' % (self.path, e))
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc):
        self._close()

    def _close(self):
        for obj in (self._f, self._sock):
            if obj is not None:
                try:
                    obj.close()
                except OSError:
                    pass
        self._f = self._sock = None

    def execute(self, command, arguments=None, fds=()):
        """Run ``command``; ``fds`` travel with it (SCM_RIGHTS)."""
        req = {'execute': command}
        if arguments:
            req['arguments'] = arguments
        data = json.dumps(req).encode() + b'\n'
        try:
            if fds:
                socket.send_fds(self._sock, [data], list(fds))
            else:
                self._sock.sendall(data)
            reply = _read_message(self._f, command)
        except (OSError, ValueError) as e:
            raise HypervisorError('QMP %s on %s: %s'
                                  % (command, self.path, e))
        if 'error' in reply:
            raise QMPError(command, reply['error'])
        return reply.get('return')


EOF = object()


class EventListener:
    """A long-lived QMP connection that only receives events.

    Reads the raw socket with its own line buffer: a file object made by
    socket.makefile() cannot be read again after one timeout.
    """

    def __init__(self, path):
        self._buf = b''
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(10.0)
            self._sock.connect(path)
            greeting = self._line(10.0)
            if greeting in (None, EOF) or 'QMP' not in json.loads(greeting):
                raise ValueError('no QMP greeting')
            self._sock.sendall(b'{"execute": "qmp_capabilities"}\n')
            while True:
                line = self._line(10.0)
                if line in (None, EOF):
                    raise ValueError('no reply to qmp_capabilities')
                if 'return' in json.loads(line):
                    break
        except (OSError, ValueError) as e:
            self.close()
            raise HypervisorError('cannot listen on %s: %s' % (path, e))

    def _line(self, timeout):
        while b'\n' not in self._buf:
            self._sock.settimeout(timeout)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                return None
            except OSError:
                return EOF
            if not chunk:
                return EOF
            self._buf += chunk
        line, self._buf = self._buf.split(b'\n', 1)
        return line

    def next_event(self, timeout):
        """The next event dict, None on timeout, EOF when QEMU is gone."""
        line = self._line(timeout)
        if line is None or line is EOF:
            return line
        try:
            return json.loads(line)
        except ValueError:
            return None

    def close(self):
        try:
            self._sock.close()
        except OSError:
            pass


def execute_until_event(path, command, arguments, event, match=None,
                        timeout=60.0, retry_interval=None):
    """Run ``command`` and wait on the same connection for ``event`` (whose
    data satisfies ``match``), re-sending the command every
    ``retry_interval`` seconds (e.g. device_del, which a guest may miss
    while it is still booting). Returns the event; raises HypervisorError
    on timeout. A QMP error reply to a retry is ignored; to the first
    command it is raised.
    """
    deadline = time.monotonic() + timeout
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10.0)
        sock.connect(path)
    except OSError as e:
        raise HypervisorError('cannot reach QMP socket %s: %s' % (path, e))
    buf = b''

    def send(name, args=None):
        req = {'execute': name}
        if args:
            req['arguments'] = args
        sock.sendall(json.dumps(req).encode() + b'\n')

    def read(until):
        nonlocal buf
        while b'\n' not in buf:
            left = until - time.monotonic()
            if left <= 0:
                return None
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                return None
            if not chunk:
                raise HypervisorError('QMP connection closed while waiting '
                                      'for %s' % event)
            buf += chunk
        line, buf = buf.split(b'\n', 1)
        return json.loads(line)

    with sock:
        try:
            greeting = read(time.monotonic() + 10)
            if not greeting or 'QMP' not in greeting:
                raise HypervisorError('no QMP greeting on %s' % path)
            send('qmp_capabilities')
            while True:
                msg = read(time.monotonic() + 10)
                if msg is None:
                    raise HypervisorError('no reply to qmp_capabilities')
                if 'return' in msg or 'error' in msg:
                    break
            send(command, arguments)
            first = True
            next_try = (time.monotonic() + retry_interval
                        if retry_interval else deadline)
            while True:
                msg = read(min(deadline, next_try))
                now = time.monotonic()
                if msg is None:
                    if now >= deadline:
                        raise HypervisorError(
                            'QMP %s: no %s event within %.0f s' % (
                                command, event, timeout))
                    send(command, arguments)
                    next_try = now + retry_interval
                    continue
                if msg.get('event') == event and (
                        match is None or match(msg.get('data') or {})):
                    return msg
                if 'error' in msg and first:
                    raise QMPError(command, msg['error'])
                if 'return' in msg or 'error' in msg:
                    first = False
        except (OSError, ValueError) as e:
            raise HypervisorError('QMP %s on %s: %s' % (command, path, e))
