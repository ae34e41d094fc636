"""FreeBSD bhyve backend: a VMSpec as a bhyve(8) config tree, run by
``bhyve -k FILE`` under nova_bhyve.hypervisor.bhyve.supervisor, controlled with bhyvectl(8).

NEVER EXERCISED ON A REAL FREEBSD HOST. Every key, value and exit status
below was checked against FreeBSD's usr.sbin/bhyve sources and the bhyve(8),
bhyve_config(5) and bhyvectl(8) manual pages, and is pinned by
tests/unit/test_bhyve_backend.py; see docs/bhyve.md.

Decisions:

* Firmware boot only. bhyve has no equivalent of QEMU's -kernel: without a
  boot ROM the guest must be loaded by bhyveload(8) (FreeBSD guests) or
  grub-bhyve before *every* bhyve start, reboots included. Instances with a
  kernel_id are refused with a HypervisorError; whole-disk images boot
  through UEFI (``lpc.bootrom`` = [bhyve]bhyve_bootrom).
* Disks must be raw files or devices (bhyve's block_if opens the path as
  it is; there is no qcow2 reader in bhyve).
* Console: COM1 is the A side of an nmdm(4) pair, ``/dev/nmdm<uuid>A``; the
  supervisor reads the B side (``/dev/nmdm<uuid>B``, raw mode, no echo) and
  appends it to ``console.log``. nmdm.ko must be loaded.
* Power: SIGTERM to bhyve is the ACPI power button (bhyve(8) SIGNAL
  HANDLING); it goes through the supervisor, which forwards it. kill() is
  SIGKILL (supervisor, then bhyve) and ``bhyvectl --vm=NAME --destroy``.
* pause/unpause: bhyvectl(8) has no pause (--suspend/--checkpoint write a
  snapshot and need a BHYVE_SNAPSHOT build); they stay NotImplementedError.
* suspend/resume: ``bhyvectl --suspend`` / ``bhyve -r`` when bhyvectl was
  built with BHYVE_SNAPSHOT (see bhyve_state), NotImplementedError otherwise.
* Consoles: VNC is the fbuf device (``tcp=host:port``, ``w``/``h``) plus an
  xHCI tablet; there is no TCP serial console (COM1 is nmdm(4); Nova's
  serial console is refused with ConsoleTypeUnavailable).
* Volumes: bhyve has no PCI hot-plug, so volumes are attached only while
  the VM is stopped (virtio-blk, ``ser`` = volume id); attach/detach on a
  running VM raise NotImplementedError.
"""
import collections
import json
import os
import platform
import re
import signal
import subprocess

from nova.compute import power_state

from nova_bhyve import conf
from nova_bhyve.hypervisor.bhyve import supervisor
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.bhyve import state as bhyve_state

CONF = conf.CONF

CONFIG_FILE = 'bhyve.conf'

HOSTBRIDGE_SLOT = 0
LPC_SLOT = 31
FIRST_DEVICE_SLOT = 2          # 1 is left free, as in bhyve(8)'s examples
LAST_DEVICE_SLOT = 30
MAX_AHCI_PORTS = 32
FBUF_WIDTH, FBUF_HEIGHT = 1024, 768

NIC_DEVICES = {'virtio': 'virtio-net', 'e1000': 'e1000'}
# net_backends.c matches the backend name by prefix: tap(4) and vmnet(4).
NIC_BACKEND_PREFIXES = ('tap', 'vmnet')
_MAC_RE = re.compile(r'^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$')


def nmdm_pair(spec_uuid):
    """(A side for bhyve's COM1, B side for the console reader)."""
    base_name = '/dev/nmdm%s' % spec_uuid
    return base_name + 'A', base_name + 'B'


def _bool(value):
    return 'true' if value else 'false'


def _pci(slot, key=None):
    node = 'pci.0.%d.0' % slot
    return node if key is None else '%s.%s' % (node, key)


def render_config(spec, vmdir):
    """The bhyve config tree (bhyve_config(5)) for ``spec``: an ordered
    mapping of dotted variable names to string values. Pure.

    Raises HypervisorError for what bhyve cannot run (kernel boot, non-raw
    disks, NIC backends other than tap/vmnet, too many devices).
    """
    if spec.boot.kernel:
        raise base.HypervisorError(
            'instance %s asks for direct kernel boot (kernel_id): bhyve '
            'cannot load a Linux kernel itself; it boots whole-disk images '
            'through UEFI firmware ([bhyve]bhyve_bootrom). Use a whole-disk '
            'image instead of kernel_id/ramdisk_id.' % spec.uuid)
    bootrom = CONF.bhyve.bhyve_bootrom
    if not bootrom:
        raise base.HypervisorError(
            '[bhyve]bhyve_bootrom is empty: bhyve needs UEFI firmware to '
            'boot instance %s' % spec.uuid)

    tree = collections.OrderedDict()
    tree['name'] = spec.name
    tree['uuid'] = spec.uuid
    tree['cpus'] = str(spec.vcpus)
    tree['memory.size'] = '%dM' % spec.memory_mb
    if CONF.bhyve.bhyve_wired_memory:
        tree['memory.wired'] = 'true'      # live migration needs it
    tree['acpi_tables'] = 'true'           # ACPI power button for SIGTERM
    tree['destroy_on_poweroff'] = 'true'   # release vmm memory on exit 1
    tree['rtc.use_localtime'] = 'false'    # RTC in UTC, as Nova guests expect
    tree['x86.vmexit_on_hlt'] = 'true'     # idle vCPUs yield the host CPU
    tree['x86.vmexit_on_pause'] = 'true'
    tree[_pci(HOSTBRIDGE_SLOT, 'device')] = 'hostbridge'
    tree[_pci(LPC_SLOT, 'device')] = 'lpc'
    tree['lpc.com1.path'] = nmdm_pair(spec.uuid)[0]
    tree['lpc.bootrom'] = bootrom

    slots = iter(range(FIRST_DEVICE_SLOT, LAST_DEVICE_SLOT + 1))

    def next_slot(what):
        try:
            return next(slots)
        except StopIteration:
            raise base.HypervisorError(
                'instance %s: no free PCI slot for %s (slots %d-%d are used)'
                % (spec.uuid, what, FIRST_DEVICE_SLOT, LAST_DEVICE_SLOT))

    ahci_slot, ahci_ports = None, 0
    for index, disk in enumerate(spec.disks):
        if disk.format != 'raw':
            raise base.HypervisorError(
                'instance %s: disk %s is %s; bhyve opens raw images and '
                'devices only' % (spec.uuid, disk.path, disk.format))
        ro = disk.readonly or disk.device == 'cdrom'
        if disk.bus == 'virtio' and disk.device == 'disk':
            slot = next_slot('disk %d' % index)
            tree[_pci(slot, 'device')] = 'virtio-blk'
            tree[_pci(slot, 'path')] = disk.path
            if ro:
                tree[_pci(slot, 'ro')] = 'true'
            if disk.serial:       # a Cinder volume: its id as the serial
                tree[_pci(slot, 'ser')] = disk.serial
            continue
        # sata, ide (bhyve has no IDE: AHCI stands in) and every cdrom:
        # ports of one AHCI controller, in spec order.
        if ahci_slot is None:
            ahci_slot = next_slot('the AHCI controller')
            tree[_pci(ahci_slot, 'device')] = 'ahci'
        if ahci_ports >= MAX_AHCI_PORTS:
            raise base.HypervisorError(
                'instance %s: more than %d SATA/IDE/CD-ROM disks'
                % (spec.uuid, MAX_AHCI_PORTS))
        port = 'port.%d' % ahci_ports
        ahci_ports += 1
        tree[_pci(ahci_slot, port + '.type')] = (
            'cd' if disk.device == 'cdrom' else 'hd')
        tree[_pci(ahci_slot, port + '.path')] = disk.path
        if ro:
            tree[_pci(ahci_slot, port + '.ro')] = 'true'

    for index, nic in enumerate(spec.nics):
        if nic.model not in NIC_DEVICES:
            raise base.HypervisorError(
                'instance %s: NIC model %s is not supported on bhyve'
                % (spec.uuid, nic.model))
        if not nic.ifname.startswith(NIC_BACKEND_PREFIXES):
            raise base.HypervisorError(
                'instance %s: NIC %d uses %r; bhyve needs a tap(4) or '
                'vmnet(4) interface' % (spec.uuid, index, nic.ifname))
        if not _MAC_RE.match(nic.mac):
            raise base.HypervisorError(
                'instance %s: bad MAC address %r' % (spec.uuid, nic.mac))
        slot = next_slot('NIC %d' % index)
        tree[_pci(slot, 'device')] = NIC_DEVICES[nic.model]
        tree[_pci(slot, 'backend')] = nic.ifname
        tree[_pci(slot, 'mac')] = nic.mac.lower()
        if nic.mtu and nic.model == 'virtio':   # only virtio-net has mtu
            tree[_pci(slot, 'mtu')] = str(nic.mtu)

    consoles = getattr(spec, 'consoles', None)
    if consoles is not None and consoles.vnc_host and consoles.vnc_port:
        # VNC: the fbuf device's RFB server (pci_fbuf.c: "tcp" or "rfb" is
        # host:port, an IPv6 host in brackets; "w"/"h" the resolution), and
        # an xHCI tablet so that the pointer follows the VNC client.
        host = consoles.vnc_host
        if ':' in host:
            host = '[%s]' % host
        slot = next_slot('the framebuffer')
        tree[_pci(slot, 'device')] = 'fbuf'
        tree[_pci(slot, 'tcp')] = '%s:%d' % (host, consoles.vnc_port)
        tree[_pci(slot, 'w')] = str(FBUF_WIDTH)
        tree[_pci(slot, 'h')] = str(FBUF_HEIGHT)
        slot = next_slot('the xHCI tablet')
        tree[_pci(slot, 'device')] = 'xhci'
        tree[_pci(slot, 'slot.1.device')] = 'tablet'
    return tree


def format_config(tree):
    """The text of a ``bhyve -k`` file: one ``key=value`` per line.

    bhyve expands ``%(var)`` in values, so a literal ``%`` is written as
    ``%%`` (bhyve_config(5) VARIABLE VALUES). No spaces around ``=``.
    """
    lines = ['# bhyve config tree written by nova-bhyve; run: bhyve -k FILE']
    for key, value in tree.items():
        value = str(value)
        if '\n' in value or '\n' in key or '=' in key or not key:
            raise base.HypervisorError('bad bhyve config entry %r=%r'
                                       % (key, value))
        lines.append('%s=%s' % (key, value.replace('%', '%%')))
    return '\n'.join(lines) + '\n'


def parse_config(text):
    """Inverse of format_config (used to find the VM name again)."""
    tree = collections.OrderedDict()
    for line in text.splitlines():
        if not line or line.startswith('#'):
            continue
        key, _, value = line.partition('=')
        tree[key] = value.replace('%%', '%')
    return tree


def write_config(tree, path):
    """Write ``tree`` to ``path`` atomically; return ``path``."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(format_config(tree))
    os.replace(tmp, path)
    return path


def freebsd_version(release):
    """'14.1-RELEASE-p5' -> 14001 (hypervisor_version is an integer)."""
    m = re.match(r'^(\d+)\.(\d+)', release or '')
    return int(m.group(1)) * 1000 + int(m.group(2)) if m else 0


class BhyveHypervisor(base.Hypervisor):
    """bhyve(8) under nova_bhyve.hypervisor.bhyve.supervisor (policy 'bhyve')."""

    name = 'bhyve'
    instance_disk_format = 'raw'     # bhyve has no qcow2 reader
    # COM1 is an nmdm(4) device: bhyve has no TCP serial port
    supports_serial_tcp = False
    supports_vnc = True              # the fbuf device's RFB server

    def __init__(self):
        self.bhyve = CONF.bhyve.bhyve_path
        self.bhyvectl = CONF.bhyve.bhyvectl_path

    # -- commands (the only things that touch bhyve/bhyvectl) ----------

    def bhyve_argv(self, config_path):
        return [self.bhyve, '-k', config_path]

    def bhyvectl_argv(self, vm_name, *ops):
        return [self.bhyvectl, '--vm=%s' % vm_name] + list(ops)

    def _bhyvectl(self, vm_name, *ops, check=True):
        argv = self.bhyvectl_argv(vm_name, *ops)
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True)
        if check and proc.returncode != 0:
            raise base.HypervisorError('%s failed (%d): %s' % (
                ' '.join(argv), proc.returncode, proc.stderr.strip()))
        return proc

    # -- paths ------------------------------------------------------------

    @staticmethod
    def config_path(vmdir):
        return os.path.join(vmdir.path, CONFIG_FILE)

    @staticmethod
    def supervisor_pidfile(vmdir):
        return os.path.join(vmdir.path, supervisor.SUPERVISOR_PIDFILE)

    def vm_name(self, vmdir):
        """The bhyve VM name (= vmm device name) of the VM in ``vmdir``."""
        try:
            with open(self.config_path(vmdir)) as f:
                name = parse_config(f.read()).get('name')
            if name:
                return name
        except OSError:
            pass
        try:
            with open(vmdir.spec) as f:
                return json.loads(f.read())['name']
        except (OSError, ValueError, KeyError):
            raise base.HypervisorError('no bhyve config or spec in %s'
                                       % vmdir.path)

    @staticmethod
    def vmm_exists(vm_name):
        """True if vmm(4) still holds the VM (its /dev/vmm node exists)."""
        return os.path.exists(os.path.join('/dev/vmm', vm_name))

    def supervisor_pid(self, vmdir):
        pid = supervisor.read_pidfile(self.supervisor_pidfile(vmdir))
        return pid if base.process_alive(pid, vmdir.uuid) else None

    # -- lifecycle ----------------------------------------------------------

    def start(self, spec, vmdir):
        if self.supervisor_pid(vmdir) or self.pid(vmdir):
            raise base.HypervisorError('VM %s is already running' % spec.uuid)
        tree = render_config(spec, vmdir)
        if not os.path.exists(tree['lpc.bootrom']):
            raise base.HypervisorError(
                'UEFI firmware %s not found (install sysutils/edk2 or '
                'sysutils/bhyve-firmware, or set [bhyve]bhyve_bootrom)'
                % tree['lpc.bootrom'])
        path = write_config(tree, self.config_path(vmdir))
        self.destroy_vmm(spec.name)         # a leftover from a crash/halt
        try:
            supervisor.spawn(
                vmdir.path, self.bhyve_argv(path), policy='bhyve',
                console_device=nmdm_pair(spec.uuid)[1],
                console_keep_bytes=CONF.bhyve.console_log_keep_bytes)
        except RuntimeError as e:
            raise base.HypervisorError(str(e))
        status = supervisor.read_exit_status(vmdir.path)
        if status is not None and status.get('error'):
            raise base.HypervisorError(
                'bhyve for %s ended at once: %s (status %s), see %s' % (
                    spec.uuid, status.get('outcome'), status.get('status'),
                    os.path.join(vmdir.path, supervisor.LOGFILE)))

    # -- live migration: see bhyve_migration (never run on FreeBSD) -------

    supports_block_migration = False

    def migration_support(self):
        """What this host's bhyvectl can do (its usage text, read once)."""
        from nova_bhyve.hypervisor.bhyve import migration as bhyve_migration
        if getattr(self, '_migration_support', None) is None:
            self._migration_support = bhyve_migration.detect_support(
                self.bhyvectl)
        return self._migration_support

    @property
    def supports_live_migration(self):
        return self.migration_support().live

    def check_live_migration(self, vmdir, block, bandwidth_mibps):
        """Refuse (NotImplementedError, with the reason) what the prototype
        cannot do: no live support, a block migration, a bandwidth cap; on
        the source (``vmdir`` given) a VM without wired memory."""
        from nova_bhyve.hypervisor.bhyve import migration as bhyve_migration
        support = self.migration_support()
        bhyve_migration.refuse_unsupported(support, block, bandwidth_mibps)
        if vmdir is not None:
            try:
                with open(self.config_path(vmdir)) as f:
                    tree = parse_config(f.read())
            except OSError as e:
                raise base.HypervisorError('no bhyve config for %s: %s'
                                           % (vmdir.uuid, e))
            bhyve_migration.check_request(support, True, 0, tree)

    def prepare_incoming(self, spec, vmdir, address, block, policy=None):
        from nova_bhyve.hypervisor.bhyve import migration as bhyve_migration
        return bhyve_migration.prepare_incoming(
            self, self.migration_support(), spec, vmdir, address, block)

    def endpoint_from_json(self, text):
        from nova_bhyve.hypervisor.bhyve import migration as bhyve_migration
        return bhyve_migration.Endpoint.from_json(text)

    def finish_incoming(self, vmdir):
        from nova_bhyve.hypervisor.bhyve import migration as bhyve_migration
        bhyve_migration.finish_incoming(self, vmdir)

    def migrate_to(self, vmdir, spec, endpoint, bandwidth, policy,
                   backed=()):
        from nova_bhyve.hypervisor.bhyve import migration as bhyve_migration
        return bhyve_migration.BhyveOutgoing(
            self, self.migration_support(), vmdir, endpoint, bandwidth)

    def adopt_incoming(self, runtime, vmdir):
        """Shared instances path: the migrated bhyve's supervisor keeps
        writing into ``runtime`` (its directory for life), so the instance
        directory gets symlinks to its files instead of the files; the next
        start of the VM in ``vmdir`` replaces them with its own."""
        for name in (supervisor.SUPERVISOR_PIDFILE, supervisor.VM_PIDFILE,
                     supervisor.EXIT_STATUS, supervisor.LOGFILE,
                     supervisor.CONSOLE_LOG, CONFIG_FILE, 'spec.json'):
            link = os.path.join(vmdir.path, name)
            try:
                os.unlink(link)
            except FileNotFoundError:
                pass
            os.symlink(os.path.join(os.path.basename(runtime.path), name),
                       link)
        return False          # keep ``runtime``

    def power_state(self, vmdir):
        if self.pid(vmdir) or self.supervisor_pid(vmdir):
            return power_state.RUNNING     # (a supervised reboot included)
        status = supervisor.read_exit_status(vmdir.path)
        if status is not None and status.get('error'):
            return power_state.CRASHED
        return self.stopped_state(vmdir)

    def request_shutdown(self, vmdir):
        """ACPI power button: SIGTERM to the supervisor, which forwards it to
        bhyve and does not restart a guest that reboots instead."""
        pid = self.supervisor_pid(vmdir) or self.pid(vmdir)
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill(self, vmdir):
        """SIGKILL the supervisor (so it restarts nothing), then bhyve, then
        ``bhyvectl --vm=NAME --destroy``."""
        try:
            name = self.vm_name(vmdir)
        except base.HypervisorError:
            name = None                 # never configured: nothing in vmm
        sup = self.supervisor_pid(vmdir)
        if sup:
            base.kill_and_wait(sup, vmdir.uuid)
        vm = self.pid(vmdir)
        if vm:
            base.kill_and_wait(vm, vmdir.uuid)
        if name:
            self.destroy_vmm(name)
        if not os.path.isdir(vmdir.path):
            return
        for path in (self.supervisor_pidfile(vmdir), vmdir.pidfile):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if sup or vm or supervisor.read_exit_status(vmdir.path) is None:
            supervisor.write_exit_status(vmdir.path, None, 'killed',
                                         supervisor.STOP)

    def destroy_vmm(self, vm_name):
        """Release the vmm(4) instance if it is still there."""
        if self.vmm_exists(vm_name):
            self._bhyvectl(vm_name, '--destroy')

    def force_reset(self, vmdir):
        """Hard reset: bhyve exits 0 and the supervisor starts it again."""
        self._bhyvectl(self.vm_name(vmdir), '--force-reset')

    def force_poweroff(self, vmdir):
        """Hard power off: bhyve exits 1, the supervisor stops."""
        self._bhyvectl(self.vm_name(vmdir), '--force-poweroff')

    def pause(self, vmdir):
        raise NotImplementedError(
            'bhyve cannot pause a VM: bhyvectl(8) has no pause; '
            '--suspend/--checkpoint save a snapshot instead')

    def unpause(self, vmdir):
        raise NotImplementedError('bhyve cannot pause/unpause a VM')

    def host_info(self):
        release = platform.release() if platform.system() == 'FreeBSD' else ''
        return {'hypervisor_type': self.name,
                'hypervisor_version': freebsd_version(release)}

    # -- save / restore: see bhyve_state ------------------------------------

    _snapshot_support = None

    def can_save(self):
        if self._snapshot_support is None:
            self._snapshot_support = bhyve_state.snapshot_supported(
                self.bhyvectl)
        return self._snapshot_support

    def _require_snapshot(self):
        if not self.can_save():
            raise NotImplementedError(
                '%s was built without BHYVE_SNAPSHOT: no suspend/resume'
                % self.bhyvectl)

    def saved_state_extra(self, vmdir):
        return [vmdir.saved_state + s for s in bhyve_state.SUFFIXES]

    def save(self, vmdir):
        self._require_snapshot()
        bhyve_state.save(self, vmdir)
        for path in (self.supervisor_pidfile(vmdir), vmdir.pidfile):
            if os.path.exists(path):
                os.unlink(path)
        supervisor.write_exit_status(vmdir.path, 0, 'suspended',
                                     supervisor.STOP)

    def restore(self, spec, vmdir):
        self._require_snapshot()
        state = vmdir.saved_state
        bhyve_state.check_state_files(state)
        tree = render_config(spec, vmdir)
        path = write_config(tree, self.config_path(vmdir))
        self.destroy_vmm(spec.name)
        try:
            # -r on the first start only: when the resumed guest reboots,
            # the supervisor starts bhyve again without it (the state
            # files are gone by then)
            supervisor.spawn(
                vmdir.path, self.bhyve_argv(path), policy='bhyve',
                first_run_args=bhyve_state.restore_args(state),
                console_device=nmdm_pair(spec.uuid)[1],
                console_keep_bytes=CONF.bhyve.console_log_keep_bytes)
        except RuntimeError as e:
            raise base.HypervisorError(str(e))
        if not bhyve_state.wait_started(self, vmdir, spec.name):
            self.kill(vmdir)
            raise base.HypervisorError(
                'bhyve -r %s did not come up, see %s' % (
                    state, os.path.join(vmdir.path, supervisor.LOGFILE)))
        self.discard_saved_state(vmdir)
    def attach_disk(self, vmdir, disk):
        raise NotImplementedError(
            'bhyve has no PCI hot-plug: attach volumes while the instance '
            'is stopped')

    def detach_disk(self, vmdir, disk):
        raise NotImplementedError(
            'bhyve has no PCI hot-plug: detach volumes while the instance '
            'is stopped')
