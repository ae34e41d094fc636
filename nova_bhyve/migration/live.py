"""Live migration: Nova's steps, on the source and the destination.

The hypervisor mechanics are the backend's (``Hypervisor.prepare_incoming``,
``finish_incoming``, ``migrate_to`` -> ``MigrationHandle``; QEMU:
hypervisor/qemu_migration.py). This module maps Nova's calls onto them,
reports progress into Nova's migration record and drives the convergence
policy. See docs/migration.md, "Live migration".

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
import threading
import time
import uuid as uuidlib

from nova import exception
from nova.compute import vm_states
from nova.objects import migrate_data as migrate_data_obj
from nova.virt import driver as virt_driver
from oslo_log import log as logging
from oslo_utils import units

from nova_bhyve import conf
from nova_bhyve.devices import configdrive
from nova_bhyve.devices import consoles
from nova_bhyve import guest
from nova_bhyve.migration import policy as migration_policy
from nova_bhyve.storage import image_cache as storage
from nova_bhyve.storage import vdsk
from nova_bhyve.hypervisor import base

LOG = logging.getLogger(__name__)
CONF = conf.CONF

POLL = 0.5
#: the poll interval near the end of the memory phase (poll_interval)
FAST_POLL = 0.02
#: at most this many seconds of fast polling per migration: a migration
#: that hovers just above its downtime limit does not hammer QMP for ever
FAST_POLL_BUDGET = 10.0
#: statuses of QEMU's last step before the switchover
#: (pause-before-switchover)
SWITCHOVER_STATUSES = ('device', 'pre-switchover')
#: the migration record is saved every this many seconds
RECORD_INTERVAL = 2.0
#: marker file of a VM directory that holds an incoming migration
INCOMING_MARKER = 'incoming'
SHARED_PROBE_PREFIX = '.nova-bhyve-shared-'
#: migration statuses (MigrationHandle.poll) after the post-copy link
#: broke: the backend waits for a recovery, the guest is split
POSTCOPY_BROKEN = ('postcopy-paused', 'postcopy-recover')


# -- convergence policy (nova_bhyve.migration.policy) ----------------------

def default_policy(data_bytes, bandwidth_mibps):
    return migration_policy.ConvergencePolicy.from_conf(
        CONF.bhyve, data_bytes, bandwidth_mibps)


#: callable(data_bytes, bandwidth_mibps) -> a policy with the
#: ConvergencePolicy interface; replaceable (tests inject their own)
policy_factory = default_policy


def _progress(elapsed, snap):
    return migration_policy.Progress(
        elapsed=elapsed, rounds=snap.rounds,
        memory_total=snap.memory_total,
        memory_processed=snap.memory_processed,
        memory_remaining=snap.memory_remaining,
        dirty_rate=snap.dirty_rate, bandwidth=snap.bandwidth,
        disk_remaining=snap.disk_remaining, cpu_throttle=snap.cpu_throttle)


def poll_interval(snap, fast_spent=0.0, switching=False):
    """Seconds to sleep before the next poll of the memory phase: POLL, or
    FAST_POLL near the end - the status is QEMU's last step before the
    switchover, or what remains (memory + disk) would be sent within about
    one POLL at the measured bandwidth - so that 'completed' is seen (and
    the destination resumed) within FAST_POLL instead of up to POLL after
    it happened. ``fast_spent``: the seconds of fast polling so far; past
    FAST_POLL_BUDGET it is POLL again. The policy still decides per pass
    (it ignores polls that bring no new pass). ``switching``: a switch to
    post-copy or a force complete was requested and its outcome not seen
    yet - the source's vCPUs stop at once, so poll fast for it too."""
    if fast_spent >= FAST_POLL_BUDGET:
        return POLL
    if snap.status in SWITCHOVER_STATUSES:
        return FAST_POLL
    if switching and snap.status == 'active':
        return FAST_POLL
    if snap.status != 'active' or not snap.bandwidth:
        return POLL
    remaining = snap.memory_remaining + snap.disk_remaining
    return FAST_POLL if remaining <= snap.bandwidth * POLL else POLL


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


def bandwidth_mibps():
    """The cap for one migration. Nova's API passes no per-migration
    bandwidth (os-migrateLive has host, block_migration, force), so it is
    [bhyve] live_migration_bandwidth."""
    return CONF.bhyve.live_migration_bandwidth


# -- checks -----------------------------------------------------------------

def dest_check(drv, instance, block_migration, disk_over_commit):
    """Destination: what the source needs to decide (a probe file in our
    instances path tells whether the source sees the same directory)."""
    if not drv.hypervisor.supports_live_migration:
        raise exception.MigrationPreCheckError(
            reason='the %s backend cannot live-migrate' % drv.hypervisor.name)
    _backend_check(drv, None, bool(block_migration))
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
        hyp.check_live_migration(vmdir, block, bandwidth_mibps())
    except (NotImplementedError, base.HypervisorError) as e:
        raise exception.MigrationPreCheckError(reason=str(e))


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
                   'migration' % drv._host)
    if virt_driver.block_device_info_get_mapping(block_device_info):
        refuse('instances with volumes cannot be live-migrated by '
               'nova-bhyve yet')
    if configdrive.required(instance) and not shared:
        refuse('instances with a config drive cannot be block-migrated by '
               'nova-bhyve yet (the read-only config drive would have to be '
               'copied before the destination starts)')
    vmdir = drv._vmdir(instance)
    if not drv.hypervisor.is_running(vmdir):
        refuse('the instance\'s VM is not running')
    _backend_check(drv, vmdir, bool(data.block_migration))
    return data


def disk_info(drv, instance):
    """The source's disks and VM spec, for the destination (JSON)."""
    vmdir = drv._vmdir(instance)
    spec = drv._load_spec(vmdir)
    disks = []
    for disk in spec.disks:
        info = vdsk.info(disk.path) if os.path.exists(disk.path) else {}
        disks.append({'path': disk.path, 'type': disk.format,
                      'virt_disk_size': info.get('virtual_size', 0),
                      'backing_file': info.get('backing_file') or '',
                      'disk_size': _allocated(disk.path)})
    return json.dumps({'vmdir': vmdir.path, 'spec': spec.to_json(),
                       'disks': disks})


def _allocated(path):
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


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
    kernel, ramdisk = drv._fetch_kernel(context, instance.kernel_id,
                                        instance.ramdisk_id)
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
            base_path, base_fmt = storage.fetch_image(
                context, instance.image_ref, drv.image_cache_dir)
            vdsk.create(disk.path, 'qcow2', size, backing=base_path,
                        backing_fmt=base_fmt)
            backed.append(i)
        else:
            vdsk.create(disk.path, disk.format, size)
    return backed


def runtime_dir(vmdir):
    """Shared instances path: the incoming VM's own pid file, sockets,
    console log and spec, apart from the source VM's (which uses the same
    instance directory until it is gone)."""
    # short: unix socket paths are limited to 108 bytes; the name is also
    # the marker VMDir.uuid gives pid checks, so it carries part of the uuid
    return base.VMDir(os.path.join(vmdir.path, 'in-' + vmdir.uuid[:8]))


def _incoming_policy(spec, info):
    """The policy the source will make (same configuration, same data
    estimate): the destination must enable what it wants too (post-copy)."""
    data = spec.memory_mb * units.Mi
    if info:
        data += sum(int(d.get('disk_size') or 0) for d in info['disks'])
    return policy_factory(data, bandwidth_mibps())


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
    vmdir = drv._vmdir(instance, must_exist=False)
    if os.path.exists(vmdir.path):
        raise exception.DestinationDiskExists(path=vmdir.path)
    os.makedirs(vmdir.path)
    plugged = False
    try:
        _mark_incoming(drv, vmdir)
        spec = _localize_spec(drv, context, instance, spec, info['vmdir'],
                              vmdir)
        backed = _create_disks(drv, context, instance, spec, info)
        models = {n.mac: n.model for n in spec.nics}
        plugged = True
        spec.nics = drv.vifs.plug_all(instance, network_info)
        for nic in spec.nics:
            nic.model = models.get(nic.mac, nic.model)
        drv._save_spec(spec, vmdir)
        address = inbound_address()
        endpoint = drv.hypervisor.prepare_incoming(
            spec, vmdir, address, block=True,
            policy=_incoming_policy(spec, info))
    except Exception:
        LOG.exception('preparing the live migration failed; removing what '
                      'it made', instance=instance)
        drv._remove(vmdir)
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
    vmdir = drv._vmdir(instance)
    runtime = runtime_dir(vmdir)
    spec = drv._load_spec(vmdir)
    shutil.rmtree(runtime.path, ignore_errors=True)
    os.makedirs(runtime.path)
    plugged = False
    try:
        _mark_incoming(drv, runtime)
        _local_boot_and_consoles(drv, context, instance, spec)
        models = {n.mac: n.model for n in spec.nics}
        plugged = True
        spec.nics = drv.vifs.plug_all(instance, network_info)
        for nic in spec.nics:
            nic.model = models.get(nic.mac, nic.model)
        drv._save_spec(spec, runtime)
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
    vmdir = drv._vmdir(instance)
    runtime = runtime_dir(vmdir)
    if os.path.isdir(runtime.path):
        # shared instances path: the source VM is gone (post_live_migration
        # on the source); the sockets keep working under their new names
        drv.hypervisor.finish_incoming(runtime)
        if drv.hypervisor.adopt_incoming(runtime, vmdir):
            shutil.rmtree(runtime.path, ignore_errors=True)
    else:
        drv.hypervisor.finish_incoming(vmdir)
    try:
        os.unlink(os.path.join(vmdir.path, INCOMING_MARKER))
    except FileNotFoundError:
        pass
    drv.vifs.plug_all(instance, network_info)      # idempotent
    drv._watcher.watch(vmdir)
    LOG.info('live migration finished: the guest runs here',
             instance=instance)


def rollback_at_destination(drv, instance, network_info, destroy_disks):
    """Kill the incoming VM, remove its directory, unplug its ports."""
    vmdir = drv._vmdir_for_uuid(instance.uuid)
    if os.path.isdir(vmdir.path):
        if not os.path.exists(os.path.join(vmdir.path, INCOMING_MARKER)):
            LOG.warning('rollback of a live migration: %s holds no incoming '
                        'migration; left alone', vmdir.path,
                        instance=instance)
        else:
            drv._remove(vmdir)
    drv.vifs.unplug_all(instance, network_info)


def _mark_incoming(drv, vm):
    """The marker of an incoming VM's directory (the instance directory,
    or its runtime directory on a shared instances path) names the host
    receiving it: on shared storage other hosts see it too."""
    with open(os.path.join(vm.path, INCOMING_MARKER), 'w') as f:
        f.write(drv._host or CONF.host)


def _incoming_host(vm):
    try:
        with open(os.path.join(vm.path, INCOMING_MARKER)) as f:
            return f.read().strip() or None
    except OSError:
        return None


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
    (Migration._resume_destination)."""
    runtime = runtime_dir(vmdir)
    vm = runtime if os.path.isdir(runtime.path) else vmdir
    if _incoming_host(vm) != drv._host:
        LOG.info('instance %s: incoming live migration (of %s)', vmdir.uuid,
                 _incoming_host(vm) or 'an unrecorded host')
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


def is_incoming(vmdir):
    return os.path.exists(os.path.join(vmdir.path, INCOMING_MARKER)) or \
        os.path.isdir(runtime_dir(vmdir).path)


def end_source_vm(drv, instance, data):
    if not (data is not None and 'is_shared_instance_path' in data and
            data.is_shared_instance_path):
        return
    vmdir = drv._vmdir_for_uuid(instance.uuid)
    drv._watcher.unwatch(instance.uuid)
    try:
        consoles.release_serial(drv._load_spec(vmdir))
    except (OSError, ValueError, TypeError):
        pass
    drv.hypervisor.kill(vmdir)
    LOG.info('source VM ended after the live migration (shared instances '
             'path: the directory stays)', instance=instance)


def poison_incoming(endpoint):
    """Make a destination QEMU still waiting for its migration give up and
    exit: QEMU 7.2 exits when an incoming stream fails to load. Used when
    Nova will not call rollback_live_migration_at_destination (shared
    instances path)."""
    if not getattr(endpoint, "uri", "").startswith("tcp:"):
        return
    host, port = endpoint.uri[4:].rsplit(':', 1)
    try:
        with socket.create_connection((host.strip('[]'), int(port)),
                                      timeout=5) as s:
            s.sendall(b'not a migration stream\n' * 8)
    except OSError as e:
        LOG.debug('poisoning %s: %s', endpoint.uri, e)


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
    vmdir = drv._vmdir(instance, must_exist=False)
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
    drv._watcher.watch(vmdir)


class _Abort(Exception):
    def __init__(self, reason, status='failed'):
        super().__init__(reason)
        self.status = status


class _PostcopyBroken(Exception):
    """The migration failed after the switch to post-copy: the guest's
    memory is split between the hosts, there is nothing to roll back to."""


class Migration:
    """The source side of one live migration (runs in Nova's live
    migration thread, inside driver.live_migration)."""

    def __init__(self, drv, context, instance, dest, migrate_data):
        self.drv = drv
        self.context = context
        self.instance = instance
        self.dest = dest
        self.data = migrate_data
        self.vmdir = drv._vmdir(instance)
        self.spec = drv._load_spec(self.vmdir)
        self._requests = []
        self._lock = threading.Lock()
        self.handle = None
        self._last_record = 0.0
        self.downtime_ms = None
        #: monotonic times of the post-copy switch (None: pre-copy only)
        #: and of the end of the memory stream
        self.switched_at = None
        self.completed_at = None
        #: monotonic time the destination ran the guest after a pre-copy
        #: completion (None: it runs at Nova's post step)
        self.resumed_at = None

    # requests from other threads (Nova's abort / force-complete RPCs)
    def request(self, what):
        with self._lock:
            self._requests.append(what)

    def _take_requests(self):
        with self._lock:
            reqs, self._requests = self._requests, []
        return reqs

    def _data_bytes(self):
        total = self.spec.memory_mb * units.Mi
        for disk in self.spec.disks:
            if not disk.serial:
                total += _allocated(disk.path)
        return total

    def run(self, post_method, recover_method, block_migration):
        target = json.loads(self.data.target_connect_addr or '{}')
        if 'endpoint' not in target:
            raise exception.MigrationError(
                reason='the destination sent no migration endpoint')
        endpoint = self.drv.hypervisor.endpoint_from_json(target['endpoint'])
        mibps = bandwidth_mibps()
        policy = policy_factory(self._data_bytes(), mibps)
        self.handle = self.drv.hypervisor.migrate_to(
            self.vmdir, self.spec, endpoint, mibps * units.Mi, policy,
            backed=target.get('backed', ()))
        self.drv._watcher.unwatch(self.instance.uuid)
        LOG.info('live migration to %s (%s) started: bandwidth cap %s, '
                 'initial downtime %d ms, policy %s', self.dest,
                 getattr(endpoint, 'uri', endpoint),
                 '%d MiB/s' % mibps if mibps else 'none',
                 policy.initial_downtime_ms, type(policy).__name__,
                 instance=self.instance)
        t0 = time.monotonic()
        try:
            self._migrate(policy, t0)
        except _PostcopyBroken as e:
            self._split(e)
            return
        except Exception as e:
            if self.switched_at is not None:
                self._split(e)
                return
            status = getattr(e, 'status', 'failed')
            LOG.error('live migration to %s %s: %s', self.dest,
                      'cancelled' if status == 'cancelled' else 'failed', e,
                      instance=self.instance)
            if not self._give_up():
                # QEMU had switched to post-copy before the failure was
                # seen: a rollback would kill the guest's other half
                self._split(e)
                return
            recover_method(self.context, self.instance, self.dest,
                           self.data, migration_status=status)
            return
        LOG.info('live migration to %s completed in %.1f s (downtime '
                 'reported by the hypervisor: %s ms; %s)', self.dest,
                 time.monotonic() - t0, self.downtime_ms,
                 'post-copy: the guest runs on the destination already'
                 if self.switched_at is not None else
                 'the guest runs on the destination already'
                 if self.resumed_at is not None else
                 'the guest runs again once the destination resumes it in '
                 'post_live_migration_at_destination',
                 instance=self.instance)
        post_method(self.context, self.instance, self.dest, block_migration,
                    self.data)

    def _split(self, error):
        """A failure past the post-copy switch. Neither host holds the whole
        guest: no rollback (Nova's would kill the destination VM, which
        holds the pages the guest wrote since the switch) and no post step.
        Both QEMU processes are left as they are, for QEMU's post-copy
        recovery or an operator; the instance goes to ERROR, the migration
        record to 'error'."""
        LOG.error('live migration to %s failed after the switch to '
                  'post-copy: %s. The guest\'s memory is split between this '
                  'host and %s and cannot be rolled back; both VM processes '
                  'are left running (QEMU postcopy-paused: recoverable with '
                  'migrate-recover on the destination and migrate resume=true '
                  'here while both live). The instance is set to ERROR.',
                  self.dest, error, self.dest, instance=self.instance)
        self._set_migration_status('error')
        try:
            self.instance.vm_state = vm_states.ERROR
            self.instance.task_state = None
            self.instance.save()
        except Exception:
            LOG.exception('cannot set the instance to ERROR',
                          instance=self.instance)

    def _set_migration_status(self, status):
        """Nova's migration record gets ``status`` (best effort: a failure
        to save is logged, the migration goes on)."""
        migration = self._migration_record()
        if migration is None:
            return
        try:
            migration.status = status
            migration.save()
        except Exception as e:
            LOG.warning('cannot save the migration status: %s', e,
                        instance=self.instance)

    def _migration_record(self):
        if not self.data.obj_attr_is_set('migration'):
            return None
        return getattr(self.data, 'migration', None)

    def _give_up(self):
        """Cancel the migration, the guest runs here again. False when it
        cannot be: QEMU is past the post-copy switch (the handle's cancel()
        refused and says so)."""
        try:
            self.handle.cancel()
        except Exception:
            if getattr(self.handle, 'postcopy', False):
                return False
            LOG.exception('cancelling the migration failed',
                          instance=self.instance)
        if self.data.is_shared_instance_path:
            # Nova calls no rollback on the destination for shared storage:
            # the waiting destination VM is made to exit, and its runtime
            # directory (visible here) goes
            poison_incoming(self.handle.endpoint)
            runtime = runtime_dir(self.vmdir)
            pid = runtime.read_pid()
            if pid and not base.wait_for_exit(pid, 30, runtime.uuid):
                LOG.warning('the destination VM %d did not exit', pid,
                            instance=self.instance)
            shutil.rmtree(runtime.path, ignore_errors=True)
        if self.drv.hypervisor.pid(self.vmdir) is not None:
            self.drv._watcher.watch(self.vmdir)
        else:
            LOG.error('the VM process is gone after the failed migration',
                      instance=self.instance)
        return True

    def _handle_requests(self):
        for what in self._take_requests():
            if what == 'abort':
                if not self.handle.can_cancel:
                    LOG.warning('abort requested: refused, the %s backend '
                                'cannot cancel a running live migration',
                                self.drv.hypervisor.name,
                                instance=self.instance)
                    continue
                if self.switched_at is not None:
                    LOG.warning('abort requested after the switch to '
                                'post-copy: refused (the guest runs on the '
                                'destination already)', instance=self.instance)
                    continue
                raise _Abort('aborted on request', status='cancelled')
            if what == 'force_complete':
                try:
                    how = self.handle.force_complete()
                    self._switch_requested = True
                except NotImplementedError as e:
                    LOG.warning('force complete refused: %s', e,
                                instance=self.instance)
                    continue
                LOG.info('live migration forced to complete (%s)', how,
                         instance=self.instance)

    def _decide(self, policy, t0, snap, memory_phase):
        if not self.handle.reports_progress:
            # status only: no counters for the policy; its completion
            # timeout still ends the wait (the backend cannot cancel: the
            # rollback on the destination ends the migration there)
            limit = getattr(policy, 'completion_timeout_s', 0)
            if limit and time.monotonic() - t0 > limit:
                raise _Abort('not finished within the completion timeout '
                             'of %.0f s (the %s backend reports no '
                             'progress)' % (limit, self.drv.hypervisor.name))
            return
        for step in policy.decide(_progress(time.monotonic() - t0, snap)):
            if step.kind == 'abort':
                raise _Abort('convergence policy: ' + step.reason)
            if not memory_phase:
                continue
            LOG.info('live migration: %s %s: %s', step.kind,
                     '' if step.value is None else step.value, step.reason,
                     instance=self.instance)
            self.handle.apply(step)
            if step.kind == 'postcopy':
                self._switch_requested = True

    def _alive(self):
        if self.drv.hypervisor.pid(self.vmdir) is None:
            raise _Abort('the VM process exited during the migration')

    def _migrate(self, policy, t0):
        h = self.handle
        h.start_mirror()
        while True:
            self._alive()
            self._handle_requests()
            if h.mirror_ready():
                break
            snap = h.poll()
            self._record(snap)
            self._decide(policy, t0, snap, memory_phase=False)
            time.sleep(POLL)
        LOG.info('disks in sync after %.1f s; sending memory',
                 time.monotonic() - t0, instance=self.instance)
        h.start_memory()
        fast_spent = 0.0
        #: post-copy or force complete asked for, outcome not polled yet
        self._switch_requested = False
        while True:
            self._alive()
            self._handle_requests()
            snap = h.poll()
            if h.reports_progress:
                self._record(snap)
            if snap.status == 'completed':
                break
            if snap.status in POSTCOPY_BROKEN:
                raise _PostcopyBroken(
                    'QEMU reports %s: the post-copy link to the destination '
                    'broke' % snap.status)
            if snap.status == 'postcopy-active' and self.switched_at is None:
                self._switchover(t0)
                continue
            if snap.status in ('failed', 'cancelled'):
                raise _Abort('QEMU reports the migration %s: %s' % (
                    snap.status, snap.error or 'no reason given'))
            h.mirror_ready()          # raises when a disk copy failed
            self._decide(policy, t0, snap, memory_phase=True)
            interval = poll_interval(snap, fast_spent,
                                     switching=self._switch_requested)
            if interval < POLL:
                fast_spent += interval
            time.sleep(interval)
        self.completed_at = time.monotonic()
        self.downtime_ms = snap.downtime_ms
        if self.switched_at is not None:
            LOG.info('post-copy: all memory on the destination %.1f s after '
                     'the switch', self.completed_at - self.switched_at,
                     instance=self.instance)
        else:
            # the guest is stopped on both hosts until the resume: nothing
            # else (the record's save below) comes first
            h.finish()
            self._resume_destination()
        if h.reports_progress:
            self._record(snap, force=True)

    def _resume_destination(self):
        """Pre-copy completed, disks in sync: the guest runs on the
        destination now (as libvirt's Finish phase does), not only when
        Nova's post step reaches it. When the destination certainly did
        not run it (DestinationRefused: its listener is gone - its
        nova-compute restarted - or it refused before acting) the guest,
        still whole here, stays: the migration fails and Nova's rollback
        cleans the destination. With a shared instances path Nova calls no
        rollback there, so the destination's waiting VM would be stranded:
        the post step runs the guest there instead, as for any other
        failure of the request, which leaves the outcome unknown."""
        try:
            failure = self.handle.resume_destination()
        except NotImplementedError:
            return
        except base.DestinationRefused as e:
            if not self.data.is_shared_instance_path:
                raise _Abort('the destination did not take the guest (%s); '
                             'it stays on this host' % e)
            failure = str(e)
        if failure:
            LOG.warning('the guest was not resumed on %s right away (%s); '
                        'it runs once Nova\'s post step reaches the '
                        'destination', self.dest, failure,
                        instance=self.instance)
            return
        self.resumed_at = time.monotonic()
        LOG.info('the guest runs on %s %.3f s after the memory stream '
                 'completed', self.dest, self.resumed_at - self.completed_at,
                 instance=self.instance)

    def _switchover(self, t0):
        """The source is in postcopy-active: disks in sync, then the guest
        runs on the destination while the rest of its memory follows."""
        self.switched_at = time.monotonic()
        LOG.info('switched to post-copy after %.1f s: completing the disk '
                 'copy, then resuming the guest on %s',
                 self.switched_at - t0, self.dest, instance=self.instance)
        self._set_migration_status('running (post-copy)')
        try:
            failure = self.handle.switchover()
        except base.HypervisorError as e:
            raise _PostcopyBroken(str(e))
        if failure:
            LOG.warning('post-copy: the guest was not resumed on %s right '
                        'away (%s); it runs once Nova\'s post step reaches '
                        'the destination', self.dest, failure,
                        instance=self.instance)
        else:
            LOG.info('post-copy: the guest runs on %s %.1f s after the '
                     'switch', self.dest, time.monotonic() - self.switched_at,
                     instance=self.instance)

    def _record(self, snap, force=False):
        """Progress into Nova's migration record (and the instance's
        progress percentage), at most every RECORD_INTERVAL seconds."""
        now = time.monotonic()
        if not force and now - self._last_record < RECORD_INTERVAL:
            return
        self._last_record = now
        migration = getattr(self.data, 'migration', None) \
            if self.data.obj_attr_is_set('migration') else None
        if migration is None:
            return
        migration.memory_total = snap.memory_total
        migration.memory_processed = snap.memory_processed
        migration.memory_remaining = snap.memory_remaining
        migration.disk_total = snap.disk_total
        migration.disk_processed = snap.disk_processed
        migration.disk_remaining = snap.disk_remaining
        try:
            migration.save()
        except Exception as e:
            LOG.warning('cannot save the migration progress: %s', e,
                        instance=self.instance)
        total = snap.memory_total + snap.disk_total
        if total:
            done = snap.memory_processed + snap.disk_processed
            progress = min(100, int(100 * done / total))
            if snap.status == 'completed':
                progress = 100
            try:
                self.instance.progress = progress
                self.instance.save()
            except Exception as e:
                LOG.debug('instance progress not saved: %s', e)
