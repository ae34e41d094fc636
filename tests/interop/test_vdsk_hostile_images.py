"""Corrupt, truncated and hostile qcow2 images give VdskError, never a
crash, and unknown incompatible features are refused."""
import errno
import os
import random
import struct

import pytest
from vdsk_qemu_helpers import needs_qemu_img
from vdsk_qemu_helpers import qemu_img

from nova_bhyve.storage import vdsk

KiB, MiB = 1 << 10, 1 << 20
CS = 4096


@pytest.fixture
def good(tmp_path):
    """A small v3 image (4K clusters: 2 MiB per L2 table) with data in a
    few clusters of the first L2 table."""
    p = tmp_path / 'good.qcow2'
    vdsk.create(p, 'qcow2', 8 * MiB, cluster_size=CS)
    with vdsk.open(p) as d:
        d.write(0, b'A' * 10000)
        d.write(512 * KiB, b'B' * 5000)
    return p


def _hdr(path):
    b = path.read_bytes()
    (l1_size,) = struct.unpack_from('>I', b, 36)
    (l1_off, rt_off) = struct.unpack_from('>QQ', b, 40)
    (l1e0,) = struct.unpack_from('>Q', b, l1_off)
    l2_off = l1e0 & 0x00fffffffffffe00
    return b, l1_off, rt_off, l2_off


def _patch(path, off, fmt, value):
    b = bytearray(path.read_bytes())
    struct.pack_into(fmt, b, off, value)
    path.write_bytes(bytes(b))


def _open_fails(path, err, fmt=None, readonly=True, text=None):
    with pytest.raises(vdsk.VdskError) as e:
        with vdsk.open(path, fmt=fmt, readonly=readonly) as d:
            d.read(0, d.size)
    assert e.value.errno == err, e.value
    if text:
        assert text in str(e.value)
    return e.value


HEADER_CASES = [
    # (offset, struct fmt, value, errno, message fragment)
    (4, '>I', 4, errno.ENOTSUP, 'version'),
    (4, '>I', 1, errno.ENOTSUP, 'qcow'),
    (20, '>I', 8, errno.EINVAL, 'cluster bits'),
    (20, '>I', 22, errno.EINVAL, 'cluster bits'),
    (20, '>I', 0xffffffff, errno.EINVAL, 'cluster bits'),
    (24, '>Q', 1 << 63, errno.EFBIG, 'virtual size'),
    (24, '>Q', 1 << 40, errno.EINVAL, 'L1 table too small'),
    (32, '>I', 1, errno.ENOTSUP, 'encrypted'),
    (32, '>I', 2, errno.ENOTSUP, 'encrypted'),
    (36, '>I', 0xffffffff, errno.EFBIG, 'L1 table too large'),
    (40, '>Q', 4097, errno.EINVAL, 'L1 table offset'),
    (40, '>Q', 1 << 40, errno.EIO, 'beyond the end'),
    (40, '>Q', 0, errno.EINVAL, 'L1 table offset'),
    (48, '>Q', 0, errno.EINVAL, 'refcount table'),
    (48, '>Q', 100, errno.EINVAL, 'refcount table'),
    (56, '>I', 0xffffffff, errno.EFBIG, 'refcount table too large'),
    (60, '>I', 1 << 20, errno.EINVAL, 'snapshot'),
    (72, '>Q', 1 << 40, errno.ENOTSUP, 'bit 40'),
    (72, '>Q', 1 << 2, errno.ENOTSUP, 'external data'),
    # extended L2 flag on a standard image: the L1 table is too small
    (72, '>Q', 1 << 4, errno.EINVAL, 'L1 table too small'),
    (72, '>Q', 1 << 3, errno.EINVAL, 'compression type'),
    (96, '>I', 7, errno.EINVAL, 'refcount order'),
    (100, '>I', 100, errno.EINVAL, 'header length'),
    (100, '>I', 105, errno.EINVAL, 'header length'),
    (100, '>I', 1 << 31, errno.EINVAL, 'header length'),
    (8, '>Q', CS - 10, errno.EINVAL, 'backing file name'),
    (8, '>Q', 8, errno.EINVAL, 'backing file name'),
    (16, '>I', 5000, errno.EINVAL, None),
    (112, '>I', 0x12345678, errno.EINVAL, 'header extension'),
]


@pytest.mark.parametrize('off,fmt,value,err,text', HEADER_CASES)
def test_bad_header_field(good, off, fmt, value, err, text):
    if off == 16:
        _patch(good, 8, '>Q', 200)
    if off == 112:      # an extension whose length runs off the cluster
        _patch(good, 116, '>I', 0x7fffffff)
    _patch(good, off, fmt, value)
    _open_fails(good, err, text=text)
    with pytest.raises(vdsk.VdskError):
        vdsk.info(good)


def test_bad_magic(good):
    _patch(good, 0, '>I', 0x12345678)
    _open_fails(good, errno.EINVAL, fmt='qcow2', text='magic')
    assert vdsk.info(good)['format'] == 'raw'     # probed: just bytes


def test_unknown_feature_named_from_table(good):
    # feature name table extension replacing the end marker at 112
    b = bytearray(good.read_bytes())
    entry = bytes([0, 50]) + b'future-thing'.ljust(46, b'\0')
    ext = struct.pack('>II', 0x6803f857, len(entry)) + entry
    b[112:112 + len(ext) + 8] = ext + bytes(8)
    struct.pack_into('>Q', b, 72, 1 << 50)
    good.write_bytes(bytes(b))
    _open_fails(good, errno.ENOTSUP, text='bit 50 (future-thing)')


@pytest.mark.parametrize('bit,name', [(1, 'corrupt')])
def test_dirty_or_corrupt_is_read_only(good, bit, name):
    _patch(good, 72, '>Q', 1 << bit)
    with vdsk.open(good, readonly=True) as d:
        assert d.read(0, 3) == b'AAA'
    e = _open_fails(good, errno.EROFS, readonly=False)
    assert name in str(e)
    assert vdsk.info(good)['dirty'] is True


def test_dirty_is_repaired_on_writable_open(good):
    _patch(good, 72, '>Q', 1)
    assert vdsk.info(good)['dirty'] is True
    with vdsk.open(good) as d:
        assert d.read(0, 3) == b'AAA'
    assert vdsk.info(good)['dirty'] is False


@needs_qemu_img
def test_internal_snapshot_is_writable(good):
    qemu_img('snapshot', '-c', 'snap1', good)
    with vdsk.open(good) as d:
        assert d.read(0, 3) == b'AAA'
        d.write(0, b'BBB')
    assert vdsk.snapshot_list(good)[0]['name'] == 'snap1'


TABLE_CASES = [
    # (which table, entry value, errno)
    ('l1', 4097 | (1 << 63), errno.EIO),          # unaligned L2 offset
    ('l1', (1 << 62) | 8192, errno.EIO),          # reserved bit
    ('l1', (1 << 40) | (1 << 63), errno.EIO),     # beyond end of file
    ('l2', 8704 | (1 << 63), errno.EIO),          # unaligned data offset
    ('l2', (1 << 58) | 8192 | (1 << 63), errno.EIO),  # reserved bits
    ('l2', 1 << 63, errno.EIO),                   # COPIED with offset 0
    ('l2', (1 << 45) | (1 << 63), errno.EIO),     # beyond end of file
]


@pytest.mark.parametrize('table,value,err', TABLE_CASES)
def test_bad_table_entry(good, table, value, err):
    b, l1_off, rt_off, l2_off = _hdr(good)
    _patch(good, l1_off if table == 'l1' else l2_off, '>Q', value)
    with vdsk.open(good, readonly=True) as d:
        with pytest.raises(vdsk.VdskError) as e:
            d.read(0, 512)
        assert e.value.errno == err
        assert d.read(6 * MiB, 512) == bytes(512)    # other L2: fine
    with vdsk.open(good) as d:
        with pytest.raises(vdsk.VdskError):
            d.write(0, b'z' * 100)


def test_data_cluster_overlapping_metadata_is_not_overwritten(good):
    b, l1_off, rt_off, l2_off = _hdr(good)
    _patch(good, l2_off, '>Q', l1_off | (1 << 63))
    with vdsk.open(good) as d:
        with pytest.raises(vdsk.VdskError) as e:
            d.write(0, b'z' * 100)
        assert 'overlaps metadata' in str(e.value)
    assert good.read_bytes()[l1_off:l1_off + 8] == b[l1_off:l1_off + 8]


def test_bad_refcount_table_entry_on_write(good):
    b, l1_off, rt_off, l2_off = _hdr(good)
    _patch(good, rt_off, '>Q', 12345)
    with vdsk.open(good, readonly=True) as d:
        assert d.read(0, 1) == b'A'         # reads never need refcounts
    with vdsk.open(good) as d:
        with pytest.raises(vdsk.VdskError) as e:
            d.write(900 * KiB, b'new cluster')
        assert e.value.errno == errno.EIO


def test_truncated_images(good, tmp_path):
    data = good.read_bytes()
    cut = tmp_path / 'cut.qcow2'
    for n in sorted({0, 3, 4, 8, 50, 71, 72, 103, 104, 111, 112, 200,
                     CS - 1, CS, CS + 8, 2 * CS, 3 * CS, len(data) // 2,
                     len(data) - CS, len(data) - 1}):
        cut.write_bytes(data[:n])
        try:
            with vdsk.open(cut, fmt='qcow2', readonly=True) as d:
                d.read(0, d.size)
        except vdsk.VdskError as e:
            assert e.errno in (errno.EINVAL, errno.EIO, errno.ENOTSUP), e
        if n < 4:
            assert vdsk.info(cut)['format'] == 'raw'


def test_fuzzed_metadata(good, tmp_path):
    """Random byte corruption in the header and tables: every outcome is
    success or VdskError.  (A crash would take the test run down.)"""
    data = good.read_bytes()
    _, l1_off, rt_off, l2_off = _hdr(good)
    hot = list(range(0, 160)) + list(range(l1_off, l1_off + 16)) + \
        list(range(rt_off, rt_off + 16)) + list(range(l2_off, l2_off + 64))
    rnd = random.Random(1234)
    fz = tmp_path / 'fz.qcow2'
    outcomes = {'ok': 0, 'error': 0}
    for i in range(400):
        b = bytearray(data)
        for _ in range(rnd.randint(1, 4)):
            pos = rnd.choice(hot) if rnd.random() < 0.9 else \
                rnd.randrange(len(b))
            b[pos] = rnd.getrandbits(8)
        fz.write_bytes(bytes(b))
        try:
            with vdsk.open(fz, fmt='qcow2', readonly=(i % 2 == 0)) as d:
                size = min(d.size, 2 * MiB)
                for off in range(0, size, 256 * KiB):
                    d.read(off, min(256 * KiB, size - off))
                if i % 2:
                    d.write(rnd.randrange(max(size - 100, 1)), b'w' * 100)
                    d.flush()
            vdsk.info(fz)
            outcomes['ok'] += 1
        except vdsk.VdskError:
            outcomes['error'] += 1
    assert outcomes['error'] > 50 and outcomes['ok'] > 50, outcomes


def test_backing_file_that_is_a_fifo(tmp_path):
    """A hostile image naming a FIFO as its backing file fails at once
    instead of blocking in open()."""
    fifo = tmp_path / 'fifo'
    os.mkfifo(fifo)
    img = tmp_path / 'img.qcow2'
    vdsk.create(img, 'qcow2', MiB)
    b = bytearray(img.read_bytes())
    struct.pack_into('>QI', b, 8, 200, 4)
    b[200:204] = b'fifo'
    img.write_bytes(bytes(b))
    assert vdsk.info(img)['backing_file'] == 'fifo'
    with pytest.raises(vdsk.VdskError) as e:
        vdsk.open(img, readonly=True)
    assert e.value.errno == errno.EINVAL
    assert 'not a regular file' in str(e.value)
