"""The vmdk / vdi / vpc drivers under the ASan+UBSan build of vdsktool:
a create/write/read workload, then corrupted, truncated and hostile
headers and tables, which must give an error exit, never a sanitizer
report or a crash."""
import json
import random
import shutil
import struct
import subprocess

import pytest
from test_vdsk_sanitizers import cli  # noqa: F401 - fixture
from test_vdsk_sanitizers import Runner  # noqa: F401 - fixture

KiB, MiB = 1 << 10, 1 << 20

pytestmark = pytest.mark.skipif(
    shutil.which('make') is None or shutil.which('gcc') is None,
    reason='needs make and gcc')

KINDS = [('vmdk', None), ('vdi', None), ('vdi', 'static'), ('vpc', None),
         ('vpc', 'fixed')]


def _create(run, path, fmt, sub, size):
    args = ['create', '-f', fmt]
    if sub:
        args += ['-o', 'subformat=' + sub]
    run(*(args + [path, size]))


@pytest.mark.parametrize('fmt,sub', KINDS)
def test_workload(cli, tmp_path, fmt, sub):  # noqa: F811
    run = Runner(cli)
    rnd = random.Random(fmt + str(sub))
    img = tmp_path / ('img.' + fmt)
    _create(run, img, fmt, sub, '5M')
    size = json.loads(run('info', '--json', '-f', fmt, img).stdout)[
        'virtual-size']
    model = bytearray(size)
    for _ in range(25):
        off = rnd.randrange(size - 1)
        n = rnd.randrange(1, min(size - off, 2 * MiB + 100))
        data = rnd.randbytes(n)
        run('write', '-f', fmt, img, off, data=data)
        model[off:off + n] = data
    assert run('read', '-f', fmt, img, 0, size).stdout == bytes(model)
    run('read', '-f', fmt, img, size, 1, ok=False)
    if shutil.which('qemu-img') and fmt != 'vpc':
        subprocess.run(['qemu-img', 'check', '-f', fmt, str(img)],
                       check=True, capture_output=True)


def _hot_ranges(fmt, data):
    """Byte offsets worth corrupting: headers and the first tables."""
    hot = list(range(0, min(len(data), 1024)))
    if fmt == 'vmdk':
        gd, rgd = struct.unpack_from('<QQ', data, 56)[0], \
            struct.unpack_from('<Q', data, 48)[0]
        for sec in (gd, rgd):
            if sec * 512 + 16 <= len(data):
                hot += list(range(sec * 512, sec * 512 + 16))
                gt = struct.unpack_from('<I', data, sec * 512)[0]
                hot += list(range(gt * 512, min(len(data), gt * 512 + 64)))
    elif fmt == 'vdi':
        hot += list(range(512, min(len(data), 600)))
    elif fmt == 'vpc':
        hot += list(range(1536, min(len(data), 1600)))
        hot += list(range(len(data) - 512, len(data)))
    return hot


def _fixups(fmt, b):
    """Recompute VHD checksums half of the time so corruption gets past
    them and reaches the tables."""
    if fmt != 'vpc':
        return
    for off, length, ck in ((0, 512, 64), (512, 1024, 36 + 512),
                            (len(b) - 512, 512, len(b) - 512 + 64)):
        if off + length > len(b) or off < 0:
            continue
        struct.pack_into('>I', b, ck, 0)
        s = ~sum(b[off:off + length]) & 0xffffffff
        struct.pack_into('>I', b, ck, s)


@pytest.mark.parametrize('fmt,sub', KINDS + [('vmdk', 'stream')])
def test_corrupt_images(cli, tmp_path, fmt, sub):  # noqa: F811
    run = Runner(cli)
    good = tmp_path / ('good.' + fmt)
    if sub == 'stream':
        if not shutil.which('qemu-img'):
            pytest.skip('needs qemu-img')
        src = tmp_path / 'src.raw'
        src.write_bytes(random.Random(1).randbytes(300 * KiB) +
                        bytes(MiB) + b'S' * 70000)
        subprocess.run(['qemu-img', 'convert', '-O', 'vmdk', '-o',
                        'subformat=streamOptimized', str(src), str(good)],
                       check=True)
    else:
        _create(run, good, fmt, sub, '4M')
        run('write', '-f', fmt, good, 1000, data=b'A' * 150000)
        run('write', '-f', fmt, good, 3 * MiB, data=b'B' * 5000)
    data = good.read_bytes()
    hot = _hot_ranges(fmt, data)
    rnd = random.Random(fmt + str(sub))
    bad = tmp_path / ('bad.' + fmt)
    for i in range(80):
        b = bytearray(data)
        for _ in range(rnd.randint(1, 4)):
            b[rnd.choice(hot)] = rnd.getrandbits(8)
        if i % 2:
            _fixups(fmt, b)
        if i % 10 == 9:
            b = b[:rnd.randrange(len(b))]
        bad.write_bytes(bytes(b))
        run('info', '--json', '-f', fmt, bad, ok=None)
        run('read', '-f', fmt, bad, 0, '1M', ok=None)
        if sub != 'stream':
            run('write', '-f', fmt, bad, rnd.randrange(2 * MiB),
                data=b'w' * 70000, ok=None)
    # deliberate ones: (offset, struct format, value)
    cases = {
        'vmdk': [(4, '<I', 9), (20, '<Q', 0), (20, '<Q', 1 << 40),
                 (44, '<I', 0), (44, '<I', 1 << 20), (56, '<Q', 1 << 50),
                 (12, '<Q', 1 << 62), (28, '<Q', 1 << 40),
                 (36, '<Q', 1 << 40), (73, '<B', ord('x'))],
        'vdi': [(64, '<I', 0), (68, '<I', 0x00020000), (76, '<I', 4),
                (340, '<I', 7), (340, '<I', 1 << 31), (344, '<I', 3),
                (360, '<I', 4096), (368, '<Q', 1 << 62), (376, '<I', 4096),
                (384, '<I', 0xffffffff), (424, '<B', 1),
                (512, '<I', 0x7ffffff)],
        'vpc': [(0, '<B', 0), (64, '>I', 0)],
    }[fmt]
    if sub in (None,) and fmt == 'vpc':
        cases += [(512 + 28, '>I', 0xffffffff), (512 + 32, '>I', 3)]
    for off, f, val in cases:
        b = bytearray(data)
        if sub == 'fixed' and fmt == 'vpc':
            off = len(b) - 512 + off
        struct.pack_into(f, b, off, val)
        bad.write_bytes(bytes(b))
        run('read', '-f', fmt, bad, 0, '4M', ok=False)
