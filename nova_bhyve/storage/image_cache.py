"""The per-host image cache: Glance images fetched once.

Glance images are fetched once into a per-host cache, checked (Nova's own
format safety inspection, then the checksum Glance recorded) and shared by
every instance booted from them; vmdk, vdi and vhd images are converted once
into qcow2. Instance disks made from them: storage.disks.
"""
import hashlib
import os

from nova import exception
from nova.virt import images
from oslo_concurrency import lockutils
from oslo_log import log as logging
from oslo_utils import fileutils
from oslo_utils import units

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
