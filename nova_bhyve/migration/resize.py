"""Resize, cold and warm migration: Nova's steps, on both hosts.

Source, ``migrate_disk_and_power_off``: warm (the VM's state saved and
moved with its disks, see warm) or cold (the guest powered off); the
instance directory moved to the destination's instances path (same host:
kept as ``<uuid>_resize``; see cold). Destination, ``finish_migration``: the
spec built again for the new flavor, the root disk rebased on this host's
image cache and grown, ports plugged, the VM resumed (warm) or booted.
``confirm`` drops the kept copy; ``finish_revert`` brings it back.
"""
import os

from nova import exception
from nova import objects
from oslo_log import log as logging
from oslo_serialization import jsonutils
from oslo_utils import units

from nova_bhyve import guest
from nova_bhyve import host
from nova_bhyve import instance_store
from nova_bhyve.devices import volumes
from nova_bhyve.hypervisor import base
from nova_bhyve.migration import cold
from nova_bhyve.migration import compat
from nova_bhyve.migration import warm
from nova_bhyve.storage import disks
from nova_bhyve.storage import image_cache
from nova_bhyve.storage import vdsk

LOG = logging.getLogger(__name__)

#: the disk_info key of the moved VM's machine type
MACHINE = 'machine'


def _dest_compute(context, instance):
    """The destination compute of the instance's migration in progress
    (Nova passes only the destination's address to the driver)."""
    try:
        return objects.Migration.get_by_instance_and_status(
            context, instance.uuid, 'migrating').dest_compute
    except exception.MigrationNotFoundByStatus:
        return None


def _refuse_shrinking(root_path, flavor):
    root_size = vdsk.info(root_path)['virtual_size']
    if flavor.root_gb and flavor.root_gb * units.Gi < root_size:
        raise exception.InstanceFaultRollback(
            inner_exception=exception.ResizeError(
                reason='the root disk is %d bytes; flavor %s has only '
                       '%d GiB: disks cannot shrink' % (
                           root_size, flavor.name, flavor.root_gb)))


def _refuse_unknown_machine(context, dest_compute, machine):
    """Before anything stops: the destination's compute record (its
    cpu_info, compat.machine_refusal) must list the VM's machine type."""
    if not machine or not dest_compute:
        return
    try:
        node = objects.ComputeNode.get_first_node_by_host_for_old_compat(
            context, dest_compute)
        dest = compat.load(node.cpu_info)
    except (exception.ComputeHostNotFound, ValueError, TypeError) as e:
        LOG.warning('the machine types of %s are unknown (%s): %s is '
                    'checked there', dest_compute, e, machine)
        return
    reason = compat.machine_refusal(machine, dest)
    if reason:
        raise exception.InstanceFaultRollback(
            inner_exception=exception.ResizeError(reason=reason))


def migrate_disk_and_power_off(drv, context, instance, dest, flavor,
                               network_info, block_device_info, timeout,
                               retry_interval):
    vmdir, spec = drv.store.load(instance)
    disks = cold.instance_disks(vmdir.path, spec)
    _refuse_shrinking(drv.root_disk(vmdir).path, flavor)
    dest_compute = _dest_compute(context, instance)
    if dest_compute != drv.host_name:
        _refuse_unknown_machine(context, dest_compute, spec.machine)
    if dest_compute == drv.host_name:
        target = vmdir.path
    else:
        target = os.path.join(cold.target_instances_path(
            dest_compute, drv.instances_path), instance.uuid)
    copier = cold.copier_for(dest, dest_compute)
    was_running = drv.hypervisor.is_running(vmdir)
    mode = warm.choose(drv.hypervisor, vmdir, spec, flavor, disks)
    saved = None
    if mode.warm:
        drv.watcher.unwatch(instance.uuid)
        saved = warm.save(drv.hypervisor, vmdir, spec, context,
                          drv.host_name, instance)
        if saved is None:
            mode = warm.Mode(warm.COLD, 'saving the VM state failed')
    LOG.info('migrating to %s: %s migration, %s', dest_compute or dest,
             mode.mode, mode.reason, instance=instance)
    if saved is None:
        drv.power_off(instance, timeout, retry_interval)
    drv.watcher.unwatch(instance.uuid)
    try:
        disk_info = cold.move_out(vmdir.path, target, disks, copier,
                                  warm=saved)
    except cold.MigrationCopyError as e:
        if saved:
            _resume_saved(drv, context, instance, vmdir)
        elif was_running:
            drv.start_vm(vmdir)
        raise exception.InstanceFaultRollback(
            inner_exception=exception.ResizeError(
                reason='moving the disks to %s failed: %s' % (dest, e)))
    disk_info = _with_machine(disk_info, spec.machine)
    # the destination connects the volumes again (finish_migration)
    volumes.disconnect_all(block_device_info)
    if dest_compute != drv.host_name:
        # the destination plugs the ports again (finish_migration)
        drv.vifs.unplug_all(instance, network_info)
    return disk_info


def finish_migration(drv, context, instance, disk_info, network_info,
                     image_meta, resize_instance, block_device_info,
                     power_on):
    guest.validate_flavor_fits_host(instance.flavor, host.vcpus(),
                                    host.memory_mb()[0])
    vmdir = drv.store.vmdir(instance, must_exist=False)
    machine = _moved_machine(drv, disk_info)
    saved = warm.parse(disk_info)
    root = drv.root_disk(vmdir)
    actual = vdsk.info(root.path)
    if actual['format'] != root.format:
        raise exception.ResizeError(
            reason='the moved root disk is %s; the %s hypervisor here '
                   'needs %s' % (actual['format'], drv.hypervisor.name,
                                 root.format))
    if actual['backing_file']:
        base, base_fmt = image_cache.fetch_image(
            context, instance.image_ref, drv.image_cache_dir)
        disks.rebase_root_disk(root.path, base, base_fmt)
    # the config drive is made again here: its metadata
    # (network_data.json) is this host's view of the ports
    spec = drv.new_spec(context, instance, image_meta, root,
                        instance.kernel_id, instance.ramdisk_id,
                        config_drive_dir=vmdir.path,
                        network_info=network_info, machine=machine)
    spec.disks.extend(volumes.connect_all(block_device_info))
    if instance.flavor.root_gb:
        disks.grow_disk(root.path, instance.flavor.root_gb * units.Gi)
    spec.nics = drv.plug_nics(instance, network_info, image_meta)
    instance_store.write_spec(vmdir, spec)
    resumed = False
    if power_on and saved:
        size = vdsk.info(root.path)['virtual_size']
        grown = [(0, size)] if size > actual['virtual_size'] else []
        resumed = _resume_saved(drv, context, instance, vmdir, spec,
                                saved.get('signature'), grown)
    elif power_on:
        drv.start_vm(vmdir, spec)
    else:
        drv.hypervisor.discard_saved_state(vmdir)
    LOG.info('instance %s moved here (%s, %s)', instance.uuid,
             'resized' if resize_instance else 'same flavor',
             'warm: resumed from its saved state' if resumed else
             'cold: booted' if power_on else 'cold: not started',
             instance=instance)


def _with_machine(disk_info, machine):
    """``disk_info`` (cold.move_out's JSON) carrying the spec's machine
    type to the destination (the spec itself does not move)."""
    info = jsonutils.loads(disk_info)
    info[MACHINE] = machine
    return jsonutils.dumps(info)


def _moved_machine(drv, disk_info):
    """The moved VM's machine type (kept: the VM is the same hardware
    here, and a saved state loads only into it); ResizeError when this
    host cannot run it. None from a source that did not send one."""
    try:
        machine = jsonutils.loads(disk_info or '{}').get(MACHINE)
    except (ValueError, AttributeError):
        return None
    try:
        drv.hypervisor.check_machine(machine)
    except base.HypervisorError as e:
        raise exception.ResizeError(reason=str(e))
    return machine


def _resume_saved(drv, context, instance, vmdir, spec=None, signature=None,
                  grown_disks=()):
    """Warm migration: run the VM again from the state saved in ``vmdir``;
    boot it when that fails (warm.restore). True if the guest was
    resumed."""
    spec = spec or instance_store.read_spec(vmdir)
    drv.prepare_consoles(vmdir, spec)
    if warm.restore(drv.hypervisor, spec, vmdir, context, drv.host_name,
                    instance, signature, grown_disks):
        drv.watcher.watch(vmdir)
        return True
    drv.start_vm(vmdir, spec)
    return False


def confirm_migration(drv, instance):
    vmdir = drv.store.vmdir_for(instance.uuid)
    if cold.discard_kept(vmdir.path):
        LOG.info('resize confirmed: removed the source copy',
                 instance=instance)


def finish_revert_migration(drv, context, instance, network_info,
                            block_device_info, power_on):
    vmdir = drv.store.vmdir_for(instance.uuid)
    if os.path.isdir(cold.resize_path(vmdir.path)):
        if os.path.isdir(vmdir.path):     # same host: the new copy
            drv.remove_instance_dir(vmdir)
        cold.restore_kept(vmdir.path)
    vmdir = drv.store.vmdir(instance)
    volumes.connect_all(block_device_info)     # the kept spec names them
    drv.vifs.plug_all(instance, network_info)   # idempotent
    if not power_on:
        drv.hypervisor.discard_saved_state(vmdir)
    elif drv.hypervisor.is_running(vmdir):
        pass
    elif os.path.exists(vmdir.saved_state):     # a warm migration's
        _resume_saved(drv, context, instance, vmdir)
    else:
        drv.start_vm(vmdir)
