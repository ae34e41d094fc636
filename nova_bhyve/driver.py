"""BhyveDriver: Nova's compute driver interface over the parts of nova_bhyve.

Kept thin on purpose: the VM spec is built by guest, disks by storage, VMs
are run by a hypervisor backend (bhyve on FreeBSD, QEMU on Linux), host facts
come from host. Operations not implemented here raise NotImplementedError
(inherited from ComputeDriver) and are not claimed in ``capabilities``.
"""
import os
import shutil

import os_resource_classes as orc
from nova.compute import power_state
from nova import exception
from nova.objects import fields as obj_fields
from nova.virt import driver
from nova.virt import hardware
from oslo_concurrency import lockutils
from oslo_log import log as logging
from oslo_serialization import jsonutils

from nova_bhyve import conf
from nova_bhyve import configdrive
from nova_bhyve import consoles
from nova_bhyve import events
from nova_bhyve import guest
from nova_bhyve import host
from nova_bhyve import hypervisor
from nova_bhyve.hypervisor import base
from nova_bhyve import storage
from nova_bhyve import volumes

LOG = logging.getLogger(__name__)
CONF = conf.CONF

ROOT_DISK = 'disk'


def _capabilities():
    caps = dict(driver.ComputeDriver.capabilities)
    caps.update({
        'supports_image_type_raw': True,
        'supports_image_type_qcow2': True,
    })
    return caps


class BhyveDriver(driver.ComputeDriver):
    capabilities = _capabilities()

    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi)
        self.hypervisor = hypervisor.get(CONF.bhyve.hypervisor)
        # Read once: each driver keeps its own tree even if several run in
        # one process (Nova's functional tests run two computes that way).
        self.instances_path = CONF.instances_path
        self.image_cache_dir = storage.cache_dir(self.instances_path)
        self._host = None
        self._watcher = events.LifecycleWatcher(self.hypervisor,
                                                self.emit_event)
        # volume extend is tested only where volumes hot-plug (QEMU)
        self.capabilities = dict(
            self.capabilities,
            supports_extend_volume=self.hypervisor.hotplug_ports > 0)

    # -- helpers ----------------------------------------------------------

    def _vmdir_for_uuid(self, uuid):
        return base.VMDir(os.path.join(self.instances_path, uuid))

    def _vmdir(self, instance, must_exist=True):
        vmdir = self._vmdir_for_uuid(instance.uuid)
        if must_exist and not os.path.exists(vmdir.spec):
            raise exception.InstanceNotFound(instance_id=instance.uuid)
        return vmdir

    def _vmdirs(self):
        try:
            names = os.listdir(self.instances_path)
        except FileNotFoundError:
            return []
        vmdirs = [self._vmdir_for_uuid(n) for n in sorted(names)]
        return [d for d in vmdirs if os.path.exists(d.spec)]

    @staticmethod
    def _load_spec(vmdir):
        with open(vmdir.spec) as f:
            return guest.VMSpec.from_json(f.read())

    @staticmethod
    def _save_spec(spec, vmdir):
        tmp = vmdir.spec + '.tmp'
        with open(tmp, 'w') as f:
            f.write(spec.to_json())
        os.rename(tmp, vmdir.spec)

    def _prepare_consoles(self, spec, vmdir):
        """Settle console ports before a start; persist them only if
        ``spec`` is the one in spec.json (not e.g. a transient rescue
        spec)."""
        before = spec.to_json()
        if consoles.prepare(spec, self.hypervisor):
            try:
                with open(vmdir.spec) as f:
                    saved = f.read() == before
            except OSError:
                saved = False
            if saved:
                self._save_spec(spec, vmdir)

    def _start(self, vmdir, spec=None):
        spec = spec or self._load_spec(vmdir)
        self._prepare_consoles(spec, vmdir)
        _rotate_console_log(vmdir.console_log,
                            CONF.bhyve.console_log_keep_bytes)
        try:
            self.hypervisor.start(spec, vmdir)
        except base.HypervisorError as e:
            raise exception.InstanceDeployFailure(reason=str(e))
        self._watcher.watch(vmdir)

    # -- host -------------------------------------------------------------

    def init_host(self, host):
        self._host = host
        os.makedirs(self.instances_path, exist_ok=True)
        info = self.hypervisor.host_info()
        LOG.info('nova-bhyve on %s: %s backend, version %s', host,
                 info['hypervisor_type'], info['hypervisor_version'])
        for vmdir in self._vmdirs():
            state = self.hypervisor.power_state(vmdir)
            LOG.info('adopted instance %s (power state %s)', vmdir.uuid,
                     power_state.STATE_MAP.get(state, state))
            if state not in (power_state.SHUTDOWN, power_state.CRASHED):
                self._watcher.watch(vmdir)
                try:
                    consoles.adopt(self._load_spec(vmdir))
                except (OSError, ValueError, TypeError):
                    pass

    def cleanup_host(self, host):
        self._watcher.stop_all()

    def get_available_nodes(self, refresh=False):
        return [self._host or CONF.host]

    def get_host_ip_addr(self):
        return CONF.my_ip

    def get_host_uptime(self):
        return host.uptime()

    def _used(self):
        vcpus = memory = 0
        for vmdir in self._vmdirs():
            try:
                spec = self._load_spec(vmdir)
            except (OSError, ValueError, TypeError):
                continue
            vcpus += spec.vcpus
            memory += spec.memory_mb
        return vcpus, memory

    def get_available_resource(self, nodename):
        os.makedirs(self.instances_path, exist_ok=True)
        mem_total, mem_used = host.memory_mb()
        disk_total, disk_used, disk_free = host.disk_gb(self.instances_path)
        vcpus_used, _ = self._used()
        info = self.hypervisor.host_info()
        return {
            'vcpus': host.vcpus(),
            'memory_mb': mem_total,
            'local_gb': disk_total,
            'vcpus_used': vcpus_used,
            'memory_mb_used': mem_used,
            'local_gb_used': disk_used,
            'hypervisor_type': info['hypervisor_type'],
            'hypervisor_version': info['hypervisor_version'],
            'hypervisor_hostname': nodename,
            'cpu_info': jsonutils.dumps(host.cpu_info()),
            'disk_available_least': disk_free,
            'supported_instances': [(obj_fields.Architecture.X86_64,
                                     info['hypervisor_type'],
                                     obj_fields.VMMode.HVM)],
            'numa_topology': None,
        }

    def update_provider_tree(self, provider_tree, nodename, allocations=None):
        mem_total, _ = host.memory_mb()
        disk_total = host.disk_gb(self.instances_path)[0]
        vcpus = host.vcpus()
        ratios = self._get_allocation_ratios(
            provider_tree.data(nodename).inventory)
        inventory = {
            orc.VCPU: {'total': vcpus, 'min_unit': 1, 'max_unit': vcpus,
                       'step_size': 1,
                       'allocation_ratio': ratios[orc.VCPU],
                       'reserved': CONF.reserved_host_cpus},
            orc.MEMORY_MB: {'total': mem_total, 'min_unit': 1,
                            'max_unit': mem_total, 'step_size': 1,
                            'allocation_ratio': ratios[orc.MEMORY_MB],
                            'reserved': CONF.reserved_host_memory_mb},
            orc.DISK_GB: {'total': disk_total, 'min_unit': 1,
                          'max_unit': disk_total, 'step_size': 1,
                          'allocation_ratio': ratios[orc.DISK_GB],
                          'reserved':
                              self._get_reserved_host_disk_gb_from_config()},
        }
        provider_tree.update_inventory(nodename, inventory)

    # -- instances --------------------------------------------------------

    def list_instance_uuids(self):
        return [d.uuid for d in self._vmdirs()]

    def list_instances(self):
        names = []
        for vmdir in self._vmdirs():
            try:
                names.append(self._load_spec(vmdir).name)
            except (OSError, ValueError, TypeError):
                LOG.warning('unreadable spec in %s', vmdir.path)
        return names

    def instance_exists(self, instance):
        return os.path.exists(self._vmdir_for_uuid(instance.uuid).spec)

    def get_info(self, instance, use_cache=True):
        vmdir = self._vmdir(instance)
        return hardware.InstanceInfo(
            state=self.hypervisor.power_state(vmdir))

    def spawn(self, context, instance, image_meta, injected_files,
              admin_password, allocations, network_info=None,
              block_device_info=None, power_on=True, accel_info=None):
        guest.validate_flavor(instance.flavor)
        _refuse_unsupported(instance, network_info, block_device_info)
        vmdir = self._vmdir(instance, must_exist=False)
        if os.path.exists(vmdir.spec):
            raise exception.InstanceExists(name=instance.name)
        os.makedirs(vmdir.path, exist_ok=True)
        try:
            cache = self.image_cache_dir
            base_path, base_fmt = storage.fetch_image(context, image_meta.id,
                                                      cache)
            kernel = ramdisk = None
            if instance.kernel_id:
                kernel, _ = storage.fetch_image(
                    context, instance.kernel_id, cache, disk_image=False)
            if instance.ramdisk_id:
                ramdisk, _ = storage.fetch_image(
                    context, instance.ramdisk_id, cache, disk_image=False)
            root = guest.Disk(path=vmdir.disk(ROOT_DISK),
                              format=self.hypervisor.instance_disk_format)
            spec = guest.build(instance, image_meta, root, kernel, ramdisk)
            spec.hotplug_ports = self.hypervisor.hotplug_ports
            if configdrive.required(instance):
                spec.disks.append(configdrive.build(
                    context, instance, vmdir.path, injected_files,
                    admin_password, network_info))
            storage.create_root_disk(base_path, base_fmt, root.path,
                                     instance.flavor.root_gb, image_meta.id,
                                     disk_format=root.format)
            self._save_spec(spec, vmdir)
            if power_on:
                self._start(vmdir, spec)
        except Exception:
            LOG.exception('spawn of %s failed; removing what it made',
                          instance.uuid, instance=instance)
            self._remove(vmdir)
            raise
        LOG.info('instance %s spawned', instance.uuid, instance=instance)

    def _remove(self, vmdir):
        self._watcher.unwatch(vmdir.uuid)
        try:
            consoles.release_serial(self._load_spec(vmdir))
        except (OSError, ValueError, TypeError):
            pass
        try:
            self.hypervisor.kill(vmdir)
        finally:
            shutil.rmtree(vmdir.path, ignore_errors=True)

    def destroy(self, context, instance, network_info, block_device_info=None,
                destroy_disks=True, destroy_secrets=True):
        vmdir = self._vmdir_for_uuid(instance.uuid)
        self._watcher.unwatch(instance.uuid)
        if os.path.isdir(vmdir.path):
            self.hypervisor.kill(vmdir)
        self.cleanup(context, instance, network_info, block_device_info,
                     destroy_disks, destroy_secrets=destroy_secrets)

    def cleanup(self, context, instance, network_info, block_device_info=None,
                destroy_disks=True, migrate_data=None, destroy_vifs=True,
                destroy_secrets=True):
        vmdir = self._vmdir_for_uuid(instance.uuid)
        if destroy_disks and os.path.isdir(vmdir.path):
            self._remove(vmdir)

    def delete_instance_files(self, instance):
        vmdir = self._vmdir_for_uuid(instance.uuid)
        if os.path.isdir(vmdir.path):
            self._remove(vmdir)
        return not os.path.exists(vmdir.path)

    def instance_on_disk(self, instance):
        return False    # instances_path is host-local until migration lands

    def reboot(self, context, instance, network_info, reboot_type,
               block_device_info=None, bad_volumes_callback=None,
               accel_info=None, share_info=None):
        vmdir = self._vmdir(instance)
        if reboot_type == 'SOFT' and self.hypervisor.is_running(vmdir):
            timeout = CONF.bhyve.wait_soft_reboot_seconds
            if self.hypervisor.shutdown(vmdir, timeout, timeout):
                LOG.info('soft reboot: guest powered off, starting it',
                         instance=instance)
                self._start(vmdir)
                return
            LOG.warning('soft reboot: guest did not power off within %d s, '
                        'doing a hard reboot', timeout, instance=instance)
        self.hypervisor.kill(vmdir)
        self._start(vmdir)

    def power_off(self, instance, timeout=0, retry_interval=0):
        vmdir = self._vmdir(instance)
        if timeout and self.hypervisor.shutdown(vmdir, timeout,
                                                retry_interval or timeout):
            LOG.info('guest powered off cleanly', instance=instance)
        self.hypervisor.kill(vmdir)

    def power_on(self, context, instance, network_info,
                 block_device_info=None, accel_info=None, share_info=None):
        vmdir = self._vmdir(instance)
        if not self.hypervisor.is_running(vmdir):
            self._start(vmdir)

    def get_console_output(self, context, instance):
        vmdir = self._vmdir(instance)
        limit = CONF.bhyve.console_log_max_bytes
        try:
            with open(vmdir.console_log, 'rb') as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - limit))
                return f.read(limit)
        except FileNotFoundError:
            return b''


    # -- consoles (nova_bhyve.consoles) -------------------------------------

    def get_serial_console(self, context, instance):
        return consoles.serial_console(self._load_spec(self._vmdir(instance)))

    def get_vnc_console(self, context, instance):
        vmdir = self._vmdir(instance)
        return consoles.vnc_console(
            self.hypervisor.vnc_port(vmdir, self._load_spec(vmdir)))

    # -- volumes (nova_bhyve.volumes) ---------------------------------------

    def get_volume_connector(self, instance):
        return volumes.connector_properties()

    def attach_volume(self, context, connection_info, instance, mountpoint,
                      disk_bus=None, device_type=None, encryption=None):
        if encryption:
            raise NotImplementedError('encrypted volumes')
        vmdir = self._vmdir(instance)
        with lockutils.lock('nova-bhyve-spec-' + instance.uuid):
            spec = self._load_spec(vmdir)
            disk = volumes.connect(connection_info)
            if volumes.find(spec, disk.serial):
                raise exception.InvalidVolume(
                    reason='volume %s is already attached' % disk.serial)
            if self.hypervisor.is_running(vmdir):
                if len([d for d in spec.disks if d.serial]) >= \
                        spec.hotplug_ports:
                    raise exception.TooManyDiskDevices(
                        maximum=spec.hotplug_ports)
                try:
                    self.hypervisor.attach_disk(vmdir, disk)
                except base.HypervisorError as e:
                    volumes.disconnect(connection_info)
                    raise exception.VolumeAttachFailed(
                        volume_id=disk.serial, reason=str(e))
            spec.disks.append(disk)
            self._save_spec(spec, vmdir)

    def detach_volume(self, context, connection_info, instance, mountpoint,
                      encryption=None):
        vmdir = self._vmdir(instance)
        vol_id = volumes.volume_id(connection_info)
        with lockutils.lock('nova-bhyve-spec-' + instance.uuid):
            spec = self._load_spec(vmdir)
            disk = volumes.find(spec, vol_id)
            if disk is None:
                raise exception.DiskNotFound(location=vol_id)
            if self.hypervisor.is_running(vmdir):
                try:
                    self.hypervisor.detach_disk(vmdir, disk)
                except base.HypervisorError as e:
                    raise exception.DeviceDetachFailed(device=vol_id,
                                                       reason=str(e))
            spec.disks.remove(disk)
            self._save_spec(spec, vmdir)
        volumes.disconnect(connection_info)

    def extend_volume(self, context, connection_info, instance,
                      requested_size):
        vmdir = self._vmdir(instance)
        spec = self._load_spec(vmdir)
        disk = volumes.find(spec, volumes.volume_id(connection_info))
        if disk is None:
            raise exception.DiskNotFound(
                location=volumes.volume_id(connection_info))
        # what Cinder really made it (never grow Cinder's storage here)
        size = volumes.size(disk.path)
        if size < requested_size:
            LOG.warning('volume %s is %d bytes, %d were requested',
                        disk.serial, size, requested_size, instance=instance)
        if self.hypervisor.is_running(vmdir):
            try:
                self.hypervisor.resize_disk(vmdir, disk, size)
            except base.HypervisorError as e:
                raise exception.VolumeExtendFailed(
                    volume_id=disk.serial, reason=str(e))


def _refuse_unsupported(instance, network_info, block_device_info):
    """Clear errors for what this driver cannot attach yet.

    InvalidInput makes Nova abort the build with this message as the fault
    instead of rescheduling to another host of the same kind.
    """
    if network_info:
        raise exception.InvalidInput(
            reason='network interfaces are not supported by nova-bhyve yet; '
                   'boot with networks=none')
    bdms = driver.block_device_info_get_mapping(block_device_info)
    if bdms:
        raise exception.InvalidInput(
            reason='volumes are not supported by nova-bhyve yet')
    if driver.block_device_info_get_ephemerals(block_device_info) or \
            driver.block_device_info_get_swap(block_device_info).get(
                'swap_size'):
        raise exception.InvalidInput(
            reason='ephemeral and swap disks are not supported by '
                   'nova-bhyve yet; use a flavor without them')


def _rotate_console_log(path, keep):
    """Keep the console log bounded: when it exceeds ``keep`` bytes, keep
    its last ``keep`` bytes. Called only while the VM is not running."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return
    if size <= keep:
        return
    with open(path, 'rb') as f:
        f.seek(size - keep)
        tail = f.read()
    with open(path, 'wb') as f:
        f.write(tail)
