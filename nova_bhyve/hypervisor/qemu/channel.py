"""The TCP connections of a QEMU live migration, made by nova-compute and
handed to QEMU as descriptors (QMP ``getfd``, SCM_RIGHTS, as libvirt does):
QEMU neither listens nor connects for a migration (docs/sandbox.md; a
sandboxed QEMU's Landlock rules then allow no TCP port at all).

Memory stream (QEMU 7.2 takes a connected socket for ``migrate fd:NAME``
and ``migrate-incoming fd:NAME``, not a listening one):

* destination: nova-compute listens on the inbound address
  (``accept_stream``: a thread per incoming VM, started by
  prepare_incoming). The source sends a preamble with the migration's
  token first; a connection with another token, or none within
  PREAMBLE_TIMEOUT, is closed and never reaches QEMU - the listener waits
  on for the right one. That one is handed to QEMU (``getfd`` +
  ``migrate-incoming fd:NAME`` on one QMP connection) and answered ``ok``
  (``refused: <why>`` if QEMU did not take it); the listener then closes.
  It also closes when the incoming VM's process ends, and on ``close``
  (rollback, kill, Nova's post step);
* source: ``connect_stream`` connects, sends the preamble and waits for
  ``ok``; the caller hands the socket to QEMU (``migrate fd:NAME``).

The preamble and its answer cross the connection before either QEMU holds
it; after them it carries QEMU's stream, and for post-copy its return path,
unchanged. The block migration's NBD connections use ``listening_socket``
(the destination's NBD server gets the listening socket) and ``connect``
(one connection per disk on the source), each passed with ``hand_over``.
"""
import hmac
import os
import socket
import threading

from oslo_log import log as logging

from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import qmp

LOG = logging.getLogger(__name__)

#: what the source sends first: PREAMBLE + 32 hex digits of token + newline
PREAMBLE = b'nova-bhyve-migration '
TOKEN_HEX = 32
PREAMBLE_LEN = len(PREAMBLE) + TOKEN_HEX + 1
#: seconds a connection may take to send its preamble
PREAMBLE_TIMEOUT = 5.0
#: seconds the source waits for the destination's answer (it hands the
#: socket to its QEMU first)
ANSWER_TIMEOUT = 60.0
CONNECT_TIMEOUT = 30.0
REFUSED = 'refused: '
_MAX_ANSWER = 256

_acceptors = {}
_lock = threading.Lock()


def listening_socket(host, backlog=8):
    """A TCP socket listening on ``host``, on a port the kernel picks."""
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def connect(host, port, what, timeout=CONNECT_TIMEOUT):
    """A TCP connection to ``host``:``port`` (``what``: for the error)."""
    try:
        return socket.create_connection((host.strip('[]'), int(port)),
                                        timeout=timeout)
    except OSError as e:
        raise base.HypervisorError('cannot connect to the destination\'s '
                                   '%s at %s port %s: %s'
                                   % (what, host, port, e))


def hand_over(control, sock, name, command, args, timeout=30.0):
    """Pass ``sock`` to the QEMU whose QMP socket is ``control`` as
    ``name`` (``getfd``) and run ``command`` (which consumes it) on the
    same connection; the name is closed again when the command fails.
    The caller closes its own copy of ``sock`` afterwards."""
    # O_NONBLOCK lives on the open file description, which QEMU shares:
    # hand it over in blocking mode whatever this process uses (a green
    # socket under eventlet keeps its descriptor non-blocking); QEMU sets
    # the mode it wants where it cares
    sock.setblocking(True)
    os.set_blocking(sock.fileno(), True)
    with qmp.Session(control, timeout) as session:
        session.execute('getfd', {'fdname': name}, fds=[sock.fileno()])
        try:
            return session.execute(command, args)
        except base.HypervisorError:
            try:
                session.execute('closefd', {'fdname': name})
            except base.HypervisorError as e:
                LOG.debug('closefd %s: %s', name, e)
            raise


def preamble(token):
    data = PREAMBLE + token.encode('ascii') + b'\n'
    if len(data) != PREAMBLE_LEN:
        raise ValueError('a migration token has %d hex digits' % TOKEN_HEX)
    return data


def connect_stream(host, port, token, timeout=ANSWER_TIMEOUT):
    """Source: the memory stream's connection to the destination, accepted
    there for this migration (its ``token``); HypervisorError with the
    destination's reason when it is not. ``token`` None: a destination
    whose QEMU listens itself (an older version): the plain connection."""
    sock = connect(host, port, 'migration port')
    if token is None:
        return sock
    try:
        sock.settimeout(timeout)
        sock.sendall(preamble(token))
        answer = _read_answer(sock)
    except OSError as e:
        sock.close()
        raise base.HypervisorError('the destination did not take the '
                                   'migration stream: %s' % e)
    if answer != 'ok':
        sock.close()
        raise base.HypervisorError('the destination did not take the '
                                   'migration stream: %s'
                                   % (answer or 'connection closed'))
    return sock


def _read_answer(sock):
    """One line, read byte by byte: nothing of what follows it (QEMU's
    stream) is taken from the socket."""
    line = b''
    while not line.endswith(b'\n') and len(line) < _MAX_ANSWER:
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line.strip().decode('utf-8', 'replace')


def _read_exactly(sock, n):
    data = b''
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


class StreamAcceptor:
    """Destination: accepts the source's memory stream for the incoming VM
    in ``vmdir`` on ``sock`` (a listening socket, owned from now on) and
    hands it to QEMU as ``command`` with ``args`` (the descriptor named
    ``name``)."""

    def __init__(self, vmdir, sock, token, name, command, args):
        self.vmdir = vmdir
        self.sock = sock
        self._expected = preamble(token)
        self._name, self._command, self._args = name, command, args
        self.closed = False
        #: the peer whose stream QEMU got (None: none yet)
        self.handed_to = None
        self._pid = vmdir.read_pid()
        self.sock.settimeout(1.0)
        self._thread = threading.Thread(
            target=self._serve, daemon=True,
            name='migration-stream-%s' % vmdir.uuid)

    def start(self):
        self._thread.start()

    def _serve(self):
        try:
            while not self.closed:
                try:
                    conn, peer = self.sock.accept()
                except socket.timeout:
                    if self._pid is not None and not base.process_alive(
                            self._pid, self.vmdir.uuid):
                        LOG.debug('the incoming VM %s is gone: its '
                                  'migration port closes', self.vmdir.uuid)
                        break
                    continue
                except OSError:
                    break
                with conn:
                    if self._take(conn, peer):
                        break
        finally:
            _forget(self)
            self.close()

    def _take(self, conn, peer):
        """True once the stream went to QEMU, or QEMU refused it."""
        conn.settimeout(PREAMBLE_TIMEOUT)
        try:
            got = _read_exactly(conn, PREAMBLE_LEN)
        except OSError as e:
            got = b''
            LOG.debug('migration port of %s: %s from %s', self.vmdir.uuid,
                      e, peer)
        if not hmac.compare_digest(got, self._expected):
            LOG.warning('migration port of %s: a connection from %s without '
                        'this migration\'s token: closed, not given to QEMU',
                        self.vmdir.uuid, peer)
            self._answer(conn, REFUSED + 'not this migration')
            return False
        try:
            hand_over(self.vmdir.control, conn, self._name, self._command,
                      self._args)
        except base.HypervisorError as e:
            LOG.error('the incoming VM %s did not take the migration stream '
                      'from %s: %s', self.vmdir.uuid, peer, e)
            self._answer(conn, REFUSED + str(e))
            return True
        self.handed_to = peer
        LOG.info('migration stream from %s handed to the incoming VM %s',
                 peer, self.vmdir.uuid)
        self._answer(conn, 'ok')
        return True

    @staticmethod
    def _answer(conn, text):
        try:
            conn.sendall(text.encode() + b'\n')
        except OSError:
            pass

    def close(self):
        self.closed = True
        try:
            # a pending accept() returns now; new connections are refused
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def accept_stream(vmdir, sock, token, name, command, args):
    """Start the StreamAcceptor of the incoming VM in ``vmdir`` (it owns
    ``sock`` from now on, also when this raises)."""
    try:
        acceptor = StreamAcceptor(vmdir, sock, token, name, command, args)
    except BaseException:
        sock.close()
        raise
    with _lock:
        old = _acceptors.pop(vmdir.path, None)
        _acceptors[vmdir.path] = acceptor
    if old:
        old.close()
    acceptor.start()
    return acceptor


def _forget(acceptor):
    with _lock:
        if _acceptors.get(acceptor.vmdir.path) is acceptor:
            del _acceptors[acceptor.vmdir.path]


def close(vmdir):
    """Stop accepting the memory stream of ``vmdir`` (if still waiting)."""
    with _lock:
        acceptor = _acceptors.pop(vmdir.path, None)
    if acceptor:
        acceptor.close()
