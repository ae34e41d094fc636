"""Images created and written by libvdsk pass `qemu-img check` and hold
exactly what a byte-array model of the writes says (`qemu-img compare`)."""
import errno
import os
import random

import pytest
from vdsk_qemu_helpers import needs_qemu_img
from vdsk_qemu_helpers import needs_qemu_io
from vdsk_qemu_helpers import qemu_check
from vdsk_qemu_helpers import qemu_img
from vdsk_qemu_helpers import qemu_info
from vdsk_qemu_helpers import qemu_io
from vdsk_qemu_helpers import vdsk_all

from nova_bhyve.storage import vdsk

pytestmark = [needs_qemu_img]

MiB = 1 << 20


def _random_writes(path, model, cs, count, seed, max_len=None):
    rnd = random.Random(seed)
    size = len(model)
    max_len = max_len or 3 * cs
    with vdsk.open(path) as img:
        assert img.size == size
        for i in range(count):
            off = rnd.randrange(size)
            n = rnd.randrange(1, min(max_len, size - off) + 1)
            data = rnd.randbytes(n)
            img.write(off, data)
            model[off:off + n] = data
            if i % 16 == 0:     # reading back mid-way, through the cache
                o = rnd.randrange(size)
                m = min(size - o, 2 * cs)
                assert img.read(o, m) == bytes(model[o:o + m])
        img.flush()


def _compare(tmp_path, img, model, fmt='qcow2'):
    ref = tmp_path / 'model.raw'
    ref.write_bytes(bytes(model))
    if fmt == 'qcow2':
        qemu_check(img)
    qemu_img('compare', '-f', fmt, '-F', 'raw', img, ref)
    assert vdsk_all(vdsk, img) == bytes(model)


@pytest.mark.parametrize('cs', [512, 4096, 65536, 2 * MiB])
def test_random_writes_fresh_image(tmp_path, cs):
    size = 6 * MiB + 1234 * 512 if cs < 2 * MiB else 9 * MiB
    img = tmp_path / 'img.qcow2'
    vdsk.create(img, 'qcow2', size, cluster_size=cs)
    qemu_check(img)
    model = bytearray(size)
    _random_writes(img, model, cs, 120, seed=cs)
    _compare(tmp_path, img, model)
    q = qemu_info(img)
    assert q['cluster-size'] == cs and q['virtual-size'] == size
    assert q['format-specific']['data']['compat'] == '1.1'


def test_refcount_table_growth(tmp_path):
    """512-byte clusters: one refcount table cluster covers 8 MiB of file,
    so 20 MiB of data moves the refcount table several times."""
    size = 64 * MiB
    img = tmp_path / 'img.qcow2'
    vdsk.create(img, 'qcow2', size, cluster_size=512)
    before = qemu_info(img)
    rnd = random.Random(5)
    model = bytearray(size)
    with vdsk.open(img) as d:
        for off in range(0, 20 * MiB, MiB):
            data = rnd.randbytes(MiB)
            pos = off * 3 + 777
            d.write(pos, data)
            model[pos:pos + MiB] = data
    _compare(tmp_path, img, model)
    assert os.path.getsize(img) > 20 * MiB
    assert before['virtual-size'] == size


@pytest.mark.parametrize('backing_fmt', ['raw', 'qcow2'])
def test_overlay_over_backing(tmp_path, backing_fmt):
    base = tmp_path / ('base.' + backing_fmt)
    rnd = random.Random(11)
    base_data = rnd.randbytes(3 * MiB + 512)
    raw = tmp_path / 'base-src.raw'
    raw.write_bytes(base_data)
    if backing_fmt == 'raw':
        os.rename(raw, base)
    else:
        qemu_img('convert', '-f', 'raw', '-O', 'qcow2', '-o',
                 'cluster_size=4096', raw, base)
    top = tmp_path / 'top.qcow2'
    size = 5 * MiB      # bigger than the backing file
    vdsk.create(top, 'qcow2', size, backing=base.name,
                backing_fmt=backing_fmt)
    info = vdsk.info(top)
    assert info['backing_file'] == base.name
    assert info['backing_format'] == backing_fmt
    q = qemu_info(top)
    assert q['backing-filename'] == base.name
    assert q['backing-filename-format'] == backing_fmt
    model = bytearray(size)
    model[:len(base_data)] = base_data
    _random_writes(top, model, 65536, 80, seed=2, max_len=100000)
    _compare(tmp_path, top, model)
    # the backing file was not touched
    if backing_fmt == 'raw':
        assert base.read_bytes() == base_data


def test_overlay_default_size_and_probed_format(tmp_path):
    base = tmp_path / 'base.qcow2'
    qemu_img('create', '-f', 'qcow2', base, 7 * MiB)
    top = tmp_path / 'top.qcow2'
    vdsk.create(str(top), 'qcow2', 0, backing=str(base))
    info = vdsk.info(top)
    assert info['virtual_size'] == 7 * MiB
    assert info['backing_format'] == 'qcow2'
    assert info['backing_file'] == str(base)
    qemu_check(top)


@needs_qemu_io
# v2 (compat 0.10) images have 16-bit refcounts only
@pytest.mark.parametrize('compat,bits', [('0.10', 16)] + [
    ('1.1', bits) for bits in (1, 2, 4, 8, 16, 32, 64)])
def test_writes_into_qemu_images(tmp_path, bits, compat):
    size = 3 * MiB
    img = tmp_path / 'img.qcow2'
    qemu_img('create', '-f', 'qcow2', '-o',
             'compat=%s,refcount_bits=%d,cluster_size=4096' % (compat, bits),
             img, size)
    cmds = ['write -P 0x41 0 600k', 'write -P 0x42 2M 64k']
    if compat == '1.1':
        cmds += ['write -z 128k 64k', 'write -z 2500k 64k']
    qemu_io(img, 'qcow2', *cmds)
    model = bytearray(size)
    model[0:600 * 1024] = b'\x41' * (600 * 1024)
    model[2 * MiB:2 * MiB + 65536] = b'\x42' * 65536
    if compat == '1.1':
        model[128 * 1024:192 * 1024] = bytes(65536)
    # cover allocated, zero (preallocated and not) and unallocated clusters
    with vdsk.open(img) as d:
        for off, n in [(100, 5000), (130 * 1024 + 7, 9000),
                       (2500 * 1024 + 1, 3), (1 * MiB, 300000),
                       (2 * MiB - 10, 20)]:
            data = bytes([(off + i) % 251 for i in range(n)])
            d.write(off, data)
            model[off:off + n] = data
    _compare(tmp_path, img, model)


def test_raw_create_write(tmp_path):
    img = tmp_path / 'disk.raw'
    vdsk.create(img, 'raw', 10 * MiB)
    assert os.path.getsize(img) == 10 * MiB
    assert vdsk.info(img)['actual_size'] < MiB      # sparse
    model = bytearray(10 * MiB)
    _random_writes(img, model, 65536, 40, seed=9)
    _compare(tmp_path, img, model, fmt='raw')
    q = qemu_info(img)
    v = vdsk.info(img)
    assert v['format'] == 'raw' and v['cluster_size'] is None
    assert v['virtual_size'] == q['virtual-size']
    assert v['actual_size'] == q['actual-size']


def test_info_of_created_images_matches_qemu(tmp_path):
    base = tmp_path / 'b.raw'
    vdsk.create(base, 'raw', 2 * MiB)
    for cs in (512, 65536, 2 * MiB):
        img = tmp_path / ('o%d.qcow2' % cs)
        vdsk.create(img, 'qcow2', 3 * MiB + 512, backing='b.raw',
                    backing_fmt='raw', cluster_size=cs)
        with vdsk.open(img) as d:
            d.write(MiB, b'x' * 70000)
        q, v = qemu_info(img), vdsk.info(img)
        assert (v['format'], v['virtual_size'], v['cluster_size'],
                v['backing_file'], v['backing_format'], v['actual_size']) \
            == (q['format'], q['virtual-size'], q['cluster-size'],
                q['backing-filename'], q['backing-filename-format'],
                q['actual-size'])
        qemu_check(img)


def test_errors(tmp_path):
    img = tmp_path / 'img.qcow2'
    vdsk.create(img, 'qcow2', MiB)
    with vdsk.open(img, readonly=True) as d:
        with pytest.raises(vdsk.VdskError) as e:
            d.write(0, b'x')
        assert e.value.errno == errno.EROFS
    with vdsk.open(img) as d:
        with pytest.raises(vdsk.VdskError) as e:
            d.read(MiB - 1, 2)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(vdsk.VdskError):
            d.write(MiB, b'x')
    d.close()   # twice is fine
    with pytest.raises(vdsk.VdskError) as e:
        d.read(0, 1)
    assert e.value.errno == errno.EBADF
    with pytest.raises(vdsk.VdskError) as e:
        vdsk.create(tmp_path / 'x', 'vhdx', MiB)
    assert e.value.errno == errno.ENOTSUP
    with pytest.raises(vdsk.VdskError):
        vdsk.create(tmp_path / 'x', 'raw', MiB, backing='img.qcow2')
    with pytest.raises(vdsk.VdskError):
        vdsk.create(tmp_path / 'x', 'qcow2', MiB, cluster_size=3000)
    with pytest.raises(vdsk.VdskError) as e:
        vdsk.create(tmp_path / 'x', 'qcow2', MiB, backing='missing')
    assert e.value.errno == errno.ENOENT
    assert not (tmp_path / 'x').exists()
    # an image cannot be created on top of its own backing file
    with pytest.raises(vdsk.VdskError) as e:
        vdsk.create(img, 'qcow2', MiB, backing=str(img))
    assert e.value.errno == errno.ELOOP
    assert vdsk.info(img)['format'] == 'qcow2'


def test_backing_loop_and_depth(tmp_path):
    a, b = tmp_path / 'a.qcow2', tmp_path / 'b.qcow2'
    vdsk.create(a, 'qcow2', MiB)
    vdsk.create(b, 'qcow2', MiB, backing='a.qcow2')
    qemu_img('rebase', '-u', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2',
             a)
    for p in (a, b):
        with pytest.raises(vdsk.VdskError) as e:
            vdsk.open(p, readonly=True)
        assert e.value.errno == errno.ELOOP
        assert 'loop' in str(e.value)
        vdsk.info(p)        # info does not follow the chain

    prev = tmp_path / 'l0.raw'
    vdsk.create(prev, 'raw', MiB)
    for i in range(1, 40):
        cur = tmp_path / ('l%d.qcow2' % i)
        qemu_img('create', '-f', 'qcow2', '-u', '-b', prev.name, '-F',
                 'raw' if i == 1 else 'qcow2', cur, MiB)
        prev = cur
    with pytest.raises(vdsk.VdskError) as e:
        vdsk.open(prev, readonly=True)
    assert e.value.errno == errno.ELOOP
    with vdsk.open(tmp_path / 'l10.qcow2', readonly=True) as d:
        assert d.read(0, 16) == bytes(16)


@pytest.mark.parametrize('bits', [1, 64])
def test_refcount_table_growth_in_qemu_image(tmp_path, bits):
    """Narrow and wide refcounts with 512-byte clusters: appending 8 MiB
    moves qemu's refcount table and adds many refcount blocks."""
    size = 64 * MiB
    img = tmp_path / 'img.qcow2'
    qemu_img('create', '-f', 'qcow2', '-o',
             'cluster_size=512,refcount_bits=%d' % bits, img, size)
    rnd = random.Random(bits)
    model = bytearray(size)
    data = rnd.randbytes(8 * MiB)
    with vdsk.open(img) as d:
        d.write(12345, data)
    model[12345:12345 + len(data)] = data
    _compare(tmp_path, img, model)
