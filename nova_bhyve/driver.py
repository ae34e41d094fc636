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
from nova import objects
from nova.objects import fields as obj_fields
from nova.virt import driver
from nova.virt import hardware
from nova.virt import images
from nova.virt import node as virt_node
from oslo_concurrency import lockutils
from oslo_log import log as logging
from oslo_serialization import jsonutils
from oslo_utils import excutils
from oslo_utils import units
from oslo_utils import uuidutils

from nova_bhyve.migration import cold as cold_migration
from nova_bhyve import conf
from nova_bhyve import diagnostics
from nova_bhyve.devices import configdrive
from nova_bhyve.devices import consoles
from nova_bhyve import events
from nova_bhyve import guest
from nova_bhyve import host
from nova_bhyve.migration import live as live_migration
from nova_bhyve.hypervisor import backends
from nova_bhyve import rescue
from nova_bhyve.net import vif as network
from nova_bhyve.hypervisor import base
from nova_bhyve.storage import snapshot
from nova_bhyve.storage import image_cache as storage
from nova_bhyve.storage import vdsk
from nova_bhyve.devices import volumes
from nova_bhyve.migration import warm as warm_migration

LOG = logging.getLogger(__name__)
CONF = conf.CONF

ROOT_DISK = 'disk'


def _capabilities():
    caps = dict(driver.ComputeDriver.capabilities)
    caps.update({
        'supports_image_type_raw': True,
        'supports_image_type_qcow2': True,
        'supports_image_type_vmdk': True,
        'supports_image_type_vdi': True,
        'supports_image_type_vhd': True,
        # instance files are host-local and are rebuilt from the image
        'supports_evacuate': True,
        # resize/migrate keep <uuid>_resize next to the new <uuid>
        'supports_migrate_to_same_host': True,
    })
    return caps


class BhyveDriver(driver.ComputeDriver):
    capabilities = _capabilities()

    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi)
        self.hypervisor = backends.get(CONF.bhyve.hypervisor)
        # Read once: each driver keeps its own tree even if several run in
        # one process (Nova's functional tests run two computes that way).
        self.instances_path = CONF.instances_path
        self.image_cache_dir = storage.cache_dir(self.instances_path)
        self._host = None
        self._watcher = events.LifecycleWatcher(self.hypervisor,
                                                self.emit_event)
        self.vifs = network.VifPlugger()
        # instance uuid -> live_migration.Migration running from here
        self._live_migrations = {}
        # hot-plug (NICs, volume extend) only where the backend has it
        # (QEMU; not bhyve)
        self.capabilities = dict(
            self.capabilities,
            supports_attach_interface=hasattr(self.hypervisor, 'attach_nic'),
            supports_extend_volume=self.hypervisor.hotplug_ports > 0)

    # -- helpers --

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
        # only <uuid>: not <uuid>_resize (a resize's kept source copy)
        vmdirs = [self._vmdir_for_uuid(n) for n in sorted(names)
                  if uuidutils.is_uuid_like(n)]
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
        self.hypervisor.discard_saved_state(vmdir)   # a fresh boot
        self._prepare_consoles(spec, vmdir)
        _rotate_console_log(vmdir.console_log,
                            CONF.bhyve.console_log_keep_bytes)
        try:
            self.hypervisor.start(spec, vmdir)
        except base.HypervisorError as e:
            raise exception.InstanceDeployFailure(reason=str(e))
        self._watcher.watch(vmdir)

    # -- host --

    def init_host(self, host):
        self._host = host
        os.makedirs(self.instances_path, exist_ok=True)
        cold_migration.register_compute(host, self.instances_path)
        info = self.hypervisor.host_info()
        LOG.info('nova-bhyve on %s: %s backend, version %s', host,
                 info['hypervisor_type'], info['hypervisor_version'])
        for vmdir in self._vmdirs():
            state = self.hypervisor.power_state(vmdir)
            LOG.info('adopted instance %s (power state %s)', vmdir.uuid,
                     power_state.STATE_MAP.get(state, state))
            if live_migration.is_incoming(vmdir):
                # not ours yet: the source's Nova owns it until the
                # migration's post step (or rollback) reaches this host
                live_migration.after_restart_at_destination(self, vmdir)
                continue
            if state not in (power_state.SHUTDOWN, power_state.CRASHED,
                             power_state.SUSPENDED):
                self._watcher.watch(vmdir)
                try:
                    consoles.adopt(self._load_spec(vmdir))
                except (OSError, ValueError, TypeError):
                    pass

    def cleanup_host(self, host):
        self._watcher.stop_all()

    def get_available_nodes(self, refresh=False):
        return [self._host or CONF.host]

    def get_nodenames_by_uuid(self, refresh=False):
        # The node uuid is read once per driver, as the libvirt driver
        # does: it is process-wide in Nova, and Nova's functional harness
        # gives each compute of one process its own while it starts.
        node_uuid = getattr(self, '_node_uuid', None)
        if node_uuid is None:
            node_uuid = self._node_uuid = virt_node.get_local_node_uuid()
        return {node_uuid: self.get_available_nodes()[0]}

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

    # -- instances --

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
        self._refuse_larger_than_host(instance.flavor)
        _refuse_unsupported(instance, network_info, block_device_info)
        network.validate(network_info)
        nic_model = _nic_model(image_meta)
        vmdir = self._vmdir(instance, must_exist=False)
        if os.path.exists(vmdir.spec):
            raise exception.InstanceExists(name=instance.name)
        os.makedirs(vmdir.path, exist_ok=True)
        plugged = False
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
            plugged = True
            spec.nics = self._plug_vifs_and_wait(instance, network_info)
            for nic in spec.nics:
                nic.model = nic_model
            self._save_spec(spec, vmdir)
            if power_on:
                self._start(vmdir, spec)
        except Exception:
            LOG.exception('spawn of %s failed; removing what it made',
                          instance.uuid, instance=instance)
            self._remove(vmdir)
            if plugged:
                self.vifs.unplug_all(instance, network_info)
            raise
        LOG.info('instance %s spawned', instance.uuid, instance=instance)

    def _plug_vifs_and_wait(self, instance, network_info):
        """Plug the VIFs; then wait until Neutron reports each port that
        was not active yet as wired (network-vif-plugged), before the guest
        runs - as the libvirt driver does: a guest that boots first misses
        its DHCP. Nova's [DEFAULT] vif_plugging_timeout (0: do not wait) and
        vif_plugging_is_fatal apply. Returns the NICs."""
        events = network.plug_events(network_info)
        timeout = CONF.vif_plugging_timeout
        if not events or not timeout:
            return self.vifs.plug_all(instance, network_info)
        nics = []
        try:
            with self.virtapi.wait_for_instance_event(
                    instance, events, timeout=timeout,
                    error_callback=_vif_plug_failed):
                nics = self.vifs.plug_all(instance, network_info)
        except exception.InstanceEventTimeout:
            LOG.warning('no %s from Neutron within %d s (vm_state %s, '
                        'task_state %s)', ', '.join(n for n, _ in events),
                        timeout, instance.vm_state, instance.task_state,
                        instance=instance)
            if CONF.vif_plugging_is_fatal:
                raise exception.VirtualInterfaceCreateException()
        return nics

    @staticmethod
    def _refuse_larger_than_host(flavor):
        """InvalidInput (Nova aborts the build or the move with it as the
        instance's fault, no reschedule) before anything is made."""
        guest.validate_flavor_fits_host(flavor, host.vcpus(),
                                        host.memory_mb()[0])

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
        if destroy_vifs:
            self.unplug_vifs(instance, network_info)
        if destroy_disks and os.path.isdir(vmdir.path):
            self._remove(vmdir)

    # -- networking --

    def plug_vifs(self, instance, network_info):
        """Plug (again) the VIFs of an existing instance: idempotent, an
        existing tap - one a running VM holds open - is kept."""
        self.vifs.plug_all(instance, network_info)

    def unplug_vifs(self, instance, network_info):
        self.vifs.unplug_all(instance, network_info)

    def attach_interface(self, context, instance, image_meta, vif):
        vmdir = self._vmdir(instance)
        if not getattr(self.hypervisor, 'attach_nic', None):
            raise exception.InterfaceAttachFailed(instance_uuid=instance.uuid)
        spec = self._load_spec(vmdir)
        model = _nic_model(image_meta)
        nic = self.vifs.plug(instance, vif)
        nic.model = model
        try:
            if self.hypervisor.is_running(vmdir):
                used = self.hypervisor.used_hotplug_ports(vmdir)
                free = [p for p in ('hp%d' % i for i in
                                    range(spec.hotplug_ports))
                        if p not in used]
                if not free:
                    raise exception.InvalidInput(
                        reason='no free PCIe slot for another NIC (%d '
                               'hot-plug slots)' % spec.hotplug_ports)
                self.hypervisor.attach_nic(vmdir, nic, free[0])
            spec.nics = [n for n in spec.nics if n.mac != nic.mac] + [nic]
            self._save_spec(spec, vmdir)
        except Exception as e:
            LOG.error('attaching port %s failed: %s', vif['id'], e,
                      instance=instance)
            self.vifs.unplug(instance, vif)
            raise exception.InterfaceAttachFailed(instance_uuid=instance.uuid)

    def detach_interface(self, context, instance, vif):
        vmdir = self._vmdir(instance)
        spec = self._load_spec(vmdir)
        nic = network.nic_for(vif)
        if self.hypervisor.is_running(vmdir):
            try:
                self.hypervisor.detach_nic(vmdir, nic)
            except base.HypervisorError as e:
                LOG.error('detaching port %s failed: %s', vif['id'], e,
                          instance=instance)
                raise exception.InterfaceDetachFailed(
                    instance_uuid=instance.uuid)
        spec.nics = [n for n in spec.nics if n.mac != nic.mac]
        self._save_spec(spec, vmdir)
        self.vifs.unplug(instance, vif)

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

    # -- pause / suspend / snapshot / diagnostics --

    def pause(self, instance):
        self.hypervisor.pause(self._vmdir(instance))

    def unpause(self, instance):
        self.hypervisor.unpause(self._vmdir(instance))

    def suspend(self, context, instance):
        """Save memory + device state to the instance directory and end the
        VM process (see Hypervisor.save); SUSPENDED while the file exists."""
        vmdir = self._vmdir(instance)
        if not self.hypervisor.can_save():
            raise NotImplementedError(
                '%s cannot save VM state on this host' % self.hypervisor.name)
        try:
            self.hypervisor.save(vmdir)
        except base.HypervisorError as e:
            raise exception.InstanceSuspendFailure(reason=str(e))

    def resume(self, context, instance, network_info, block_device_info=None,
               share_info=None):
        vmdir = self._vmdir(instance)
        if not self.hypervisor.can_save():
            raise NotImplementedError(
                '%s cannot restore VM state on this host'
                % self.hypervisor.name)
        try:
            self.hypervisor.restore(self._load_spec(vmdir), vmdir)
        except base.HypervisorError as e:
            raise exception.InstanceResumeFailure(reason=str(e))
        self._watcher.watch(vmdir)

    def snapshot(self, context, instance, image_id, update_task_state):
        vmdir = self._vmdir(instance)
        snapshot.snapshot(self.hypervisor, vmdir, self._load_spec(vmdir),
                          context, instance, image_id, update_task_state)

    def _stats(self, instance):
        vmdir = self._vmdir(instance)
        state = self.hypervisor.power_state(vmdir)
        stats = None
        if state in (power_state.RUNNING, power_state.PAUSED):
            try:
                stats = self.hypervisor.stats(vmdir, self._load_spec(vmdir))
            except (base.HypervisorError, OSError) as e:
                LOG.warning('no runtime statistics: %s', e, instance=instance)
        return state, stats

    def get_instance_diagnostics(self, instance):
        state, stats = self._stats(instance)
        return diagnostics.instance_diagnostics(
            state, stats, self.hypervisor.name,
            config_drive=configdrive.required(instance))

    def get_diagnostics(self, instance):
        return diagnostics.legacy_diagnostics(self._stats(instance)[1])


    # -- cold migration / resize (files moved by cold_migration) --

    def migrate_disk_and_power_off(self, context, instance, dest,
                                   flavor, network_info,
                                   block_device_info=None,
                                   timeout=0, retry_interval=0):
        vmdir = self._vmdir(instance)
        spec = self._load_spec(vmdir)
        disks = cold_migration.instance_disks(vmdir.path, spec)
        root_size = vdsk.info(vmdir.disk(ROOT_DISK))['virtual_size']
        if flavor.root_gb and flavor.root_gb * units.Gi < root_size:
            raise exception.InstanceFaultRollback(
                inner_exception=exception.ResizeError(
                    reason='the root disk is %d bytes; flavor %s has only '
                           '%d GiB: disks cannot shrink' % (
                               root_size, flavor.name, flavor.root_gb)))
        dest_compute = _migration_dest_compute(context, instance)
        if dest_compute == self._host:
            target = vmdir.path
        else:
            target = os.path.join(cold_migration.target_instances_path(
                dest_compute, self.instances_path), instance.uuid)
        copier = cold_migration.copier_for(dest, dest_compute)
        was_running = self.hypervisor.is_running(vmdir)
        mode = warm_migration.choose(self.hypervisor, vmdir, spec, flavor,
                                     disks)
        warm = None
        if mode.warm:
            self._watcher.unwatch(instance.uuid)
            warm = warm_migration.save(self.hypervisor, vmdir, spec, context,
                                       self._host, instance)
            if warm is None:
                mode = warm_migration.Mode(warm_migration.COLD,
                                           'saving the VM state failed')
        LOG.info('migrating to %s: %s migration, %s', dest_compute or dest,
                 mode.mode, mode.reason, instance=instance)
        if warm is None:
            self.power_off(instance, timeout, retry_interval)
        self._watcher.unwatch(instance.uuid)
        try:
            disk_info = cold_migration.move_out(vmdir.path, target, disks,
                                                copier, warm=warm)
        except cold_migration.MigrationCopyError as e:
            if warm:
                self._resume_saved(context, instance, vmdir)
            elif was_running:
                self._start(vmdir)
            raise exception.InstanceFaultRollback(
                inner_exception=exception.ResizeError(
                    reason='moving the disks to %s failed: %s' % (dest, e)))
        # the destination connects the volumes again (finish_migration)
        _disconnect_volumes(block_device_info)
        if dest_compute != self._host:
            # the destination plugs the ports again (finish_migration)
            self.vifs.unplug_all(instance, network_info)
        return disk_info

    def finish_migration(self, context, migration, instance, disk_info,
                         network_info, image_meta, resize_instance,
                         allocations, block_device_info=None, power_on=True,
                         share_info=None):
        self._refuse_larger_than_host(instance.flavor)
        vmdir = self._vmdir(instance, must_exist=False)
        warm = warm_migration.parse(disk_info)
        root = guest.Disk(path=vmdir.disk(ROOT_DISK),
                          format=self.hypervisor.instance_disk_format)
        actual = vdsk.info(root.path)
        if actual['format'] != root.format:
            raise exception.ResizeError(
                reason='the moved root disk is %s; the %s hypervisor here '
                       'needs %s' % (actual['format'], self.hypervisor.name,
                                     root.format))
        cache = self.image_cache_dir
        if actual['backing_file']:
            base, base_fmt = storage.fetch_image(context, instance.image_ref,
                                                 cache)
            storage.rebase_root_disk(root.path, base, base_fmt)
        kernel, ramdisk = self._fetch_kernel(context, instance.kernel_id,
                                             instance.ramdisk_id)
        spec = guest.build(instance, image_meta, root, kernel, ramdisk)
        spec.hotplug_ports = self.hypervisor.hotplug_ports
        if configdrive.required(instance):
            # made again here: the metadata (network_data.json) is this
            # host's view of the ports
            spec.disks.append(configdrive.build(
                context, instance, vmdir.path, network_info=network_info))
        spec.disks.extend(_connect_volumes(block_device_info))
        if instance.flavor.root_gb:
            storage.grow_disk(root.path, instance.flavor.root_gb * units.Gi)
        network.validate(network_info)
        spec.nics = self._plug_vifs_and_wait(instance, network_info)
        nic_model = _nic_model(image_meta)
        for nic in spec.nics:
            nic.model = nic_model
        self._save_spec(spec, vmdir)
        resumed = False
        if power_on and warm:
            size = vdsk.info(root.path)['virtual_size']
            grown = [(0, size)] if size > actual['virtual_size'] else []
            resumed = self._resume_saved(context, instance, vmdir, spec,
                                         warm.get('signature'), grown)
        elif power_on:
            self._start(vmdir, spec)
        else:
            self.hypervisor.discard_saved_state(vmdir)
        LOG.info('instance %s moved here (%s, %s)', instance.uuid,
                 'resized' if resize_instance else 'same flavor',
                 'warm: resumed from its saved state' if resumed else
                 'cold: booted' if power_on else 'cold: not started',
                 instance=instance)

    def _resume_saved(self, context, instance, vmdir, spec=None,
                      signature=None, grown_disks=()):
        """Warm migration: run the VM again from the state saved in
        ``vmdir``; boot it when that fails (warm_migration.restore).
        True if the guest was resumed."""
        spec = spec or self._load_spec(vmdir)
        self._prepare_consoles(spec, vmdir)
        if warm_migration.restore(self.hypervisor, spec, vmdir, context,
                                  self._host, instance, signature,
                                  grown_disks):
            self._watcher.watch(vmdir)
            return True
        self._start(vmdir, spec)
        return False

    def _fetch_kernel(self, context, kernel_id, ramdisk_id):
        kernel = ramdisk = None
        if kernel_id:
            kernel, _ = storage.fetch_image(context, kernel_id,
                                            self.image_cache_dir,
                                            disk_image=False)
        if ramdisk_id:
            ramdisk, _ = storage.fetch_image(context, ramdisk_id,
                                             self.image_cache_dir,
                                             disk_image=False)
        return kernel, ramdisk

    def confirm_migration(self, context, migration, instance, network_info):
        vmdir = self._vmdir_for_uuid(instance.uuid)
        if cold_migration.discard_kept(vmdir.path):
            LOG.info('resize confirmed: removed the source copy',
                     instance=instance)

    def finish_revert_migration(self, context, instance, network_info,
                                migration, block_device_info=None,
                                power_on=True, share_info=None):
        vmdir = self._vmdir_for_uuid(instance.uuid)
        if os.path.isdir(cold_migration.resize_path(vmdir.path)):
            if os.path.isdir(vmdir.path):     # same host: the new copy
                self._remove(vmdir)
            cold_migration.restore_kept(vmdir.path)
        vmdir = self._vmdir(instance)
        _connect_volumes(block_device_info)     # the kept spec names them
        self._plug_vifs_and_wait(instance, network_info)   # idempotent
        if not power_on:
            self.hypervisor.discard_saved_state(vmdir)
        elif self.hypervisor.is_running(vmdir):
            pass
        elif os.path.exists(vmdir.saved_state):     # a warm migration's
            self._resume_saved(context, instance, vmdir)
        else:
            self._start(vmdir)

    # -- live migration (nova_bhyve.migration.live) --

    def check_can_live_migrate_destination(self, context, instance,
                                           src_compute_info, dst_compute_info,
                                           block_migration=False,
                                           disk_over_commit=False):
        return live_migration.dest_check(self, instance, block_migration,
                                         disk_over_commit)

    def cleanup_live_migration_destination_check(self, context,
                                                 dest_check_data):
        live_migration.cleanup_dest_check(self, dest_check_data)

    def check_can_live_migrate_source(self, context, instance,
                                      dest_check_data, block_device_info=None):
        return live_migration.source_check(self, instance, dest_check_data,
                                           block_device_info)

    def get_instance_disk_info(self, instance, block_device_info=None):
        return live_migration.disk_info(self, instance)

    def pre_live_migration(self, context, instance, block_device_info,
                           network_info, disk_info, migrate_data):
        return live_migration.pre_live_migration(
            self, context, instance, block_device_info, network_info,
            disk_info, migrate_data)

    def live_migration(self, context, instance, dest, post_method,
                       recover_method, block_migration=False,
                       migrate_data=None):
        migration = live_migration.Migration(self, context, instance, dest,
                                             migrate_data)
        self._live_migrations[instance.uuid] = migration
        try:
            migration.run(post_method, recover_method, block_migration)
        finally:
            self._live_migrations.pop(instance.uuid, None)

    def _running_migration(self, instance):
        migration = self._live_migrations.get(instance.uuid)
        if migration is None:
            raise exception.NoActiveMigrationForInstance(
                instance_id=instance.uuid)
        return migration

    def live_migration_abort(self, instance):
        migration = self._live_migrations.get(instance.uuid)
        if migration is None:
            # nova-compute restarted during the migration
            live_migration.abort_orphaned(self, instance)
            return
        migration.request('abort')

    def live_migration_force_complete(self, instance):
        self._running_migration(instance).request('force_complete')

    def post_live_migration(self, context, instance, block_device_info,
                            migrate_data=None):
        live_migration.end_source_vm(self, instance, migrate_data)

    def post_live_migration_at_source(self, context, instance, network_info):
        self.vifs.unplug_all(instance, network_info)

    def post_live_migration_at_destination(self, context, instance,
                                           network_info,
                                           block_migration=False,
                                           block_device_info=None):
        live_migration.post_at_destination(self, instance, network_info)

    def rollback_live_migration_at_destination(self, context, instance,
                                               network_info,
                                               block_device_info,
                                               destroy_disks=True,
                                               migrate_data=None):
        live_migration.rollback_at_destination(self, instance, network_info,
                                               destroy_disks)

    # -- host restarts --

    def resume_state_on_host_boot(self, context, instance, network_info,
                                  share_info, block_device_info=None):
        vmdir = self._vmdir(instance)
        if self.hypervisor.is_running(vmdir):
            return
        spec = rescue.load_spec(vmdir) if rescue.is_rescued(vmdir) else None
        LOG.info('starting the instance again after a host restart',
                 instance=instance)
        self._start(vmdir, spec)

    # -- rescue --

    def rescue(self, context, instance, network_info, image_meta,
               rescue_password, block_device_info, share_info=None):
        vmdir = self._vmdir(instance)
        spec = self._load_spec(vmdir)
        image_id = (image_meta.id if 'id' in image_meta else None) or \
            instance.image_ref
        base, base_fmt = storage.fetch_image(context, image_id,
                                             self.image_cache_dir)
        props = images.get_info(context, image_id).get('properties') or {}
        if image_id == instance.image_ref:
            kernel_id = props.get('kernel_id') or instance.kernel_id
            ramdisk_id = props.get('ramdisk_id') or instance.ramdisk_id
        else:
            kernel_id, ramdisk_id = (props.get('kernel_id'),
                                     props.get('ramdisk_id'))
        kernel, ramdisk = self._fetch_kernel(context, kernel_id, ramdisk_id)
        disk = guest.Disk(path=rescue.disk_path(vmdir),
                          format=self.hypervisor.instance_disk_format)
        rescue_spec = rescue.build_spec(
            spec, guest.build(instance, image_meta, disk, kernel, ramdisk))
        self._watcher.unwatch(instance.uuid)
        self.hypervisor.kill(vmdir)
        try:
            storage.create_root_disk(base, base_fmt, disk.path, 0, image_id,
                                     disk_format=disk.format)
            rescue.save_spec(vmdir, rescue_spec)
            self._start(vmdir, rescue_spec)
        except Exception:
            with excutils.save_and_reraise_exception():
                self.hypervisor.kill(vmdir)
                rescue.remove(vmdir)
        LOG.info('instance rescued with image %s', image_id,
                 instance=instance)

    def unrescue(self, context, instance):
        vmdir = self._vmdir(instance)
        self._watcher.unwatch(instance.uuid)
        self.hypervisor.kill(vmdir)
        rescue.remove(vmdir)
        self._start(vmdir)

    # -- consoles (nova_bhyve.devices.consoles) --

    def get_serial_console(self, context, instance):
        return consoles.serial_console(self._load_spec(self._vmdir(instance)))

    def get_vnc_console(self, context, instance):
        vmdir = self._vmdir(instance)
        return consoles.vnc_console(
            self.hypervisor.vnc_port(vmdir, self._load_spec(vmdir)))

    # -- volumes (nova_bhyve.devices.volumes) --

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


def _connect_volumes(block_device_info):
    """Connect the instance's volumes on this host; their guest.Disks."""
    return [volumes.connect(bdm['connection_info'])
            for bdm in driver.block_device_info_get_mapping(
                block_device_info)]


def _disconnect_volumes(block_device_info):
    for bdm in driver.block_device_info_get_mapping(block_device_info):
        try:
            volumes.disconnect(bdm['connection_info'])
        except Exception as e:
            LOG.warning('disconnecting volume %s: %s',
                        volumes.volume_id(bdm['connection_info']), e)


def _vif_plug_failed(event_name, instance):
    LOG.error('Neutron reported failure on event %s', event_name,
              instance=instance)
    if CONF.vif_plugging_is_fatal:
        raise exception.VirtualInterfaceCreateException()


def _migration_dest_compute(context, instance):
    """The destination compute of the instance's migration in progress
    (Nova passes only the destination's address to the driver)."""
    try:
        return objects.Migration.get_by_instance_and_status(
            context, instance.uuid, 'migrating').dest_compute
    except exception.MigrationNotFoundByStatus:
        return None
def _nic_model(image_meta):
    """The NIC model the image asks for (hw_vif_model), virtio by default."""
    model = image_meta.properties.get('hw_vif_model', 'virtio')
    if model not in guest.NIC_MODELS:
        raise exception.InvalidInput(
            reason='hw_vif_model=%s is not supported by nova-bhyve '
                   '(supported: %s)' % (model, ', '.join(guest.NIC_MODELS)))
    return model


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
