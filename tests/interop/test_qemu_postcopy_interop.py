"""What QEMU 7.2 does with a ``-S`` destination in post-copy, and the
switchover of hypervisor/qemu_postcopy.py against it.

Two real ``qemu-system-x86_64 -accel tcg -m 64`` processes running the
memory-dirtying boot sector of test_qemu_migration_policy.py, migrating
over loopback TCP with post-copy enabled on both sides. Nothing is mocked:
the resume request goes over a real socket to a real ResumeListener.

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
import time
import types

import pytest

from nova_bhyve.hypervisor import qemu_migration
from nova_bhyve.hypervisor import qemu_postcopy
from nova_bhyve.hypervisor import qmp

from test_qemu_migration_policy import BOOT_CODE, QEMU, _wait_for

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
        socks['dir'] = tmp
        yield socks
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp)


def _status(sock):
    return (qmp.execute(sock, 'query-migrate').get('status'),
            qmp.execute(sock, 'query-status')['status'])


def _until(fn, want, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def _start_postcopy(pair):
    src, dst = pair['src'], pair['dst']
    caps = {'capabilities': [{'capability': 'postcopy-ram', 'state': True}]}
    qmp.execute(dst, 'migrate-set-capabilities', caps)
    qmp.execute(src, 'migrate-set-capabilities', caps)
    # pre-copy at 256 KiB/s cannot keep up with the guest; post-copy at
    # 32 KiB/s leaves the re-dirtied 512 KiB in flight for seconds
    qmp.execute(src, 'migrate-set-parameters', {
        'max-bandwidth': 256 * KiB, 'max-postcopy-bandwidth': 32 * KiB})
    port = qemu_migration.free_port('127.0.0.1')
    qmp.execute(dst, 'migrate-incoming',
                {'uri': 'tcp:127.0.0.1:%d' % port})
    qmp.execute(src, 'migrate', {'uri': 'tcp:127.0.0.1:%d' % port})
    time.sleep(3)
    assert _status(src) == ('active', 'running')
    qmp.execute(src, 'migrate-start-postcopy')
    assert _until(lambda: _status(src)[0], 'postcopy-active') == \
        'postcopy-active'


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
        qemu_postcopy.request_resume('127.0.0.1', port, token)
    finally:
        qemu_postcopy.close(vmdir)
    assert _status(dst) == ('postcopy-active', 'running')
    remaining = qmp.execute(src, 'query-migrate')['ram']['remaining']
    assert remaining > 0          # pages still come on demand
    assert _until(lambda: _status(src)[0], 'completed', 120) == 'completed'
    assert _status(dst) == ('completed', 'running')


def test_broken_link_after_the_switch_is_postcopy_paused(pair):
    src, dst = pair['src'], pair['dst']
    _start_postcopy(pair)
    qemu_postcopy.resume_now(types.SimpleNamespace(control=dst,
                                                   uuid='pc-test'))
    qmp.execute(src, 'migrate-pause')
    assert _until(lambda: _status(src)[0], 'postcopy-paused') == \
        'postcopy-paused'
    assert _until(lambda: _status(dst)[0], 'postcopy-paused') == \
        'postcopy-paused'
    assert _status(dst)[1] == 'running'
