"""The one interface the driver uses to run VMs, whatever the hypervisor.

A VM lives in its own directory (``VMDir``): the saved spec, the pid file and
the console log; its control sockets are in its runtime directory
(``VMDir.runtime``, named after it). The VM process is detached from
nova-compute, so everything needed to find and control it again after a
nova-compute restart is found from that directory.
"""
import abc
import dataclasses
import errno
import hashlib
import os
import signal
import time

from nova.compute import power_state

from nova_bhyve import conf

CONF = conf.CONF


class HypervisorError(Exception):
    """A hypervisor operation failed; the message says what and why."""


class DestinationRefused(HypervisorError):
    """The destination of a live migration certainly did not run the guest:
    the request to do so never reached it, or it refused before acting. The
    source still holds the whole guest and may take it back."""


#: longest path a unix socket can be bound at (sockaddr_un.sun_path is
#: 108 bytes with the terminating NUL)
SUN_PATH_MAX = 107
#: the longest socket name in a runtime directory
_LONGEST_SOCKET = 'events.sock'
#: length of a runtime directory's name: uuid, '-', 10 hex digits
RUNTIME_NAME_LEN = 36 + 1 + 10
#: longest [bhyve] runtime_path with which every socket path fits
RUNTIME_ROOT_MAX = SUN_PATH_MAX - RUNTIME_NAME_LEN - len(_LONGEST_SOCKET) - 2


class VMDir:
    """Paths of one VM's files. Only naming here, no policy.

    Two directories: ``path`` (in instances_path: spec, pid file, console
    log, disks) and ``runtime`` (in ``[bhyve] runtime_path``: the monitor
    sockets). The runtime directory's name is the VM directory's name plus
    a digest of its absolute path, so it stays short whatever
    instances_path is, is found again from ``path`` alone (adoption after
    a nova-compute restart), and differs for every VM directory (an
    incoming live migration's runtime VMDir, two nova-computes sharing a
    machine in tests)."""

    def __init__(self, path, runtime_root=None):
        self.path = path
        self.runtime_root = runtime_root

    def _p(self, name):
        return os.path.join(self.path, name)

    def _r(self, name):
        return os.path.join(self.runtime, name)

    @property
    def uuid(self):
        return os.path.basename(self.path.rstrip('/'))

    @property
    def runtime(self):
        root = self.runtime_root or CONF.bhyve.runtime_path
        digest = hashlib.sha256(os.path.abspath(self.path).encode())
        return os.path.join(root, '%s-%s' % (self.uuid[:36],
                                             digest.hexdigest()[:10]))

    spec = property(lambda self: self._p('spec.json'))
    pidfile = property(lambda self: self._p('vm.pid'))
    control = property(lambda self: self._r('control.sock'))
    events = property(lambda self: self._r(_LONGEST_SOCKET))
    serial = property(lambda self: self._r('serial.sock'))
    console_log = property(lambda self: self._p('console.log'))
    #: the VM process's own messages (its stderr), when it is sandboxed
    vm_log = property(lambda self: self._p('vm.log'))
    exit_status = property(lambda self: self._p('exit.status'))
    #: memory + device state of a suspended VM (see Hypervisor.save)
    saved_state = property(lambda self: self._p('suspended.state'))

    def disk(self, name='disk'):
        return self._p(name)

    def read_pid(self):
        try:
            with open(self.pidfile) as f:
                return int(f.read().strip() or 0) or None
        except (OSError, ValueError):
            return None


def check_runtime_root(root):
    """HypervisorError when the socket paths under ``root`` would not fit
    a unix socket address."""
    if len(os.path.abspath(root).encode()) > RUNTIME_ROOT_MAX:
        raise HypervisorError(
            '[bhyve] runtime_path %s is too long: at most %d bytes, so that '
            'the VMs\' unix sockets fit in %d bytes' % (
                root, RUNTIME_ROOT_MAX, SUN_PATH_MAX))


def make_runtime_dir(vmdir):
    """A fresh, empty VMDir.runtime (mode 0700), whatever was there."""
    root = vmdir.runtime_root or CONF.bhyve.runtime_path
    check_runtime_root(root)
    os.makedirs(root, 0o755, exist_ok=True)
    remove_runtime_dir(vmdir)
    os.mkdir(vmdir.runtime, 0o700)
    return vmdir.runtime


def remove_runtime_dir(vmdir):
    path = vmdir.runtime
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return
    for name in names:       # sockets and files only, never a tree
        try:
            os.unlink(os.path.join(path, name))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def move_runtime_dir(src, dst):
    """The runtime directory of VMDir ``src`` becomes ``dst``'s (a live
    migration's incoming VM adopted on a shared instances path): the
    sockets in it keep working."""
    if not os.path.isdir(src.runtime):
        return
    remove_runtime_dir(dst)
    os.rename(src.runtime, dst.runtime)


def process_alive(pid, marker=None):
    """True if ``pid`` runs and (when given) its command line has ``marker``.

    The marker (the instance uuid) guards against a recycled pid.
    """
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    if marker is None:
        return True
    cmdline = _cmdline(pid)
    return cmdline is None or marker in cmdline


def _cmdline(pid):
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            return f.read().replace(b'\0', b' ').decode(errors='replace')
    except OSError:
        return None    # no procfs (FreeBSD without linprocfs): trust kill(0)


def wait_for_exit(pid, timeout, marker=None, poll=0.05):
    """Wait up to ``timeout`` seconds for ``pid`` to go; True if it went."""
    deadline = time.monotonic() + timeout
    while process_alive(pid, marker):
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True


def kill_and_wait(pid, marker=None, timeout=10):
    if not process_alive(pid, marker):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if not wait_for_exit(pid, timeout, marker):
        raise HypervisorError('process %d did not exit after SIGKILL' % pid)


class Hypervisor(abc.ABC):
    """Start, stop and inspect VMs described by a guest.VMSpec."""

    #: short name, also the value of the [bhyve]hypervisor option
    name = None
    #: format of the instance disks the hypervisor opens: 'qcow2' means a
    #: copy-on-write overlay on the cached image, 'raw' a full sparse copy
    instance_disk_format = 'qcow2'
    #: the serial console can be a TCP server (Nova's serial console)
    supports_serial_tcp = False
    #: a framebuffer with a VNC/RFB server can be added
    supports_vnc = False
    #: ports a new VM gets for hot-plugging volumes (0: no hot-plug)
    hotplug_ports = 0

    def check_host(self):
        """Refuse (HypervisorError naming what is missing) a host this
        backend cannot run VMs on as configured; called once at start."""

    @abc.abstractmethod
    def start(self, spec, vmdir):
        """Launch the VM detached from this process; return when it runs."""

    @abc.abstractmethod
    def power_state(self, vmdir):
        """A nova.compute.power_state value for the VM in ``vmdir``."""

    @abc.abstractmethod
    def request_shutdown(self, vmdir):
        """Ask the guest to power off (ACPI power button); do not wait."""

    @abc.abstractmethod
    def kill(self, vmdir):
        """Stop the VM at once and release its hypervisor resources."""

    def pause(self, vmdir):
        raise NotImplementedError()

    def unpause(self, vmdir):
        raise NotImplementedError()

    def pid(self, vmdir):
        pid = vmdir.read_pid()
        return pid if process_alive(pid, vmdir.uuid) else None

    def is_running(self, vmdir):
        return self.power_state(vmdir) in (power_state.RUNNING,
                                           power_state.PAUSED)

    def shutdown(self, vmdir, timeout, retry_interval):
        """Graceful power off: ACPI requests every ``retry_interval``
        seconds until ``timeout``. Returns True if the guest powered off."""
        pid = self.pid(vmdir)
        if pid is None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            self.request_shutdown(vmdir)
            left = deadline - time.monotonic()
            if wait_for_exit(pid, max(0, min(retry_interval, left)),
                             vmdir.uuid):
                return True
            if time.monotonic() >= deadline:
                return False

    def wait_for_change(self, vmdir, stop):
        """Block until the VM's state may have changed, or ``stop`` (a
        threading.Event) is set. Returns False once no further change can
        be observed (the VM process is gone).

        This default polls; backends with an event channel override it.
        """
        if self.pid(vmdir) is None:
            return False
        stop.wait(1.0)
        return True

    def host_info(self):
        """Hypervisor type/version for get_available_resource."""
        return {'hypervisor_type': self.name, 'hypervisor_version': 0}

    def cpu_info(self):
        """get_available_resource's cpu_info (a dict): the host CPU in the
        shape of Nova's libvirt driver (arch, model, vendor, topology,
        features) plus this backend's facts: accelerator, hypervisor_type,
        hypervisor_version, machine_types (versioned), guest_cpu.
        migration/compat.py compares two of them."""
        raise NotImplementedError()

    # -- machine type ------------------------------------------------------

    def resolve_machine(self, requested):
        """The versioned machine type a new VM gets here for the image's
        ``hw_machine_type`` (``requested``; None: the default), stored in
        its spec; HypervisorError for one this host cannot run."""
        raise NotImplementedError()

    def check_machine(self, machine):
        """HypervisorError when this host cannot start the stored
        (versioned) ``machine`` of a VM moved here."""
        raise NotImplementedError()

    # -- save / restore (suspend / resume) -------------------------------
    #
    # A suspended VM is told from a shut-off one by its saved-state file:
    # no VM process and ``vmdir.saved_state`` present -> SUSPENDED. save()
    # writes that file under a temporary name and renames it only once the
    # state is complete, so its presence always means "restorable".

    def can_save(self):
        """True if save()/restore() work on this host."""
        return False

    def save(self, vmdir):
        """Write the VM's memory and device state to ``vmdir.saved_state``
        and end the VM process."""
        raise NotImplementedError()

    def restore(self, spec, vmdir):
        """Start the VM from ``vmdir.saved_state``; return when it runs.
        The state file is removed after a successful restore."""
        raise NotImplementedError()

    def stopped_state(self, vmdir):
        """Power state of a VM without a process: SUSPENDED while a saved
        state exists, SHUTDOWN otherwise."""
        if os.path.exists(vmdir.saved_state):
            return power_state.SUSPENDED
        return power_state.SHUTDOWN

    def discard_saved_state(self, vmdir):
        for path in (vmdir.saved_state,) + tuple(self.saved_state_extra(
                vmdir)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def saved_state_extra(self, vmdir):
        """Companion files of the saved state (bhyve: .kern and .meta)."""
        return ()

    # -- live disk snapshots ---------------------------------------------

    def freeze_disk(self, vmdir, index, overlay, disk=None):
        """Pivot the running disk ``index`` onto a new qcow2 ``overlay`` so
        that the disk's file stops changing; ``disk`` (its guest.Disk, when
        known) names the overlay's backing file. Raises NotImplementedError
        when the VM cannot do that while running."""
        raise NotImplementedError()

    def thaw_disk(self, vmdir, index, overlay):
        """Merge ``overlay`` back into disk ``index`` live and remove it."""
        raise NotImplementedError()

    # -- diagnostics -------------------------------------------------------

    def stats(self, vmdir, spec):
        """Runtime statistics of a running VM, a dict with: pid, uptime
        (seconds since the VM process started), cpus
        ([(id, time_ns)]), memory_max_mb, memory_used_mb, disks ([{name,
        read_bytes, read_requests, write_bytes, write_requests, errors}]),
        nics ([])."""
    def vnc_port(self, vmdir, spec):
        """TCP port of the running VM's VNC server, None if it has none."""
        if not spec.consoles.vnc_port or not self.is_running(vmdir):
            return None
        return spec.consoles.vnc_port

    def attach_disk(self, vmdir, disk):
        """Hot-plug ``disk`` (a guest.Disk with a serial) into the VM."""
        raise NotImplementedError()

    def detach_disk(self, vmdir, disk):
        raise NotImplementedError()

    def resize_disk(self, vmdir, disk, size):
        """Tell the running VM that ``disk`` is now ``size`` bytes."""
        raise NotImplementedError()

    def announce_disk_size(self, vmdir, index, size):
        """Tell the running guest that the file of its disk ``index`` (an
        instance disk, not a volume) is now ``size`` bytes: it grew while
        the VM was saved (warm migration). NotImplementedError where the
        backend has no way to notify the guest."""
        raise NotImplementedError()

    # -- live migration ----------------------------------------------------
    #
    # Destination: prepare_incoming() starts the VM waiting for the
    # migration and returns an endpoint (an object with to_json(); it
    # travels to the source in Nova's migrate_data); finish_incoming() runs
    # the guest once the source is done. Source: migrate_to() returns a
    # MigrationHandle. Backends without live migration leave these alone.

    #: prepare_incoming/finish_incoming/migrate_to work on this backend
    supports_live_migration = False
    #: prepare_incoming(block=True) works: the disks can be copied
    supports_block_migration = False

    def check_live_migration(self, vmdir, block, bandwidth_mibps):
        """Pre-check: raise NotImplementedError (with the reason) for what
        this backend cannot do for this migration; ``vmdir``: the source VM
        (None on the destination)."""

    #: the files of an incoming VM's runtime directory that become the
    #: instance's (shared instances path, see adopt_incoming); the sockets
    #: of VMDir.runtime are moved as a directory
    RUNTIME_FILES = ('vm.pid', 'console.log', 'vm.log', 'spec.json')

    def adopt_incoming(self, runtime, vmdir):
        """Shared instances path: the migrated VM runs from ``runtime`` (a
        VMDir inside ``vmdir``); make it the instance's VM. Default: move
        its files and its VMDir.runtime directory (the sockets keep working
        under their new names). Returns True when ``runtime`` can be
        removed."""
        move_runtime_dir(runtime, vmdir)
        for name in self.RUNTIME_FILES:
            if os.path.exists(os.path.join(runtime.path, name)):
                os.replace(os.path.join(runtime.path, name),
                           os.path.join(vmdir.path, name))
        return True

    def prepare_incoming(self, spec, vmdir, address, block, policy=None):
        """Start the VM of ``spec`` waiting for a live migration on
        ``address``; with ``block`` also receive its disks (which exist
        already, as empty overlays over the same images). ``policy``: the
        convergence policy (what the destination must enable too, e.g.
        post-copy). Returns the endpoint."""
        raise NotImplementedError()

    def endpoint_from_json(self, text):
        raise NotImplementedError()

    def finish_incoming(self, vmdir):
        """The source finished: run the migrated guest here."""
        raise NotImplementedError()

    def migrate_to(self, vmdir, spec, endpoint, bandwidth, policy,
                   backed=()):
        """A MigrationHandle sending the VM in ``vmdir`` to ``endpoint``;
        ``bandwidth`` in bytes/s (0: no cap); ``backed``: indices of disks
        the destination holds the backing image of (copy the top only)."""
        raise NotImplementedError()

    def stop_unfinished_incoming(self, vmdir):
        """nova-compute restarted on a live migration's destination: kill
        the incoming VM in ``vmdir`` if the guest has not arrived yet (its
        source still holds all of it and fails the migration when the
        stream breaks). Returns the incoming status it found if it killed
        the VM; None when it left it alone (post-copy or completed: the
        guest's state is here, or it may be about to run here)."""
        raise NotImplementedError()

    def cancel_orphaned_migration(self, vmdir, resume):
        """Stop an outgoing live migration of the VM in ``vmdir`` that no
        MigrationHandle drives any more (nova-compute restarted during it)
        and run the guest here again (``resume``). Returns the migration's
        status as found, or None when there was none; HypervisorError when
        it cannot be taken back (post-copy)."""
        raise NotImplementedError()


def migrated_disks(spec):
    """(index, disk) of the disks a block migration copies: the instance's
    own writable disks (not volumes, not read-only media)."""
    return [(i, d) for i, d in enumerate(spec.disks)
            if not d.serial and not d.readonly and d.device == 'disk']


@dataclasses.dataclass
class MigrationSnapshot:
    """One look at an outgoing migration (what MigrationHandle.poll()
    returns)."""
    status: str                    # QEMU's migration status, or 'mirroring'
    memory_total: int = 0
    memory_processed: int = 0
    memory_remaining: int = 0
    dirty_rate: float = 0.0        # bytes/s
    bandwidth: float = 0.0         # bytes/s
    rounds: int = 0
    disk_total: int = 0
    disk_processed: int = 0
    disk_remaining: int = 0
    error: str = None
    downtime_ms: int = None        # QEMU's measured downtime, once completed
    cpu_throttle: int = None       # vCPU throttle in effect (%), if any



class MigrationHandle(abc.ABC):
    """One outgoing live migration, as the orchestration
    (nova_bhyve.migration.runner) drives it on the source:

    ``start_mirror()`` (parameters; disk copy when it is a block migration),
    ``mirror_ready()`` until True, ``start_memory()``, then ``poll()`` about
    twice a second - a snapshot with ``status`` ('mirroring', then the
    hypervisor's: 'active', 'completed', 'failed', 'cancelled'...), memory
    and disk counters in bytes - and ``apply(step)`` for each convergence
    step the policy decides; ``finish()`` once completed, ``cancel()`` to
    give up (the guest keeps running on the source), ``force_complete()``.
    """

    #: poll() reports counters (memory, disk, passes): the convergence
    #: policy can run; False: status only, no steps
    reports_progress = True
    #: cancel() can stop a running migration
    can_cancel = True

    @abc.abstractmethod
    def start_mirror(self):
        """Apply the initial parameters; start copying the disks."""

    @abc.abstractmethod
    def mirror_ready(self):
        """True when the disks are in sync (always, without a disk copy)."""

    @abc.abstractmethod
    def start_memory(self):
        """Start sending memory and device state."""

    @abc.abstractmethod
    def poll(self):
        """A MigrationSnapshot (status, counters)."""

    @abc.abstractmethod
    def apply(self, step):
        """Carry out a convergence step (migration/policy.py: Step)."""

    @abc.abstractmethod
    def force_complete(self):
        """Make the migration finish now (pause the guest or post-copy)."""

    @abc.abstractmethod
    def finish(self):
        """The migration completed: end the disk copy cleanly."""

    @abc.abstractmethod
    def cancel(self):
        """Abandon the migration; the guest runs on here."""

    def switchover(self):
        """The source reports the switch to post-copy: complete the disk
        copies and have the destination run the guest. Returns None, or
        why the destination did not resume it (it then runs at
        finish_incoming); HypervisorError when a disk copy failed.
        NotImplementedError: the backend has no post-copy."""
        raise NotImplementedError()

    def release_destination(self):
        """After cancel(), shared instances path (Nova calls no rollback on
        the destination): make the destination's VM, if it still waits for
        the migration, give up and exit. Default: nothing."""

    def resume_destination(self):
        """After finish(): have the destination run the guest now, before
        Nova's post step. Returns None, or why it did not (it then runs at
        finish_incoming). NotImplementedError: the backend has no such
        channel (the guest runs at finish_incoming)."""
        raise NotImplementedError()
