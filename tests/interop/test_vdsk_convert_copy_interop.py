"""vdsk convert's two copy paths against qemu-img: the default buffered
one (pread into the job buffer, zero granules found in memory, runs of
data granules written into runs of clusters the destination allocates)
and the in-kernel one (copy_range=True, vdsktool -R: copy_file_range from
the source's plain extents, zero granules found by probing): every
result must compare equal with qemu-img compare, pass qemu-img check, and
leave zero granules unallocated.  Cluster sizes from 4 KiB (many L2
tables and refcount blocks per run) to 2 MiB, unaligned data, a last
partial cluster, qcow2 sources whose extents are not contiguous on the
host, a source beyond one L2 table's reach, sources on another file
system (where copy_file_range fails with EXDEV and the copy goes through
a buffer), the compressed path and both cache modes."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from vdsk_qemu_helpers import needs_qemu_img
from vdsk_qemu_helpers import needs_qemu_io
from vdsk_qemu_helpers import qemu_check
from vdsk_qemu_helpers import qemu_img
from vdsk_qemu_helpers import qemu_info
from vdsk_qemu_helpers import qemu_io

from nova_bhyve.storage import vdsk

pytestmark = [needs_qemu_img, needs_qemu_io]

KiB, MiB = 1 << 10, 1 << 20
SIZE = 40 * MiB + 12 * KiB          # not a multiple of any cluster size

# data runs across many L2 tables / refcount blocks at 4 KiB clusters,
# unaligned pieces, data that is all zeroes, and a granule whose only
# non-zero byte is far past the probe
WRITES = ['write -P 0x11 0 20M',
          'write -P 0x22 21M 4k',
          'write -P 0x33 22540k 100k',          # 22 MiB + 12 KiB
          'write -P 0 24M 1M',                  # zeroes stored as data
          'write -P 0x44 26M 1M',
          'write -P 0 27M 64k',
          'write -P 0x55 28M 8k',
          'write -P 0 28680k 64k',              # 28 MiB + 8 KiB
          'write -P 0x66 40M 12k']              # the partial last cluster
LATE_BYTE = 27 * MiB + 60 * KiB + 4095     # alone in zeroes after 26 MiB+1M


def qmap(path, fmt):
    return json.loads(qemu_img('map', '-f', fmt, '--output=json',
                               path).stdout)


def data_at(path, fmt, off):
    for e in qmap(path, fmt):
        if e['start'] <= off < e['start'] + e['length']:
            return e['data']
    raise AssertionError('offset %d not mapped' % off)


def compare(a, b, fa, fb):
    p = qemu_img('compare', '-f', fa, '-F', fb, a, b, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def make_raw(path):
    qemu_img('create', '-f', 'raw', path, SIZE)
    qemu_io(path, 'raw', *WRITES)
    with open(path, 'r+b') as f:
        f.seek(LATE_BYTE)
        f.write(b'\x77')
    return path


def check_sparse(dst, fmt, granule):
    """The granules that hold only zeroes are not data in dst."""
    zero = [24 * MiB + 512 * KiB, 28 * MiB + 96 * KiB, 30 * MiB]
    if granule == 4 * KiB:
        zero += [27 * MiB + 8 * KiB, 28 * MiB + 40 * KiB]
    for off in zero:
        assert not data_at(dst, fmt, off), off
    # the late byte's granule is data, and so is everything around it
    # up to the granule boundary
    assert data_at(dst, fmt, LATE_BYTE - LATE_BYTE % granule)


@pytest.mark.parametrize('cluster', [4 * KiB, 64 * KiB, 512 * KiB,
                                     2 * MiB])
@pytest.mark.parametrize('workers', [1, 2, 4])
@pytest.mark.parametrize('copy_range', [False, True])
def test_raw_to_qcow2_cluster_sizes(tmp_path, cluster, workers, copy_range):
    src = make_raw(str(tmp_path / 'src.raw'))
    dst = str(tmp_path / 'dst.qcow2')
    vdsk.convert(src, dst, src_fmt='raw', dst_fmt='qcow2',
                 cluster_size=cluster, workers=workers, buf_size=MiB,
                 copy_range=copy_range)
    compare(src, dst, 'raw', 'qcow2')
    qemu_check(dst)
    info = qemu_info(dst)
    assert info['virtual-size'] == SIZE
    assert info['cluster-size'] == cluster
    if cluster <= 64 * KiB:
        check_sparse(dst, 'qcow2', cluster)


@pytest.mark.parametrize('src_cluster', [4 * KiB, 64 * KiB, 2 * MiB])
@pytest.mark.parametrize('dst_fmt,dst_cluster', [
    ('raw', None), ('qcow2', 4 * KiB), ('qcow2', 64 * KiB)])
@pytest.mark.parametrize('copy_range', [False, True])
def test_qcow2_source(tmp_path, src_cluster, dst_fmt, dst_cluster,
                      copy_range):
    """A qcow2 source written out of order: its guest runs are split over
    host extents that are not contiguous."""
    raw = make_raw(str(tmp_path / 'src.raw'))
    src = str(tmp_path / 'src.qcow2')
    qemu_img('create', '-f', 'qcow2', '-o', 'cluster_size=%d' % src_cluster,
             src, SIZE)
    # back to front, so consecutive guest clusters are far apart on host
    qemu_io(src, 'qcow2', *reversed(WRITES))
    qemu_io(src, 'qcow2', 'write -P 0x77 %d 1' % LATE_BYTE)
    compare(raw, src, 'raw', 'qcow2')
    dst = str(tmp_path / ('dst.' + dst_fmt))
    vdsk.convert(src, dst, src_fmt='qcow2', dst_fmt=dst_fmt,
                 cluster_size=dst_cluster, copy_range=copy_range)
    compare(src, dst, 'qcow2', dst_fmt)
    if dst_fmt == 'qcow2':
        qemu_check(dst)
    if src_cluster <= 64 * KiB:
        check_sparse(dst, dst_fmt, dst_cluster or 4 * KiB)


@pytest.mark.parametrize('copy_range', [False, True])
def test_raw_to_raw_stays_sparse(tmp_path, copy_range):
    src = make_raw(str(tmp_path / 'src.raw'))
    dst = str(tmp_path / 'dst.raw')
    vdsk.convert(src, dst, src_fmt='raw', dst_fmt='raw',
                 copy_range=copy_range)
    compare(src, dst, 'raw', 'raw')
    check_sparse(dst, 'raw', 4 * KiB)
    assert os.stat(dst).st_blocks * 512 <= os.stat(src).st_blocks * 512


def test_mixed_extents_compressed_and_backing(tmp_path):
    """Plain, compressed and backing-file ranges in one source: the plain
    ones take the in-kernel copy, the others the buffer."""
    base = str(tmp_path / 'base.raw')
    qemu_img('create', '-f', 'raw', base, SIZE)
    qemu_io(base, 'raw', 'write -P 0x21 0 8M', 'write -P 0x23 30M 2M')
    comp_src = str(tmp_path / 'c.raw')
    qemu_img('create', '-f', 'raw', comp_src, SIZE)
    qemu_io(comp_src, 'raw', 'write -P 0x31 4M 4M')
    mid = str(tmp_path / 'mid.qcow2')
    qemu_img('convert', '-c', '-f', 'raw', '-O', 'qcow2', comp_src, mid)
    qemu_img('rebase', '-u', '-b', base, '-F', 'raw', '-f', 'qcow2', mid)
    top = str(tmp_path / 'top.qcow2')
    qemu_img('create', '-f', 'qcow2', '-b', mid, '-F', 'qcow2', top)
    qemu_io(top, 'qcow2', 'write -P 0x41 6M 4M', 'write -P 0x43 31M 64k')
    for fmt in ('raw', 'qcow2'):
        dst = str(tmp_path / ('flat.' + fmt))
        vdsk.convert(top, dst, dst_fmt=fmt)
        compare(top, dst, 'qcow2', fmt)
        if fmt == 'qcow2':
            qemu_check(dst)
        assert 'backing-filename' not in qemu_info(dst)


def test_source_on_another_file_system(tmp_path):
    """/dev/shm (tmpfs) to tmp_path: copy_file_range between file systems
    fails with EXDEV and vdsk_copy_file() copies through a buffer."""
    shm = '/dev/shm'
    if not os.path.isdir(shm) or \
            os.stat(shm).st_dev == os.stat(str(tmp_path)).st_dev:
        pytest.skip('needs /dev/shm on a file system of its own')
    src = os.path.join(shm, 'vdsk-convert-xfs-%d.raw' % os.getpid())
    try:
        make_raw(src)
        for fmt in ('raw', 'qcow2'):
            dst = str(tmp_path / ('dst.' + fmt))
            vdsk.convert(src, dst, src_fmt='raw', dst_fmt=fmt)
            compare(src, dst, 'raw', fmt)
            if fmt == 'qcow2':
                qemu_check(dst)
            check_sparse(dst, fmt, 64 * KiB if fmt == 'qcow2' else 4 * KiB)
    finally:
        os.unlink(src)


@pytest.mark.parametrize('cluster', [4 * KiB, 64 * KiB])
def test_compressed_path_unchanged(tmp_path, cluster):
    src = make_raw(str(tmp_path / 'src.raw'))
    dst = str(tmp_path / 'dst.qcow2')
    vdsk.convert(src, dst, src_fmt='raw', dst_fmt='qcow2', compress=True,
                 cluster_size=cluster)
    compare(src, dst, 'raw', 'qcow2')
    qemu_check(dst)
    chk = json.loads(qemu_img('check', '--output=json', dst).stdout)
    # the 0x11..0x66 patterns compress: every data cluster is compressed
    assert chk['compressed-clusters'] == chk['allocated-clusters'] > 0


def test_no_flush_and_cli_cache_mode(tmp_path):
    src = make_raw(str(tmp_path / 'src.raw'))
    a = str(tmp_path / 'a.qcow2')
    vdsk.convert(src, a, src_fmt='raw', dst_fmt='qcow2', flush=False)
    compare(src, a, 'raw', 'qcow2')
    qemu_check(a)
    b = str(tmp_path / 'b.qcow2')
    # the nova_bhyve this test imports (the installed one in CI): the
    # environment as it is, run from elsewhere than the source tree
    env = dict(os.environ)
    for mode in ('unsafe', 'writeback'):
        p = subprocess.run([sys.executable, '-m', 'nova_bhyve.cmd.vdsk',
                            'convert', '-t', mode, '-f', 'raw', '-O',
                            'qcow2', src, b], capture_output=True,
                           text=True, env=env, cwd=str(tmp_path))
        assert p.returncode == 0, p.stderr
        compare(a, b, 'qcow2', 'qcow2')
    p = subprocess.run([sys.executable, '-m', 'nova_bhyve.cmd.vdsk',
                        'convert', '-t', 'none', src, b],
                       capture_output=True, text=True, env=env,
                       cwd=str(tmp_path))
    assert p.returncode != 0 and 'invalid choice' in p.stderr


NATIVE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'native')


def strace_convert(tmp_path, src, dst, *args):
    """Run vdsktool's convert under strace; return the trace lines."""
    if shutil.which('strace') is None:
        pytest.skip('needs strace (tools/setup-host installs it)')
    p = subprocess.run(['make', '-s', '-C', NATIVE, '_build/vdsktool'],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    log = str(tmp_path / 'strace.log')
    p = subprocess.run(['strace', '-f', '-o', log, '-e',
                        'trace=copy_file_range,pwrite64,fsync,'
                        'sync_file_range',
                        os.path.join(NATIVE, '_build', 'vdsktool'), 'convert']
                       + list(args) + [src, dst],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with open(log) as f:
        return f.read().splitlines()


def results(lines, call):
    """[(return value, errno name or None)] of each finished call."""
    out = []
    for ln in lines:
        if (call + '(' not in ln and '<... %s resumed>' % call not in ln) \
                or 'unfinished' in ln:
            continue
        m = re.search(r'\) += (-?\d+)(?: (E[A-Z]+))?', ln)
        assert m, ln
        out.append((int(m.group(1)), m.group(2)))
    return out


def test_data_is_copied_in_the_kernel(tmp_path):
    """The 20 MiB run and the others go through copy_file_range into
    runs of clusters; pwrite only writes metadata and partial clusters."""
    src = make_raw(str(tmp_path / 'src.raw'))
    dst = str(tmp_path / 'dst.qcow2')
    lines = strace_convert(tmp_path, src, dst, '-R', '-f', 'raw', '-O',
                           'qcow2')
    compare(src, dst, 'raw', 'qcow2')
    qemu_check(dst)
    copied = sum(n for n, _ in results(lines, 'copy_file_range'))
    assert copied >= 20 * MiB, lines
    # pwrite: only metadata (creation, tables, entries) and the probed
    # granules that are partial clusters
    written = sum(n for n, _ in results(lines, 'pwrite64'))
    assert written < MiB, written
    assert results(lines, 'fsync')[-1] == (0, None)


def test_cross_file_system_copy_falls_back(tmp_path):
    """copy_file_range from tmpfs to tmp_path's file system fails with
    EXDEV: the same data then goes through pread/pwrite."""
    shm = '/dev/shm'
    if not os.path.isdir(shm) or \
            os.stat(shm).st_dev == os.stat(str(tmp_path)).st_dev:
        pytest.skip('needs /dev/shm on a file system of its own')
    src = os.path.join(shm, 'vdsk-convert-xfs-%d.raw' % os.getpid())
    try:
        make_raw(src)
        dst = str(tmp_path / 'dst.qcow2')
        lines = strace_convert(tmp_path, src, dst, '-R', '-f', 'raw',
                               '-O', 'qcow2')
        compare(src, dst, 'raw', 'qcow2')
        qemu_check(dst)
    finally:
        os.unlink(src)
    cfr = results(lines, 'copy_file_range')
    assert cfr and all(r == (-1, 'EXDEV') for r in cfr), cfr
    assert sum(n for n, _ in results(lines, 'pwrite64')) >= 20 * MiB


@pytest.mark.parametrize('copy_range', [[], ['-R']])
def test_write_back_starts_during_the_copy(tmp_path, copy_range):
    """Past 64 MiB of output, convert starts the write-back
    (sync_file_range) before its final fsync."""
    src = str(tmp_path / 'big.raw')
    qemu_img('create', '-f', 'raw', src, 160 * MiB)
    qemu_io(src, 'raw', 'write -P 0x5a 0 70M', 'write -P 0x5b 100M 30M')
    dst = str(tmp_path / 'big.qcow2')
    lines = strace_convert(tmp_path, src, dst, *(copy_range + [
        '-f', 'raw', '-O', 'qcow2']))
    compare(src, dst, 'raw', 'qcow2')
    qemu_check(dst)
    assert results(lines, 'sync_file_range'), lines[-20:]
    assert results(lines, 'fsync')[-1] == (0, None)


# 2 GiB virtual (beyond the reach of one L2 table at 64 KiB clusters:
# 512 MiB), data runs of 1 MiB and unaligned pieces between holes, the
# last cluster partial
BIG = 2 * 1024 * MiB + 20 * KiB
BIG_WRITES = ['write -P 0x11 0 3M', 'write -P 0x22 511M 2M',
              'write -P 0x33 1025M 1M', 'write -P 0x44 1536M 4k',
              'write -P 0x55 1600M 100k', 'write -P 0 1700M 1M',
              'write -P 0x66 %d 20k' % (2 * 1024 * MiB)]


def test_default_path_is_buffered_and_batched(tmp_path):
    """Without -R: no copy_file_range, no probes; the data goes out in one
    pwrite per run of clusters, with one refcount write and one L2 write
    per run (the first refcount of an existing refcount block is not
    written on its own); the result is qemu-img's in both cache modes."""
    src = str(tmp_path / 'big.raw')
    qemu_img('create', '-f', 'raw', src, BIG)
    qemu_io(src, 'raw', *BIG_WRITES)
    fsyncs = {}
    for mode in ('writeback', 'unsafe'):
        dst = str(tmp_path / ('big-%s.qcow2' % mode))
        lines = strace_convert(tmp_path, src, dst, '-t', mode, '-f', 'raw',
                               '-O', 'qcow2')
        compare(src, dst, 'raw', 'qcow2')
        qemu_check(dst)
        assert not results(lines, 'copy_file_range')
        pw = results(lines, 'pwrite64')
        # 6 MiB in 1-3 MiB runs, the small pieces as whole clusters
        assert sum(n for n, _ in pw if n >= MiB) >= 6 * MiB, pw
        # 7 runs of data: creation (a handful), per run about 3 writes
        # (refcounts, data, L2 entries), new L2 tables and L1 entries
        assert len(pw) < 60, len(pw)
        fsyncs[mode] = len(results(lines, 'fsync'))
        # the 1 MiB of zeroes stored as data is not allocated
        assert not data_at(dst, 'qcow2', 1700 * MiB)
        assert data_at(dst, 'qcow2', 2 * 1024 * MiB)
        os.unlink(dst)
    # creation syncs either way; only writeback syncs the result
    assert fsyncs['writeback'] == fsyncs['unsafe'] + 1, fsyncs
