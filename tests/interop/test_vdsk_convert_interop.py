"""vdsk convert / commit / rebase / block status against qemu-img: the
results must compare equal with qemu-img compare, pass qemu-img check, and
convert must stay sparse (the destination allocates no more than the
source's data)."""
import json
import os

import pytest
from vdsk_qemu_helpers import needs_qemu_img
from vdsk_qemu_helpers import needs_qemu_io
from vdsk_qemu_helpers import qemu_check
from vdsk_qemu_helpers import qemu_img
from vdsk_qemu_helpers import qemu_info
from vdsk_qemu_helpers import qemu_io

from nova_bhyve.storage import vdsk

pytestmark = [needs_qemu_img, needs_qemu_io]

MiB = 1 << 20
SIZE = 64 * MiB


def qmap(path, fmt):
    return json.loads(qemu_img('map', '-f', fmt, '--output=json',
                               path).stdout)


def data_bytes(path, fmt):
    """Bytes qemu-img map reports as data (in the whole chain)."""
    return sum(e['length'] for e in qmap(path, fmt) if e['data'])


def allocated(path):
    return os.stat(path).st_blocks * 512


def compare(a, b, fa, fb):
    p = qemu_img('compare', '-f', fa, '-F', fb, a, b, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


WRITES = ['write -P 0x11 0 64k', 'write -P 0x22 1M 3M',
          'write -P 0x33 10000k 12k', 'write -z 20M 2M',
          'write -P 0 30M 1M',             # data that is all zeroes
          'write -P 0x44 63M 1M']


@pytest.fixture(params=['raw', 'qcow2'])
def source(request, tmp_path):
    fmt = request.param
    path = str(tmp_path / ('src.' + fmt))
    qemu_img('create', '-f', fmt, path, SIZE)
    qemu_io(path, fmt, *WRITES)
    return path, fmt


@pytest.mark.parametrize('dst_fmt', ['raw', 'qcow2'])
def test_convert_matches_and_is_sparse(source, dst_fmt, tmp_path):
    src, sfmt = source
    dst = str(tmp_path / ('dst.' + dst_fmt))
    vdsk.convert(src, dst, src_fmt=sfmt, dst_fmt=dst_fmt)
    compare(src, dst, sfmt, dst_fmt)
    assert qemu_info(dst)['virtual-size'] == SIZE
    src_data = data_bytes(src, sfmt)
    # the 1 MiB of written zeroes is data in the source, not in the copy
    # (qcow2 rounds the 12 KiB write up to a 64 KiB cluster)
    assert data_bytes(dst, dst_fmt) <= src_data - MiB + 64 * 1024
    if dst_fmt == 'qcow2':
        qemu_check(dst)
        assert allocated(dst) <= src_data + MiB      # + metadata
    else:
        assert allocated(dst) <= src_data


@pytest.mark.parametrize('workers', [1, 4])
def test_convert_flattens_a_chain(tmp_path, workers):
    base = str(tmp_path / 'base.raw')
    top = str(tmp_path / 'top.qcow2')
    qemu_img('create', '-f', 'raw', base, SIZE)
    qemu_io(base, 'raw', 'write -P 0x55 0 8M', 'write -P 0x66 40M 1M')
    qemu_img('create', '-f', 'qcow2', '-b', base, '-F', 'raw', top)
    qemu_io(top, 'qcow2', 'write -P 0x77 4M 8M', 'write -z 40M 512k')
    for fmt in ('raw', 'qcow2'):
        dst = str(tmp_path / ('flat.' + fmt))
        vdsk.convert(top, dst, dst_fmt=fmt, workers=workers,
                     buf_size=MiB)
        compare(top, dst, 'qcow2', fmt)
        assert 'backing-filename' not in qemu_info(dst)
        assert data_bytes(dst, fmt) <= 12 * MiB + 512 * 1024


def test_block_status_matches_qemu_map(tmp_path):
    path = str(tmp_path / 'm.qcow2')
    qemu_img('create', '-f', 'qcow2', path, SIZE)
    qemu_io(path, 'qcow2', *WRITES)
    with vdsk.open(path, readonly=True) as img:
        runs = list(img.map())
    assert sum(n for _, n, _ in runs) == SIZE

    def status_at(off):
        for o, n, st in runs:
            if o <= off < o + n:
                return st
    for e in qmap(path, 'qcow2'):
        mid = e['start'] + e['length'] // 2
        want = ('data' if e['data'] else
                'zero' if e['present'] else 'unallocated')
        assert status_at(mid) == want, (e, runs)


@pytest.mark.parametrize('base_fmt', ['raw', 'qcow2'])
def test_commit(tmp_path, base_fmt):
    base = str(tmp_path / ('base.' + base_fmt))
    top = str(tmp_path / 'top.qcow2')
    qemu_img('create', '-f', base_fmt, base, SIZE)
    qemu_io(base, base_fmt, 'write -P 0x11 0 16M')
    qemu_img('create', '-f', 'qcow2', '-b', os.path.basename(base),
             '-F', base_fmt, top)
    qemu_io(top, 'qcow2', 'write -P 0x22 1M 100k', 'write -z 8M 1M',
            'write -P 0x33 50M 2M')
    before = data_bytes(top, 'qcow2')
    vdsk.commit(top)
    compare(base, top, base_fmt, 'qcow2')
    if base_fmt == 'qcow2':
        qemu_check(base)
    assert data_bytes(top, 'qcow2') == before        # overlay unchanged


def test_commit_without_backing_fails(tmp_path):
    path = str(tmp_path / 'lone.qcow2')
    vdsk.create(path, 'qcow2', MiB)
    with pytest.raises(vdsk.VdskError):
        vdsk.commit(path)


@pytest.fixture
def chain(tmp_path):
    b1 = str(tmp_path / 'b1.qcow2')
    b2 = str(tmp_path / 'b2.raw')
    top = str(tmp_path / 'top.qcow2')
    qemu_img('create', '-f', 'qcow2', b1, SIZE)
    qemu_io(b1, 'qcow2', 'write -P 0x11 0 4M', 'write -P 0x12 32M 100k')
    qemu_img('create', '-f', 'raw', b2, SIZE)
    qemu_io(b2, 'raw', 'write -P 0x11 0 2M', 'write -P 0x21 2M 1M',
            'write -P 0x22 48M 1M')
    qemu_img('create', '-f', 'qcow2', '-b', 'b1.qcow2', '-F', 'qcow2', top)
    qemu_io(top, 'qcow2', 'write -P 0x33 3M 64k')
    view = str(tmp_path / 'view.raw')
    qemu_img('convert', '-O', 'raw', top, view)
    return top, b2, view


def test_rebase_safe_keeps_the_view(chain):
    top, b2, view = chain
    vdsk.rebase(top, 'b2.raw', backing_fmt='raw')
    info = qemu_info(top)
    assert info['backing-filename'] == 'b2.raw'
    assert info['backing-filename-format'] == 'raw'
    compare(top, view, 'qcow2', 'raw')
    qemu_check(top)
    # only what differs was copied: the top stays small
    assert data_bytes(top, 'qcow2') < 16 * MiB


def test_rebase_safe_to_no_backing(chain):
    top, _, view = chain
    vdsk.rebase(top, None)
    assert 'backing-filename' not in qemu_info(top)
    compare(top, view, 'qcow2', 'raw')
    qemu_check(top)


def test_rebase_unsafe_rewrites_the_header_only(chain, tmp_path):
    top, b2, _ = chain
    vdsk.rebase(top, 'b2.raw', backing_fmt='raw', unsafe=True)
    info = qemu_info(top)
    assert info['backing-filename'] == 'b2.raw'
    qemu_check(top)
    # the guest now sees b2 under the overlay's own 64 KiB
    expect = str(tmp_path / 'expect.raw')
    qemu_img('convert', '-f', 'raw', '-O', 'raw', b2, expect)
    qemu_io(expect, 'raw', 'write -P 0x33 3M 64k')
    compare(top, expect, 'qcow2', 'raw')
