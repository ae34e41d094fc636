"""Config drive: built by Nova's own ConfigDriveBuilder from Nova's
InstanceMetadata, stored in the instance directory as ``disk.config``.

* iso9660 (``[DEFAULT] config_drive_format``, the default): Nova's builder
  runs genisoimage (``[DEFAULT] mkisofs_cmd``); attached as a read-only
  CD-ROM on the AHCI controller (QEMU ide-cd, bhyve ahci ``cd`` port).
* vfat: Nova's builder writes the same files, but instead of its loop mount
  (root, privsep) the image is made unprivileged with mkfs.fat + mtools;
  attached as a read-only virtio disk (a FAT file system with 512-byte
  sectors cannot be mounted from a 2048-byte-sector CD-ROM, and QEMU's
  ide-hd refuses read-only nodes).

The drive is part of the VM spec, so reboot, stop/start and adoption keep
it. It is built once, at spawn, like the libvirt driver does.
"""
import os

from nova import exception
from nova.api.metadata import base as instance_metadata
from nova.virt import configdrive
from oslo_concurrency import processutils
from oslo_log import log as logging

from nova_bhyve import conf
from nova_bhyve import guest

LOG = logging.getLogger(__name__)
CONF = conf.CONF

FILENAME = 'disk.config'
LABEL = 'config-2'


class Builder(configdrive.ConfigDriveBuilder):
    """Nova's builder with an unprivileged vfat writer."""

    def _make_vfat(self, path, tmpdir):
        with open(path, 'wb') as f:
            f.truncate(configdrive.CONFIGDRIVESIZE_BYTES)
        processutils.execute('mkfs.fat', '-n', LABEL, path)
        entries = [os.path.join(tmpdir, e) for e in sorted(os.listdir(tmpdir))]
        if entries:
            processutils.execute('mcopy', '-s', '-i', path, *entries, '::/',
                                 env_variables={'MTOOLS_SKIP_CHECK': '1'})


def required(instance):
    return configdrive.required_by(instance)


def build(context, instance, directory, injected_files=None,
          admin_password=None, network_info=None):
    """Write the config drive of ``instance`` into ``directory``; return
    the guest.Disk that attaches it."""
    path = os.path.join(directory, FILENAME)
    extra_md = {}
    if admin_password:
        extra_md['admin_pass'] = admin_password
    inst_md = instance_metadata.InstanceMetadata(
        instance, content=injected_files, extra_md=extra_md,
        network_info=network_info)
    LOG.info('creating config drive (%s) at %s', CONF.config_drive_format,
             path, instance=instance)
    try:
        with Builder(instance_md=inst_md) as cdb:
            cdb.make_drive(path)
    except processutils.ProcessExecutionError as e:
        raise exception.InstanceDeployFailure(
            reason='building the config drive failed: %s' % e)
    return disk(path)


def disk(path, fmt=None):
    """The read-only device that carries the drive at ``path``."""
    fmt = fmt or CONF.config_drive_format
    if fmt == 'vfat':
        return guest.Disk(path=path, format='raw', bus='virtio',
                          device='disk', readonly=True)
    return guest.Disk(path=path, format='raw', bus='sata', device='cdrom',
                      readonly=True)
