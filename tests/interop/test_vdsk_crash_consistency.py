"""Crash consistency of libvdsk's writable formats.

native/_build/crashwriter (native/vdsk/tools/crashwriter.c) opens an image
with libvdsk and writes (new clusters, overwrites, partial and whole
clusters, long runs), discards (qcow2) and flushes at random, journaling
each request before it issues it and each flush libvdsk acknowledged.  The
test kills it with SIGKILL at a random moment, many times over the same
image, and after every kill requires:

- `qemu-img check`: no corruption (exit 0, or 3 = leaked clusters only;
  VHD has no check in qemu-img);
- every 512-byte sector holds the data of its last write acknowledged by a
  flush, or of a later write (never garbage, never older data), read both
  through qemu (`qemu-img convert` to raw) and through libvdsk;
- libvdsk's own check (vdsk.check): no corruption.

Each image goes through two phases.  The sweep starts every run from the
same fresh image and kills the writer right before its N-th pwrite, for
every N from 1 to SWEEP: an injected fault (the writer SIGKILLs itself,
see crashwriter.c), every other time after writing that pwrite only up to
the next 4 KiB boundary (a torn write), so a crash lands between every
two writes of the first allocations (L2 tables, refcount blocks, grains,
blocks), which random kill times reach only by luck.  Then the random
phase runs the writer again and again on the same, growing image, killing
it half of the time at a random moment (from the test) and half of the
time before a random pwrite; the writer resumes from the verified state.
Apart from that fault injection nothing is mocked: real processes, real
kills, qemu-img as the oracle.  SIGKILL loses no completed write(2),
so this checks the order in which libvdsk issues its writes (what a crash
between any two of them leaves behind), not the durability of fsync on
power loss.
"""
import os
import pathlib
import random
import shutil
import signal
import struct
import subprocess
import time

import pytest
from vdsk_qemu_helpers import needs_qemu_img
from vdsk_qemu_helpers import qemu_img

from nova_bhyve.storage import vdsk

NATIVE = pathlib.Path(__file__).resolve().parents[2] / 'native'
MiB = 1 << 20
SIZE = 24 * MiB
# kills per image in the random phase, and the sweep's length
ITERATIONS = int(os.environ.get('VDSK_CRASH_ITERATIONS', '16'))
SWEEP = int(os.environ.get('VDSK_CRASH_SWEEP', '32'))
SAN_MARKERS = ('AddressSanitizer', 'runtime error:',
               'UndefinedBehaviorSanitizer')

pytestmark = [
    needs_qemu_img,
    pytest.mark.skipif(shutil.which('make') is None or
                       shutil.which('gcc') is None,
                       reason='needs make and gcc'),
]


@pytest.fixture(scope='module')
def writer():
    """The crashwriter tool; its ASan+UBSan build in the sanitizer pass of
    tools/run-tests (NOVA_BHYVE_SANITIZED_VDSK set)."""
    sanitized = bool(os.environ.get('NOVA_BHYVE_SANITIZED_VDSK'))
    target = 'asan' if sanitized else 'all'
    p = subprocess.run(['make', '-C', str(NATIVE), target],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    exe = NATIVE / '_build' / ('asan' if sanitized else '') / 'crashwriter'
    assert exe.exists()
    return exe


class Image(object):
    """One image under test and the files the crashwriter keeps for it."""

    def __init__(self, exe, tmp_path, fmt, path, discard=0):
        self.exe = exe
        self.fmt = fmt
        self.path = path
        self.discard = discard
        self.state = tmp_path / 'state'
        self.journal = tmp_path / 'journal'
        self.raw = tmp_path / 'export.raw'
        self.env = dict(os.environ, ASAN_OPTIONS='detect_leaks=0',
                        UBSAN_OPTIONS='halt_on_error=1:print_stacktrace=1')
        self.env.pop('LD_PRELOAD', None)

    def tool(self, *args, ok=True):
        p = subprocess.run([str(self.exe)] + [str(a) for a in args],
                           capture_output=True, text=True, env=self.env,
                           timeout=300)
        for m in SAN_MARKERS:
            assert m not in p.stderr, p.stderr
        if ok:
            assert p.returncode == 0, (args, p.stdout, p.stderr)
        return p

    def init(self, path=None, fmt=None, fill=0):
        self.tool('init', '-f', fmt or self.fmt, path or self.path,
                  self.state, fill)

    def run_and_kill(self, seed, delay, kill_at=None, tear=False):
        """Start the writer, SIGKILL it after 'delay' seconds, or let it
        kill itself before its kill_at-th pwrite."""
        env = dict(self.env)
        if kill_at:
            env['CRASHWRITER_KILL_AT'] = str(kill_at)
            if tear:
                env['CRASHWRITER_TEAR'] = '1'
        p = subprocess.Popen(
            [str(self.exe), 'run', '-f', self.fmt, str(self.path),
             str(self.state), str(self.journal), str(seed),
             str(self.discard)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        try:
            if not kill_at:
                time.sleep(delay)
                p.send_signal(signal.SIGKILL)
            err = p.communicate(timeout=60)[1].decode('utf-8', 'replace')
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        for m in SAN_MARKERS:
            assert m not in err, err
        # it must have been running (not failed) when it was killed
        assert p.returncode == -signal.SIGKILL, (p.returncode, err)

    def check_after_crash(self, what):
        if self.fmt == 'vpc':
            # no qemu-img check for VHD; the file must end with a footer
            with open(self.path, 'rb') as f:
                f.seek(-512, os.SEEK_END)
                assert f.read(8) == b'conectix', '%s: no VHD footer' % what
        else:
            p = qemu_img('check', '-f', self.fmt, self.path, check=False)
            assert p.returncode in (0, 3), '%s: qemu-img check (%d)\n%s%s' % (
                what, p.returncode, p.stdout, p.stderr)
        res = vdsk.check(str(self.path), fmt=self.fmt)
        assert res['corruptions'] == 0, (what, res)
        # the data, as qemu reads it, then as libvdsk reads it
        qemu_img('convert', '-f', self.fmt, '-O', 'raw', self.path,
                 self.raw)
        p = self.tool('verify', '-f', 'raw', self.raw, self.state,
                      self.journal, ok=False)
        assert p.returncode == 0, '%s: qemu sees:\n%s' % (what, p.stderr)
        p = self.tool('verify', '-f', self.fmt, self.path, self.state,
                      self.journal, self.state, ok=False)
        assert p.returncode == 0, '%s: libvdsk sees:\n%s' % (what,
                                                             p.stderr)

    def sweep(self, name, n=SWEEP):
        """Kill before pwrite 1, 2, ... n, each time from the image as it
        is now (torn every other time)."""
        fresh = self.path.with_name('fresh')
        fresh_state = self.state.with_name('fresh-state')
        shutil.copyfile(self.path, fresh)
        shutil.copyfile(self.state, fresh_state)
        for k in range(1, n + 1):
            shutil.copyfile(fresh, self.path)
            shutil.copyfile(fresh_state, self.state)
            tear = k % 2 == 0
            self.run_and_kill(k, 0, kill_at=k, tear=tear)
            self.check_after_crash('%s, sweep: killed at pwrite %d%s' % (
                name, k, ', torn' if tear else ''))
        os.unlink(fresh)
        os.unlink(fresh_state)

    def crash_loop(self, name, iterations=ITERATIONS, between=None,
                   sweep=SWEEP):
        self.sweep(name, sweep)
        rnd = random.Random(name)
        for i in range(iterations):
            if between is not None:
                between(i)
            kill_at = rnd.randint(1, 600) if i % 2 else None
            tear = rnd.random() < 0.5
            self.run_and_kill(rnd.getrandbits(63), rnd.uniform(0.005, 0.3),
                              kill_at, tear)
            self.check_after_crash('%s, kill %d (%s)' % (
                name, i + 1, 'at pwrite %d%s' % (
                    kill_at, ', torn' if tear else '') if kill_at
                else 'timed'))


def _qcow2(tmp_path, **opts):
    path = tmp_path / 'img.qcow2'
    o = ','.join('%s=%s' % kv for kv in sorted(opts.items()))
    qemu_img('create', '-f', 'qcow2', *(['-o', o] if o else []), path,
             SIZE)
    return path


@pytest.mark.parametrize('cluster', [65536, 512])
def test_qcow2(writer, tmp_path, cluster):
    """libvdsk-created qcow2 v3; 512-byte clusters make every few writes
    allocate L2 tables and refcount blocks and grow the refcount table."""
    path = tmp_path / 'img.qcow2'
    vdsk.create(str(path), 'qcow2', SIZE, cluster_size=cluster)
    img = Image(writer, tmp_path, 'qcow2', path, discard=cluster)
    img.init()
    # 512-byte clusters: a new refcount block every ~35 pwrites
    img.crash_loop('qcow2-%d' % cluster,
                   sweep=SWEEP * 5 // 2 if cluster == 512 else SWEEP)


def _refcount_table_clusters(path):
    with open(path, 'rb') as f:
        return struct.unpack('>I', f.read(60)[56:60])[0]


def test_qcow2_refcount_table_growth(writer, tmp_path):
    """512-byte clusters filled to just below what one refcount table
    cluster covers (8 MiB of file): the sweep's writes move the refcount
    table to a bigger one (new table, new refcount blocks, header)."""
    path = tmp_path / 'img.qcow2'
    vdsk.create(str(path), 'qcow2', SIZE, cluster_size=512)
    img = Image(writer, tmp_path, 'qcow2', path, discard=512)
    img.init(fill=8000 << 10)
    assert _refcount_table_clusters(path) == 1
    img.crash_loop('qcow2-rt-growth', iterations=ITERATIONS // 4)
    assert _refcount_table_clusters(path) > 1


def test_qcow2_lazy_refcounts(writer, tmp_path):
    """lazy_refcounts=on (qemu-img): libvdsk keeps refcounts exact anyway
    and never leaves the image dirty."""
    img = Image(writer, tmp_path, 'qcow2',
                _qcow2(tmp_path, lazy_refcounts='on'), discard=65536)
    img.init(fill=SIZE // 3)
    img.crash_loop('qcow2-lazy')
    assert not vdsk.info(str(img.path))['dirty']


def test_qcow2_v2(writer, tmp_path):
    img = Image(writer, tmp_path, 'qcow2',
                _qcow2(tmp_path, compat='0.10'), discard=65536)
    img.init()
    img.crash_loop('qcow2-v2')


def test_qcow2_backing(writer, tmp_path):
    """An overlay on a raw backing file holding data in its first half:
    partial writes copy from it, discards hide it (zero clusters)."""
    base = tmp_path / 'base.raw'
    base.write_bytes(b'')
    os.truncate(base, SIZE)
    path = tmp_path / 'img.qcow2'
    img = Image(writer, tmp_path, 'qcow2', path, discard=65536)
    img.init(path=base, fmt='raw', fill=SIZE // 2)
    vdsk.create(str(path), 'qcow2', 0, backing=str(base), backing_fmt='raw')
    img.crash_loop('qcow2-backing')


def test_qcow2_internal_snapshots(writer, tmp_path):
    """Internal snapshots (taken by qemu-img between runs, not under the
    kill) share clusters and L2 tables: writes copy them first."""
    img = Image(writer, tmp_path, 'qcow2', _qcow2(tmp_path), discard=65536)
    img.init(fill=SIZE // 2)
    qemu_img('snapshot', '-c', 'first', img.path)

    def snapshot(i):
        if i % 8 == 7:
            qemu_img('snapshot', '-c', 's%d' % i, img.path)

    img.crash_loop('qcow2-snapshots', between=snapshot)
    assert len(vdsk.snapshot_list(str(img.path))) == 1 + ITERATIONS // 8


@pytest.mark.parametrize('fmt,sub', [('vmdk', 'monolithicSparse'),
                                     ('vdi', 'dynamic'), ('vpc', 'dynamic')])
def test_other_formats(writer, tmp_path, fmt, sub):
    path = tmp_path / ('img.' + fmt)
    vdsk.create(str(path), fmt, SIZE, subformat=sub)
    img = Image(writer, tmp_path, fmt, path)
    img.init()
    img.crash_loop(fmt)


def test_checker_detects_damage(writer, tmp_path):
    """The verification itself can fail: old data in place of an
    acknowledged write, a garbage sector and a sector from elsewhere."""
    path = tmp_path / 'img.qcow2'
    vdsk.create(str(path), 'qcow2', SIZE)
    img = Image(writer, tmp_path, 'qcow2', path)
    img.init()
    before = tmp_path / 'before.raw'
    qemu_img('convert', '-O', 'raw', path, before)
    img.tool('run', '-f', 'qcow2', path, img.state, img.journal, 7, 0, 50)
    qemu_img('convert', '-O', 'raw', path, img.raw)
    img.tool('verify', '-f', 'raw', img.raw, img.state, img.journal)
    good = img.raw.read_bytes()
    # the image before the (all acknowledged) writes
    p = img.tool('verify', '-f', 'raw', before, img.state, img.journal,
                 ok=False)
    assert p.returncode == 1 and 'bad sectors' in p.stderr, p.stderr
    written = [i for i in range(0, len(good), 512)
               if good[i:i + 512] != bytes(512)]
    for damage in (b'\x01' * 512, good[written[1]:written[1] + 512]):
        bad = bytearray(good)
        bad[written[0]:written[0] + 512] = damage
        img.raw.write_bytes(bytes(bad))
        p = img.tool('verify', '-f', 'raw', img.raw, img.state, img.journal,
                     ok=False)
        assert p.returncode == 1 and 'sector %d:' % (written[0] // 512) \
            in p.stderr, p.stderr

