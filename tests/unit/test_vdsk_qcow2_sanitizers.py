"""The qcow2 feature paths (compressed clusters, snapshots with
copy-on-write, discard, resize, check and repair) through the ASan+UBSan
build of vdsktool; fails on any sanitizer report."""
import json
import random
import shutil
import struct
import subprocess

import pytest
from test_vdsk_sanitizers import cli  # noqa: F401 - fixture
from test_vdsk_sanitizers import Runner as _Runner
from test_vdsk_sanitizers import SAN_MARKERS  # noqa: F401 - fixture

MiB = 1 << 20


class Runner(_Runner):
    """As the base runner, but `check` may also exit 3 (leaks)."""

    def __call__(self, *args, data=None, ok=True):
        p = subprocess.run([str(self.exe)] + [str(a) for a in args],
                           input=data, capture_output=True, env=self.env,
                           timeout=120)
        err = p.stderr.decode('utf-8', 'replace')
        for marker in SAN_MARKERS:
            assert marker not in err, err
        assert p.returncode in (0, 1, 2, 3), (p.returncode, err)
        if ok is True:
            assert p.returncode == 0, err
        elif ok is False:
            assert p.returncode != 0 and 'vdsktool:' in err, err
        return p


def test_qcow2_features_workload(cli, tmp_path):  # noqa: F811
    run = Runner(cli)
    rnd = random.Random(11)
    img = tmp_path / 'f.qcow2'
    run('create', '-f', 'qcow2', '-o', 'cluster_size=4096', img, '4M')
    model = bytearray(4 * MiB)
    chunk = (b'compressible ' * 400)[:4096] * 64
    run('write', '-c', img, 0, data=chunk)
    model[0:len(chunk)] = chunk
    for i in range(3):
        for _ in range(10):
            off = rnd.randrange(4 * MiB - 20000)
            data = rnd.randbytes(rnd.randrange(1, 20000))
            run('write', img, off, data=data)
            model[off:off + len(data)] = data
        run('snapshot', '-c', 'sn%d' % i, img)
    run('discard', img, MiB, MiB)
    model[MiB:2 * MiB] = bytes(MiB)
    assert run('read', img, 0, '4M').stdout == bytes(model)
    assert b'sn2' in run('snapshot', '-l', img).stdout
    run('snapshot', '-a', 'sn0', img)
    run('snapshot', '-d', 'sn1', img)
    run('snapshot', '-d', 'nosuch', img, ok=False)
    run('check', img)
    run('resize', img, '8M', ok=False)      # snapshots pin the size
    info = json.loads(run('info', '--json', img).stdout)
    assert info['snapshots'] == 2
    run('snapshot', '-d', 'sn0', img)
    run('snapshot', '-d', 'sn2', img)
    run('resize', img, '8M')
    run('resize', img, '1K', ok=False)
    info = json.loads(run('info', '--json', img).stdout)
    assert info['virtual-size'] == 8 * MiB and info['snapshots'] == 0
    if shutil.which('qemu-img'):
        subprocess.run(['qemu-img', 'check', str(img)], check=True,
                       capture_output=True)

    # a leak, found and repaired; then a corruption
    b = img.read_bytes()
    rt = struct.unpack_from('>Q', b, 48)[0]
    rb = struct.unpack_from('>Q', b, rt)[0]
    n = len(b) // 4096 + 1
    with open(img, 'r+b') as f:
        f.truncate((n + 1) * 4096)
        f.seek(rb + 2 * n)
        f.write(struct.pack('>H', 1))
    p = run('check', img, ok=None)
    assert p.returncode == 3
    run('check', '-r', 'leaks', img)
    l1 = struct.unpack_from('>Q', b, 40)[0]
    with open(img, 'r+b') as f:
        f.seek(rb + 2 * (l1 // 4096))
        f.write(struct.pack('>H', 0))
    p = run('check', '--json', img, ok=None)
    assert p.returncode == 2 and json.loads(p.stdout)['corruptions'] >= 1


@pytest.mark.skipif(shutil.which('qemu-img') is None, reason='no qemu-img')
def test_qemu_feature_images(cli, tmp_path):  # noqa: F811
    run = Runner(cli)
    raw = tmp_path / 's.raw'
    raw.write_bytes((b'abcdefgh' * 8192 + bytes(65536)) * 20)
    for opts in ('compression_type=zlib', 'compression_type=zstd'):
        img = tmp_path / 'c.qcow2'
        p = subprocess.run(['qemu-img', 'convert', '-c', '-O', 'qcow2',
                            '-o', opts, str(raw), str(img)],
                           capture_output=True)
        if p.returncode != 0:
            continue
        assert run('read', img, 0, 20 * 131072).stdout == raw.read_bytes()
        run('write', img, 1000, data=b'z' * 100000)
        run('check', img)
    img = tmp_path / 'e.qcow2'
    subprocess.run(['qemu-img', 'create', '-f', 'qcow2', '-o',
                    'extended_l2=on', str(img), '2M'], check=True,
                   capture_output=True)
    subprocess.run(['qemu-io', '-f', 'qcow2', '-c', 'write -P 1 0 5k', '-c',
                    'write -z 64k 8k', str(img)], check=True,
                   capture_output=True)
    out = run('read', img, 0, '2M').stdout
    assert out[:5120] == b'\x01' * 5120 and out[5120:] == bytes(2 * MiB - 5120)
    # hostile compressed entries: flip bytes in a compressed image's L2
    img = tmp_path / 'h.qcow2'
    subprocess.run(['qemu-img', 'convert', '-c', '-O', 'qcow2', str(raw),
                    str(img)], check=True, capture_output=True)
    data = img.read_bytes()
    l1 = struct.unpack_from('>Q', data, 40)[0]
    l2 = struct.unpack_from('>Q', data, l1)[0] & 0x00fffffffffffe00
    rnd = random.Random(5)
    bad = tmp_path / 'bad.qcow2'
    for _ in range(30):
        b = bytearray(data)
        for _ in range(3):
            b[l2 + rnd.randrange(64)] = rnd.getrandbits(8)
        bad.write_bytes(bytes(b))
        run('read', bad, 0, '1M', ok=None)
        run('check', bad, ok=None)
