"""vdsk_convert() through the ASan+UBSan build of vdsktool: the default
buffered copy and the in-kernel one (-R: copy_file_range into cluster
runs, probed zero granules, partial clusters through a buffer) with 1-4
workers and several cluster sizes, the buffered path for compressed
output and backing chains, and bad input; fails on any sanitizer report.
qemu-img is the oracle for the results."""
import os
import shutil
import subprocess

import pytest
from test_vdsk_sanitizers import cli  # noqa: F401 - fixture
from test_vdsk_sanitizers import Runner

KiB, MiB = 1 << 10, 1 << 20

pytestmark = pytest.mark.skipif(shutil.which('qemu-img') is None,
                                reason='needs qemu-img')


def same(a, b, fa, fb):
    p = subprocess.run(['qemu-img', 'compare', '-f', fa, '-F', fb, a, b],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def qcheck(path):
    p = subprocess.run(['qemu-img', 'check', path], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def make_source(run, path):
    """Data runs over several L2 tables at 4 KiB clusters, unaligned
    pieces, zeroes stored as data, a late non-zero byte."""
    run('create', '-f', 'raw', path, str(12 * MiB + 4 * KiB))
    for off, n, byte in ((0, 5 * MiB, 0x11), (5 * MiB + 4 * KiB, 8 * KiB,
                                              0x22),
                         (6 * MiB, 256 * KiB, 0), (7 * MiB, MiB, 0x33),
                         (12 * MiB, 4 * KiB, 0x44)):
        run('write', '-f', 'raw', path, str(off), data=bytes([byte]) * n)
    run('write', '-f', 'raw', path, str(6 * MiB + 200 * KiB + 17),
        data=b'\x55')


@pytest.mark.parametrize('cluster', ['4K', '64K', '2M'])
@pytest.mark.parametrize('workers', ['1', '4'])
@pytest.mark.parametrize('path', [[], ['-R']], ids=['buffered', 'kernel'])
def test_convert_copy_path(cli, tmp_path, cluster, workers,  # noqa: F811
                           path):
    run = Runner(cli)
    src = str(tmp_path / 'src.raw')
    make_source(run, src)
    q = str(tmp_path / 'dst.qcow2')
    run('convert', *path, '-f', 'raw', '-O', 'qcow2', '-o',
        'cluster_size=' + cluster, '-m', workers, '-B', '256K', src, q)
    same(src, q, 'raw', 'qcow2')
    qcheck(q)
    run('check', q)
    back = str(tmp_path / 'back.raw')
    run('convert', *path, '-f', 'qcow2', '-O', 'raw', '-m', workers, q, back)
    same(src, back, 'raw', 'raw')
    q2 = str(tmp_path / 'again.qcow2')
    run('convert', *path, '-f', 'qcow2', '-O', 'qcow2', '-o',
        'cluster_size=64K', q, q2)
    same(src, q2, 'raw', 'qcow2')
    qcheck(q2)


def test_convert_buffered_paths_and_errors(cli, tmp_path):  # noqa: F811
    run = Runner(cli)
    src = str(tmp_path / 'src.raw')
    make_source(run, src)
    comp = str(tmp_path / 'comp.qcow2')
    run('convert', '-f', 'raw', '-O', 'qcow2', '-c', src, comp)
    same(src, comp, 'raw', 'qcow2')
    qcheck(comp)
    top = str(tmp_path / 'top.qcow2')
    run('create', '-f', 'qcow2', '-b', comp, '-F', 'qcow2', top)
    run('write', '-f', 'qcow2', top, str(3 * MiB + 512), data=b'\x66' * 70000)
    flat = str(tmp_path / 'flat.qcow2')
    run('convert', '-O', 'qcow2', top, flat)
    same(top, flat, 'qcow2', 'qcow2')
    qcheck(flat)
    run('convert', '-O', 'vmdk', top, str(tmp_path / 'x.vmdk'))
    same(top, str(tmp_path / 'x.vmdk'), 'qcow2', 'vmdk')
    # a qcow2 whose L2 entry points past the end of its file
    bad = str(tmp_path / 'bad.qcow2')
    subprocess.run(['qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2', src,
                    bad], check=True)
    subprocess.run(['truncate', '-s', str(2 * MiB), bad], check=True)
    p = run('convert', '-f', 'qcow2', '-O', 'qcow2', bad,
            str(tmp_path / 'out.qcow2'), ok=False)
    assert b'end of' in p.stderr, p.stderr
    run('convert', '-O', 'qcow2', str(tmp_path / 'missing'),
        str(tmp_path / 'o2'), ok=False)


@pytest.mark.parametrize('dst_fmt,cluster', [('qcow2', '4096'),
                                             ('qcow2', '65536'),
                                             ('raw', '0')])
def test_convert_workers_under_tsan(tmp_path, dst_fmt, cluster):
    """8 workers on 64 KiB jobs race for the same L2 tables, refcount
    blocks and partial clusters: ThreadSanitizer must stay silent."""
    native = cli_native()
    p = subprocess.run(['make', '-C', native, 'tsan'], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    run = Runner(os.path.join(native, '_build', 'vdsktool'))
    subprocess.run(['make', '-s', '-C', native, '_build/vdsktool'],
                   check=True)
    src = str(tmp_path / 'src.raw')
    make_source(run, src)
    dst = str(tmp_path / ('dst.' + dst_fmt))
    env = dict(os.environ, TSAN_OPTIONS='halt_on_error=1')
    p = subprocess.run([os.path.join(native, '_build', 'tsan', 'stress'),
                        '--convert', src, dst, dst_fmt, '8', cluster],
                       capture_output=True, text=True, env=env, timeout=300)
    assert 'ThreadSanitizer' not in p.stderr, p.stderr[-6000:]
    assert p.returncode == 0 and 'stress: ok' in p.stdout, p.stderr
    same(src, dst, 'raw', dst_fmt)
    if dst_fmt == 'qcow2':
        qcheck(dst)


def cli_native():
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), 'native')
