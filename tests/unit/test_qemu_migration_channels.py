"""The QMP sequences of a QEMU live migration whose TCP connections
nova-compute makes and hands over (hypervisor/qemu/channel.py,
migration.py), on both sides.

QEMU's monitor is replaced by FakeMonitor: a real unix socket that
receives the descriptors the driver sends with a command (SCM_RIGHTS, as
QEMU does), records each command with what the descriptors are (listening
or connected, their addresses), and answers ``{}`` unless told otherwise.
The sockets, the acceptor thread and the preamble exchange are real; what
a real QEMU 7.2 does with the descriptors is checked by
tests/interop/test_qemu_migration_fds.py.
"""
import json
import os
import socket
import threading
import time
import types

import pytest

from nova_bhyve import guest
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import channel as qemu_channel
from nova_bhyve.hypervisor.qemu import migration as qemu_migration
from nova_bhyve.hypervisor.qemu import state as qemu_state

UUID = '6d5ba3a0-55a1-4c7c-9a43-3d1b0f6a2b11'
GREETING = {'QMP': {'version': {'qemu': {'major': 7, 'minor': 2}},
                    'capabilities': []}}


class FakeMonitor:
    """A QMP monitor on ``path``: serves any number of connections,
    records ``(command, args, [socket, ...])`` with the descriptors that
    came with the command as socket objects (kept open: what QEMU would
    hold). ``errors``: command -> error description to answer with."""

    def __init__(self, path):
        self.calls = []
        self.errors = {}
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,),
                             daemon=True).start()

    def _serve(self, conn):
        buf, fds = b'', []
        with conn:
            conn.sendall(json.dumps(GREETING).encode() + b'\n')
            while True:
                try:
                    data, got, _, _ = socket.recv_fds(conn, 65536, 8)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                fds += [socket.socket(fileno=fd) for fd in got]
                while b'\n' in buf:
                    line, buf = buf.split(b'\n', 1)
                    req = json.loads(line)
                    command = req['execute']
                    if command != 'qmp_capabilities':
                        self.calls.append((command, req.get('arguments'),
                                           fds))
                    fds = []
                    if command in self.errors:
                        reply = {'error': {'class': 'GenericError',
                                           'desc': self.errors[command]}}
                    elif command == 'query-status':
                        reply = {'return': {'status': 'running'}}
                    else:
                        reply = {'return': {}}
                    conn.sendall(json.dumps(reply).encode() + b'\n')

    def commands(self):
        return [(c, a) for c, a, _ in self.calls]

    def passed(self, command):
        """The descriptors that came with ``command`` (the last one)."""
        return [f for c, _, f in self.calls if c == command][-1]

    def close(self):
        self.srv.close()
        for _, _, fds in self.calls:
            for s in fds:
                s.close()


def listening(sock):
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def spec():
    return guest.VMSpec(uuid=UUID, name='instance-1', vcpus=1,
                        memory_mb=128,
                        disks=[guest.Disk(path='/i/%s/disk' % UUID)])


class _Hyp:
    def __init__(self):
        self.killed = []

    def kill(self, vmdir):
        self.killed.append(vmdir)
        qemu_migration.close_listeners(vmdir)

    def pid(self, vmdir):
        return 1


@pytest.fixture
def dest(tmp_path, monkeypatch):
    """prepare_incoming of a block migration on 127.0.0.1 with the monitor
    faked (the launch of QEMU is skipped): (endpoint, monitor, vmdir,
    hyp)."""
    vmdir = base.VMDir(str(tmp_path / UUID))
    os.makedirs(vmdir.path)
    base.make_runtime_dir(vmdir)
    mon = FakeMonitor(vmdir.control)
    monkeypatch.setattr(qemu_state, 'launch', lambda *a, **k: None)
    hyp = _Hyp()
    ep = qemu_migration.prepare_incoming(hyp, ['qemu'], spec(), vmdir,
                                         '127.0.0.1', block=True)
    yield ep, mon, vmdir, hyp
    qemu_migration.close_listeners(vmdir)
    mon.close()


def _until(fn, timeout=10):
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline, 'condition not met in time'
        time.sleep(0.01)


def _refused(port):
    try:
        socket.create_connection(('127.0.0.1', port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


# -- destination ------------------------------------------------------------

def test_destination_passes_the_nbd_listener_and_waits_for_the_stream(dest):
    ep, mon, _, _ = dest
    assert mon.commands() == [
        ('migrate-set-capabilities', {'capabilities': [
            {'capability': 'events', 'state': True},
            {'capability': 'postcopy-ram', 'state': False},
            {'capability': 'auto-converge', 'state': False},
            {'capability': 'late-block-activate', 'state': True}]}),
        ('getfd', {'fdname': 'nbd-listen'}),
        ('nbd-server-start', {'addr': {'type': 'fd',
                                       'data': {'str': 'nbd-listen'}}}),
        ('nbd-server-add', {'device': 'disk0', 'name': 'disk0',
                            'writable': True}),
    ]
    # the NBD server's socket: listening, on the advertised port, bound by
    # the driver (QEMU got it with getfd); nova-compute keeps no copy
    nbd, = mon.passed('getfd')
    assert listening(nbd)
    assert nbd.getsockname() == ('127.0.0.1', ep.nbd_port)
    assert ep.uri == 'tcp:127.0.0.1:%d' % ep.port
    assert len(ep.stream_token) == qemu_channel.TOKEN_HEX
    # no migrate-incoming until the source connects
    assert qemu_migration.Endpoint.from_json(ep.to_json()) == ep


def test_the_sources_connection_goes_to_qemu_untouched(dest):
    ep, mon, _, _ = dest
    sock = qemu_channel.connect_stream(ep.host, ep.port, ep.stream_token)
    with sock:
        assert mon.commands()[-2:] == [
            ('getfd', {'fdname': 'migration'}),
            ('migrate-incoming', {'uri': 'fd:migration'})]
        got, = mon.passed('getfd')
        assert not listening(got)
        assert got.getpeername() == sock.getsockname()
        # what the source sends after the answer reaches QEMU's descriptor,
        # none of it read by the driver; the return path works both ways
        sock.sendall(b'QEVM\0\0\0\3')
        got.settimeout(5)
        assert got.recv(64) == b'QEVM\0\0\0\3'
        got.sendall(b'return path')
        assert sock.recv(64) == b'return path'
    # nova-compute listens no more: the stream went
    _until(lambda: _refused(ep.port))


def test_a_connection_without_the_token_never_reaches_qemu(dest,
                                                           monkeypatch):
    monkeypatch.setattr(qemu_channel, 'PREAMBLE_TIMEOUT', 0.3)
    ep, mon, _, _ = dest
    before = mon.commands()
    # a wrong token is refused and closed
    with pytest.raises(base.HypervisorError, match='not this migration'):
        qemu_channel.connect_stream(ep.host, ep.port, 'f' * 32)
    # a silent peer is closed after PREAMBLE_TIMEOUT
    with socket.create_connection((ep.host, ep.port), timeout=5) as silent:
        assert silent.recv(64).startswith(b'refused: ')
    # a peer speaking QEMU's stream at once (no preamble) is closed too
    with socket.create_connection((ep.host, ep.port), timeout=5) as raw:
        raw.sendall(b'QEVM' * 20)
        assert raw.recv(64).startswith(b'refused: ')
    assert mon.commands() == before
    # the migration's own connection is still taken
    qemu_channel.connect_stream(ep.host, ep.port, ep.stream_token).close()
    assert mon.commands()[-1] == ('migrate-incoming', {'uri': 'fd:migration'})


def test_qemu_refusing_the_stream_is_the_sources_error(dest):
    ep, mon, _, _ = dest
    mon.errors['migrate-incoming'] = 'The incoming migration has already ' \
        'been started'
    with pytest.raises(base.HypervisorError,
                       match='did not take the migration stream: refused: '
                             '.*already been started'):
        qemu_channel.connect_stream(ep.host, ep.port, ep.stream_token)
    # the name QEMU got is closed again; the port closes
    assert mon.commands()[-1] == ('closefd', {'fdname': 'migration'})
    _until(lambda: _refused(ep.port))


def test_rollback_closes_the_migration_port(dest):
    ep, mon, vmdir, hyp = dest
    hyp.kill(vmdir)
    _until(lambda: _refused(ep.port))
    assert not any(c == 'migrate-incoming' for c, _ in mon.commands())


def test_a_failed_setup_kills_the_vm_and_closes_everything(tmp_path,
                                                           monkeypatch):
    vmdir = base.VMDir(str(tmp_path / UUID))
    os.makedirs(vmdir.path)
    base.make_runtime_dir(vmdir)
    mon = FakeMonitor(vmdir.control)
    mon.errors['nbd-server-start'] = 'Address already in use'
    monkeypatch.setattr(qemu_state, 'launch', lambda *a, **k: None)
    hyp = _Hyp()
    try:
        with pytest.raises(base.HypervisorError, match='already in use'):
            qemu_migration.prepare_incoming(hyp, ['qemu'], spec(), vmdir,
                                            '127.0.0.1', block=True)
        assert hyp.killed == [vmdir]
        assert mon.commands()[-1] == ('closefd', {'fdname': 'nbd-listen'})
        assert qemu_channel._acceptors == {}
    finally:
        mon.close()


# -- source -------------------------------------------------------------------

@pytest.fixture
def source(tmp_path):
    vmdir = base.VMDir(str(tmp_path / ('src-' + UUID)))
    os.makedirs(vmdir.path)
    base.make_runtime_dir(vmdir)
    mon = FakeMonitor(vmdir.control)
    yield vmdir, mon
    mon.close()


def _outgoing(vmdir, ep, bandwidth=0):
    policy = types.SimpleNamespace(wants_postcopy=False,
                                   wants_auto_converge=False,
                                   initial_downtime_ms=300)
    return qemu_migration.OutgoingMigration(_Hyp(), vmdir, spec(), ep,
                                            bandwidth, policy, backed=[0])


def test_source_connects_itself_and_passes_each_connection(dest, source):
    ep, dmon, _, _ = dest
    vmdir, mon = source
    out = _outgoing(vmdir, ep, bandwidth=1 << 20)
    out.start_mirror()
    out.start_memory()
    assert [c for c, _ in mon.commands()] == [
        'query-status', 'migrate-set-capabilities', 'migrate-set-parameters',
        'getfd', 'blockdev-add', 'blockdev-mirror', 'getfd', 'migrate']
    calls = mon.calls
    assert calls[3][1] == {'fdname': 'mig-disk0'}
    assert calls[4][1] == {'driver': 'nbd', 'node-name': 'mig-disk0',
                           'server': {'type': 'fd', 'str': 'mig-disk0'},
                           'export': 'disk0'}
    assert calls[5][1]['target'] == 'mig-disk0'
    assert calls[5][1]['speed'] == 1 << 20
    assert calls[6][1] == {'fdname': 'migration'}
    assert calls[7][1] == {'uri': 'fd:migration'}
    nbd, = calls[3][2]
    assert nbd.getpeername() == ('127.0.0.1', ep.nbd_port)
    stream, = calls[6][2]
    assert stream.getpeername() == ('127.0.0.1', ep.port)
    # the destination's QEMU got the other end of that same connection
    dest_stream, = dmon.passed('getfd')
    assert dest_stream.getpeername() == stream.getsockname()
    assert out.memory_started and out.nodes == ['mig-disk0']


def test_a_refused_nbd_target_closes_its_name(dest, source):
    ep, _, _, _ = dest
    vmdir, mon = source
    mon.errors['blockdev-add'] = "Requested export not available"
    out = _outgoing(vmdir, ep)
    with pytest.raises(base.HypervisorError, match='export not available'):
        out.start_mirror()
    assert [c for c, _ in mon.commands()][-3:] == [
        'getfd', 'blockdev-add', 'closefd']
    assert mon.calls[-1][1] == {'fdname': 'mig-disk0'}


def test_an_unreachable_destination_is_a_clear_error(source):
    vmdir, _ = source
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]          # nothing listens there
    ep = qemu_migration.Endpoint(uri='tcp:127.0.0.1:%d' % port,
                                 nbd_host='127.0.0.1', nbd_port=port,
                                 stream_token='0' * 32)
    with pytest.raises(base.HypervisorError,
                       match='NBD server at 127.0.0.1 port %d' % port):
        _outgoing(vmdir, ep).start_mirror()
    with pytest.raises(base.HypervisorError, match='migration port'):
        _outgoing(vmdir, ep).start_memory()


def test_destination_of_an_older_version_gets_the_plain_stream(source):
    """No stream_token: the destination's QEMU listens itself; the
    source's QEMU still gets a connection made here, no preamble sent."""
    vmdir, mon = source
    with socket.socket() as lsn:
        lsn.bind(('127.0.0.1', 0))
        lsn.listen(1)
        ep = qemu_migration.Endpoint(
            uri='tcp:127.0.0.1:%d' % lsn.getsockname()[1])
        out = _outgoing(vmdir, ep)
        out.start_memory()
        conn, _ = lsn.accept()
        with conn:
            conn.settimeout(0.3)
            with pytest.raises(socket.timeout):
                conn.recv(64)            # nothing but QEMU's stream comes
    assert mon.commands()[-2:] == [('getfd', {'fdname': 'migration'}),
                                   ('migrate', {'uri': 'fd:migration'})]


def test_release_destination_makes_a_waiting_qemu_load_garbage(dest, source):
    """A failed migration over a shared instances path: the destination's
    waiting QEMU is handed a stream that does not load (it then exits)."""
    ep, dmon, _, _ = dest
    vmdir, _ = source
    _outgoing(vmdir, ep).release_destination()
    got, = dmon.passed('getfd')
    assert dmon.commands()[-1] == ('migrate-incoming',
                                   {'uri': 'fd:migration'})
    got.settimeout(5)
    assert got.recv(64).startswith(b'not a migration stream')
    # once the stream went, there is nothing to release: no error
    _until(lambda: _refused(ep.port))
    _outgoing(vmdir, ep).release_destination()
