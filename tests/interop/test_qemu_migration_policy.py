"""The convergence policy driving a real QEMU 7.2 live migration.

Two ``qemu-system-x86_64 -accel tcg -m 64`` processes on this machine (the
source, and a destination with ``-incoming defer``), migrating over a unix
socket with ``max-bandwidth`` 256 KiB/s. The guest is a 42-byte boot sector
generated here (assembled by hand, listed below) that rewrites 512 KiB of
memory in a loop, far faster than the link: a migration that cannot
converge. A small loop plays the orchestration: every 0.5 s it turns
query-migrate into a Progress, asks the policy, and applies its Steps with
qemu_migration_params. Nothing is mocked.

The boot sector (16-bit real mode, loaded at 0x7c00)::

    cli
    mov bx, 0x1000
  sweep:
    mov es, bx          ; 64 KiB segment at bx * 16
    xor di, di
    mov cx, 0x8000
    rep stosw           ; fill it with ax
    add bx, 0x1000
    cmp bx, 0x9000
    jb sweep            ; 0x10000 .. 0x8ffff: 512 KiB
    mov bx, 0x1000
    inc ax
    mov edx, cr0        ; toggling CR0.WP flushes TCG's TLB: without a
    xor edx, 0x10000    ; flush, TCG keeps writing through TLB entries made
    mov cr0, edx        ; before the migration's dirty-bitmap sync and
    jmp sweep           ; the writes are not seen as dirty
"""
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from nova_bhyve.hypervisor.qemu import migration_params as params
from nova_bhyve.hypervisor.qemu import qmp
from nova_bhyve.migration import policy as mp

QEMU = shutil.which('qemu-system-x86_64')
pytestmark = pytest.mark.skipif(QEMU is None,
                                reason='qemu-system-x86_64 not installed')

BOOT_CODE = bytes.fromhex(
    'fa bb0010 8ec3 31ff b90080 f3ab 81c30010 81fb0090 72ed bb0010 40 '
    '0f20c2 6681f200000100 0f22c2 ebda'.replace(' ', ''))
BANDWIDTH = 256 * 1024
KiB = 1024


def _wait_for(path, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, 'QEMU exited: %s' % proc.args
        assert time.monotonic() < deadline, 'no QMP socket %s' % path
        time.sleep(0.05)


@pytest.fixture
def pair(request):
    """Source and destination QEMU (-incoming defer) on one floppy image;
    indirect parameter {'own_disks': True}: the destination on a copy (as
    after a block migration), {'paused': True}: destination with -S."""
    options = getattr(request, 'param', None) or {}
    tmp = tempfile.mkdtemp(prefix='nb-mig-')   # short: unix socket paths
    floppy = os.path.join(tmp, 'boot.img')
    sector = bytearray(512)
    sector[:len(BOOT_CODE)] = BOOT_CODE
    sector[510:] = b'\x55\xaa'
    with open(floppy, 'wb') as f:
        f.write(bytes(sector) + bytes(512 * 2879))    # 1.44 MB floppy
    argv = [QEMU, '-machine', 'pc', '-accel', 'tcg', '-m', '64',
            '-nodefaults', '-display', 'none', '-boot', 'a',
            '-drive', 'file=%s,format=raw,if=floppy' % floppy]
    socks = {n: os.path.join(tmp, n + '.sock') for n in ('src', 'dst')}
    procs = [subprocess.Popen(
        argv + ['-qmp', 'unix:%s,server=on,wait=off' % socks['src']],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)]
    if options.get('own_disks'):
        shutil.copy(floppy, floppy + '.dst')
        argv[-1] = argv[-1].replace(floppy, floppy + '.dst')
    if options.get('paused'):
        argv.append('-S')
    procs.append(subprocess.Popen(
        argv + ['-qmp', 'unix:%s,server=on,wait=off' % socks['dst'],
                '-incoming', 'defer'],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL))
    try:
        for name, proc in zip(('src', 'dst'), procs):
            _wait_for(socks[name], proc)
        socks['uri'] = 'unix:' + os.path.join(tmp, 'migration.sock')
        socks['procs'] = procs
        yield socks
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp)


def progress_from(reply, elapsed):
    ram = reply.get('ram', {})
    return mp.Progress(
        elapsed=elapsed, rounds=ram.get('dirty-sync-count', 0),
        memory_total=ram.get('total', 0),
        memory_processed=ram.get('transferred', 0),
        memory_remaining=ram.get('remaining', 0),
        dirty_rate=ram.get('dirty-pages-rate', 0) * ram.get('page-size',
                                                            4096),
        bandwidth=ram.get('mbps', 0) * 1e6 / 8,
        cpu_throttle=reply.get('cpu-throttle-percentage'))


def migrate(socks, policy, limit=120):
    """Run the migration under ``policy``; return (final status, steps,
    samples of (elapsed, cpu-throttle-percentage, downtime-limit))."""
    src, dst = socks['src'], socks['dst']
    for name, args in params.incoming_qmp(policy):
        qmp.execute(dst, name, args)
    qmp.execute(dst, 'migrate-incoming', {'uri': socks['uri']})
    for name, args in params.initial_qmp(policy, BANDWIDTH):
        qmp.execute(src, name, args)
    qmp.execute(src, 'migrate', {'uri': socks['uri']})
    start = time.monotonic()
    steps, samples = [], []
    while time.monotonic() - start < limit:
        time.sleep(0.5)
        reply = qmp.execute(src, 'query-migrate')
        if reply['status'] in ('completed', 'failed', 'cancelled'):
            return reply['status'], steps, samples
        elapsed = time.monotonic() - start
        samples.append((elapsed, reply.get('cpu-throttle-percentage', 0),
                        qmp.execute(src, 'query-migrate-parameters')[
                            'downtime-limit']))
        for step in policy.decide(progress_from(reply, elapsed)):
            steps.append((elapsed, step))
            for name, args in params.qmp_for_step(step):
                qmp.execute(src, name, args)
    raise AssertionError('migration still %s after %d s' % (
        reply['status'], limit))


def _wait_status(sock, status, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        got = qmp.execute(sock, 'query-status')['status']
        if got == status or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_auto_converge_throttle_follows_the_policy_then_timeout(pair):
    """512 KiB rewritten per pass needs ~2 s of downtime at 256 KiB/s: the
    downtime goes to the maximum, then the throttle steps; a guest that
    rewrites its working set in well under a millisecond is not slowed
    enough by any throttle, so the completion timeout aborts and the source
    keeps running."""
    policy = mp.ConvergencePolicy(10, 100, 3, 'auto-converge', 45)
    status, steps, samples = migrate(pair, policy)
    assert status == 'cancelled'
    kinds = [s.kind for _, s in steps]
    assert kinds[-1] == 'abort'
    assert 'completion timeout' in steps[-1][1].reason
    assert 'downtime' in kinds and 'throttle' in kinds
    assert kinds.index('throttle') > kinds.index('downtime')
    # the downtime limit QEMU had never exceeded the maximum
    assert max(limit for _, _, limit in samples) <= 100
    # QEMU's throttle never went above what the policy had asked for, and
    # reached the policy's first step within a few passes of the request
    requested = [(t, s.value) for t, s in steps if s.kind == 'throttle']
    for t, observed, _ in samples:
        asked = [v for at, v in requested if at < t]
        assert observed <= (asked[-1] if asked else 1), (t, observed, asked)
    first_at, first = requested[0]
    assert any(observed >= first for t, observed, _ in samples
               if t > first_at)
    assert _wait_status(pair['src'], 'running') == 'running'


def test_post_copy_fallback_finishes_on_the_destination(pair):
    policy = mp.ConvergencePolicy(10, 100, 3, 'post-copy', 120)
    status, steps, samples = migrate(pair, policy)
    assert status == 'completed'
    kinds = [s.kind for _, s in steps]
    assert kinds.count('postcopy') == 1 and 'abort' not in kinds
    assert max(limit for _, _, limit in samples) <= 100
    assert _wait_status(pair['dst'], 'running') == 'running'
