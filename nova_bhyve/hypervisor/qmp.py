"""A minimal synchronous QMP client (one command per connection).

Why not the qemu.qmp package: it is asyncio-based, and nova-compute may run
under eventlet's monkey patching, where a private asyncio loop per call is
fragile. The QMP framing is a handful of JSON lines, so a few lines suffice.
"""
import json
import socket

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


def execute(path, command, arguments=None, timeout=10.0):
    """Run one QMP ``command`` on the monitor socket at ``path``."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
    except OSError as e:
        raise HypervisorError('cannot reach QMP socket %s: %s' % (path, e))
    with sock, sock.makefile('rwb') as f:
        try:
            if 'QMP' not in json.loads(f.readline() or b'{}'):
                raise HypervisorError('no QMP greeting on %s' % path)
            for name, args in (('qmp_capabilities', None),
                               (command, arguments)):
                req = {'execute': name}
                if args:
                    req['arguments'] = args
                f.write(json.dumps(req).encode() + b'\n')
                f.flush()
                reply = _read_message(f, name)
                if 'error' in reply:
                    raise QMPError(name, reply['error'])
            return reply.get('return')
        except (OSError, ValueError) as e:
            raise HypervisorError('QMP %s on %s: %s' % (command, path, e))


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
