"""Shared helpers for the libvdsk interop tests: qemu-img/qemu-io are the
oracle.  (A plain module, not a conftest, so the name stays unique.)"""
import json
import shutil
import subprocess

import pytest

QEMU_IMG = shutil.which('qemu-img')
QEMU_IO = shutil.which('qemu-io')

needs_qemu_img = pytest.mark.skipif(QEMU_IMG is None,
                                    reason='qemu-img not installed')
needs_qemu_io = pytest.mark.skipif(QEMU_IO is None,
                                   reason='qemu-io not installed')


def run(*args, check=True):
    p = subprocess.run([str(a) for a in args], capture_output=True,
                       text=True)
    if check and p.returncode != 0:
        raise AssertionError('%s failed (%d): %s%s' % (
            ' '.join(map(str, args)), p.returncode, p.stdout, p.stderr))
    return p


def qemu_img(*args, check=True):
    return run(QEMU_IMG, *args, check=check)


def qemu_io(path, fmt, *cmds):
    args = [QEMU_IO, '-f', fmt]
    for c in cmds:
        args += ['-c', c]
    p = run(*args, path)
    # qemu-io reports command failures on stdout with exit status 0
    assert 'error' not in p.stdout.lower() and 'fail' not in \
        p.stdout.lower(), p.stdout
    return p


def qemu_info(path):
    return json.loads(qemu_img('info', '--output=json', path).stdout)


def qemu_check(path, fmt='qcow2'):
    """Assert `qemu-img check` finds no errors and no leaks."""
    p = qemu_img('check', '-f', fmt, '--output=json', path, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout)
    for key in ('corruptions', 'leaks', 'check-errors'):
        assert res.get(key, 0) == 0, res
    return res


def qemu_raw(path, tmp_path, name='converted.raw'):
    """The image's guest-visible contents according to qemu."""
    out = tmp_path / name
    qemu_img('convert', '-O', 'raw', path, out)
    return out.read_bytes()


def vdsk_all(vdsk, path, chunk=1 << 20):
    with vdsk.open(path, readonly=True) as img:
        size = img.size
        return b''.join(img.read(o, min(chunk, size - o))
                        for o in range(0, size, chunk))
