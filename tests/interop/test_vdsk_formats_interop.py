"""libvdsk vmdk / vdi / vpc (VHD) against qemu-img and qemu-io.

Images made by qemu read identically to `qemu-img convert -O raw`; images
made and written by libvdsk pass `qemu-img check` (vmdk, vdi: qemu has no
check for vpc) and `qemu-img compare` with a raw model; vdsk.info agrees
with `qemu-img info` on format and virtual size.
"""
import errno
import json
import os
import random
import struct

import pytest
from vdsk_qemu_helpers import needs_qemu_img
from vdsk_qemu_helpers import needs_qemu_io
from vdsk_qemu_helpers import qemu_check
from vdsk_qemu_helpers import qemu_img
from vdsk_qemu_helpers import qemu_io
from vdsk_qemu_helpers import vdsk_all

from nova_bhyve.storage import vdsk

KiB, MiB = 1 << 10, 1 << 20

pytestmark = needs_qemu_img

# (format, qemu-img -o options, libvdsk subformat, checkable by qemu-img)
QEMU_KINDS = [
    ('vmdk', 'subformat=monolithicSparse', None, True),
    ('vmdk', 'subformat=monolithicFlat', None, True),
    ('vmdk', 'subformat=streamOptimized', None, True),
    ('vdi', 'static=off', None, True),
    ('vdi', 'static=on', None, True),
    ('vpc', 'subformat=dynamic', None, False),
    ('vpc', 'subformat=fixed', None, False),
]
VDSK_KINDS = [
    ('vmdk', None, True),
    ('vmdk', 'monolithicSparse', True),
    ('vdi', None, True),
    ('vdi', 'static', True),
    ('vpc', None, False),
    ('vpc', 'fixed', False),
]


def _ids(kinds):
    return ['%s-%s' % (k[0], (k[1] or 'default').split('=')[-1])
            for k in kinds]


def qinfo(path, fmt):
    return json.loads(qemu_img('info', '-f', fmt, '--output=json',
                               path).stdout)


def qraw(path, fmt, tmp_path):
    out = tmp_path / 'qemu.raw'
    qemu_img('convert', '-f', fmt, '-O', 'raw', path, out)
    return out.read_bytes()


def assert_same_as_qemu(path, fmt, tmp_path):
    info = vdsk.info(path, fmt=fmt)
    q = qinfo(path, fmt)
    assert info['format'] == q['format'] == fmt
    assert info['virtual_size'] == q['virtual-size']
    if 'cluster-size' in q:
        assert info['cluster_size'] == q['cluster-size']
    data = _all(path, fmt)
    if fmt != 'vpc':        # a fixed VHD probes as raw, like in qemu
        assert vdsk_all(vdsk, path) == data
    assert data == qraw(path, fmt, tmp_path)
    return data


def _all(path, fmt, chunk=MiB):
    with vdsk.open(path, fmt=fmt, readonly=True) as img:
        return b''.join(img.read(o, min(chunk, img.size - o))
                        for o in range(0, img.size, chunk))


@needs_qemu_io
@pytest.mark.parametrize('fmt,opts,sub,checkable', QEMU_KINDS[:2] +
                         QEMU_KINDS[3:], ids=_ids(QEMU_KINDS[:2] +
                                                  QEMU_KINDS[3:]))
def test_read_qemu_io_patterns(tmp_path, fmt, opts, sub, checkable):
    path = tmp_path / ('img.' + fmt)
    qemu_img('create', '-f', fmt, '-o', opts, path, '9M')
    qemu_io(path, fmt,
            'write -P 0x11 0 4k',
            'write -P 0x22 65000 70000',           # across grains
            'write -P 0x33 1048000 2000',          # across a VDI block
            'write -P 0x44 2096640 1024',          # across a VHD block
            'write -P 0x55 %d 512' % (9 * MiB - 4096))
    data = assert_same_as_qemu(path, fmt, tmp_path)
    assert data[:4096] == b'\x11' * 4096
    assert data[65000:135000] == b'\x22' * 70000


@pytest.mark.parametrize('fmt,opts,sub,checkable', QEMU_KINDS,
                         ids=_ids(QEMU_KINDS))
def test_read_qemu_convert_random(tmp_path, fmt, opts, sub, checkable):
    rnd = random.Random(fmt + opts)
    raw = bytearray(7 * MiB + 3 * 512)
    for _ in range(30):     # random data in random places, holes between
        off = rnd.randrange(len(raw) - 1)
        n = rnd.randrange(1, min(len(raw) - off, 300 * KiB))
        raw[off:off + n] = rnd.randbytes(n)
    src = tmp_path / 'src.raw'
    src.write_bytes(bytes(raw))
    path = tmp_path / ('img.' + fmt)
    qemu_img('convert', '-f', 'raw', '-O', fmt, '-o', opts, src, path)
    data = assert_same_as_qemu(path, fmt, tmp_path)
    assert data[:len(raw)] == bytes(raw)


@pytest.mark.parametrize('fmt,sub,checkable', VDSK_KINDS,
                         ids=_ids(VDSK_KINDS))
def test_vdsk_created_images(tmp_path, fmt, sub, checkable):
    rnd = random.Random('%s%s' % (fmt, sub))
    path = tmp_path / ('img.' + fmt)
    vdsk.create(path, fmt, 20 * MiB + 1000, subformat=sub)
    q = qinfo(path, fmt)
    info = vdsk.info(path, fmt=fmt)
    assert info['format'] == q['format'] == fmt
    size = info['virtual_size']
    assert size == q['virtual-size'] >= 20 * MiB + 1000
    model = bytearray(size)
    with vdsk.open(path, fmt=fmt) as img:
        assert img.size == size
        for i in range(60):
            off = rnd.randrange(size - 1)
            big = 3 * MiB if i % 7 == 0 else 70000
            n = rnd.randrange(1, min(size - off, big))
            data = rnd.randbytes(n)
            img.write(off, data)
            model[off:off + n] = data
        img.write(size - 100, b'E' * 100)
        model[size - 100:] = b'E' * 100
        img.flush()
        for _ in range(20):
            off = rnd.randrange(size - 1)
            n = rnd.randrange(1, min(size - off, 200000))
            assert img.read(off, n) == bytes(model[off:off + n])
    assert _all(path, fmt) == bytes(model)
    if checkable:
        qemu_check(path, fmt)
    m = tmp_path / 'model.raw'
    m.write_bytes(bytes(model))
    qemu_img('compare', '-f', fmt, '-F', 'raw', path, m)
    assert qraw(path, fmt, tmp_path) == bytes(model)


@needs_qemu_io
@pytest.mark.parametrize('fmt,sub,checkable', VDSK_KINDS,
                         ids=_ids(VDSK_KINDS))
def test_qemu_writes_to_vdsk_images(tmp_path, fmt, sub, checkable):
    """Both directions on one image: libvdsk, then qemu-io, then libvdsk."""
    path = tmp_path / ('img.' + fmt)
    vdsk.create(path, fmt, 6 * MiB, subformat=sub)
    with vdsk.open(path, fmt=fmt) as img:
        img.write(100, b'v' * 200000)
    qemu_io(path, fmt, 'write -P 0x77 4096 8192',
            'write -P 0x78 %d 100000' % (3 * MiB))
    with vdsk.open(path, fmt=fmt) as img:
        img.write(5 * MiB, b'z' * 4097)
    data = assert_same_as_qemu(path, fmt, tmp_path)
    assert data[100:4096] == b'v' * 3996
    assert data[4096:12288] == b'\x77' * 8192
    assert data[3 * MiB:3 * MiB + 100000] == b'\x78' * 100000
    assert data[5 * MiB:5 * MiB + 4097] == b'z' * 4097
    if checkable:
        qemu_check(path, fmt)


def test_vmdk_gt_and_redundant_gt_agree(tmp_path):
    path = tmp_path / 'img.vmdk'
    vdsk.create(path, 'vmdk', 80 * MiB)
    rnd = random.Random(3)
    with vdsk.open(path) as img:
        for _ in range(50):
            img.write(rnd.randrange(80 * MiB - 5000), b'x' * 5000)
    b = path.read_bytes()
    (magic, version, flags, cap, grain, _, _, gtes, rgd, gd,
     overhead) = struct.unpack_from('<4sIIQQQQIQQQ', b, 0)
    assert magic == b'KDMV' and flags & 2
    ngt = -(-cap // (grain * gtes))
    gds = struct.unpack_from('<%dI' % ngt, b, gd * 512)
    rgds = struct.unpack_from('<%dI' % ngt, b, rgd * 512)
    used = 0
    for g, r in zip(gds, rgds):
        t = struct.unpack_from('<%dI' % gtes, b, g * 512)
        assert t == struct.unpack_from('<%dI' % gtes, b, r * 512)
        used += sum(1 for e in t if e)
    assert used > 40
    assert len(b) == (overhead + used * grain) * 512
    qemu_check(path, 'vmdk')


def _vhd_checksum(buf, skip):
    s = sum(buf[:skip]) + sum(buf[skip + 4:])
    return ~s & 0xffffffff


def test_vhd_footers_and_checksums(tmp_path):
    path = tmp_path / 'img.vhd'
    vdsk.create(path, 'vhd', 10 * MiB)       # 'vhd' is an alias of 'vpc'
    with vdsk.open(path, fmt='vpc') as img:
        img.write(3 * MiB + 5, b'q' * 3 * MiB)
    b = path.read_bytes()
    head, tail = b[:512], b[-512:]
    assert head == tail and head[:8] == b'conectix'
    assert struct.unpack_from('>I', head, 64)[0] == \
        _vhd_checksum(head, 64)
    dyn = b[512:1536]
    assert dyn[:8] == b'cxsparse'
    assert struct.unpack_from('>I', dyn, 36)[0] == _vhd_checksum(dyn, 36)
    cyls, heads, secs = struct.unpack_from('>HBB', head, 56)
    # qemu-img create -f vpc 10M gives the same CHS-rounded size
    assert cyls * heads * secs * 512 == 10514432
    assert vdsk.info(path)['format'] == 'vpc'
    assert vdsk.info(path)['virtual_size'] == 10514432


@pytest.mark.parametrize('size', [1, 3000000, 10 * MiB, 127 * (1 << 30),
                                  200 * (1 << 30)])
@pytest.mark.parametrize('sub', ['dynamic', 'fixed'])
def test_vhd_size_rounding_like_qemu(tmp_path, size, sub):
    """Fixed images of 127 and 200 GiB too: both create them sparse, and
    only their lengths and footers are read."""
    ours, theirs = tmp_path / 'a.vhd', tmp_path / 'b.vhd'
    vdsk.create(ours, 'vpc', size, subformat=sub)
    qemu_img('create', '-f', 'vpc', '-o', 'subformat=' + sub, theirs, size)
    assert vdsk.info(ours, fmt='vpc')['virtual_size'] == \
        qinfo(theirs, 'vpc')['virtual-size'] == \
        qinfo(ours, 'vpc')['virtual-size']
    assert os.path.getsize(ours) == os.path.getsize(theirs)
    a, b = _footer(ours), _footer(theirs)
    assert a[40:64] == b[40:64]                               # sizes, CHS


def _footer(path):
    with open(path, 'rb') as f:
        f.seek(-512, os.SEEK_END)
        return f.read(512)


def test_vhd_fixed_probes_as_raw_like_qemu(tmp_path):
    path = tmp_path / 'f.vhd'
    vdsk.create(path, 'vpc', 4 * MiB, subformat='fixed')
    assert vdsk.info(path)['format'] == 'raw'
    assert json.loads(qemu_img('info', '--output=json',
                               path).stdout)['format'] == 'raw'
    assert vdsk.info(path, fmt='vpc')['format'] == 'vpc'


def test_sizes_round_to_sectors_like_qemu(tmp_path):
    for fmt in ('vmdk', 'vdi'):
        ours, theirs = tmp_path / ('a.' + fmt), tmp_path / ('b.' + fmt)
        vdsk.create(ours, fmt, 3000000)
        qemu_img('create', '-f', fmt, theirs, 3000000)
        assert vdsk.info(ours)['virtual_size'] == \
            qinfo(theirs, fmt)['virtual-size'] == 3000320


def test_stream_optimized_with_footer(tmp_path):
    """VMware's streamOptimized layout: GD offset in the header is 'at the
    end'; the real header is a footer before the end-of-stream marker."""
    rnd = random.Random(9)
    raw = rnd.randbytes(MiB) + bytes(2 * MiB) + b'\x5a' * MiB
    src = tmp_path / 'src.raw'
    src.write_bytes(raw)
    path = tmp_path / 's.vmdk'
    qemu_img('convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized',
             src, path)
    b = bytearray(path.read_bytes())
    b += bytes(-len(b) % 512)
    header = bytes(b[:512])
    struct.pack_into('<Q', b, 56, 0xffffffffffffffff)
    footer_marker = struct.pack('<QII', 1, 0, 3).ljust(512, b'\0')
    b += footer_marker + header + bytes(512)
    path.write_bytes(bytes(b))
    assert _all(path, 'vmdk')[:len(raw)] == raw
    with pytest.raises(vdsk.VdskError) as e:
        vdsk.open(path, fmt='vmdk')              # read-write
    assert e.value.errno == errno.ENOTSUP


def _flat(tmp_path, extent_line, create_type='monolithicFlat'):
    p = tmp_path / 'desc.vmdk'
    p.write_text('# Disk DescriptorFile\nversion=1\nCID=12345678\n'
                 'parentCID=ffffffff\ncreateType="%s"\n\n'
                 '# Extent description\n%s\n' % (create_type, extent_line))
    return p


def test_vmdk_flat_extents_are_confined(tmp_path):
    (tmp_path / 'data.bin').write_bytes(b'D' * 4096)
    ok = _flat(tmp_path, 'RW 8 FLAT "data.bin" 0\nRW 8 ZERO')
    assert _all(ok, 'vmdk') == b'D' * 4096 + bytes(4096)
    with vdsk.open(ok) as img:
        img.write(10, b'hello')
        with pytest.raises(vdsk.VdskError) as e:
            img.write(4096, b'x')                 # ZERO extent
        assert e.value.errno == errno.EROFS
    assert (tmp_path / 'data.bin').read_bytes()[10:15] == b'hello'
    for name in ('/etc/passwd', '../data.bin', 'sub/data.bin', '..', ''):
        bad = _flat(tmp_path, 'RW 8 FLAT "%s" 0' % name)
        with pytest.raises(vdsk.VdskError) as e:
            vdsk.info(bad)
        assert e.value.errno == errno.EPERM, name
    os.symlink('/etc/passwd', tmp_path / 'link.bin')
    bad = _flat(tmp_path, 'RW 8 FLAT "link.bin" 0')
    with pytest.raises(vdsk.VdskError) as e:
        vdsk.info(bad)
    assert e.value.errno == errno.ELOOP
    for ctype, line in [('twoGbMaxExtentSparse', 'RW 8 SPARSE "x.vmdk"'),
                        ('vmfs', 'RW 8 VMFS "data.bin"'),
                        ('monolithicFlat', 'RW 8 SPARSE "data.bin"'),
                        ('monolithicFlat', 'RW 8 VMFSSPARSE "data.bin"')]:
        bad = _flat(tmp_path, line, ctype)
        with pytest.raises(vdsk.VdskError) as e:
            vdsk.info(bad)
        assert e.value.errno == errno.ENOTSUP, ctype


def test_create_errors(tmp_path):
    p = tmp_path / 'x'
    for fmt, sub in [('vmdk', 'streamOptimized'), ('vmdk', 'monolithicFlat'),
                     ('vdi', 'bogus'), ('vpc', 'diff')]:
        with pytest.raises(vdsk.VdskError):
            vdsk.create(p, fmt, MiB, subformat=sub)
    with pytest.raises(vdsk.VdskError):
        vdsk.create(p, 'raw', MiB, subformat='fixed')
    for fmt in ('vmdk', 'vdi', 'vpc'):
        with pytest.raises(vdsk.VdskError):
            vdsk.create(p, fmt, MiB, backing=str(tmp_path / 'b'))
        with pytest.raises(vdsk.VdskError):
            vdsk.create(p, fmt, MiB, cluster_size=4096)
    with pytest.raises(vdsk.VdskError) as e:
        vdsk.create(p, 'vpc', 3 << 40)
    assert e.value.errno == errno.EFBIG


@needs_qemu_io
def test_vmdk_delta_disk_reads_and_writes_through_parent(tmp_path):
    """parentFileNameHint (qemu-img create -f vmdk -b) is a backing file:
    unallocated grains read from it and partial grain writes copy it."""
    base, top = tmp_path / 'base.vmdk', tmp_path / 'top.vmdk'
    qemu_img('create', '-f', 'vmdk', base, 4 * MiB)
    qemu_io(base, 'vmdk', 'write -P 0x61 0 1M')
    qemu_img('create', '-f', 'vmdk', '-b', base.name, '-F', 'vmdk', top)
    qemu_io(top, 'vmdk', 'write -P 0x62 100k 10k')
    info = vdsk.info(top)
    assert info['backing_file'] == 'base.vmdk'
    with vdsk.open(top) as img:
        img.write(300000, b'hello')
    data = assert_same_as_qemu(top, 'vmdk', tmp_path)
    assert data[300000:300005] == b'hello'
    assert data[:1000] == b'\x61' * 1000
    assert data[290000:300000] == b'\x61' * 10000
    qemu_check(top, 'vmdk')
