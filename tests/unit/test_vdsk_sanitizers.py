"""Run a libvdsk workload through the ASan+UBSan build of vdsktool
(create, writes, reads, info on good and corrupt images) and fail on any
sanitizer report."""
import json
import os
import pathlib
import random
import shutil
import struct
import subprocess

import pytest

NATIVE = pathlib.Path(__file__).resolve().parents[2] / 'native'
VDSK = NATIVE / '_build' / 'asan' / 'vdsktool'
KiB, MiB = 1 << 10, 1 << 20
SAN_MARKERS = ('AddressSanitizer', 'LeakSanitizer', 'runtime error:',
               'UndefinedBehaviorSanitizer', 'SUMMARY:')

pytestmark = pytest.mark.skipif(
    shutil.which('make') is None or shutil.which('gcc') is None,
    reason='needs make and gcc')


@pytest.fixture(scope='module')
def cli():
    p = subprocess.run(['make', '-C', str(NATIVE), 'asan'],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert VDSK.exists()
    return VDSK


class Runner(object):
    def __init__(self, exe):
        self.exe = exe
        self.env = dict(os.environ,
                        ASAN_OPTIONS='detect_leaks=1:abort_on_error=1',
                        UBSAN_OPTIONS='halt_on_error=1:print_stacktrace=1')

    def __call__(self, *args, data=None, ok=True):
        p = subprocess.run([str(self.exe)] + [str(a) for a in args],
                           input=data, capture_output=True, env=self.env,
                           timeout=120)
        err = p.stderr.decode('utf-8', 'replace')
        for marker in SAN_MARKERS:
            assert marker not in err, err
        assert p.returncode in (0, 1, 2), (p.returncode, err)
        if ok is True:
            assert p.returncode == 0, err
        elif ok is False:
            assert p.returncode != 0 and 'vdsktool:' in err, err
        return p


def test_workload(cli, tmp_path):
    run = Runner(cli)
    rnd = random.Random(42)
    base = tmp_path / 'base.raw'
    run('create', '-f', 'raw', base, '3M')
    model_base = bytearray(3 * MiB)
    for _ in range(10):
        off, n = rnd.randrange(3 * MiB - 70000), rnd.randrange(1, 70000)
        data = rnd.randbytes(n)
        run('write', base, off, data=data)
        model_base[off:off + n] = data

    images = []
    for cs, backing in [(512, None), (65536, None), (4096, 'base.raw'),
                        (2 * MiB, 'base.raw')]:
        img = tmp_path / ('img-%d.qcow2' % cs)
        args = ['create', '-f', 'qcow2', '-o', 'cluster_size=%d' % cs]
        if backing:
            args += ['-b', backing, '-F', 'raw']
        run(*(args + [img, '5M']))
        model = bytearray(5 * MiB)
        if backing:
            model[:3 * MiB] = model_base
        for _ in range(25):
            off = rnd.randrange(5 * MiB - 1)
            n = rnd.randrange(1, min(5 * MiB - off, 3 * cs + 100))
            data = rnd.randbytes(n)
            run('write', img, off, data=data)
            model[off:off + n] = data
        out = run('read', img, 0, '5M').stdout
        assert out == bytes(model)
        info = json.loads(run('info', '--json', img).stdout)
        assert info['format'] == 'qcow2' and info['cluster-size'] == cs
        assert info['backing-filename'] == backing
        images.append(img)

    # refcount table growth with small clusters
    big = tmp_path / 'grow.qcow2'
    run('create', '-f', 'qcow2', '-o', 'cluster_size=512', big, '1G')
    payload = rnd.randbytes(12 * MiB)
    run('write', big, 4097, data=payload)
    assert run('read', big, 4097, 12 * MiB).stdout == payload

    # an overlay on a qcow2 overlay, size from the backing
    top = tmp_path / 'top.qcow2'
    run('create', '-f', 'qcow2', '-b', images[2].name, top)
    run('write', top, 1000, data=b'top' * 1000)
    assert run('read', top, 1000, 3000).stdout == b'top' * 1000
    run('info', top)

    if shutil.which('qemu-img'):
        for img in images + [big, top]:
            subprocess.run(['qemu-img', 'check', str(img)], check=True,
                           capture_output=True)

    # errors
    run('read', top, '5M', 1, ok=False)
    run('info', tmp_path / 'missing', ok=False)
    run('create', '-f', 'qcow2', '-b', 'missing', tmp_path / 'x', ok=False)
    run('create', '-f', 'qcow2', tmp_path / 'x', '1Q', ok=None)
    run('bogus', ok=None)


def test_corrupt_images(cli, tmp_path):
    run = Runner(cli)
    good = tmp_path / 'good.qcow2'
    run('create', '-f', 'qcow2', '-o', 'cluster_size=4096', good, '4M')
    run('write', good, 0, data=b'A' * 20000)
    run('write', good, 3 * MiB, data=b'B' * 5000)
    data = good.read_bytes()
    l1_off, rt_off = struct.unpack_from('>QQ', data, 40)
    l2_off = struct.unpack_from('>Q', data, l1_off)[0] & 0x00fffffffffffe00
    hot = list(range(0, 160)) + list(range(l1_off, l1_off + 16)) + \
        list(range(rt_off, rt_off + 16)) + list(range(l2_off, l2_off + 48))
    rnd = random.Random(7)
    bad = tmp_path / 'bad.qcow2'
    for i in range(60):
        b = bytearray(data)
        for _ in range(rnd.randint(1, 3)):
            b[rnd.choice(hot)] = rnd.getrandbits(8)
        if i % 10 == 9:
            b = b[:rnd.randrange(len(b))]
        bad.write_bytes(bytes(b))
        run('info', '--json', '-f', 'qcow2', bad, ok=None)
        run('read', '-f', 'qcow2', bad, 0, '1M', ok=None)
        run('write', '-f', 'qcow2', bad, rnd.randrange(MiB), data=b'w' * 5000,
            ok=None)
    # a few deliberate ones
    for off, fmt, val in [(36, '>I', 0xffffffff), (20, '>I', 40),
                          (72, '>Q', 1 << 33), (100, '>I', 1 << 30),
                          (56, '>I', 0xffffffff)]:
        b = bytearray(data)
        struct.pack_into(fmt, b, off, val)
        bad.write_bytes(bytes(b))
        run('info', bad, ok=False)
        run('read', bad, 0, 512, ok=False)
