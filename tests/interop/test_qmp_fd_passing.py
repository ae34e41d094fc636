"""qmp.Session hands descriptors to a real QEMU (SCM_RIGHTS), the way every
run-time operation of a sandboxed VM reaches a file: ``add-fd`` into an
fdset, ``getfd`` under a name. QEMU 7.2, no guest (``-machine none``).
"""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import qmp

QEMU = shutil.which('qemu-system-x86_64')

pytestmark = pytest.mark.skipif(QEMU is None,
                                reason='needs qemu-system-x86_64')


@pytest.fixture
def monitor():
    """A QEMU with no guest, its QMP on a unix socket; stopped by its pid."""
    tmp = tempfile.mkdtemp(prefix='qmpfd-')
    path = os.path.join(tmp, 'qmp.sock')
    proc = subprocess.Popen(
        [QEMU, '-machine', 'none', '-nodefaults', '-display', 'none',
         '-qmp', 'unix:%s,server=on,wait=off' % path],
        stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            assert proc.poll() is None, 'QEMU exited: %s' % proc.returncode
            assert time.monotonic() < deadline, 'no QMP socket'
            time.sleep(0.05)
        yield path, proc.pid
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp)


def _fd_targets(pid):
    out = set()
    for name in os.listdir('/proc/%d/fd' % pid):
        try:
            out.add(os.readlink('/proc/%d/fd/%s' % (pid, name)))
        except OSError:
            pass
    return out


def test_add_fd_puts_the_descriptor_in_an_fdset(monitor, tmp_path):
    path, pid = monitor
    target = tmp_path / 'disk.img'
    target.write_bytes(b'\0' * 4096)
    fd = os.open(str(target), os.O_RDWR)
    try:
        with qmp.Session(path) as s:
            got = s.execute('add-fd', {'fdset-id': 7, 'opaque': 'disk'},
                            fds=[fd])
            sets = s.execute('query-fdsets')
            os.close(fd)
            fd = None
            # QEMU holds its own copy: ours is closed
            assert str(target) in _fd_targets(pid)
    finally:
        if fd is not None:
            os.close(fd)
    assert got['fdset-id'] == 7
    assert [(f['fdset-id'], [d['opaque'] for d in f['fds']])
            for f in sets] == [(7, ['disk'])]
    # why a descriptor is used on the connection that passed it: an fdset
    # nothing uses is dropped when the last monitor connection closes
    assert qmp.execute(path, 'query-fdsets') == []
    assert str(target) not in _fd_targets(pid)


def test_getfd_names_a_socket_for_later_commands(monitor):
    path, pid = monitor
    a, b = socket.socketpair()
    try:
        with qmp.Session(path) as s:
            s.execute('getfd', {'fdname': 'stream'}, fds=[a.fileno()])
            # naming it twice replaces it; closing it by name works once
            s.execute('closefd', {'fdname': 'stream'})
            with pytest.raises(qmp.QMPError, match='stream'):
                s.execute('closefd', {'fdname': 'stream'})
    finally:
        a.close()
        b.close()


def test_a_command_without_a_descriptor_it_needs_is_refused(monitor):
    path, _ = monitor
    with qmp.Session(path) as s:
        with pytest.raises(qmp.QMPError, match='No file descriptor'):
            s.execute('getfd', {'fdname': 'nothing'})
        # the session is still usable after an error reply
        assert s.execute('query-status')['status'] in ('running',
                                                        'prelaunch')


def test_a_session_to_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(base.HypervisorError, match='cannot reach QMP'):
        with qmp.Session(str(tmp_path / 'none.sock')):
            pass


def test_execute_is_one_session(monitor):
    path, _ = monitor
    status = qmp.execute(path, 'query-status')
    assert json.dumps(status)
