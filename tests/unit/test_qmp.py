"""hypervisor/qmp.py against a fake QMP server: a thread serving one
connection on a real unix socket in a temp dir, following a script of
what to send and when to read. Nothing in the client is mocked."""
import json
import os
import shutil
import socket
import tempfile
import threading
from unittest import mock

import pytest

from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import qmp

GREETING = {'QMP': {'version': {'qemu': {'major': 7, 'minor': 2,
                                         'micro': 22}, 'package': ''},
                    'capabilities': ['oob']}}
EVENT = {'event': 'RTC_CHANGE', 'data': {'offset': 1},
         'timestamp': {'seconds': 1, 'microseconds': 2}}


@pytest.fixture
def sock_dir():
    # short path: unix socket paths are limited to 107 bytes
    path = tempfile.mkdtemp(prefix='nb-qmp-')
    yield path
    shutil.rmtree(path)


class FakeQMP:
    """Serves one connection. ``script`` items: ('send', obj|bytes),
    ('recv',) to read one request line, ('close',), ('wait', seconds)."""

    def __init__(self, path, script, closes_first=0):
        self.path = path
        self.script = script
        #: connections closed at once, without a greeting, before the one
        #: the script serves
        self.closes_first = closes_first
        self.accepted = 0
        self.received = []
        self.error = None
        self._stop = threading.Event()
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for _ in range(self.closes_first):
                conn, _ = self.srv.accept()
                self.accepted += 1
                conn.close()
            conn, _ = self.srv.accept()
            self.accepted += 1
            with conn, conn.makefile('rwb') as f:
                for step in self.script:
                    if step[0] == 'send':
                        data = step[1]
                        if not isinstance(data, bytes):
                            data = json.dumps(data).encode() + b'\n'
                        f.write(data)
                        f.flush()
                    elif step[0] == 'recv':
                        line = f.readline()
                        self.received.append(json.loads(line))
                    elif step[0] == 'wait':
                        self._stop.wait(step[1])
                    elif step[0] == 'close':
                        break
        except Exception as e:   # surfaced by join()
            self.error = e
        finally:
            self.srv.close()

    def join(self):
        self._stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        assert self.error is None, self.error


def serve(sock_dir, script, closes_first=0):
    return FakeQMP(os.path.join(sock_dir, 'control.sock'), script,
                   closes_first)


HANDSHAKE = [('send', GREETING), ('recv',), ('send', {'return': {}})]


def test_command_reply(sock_dir):
    srv = serve(sock_dir, HANDSHAKE + [
        ('recv',), ('send', {'return': {'status': 'running',
                                        'running': True}})])
    assert qmp.execute(srv.path, 'query-status') == {'status': 'running',
                                                     'running': True}
    srv.join()
    assert srv.received == [{'execute': 'qmp_capabilities'},
                            {'execute': 'query-status'}]


def test_command_arguments_sent(sock_dir):
    srv = serve(sock_dir, HANDSHAKE + [('recv',), ('send', {'return': 'ok'})])
    assert qmp.execute(srv.path, 'human-monitor-command',
                       {'command-line': 'info status'}) == 'ok'
    srv.join()
    assert srv.received[1] == {'execute': 'human-monitor-command',
                               'arguments': {'command-line': 'info status'}}


def test_reply_without_return_is_none(sock_dir):
    srv = serve(sock_dir, HANDSHAKE + [('recv',), ('send', {'id': 1})])
    assert qmp.execute(srv.path, 'system_powerdown') is None
    srv.join()


def test_error_reply_raises_qmperror_with_class(sock_dir):
    srv = serve(sock_dir, HANDSHAKE + [
        ('recv',), ('send', {'error': {'class': 'CommandNotFound',
                                       'desc': "The command foo has not "
                                               "been found"}})])
    with pytest.raises(qmp.QMPError) as e:
        qmp.execute(srv.path, 'foo')
    srv.join()
    assert e.value.error_class == 'CommandNotFound'
    assert isinstance(e.value, base.HypervisorError)
    assert str(e.value) == ('QMP foo failed: The command foo has not been '
                            'found (CommandNotFound)')


def test_capabilities_error_is_reported_as_such(sock_dir):
    srv = serve(sock_dir, [('send', GREETING), ('recv',),
                           ('send', {'error': {'class': 'GenericError',
                                               'desc': 'no'}})])
    with pytest.raises(qmp.QMPError) as e:
        qmp.execute(srv.path, 'query-status')
    srv.join()
    assert e.value.error_class == 'GenericError'
    assert 'qmp_capabilities' in str(e.value)
    assert len(srv.received) == 1       # the command itself was never sent


def test_events_interleaved_are_skipped(sock_dir):
    srv = serve(sock_dir, [
        ('send', GREETING), ('recv',),
        ('send', EVENT), ('send', EVENT), ('send', {'return': {}}),
        ('recv',),
        ('send', dict(EVENT, event='STOP')),
        ('send', {'return': {'status': 'paused', 'running': False}}),
    ])
    assert qmp.execute(srv.path, 'query-status') == {'status': 'paused',
                                                     'running': False}
    srv.join()


def test_event_carrying_error_key_is_still_skipped(sock_dir):
    # e.g. BLOCK_JOB_ERROR-like payloads must not be taken for the reply
    srv = serve(sock_dir, HANDSHAKE + [
        ('recv',), ('send', {'event': 'X', 'error': {'class': 'E'}}),
        ('send', {'return': 7})])
    assert qmp.execute(srv.path, 'query-x') == 7
    srv.join()


def test_closed_after_greeting_raises(sock_dir):
    srv = serve(sock_dir, [('send', GREETING), ('recv',), ('close',)])
    with pytest.raises(base.HypervisorError) as e:
        qmp.execute(srv.path, 'query-status')
    srv.join()
    assert 'closed while waiting for qmp_capabilities' in str(e.value)


def test_closed_before_command_reply_raises(sock_dir):
    srv = serve(sock_dir, HANDSHAKE + [('recv',), ('send', EVENT),
                                       ('close',)])
    with pytest.raises(base.HypervisorError) as e:
        qmp.execute(srv.path, 'query-status')
    srv.join()
    assert not isinstance(e.value, qmp.QMPError)
    assert 'closed while waiting for query-status' in str(e.value)


def test_closed_without_greeting_raises_after_retries(sock_dir,
                                                     monkeypatch):
    monkeypatch.setattr(qmp, 'GREETING_RETRY_DELAY', 0.01)
    srv = serve(sock_dir, [('close',)],
                closes_first=qmp.GREETING_ATTEMPTS - 1)
    with pytest.raises(base.HypervisorError) as e:
        qmp.execute(srv.path, 'query-status')
    srv.join()
    assert 'no QMP greeting' in str(e.value)
    assert srv.accepted == qmp.GREETING_ATTEMPTS


def test_closed_without_greeting_is_tried_again(sock_dir, monkeypatch):
    """Nothing was sent on a connection the monitor closed before its
    greeting: the next one runs the command (seen once from a source QEMU
    at a post-copy switch)."""
    monkeypatch.setattr(qmp, 'GREETING_RETRY_DELAY', 0.01)
    srv = serve(sock_dir, HANDSHAKE + [('recv',), ('send', {'return': 7})],
                closes_first=2)
    assert qmp.execute(srv.path, 'query-status') == 7
    srv.join()
    assert srv.accepted == 3
    assert srv.received == [{'execute': 'qmp_capabilities'},
                            {'execute': 'query-status'}]


def test_not_a_qmp_greeting_raises(sock_dir):
    srv = serve(sock_dir, [('send', {'hello': 'world'})])
    with pytest.raises(base.HypervisorError) as e:
        qmp.execute(srv.path, 'query-status')
    srv.join()
    assert 'no QMP greeting on %s' % srv.path in str(e.value)


def test_garbage_reply_raises_hypervisor_error(sock_dir):
    srv = serve(sock_dir, HANDSHAKE + [('recv',), ('send', b'not json\n')])
    with pytest.raises(base.HypervisorError) as e:
        qmp.execute(srv.path, 'query-status')
    srv.join()
    assert 'QMP query-status on' in str(e.value)


def test_silent_server_times_out(sock_dir):
    srv = serve(sock_dir, [('send', GREETING), ('recv',), ('wait', 30)])
    with pytest.raises(base.HypervisorError) as e:
        qmp.execute(srv.path, 'query-status', timeout=0.5)
    srv.join()
    assert 'timed out' in str(e.value)


def test_missing_socket_raises(sock_dir):
    path = os.path.join(sock_dir, 'nothing.sock')
    with pytest.raises(base.HypervisorError) as e:
        qmp.execute(path, 'query-status')
    assert 'cannot reach QMP socket %s' % path in str(e.value)


def test_socket_without_listener_raises(sock_dir):
    # a stale socket file left by a dead QEMU: connection refused
    path = os.path.join(sock_dir, 'stale.sock')
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()
    with pytest.raises(base.HypervisorError) as e:
        qmp.execute(path, 'query-status')
    assert 'cannot reach QMP socket' in str(e.value)


def test_peer_gone_while_writing_raises_hypervisor_error(sock_dir):
    # fault injected: every write to the socket fails as it does once QEMU
    # has exited (EPIPE); it must not escape as a bare BrokenPipeError.
    srv = serve(sock_dir, [('send', GREETING), ('wait', 5)])
    real_sendall = socket.socket.sendall
    client = threading.current_thread()

    def sendall(self, data, *args):
        if threading.current_thread() is client:
            raise BrokenPipeError(32, 'Broken pipe')
        return real_sendall(self, data, *args)  # the fake server's writes

    with mock.patch.object(socket.socket, 'sendall', sendall):
        with pytest.raises(base.HypervisorError) as e:
            qmp.execute(srv.path, 'query-migrate')
    srv.join()
    assert 'Broken pipe' in str(e.value)
