"""Cinder volumes: connection types that can be attached here.

Supported: ``driver_volume_type = 'local'`` (a file or block device already
on this host, ``data.device_path``), connected through os-brick's
LocalConnector like the libvirt driver does. The volume is a raw disk on
the VM's virtio bus with the volume id as serial, hot-plugged into a running
QEMU VM (see hypervisor.qemu) and kept in the VM spec so reboots keep it.

Not supported (refused with InvalidVolume): iSCSI, RBD, NFS, FC,
NVMe-oF... Their os-brick connectors need root helpers and initiator tools
(iscsiadm, rbd-nbd...) that this driver does not set up yet; on FreeBSD
os-brick has no connectors at all.
"""
import os
import platform
import socket
import sys

from nova import exception
from nova.virt import driver
from oslo_log import log as logging

from nova_bhyve import conf
from nova_bhyve import guest
from nova_bhyve import instance_store
from nova_bhyve.hypervisor import base

LOG = logging.getLogger(__name__)
CONF = conf.CONF

SUPPORTED_TYPES = ('local',)
ISCSI_INITIATOR_FILE = '/etc/iscsi/initiatorname.iscsi'


def _connector():
    # os-brick is Linux only; imported here so that nothing else needs it.
    from os_brick.initiator import connector
    return connector.InitiatorConnector.factory('LOCAL', root_helper=None)


def _check_type(connection_info):
    vtype = connection_info.get('driver_volume_type')
    if vtype not in SUPPORTED_TYPES:
        # InvalidVolume: the API answers 400 with this reason
        raise exception.InvalidVolume(
            reason='driver_volume_type %s is not supported by nova-bhyve '
                   '(supported: %s)' % (vtype, ', '.join(SUPPORTED_TYPES)))


def volume_id(connection_info):
    return (connection_info.get('serial') or
            connection_info.get('data', {}).get('volume_id'))


def connect(connection_info):
    """Make the volume available on this host; return its guest.Disk."""
    _check_type(connection_info)
    data = connection_info.get('data') or {}
    device = _connector().connect_volume(data)
    path = device['path']
    if not os.path.exists(path):
        raise exception.VolumeNotFound(volume_id=volume_id(connection_info))
    return guest.Disk(path=path, format='raw', bus='virtio', device='disk',
                      readonly=data.get('access_mode') == 'ro',
                      serial=volume_id(connection_info))


def disconnect(connection_info):
    _check_type(connection_info)
    data = connection_info.get('data') or {}
    _connector().disconnect_volume(data, None)


def size(path):
    """Size in bytes of a file or block device."""
    with open(path, 'rb') as f:
        return f.seek(0, os.SEEK_END)


def find(spec, vol_id):
    for disk in spec.disks:
        if disk.serial and disk.serial == vol_id:
            return disk
    return None


def connector_properties():
    """What Cinder needs to export a volume to this host.

    os-brick's get_connector_properties asks every protocol's connector
    through the root helper (sudo nova-rootwrap); for the connection types
    this driver supports, host and IP are all Cinder uses, plus the iSCSI
    initiator name when the host has one configured.
    """
    props = {
        'platform': platform.machine(),
        'os_type': sys.platform,           # as os-brick reports it
        'ip': CONF.my_block_storage_ip,
        'host': CONF.host or socket.gethostname(),
        'multipath': False,
    }
    try:
        with open(ISCSI_INITIATOR_FILE) as f:
            for line in f:
                if line.startswith('InitiatorName='):
                    props['initiator'] = line.split('=', 1)[1].strip()
    except OSError:
        pass
    return props


# -- Nova's volume operations on an instance (the driver calls these) ------

def connect_all(block_device_info):
    """Connect the instance's volumes on this host; their guest.Disks."""
    return [connect(bdm['connection_info'])
            for bdm in driver.block_device_info_get_mapping(
                block_device_info)]


def disconnect_all(block_device_info):
    for bdm in driver.block_device_info_get_mapping(block_device_info):
        try:
            disconnect(bdm['connection_info'])
        except Exception as e:
            LOG.warning('disconnecting volume %s: %s',
                        volume_id(bdm['connection_info']), e)


def refuse_at_boot(block_device_info):
    """Clear errors for the block devices a new instance cannot have yet.

    InvalidInput makes Nova abort the build with this message as the fault
    instead of rescheduling to another host of the same kind."""
    if driver.block_device_info_get_mapping(block_device_info):
        raise exception.InvalidInput(
            reason='volumes are not supported by nova-bhyve yet')
    if driver.block_device_info_get_ephemerals(block_device_info) or \
            driver.block_device_info_get_swap(block_device_info).get(
                'swap_size'):
        raise exception.InvalidInput(
            reason='ephemeral and swap disks are not supported by '
                   'nova-bhyve yet; use a flavor without them')


def attach(hypervisor, vmdir, connection_info):
    """Connect the volume, hot-plug it into a running VM, keep it in the
    spec (under the spec's lock: no concurrent change is lost)."""
    with instance_store.updating(vmdir) as spec:
        disk = connect(connection_info)
        if find(spec, disk.serial):
            raise exception.InvalidVolume(
                reason='volume %s is already attached' % disk.serial)
        if hypervisor.is_running(vmdir):
            if len([d for d in spec.disks if d.serial]) >= \
                    spec.hotplug_ports:
                raise exception.TooManyDiskDevices(
                    maximum=spec.hotplug_ports)
            try:
                hypervisor.attach_disk(vmdir, disk)
            except base.HypervisorError as e:
                disconnect(connection_info)
                raise exception.VolumeAttachFailed(
                    volume_id=disk.serial, reason=str(e))
        spec.disks.append(disk)


def detach(hypervisor, vmdir, connection_info):
    vol_id = volume_id(connection_info)
    with instance_store.updating(vmdir) as spec:
        disk = find(spec, vol_id)
        if disk is None:
            raise exception.DiskNotFound(location=vol_id)
        if hypervisor.is_running(vmdir):
            try:
                hypervisor.detach_disk(vmdir, disk)
            except base.HypervisorError as e:
                raise exception.DeviceDetachFailed(device=vol_id,
                                                   reason=str(e))
        spec.disks.remove(disk)
    disconnect(connection_info)


def extend(hypervisor, vmdir, connection_info, requested_size):
    """Tell a running VM the volume's new size: what Cinder really made it
    (never grow Cinder's storage here)."""
    with instance_store.updating(vmdir) as spec:
        disk = find(spec, volume_id(connection_info))
        if disk is None:
            raise exception.DiskNotFound(location=volume_id(connection_info))
        new_size = size(disk.path)
        if new_size < requested_size:
            LOG.warning('volume %s is %d bytes, %d were requested',
                        disk.serial, new_size, requested_size)
        if hypervisor.is_running(vmdir):
            try:
                hypervisor.resize_disk(vmdir, disk, new_size)
            except base.HypervisorError as e:
                raise exception.VolumeExtendFailed(
                    volume_id=disk.serial, reason=str(e))
