"""BhyveDriver: Nova's compute driver interface over the parts of nova_bhyve.

Kept thin on purpose: the VM spec is built by guest, disks by storage,
instance directories are kept by instance_store, ports plugged by net,
devices by devices/, moves by migration/, and VMs are run by a hypervisor
backend (bhyve on FreeBSD, QEMU on Linux). Operations not implemented here
raise NotImplementedError (inherited from ComputeDriver) and are not
claimed in ``capabilities``. docs/architecture.md has the picture.

The migration modules take this driver and use its public members only:
``hypervisor``, ``store``, ``watcher``, ``vifs``, ``host_name``,
``instances_path``, ``image_cache_dir``, ``start_vm``, ``prepare_consoles``,
``remove_instance_dir``, ``root_disk``, ``new_spec``,
``resolve_machine``, ``plug_nics`` and ``power_off``.
"""
import os

from nova import exception
from nova.compute import power_state
from nova.virt import driver
from nova.virt import hardware
from nova.virt import images
from nova.virt import node as virt_node
from oslo_log import log as logging
from oslo_utils import excutils

from nova_bhyve import conf
from nova_bhyve import diagnostics
from nova_bhyve import events
from nova_bhyve import guest
from nova_bhyve import host
from nova_bhyve import instance_store
from nova_bhyve import rescue
from nova_bhyve.devices import configdrive
from nova_bhyve.devices import consoles
from nova_bhyve.devices import volumes
from nova_bhyve.hypervisor import backends
from nova_bhyve.hypervisor import base
from nova_bhyve.migration import cold
from nova_bhyve.migration import incoming
from nova_bhyve.migration import live
from nova_bhyve.migration import resize
from nova_bhyve.migration import runner
from nova_bhyve.net import hotplug
from nova_bhyve.net import vif as net_vif
from nova_bhyve.storage import disks
from nova_bhyve.storage import image_cache
from nova_bhyve.storage import snapshot

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


def _record_machine(instance, machine):
    """The versioned machine in the instance's image metadata, as Nova's
    libvirt driver records it (system_metadata image_hw_machine_type,
    saved with the instance by Nova after spawn): a live migration's
    destination reads it there (live.dest_check)."""
    if machine and instance.image_meta.properties.get(
            'hw_machine_type') != machine:
        instance.system_metadata['image_hw_machine_type'] = machine


class BhyveDriver(driver.ComputeDriver):
    capabilities = _capabilities()

    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi)
        self.hypervisor = backends.get(CONF.bhyve.hypervisor)
        # Read once: each driver keeps its own tree even if several run in
        # one process (Nova's functional tests run two computes that way).
        self.instances_path = CONF.instances_path
        self.store = instance_store.InstanceStore(self.instances_path)
        self.image_cache_dir = image_cache.cache_dir(self.instances_path)
        self.host_name = None
        self.watcher = events.LifecycleWatcher(self.hypervisor,
                                               self.emit_event)
        self.vifs = net_vif.VifPlugger()
        # instance uuid -> runner.Migration running from here
        self._live_migrations = {}
        self._node_uuid = None
        # hot-plug (NICs, volume extend) only where the backend has it
        # (QEMU; not bhyve)
        self.capabilities = dict(
            self.capabilities,
            supports_attach_interface=hasattr(self.hypervisor, 'attach_nic'),
            supports_extend_volume=self.hypervisor.hotplug_ports > 0,
            supports_migrate_to_same_host=CONF.bhyve.cold_migrate_to_same_host)

    # -- what the migration modules share with the driver --

    def start_vm(self, vmdir, spec=None):
        """Boot the VM of ``vmdir`` (its spec.json, or ``spec``: e.g. a
        rescue VM's) fresh, and watch it."""
        spec = spec or instance_store.read_spec(vmdir)
        self.hypervisor.discard_saved_state(vmdir)   # a fresh boot
        self.prepare_consoles(vmdir, spec)
        consoles.rotate_log(vmdir.console_log,
                            CONF.bhyve.console_log_keep_bytes)
        try:
            self.hypervisor.start(spec, vmdir)
        except base.HypervisorError as e:
            raise exception.InstanceDeployFailure(reason=str(e))
        self.watcher.watch(vmdir)

    def prepare_consoles(self, vmdir, spec):
        """Settle console ports before a start; keep them only in the spec
        they came from (not in a transient rescue spec)."""
        before = spec.to_json()
        if consoles.prepare(spec, self.hypervisor):
            instance_store.write_spec_if_unchanged(vmdir, spec, before)

    def remove_instance_dir(self, vmdir):
        """Stop the VM (if any) and remove its directory."""
        self.watcher.unwatch(vmdir.uuid)
        try:
            consoles.release_serial(instance_store.read_spec(vmdir))
        except (OSError, ValueError, TypeError):
            pass
        try:
            self.hypervisor.kill(vmdir)
        finally:
            self.store.remove(vmdir)

    def resolve_machine(self, image_meta):
        """The versioned machine type a new VM of ``image_meta`` gets
        here (its hw_machine_type honoured); ImageUnacceptable for one
        this host cannot run."""
        requested = image_meta.properties.get('hw_machine_type')
        try:
            return self.hypervisor.resolve_machine(requested)
        except base.HypervisorError as e:
            raise exception.ImageUnacceptable(
                image_id=image_meta.id if 'id' in image_meta else None,
                reason=str(e))

    def new_spec(self, context, instance, image_meta, root, kernel_id,
                 ramdisk_id, config_drive_dir=None, machine=None,
                 **config_drive_args):
        """The VM spec of ``instance`` booting ``root`` - the one path
        spawn, finish_migration and rescue build a spec by. ``machine``:
        the versioned machine type to keep (a moved VM's), resolved from
        ``image_meta`` when None. The config drive is made in
        ``config_drive_dir`` when the instance needs one
        (``config_drive_args``: injected_files, admin_password,
        network_info)."""
        kernel, ramdisk = image_cache.fetch_kernel(
            context, kernel_id, ramdisk_id, self.image_cache_dir)
        spec = guest.build(instance, image_meta, root, kernel, ramdisk)
        spec.hotplug_ports = self.hypervisor.hotplug_ports
        spec.machine = machine or self.resolve_machine(image_meta)
        if config_drive_dir and configdrive.required(instance):
            spec.disks.append(configdrive.build(
                context, instance, config_drive_dir, **config_drive_args))
        return spec

    def root_disk(self, vmdir):
        return guest.Disk(path=vmdir.disk(ROOT_DISK),
                          format=self.hypervisor.instance_disk_format)

    def plug_nics(self, instance, network_info, image_meta):
        """Plug the ports and wait for Neutron; the NICs of the spec."""
        return net_vif.plug_and_wait(self.virtapi, self.vifs, instance,
                                     network_info,
                                     guest.nic_model(image_meta))

    # -- host --

    def init_host(self, host):
        self.host_name = host
        os.makedirs(self.instances_path, exist_ok=True)
        cold.register_compute(host, self.instances_path)
        self.hypervisor.check_host()
        info = self.hypervisor.host_info()
        LOG.info('nova-bhyve on %s: %s backend, version %s', host,
                 info['hypervisor_type'], info['hypervisor_version'])
        for vmdir in self.store.vmdirs():
            state = self.hypervisor.power_state(vmdir)
            LOG.info('adopted instance %s (power state %s)', vmdir.uuid,
                     power_state.STATE_MAP.get(state, state))
            if incoming.is_incoming(vmdir):
                # not ours yet: the source's Nova owns it until the
                # migration's post step (or rollback) reaches this host
                live.after_restart_at_destination(self, vmdir)
                continue
            if state not in (power_state.SHUTDOWN, power_state.CRASHED,
                             power_state.SUSPENDED):
                self.watcher.watch(vmdir)
                try:
                    consoles.adopt(instance_store.read_spec(vmdir))
                except (OSError, ValueError, TypeError):
                    pass

    def cleanup_host(self, host):
        self.watcher.stop_all()

    def get_available_nodes(self, refresh=False):
        return [self.host_name or CONF.host]

    def get_nodenames_by_uuid(self, refresh=False):
        # The node uuid is read once per driver, as the libvirt driver
        # does: it is process-wide in Nova, and Nova's functional harness
        # gives each compute of one process its own while it starts.
        if self._node_uuid is None:
            self._node_uuid = virt_node.get_local_node_uuid()
        return {self._node_uuid: self.get_available_nodes()[0]}

    def get_host_ip_addr(self):
        return CONF.my_ip

    def get_host_uptime(self):
        return host.uptime()

    def get_available_resource(self, nodename):
        os.makedirs(self.instances_path, exist_ok=True)
        vcpus_used = sum(spec.vcpus for _, spec in self.store.specs())
        return host.available_resource(nodename, self.instances_path,
                                       vcpus_used, self.hypervisor.host_info(),
                                       self.hypervisor.cpu_info())

    def update_provider_tree(self, provider_tree, nodename, allocations=None):
        ratios = self._get_allocation_ratios(
            provider_tree.data(nodename).inventory)
        provider_tree.update_inventory(nodename, host.inventory(
            self.instances_path, ratios,
            self._get_reserved_host_disk_gb_from_config()))

    # -- instances --

    def list_instance_uuids(self):
        return [d.uuid for d in self.store.vmdirs()]

    def list_instances(self):
        return [spec.name for _, spec in self.store.specs()]

    def instance_exists(self, instance):
        return self.store.exists(instance.uuid)

    def get_info(self, instance, use_cache=True):
        return hardware.InstanceInfo(
            state=self.hypervisor.power_state(self.store.vmdir(instance)))

    def spawn(self, context, instance, image_meta, injected_files,
              admin_password, allocations, network_info=None,
              block_device_info=None, power_on=True, accel_info=None):
        guest.validate_flavor(instance.flavor)
        guest.validate_flavor_fits_host(instance.flavor, host.vcpus(),
                                        host.memory_mb()[0])
        volumes.refuse_at_boot(block_device_info)
        net_vif.validate(network_info)
        guest.nic_model(image_meta)
        machine = self.resolve_machine(image_meta)
        vmdir = self.store.create(instance)
        plugged = False
        try:
            base_path, base_fmt = image_cache.fetch_image(
                context, image_meta.id, self.image_cache_dir)
            root = self.root_disk(vmdir)
            spec = self.new_spec(
                context, instance, image_meta, root, instance.kernel_id,
                instance.ramdisk_id, config_drive_dir=vmdir.path,
                injected_files=injected_files, admin_password=admin_password,
                network_info=network_info, machine=machine)
            disks.create_root_disk(
                base_path, base_fmt, root.path, instance.flavor.root_gb,
                image_meta.id, disk_format=root.format)
            plugged = True
            spec.nics = self.plug_nics(instance, network_info, image_meta)
            instance_store.write_spec(vmdir, spec)
            if power_on:
                self.start_vm(vmdir, spec)
            _record_machine(instance, machine)
        except Exception:
            LOG.exception('spawn of %s failed; removing what it made',
                          instance.uuid, instance=instance)
            self.remove_instance_dir(vmdir)
            if plugged:
                self.vifs.unplug_all(instance, network_info)
            raise
        LOG.info('instance %s spawned', instance.uuid, instance=instance)

    def destroy(self, context, instance, network_info, block_device_info=None,
                destroy_disks=True, destroy_secrets=True):
        vmdir = self.store.vmdir_for(instance.uuid)
        self.watcher.unwatch(instance.uuid)
        if os.path.isdir(vmdir.path):
            self.hypervisor.kill(vmdir)
        self.cleanup(context, instance, network_info, block_device_info,
                     destroy_disks, destroy_secrets=destroy_secrets)

    def cleanup(self, context, instance, network_info, block_device_info=None,
                destroy_disks=True, migrate_data=None, destroy_vifs=True,
                destroy_secrets=True):
        vmdir = self.store.vmdir_for(instance.uuid)
        if destroy_vifs:
            self.unplug_vifs(instance, network_info)
        if destroy_disks and os.path.isdir(vmdir.path):
            self.remove_instance_dir(vmdir)

    def delete_instance_files(self, instance):
        vmdir = self.store.vmdir_for(instance.uuid)
        if os.path.isdir(vmdir.path):
            self.remove_instance_dir(vmdir)
        return not os.path.exists(vmdir.path)

    def instance_on_disk(self, instance):
        return False    # instances_path is host-local (see evacuate)

    # -- networking --

    def plug_vifs(self, instance, network_info):
        """Plug (again) the VIFs of an existing instance: idempotent, an
        existing tap - one a running VM holds open - is kept."""
        self.vifs.plug_all(instance, network_info)

    def unplug_vifs(self, instance, network_info):
        self.vifs.unplug_all(instance, network_info)

    def attach_interface(self, context, instance, image_meta, vif):
        hotplug.attach(self.hypervisor, self.vifs, self.store.vmdir(instance),
                       instance, vif, guest.nic_model(image_meta))

    def detach_interface(self, context, instance, vif):
        hotplug.detach(self.hypervisor, self.vifs, self.store.vmdir(instance),
                       instance, vif)

    # -- power --

    def reboot(self, context, instance, network_info, reboot_type,
               block_device_info=None, bad_volumes_callback=None,
               accel_info=None, share_info=None):
        vmdir = self.store.vmdir(instance)
        if reboot_type == 'SOFT' and self.hypervisor.is_running(vmdir):
            timeout = CONF.bhyve.wait_soft_reboot_seconds
            if self.hypervisor.shutdown(vmdir, timeout, timeout):
                LOG.info('soft reboot: guest powered off, starting it',
                         instance=instance)
                self.start_vm(vmdir)
                return
            LOG.warning('soft reboot: guest did not power off within %d s, '
                        'doing a hard reboot', timeout, instance=instance)
        self.hypervisor.kill(vmdir)
        self.start_vm(vmdir)

    def power_off(self, instance, timeout=0, retry_interval=0):
        vmdir = self.store.vmdir(instance)
        if timeout and self.hypervisor.shutdown(vmdir, timeout,
                                                retry_interval or timeout):
            LOG.info('guest powered off cleanly', instance=instance)
        self.hypervisor.kill(vmdir)

    def power_on(self, context, instance, network_info,
                 block_device_info=None, accel_info=None, share_info=None):
        vmdir = self.store.vmdir(instance)
        if not self.hypervisor.is_running(vmdir):
            self.start_vm(vmdir)

    def resume_state_on_host_boot(self, context, instance, network_info,
                                  share_info, block_device_info=None):
        vmdir = self.store.vmdir(instance)
        if self.hypervisor.is_running(vmdir):
            return
        spec = rescue.load_spec(vmdir) if rescue.is_rescued(vmdir) else None
        LOG.info('starting the instance again after a host restart',
                 instance=instance)
        self.start_vm(vmdir, spec)

    def get_console_output(self, context, instance):
        return consoles.log_tail(self.store.vmdir(instance).console_log,
                                 CONF.bhyve.console_log_max_bytes)

    # -- pause / suspend / snapshot / diagnostics --

    def pause(self, instance):
        self.hypervisor.pause(self.store.vmdir(instance))

    def unpause(self, instance):
        self.hypervisor.unpause(self.store.vmdir(instance))

    def suspend(self, context, instance):
        """Save memory + device state to the instance directory and end the
        VM process (see Hypervisor.save); SUSPENDED while the file exists."""
        vmdir = self.store.vmdir(instance)
        if not self.hypervisor.can_save():
            raise NotImplementedError(
                '%s cannot save VM state on this host' % self.hypervisor.name)
        try:
            self.hypervisor.save(vmdir)
        except base.HypervisorError as e:
            raise exception.InstanceSuspendFailure(reason=str(e))

    def resume(self, context, instance, network_info, block_device_info=None,
               share_info=None):
        vmdir, spec = self.store.load(instance)
        if not self.hypervisor.can_save():
            raise NotImplementedError(
                '%s cannot restore VM state on this host'
                % self.hypervisor.name)
        try:
            self.hypervisor.restore(spec, vmdir)
        except base.HypervisorError as e:
            raise exception.InstanceResumeFailure(reason=str(e))
        self.watcher.watch(vmdir)

    def snapshot(self, context, instance, image_id, update_task_state):
        vmdir, spec = self.store.load(instance)
        snapshot.snapshot(self.hypervisor, vmdir, spec, context, instance,
                          image_id, update_task_state)

    def _stats(self, instance):
        vmdir = self.store.vmdir(instance)
        state = self.hypervisor.power_state(vmdir)
        stats = None
        if state in (power_state.RUNNING, power_state.PAUSED):
            try:
                stats = self.hypervisor.stats(vmdir,
                                              instance_store.read_spec(vmdir))
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

    # -- cold and warm migration, resize (migration.resize) --

    def migrate_disk_and_power_off(self, context, instance, dest,
                                   flavor, network_info,
                                   block_device_info=None,
                                   timeout=0, retry_interval=0):
        return resize.migrate_disk_and_power_off(
            self, context, instance, dest, flavor, network_info,
            block_device_info, timeout, retry_interval)

    def finish_migration(self, context, migration, instance, disk_info,
                         network_info, image_meta, resize_instance,
                         allocations, block_device_info=None, power_on=True,
                         share_info=None):
        resize.finish_migration(self, context, instance, disk_info,
                                network_info, image_meta, resize_instance,
                                block_device_info, power_on)

    def confirm_migration(self, context, migration, instance, network_info):
        resize.confirm_migration(self, instance)

    def finish_revert_migration(self, context, instance, network_info,
                                migration, block_device_info=None,
                                power_on=True, share_info=None):
        resize.finish_revert_migration(self, context, instance, network_info,
                                       block_device_info, power_on)

    # -- live migration (migration.live: Nova's steps; runner: the loop) --

    def check_can_live_migrate_destination(self, context, instance,
                                           src_compute_info, dst_compute_info,
                                           block_migration=False,
                                           disk_over_commit=False):
        return live.dest_check(self, instance, block_migration,
                               disk_over_commit, src_compute_info)

    def cleanup_live_migration_destination_check(self, context,
                                                 dest_check_data):
        live.cleanup_dest_check(self, dest_check_data)

    def check_can_live_migrate_source(self, context, instance,
                                      dest_check_data, block_device_info=None):
        return live.source_check(self, instance, dest_check_data,
                                 block_device_info)

    def get_instance_disk_info(self, instance, block_device_info=None):
        return live.disk_info(self, instance)

    def pre_live_migration(self, context, instance, block_device_info,
                           network_info, disk_info, migrate_data):
        return live.pre_live_migration(
            self, context, instance, block_device_info, network_info,
            disk_info, migrate_data)

    def live_migration(self, context, instance, dest, post_method,
                       recover_method, block_migration=False,
                       migrate_data=None):
        migration = runner.Migration(self, context, instance, dest,
                                     migrate_data)
        self._live_migrations[instance.uuid] = migration
        try:
            migration.run(post_method, recover_method, block_migration)
        finally:
            self._live_migrations.pop(instance.uuid, None)

    def live_migration_abort(self, instance):
        migration = self._live_migrations.get(instance.uuid)
        if migration is None:
            # nova-compute restarted during the migration
            live.abort_orphaned(self, instance)
            return
        migration.request('abort')

    def live_migration_force_complete(self, instance):
        migration = self._live_migrations.get(instance.uuid)
        if migration is None:
            raise exception.NoActiveMigrationForInstance(
                instance_id=instance.uuid)
        migration.request('force_complete')

    def post_live_migration(self, context, instance, block_device_info,
                            migrate_data=None):
        live.end_source_vm(self, instance, migrate_data)

    def post_live_migration_at_source(self, context, instance, network_info):
        self.vifs.unplug_all(instance, network_info)

    def post_live_migration_at_destination(self, context, instance,
                                           network_info,
                                           block_migration=False,
                                           block_device_info=None):
        live.post_at_destination(self, instance, network_info)

    def rollback_live_migration_at_destination(self, context, instance,
                                               network_info,
                                               block_device_info,
                                               destroy_disks=True,
                                               migrate_data=None):
        live.rollback_at_destination(self, instance, network_info,
                                     destroy_disks)

    # -- rescue --

    def rescue(self, context, instance, network_info, image_meta,
               rescue_password, block_device_info, share_info=None):
        vmdir, spec = self.store.load(instance)
        image_id = (image_meta.id if 'id' in image_meta else None) or \
            instance.image_ref
        base_path, base_fmt = image_cache.fetch_image(context, image_id,
                                                      self.image_cache_dir)
        props = images.get_info(context, image_id).get('properties') or {}
        if image_id == instance.image_ref:
            kernel_id = props.get('kernel_id') or instance.kernel_id
            ramdisk_id = props.get('ramdisk_id') or instance.ramdisk_id
        else:
            kernel_id, ramdisk_id = (props.get('kernel_id'),
                                     props.get('ramdisk_id'))
        disk = guest.Disk(path=rescue.disk_path(vmdir),
                          format=self.hypervisor.instance_disk_format)
        rescue_spec = rescue.build_spec(spec, self.new_spec(
            context, instance, image_meta, disk, kernel_id, ramdisk_id,
            machine=spec.machine))
        self.watcher.unwatch(instance.uuid)
        self.hypervisor.kill(vmdir)
        try:
            disks.create_root_disk(base_path, base_fmt, disk.path, 0,
                                         image_id, disk_format=disk.format)
            rescue.save_spec(vmdir, rescue_spec)
            self.start_vm(vmdir, rescue_spec)
        except Exception:
            with excutils.save_and_reraise_exception():
                self.hypervisor.kill(vmdir)
                rescue.remove(vmdir)
        LOG.info('instance rescued with image %s', image_id,
                 instance=instance)

    def unrescue(self, context, instance):
        vmdir = self.store.vmdir(instance)
        self.watcher.unwatch(instance.uuid)
        self.hypervisor.kill(vmdir)
        rescue.remove(vmdir)
        self.start_vm(vmdir)

    # -- consoles (devices.consoles) --

    def get_serial_console(self, context, instance):
        return consoles.serial_console(self.store.load(instance)[1])

    def get_vnc_console(self, context, instance):
        vmdir, spec = self.store.load(instance)
        return consoles.vnc_console(self.hypervisor.vnc_port(vmdir, spec))

    # -- volumes (devices.volumes) --

    def get_volume_connector(self, instance):
        return volumes.connector_properties()

    def attach_volume(self, context, connection_info, instance, mountpoint,
                      disk_bus=None, device_type=None, encryption=None):
        if encryption:
            raise NotImplementedError('encrypted volumes')
        volumes.attach(self.hypervisor, self.store.vmdir(instance),
                       connection_info)

    def detach_volume(self, context, connection_info, instance, mountpoint,
                      encryption=None):
        volumes.detach(self.hypervisor, self.store.vmdir(instance),
                       connection_info)

    def extend_volume(self, context, connection_info, instance,
                      requested_size):
        volumes.extend(self.hypervisor, self.store.vmdir(instance),
                       connection_info, requested_size)
