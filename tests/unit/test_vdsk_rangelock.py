"""Concurrent I/O on one open image (range locks, metadata mutex).

Many threads write and read one image at once; the model is well defined
(see native/vdsk/tools/stress.c for the C version, run here also under
ASan+UBSan and TSan):
  * owned blocks: block b is written only by thread (b // 3) % THREADS, so
    its final contents are that thread's last write;
  * shared blocks: any thread writes a run of them while holding test-level
    per-block locks and records, under them, which write was last;
  * the hot range: every thread overwrites all of it with no test lock;
    each read and the final image must show a single write throughout
    (each request is atomic).
The final image must equal the model (qemu-img compare) and pass
qemu-img check."""
import os
import pathlib
import random
import shutil
import struct
import subprocess
import threading

import pytest

from nova_bhyve.storage import vdsk

NATIVE = pathlib.Path(__file__).resolve().parents[2] / 'native'
QEMU_IMG = shutil.which('qemu-img')
BS = 4096
NBLOCKS = 1024                     # 4 MiB
THREADS = 8
HOT0, HOT_N = NBLOCKS - 24, 16     # crosses a 64 KiB cluster boundary
HOT = 0xffffffff
SAN_MARKERS = ('AddressSanitizer', 'LeakSanitizer', 'runtime error:',
               'ThreadSanitizer', 'SUMMARY:')


def tag(block, seq):
    return struct.pack('<QQ', block, seq) * (BS // 16)


def untag(data, block):
    """seq of a well-formed block (0: never written), None if torn."""
    if data == bytes(BS):
        return 0
    b, seq = struct.unpack_from('<QQ', data)
    if b != block or data != tag(block, seq):
        return None
    return seq


def qemu(*args):
    return subprocess.run([QEMU_IMG] + [str(a) for a in args],
                          capture_output=True, text=True)


def check_with_qemu(path, fmt, expected):
    if QEMU_IMG is None:
        return
    if fmt == 'qcow2':
        p = qemu('check', path)
        assert p.returncode == 0, p.stdout + p.stderr
    p = qemu('compare', '-f', fmt, '-F', 'raw', path, expected)
    assert p.returncode == 0, p.stdout + p.stderr


class Stress(object):
    def __init__(self, img, seed):
        self.img = img
        self.seed = seed
        self.model = [0] * NBLOCKS
        self.locks = [threading.Lock() for _ in range(NBLOCKS)]
        self.seq = iter(range(1, 1 << 62))
        self.seq_lock = threading.Lock()
        self.errors = []

    def next_seq(self):
        with self.seq_lock:
            return next(self.seq)

    def owner(self, b):
        return (b // 3) % THREADS if b < NBLOCKS // 2 else None

    def check(self, me, data, b0):
        hot = set()
        for i in range(len(data) // BS):
            b = b0 + i
            is_hot = HOT0 <= b < HOT0 + HOT_N
            seq = untag(data[i * BS:(i + 1) * BS], HOT if is_hot else b)
            if seq is None:
                self.errors.append('torn block %d' % b)
            elif self.owner(b) == me and seq != self.model[b]:
                self.errors.append('block %d: %d != %d' % (
                    b, seq, self.model[b]))
            elif is_hot:
                hot.add(seq)
        if len(hot) > 1:
            self.errors.append('hot range mixed: %s' % sorted(hot))

    def worker(self, me, iters):
        rnd = random.Random(self.seed * 100 + me)
        for _ in range(iters):
            op = rnd.randrange(5)
            if op == 0:
                b = rnd.choice([x for x in range(0, NBLOCKS // 2, 3)
                                if self.owner(x) == me])
                n = rnd.randint(1, 3)
                bufs = []
                for i in range(n):
                    self.model[b + i] = self.next_seq()
                    bufs.append(tag(b + i, self.model[b + i]))
                self.img.write(b * BS, b''.join(bufs))
            elif op == 1:
                n = rnd.randint(1, 8)
                b = rnd.randrange(NBLOCKS // 2, HOT0 - n)
                for i in range(n):
                    self.locks[b + i].acquire()
                try:
                    bufs = []
                    for i in range(n):
                        self.model[b + i] = self.next_seq()
                        bufs.append(tag(b + i, self.model[b + i]))
                    self.img.write(b * BS, b''.join(bufs))
                finally:
                    for i in reversed(range(n)):
                        self.locks[b + i].release()
            elif op == 2:
                self.img.write(HOT0 * BS, tag(HOT, self.next_seq()) * HOT_N)
            else:
                n = rnd.randint(1, HOT_N)
                b = HOT0 if op == 3 else rnd.randrange(NBLOCKS - n + 1)
                self.check(me, self.img.read(b * BS, n * BS), b)

    def run(self, iters):
        ts = [threading.Thread(target=self.worker, args=(i, iters))
              for i in range(THREADS)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    def final(self, expected):
        data = self.img.read(0, NBLOCKS * BS)
        self.check(-1, data, 0)
        hot = data[HOT0 * BS:(HOT0 + HOT_N) * BS]
        with open(expected, 'wb') as f:
            for b in range(NBLOCKS):
                if HOT0 <= b < HOT0 + HOT_N:
                    f.write(hot[(b - HOT0) * BS:(b - HOT0 + 1) * BS])
                    continue
                want = tag(b, self.model[b]) if self.model[b] else bytes(BS)
                if data[b * BS:(b + 1) * BS] != want:
                    self.errors.append('final block %d' % b)
                f.write(want)


@pytest.mark.parametrize('fmt,cluster', [('qcow2', None), ('qcow2', 4096),
                                         ('raw', None)])
def test_python_threads(tmp_path, fmt, cluster):
    path = str(tmp_path / ('img.' + fmt))
    vdsk.create(path, fmt, NBLOCKS * BS, cluster_size=cluster)
    with vdsk.open(path) as img:
        s = Stress(img, seed=7)
        s.run(iters=1500)
        s.final(str(tmp_path / 'expected.raw'))
    assert not s.errors, s.errors[:10]
    check_with_qemu(path, fmt, str(tmp_path / 'expected.raw'))


def test_close_waits_for_requests(tmp_path):
    path = str(tmp_path / 'c.qcow2')
    vdsk.create(path, 'qcow2', 64 << 20)
    img = vdsk.open(path)
    stop = threading.Event()
    errs = []

    def io():
        try:
            while not stop.is_set():
                img.write(random.randrange(1000) * 65536, b'x' * 65536)
        except vdsk.VdskError as e:
            if e.errno != 9:    # EBADF once closed is the expected end
                errs.append(e)
    ts = [threading.Thread(target=io) for _ in range(4)]
    for t in ts:
        t.start()
    img.close()
    stop.set()
    for t in ts:
        t.join()
    assert not errs


def make(target):
    if shutil.which('make') is None or shutil.which('gcc') is None:
        pytest.skip('needs make and gcc')
    p = subprocess.run(['make', '-C', str(NATIVE), target],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize('build', ['plain', 'asan', 'tsan'])
@pytest.mark.parametrize('fmt', ['qcow2', 'raw'])
def test_c_stress_driver(tmp_path, build, fmt):
    exe = NATIVE / '_build' / ('stress' if build == 'plain' else
                               build + '/stress')
    make({'plain': '_build/stress', 'asan': 'asan',
          'tsan': 'tsan'}[build])
    path = str(tmp_path / ('img.' + fmt))
    expected = str(tmp_path / 'expected.raw')
    vdsk.create(path, fmt, 8 << 20,
                cluster_size=4096 if build == 'tsan' and fmt == 'qcow2'
                else None)
    env = dict(os.environ, ASAN_OPTIONS='detect_leaks=1:abort_on_error=1',
               UBSAN_OPTIONS='halt_on_error=1:print_stacktrace=1',
               TSAN_OPTIONS='halt_on_error=1:second_deadlock_stack=1')
    iters = 20000 if build == 'plain' else 4000
    p = subprocess.run([str(exe), path, fmt, '8', str(iters), '1',
                        expected], capture_output=True, text=True,
                       env=env, timeout=600)
    for m in SAN_MARKERS:
        assert m not in p.stderr, p.stderr[-6000:]
    assert p.returncode == 0, p.stdout + p.stderr[-4000:]
    assert 'stress: ok' in p.stdout
    check_with_qemu(path, fmt, expected)


def test_metadata_ops_under_io(tmp_path):
    """Compressed writes, discard, internal snapshots and resize run
    while other threads write and read their own clusters: nothing is
    torn or lost, and the image stays consistent (qemu-img check)."""
    cs = 65536
    path = str(tmp_path / 'm.qcow2')
    vdsk.create(path, 'qcow2', 64 * cs, cluster_size=cs)
    errors, expect, lock = [], {}, threading.Lock()

    def writer(t, img):
        rnd = random.Random(t)
        base = t * 8 * cs                       # 8 clusters each
        for seq in range(1, 300):
            blk = base // BS + rnd.randrange(8 * cs // BS)
            img.write(blk * BS, tag(blk, seq))
            with lock:
                expect[blk] = seq
            back = untag(img.read(blk * BS, BS), blk)
            if back is None or back < seq:
                errors.append((blk, seq, back))

    def compressor(img):
        rnd = random.Random(99)
        base = 6 * 8 * cs                       # clusters 48..55
        for i in range(120):
            c = base + rnd.randrange(8) * cs
            if i % 3 == 2:
                img.discard(c, cs)
                data = bytes(cs)
            else:
                data = (b'%08d' % i) * (cs // 8)
                img.write_compressed(c, data)
            with lock:
                expect[('c', c)] = data

    def meta(img):
        for i in range(8):
            vdsk_img_snap(img, i)
        img.resize(img.size + cs)

    def vdsk_img_snap(img, i):
        # through the library handle the other threads use
        lib, ffi = vdsk.lib, vdsk.ffi
        d = img._enter()
        try:
            name = b's%d' % i
            assert lib.vdsk_snapshot_create(d, name) == 0
            assert lib.vdsk_snapshot_list(d, ffi.NULL, 0) == 1
            assert lib.vdsk_snapshot_delete(d, name) == 0
        finally:
            img._leave()

    with vdsk.open(path) as img:
        ts = [threading.Thread(target=writer, args=(t, img))
              for t in range(6)]
        ts += [threading.Thread(target=compressor, args=(img,)),
               threading.Thread(target=meta, args=(img,))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors[:5]
        assert img.size == 65 * cs
        for k, v in expect.items():
            if isinstance(k, tuple):
                assert img.read(k[1], cs) == v, k
            else:
                assert untag(img.read(k * BS, BS), k) == v, k
    assert vdsk.check(path) == dict(vdsk.check(path), corruptions=0,
                                    leaks=0)
    if QEMU_IMG:
        p = qemu('check', path)
        assert p.returncode == 0, p.stdout + p.stderr
