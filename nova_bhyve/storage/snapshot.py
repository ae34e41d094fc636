"""Instance snapshots to Glance (driver.snapshot).

Live, for a running VM whose backend can pivot a disk (QEMU):

1. IMAGE_PENDING_UPLOAD; the root disk is frozen: the hypervisor puts a
   temporary qcow2 overlay on top of it (a flush, no guest pause beyond
   it) and the guest's writes go there from now on;
2. the frozen chain (root disk -> cached base image) is read with libvdsk
   and written as one standalone image in the source image's format (qcow2
   or raw), skipping all-zero clusters (a sparse copy);
3. the overlay is merged back live (active block-commit) and removed: the
   VM ends with the disk layout it had - also when step 2 fails;
4. IMAGE_UPLOADING; the file goes to Glance through Nova's image API.

A VM that is not running (shut off, suspended) is read directly. On any
failure the temporary file is removed and the error raised: Nova's compute
manager then deletes the image it created (delete_image_on_error).
"""
import contextlib
import os
import time

from nova import exception
from nova.compute import task_states
from nova.image import glance
from oslo_log import log as logging

from nova_bhyve.hypervisor import base
from nova_bhyve.storage import vdsk

LOG = logging.getLogger(__name__)

CHUNK = 1024 * 1024
CLUSTER = 64 * 1024
FORMATS = ('qcow2', 'raw')


def target_format(instance):
    """The format of the image the instance was booted from, if it is one
    we write (qcow2, raw); qcow2 otherwise."""
    fmt = (instance.system_metadata or {}).get('image_disk_format')
    return fmt if fmt in FORMATS else 'qcow2'


def export(src, src_format, dst, dst_format, chunk=CHUNK, cluster=CLUSTER):
    """Copy the image ``src`` with its whole backing chain into a new
    standalone image ``dst``; all-zero clusters are not written. Returns
    the number of bytes written."""
    written = 0
    zero = bytes(cluster)
    with vdsk.open(src, fmt=src_format, readonly=True) as img:
        size = img.size
        vdsk.create(dst, dst_format, size)
        with vdsk.open(dst, fmt=dst_format) as out:
            for offset in range(0, size, chunk):
                data = img.read(offset, min(chunk, size - offset))
                for i in range(0, len(data), cluster):
                    piece = data[i:i + cluster]
                    if piece != zero[:len(piece)]:
                        out.write(offset + i, piece)
                        written += len(piece)
            out.flush()
    return written


@contextlib.contextmanager
def frozen_disk(hypervisor, vmdir, index, disk):
    """While inside, ``disk.path`` does not change. Live pivot onto an
    overlay for a running VM; nothing to do for a stopped one."""
    if not hypervisor.is_running(vmdir):
        yield
        return
    overlay = os.path.join(vmdir.path, 'snapshot-overlay-%d.qcow2' % index)
    if os.path.exists(overlay):
        raise exception.NovaException(
            message='a snapshot of instance %s is already in progress '
                    '(%s exists)' % (vmdir.uuid, overlay))
    t0 = time.monotonic()
    try:
        hypervisor.freeze_disk(vmdir, index, overlay, disk=disk)
    except base.HypervisorError as e:
        if os.path.exists(overlay):
            os.unlink(overlay)
        raise exception.NovaException(
            message='cannot freeze the disk of %s: %s' % (vmdir.uuid, e))
    LOG.debug('instance %s: disk %d frozen in %.3f s', vmdir.uuid, index,
              time.monotonic() - t0)
    try:
        yield
    finally:
        t0 = time.monotonic()
        try:
            hypervisor.thaw_disk(vmdir, index, overlay)
        except base.HypervisorError as e:
            LOG.error('instance %s: merging the snapshot overlay %s back '
                      'failed: %s; the VM keeps running on it', vmdir.uuid,
                      overlay, e)
            raise exception.NovaException(
                message='snapshot of %s: cannot merge the temporary overlay '
                        'back: %s' % (vmdir.uuid, e))
        LOG.debug('instance %s: overlay merged back in %.3f s', vmdir.uuid,
                  time.monotonic() - t0)


def metadata(instance, snapshot, fmt):
    """Image metadata for the upload, as the libvirt driver writes it."""
    props = {'image_location': 'snapshot', 'image_state': 'available',
             'owner_id': instance.project_id}
    if instance.kernel_id:
        props['kernel_id'] = instance.kernel_id
    if instance.ramdisk_id:
        props['ramdisk_id'] = instance.ramdisk_id
    if instance.os_type:
        props['os_type'] = instance.os_type
    return {'status': 'active', 'name': snapshot['name'],
            'disk_format': fmt,
            'container_format': snapshot.get('container_format') or 'bare',
            'properties': props}


def snapshot(hypervisor, vmdir, spec, context, instance, image_id,
             update_task_state):
    image_api = glance.API()
    snap = image_api.get(context, image_id)
    fmt = target_format(instance)
    root = spec.disks[0]
    update_task_state(task_state=task_states.IMAGE_PENDING_UPLOAD)
    out = os.path.join(vmdir.path, 'snapshot-%s.%s' % (image_id, fmt))
    try:
        t0 = time.monotonic()
        try:
            with frozen_disk(hypervisor, vmdir, 0, root):
                written = export(root.path, root.format, out, fmt)
        except OSError as e:     # VdskError included: ENOSPC, EIO, ...
            raise exception.NovaException(
                message='snapshot of instance %s failed while writing %s: '
                        '%s' % (instance.uuid, out, e))
        LOG.info('snapshot %s: %s image of %d data bytes made in %.2f s',
                 image_id, fmt, written, time.monotonic() - t0,
                 instance=instance)
        update_task_state(task_state=task_states.IMAGE_UPLOADING,
                          expected_state=task_states.IMAGE_PENDING_UPLOAD)
        with open(out, 'rb') as f:
            image_api.update(context, image_id,
                             metadata(instance, snap, fmt), f,
                             purge_props=False)
        LOG.info('snapshot %s uploaded', image_id, instance=instance)
    finally:
        if os.path.exists(out):
            os.unlink(out)
