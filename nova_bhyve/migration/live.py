"""Live migration: Nova's steps, on the source and the destination.

The hypervisor mechanics are the backend's (``Hypervisor.prepare_incoming``,
``finish_incoming``, ``migrate_to`` -> ``MigrationHandle``; QEMU:
hypervisor/qemu/migration.py). This module maps Nova's calls onto them; the
source's migration itself is driven by migration.runner, the destination's
incoming VM directory is migration.incoming. See docs/migration.md, "Live
migration".

migrate_data
------------
The object Nova hands between the computes goes through nova-conductor,
which never imports nova_bhyve, so it must be a class Nova registers. It is
``nova.objects.migrate_data.LibvirtLiveMigrateData``, chosen because the
compute manager keys its cleanup on it (``_live_migration_cleanup_flags``:
only for this class - and HyperV's - does it call ``cleanup`` on the source
after success and ``rollback_live_migration_at_destination`` after a
failure, with ``destroy_disks`` derived from ``is_shared_instance_path`` /
``is_shared_block_storage``). Fields used:

* ``filename``: the shared-storage probe file the destination creates in its
  instances path (the source looks for it in its own);
* ``is_shared_instance_path``, ``is_shared_block_storage`` (False: local
  disks), ``block_migration``, ``disk_over_commit``,
  ``instance_relative_path`` (the instance's uuid directory);
* ``serial_listen_addr``, ``graphics_listen_addr_vnc``: the destination's
  console addresses (informational, as in libvirt);
* ``target_connect_addr``: what the source connects to. libvirt puts the
  destination's address there; the QEMU backend needs ports as well (the
  memory stream and the NBD server of a block migration), so the field
  carries the backend's endpoint as JSON (``Endpoint.to_json``), filled in
  by the destination's ``pre_live_migration``;
* ``migration``: set by Nova on the source; progress goes there.

Block migration needs the source's VM spec on the destination (the device
model must be identical): it travels in the ``disk_info`` string the
source's ``get_instance_disk_info`` returns, which Nova passes to the
destination's ``pre_live_migration`` for block migrations only.
"""
import json
import os
import shutil
import socket
import uuid as uuidlib

from nova import exception
from nova.compute import vm_states
from nova.objects import migrate_data as migrate_data_obj
from nova.virt import driver as virt_driver
from oslo_log import log as logging
from oslo_utils import units

from nova_bhyve import conf
from nova_bhyve import guest
from nova_bhyve import instance_store
from nova_bhyve.devices import configdrive
from nova_bhyve.devices import consoles
from nova_bhyve.hypervisor import base
from nova_bhyve.migration import compat
from nova_bhyve.migration import incoming
from nova_bhyve.migration import runner
from nova_bhyve.storage import image_cache
from nova_bhyve.storage import vdsk

LOG = logging.getLogger(__name__)
CONF = conf.CONF

SHARED_PROBE_PREFIX = '.nova-bhyve-shared-'


# -- addresses ------------------------------------------------------------

def _bindable(address):
    family = socket.AF_INET6 if ':' in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


def inbound_address():
    """[bhyve] live_migration_inbound_addr, else my_ip; 127.0.0.1 when
    my_ip is not an address of this host (Nova's functional harness)."""
    if CONF.bhyve.live_migration_inbound_addr:
        return CONF.bhyve.live_migration_inbound_addr
    if _bindable(CONF.my_ip):
        return CONF.my_ip
    LOG.warning('my_ip %s is not an address of this host; live migrations '
                'come in on 127.0.0.1', CONF.my_ip)
    return '127.0.0.1'


# -- checks -----------------------------------------------------------------

def dest_check(drv, instance, block_migration, disk_over_commit,
               src_compute_info=None):
    """Destination: refuse a guest this host cannot take (compat: the
    source's cpu_info from its compute node record against ours; the
    instance's machine type); then what the source needs to decide (a
    probe file in our instances path tells whether the source sees the
    same directory)."""
    if not drv.hypervisor.supports_live_migration:
        raise exception.MigrationPreCheckError(
            reason='the %s backend cannot live-migrate' % drv.hypervisor.name)
    _backend_check(drv, None, bool(block_migration))
    check_cpu(drv, src_compute_info)
    _check_machine(drv, instance.image_meta.properties.get(
        'hw_machine_type'))
    os.makedirs(drv.instances_path, exist_ok=True)
    name = SHARED_PROBE_PREFIX + uuidlib.uuid4().hex
    with open(os.path.join(drv.instances_path, name), 'w'):
        pass
    data = migrate_data_obj.LibvirtLiveMigrateData()
    data.filename = name
    data.image_type = 'qcow2'
    if block_migration is not None:     # None: 'auto', the source decides
        data.block_migration = block_migration
    data.disk_over_commit = bool(disk_over_commit)
    data.disk_available_mb = None
    data.is_shared_block_storage = False
    data.graphics_listen_addr_vnc = (CONF.vnc.server_listen
                                     if CONF.vnc.enabled else None)
    data.graphics_listen_addr_spice = None
    data.serial_listen_addr = (CONF.serial_console.proxyclient_address
                               if CONF.serial_console.enabled else None)
    data.serial_listen_ports = []
    data.supported_perf_events = []
    data.target_connect_addr = None
    return data


def _backend_check(drv, vmdir, block):
    """What the backend cannot do for this migration, as Nova's pre-check
    error (bhyve: memory only, no bandwidth cap, ...)."""
    hyp = drv.hypervisor
    if block and not hyp.supports_block_migration:
        raise exception.MigrationPreCheckError(
            reason='the %s backend cannot copy disks during a live '
                   'migration (block migration): the instances path must be '
                   'shared with the destination' % hyp.name)
    try:
        hyp.check_live_migration(vmdir, block, runner.bandwidth_mibps())
    except (NotImplementedError, base.HypervisorError) as e:
        raise exception.MigrationPreCheckError(reason=str(e))


def check_cpu(drv, src_compute_info):
    """MigrationPreCheckError naming each reason (compat.refusals) the
    source's guests cannot run here; InvalidCPUInfo for a source record
    whose cpu_info is not JSON."""
    text = (src_compute_info or {}).get('cpu_info')
    if not text:
        LOG.warning('the source compute reported no cpu_info: its CPU and '
                    'hypervisor are not compared with this host\'s')
        return
    try:
        source = compat.load(text)
    except ValueError as e:
        raise exception.InvalidCPUInfo(reason=str(e))
    reasons = compat.refusals(source, drv.hypervisor.cpu_info())
    if reasons:
        raise exception.MigrationPreCheckError(
            reason='%s cannot take this guest: %s' % (
                drv.host_name, '; '.join(reasons)))


def _check_machine(drv, machine):
    """MigrationPreCheckError when this host cannot start the guest's
    versioned ``machine``."""
    try:
        drv.hypervisor.check_machine(machine)
    except base.HypervisorError as e:
        raise exception.MigrationPreCheckError(
            reason='%s cannot take this guest: %s' % (drv.host_name, e))


def cleanup_dest_check(drv, data):
    name = getattr(data, 'filename', None) if data else None
    if name and name.startswith(SHARED_PROBE_PREFIX):
        try:
            os.unlink(os.path.join(drv.instances_path, name))
        except FileNotFoundError:
            pass


def source_check(drv, instance, data, block_device_info):
    """Source: decide shared storage / block migration; refuse clearly what
    cannot be live-migrated."""
    shared = bool(data.filename) and os.path.exists(
        os.path.join(drv.instances_path, data.filename))
    data.is_shared_instance_path = shared
    data.instance_relative_path = instance.uuid

    def refuse(reason):
        raise exception.MigrationPreCheckError(reason=reason)

    if shared:
        if data.obj_attr_is_set('block_migration') and data.block_migration:
            raise exception.InvalidLocalStorage(
                path=drv.instances_path,
                reason='the instances path is shared with the destination: '
                       'a block migration would copy the disks onto '
                       'themselves')
        data.block_migration = False
    elif 'block_migration' not in data:
        data.block_migration = True
    elif not data.block_migration:
        raise exception.InvalidSharedStorage(
            path=drv.instances_path,
            reason='the instance\'s disks are local to %s: use a block '
                   'migration' % drv.host_name)
    if virt_driver.block_device_info_get_mapping(block_device_info):
        refuse('instances with volumes cannot be live-migrated by '
               'nova-bhyve yet')
    if configdrive.required(instance) and not shared:
        refuse('instances with a config drive cannot be block-migrated by '
               'nova-bhyve yet (the read-only config drive would have to be '
               'copied before the destination starts)')
    vmdir = drv.store.vmdir(instance)
    if not drv.hypervisor.is_running(vmdir):
        refuse('the instance\'s VM is not running')
    _backend_check(drv, vmdir, bool(data.block_migration))
    return data


def disk_info(drv, instance):
    """The source's disks and VM spec, for the destination (JSON)."""
    vmdir = drv.store.vmdir(instance)
    spec = instance_store.read_spec(vmdir)
    disks = []
    for disk in spec.disks:
        info = vdsk.info(disk.path) if os.path.exists(disk.path) else {}
        disks.append({'path': disk.path, 'type': disk.format,
                      'virt_disk_size': info.get('virtual_size', 0),
                      'backing_file': info.get('backing_file') or '',
                      'disk_size': runner.allocated_bytes(disk.path)})
    return json.dumps({'vmdir': vmdir.path, 'spec': spec.to_json(),
                       'disks': disks})


# -- destination ------------------------------------------------------------

def _localize_spec(drv, context, instance, spec, source_dir, vmdir):
    """The source's spec with this host's paths and free console ports."""
    for disk in spec.disks:
        if os.path.dirname(os.path.abspath(disk.path)) == \
                os.path.abspath(source_dir):
            disk.path = os.path.join(vmdir.path, os.path.basename(disk.path))
    _local_boot_and_consoles(drv, context, instance, spec)
    return spec


def _local_boot_and_consoles(drv, context, instance, spec):
    """This host's kernel/ramdisk copies; the source's console ports where
    they are free here (another host), new ones otherwise - never
    releasing the source's allocation (same host: same process)."""
    kernel, ramdisk = image_cache.fetch_kernel(
        context, instance.kernel_id, instance.ramdisk_id,
        drv.image_cache_dir)
    if spec.boot.kernel:
        spec.boot.kernel = kernel
    if spec.boot.ramdisk:
        spec.boot.ramdisk = ramdisk
    c = spec.consoles
    if c.serial_port and not consoles.port_free(c.serial_host,
                                                c.serial_port):
        c.serial_host = c.serial_port = None
    consoles.prepare(spec, drv.hypervisor)


def _create_disks(drv, context, instance, spec, info):
    """Empty disks the source mirrors into: overlays over this host's copy
    of the same image (only the top layer moves), plain images otherwise.
    Returns the indices of the overlay disks."""
    backed = []
    by_path = {os.path.basename(d['path']): d for d in info['disks']}
    for i, disk in base.migrated_disks(spec):
        src = by_path[os.path.basename(disk.path)]
        size = int(src['virt_disk_size'])
        if src['backing_file'] and i == 0 and instance.image_ref:
            base_path, base_fmt = image_cache.fetch_image(
                context, instance.image_ref, drv.image_cache_dir)
            vdsk.create(disk.path, 'qcow2', size, backing=base_path,
                        backing_fmt=base_fmt)
            backed.append(i)
        else:
            vdsk.create(disk.path, disk.format, size)
    return backed


def _plug_ports(drv, instance, network_info, spec):
    """Plug the ports here; the spec's NICs keep the models the source's
    VM has (the device model must be identical)."""
    models = {n.mac: n.model for n in spec.nics}
    spec.nics = drv.vifs.plug_all(instance, network_info)
    for nic in spec.nics:
        nic.model = models.get(nic.mac, nic.model)


def _incoming_policy(spec, info):
    """The policy the source will make (same configuration, same data
    estimate): the destination must enable what it wants too (post-copy)."""
    data = spec.memory_mb * units.Mi
    if info:
        data += sum(int(d.get('disk_size') or 0) for d in info['disks'])
    return runner.policy_factory(data, runner.bandwidth_mibps())


def pre_live_migration(drv, context, instance, block_device_info,
                       network_info, disk_info_json, data):
    if data.is_shared_instance_path:
        return _pre_live_migration_shared(drv, context, instance,
                                          network_info, data)
    if not data.block_migration or not disk_info_json:
        raise exception.MigrationError(
            reason='local disks need a block migration')
    info = json.loads(disk_info_json)
    spec = guest.VMSpec.from_json(info['spec'])
    _check_machine(drv, spec.machine)
    vmdir = drv.store.vmdir(instance, must_exist=False)
    if os.path.exists(vmdir.path):
        raise exception.DestinationDiskExists(path=vmdir.path)
    os.makedirs(vmdir.path)
    plugged = False
    try:
        incoming.mark(vmdir, drv.host_name or CONF.host)
        spec = _localize_spec(drv, context, instance, spec, info['vmdir'],
                              vmdir)
        backed = _create_disks(drv, context, instance, spec, info)
        plugged = True
        _plug_ports(drv, instance, network_info, spec)
        instance_store.write_spec(vmdir, spec)
        address = inbound_address()
        endpoint = drv.hypervisor.prepare_incoming(
            spec, vmdir, address, block=True,
            policy=_incoming_policy(spec, info))
    except Exception:
        LOG.exception('preparing the live migration failed; removing what '
                      'it made', instance=instance)
        drv.remove_instance_dir(vmdir)
        if plugged:
            drv.vifs.unplug_all(instance, network_info)
        raise
    data.target_connect_addr = json.dumps(
        {'endpoint': endpoint.to_json(), 'backed': backed})
    LOG.info('waiting for the live migration on %s', endpoint.uri,
             instance=instance)
    return data


def _pre_live_migration_shared(drv, context, instance, network_info, data):
    """Shared instances path: the disks are already here; start the VM in
    its own runtime directory inside the instance directory."""
    vmdir = drv.store.vmdir(instance)
    runtime = incoming.runtime_dir(vmdir)
    spec = instance_store.read_spec(vmdir)
    _check_machine(drv, spec.machine)
    shutil.rmtree(runtime.path, ignore_errors=True)
    os.makedirs(runtime.path)
    plugged = False
    try:
        incoming.mark(runtime, drv.host_name or CONF.host)
        _local_boot_and_consoles(drv, context, instance, spec)
        plugged = True
        _plug_ports(drv, instance, network_info, spec)
        instance_store.write_spec(runtime, spec)
        endpoint = drv.hypervisor.prepare_incoming(
            spec, runtime, inbound_address(), block=False,
            policy=_incoming_policy(spec, None))
    except Exception:
        LOG.exception('preparing the live migration failed; removing what '
                      'it made', instance=instance)
        try:
            drv.hypervisor.kill(runtime)
        finally:
            shutil.rmtree(runtime.path, ignore_errors=True)
        if plugged:
            drv.vifs.unplug_all(instance, network_info)
        raise
    data.target_connect_addr = json.dumps(
        {'endpoint': endpoint.to_json(), 'backed': []})
    LOG.info('waiting for the live migration on %s (shared instances '
             'path)', endpoint.uri, instance=instance)
    return data


def post_at_destination(drv, instance, network_info):
    vmdir = drv.store.vmdir(instance)
    runtime = incoming.runtime_dir(vmdir)
    if os.path.isdir(runtime.path):
        # shared instances path: the source VM is gone (post_live_migration
        # on the source); the sockets keep working under their new names
        drv.hypervisor.finish_incoming(runtime)
        if drv.hypervisor.adopt_incoming(runtime, vmdir):
            shutil.rmtree(runtime.path, ignore_errors=True)
    else:
        drv.hypervisor.finish_incoming(vmdir)
    incoming.unmark(vmdir)
    drv.vifs.plug_all(instance, network_info)      # idempotent
    drv.watcher.watch(vmdir)
    LOG.info('live migration finished: the guest runs here',
             instance=instance)


def rollback_at_destination(drv, instance, network_info, destroy_disks):
    """Kill the incoming VM, remove its directory, unplug its ports."""
    vmdir = drv.store.vmdir_for(instance.uuid)
    if os.path.isdir(vmdir.path):
        if not incoming.is_marked(vmdir):
            LOG.warning('rollback of a live migration: %s holds no incoming '
                        'migration; left alone', vmdir.path,
                        instance=instance)
        else:
            drv.remove_instance_dir(vmdir)
    drv.vifs.unplug_all(instance, network_info)


def after_restart_at_destination(drv, vmdir):
    """init_host found ``vmdir`` holding an incoming live migration. If
    this host receives it and its pre-copy stream is still loading, the
    restart lost what this process held for it (the resume listener): the
    incoming VM is stopped, the source fails the migration when its stream
    breaks, keeps the guest, and Nova's rollback (block migration) or the
    source's own clean-up (shared instances path) removes the rest here.
    Past that point - post-copy, or the memory copy completed - it is left
    alone: the guest's state is here, or a resume may be in flight; the
    source completes (Nova's post step runs the guest here) or, when its
    resume request finds no listener after a block migration, rolls back
    (runner.Migration._resume_destination)."""
    runtime = incoming.runtime_dir(vmdir)
    vm = runtime if os.path.isdir(runtime.path) else vmdir
    if incoming.receiving_host(vm) != drv.host_name:
        LOG.info('instance %s: incoming live migration (of %s)', vmdir.uuid,
                 incoming.receiving_host(vm) or 'an unrecorded host')
        return
    try:
        status = drv.hypervisor.stop_unfinished_incoming(vm)
    except NotImplementedError:
        status = None
    if status is None:
        LOG.info('instance %s: incoming live migration, left to its source',
                 vmdir.uuid)
        return
    LOG.warning('instance %s: nova-compute restarted while a live migration '
                'to this host was sending memory (%s): the incoming VM is '
                'stopped; the source keeps the guest and rolls the migration '
                'back', vmdir.uuid, status)


def end_source_vm(drv, instance, data):
    if not (data is not None and 'is_shared_instance_path' in data and
            data.is_shared_instance_path):
        return
    vmdir = drv.store.vmdir_for(instance.uuid)
    drv.watcher.unwatch(instance.uuid)
    try:
        consoles.release_serial(instance_store.read_spec(vmdir))
    except (OSError, ValueError, TypeError):
        pass
    drv.hypervisor.kill(vmdir)
    LOG.info('source VM ended after the live migration (shared instances '
             'path: the directory stays)', instance=instance)


# -- source -------------------------------------------------------------------

def abort_orphaned(drv, instance):
    """live_migration_abort with no migration thread in this process: Nova
    calls it from its start-up (ComputeManager._reset_live_migration) for a
    live migration still 'running' when this nova-compute stopped. The VM
    process outlived nova-compute and may still be migrating - or have
    completed the memory copy and wait, stopped, for a post step that never
    comes. Stop the migration and run the guest here again (Nova keeps the
    instance on this host); NoActiveMigrationForInstance when there is
    nothing to stop, MigrationError when it cannot be taken back."""
    vmdir = drv.store.vmdir(instance, must_exist=False)
    if drv.hypervisor.pid(vmdir) is None:
        raise exception.NoActiveMigrationForInstance(instance_id=instance.uuid)
    try:
        found = drv.hypervisor.cancel_orphaned_migration(
            vmdir, resume=instance.vm_state != vm_states.PAUSED)
    except NotImplementedError:
        raise exception.NoActiveMigrationForInstance(instance_id=instance.uuid)
    except base.HypervisorError as e:
        LOG.error('live migration found running after a nova-compute '
                  'restart cannot be cancelled: %s', e, instance=instance)
        raise exception.MigrationError(reason=str(e))
    if found is None:
        raise exception.NoActiveMigrationForInstance(instance_id=instance.uuid)
    LOG.warning('live migration found %s after a nova-compute restart, with '
                'nothing driving it: cancelled, the guest runs on this host. '
                'The destination VM exits by itself when its stream breaks; '
                'after a completed memory copy it stays paused there, and '
                'the destination\'s instance directory and ports stay too '
                '(Nova calls no rollback there in this case).', found,
                instance=instance)
    drv.watcher.watch(vmdir)


