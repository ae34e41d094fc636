"""What QEMU 7.2 does with a ``-S`` destination in post-copy, and the
switchover of hypervisor/qemu/postcopy.py against it.

Two real ``qemu-system-x86_64 -accel tcg -m 64`` processes running the
memory-dirtying boot sector of test_qemu_migration_policy.py, migrating
over a loopback TCP connection with post-copy enabled on both sides. As in
the driver, the connection is made by this process (qemu_channel: the
destination's acceptor checks the token) and handed to both QEMUs with
``getfd`` (``migrate fd:`` / ``migrate-incoming fd:``): post-copy's return
path runs over the same passed socket. Nothing is mocked: the resume
request goes over a real socket to a real ResumeListener.

Findings this pins (QEMU 7.2):

* after ``migrate-start-postcopy`` both sides report ``postcopy-active``; a
  destination started with ``-S`` stays ``paused`` (it does not autostart
  at the switch) until told ``cont``;
* ``cont`` during ``postcopy-active`` runs the guest while the source keeps
  sending the remaining pages (``ram.remaining`` > 0);
* a broken link (``migrate-pause`` on the source, what QEMU does itself on
  an I/O error) puts both sides into ``postcopy-paused``: the destination's
  run state stays ``running`` but its vCPUs wait for missing pages.
"""
import os
import shutil
import subprocess
import tempfile
import threading
import time
import types

import pytest
from test_qemu_migration_policy import _wait_for
from test_qemu_migration_policy import BOOT_CODE
from test_qemu_migration_policy import QEMU

from nova_bhyve.hypervisor.qemu import channel as qemu_channel
from nova_bhyve.hypervisor.qemu import migration as qemu_migration
from nova_bhyve.hypervisor.qemu import postcopy as qemu_postcopy
from nova_bhyve.hypervisor.qemu import qmp

from tcp_proxy import TCPProxy

pytestmark = pytest.mark.skipif(QEMU is None,
                                reason='qemu-system-x86_64 not installed')
KiB = 1024


@pytest.fixture
def pair():
    tmp = tempfile.mkdtemp(prefix='nb-pc-')
    floppy = os.path.join(tmp, 'boot.img')
    sector = bytearray(512)
    sector[:len(BOOT_CODE)] = BOOT_CODE
    sector[510:] = b'\x55\xaa'
    with open(floppy, 'wb') as f:
        f.write(bytes(sector) + bytes(512 * 2879))
    argv = [QEMU, '-machine', 'pc', '-accel', 'tcg', '-m', '64',
            '-nodefaults', '-display', 'none', '-boot', 'a',
            '-drive', 'file=%s,format=raw,if=floppy' % floppy]
    socks = {n: os.path.join(tmp, n + '.sock') for n in ('src', 'dst')}
    socks['dir'] = tmp
    procs = [subprocess.Popen(
        argv + ['-qmp', 'unix:%s,server=on,wait=off' % socks['src']],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)]
    procs.append(subprocess.Popen(
        qemu_migration.incoming_argv(
            argv + ['-qmp', 'unix:%s,server=on,wait=off' % socks['dst']]),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL))
    try:
        for name, proc in zip(('src', 'dst'), procs):
            _wait_for(socks[name], proc)
        yield socks
    finally:
        qemu_channel.close(_stream_vm(socks))
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp)


def _stream_vm(pair):
    """The destination as the stream acceptor sees it (no pid file: the
    fixture's QEMU; the acceptor does not watch the process)."""
    return types.SimpleNamespace(control=pair['dst'], uuid='pc-test',
                                 path=pair['dir'], read_pid=lambda: None)


def _status(sock):
    return (qmp.execute(sock, 'query-migrate').get('status'),
            qmp.execute(sock, 'query-status')['status'])


def _until(fn, want, timeout=30, poll=0.1):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(poll)


def _start_postcopy(pair, proxy=None):
    """Migrate, switch to post-copy; return as soon as the source reports
    postcopy-active (polled every 10 ms, as the driver does near a switch:
    the destination may not have got there yet). With ``proxy``, the
    stream goes through a TCPProxy, held over the switch."""
    src, dst = pair['src'], pair['dst']
    caps = {'capabilities': [{'capability': 'postcopy-ram', 'state': True}]}
    qmp.execute(dst, 'migrate-set-capabilities', caps)
    qmp.execute(src, 'migrate-set-capabilities', caps)
    # pre-copy at 256 KiB/s cannot keep up with the guest; post-copy at
    # 32 KiB/s leaves the re-dirtied 512 KiB in flight for seconds
    qmp.execute(src, 'migrate-set-parameters', {
        'max-bandwidth': 256 * KiB, 'max-postcopy-bandwidth': 32 * KiB})
    lsn = qemu_channel.listening_socket('127.0.0.1')
    port = lsn.getsockname()[1]
    token = '5a' * 16
    command, args = qemu_migration.stream_command()
    qemu_channel.accept_stream(_stream_vm(pair), lsn, token,
                               qemu_migration.STREAM_FD, command, args)
    if proxy is not None:
        proxy.append(TCPProxy('127.0.0.1', port))
        port = proxy[0].port
    with qemu_channel.connect_stream('127.0.0.1', port, token) as sock:
        qemu_channel.hand_over(src, sock, qemu_migration.STREAM_FD,
                               'migrate', {'uri': 'fd:migration'})
    time.sleep(3)
    assert _status(src) == ('active', 'running')
    if proxy:
        proxy[0].hold()
    qmp.execute(src, 'migrate-start-postcopy')
    assert _until(lambda: _status(src)[0], 'postcopy-active',
                  poll=0.01) == 'postcopy-active'


def test_destination_paused_until_resumed_then_runs_during_post_copy(pair):
    src, dst = pair['src'], pair['dst']
    # the VMDir interface the listener uses; no pid file (this QEMU is the
    # fixture's): the listener does not watch the process
    vmdir = types.SimpleNamespace(control=dst, uuid='pc-test',
                                  path=pair['dir'], read_pid=lambda: None)
    port, token = qemu_postcopy.listen(vmdir, '127.0.0.1')
    try:
        _start_postcopy(pair)
        time.sleep(1)
        # -S: QEMU does not start the guest at the switch
        assert _status(dst) == ('postcopy-active', 'paused')
        qemu_postcopy.request_resume('127.0.0.1', port, token,
                                     'postcopy-active')
    finally:
        qemu_postcopy.close(vmdir)
    assert _status(dst) == ('postcopy-active', 'running')
    remaining = qmp.execute(src, 'query-migrate')['ram']['remaining']
    assert remaining > 0          # pages still come on demand
    assert _until(lambda: _status(src)[0], 'completed', 120) == 'completed'
    assert _status(dst) == ('completed', 'running')


def test_resume_requested_before_the_destination_got_the_switch(pair):
    """The driver asks for the resume as soon as it sees the source at
    postcopy-active, but QEMU's source gets there before it has even sent
    the switch (its status changes first). Here the stream is held (a
    TCPProxy: fault injection, a link slower than the source's view) over
    the switch and let go 0.5 s after the request: the destination must
    wait for its own postcopy-active and run the guest, not refuse because
    it is still 'active' - which left the guest paused for the whole
    post-copy phase (the functional post-copy test, 3 of 3 runs on this
    machine, before the destination waited)."""
    src, dst = pair['src'], pair['dst']
    vmdir = types.SimpleNamespace(control=dst, uuid='pc-test',
                                  path=pair['dir'], read_pid=lambda: None)
    port, token = qemu_postcopy.listen(vmdir, '127.0.0.1')
    proxy = []
    try:
        _start_postcopy(pair, proxy)
        assert _status(dst)[0] == 'active'      # the switch is held back
        release = threading.Timer(0.5, proxy[0].release)
        release.start()
        qemu_postcopy.request_resume('127.0.0.1', port, token,
                                     'postcopy-active')
    finally:
        qemu_postcopy.close(vmdir)
        for p in proxy:
            p.release()
    assert _status(dst) == ('postcopy-active', 'running')
    assert _until(lambda: _status(src)[0], 'completed', 120) == 'completed'
    for p in proxy:
        p.cut()


def test_broken_link_after_the_switch_is_postcopy_paused(pair):
    src, dst = pair['src'], pair['dst']
    _start_postcopy(pair)
    qemu_postcopy.resume_now(types.SimpleNamespace(control=dst,
                                                   uuid='pc-test'),
                             source_status='postcopy-active')
    qmp.execute(src, 'migrate-pause')
    assert _until(lambda: _status(src)[0], 'postcopy-paused') == \
        'postcopy-paused'
    assert _until(lambda: _status(dst)[0], 'postcopy-paused') == \
        'postcopy-paused'
    assert _status(dst)[1] == 'running'
