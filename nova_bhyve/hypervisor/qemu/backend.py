"""QEMU backend (Linux): the VM spec as a qemu-system-x86_64 command line,
controlled over QMP on a per-instance unix socket.

QEMU daemonizes itself, so the VM is re-parented to init and survives
nova-compute restarts; its pid file and console log in the instance
directory and its QMP sockets in its runtime directory (VMDir.runtime) are
all a later nova-compute needs to adopt it. QEMU starts with descriptors
the driver opened (monitor sockets, disks, taps, the console pipe:
qemu/resources.py), not with their paths.
"""
import os
import time

from nova.compute import power_state
from oslo_concurrency import processutils
from oslo_log import log as logging

from nova_bhyve import conf
from nova_bhyve import host_cpu
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import accel
from nova_bhyve.hypervisor.qemu import blockjob as qemu_blockjob
from nova_bhyve.hypervisor.qemu import fdpass
from nova_bhyve.hypervisor.qemu import machines as qemu_machines
from nova_bhyve.hypervisor.qemu import migration as qemu_migration
from nova_bhyve.hypervisor.qemu import qmp
from nova_bhyve.hypervisor.qemu import resources as qemu_resources
from nova_bhyve.hypervisor.qemu import sandboxed as qemu_sandboxed
from nova_bhyve.hypervisor.qemu import state as qemu_state
from nova_bhyve.hypervisor.qemu import stats as qemu_stats

LOG = logging.getLogger(__name__)
CONF = conf.CONF

_DISK_DEVICE = {'virtio': 'virtio-blk-pci', 'sata': 'ide-hd', 'ide': 'ide-hd'}
_NIC_DEVICE = {'virtio': 'virtio-net-pci', 'e1000': 'e1000'}
# with -vnc ...,to=: displays QEMU may move to if the spec's port is taken
VNC_DISPLAY_SPAN = 100
# PCIe root ports a new VM gets for hot-plugged volumes
HOTPLUG_PORTS = 4
_STATUS = {
    'running': power_state.RUNNING,
    'paused': power_state.PAUSED,
    'suspended': power_state.SUSPENDED,
    'prelaunch': power_state.PAUSED,
    'inmigrate': power_state.PAUSED,
    'postmigrate': power_state.PAUSED,
    'finish-migrate': power_state.PAUSED,
    'restore-vm': power_state.PAUSED,
    'save-vm': power_state.PAUSED,
    'debug': power_state.PAUSED,
    'watchdog': power_state.PAUSED,
    'io-error': power_state.PAUSED,
    'colo': power_state.PAUSED,
    'shutdown': power_state.SHUTDOWN,
    'internal-error': power_state.CRASHED,
    'guest-panicked': power_state.CRASHED,
}


def _opts(*pairs, **kw):
    """QEMU option string; commas in values are doubled as QEMU requires."""
    items = list(pairs) + ['%s=%s' % (k, str(v).replace(',', ',,'))
                           for k, v in kw.items()]
    return ','.join(items)


fdset_path = fdpass.fdset_path


def fd_path(fd):
    return '/proc/self/fd/%d' % fd


def render_argv(spec, vmdir, binary, accelerator, res, cpu_model=None):
    """The complete qemu-system command line for ``spec`` (pure), naming
    the descriptors of ``res`` (a qemu_resources.Resources)."""
    argv = [binary,
            '-name', _opts(guest=spec.name, **{'debug-threads': 'on'}),
            '-uuid', spec.uuid,
            '-machine', _opts(spec.machine or qemu_machines.DEFAULT_ALIAS,
                              accel=accelerator),
            '-smp', str(spec.vcpus),
            '-m', memory_size(spec.memory_mb, accelerator),
            '-nodefaults', '-no-user-config',
            '-display', 'none']
    for fd, fdset, opaque in res.add_fds:
        argv += ['-add-fd', _opts(fd=fd, set=fdset, opaque=opaque)]
    argv += ['-chardev', _serial_chardev(spec, res),
             '-serial', 'chardev:serial0',
             '-chardev', _opts('socket', id='qmp', fd=res.qmp,
                               server='on', wait='off'),
             '-mon', 'chardev=qmp,mode=control',
             # a second monitor, only for the lifecycle event watcher
             '-chardev', _opts('socket', id='qmp-events', fd=res.events,
                               server='on', wait='off'),
             '-mon', 'chardev=qmp-events,mode=control',
             '-pidfile', vmdir.pidfile,
             '-daemonize']
    cpu = cpu_model or ('host' if accelerator == 'kvm' else None)
    if cpu:
        argv += ['-cpu', cpu]
    if spec.boot.kernel:
        # inherited descriptors, reopened through /proc/self/fd (QEMU 7.2's
        # -kernel/-initrd take no fdset)
        argv += ['-kernel', fd_path(res.kernel)]
        if spec.boot.ramdisk:
            argv += ['-initrd', fd_path(res.initrd)]
        if spec.boot.cmdline:
            argv += ['-append', spec.boot.cmdline]
    if any(d.bus in ('sata', 'ide') or d.device == 'cdrom'
           for d in spec.disks):
        argv += ['-device', 'ich9-ahci,id=ahci0']
    # Empty PCIe root ports: q35's root bus takes no hot-plugged devices.
    hotplug = ['hp%d' % n for n in range(spec.hotplug_ports)]
    for n, port in enumerate(hotplug):
        argv += ['-device', _opts('pcie-root-port', id=port,
                                  chassis=n + 1)]
    volumes = [d for d in spec.disks if d.serial]
    if len(volumes) > len(hotplug):
        raise base.HypervisorError(
            'instance %s has %d volumes but %d hot-plug ports' % (
                spec.uuid, len(volumes), len(hotplug)))
    ahci_port = 0
    for i, disk in enumerate(spec.disks):
        if disk.serial:
            node, devid = volume_names(disk.serial)
            argv += _chain_blockdevs(node, res.disks[i], _protocol(disk))
            argv += ['-device', _opts('virtio-blk-pci', id=devid,
                                      drive=node, serial=disk.serial,
                                      bus=hotplug[volumes.index(disk)])]
            continue
        node = 'disk%d' % i
        argv += _chain_blockdevs(node, res.disks[i], 'file',
                                 discard='unmap')
        if disk.device == 'cdrom':
            dev = _opts('ide-cd', drive=node, bus='ahci0.%d' % ahci_port)
            ahci_port += 1
        elif disk.bus == 'virtio':
            dev = _opts(_DISK_DEVICE['virtio'], drive=node)
        else:
            dev = _opts('ide-hd', drive=node, bus='ahci0.%d' % ahci_port)
            ahci_port += 1
        if i == 0 and not spec.boot.kernel:
            dev += ',bootindex=1'
        argv += ['-device', dev]
    for i, nic in enumerate(spec.nics):
        netdev = 'net%d' % i
        argv += ['-netdev', _opts('tap', id=netdev, fd=res.taps[i]),
                 '-device', _opts(_NIC_DEVICE[nic.model], netdev=netdev,
                                  mac=nic.mac,
                                  **({'host_mtu': nic.mtu}
                                     if nic.mtu and nic.model == 'virtio'
                                     else {}))]
    if spec.consoles.vnc_host and spec.consoles.vnc_port:
        display = spec.consoles.vnc_port - 5900
        host = spec.consoles.vnc_host
        if ':' in host:
            host = '[%s]' % host
        argv += ['-device', 'VGA,id=video0',
                 '-vnc', '%s:%d,to=%d' % (host, display,
                                          display + VNC_DISPLAY_SPAN)]
    return argv


#: KiB taken off the guest's RAM under TCG (see memory_size)
TCG_RAM_SHORTFALL_KIB = 8


def memory_size(memory_mb, accelerator):
    """The ``-m`` value. Under TCG, 8 KiB short of ``memory_mb``: QEMU
    before 9.0 (QEMU commit 03bfc2188f, "physmem: Fix migration dirty
    bitmap coherency with TCG memory access") loses guest writes during a
    live migration when the RAM block's size is a multiple of 256 KiB
    (64 pages; every size in MiB is): its fast path for such blocks clears
    the dirty bits without resetting the TCG TLB, so stores through TLB
    entries made before the clear are not seen as dirty and the destination
    gets stale pages (guest kernels crash after the switchover). A size
    that is not such a multiple takes QEMU's per-page path, which resets
    the TLB. Source and destination must use the same size: both render
    it from the spec and the accelerator. docs/migration.md, "TCG: lost
    writes in QEMU before 9.0"."""
    if accelerator == 'tcg':
        return '%dK' % (memory_mb * 1024 - TCG_RAM_SHORTFALL_KIB)
    return '%dM' % memory_mb


def _serial_chardev(spec, res):
    """COM1: a listening socket the driver bound (a raw TCP server when
    the spec has a serial port, Nova's serial console, else a unix socket,
    VMDir.serial); the console goes into the console logger's pipe too."""
    return _opts('socket', id='serial0', fd=res.serial, server='on',
                 wait='off', logfile=fdset_path(res.console),
                 logappend='on')


def _chain_blockdevs(node, images, protocol, **top_extra):
    """-blockdev options of a disk's chain ``images`` (top first, each on
    an fdset), bottom first; the top is ``node``, its backing images
    ``node``-b1, -b2...: each node that has a backing file names its
    backing node, so QEMU opens no image by the name in a header."""
    argv = []
    for j in reversed(range(len(images))):
        image = images[j]
        opts = {'driver': image.format,
                'node-name': node if j == 0 else '%s-b%d' % (node, j),
                'read-only': 'on' if image.readonly else 'off'}
        if j == 0:
            opts.update(top_extra)
        opts.update({'file.driver': protocol if j == 0 else 'file',
                     'file.filename': fdset_path(image.fdset)})
        if j + 1 < len(images):
            opts['backing'] = '%s-b%d' % (node, j + 1)
        argv += ['-blockdev', _opts(**opts)]
    return argv


def _protocol(disk):
    return ('host_device' if disk.path.startswith('/dev/')
            else 'file')


def volume_names(volume_id):
    """(block node name, device id) of an attached volume. Node names
    are at most 31 characters."""
    return 'vol' + volume_id.replace('-', '')[:24], 'vol-' + volume_id


def _volume_blockdev(node, images, protocol):
    """blockdev-add arguments of a hot-plugged volume whose chain
    ``images`` (qemu_resources.Image, top first) is on fdsets: one tree,
    named as _chain_blockdevs names a volume's nodes at start; each image
    that has a backing file gets its backing node explicitly, so QEMU opens
    no image by the name in a header."""
    tree = None
    for j in reversed(range(len(images))):
        image = images[j]
        opts = {'driver': image.format,
                'node-name': node if j == 0 else '%s-b%d' % (node, j),
                'read-only': image.readonly,
                'file': {'driver': protocol if j == 0 else 'file',
                         'filename': fdset_path(image.fdset)}}
        if tree is not None:
            opts['backing'] = tree
        tree = opts
    return tree


def _volume_nodes(node):
    """Matches the node names of a volume's chain (``node``, ``node``-bN)."""
    return lambda name: name == node or name.startswith(node + '-b')


class QemuHypervisor(base.Hypervisor):
    name = 'qemu'
    supports_serial_tcp = True
    supports_vnc = True
    hotplug_ports = HOTPLUG_PORTS

    def __init__(self):
        self.binary = CONF.bhyve.qemu_binary
        self._accel = None
        self._sandbox = None

    @property
    def sandbox(self):
        """The sandboxed.Sandbox VM processes start in; None when
        [bhyve] sandbox is off."""
        if not CONF.bhyve.sandbox:
            return None
        if self._sandbox is None:
            self._sandbox = qemu_sandboxed.Sandbox()
        return self._sandbox

    def adopt_incoming(self, runtime, vmdir):
        if self.sandbox is not None:
            self.sandbox.adopt(runtime, vmdir)
        return super().adopt_incoming(runtime, vmdir)

    def check_host(self):
        if not CONF.bhyve.sandbox:
            LOG.warning('[bhyve] sandbox is off: VM processes run as %s '
                        'with its capabilities, and can open any file it '
                        'can', 'root' if os.geteuid() == 0 else
                        'nova-compute\'s user')
            return
        lacking = qemu_sandboxed.Sandbox.missing_features()
        if lacking:
            raise base.HypervisorError(
                'this host lacks what the VM sandbox needs: %s. Fix the '
                'host, or turn the sandbox off knowingly ([bhyve] sandbox '
                '= false).' % '; '.join(lacking))
        if CONF.bhyve.live_migration_fallback == 'post-copy':
            qemu_sandboxed.check_post_copy()
        LOG.info('VM sandbox on: uids %s, %s', CONF.bhyve.sandbox_uid_range,
                 type(self.sandbox.cgroups).__name__)

    @property
    def accelerator(self):
        if self._accel is None:
            self._accel = accel.choose(self.binary, CONF.bhyve.qemu_accel,
                                       CONF.bhyve.accel_calibration_timeout)
        return self._accel

    def host_info(self):
        out, _ = processutils.execute(self.binary, '-version',
                                      check_exit_code=False)
        version = 0
        try:
            # "QEMU emulator version 7.2.22 (...)" -> 7002022
            major, minor, micro = (out.split('version ')[1].split()[0]
                                   .split('.') + ['0', '0'])[:3]
            version = int(major) * 1000000 + int(minor) * 1000 + int(micro)
        except (IndexError, ValueError):
            LOG.warning('cannot parse QEMU version from %r', out)
        return {'hypervisor_type': 'kvm' if self.accelerator == 'kvm'
                else 'qemu', 'hypervisor_version': version}

    def guest_cpu(self):
        """The -cpu the VMs get: [bhyve] qemu_cpu_model, else 'host' under
        KVM, QEMU's default model under TCG."""
        return CONF.bhyve.qemu_cpu_model or (
            'host' if self.accelerator == 'kvm' else 'default')

    def cpu_info(self):
        """/proc/cpuinfo's facts, the accelerator, QEMU's version, its
        versioned q35 machines and the guest CPU."""
        info = host_cpu.read()
        info.update({
            'accelerator': self.accelerator,
            'hypervisor_type': self.name,
            'hypervisor_version': self.host_info()['hypervisor_version'],
            'machine_types': self.machine_types().versioned_q35(),
            'guest_cpu': self.guest_cpu()})
        return info

    # -- machine types: see qemu_machines ----------------------------------

    def machine_types(self):
        """qemu_machines.MachineTypes of this host's QEMU (read once)."""
        try:
            return qemu_machines.probe(self.binary)
        except (OSError, processutils.ProcessExecutionError) as e:
            raise base.HypervisorError('cannot list the machine types of '
                                       '%s: %s' % (self.binary, e))

    def resolve_machine(self, requested):
        """The alias (``q35``, the default) or the image's name mapped to
        the versioned machine this QEMU has for it."""
        try:
            return self.machine_types().resolve(requested)
        except ValueError as e:
            raise base.HypervisorError(str(e))

    def check_machine(self, machine):
        if machine and not self.machine_types().knows(machine):
            raise base.HypervisorError(
                'machine type %s is unknown to this host\'s QEMU (%s): it '
                'is older than the one the instance was started with, or '
                'dropped that machine' % (machine, self.binary))

    def _with_resources(self, spec, vmdir, run):
        """Open the VM's resources, ``run(argv, fds)`` (QEMU inherits
        ``fds``), close the driver's copies whatever happened."""
        res = qemu_resources.open_all(spec, vmdir,
                                      CONF.bhyve.console_log_keep_bytes)
        try:
            argv = render_argv(spec, vmdir, self.binary, self.accelerator,
                               res, CONF.bhyve.qemu_cpu_model)
            return run(argv, res.fds)
        finally:
            res.close()

    def start(self, spec, vmdir):
        # With -daemonize the parent returns once the VM is set up, and
        # reports setup errors on its stderr.
        try:
            self._with_resources(spec, vmdir, lambda argv, fds: (
                qemu_state.launch(self, argv, vmdir, spec.uuid, fds,
                                  spec)))
        except Exception:
            base.remove_runtime_dir(vmdir)
            raise

    def power_state(self, vmdir):
        if self.pid(vmdir) is None:
            return self.stopped_state(vmdir)
        try:
            status = qmp.execute(vmdir.control, 'query-status')['status']
        except base.HypervisorError:
            # Alive but not answering (exiting, or monitor busy).
            if self.pid(vmdir) is None:
                return self.stopped_state(vmdir)
            return power_state.NOSTATE
        return _STATUS.get(status, power_state.NOSTATE)

    def request_shutdown(self, vmdir):
        if self.pid(vmdir) is not None:
            try:
                qmp.execute(vmdir.control, 'system_powerdown')
            except base.HypervisorError as e:
                LOG.debug('system_powerdown for %s: %s', vmdir.uuid, e)

    def kill(self, vmdir):
        qemu_migration.close_listeners(vmdir)
        pid = vmdir.read_pid()
        base.kill_and_wait(pid, vmdir.uuid)
        if os.path.exists(vmdir.pidfile):
            os.unlink(vmdir.pidfile)
        base.remove_runtime_dir(vmdir)
        if self.sandbox is not None:
            self.sandbox.release(vmdir)

    def wait_for_change(self, vmdir, stop):
        """Listen on the events monitor: returns on each QMP event, and
        False at end of file (QEMU exited or was killed)."""
        listener = getattr(stop, 'qmp_listener', None)
        if listener is None:
            try:
                listener = qmp.EventListener(vmdir.events)
            except base.HypervisorError:
                return super().wait_for_change(vmdir, stop)
            stop.qmp_listener = listener
        while not stop.is_set():
            event = listener.next_event(timeout=1.0)
            if event is qmp.EOF:
                listener.close()
                return False
            if event is not None:
                return True
        listener.close()
        return False

    def pause(self, vmdir):
        qmp.execute(vmdir.control, 'stop')

    def unpause(self, vmdir):
        qmp.execute(vmdir.control, 'cont')

    # -- save / restore: see qemu_state -----------------------------------

    def can_save(self):
        return True

    def save(self, vmdir):
        qemu_state.save(self, vmdir)

    def restore(self, spec, vmdir):
        qemu_state.check_state_file(vmdir.saved_state)
        self._with_resources(spec, vmdir, lambda argv, fds: (
            qemu_state.restore(self, argv, vmdir, spec.uuid, fds=fds,
                               spec=spec)))

    # -- live migration: see qemu_migration --------------------------------

    supports_live_migration = True
    supports_block_migration = True

    def prepare_incoming(self, spec, vmdir, address, block, policy=None):
        if (self.sandbox is not None and policy is not None and
                policy.wants_postcopy):
            qemu_sandboxed.check_post_copy()
        return self._with_resources(spec, vmdir, lambda argv, fds: (
            qemu_migration.prepare_incoming(self, argv, spec, vmdir,
                                            address, block, policy,
                                            fds=fds)))

    def endpoint_from_json(self, text):
        return qemu_migration.Endpoint.from_json(text)

    def finish_incoming(self, vmdir):
        qemu_migration.finish_incoming(self, vmdir)

    def migrate_to(self, vmdir, spec, endpoint, bandwidth, policy,
                   backed=()):
        return qemu_migration.OutgoingMigration(self, vmdir, spec, endpoint,
                                                bandwidth, policy, backed)

    def stop_unfinished_incoming(self, vmdir):
        return qemu_migration.stop_unfinished_incoming(self, vmdir)

    def cancel_orphaned_migration(self, vmdir, resume):
        return qemu_migration.cancel_orphaned(vmdir, resume)

    # -- live disk snapshots: see qemu_blockjob ---------------------------

    def freeze_disk(self, vmdir, index, overlay, disk=None):
        qemu_blockjob.freeze(vmdir.control, index, overlay,
                             backing=disk.path if disk else None,
                             backing_fmt=disk.format if disk else None)

    def thaw_disk(self, vmdir, index, overlay):
        qemu_blockjob.thaw(vmdir.control, index, overlay)

    # -- diagnostics: see qemu_stats --------------------------------------

    def stats(self, vmdir, spec):
        pid = self.pid(vmdir)
        if pid is None:
            raise base.HypervisorError('instance %s is not running'
                                       % vmdir.uuid)
        return qemu_stats.stats(pid, vmdir.control, spec)

    # -- NIC hot-plug (attach_interface / detach_interface) --------------

    def _nic_device(self, vmdir, mac):
        """QOM path of the NIC device with ``mac`` (ids or anonymous)."""
        for parent in ('/machine/peripheral', '/machine/peripheral-anon'):
            try:
                children = qmp.execute(vmdir.control, 'qom-list',
                                       {'path': parent})
            except qmp.QMPError:
                continue
            for child in children:
                if not child['type'].startswith('child<'):
                    continue
                path = '%s/%s' % (parent, child['name'])
                try:
                    got = qmp.execute(vmdir.control, 'qom-get',
                                      {'path': path, 'property': 'mac'})
                except qmp.QMPError:
                    continue
                if str(got).lower() == mac.lower():
                    return path
        return None

    def attach_nic(self, vmdir, nic, port):
        """Hot-plug ``nic`` (its tap exists) into the free root port
        ``port`` (an id like 'hp0'): the driver opens the tap
        (qemu_resources.open_tap) and hands QEMU the descriptor (``getfd``,
        ``netdev_add tap,fd=NAME``); QEMU opens no /dev/net/tun."""
        netdev = 'hostnet-' + nic.ifname
        args = {'driver': _NIC_DEVICE[nic.model], 'id': 'nic-' + nic.ifname,
                'netdev': netdev, 'mac': nic.mac, 'bus': port}
        if nic.mtu and nic.model == 'virtio':
            args['host_mtu'] = nic.mtu
        fd = qemu_resources.open_tap(nic.ifname)
        try:
            with qmp.Session(vmdir.control) as s:
                fdpass.give(s, netdev, fd)
                try:
                    s.execute('netdev_add', {'type': 'tap', 'id': netdev,
                                             'fd': netdev})
                except base.HypervisorError:
                    fdpass.take_back(s, netdev)
                    raise
                try:
                    s.execute('device_add', args)
                except base.HypervisorError:
                    fdpass.rollback(s, 'netdev_del', {'id': netdev})
                    raise
        finally:
            os.close(fd)

    def used_hotplug_ports(self, vmdir):
        """Root port ids ('hpN') that hold a device now."""
        used = set()
        for dev in qmp.execute(vmdir.control, 'query-pci')[0]['devices']:
            bridge = dev.get('pci_bridge')
            if bridge and bridge.get('devices') and dev.get('qdev_id'):
                used.add(dev['qdev_id'])
        return used

    def detach_nic(self, vmdir, nic, timeout=60):
        """Unplug the NIC with ``nic.mac``: device_del, wait until QEMU has
        deleted it (the guest acknowledged, DEVICE_DELETED), netdev_del."""
        path = self._nic_device(vmdir, nic.mac)
        if path is None:
            raise base.HypervisorError('no NIC with MAC %s in %s' % (
                nic.mac, vmdir.uuid))
        netdev = qmp.execute(vmdir.control, 'qom-get',
                             {'path': path, 'property': 'netdev'})
        qmp.execute(vmdir.control, 'device_del', {'id': path})
        deadline = time.monotonic() + timeout
        while self._nic_device(vmdir, nic.mac) is not None:
            if time.monotonic() > deadline:
                raise base.HypervisorError(
                    'guest did not release NIC %s within %ds' % (
                        nic.mac, timeout))
            time.sleep(0.5)
        if netdev:
            try:
                qmp.execute(vmdir.control, 'netdev_del', {'id': netdev})
            except qmp.QMPError as e:
                LOG.debug('netdev_del %s: %s', netdev, e)

    # -- consoles and volumes (see nova_bhyve.devices.consoles / volumes) -----

    def vnc_port(self, vmdir, spec):
        """The port the VM's VNC server really listens on (QMP query-vnc:
        QEMU may have moved past a taken port)."""
        if self.pid(vmdir) is None or not spec.consoles.vnc_host:
            return None
        info = qmp.execute(vmdir.control, 'query-vnc')
        if not info.get('enabled') or not info.get('service'):
            return None
        return int(info['service'])

    def _free_hotplug_port(self, vmdir):
        for bus in qmp.execute(vmdir.control, 'query-pci'):
            for dev in bus.get('devices', []):
                qid = dev.get('qdev_id') or ''
                bridge = dev.get('pci_bridge')
                if qid.startswith('hp') and bridge is not None and \
                        not bridge.get('devices'):
                    return qid
        raise base.HypervisorError('no free PCIe hot-plug port left in %s'
                                   % vmdir.uuid)

    def attach_disk(self, vmdir, disk):
        """Hot-plug a volume: the driver opens each image of its chain and
        hands QEMU the descriptors (``add-fd``, one new fdset each), then
        blockdev-add on /dev/fdset/N and a virtio-blk-pci on a free root
        port, serial = volume id. QEMU opens no path."""
        node, devid = volume_names(disk.serial)
        port = self._free_hotplug_port(vmdir)
        chain = qemu_resources.disk_chain(disk.path, disk.format)
        with qmp.Session(vmdir.control) as s:
            images = []
            try:
                for n, (path, fmt) in enumerate(chain):
                    ro = disk.readonly or n > 0
                    images.append(qemu_resources.Image(
                        fdpass.add_file(s, path, ro), fmt, ro, path))
                s.execute('blockdev-add', _volume_blockdev(
                    node, images, _protocol(disk)))
            except base.HypervisorError:
                fdpass.remove_unused(s, {i.fdset for i in images})
                raise
            try:
                s.execute('device_add', {
                    'driver': 'virtio-blk-pci', 'id': devid, 'drive': node,
                    'serial': disk.serial, 'bus': port})
            except base.HypervisorError:
                fdpass.rollback(s, 'blockdev-del', {'node-name': node})
                fdpass.remove_unused(s, {i.fdset for i in images})
                raise

    def detach_disk(self, vmdir, disk, timeout=120.0):
        """device_del, wait for the guest to release the device
        (DEVICE_DELETED), then blockdev-del and remove-fd of the fdsets
        its nodes used (hot-plugged or there since the start)."""
        node, devid = volume_names(disk.serial)
        try:
            qmp.execute_until_event(
                vmdir.control, 'device_del', {'id': devid}, 'DEVICE_DELETED',
                match=lambda data: data.get('device') == devid,
                timeout=timeout, retry_interval=10.0)
        except qmp.QMPError as e:
            if e.error_class != 'DeviceNotFound':
                raise
        with qmp.Session(vmdir.control) as s:
            fdsets = fdpass.node_fdsets(s, _volume_nodes(node))
            # sets of a node deleted earlier (a detach retried)
            fdsets |= fdpass.opaque_fdsets(s, [disk.path])
            try:
                s.execute('blockdev-del', {'node-name': node})
            except qmp.QMPError as e:
                LOG.debug('blockdev-del %s: %s', node, e)
            fdpass.remove_unused(s, fdsets)

    def resize_disk(self, vmdir, disk, size):
        node, _ = volume_names(disk.serial)
        qmp.execute(vmdir.control, 'block_resize',
                    {'node-name': node, 'size': size})

    def announce_disk_size(self, vmdir, index, size):
        """block_resize to the size the file already has: QEMU raises the
        virtio-blk config-change interrupt and the guest re-reads the
        capacity (a restored device keeps the capacity it had when it was
        saved, whatever the file's size)."""
        qmp.execute(vmdir.control, 'block_resize',
                    {'node-name': 'disk%d' % index, 'size': int(size)})
