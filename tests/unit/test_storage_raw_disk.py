"""Root disks for hypervisors without a qcow2 reader (bhyve): a sparse raw
copy of the cached image, made with libvdsk; qemu-img is the oracle."""
import os
import subprocess

import pytest

from nova_bhyve.storage import disks
from nova_bhyve.storage import vdsk

MiB = 1024 * 1024


@pytest.mark.parametrize('base_format', ['raw', 'qcow2'])
def test_raw_root_disk_is_a_sparse_identical_copy(tmp_path, base_format):
    base = str(tmp_path / 'base')
    vdsk.create(base, base_format, 8 * MiB)
    with vdsk.open(base, fmt=base_format) as img:
        img.write(0, b'boot' * 128)
        img.write(5 * MiB + 4096, b'\xa5' * 8192)
        img.flush()
    disk = str(tmp_path / 'disk')
    size = disks.create_root_disk(base, base_format, disk, 1, 'img',
                                    disk_format='raw')
    assert size == 1024 * MiB
    assert os.path.getsize(disk) == 1024 * MiB
    # sparse: only the two written chunks are allocated
    assert os.stat(disk).st_blocks * 512 <= 2 * MiB
    assert vdsk.info(disk)['format'] == 'raw'
    # same content as the base, zero beyond it (qemu-img compare allows a
    # larger second image only if the extra part is zero)
    proc = subprocess.run(['qemu-img', 'compare', '-f', base_format, '-F',
                           'raw', base, disk], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
