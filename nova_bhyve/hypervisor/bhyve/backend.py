"""FreeBSD bhyve backend: a VMSpec as a bhyve(8) config tree, run by
``bhyve -k FILE`` under nova_bhyve.hypervisor.bhyve.supervisor, controlled with
bhyvectl(8).

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
* Sandbox ([bhyve] sandbox, on by default): bhyve must enter Capsicum
  capability mode itself (checked at start-up, bhyve_capsicum) and, with
  [bhyve] sandbox_jail (default), runs in a jail of its own as a uid of
  its own (bhyve_jail). Suspend/resume and live migration are refused in
  the jail (bhyvectl reaches bhyve through a socket bhyve makes in its own
  file system view, which is read-only there).
"""
import json
import os
import platform
import re
import signal

from nova.compute import power_state
from oslo_concurrency import processutils
from oslo_log import log as logging

from nova_bhyve import conf
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.bhyve import capsicum as bhyve_capsicum
from nova_bhyve.hypervisor.bhyve import config
from nova_bhyve.hypervisor.bhyve import cpu as bhyve_cpu
from nova_bhyve.hypervisor.bhyve import jail as bhyve_jail
from nova_bhyve.hypervisor.bhyve import migration as bhyve_migration
from nova_bhyve.hypervisor.bhyve import state as bhyve_state
from nova_bhyve.hypervisor.bhyve import supervisor
from nova_bhyve.sandbox import SandboxError
from nova_bhyve.sandbox import uids

CONF = conf.CONF
LOG = logging.getLogger(__name__)

def freebsd_version(release):
    """'14.1-RELEASE-p5' -> 14001 (hypervisor_version is an integer)."""
    m = re.match(r'^(\d+)\.(\d+)', release or '')
    return int(m.group(1)) * 1000 + int(m.group(2)) if m else 0


class BhyveHypervisor(base.Hypervisor):
    """bhyve(8) under the supervisor (bhyve/supervisor.py, policy 'bhyve')."""

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

    def bhyvectl_call(self, vm_name, *ops, check=True):
        """(stdout, stderr) of bhyvectl ``ops`` on ``vm_name``; with
        ``check`` a non-zero exit is a HypervisorError."""
        argv = self.bhyvectl_argv(vm_name, *ops)
        try:
            return processutils.execute(*argv, check_exit_code=check)
        except processutils.ProcessExecutionError as e:
            raise base.HypervisorError('%s failed (%d): %s' % (
                ' '.join(argv), e.exit_code, (e.stderr or '').strip()))

    # -- paths ------------------------------------------------------------

    @staticmethod
    def config_path(vmdir):
        return os.path.join(vmdir.path, config.CONFIG_FILE)

    @staticmethod
    def supervisor_pidfile(vmdir):
        return os.path.join(vmdir.path, supervisor.SUPERVISOR_PIDFILE)

    def vm_name(self, vmdir):
        """The bhyve VM name (= vmm device name) of the VM in ``vmdir``."""
        try:
            with open(self.config_path(vmdir)) as f:
                name = config.parse_config(f.read()).get('name')
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
        tree = config.render_config(spec, vmdir)
        if not os.path.exists(tree['lpc.bootrom']):
            raise base.HypervisorError(
                'UEFI firmware %s not found (install sysutils/edk2 or '
                'sysutils/bhyve-firmware, or set [bhyve]bhyve_bootrom)'
                % tree['lpc.bootrom'])
        self.destroy_vmm(spec.name)         # a leftover from a crash/halt
        if self.jailed:
            argv = self._jail(spec, vmdir, tree)
        else:
            argv = self.bhyve_argv(
                config.write_config(tree, self.config_path(vmdir)))
        try:
            supervisor.spawn(
                vmdir.path, argv, policy='bhyve',
                console_device=config.nmdm_pair(spec.uuid)[1],
                console_keep_bytes=CONF.bhyve.console_log_keep_bytes)
        except RuntimeError as e:
            self.release_sandbox(vmdir)
            raise base.HypervisorError(str(e))
        status = supervisor.read_exit_status(vmdir.path)
        if status is not None and status.get('error'):
            self.release_sandbox(vmdir)
            raise base.HypervisorError(
                'bhyve for %s ended at once: %s (status %s), see %s' % (
                    spec.uuid, status.get('outcome'), status.get('status'),
                    os.path.join(vmdir.path, supervisor.LOGFILE)))

    # -- the sandbox: see bhyve_capsicum, bhyve_jail (never run on FreeBSD)

    @property
    def jailed(self):
        """Each bhyve in a jail of its own as a uid of its own."""
        return CONF.bhyve.sandbox and CONF.bhyve.sandbox_jail

    def uids(self):
        """The uid allocations (kept under the runtime path, as the QEMU
        backend keeps them: a reboot ends every VM and its jail)."""
        return uids.UidAllocator(
            os.path.join(CONF.bhyve.runtime_path, 'uids'),
            CONF.bhyve.sandbox_uid_range)

    @staticmethod
    def sandbox_name(vmdir):
        return os.path.basename(vmdir.runtime)

    def check_host(self):
        """Refuse a host where bhyve would not sandbox itself (Capsicum)
        or could not be jailed, naming what is missing; with [bhyve]
        sandbox off, a warning at every start."""
        if not CONF.bhyve.sandbox:
            LOG.warning('[bhyve] sandbox is off: bhyve runs as root on the '
                        'host, and nothing checked that it enters Capsicum '
                        'capability mode')
            return
        problems = bhyve_capsicum.missing(self.bhyve)
        if CONF.bhyve.sandbox_jail:
            try:
                uid_range = uids.parse_range(CONF.bhyve.sandbox_uid_range)
            except ValueError as e:
                raise base.HypervisorError(str(e))
            problems += bhyve_jail.host_problems(
                uid_range, [self.bhyve, CONF.bhyve.bhyve_bootrom])
            if bhyve_state.snapshot_supported(self.bhyvectl):
                problems.append(
                    '%s was built with BHYVE_SNAPSHOT: such a bhyve makes '
                    'its checkpoint socket in /var/run/bhyve when it starts, '
                    'which is read-only in its jail (use a build without '
                    'it, or [bhyve] sandbox_jail = false)' % self.bhyvectl)
        else:
            LOG.warning('[bhyve] sandbox_jail is off: bhyve runs as root on '
                        'the host, Capsicum capability mode is its only '
                        'sandbox')
        if problems:
            raise base.HypervisorError(
                'this host lacks what the VM sandbox needs: %s. Fix the '
                'host, or turn the sandbox off knowingly ([bhyve] sandbox '
                '= false).' % '; '.join(problems))
        LOG.info('VM sandbox on: bhyve enters Capsicum capability mode%s',
                 ', each in a jail of its own, uids %s' % (
                     CONF.bhyve.sandbox_uid_range)
                 if CONF.bhyve.sandbox_jail else '')

    def _jail(self, spec, vmdir, tree):
        """Make the VM's jail (uid, files, mounts, ruleset, jail, vmm
        instance); the supervisor's argv. On failure nothing is left."""
        # a leftover jail first: its root (mounts) is in the runtime dir
        self.release_sandbox(vmdir)
        try:
            base.make_runtime_dir(vmdir)
            uid = self.uids().allocate(self.sandbox_name(vmdir))
            j = bhyve_jail.VMJail.for_tree(tree, vmdir, uid)
            path = config.write_config(
                bhyve_jail.jail_tree(tree, vmdir.path),
                self.config_path(vmdir))
            for f in [path] + [v for k, v in tree.items()
                               if k.endswith('.path') and k.startswith('pci.')
                               and v.startswith(vmdir.path + '/')]:
                os.chown(f, uid, uid)
                os.chmod(f, 0o600)
            bhyve_jail.setup(j, self.bhyvectl)
        except (SandboxError, OSError, ValueError,
                base.HypervisorError) as e:
            self.release_sandbox(vmdir)
            if isinstance(e, base.HypervisorError):
                raise
            raise base.HypervisorError(
                'cannot make the sandbox of instance %s: %s' % (spec.uuid, e))
        LOG.debug('instance %s: bhyve jailed as %s, uid %d', spec.uuid,
                  j.name, uid)
        return j.bhyve_argv(self.bhyve, path)

    def release_sandbox(self, vmdir):
        """Remove the VM's jail (if it has one) and give back its uid;
        idempotent."""
        j = bhyve_jail.VMJail.from_state(vmdir)
        if j is not None:
            bhyve_jail.teardown(j)
        if CONF.bhyve.sandbox or j is not None:
            try:
                self.uids().release(self.sandbox_name(vmdir))
            except (OSError, ValueError) as e:
                LOG.warning('uid of %s not released: %s', vmdir.uuid, e)

    # -- live migration: see bhyve_migration (never run on FreeBSD) -------

    supports_block_migration = False

    def migration_support(self):
        """What this host's bhyvectl can do (its usage text, read once)."""
        if getattr(self, '_migration_support', None) is None:
            self._migration_support = bhyve_migration.detect_support(
                self.bhyvectl)
        return self._migration_support

    @property
    def supports_live_migration(self):
        # the prototype's bhyvectl --migrate-live talks to bhyve's socket
        # in /var/run/bhyve, read-only in a jail
        return not self.jailed and self.migration_support().live

    def check_live_migration(self, vmdir, block, bandwidth_mibps):
        """Refuse (NotImplementedError, with the reason) what the prototype
        cannot do: no live support, a block migration, a bandwidth cap; on
        the source (``vmdir`` given) a VM without wired memory."""
        if self.jailed:
            raise NotImplementedError(
                'live migration of a jailed bhyve is not supported: '
                'bhyvectl reaches bhyve through a socket in /var/run/bhyve, '
                'read-only in its jail ([bhyve] sandbox_jail)')
        support = self.migration_support()
        bhyve_migration.refuse_unsupported(support, block, bandwidth_mibps)
        if vmdir is not None:
            try:
                with open(self.config_path(vmdir)) as f:
                    tree = config.parse_config(f.read())
            except OSError as e:
                raise base.HypervisorError('no bhyve config for %s: %s'
                                           % (vmdir.uuid, e))
            bhyve_migration.check_request(support, True, 0, tree)

    def prepare_incoming(self, spec, vmdir, address, block, policy=None):
        return bhyve_migration.prepare_incoming(
            self, self.migration_support(), spec, vmdir, address, block)

    def endpoint_from_json(self, text):
        return bhyve_migration.Endpoint.from_json(text)

    def finish_incoming(self, vmdir):
        bhyve_migration.finish_incoming(self, vmdir)

    def migrate_to(self, vmdir, spec, endpoint, bandwidth, policy,
                   backed=()):
        return bhyve_migration.BhyveOutgoing(
            self, self.migration_support(), vmdir, endpoint, bandwidth)

    def adopt_incoming(self, runtime, vmdir):
        """Shared instances path: the migrated bhyve's supervisor keeps
        writing into ``runtime`` (its directory for life), so the instance
        directory gets symlinks to its files instead of the files; the next
        start of the VM in ``vmdir`` replaces them with its own."""
        for name in (supervisor.SUPERVISOR_PIDFILE, supervisor.VM_PIDFILE,
                     supervisor.EXIT_STATUS, supervisor.LOGFILE,
                     supervisor.CONSOLE_LOG, config.CONFIG_FILE, 'spec.json'):
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
        ``bhyvectl --vm=NAME --destroy``, then its jail and uid."""
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
        self.release_sandbox(vmdir)
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
            self.bhyvectl_call(vm_name, '--destroy')

    def force_reset(self, vmdir):
        """Hard reset: bhyve exits 0 and the supervisor starts it again."""
        self.bhyvectl_call(self.vm_name(vmdir), '--force-reset')

    def force_poweroff(self, vmdir):
        """Hard power off: bhyve exits 1, the supervisor stops."""
        self.bhyvectl_call(self.vm_name(vmdir), '--force-poweroff')

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

    def cpu_info(self):
        """sysctl's and dmesg.boot's facts (bhyve_cpu); the accelerator is
        vmm(4) (VT-x/AMD-V), the guest CPU the host's (vmm filters its
        CPUID), no machine types."""
        info = bhyve_cpu.read()
        info.update({
            'accelerator': 'vmm',
            'hypervisor_type': self.name,
            'hypervisor_version': self.host_info()['hypervisor_version'],
            'machine_types': [],
            'guest_cpu': 'host'})
        return info

    # -- machine type: none ---------------------------------------------------

    def resolve_machine(self, requested):
        """None: bhyve has no machine types (one virtual platform, not
        versioned); an image's hw_machine_type names QEMU's and is
        ignored here."""
        if requested:
            LOG.debug('hw_machine_type=%s ignored: bhyve has no machine '
                      'types', requested)
        return None

    def check_machine(self, machine):
        """Nothing to check: bhyve has no machine types."""

    # -- save / restore: see bhyve_state ------------------------------------

    _snapshot_support = None

    def can_save(self):
        if self.jailed:
            return False     # bhyvectl --suspend: see _require_snapshot
        if self._snapshot_support is None:
            self._snapshot_support = bhyve_state.snapshot_supported(
                self.bhyvectl)
        return self._snapshot_support

    def _require_snapshot(self):
        if self.jailed:
            raise NotImplementedError(
                'suspend/resume of a jailed bhyve is not supported: '
                'bhyvectl reaches bhyve through a socket bhyve creates in '
                '/var/run/bhyve, read-only in its jail ([bhyve] '
                'sandbox_jail)')
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
        tree = config.render_config(spec, vmdir)
        path = config.write_config(tree, self.config_path(vmdir))
        self.destroy_vmm(spec.name)
        try:
            # -r on the first start only: when the resumed guest reboots,
            # the supervisor starts bhyve again without it (the state
            # files are gone by then)
            supervisor.spawn(
                vmdir.path, self.bhyve_argv(path), policy='bhyve',
                first_run_args=bhyve_state.restore_args(state),
                console_device=config.nmdm_pair(spec.uuid)[1],
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
