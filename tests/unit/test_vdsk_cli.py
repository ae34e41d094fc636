"""The `vdsk` console script, run as a subprocess: every subcommand and
its exit status (qemu-img's where they overlap: check 0 clean, 2 corrupt,
3 leaks; 1 for errors), checked against qemu-img where it is installed."""
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from nova_bhyve.storage import vdsk

MiB = 1 << 20
SCRIPT = shutil.which('vdsk', path=os.path.dirname(sys.executable))
CMD = [SCRIPT] if SCRIPT else [sys.executable, '-m', 'nova_bhyve.cmd.vdsk']
QEMU_IMG = shutil.which('qemu-img')


def cli(*args, rc=0):
    p = subprocess.run(CMD + [str(a) for a in args], capture_output=True,
                       text=True, timeout=120)
    if rc is not None:
        assert p.returncode == rc, (p.returncode, p.stdout, p.stderr)
    return p


@pytest.fixture
def q(tmp_path):
    path = tmp_path / 'a.qcow2'
    cli('create', '-f', 'qcow2', path, '16M')
    with vdsk.open(str(path)) as img:
        img.write(MiB, b'\x5a' * 3 * 65536)
    return path


def test_create_and_info(tmp_path, q):
    p = cli('info', q)
    assert 'file format: qcow2' in p.stdout
    assert '16777216 bytes' in p.stdout
    info = json.loads(cli('info', '--json', q).stdout)
    assert info['format'] == 'qcow2' and info['virtual-size'] == 16 * MiB
    assert info['cluster-size'] == 65536
    top = tmp_path / 'top.qcow2'
    cli('create', '-f', 'qcow2', '-b', q.name, '-F', 'qcow2', top)
    info = json.loads(cli('info', '--output', 'json', top).stdout)
    assert info['backing-filename'] == q.name
    assert info['virtual-size'] == 16 * MiB
    cli('create', '-f', 'qcow2', '-o', 'cluster_size=4k',
        tmp_path / 'c.qcow2', '1M')
    assert vdsk.info(str(tmp_path / 'c.qcow2'))['cluster_size'] == 4096


def test_errors_exit_1(tmp_path):
    p = cli('info', tmp_path / 'missing', rc=1)
    assert p.stderr.startswith('vdsk: ')
    cli('create', '-f', 'qcow2', tmp_path / 'nosize', rc=1)
    cli('create', '-f', 'bogus', tmp_path / 'x', '1M', rc=1)
    assert cli('frobnicate', rc=None).returncode == 2     # usage


@pytest.mark.parametrize('fmt', ['raw', 'qcow2'])
def test_convert(tmp_path, q, fmt):
    dst = tmp_path / ('out.' + fmt)
    cli('convert', '-O', fmt, q, dst)
    assert vdsk.info(str(dst))['format'] == fmt
    with vdsk.open(str(dst)) as img:
        assert img.read(MiB, 3 * 65536) == b'\x5a' * 3 * 65536
        assert img.read(0, 4096) == bytes(4096)
    if QEMU_IMG:
        assert subprocess.run([QEMU_IMG, 'compare', str(q),
                               str(dst)]).returncode == 0
    cli('convert', '-f', fmt, '-O', 'raw', '-m', '3', dst,
        tmp_path / 'again.raw')


def test_convert_compressed(tmp_path):
    src = tmp_path / 'src.raw'
    with open(src, 'wb') as f:
        f.truncate(16 * MiB)
        f.seek(MiB)
        f.write(b'compressible text ' * 200000)      # ~3.4 MiB
        f.seek(9 * MiB + 4096)                       # not cluster aligned
        f.write(os.urandom(70000))
    plain, comp = tmp_path / 'p.qcow2', tmp_path / 'c.qcow2'
    cli('convert', '-O', 'qcow2', src, plain)
    cli('convert', '-c', '-O', 'qcow2', '-m', '3', src, comp)
    assert comp.stat().st_size < plain.stat().st_size // 3
    assert vdsk.check(str(comp))['leaks'] == 0
    with vdsk.open(str(comp)) as img, open(src, 'rb') as f:
        for off in (0, MiB, 9 * MiB, 15 * MiB):
            f.seek(off)
            assert img.read(off, MiB) == f.read(MiB)
    if QEMU_IMG:
        assert subprocess.run([QEMU_IMG, 'compare', str(src),
                               str(comp)]).returncode == 0
        q = subprocess.run([QEMU_IMG, 'check', '--output=json', str(comp)],
                           capture_output=True, text=True)
        assert q.returncode == 0, q.stdout
        assert json.loads(q.stdout).get('compressed-clusters', 0) > 0
    p = cli('convert', '-c', '-O', 'raw', src, tmp_path / 'x.raw', rc=1)
    assert 'qcow2' in p.stderr


def _leak(path, n=2):
    """Leak n clusters: refcount 1 past the end of the file."""
    b = path.read_bytes()
    cs = 1 << struct.unpack_from('>I', b, 20)[0]
    rt_off = struct.unpack_from('>Q', b, 48)[0]
    rb = struct.unpack_from('>Q', b, rt_off)[0]
    first = len(b) // cs
    with open(path, 'r+b') as f:
        f.truncate((first + n) * cs)
        for i in range(first, first + n):
            f.seek(rb + 2 * i)                  # 16-bit refcounts
            f.write(struct.pack('>H', 1))


def test_check(q):
    p = cli('check', q)
    assert 'No errors were found on the image.' in p.stdout
    _leak(q, 2)
    p = cli('check', q, rc=3)
    assert '2 leaked clusters were found' in p.stdout
    if QEMU_IMG:
        assert subprocess.run([QEMU_IMG, 'check', str(q)],
                              capture_output=True).returncode == 3
    p = cli('check', '-r', 'leaks', q)
    assert '2 leaked clusters' in p.stdout and 'repaired' in p.stdout
    assert 'No errors were found on the image.' in p.stdout
    cli('check', q)
    if QEMU_IMG:
        subprocess.run([QEMU_IMG, 'check', str(q)], check=True,
                       capture_output=True)
    with vdsk.open(str(q)) as img:
        assert img.read(MiB, 3 * 65536) == b'\x5a' * 3 * 65536


def test_check_corrupt_exit_2(tmp_path, q):
    b = bytearray(q.read_bytes())
    l1 = struct.unpack_from('>Q', b, 40)[0]
    l2 = struct.unpack_from('>Q', b, l1)[0] & 0x00fffffffffffe00
    # the first data cluster's L2 entry now points at a metadata cluster
    e = struct.unpack_from('>Q', b, l2 + 16 * 8)[0]
    assert e
    struct.pack_into('>Q', b, l2 + 16 * 8, (1 << 63) | 65536 * 2)
    q.write_bytes(bytes(b))
    assert cli('check', q, rc=2).stdout.count('errors were found') == 1


@pytest.mark.parametrize('result,rc', [
    ({'corruptions': 0, 'leaks': 0}, 0), ({'corruptions': 2}, 2),
    ({'corruptions': 0, 'leaks': 5}, 3), ({'corruptions': 1, 'leaks': 1}, 2),
    ({'corruptions': 0, 'leaks': 0, 'leaks_fixed': 4}, 0)])
def test_check_exit_codes(monkeypatch, capsys, q, result, rc):
    """The qemu-img exit codes for each outcome of vdsk.check()."""
    from nova_bhyve.cmd import vdsk as vdsk_cli
    calls = []
    full = dict.fromkeys(['corruptions', 'leaks', 'corruptions_fixed',
                          'leaks_fixed', 'allocated_clusters',
                          'total_clusters'], 0)
    full.update(result)
    monkeypatch.setattr(vdsk, 'check', lambda path, repair=False, fmt=None:
                        calls.append((path, repair)) or full)
    assert vdsk_cli.main(['check', '-r', 'leaks', str(q)]) == rc
    assert calls == [(str(q), True)]


def test_snapshot(q):
    cli('snapshot', '-c', 'one', q)
    with vdsk.open(str(q)) as img:
        img.write(MiB, b'\xa5' * 65536)
    cli('snapshot', '-c', 'two', q)
    p = cli('snapshot', '-l', q)
    assert 'one' in p.stdout and 'two' in p.stdout
    if QEMU_IMG:
        out = subprocess.run([QEMU_IMG, 'snapshot', '-l', str(q)],
                             capture_output=True, text=True,
                             check=True).stdout
        tags = [line.split()[1] for line in out.splitlines()[2:]]
        assert tags == ['one', 'two']
        subprocess.run([QEMU_IMG, 'check', str(q)], check=True,
                       capture_output=True)
    cli('snapshot', '-a', 'one', q)
    with vdsk.open(str(q)) as img:
        assert img.read(MiB, 65536) == b'\x5a' * 65536
    cli('snapshot', '-d', 'one', q)
    assert [s['name'] for s in vdsk.snapshot_list(str(q))] == ['two']
    cli('snapshot', '-a', 'two', q)
    with vdsk.open(str(q)) as img:
        assert img.read(MiB, 65536) == b'\xa5' * 65536
    if QEMU_IMG:
        subprocess.run([QEMU_IMG, 'check', str(q)], check=True,
                       capture_output=True)
    p = cli('snapshot', '-a', 'nope', q, rc=1)
    assert p.stderr.startswith('vdsk: ')
    cli('snapshot', '-c', q, rc=1)                       # no name
    assert cli('snapshot', q, rc=None).returncode == 2    # no action


def test_resize(tmp_path, q):
    cli('resize', q, '+16M')
    assert vdsk.info(str(q))['virtual_size'] == 32 * MiB
    if QEMU_IMG:
        out = subprocess.run([QEMU_IMG, 'info', '--output=json', str(q)],
                             capture_output=True, text=True,
                             check=True).stdout
        assert json.loads(out)['virtual-size'] == 32 * MiB
    cli('resize', q, '8M')                     # nothing allocated past 8M
    assert vdsk.info(str(q))['virtual_size'] == 8 * MiB
    p = cli('resize', q, '1M', rc=1)           # data at 1M..1M+192K
    assert 'allocated' in p.stderr
    with vdsk.open(str(q)) as img:
        assert img.read(MiB, 3 * 65536) == b'\x5a' * 3 * 65536
    raw = tmp_path / 'r.raw'
    cli('create', '-f', 'raw', raw, '1M')
    p = cli('resize', '-f', 'raw', raw, '2M', rc=1)      # raw: no resize op
    assert 'not supported' in p.stderr


def test_commit_and_rebase(tmp_path, q):
    top = tmp_path / 'top.qcow2'
    cli('create', '-f', 'qcow2', '-b', q.name, '-F', 'qcow2', top)
    with vdsk.open(str(top)) as img:
        img.write(0, b'top!' * 1024)
    cli('commit', top)
    with vdsk.open(str(q)) as img:
        assert img.read(0, 4096) == b'top!' * 1024
    other = tmp_path / 'other.raw'
    cli('create', '-f', 'raw', other, '16M')
    cli('rebase', '-b', other.name, '-F', 'raw', top)
    assert vdsk.info(str(top))['backing_file'] == other.name
    with vdsk.open(str(top)) as img:    # safe: the view is unchanged
        assert img.read(MiB, 65536) == b'\x5a' * 65536
    cli('rebase', '-u', '-b', q.name, '-F', 'qcow2', top)
    assert vdsk.info(str(top))['backing_file'] == q.name
    cli('rebase', '-b', '', top)
    assert vdsk.info(str(top))['backing_file'] is None
    cli('commit', top, rc=1)                     # no backing file now


@pytest.mark.parametrize('args', [
    [], ['--read', '--pattern', 'rand', '-t', '4'],
    ['-w', '--pattern', 'seq', '--block-size', '64k', '--threads', '2'],
    ['--write', '--pattern', 'rand', '-d', '3', '--flush-interval', '100']])
def test_bench(q, args):
    p = cli('bench', '--count', '2000', *args, q)
    assert 'Run completed in' in p.stdout
    assert 'IOPS' in p.stdout and 'MiB/s' in p.stdout
    r = json.loads(cli('bench', '-c', '500', '--json', *args,
                       q).stdout.splitlines()[-1])
    assert r['requests'] == 500 and r['iops'] > 0
    if QEMU_IMG and ('-w' in args or '--write' in args):
        p = subprocess.run([QEMU_IMG, 'check', str(q)], capture_output=True)
        assert p.returncode == 0, p.stdout
