"""Images and instance disks.

Glance images are fetched once into a per-host cache, checked (Nova's own
format safety inspection, then the checksum Glance recorded) and shared by
every instance booted from them. Each instance's root disk is a qcow2
copy-on-write overlay on the cached base, made with libvdsk, so creating it
costs the same for a 100 MiB image as for a 20 GiB one.
"""
import hashlib
import os

from oslo_concurrency import lockutils
from oslo_log import log as logging
from oslo_utils import fileutils
from oslo_utils import units

from nova import exception
from nova.virt import images
from nova_bhyve import conf
from nova_bhyve.storage import vdsk

LOG = logging.getLogger(__name__)
CONF = conf.CONF

#: Glance disk formats the hypervisors use directly as an overlay backing
BOOTABLE_FORMATS = ('raw', 'qcow2')
#: Glance disk formats converted once, by libvdsk, into a qcow2 cache entry
CONVERTED_FORMATS = ('vmdk', 'vdi', 'vhd')
IMAGE_FORMATS = BOOTABLE_FORMATS + CONVERTED_FORMATS
#: Glance's disk_format name -> libvdsk's (qemu-img's) format name
_VDSK_NAME = {'vhd': 'vpc'}
_HASH_CHUNK = 4 * units.Mi


def cache_dir(instances_path):
    return os.path.join(instances_path, CONF.image_cache.subdirectory_name)


def _cache_path(cache, image_id):
    return os.path.join(cache, hashlib.sha1(image_id.encode()).hexdigest())


def _verify_checksum(image_id, meta, path):
    """Compare the file with the hash Glance recorded, if any."""
    algo = meta.get('os_hash_algo')
    expected = meta.get('os_hash_value')
    if not (algo and expected):
        algo, expected = 'md5', meta.get('checksum')
    if not expected:
        LOG.debug('image %s has no recorded checksum', image_id)
        return
    try:
        digest = hashlib.new(algo, usedforsecurity=False)
    except ValueError:
        LOG.warning('image %s: unknown hash algorithm %s, not verified',
                    image_id, algo)
        return
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b''):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise exception.ImageUnacceptable(
            image_id=image_id,
            reason='downloaded data does not match its %s checksum' % algo)


def _check_format(image_id, disk_format, path):
    """The data must be what Glance says it is (libvdsk probes it)."""
    expected = _VDSK_NAME.get(disk_format, disk_format)
    try:
        probed = vdsk.info(path)['format']
        if probed == 'raw' and expected == 'vpc':
            # a fixed VHD has only a footer, so it probes as raw
            probed = vdsk.info(path, fmt='vpc')['format']
    except vdsk.VdskError as e:
        raise exception.ImageUnacceptable(image_id=image_id, reason=str(e))
    if probed != expected:
        raise exception.ImageUnacceptable(
            image_id=image_id,
            reason='image data is %s but its disk_format is %s' % (
                probed, disk_format))


def fetch_image(context, image_id, cache, disk_image=True):
    """Path of the verified copy of Glance image ``image_id`` in the image
    cache directory ``cache``, and the format of that copy.

    Downloads at most once per host: concurrent callers wait on a lock file
    in the cache directory. vmdk, vdi and vhd images are converted once into
    a qcow2 cache entry, so instance disks are always overlays on raw or
    qcow2.
    """
    meta = images.get_info(context, image_id)
    fmt = meta.get('disk_format')
    if disk_image and fmt not in IMAGE_FORMATS:
        raise exception.ImageUnacceptable(
            image_id=image_id,
            reason='disk_format %s is not supported (supported: %s)' % (
                fmt, ', '.join(IMAGE_FORMATS)))
    os.makedirs(cache, exist_ok=True)
    path = _cache_path(cache, image_id)
    with lockutils.lock(os.path.basename(path), external=True,
                        lock_file_prefix='lock-', lock_path=cache):
        if not os.path.exists(path):
            tmp = path + '.part'
            with fileutils.remove_path_on_error(tmp):
                images.fetch(context, image_id, tmp)
                _verify_checksum(image_id, meta, tmp)
                if disk_image:
                    _check_format(image_id, fmt, tmp)
                    images.do_image_deep_inspection(meta, image_id, tmp)
                if disk_image and fmt in CONVERTED_FORMATS:
                    _convert_to_qcow2(image_id, tmp, _VDSK_NAME.get(fmt, fmt),
                                      path)
                    os.unlink(tmp)
                else:
                    os.rename(tmp, path)
            LOG.info('cached image %s (%d bytes)', image_id,
                     os.path.getsize(path))
        else:
            os.utime(path)     # the cache's last-use time
    if disk_image and fmt in CONVERTED_FORMATS:
        fmt = 'qcow2'
    return path, fmt


def fetch_kernel(context, kernel_id, ramdisk_id, cache):
    """Cached paths of an instance's kernel and ramdisk images for direct
    boot (None for each it has not)."""
    kernel = ramdisk = None
    if kernel_id:
        kernel, _ = fetch_image(context, kernel_id, cache, disk_image=False)
    if ramdisk_id:
        ramdisk, _ = fetch_image(context, ramdisk_id, cache,
                                 disk_image=False)
    return kernel, ramdisk


def _convert_to_qcow2(image_id, src, src_format, dst):
    """Sparse qcow2 copy of ``src`` by libvdsk's convert (parallel;
    unallocated and all-zero ranges are not written)."""
    tmp = dst + '.convert'
    try:
        vdsk.convert(src, tmp, src_fmt=src_format, dst_fmt='qcow2')
        os.rename(tmp, dst)
    except vdsk.VdskError as e:
        raise exception.ImageUnacceptable(
            image_id=image_id,
            reason='cannot convert %s image: %s' % (src_format, e))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
