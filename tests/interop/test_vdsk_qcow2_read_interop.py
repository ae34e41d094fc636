"""libvdsk reads images made by qemu-img/qemu-io exactly as qemu does."""
import errno
import random

import pytest
from vdsk_qemu_helpers import needs_qemu_img
from vdsk_qemu_helpers import needs_qemu_io
from vdsk_qemu_helpers import qemu_img
from vdsk_qemu_helpers import qemu_info
from vdsk_qemu_helpers import qemu_io
from vdsk_qemu_helpers import qemu_raw
from vdsk_qemu_helpers import vdsk_all

from nova_bhyve.storage import vdsk

pytestmark = [needs_qemu_img, needs_qemu_io]

MiB = 1 << 20
CLUSTERS = [512, 4096, 65536, 2 * MiB]


def _pattern_writes(path, cs, size, zero=True, seed=0):
    rnd = random.Random(seed)
    cmds = []
    for i in range(12):
        off = rnd.randrange(0, size - 1) & ~511
        ln = min(rnd.choice([512, 4096, cs, 3 * cs + 512, 70000]) & ~511,
                 size - off) or 512
        cmds.append('write -P 0x%02x %d %d' % (i + 1, off, ln))
    cmds.append('write -P 0xee %d 512' % (size - 512))   # last sector
    if zero:
        cmds.append('write -z %d %d' % (cs, cs))           # zero cluster
        cmds.append('write -z %d 4096' % ((size // 2) & ~4095))
    qemu_io(path, 'qcow2', *cmds)


@pytest.mark.parametrize('cs', CLUSTERS)
@pytest.mark.parametrize('compat', ['0.10', '1.1'])
def test_read_matches_qemu(tmp_path, cs, compat):
    size = 8 * MiB + 3 * 512        # not cluster aligned
    img = tmp_path / 'img.qcow2'
    qemu_img('create', '-f', 'qcow2', '-o',
             'compat=%s,cluster_size=%d' % (compat, cs), img, size)
    _pattern_writes(img, cs, size, zero=True)
    assert vdsk_all(vdsk, img) == qemu_raw(img, tmp_path)
    with vdsk.open(img, readonly=True) as d:
        assert d.size == size


@pytest.mark.parametrize('cs', [512, 65536])
def test_random_slices(tmp_path, cs):
    size = 4 * MiB
    img = tmp_path / 'img.qcow2'
    qemu_img('create', '-f', 'qcow2', '-o', 'cluster_size=%d' % cs, img,
             size)
    _pattern_writes(img, cs, size, seed=7)
    ref = qemu_raw(img, tmp_path)
    rnd = random.Random(1)
    with vdsk.open(img, readonly=True) as d:
        for _ in range(300):
            off = rnd.randrange(size)
            n = rnd.randrange(min(size - off, 3 * cs) + 1)
            assert d.read(off, n) == ref[off:off + n]


def test_backing_chain(tmp_path):
    """raw base <- v2 qcow2 (4K clusters) <- v3 qcow2, each level bigger
    and partly overwritten, with a zero cluster hiding backing data."""
    base = tmp_path / 'base.raw'
    mid = tmp_path / 'mid.qcow2'
    top = tmp_path / 'top.qcow2'
    rnd = random.Random(3)
    base.write_bytes(bytes(rnd.getrandbits(8) for _ in range(3 * MiB)))
    qemu_img('create', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=4096',
             '-b', base.name, '-F', 'raw', mid, 5 * MiB)
    qemu_io(mid, 'qcow2', 'write -P 0x11 1000k 600k', 'write -P 0x12 4M 8k')
    qemu_img('create', '-f', 'qcow2', '-b', mid.name, '-F', 'qcow2', top,
             8 * MiB)
    qemu_io(top, 'qcow2', 'write -P 0x21 2M 100k', 'write -z 0 64k',
            'write -z 1088k 64k', 'write -P 0x22 7M 1M')
    assert vdsk_all(vdsk, top) == qemu_raw(top, tmp_path)


def test_zero_cluster_with_preallocation(tmp_path):
    img = tmp_path / 'img.qcow2'
    qemu_img('create', '-f', 'qcow2', img, 4 * MiB)
    qemu_io(img, 'qcow2', 'write -P 0x5a 0 1M')
    # keeps the host clusters, marks them zero
    qemu_io(img, 'qcow2', 'write -z 64k 128k')
    assert vdsk_all(vdsk, img) == qemu_raw(img, tmp_path)


@pytest.mark.parametrize('bits', [1, 2, 4, 8, 32, 64])
def test_refcount_widths_read(tmp_path, bits):
    img = tmp_path / 'img.qcow2'
    qemu_img('create', '-f', 'qcow2', '-o', 'refcount_bits=%d' % bits, img,
             2 * MiB)
    qemu_io(img, 'qcow2', 'write -P 0x33 100k 300k')
    assert vdsk_all(vdsk, img) == qemu_raw(img, tmp_path)


def test_compressed_cluster_reads(tmp_path):
    raw = tmp_path / 'src.raw'
    raw.write_bytes(b'abc' * 100000)
    img = tmp_path / 'c.qcow2'
    qemu_img('convert', '-c', '-f', 'raw', '-O', 'qcow2', raw, img)
    with vdsk.open(img, readonly=True) as d:
        assert d.read(0, 300000) == b'abc' * 100000


@pytest.mark.parametrize('fmt', ['vhdx', 'qed'])
def test_other_formats_are_recognised_not_misread(tmp_path, fmt):
    img = tmp_path / ('img.' + fmt)
    qemu_img('create', '-f', fmt, img, 4 * MiB)
    with pytest.raises(vdsk.VdskError) as e:
        vdsk.info(img)
    assert e.value.errno == errno.ENOTSUP
    assert fmt in str(e.value)


@pytest.mark.parametrize('fmt', ['vmdk', 'vdi', 'vpc'])
def test_supported_formats_are_probed(tmp_path, fmt):
    # details in test_vdsk_formats_interop.py
    img = tmp_path / ('img.' + fmt)
    qemu_img('create', '-f', fmt, img, 4 * MiB)
    v = vdsk.info(img)
    assert v['format'] == fmt
    assert v['virtual_size'] == qemu_info(img)['virtual-size']


def _info_matches(path):
    q = qemu_info(path)
    v = vdsk.info(path)
    assert v['format'] == q['format']
    assert v['virtual_size'] == q['virtual-size']
    assert v['cluster_size'] == q.get('cluster-size')
    assert v['backing_file'] == q.get('backing-filename')
    assert v['backing_format'] == q.get('backing-filename-format')
    assert v['actual_size'] == q['actual-size']
    return v


def test_info_matches_qemu(tmp_path):
    base = tmp_path / 'base.raw'
    qemu_img('create', '-f', 'raw', base, 3 * MiB)
    _info_matches(base)
    for compat in ('0.10', '1.1'):
        for cs in (512, 65536, 2 * MiB):
            img = tmp_path / ('i-%s-%d.qcow2' % (compat, cs))
            qemu_img('create', '-f', 'qcow2', '-o',
                     'compat=%s,cluster_size=%d' % (compat, cs),
                     '-b', base.name, '-F', 'raw', img, 10 * MiB)
            qemu_io(img, 'qcow2', 'write 0 1M')
            v = _info_matches(img)
            assert v['version'] == (2 if compat == '0.10' else 3)


def test_info_does_not_need_the_backing_file(tmp_path):
    """Glance-image validation: a stray backing reference is reported,
    not followed."""
    img = tmp_path / 'img.qcow2'
    qemu_img('create', '-f', 'qcow2', '-u', '-b', '/nonexistent/base',
             '-F', 'qcow2', img, MiB)
    assert vdsk.info(img)['backing_file'] == '/nonexistent/base'
    with pytest.raises(vdsk.VdskError) as e:
        vdsk.open(img)
    assert e.value.errno == errno.ENOENT
    assert 'backing' in str(e.value)
