"""Instance disks, made with libvdsk from the image cache's entries.

Each instance's root disk is a qcow2 copy-on-write overlay on the cached
base (or a sparse raw copy, for bhyve), so creating it costs the same for a
100 MiB image as for a 20 GiB one. A moved disk is rebased on this host's
cached copy of its image and grown to the new flavor.
"""
import os

from nova import exception
from oslo_log import log as logging
from oslo_utils import fileutils
from oslo_utils import units

from nova_bhyve.storage import vdsk

LOG = logging.getLogger(__name__)


def create_root_disk(base, base_format, path, root_gb, image_id,
                     disk_format='qcow2'):
    """The instance's root disk at ``path``, sized to the flavor's root_gb
    (or to the image when root_gb is 0). Returns its virtual size.

    ``disk_format`` qcow2: a copy-on-write overlay on ``base``;
    raw: a sparse full copy (for hypervisors without a qcow2 reader).
    """
    try:
        base_info = vdsk.info(base)
    except vdsk.VdskError as e:
        raise exception.ImageUnacceptable(image_id=image_id, reason=str(e))
    if base_info['format'] != base_format:
        raise exception.ImageUnacceptable(
            image_id=image_id,
            reason='image data is %s, not %s' % (base_info['format'],
                                                 base_format))
    if base_info.get('backing_file'):
        raise exception.ImageUnacceptable(
            image_id=image_id, reason='image has a backing file')
    image_size = base_info['virtual_size']
    size = root_gb * units.Gi if root_gb else image_size
    if size < image_size:
        raise exception.FlavorDiskSmallerThanImage(flavor_size=size,
                                                   image_size=image_size)
    if disk_format == 'qcow2':
        vdsk.create(path, 'qcow2', size, backing=base,
                    backing_fmt=base_format)
    else:
        with fileutils.remove_path_on_error(path):
            _copy_to_raw(base, base_format, path, size)
    return size


def _copy_to_raw(src, src_format, path, size):
    """Sparse raw copy of image ``src`` (libvdsk convert: unallocated and
    all-zero ranges are not written), grown to ``size`` bytes."""
    vdsk.convert(src, path, src_fmt=src_format, dst_fmt='raw')
    try:
        if os.path.getsize(path) < size:
            os.truncate(path, size)     # a sparse tail reads as zeroes
    except OSError as e:
        raise vdsk.VdskError(e.errno, e.strerror, path)


# -- moved disks (cold migration / resize) ----------------------------------

def rebase_root_disk(path, base, base_format):
    """Point the qcow2 overlay at ``path`` to ``base`` (this host's cached
    copy of the same image) when it names another path. The data of the
    backing file is the same (same Glance image, checksum verified), so
    only the header changes ("unsafe" rebase). Raw disks: nothing to do.
    """
    info = vdsk.info(path)
    if info['format'] != 'qcow2' or not info['backing_file']:
        return False
    if info['backing_file'] == base:
        return False
    # in-process header rewrite (libvdsk), like qemu-img rebase -u
    vdsk.rebase(path, base, backing_fmt=base_format, unsafe=True,
                fmt='qcow2')
    LOG.info('rebased %s on %s', path, base)
    return True


def grow_disk(path, size):
    """Grow the disk at ``path`` to ``size`` bytes (never shrinks). Returns
    the resulting virtual size."""
    info = vdsk.info(path)
    if size <= info['virtual_size']:
        return info['virtual_size']
    if info['format'] == 'raw':
        os.truncate(path, size)       # sparse: the new space is a hole
    else:
        with vdsk.open(path, fmt=info['format']) as img:
            img.resize(size)
    LOG.info('grew %s from %d to %d bytes', path, info['virtual_size'], size)
    return vdsk.info(path)['virtual_size']
