"""QEMU under nova-bhyve-launcher: the VM process's sandbox on Linux.

With ``[bhyve] sandbox`` on (the default) every QEMU starts through the
launcher (native/sandbox, docs/sandbox.md), which in a fixed order puts it
in a cgroup of its own (the flavor's memory + overhead, a pids limit,
Nova's ``quota:cpu_*`` extra specs), gives it a uid and gid of its own
(one per VM directory, from ``[bhyve] sandbox_uid_range``), drops every
capability, sets no_new_privs, and applies a Landlock ruleset that lets it
read and execute /usr (the binary, its libraries, firmware and option
ROMs), read its own kernel and initrd, and nothing else: no other file, no
TCP port, no signal or abstract socket outside its domain. Every disk, tap,
monitor socket and log reaches it as a descriptor (resources.py) and so do
run-time operations (over QMP). QEMU then installs its own seccomp filter
(``-sandbox``).

A sandboxed QEMU does not daemonize itself: seccomp's ``spawn=deny``
forbids the fork. The launcher detaches it and reports its pid, which the
driver writes to the VM's pid file; it is up when its monitor, on the
socket the driver bound, answers. QEMU's own messages go to ``vm.log`` in
the VM directory (a descriptor the driver opened), and a QEMU that fails
to start is reported with that log's last lines.
"""
import os
import shutil
import time

from oslo_log import log as logging

from nova_bhyve import conf
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import qmp
from nova_bhyve.sandbox import cgroups
from nova_bhyve.sandbox import features
from nova_bhyve.sandbox import launcher
from nova_bhyve.sandbox import SandboxError
from nova_bhyve.sandbox import spawn
from nova_bhyve.sandbox import uids

CONF = conf.CONF
LOG = logging.getLogger(__name__)

#: QEMU's own seccomp filter: everything it offers denied
SECCOMP = ('-sandbox', 'on,obsolete=deny,elevateprivileges=deny,'
                       'spawn=deny,resourcecontrol=deny')
#: read + execute: the binary, its libraries (merged /usr: /lib and /lib64
#: are links into it), firmware and option ROMs (/usr/share/{qemu,seabios},
#: /usr/lib/ipxe)
EXEC_PATHS = ('/usr',)
NAMESPACES = ('ipc', 'uts', 'mount')
#: options of the plain start that a sandboxed QEMU must not get
PLAIN_ONLY = {'-daemonize': 0, '-pidfile': 1}
#: how long a launched QEMU may take to answer on its monitor
READY_TIMEOUT = 60.0
#: how long one readiness question waits for QEMU's greeting
READY_POLL = 1.0
LOG_TAIL = 2000
RELEASE_TIMEOUT = 5.0
PROC_FD = '/proc/self/fd/'
VNC_BASE = 5900
KVM = '/dev/kvm'
USERFAULTFD_SYSCTL = '/proc/sys/vm/unprivileged_userfaultfd'
DEV_NULL = '/dev/null'


def sandbox_argv(argv, which=shutil.which):
    """A plain QEMU command line made the sandboxed one: the binary by
    its absolute path (the launcher execs no name), no -daemonize (the
    launcher detaches it), no -pidfile (the driver writes it: QEMU may
    create no file), QEMU's seccomp filter added."""
    binary = argv[0]
    if not os.path.isabs(binary):
        binary = which(binary)
        if not binary:
            raise base.HypervisorError('%s not found on PATH' % argv[0])
    argv = [binary] + list(argv[1:])
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        if arg in PLAIN_ONLY:
            skip = PLAIN_ONLY[arg]
            continue
        out.append(arg)
    return out + list(SECCOMP)


def reopened_fds(argv):
    """The inherited descriptors ``argv`` names as /proc/self/fd/N (QEMU
    reopens them: the kernel and initrd of a direct boot)."""
    found = []
    for arg in argv:
        for part in arg.split(','):
            value = part.split('=', 1)[-1]
            if value.startswith(PROC_FD) and value[len(PROC_FD):].isdigit():
                found.append(int(value[len(PROC_FD):]))
    return found


def devices(argv):
    """Device nodes QEMU opens itself, read-write (and ioctl where
    Landlock handles it): /dev/null (QEMU probes for OFD image locks on
    it; without them it would fall back to process-wide POSIX locks) and
    /dev/kvm for KVM. Its uid must be allowed by the node's mode
    (check_devices)."""
    nodes = [DEV_NULL]
    for flag, value in zip(argv, argv[1:]):
        if flag == '-machine' and 'accel=kvm' in value.split(','):
            nodes.append(KVM)
    return nodes


def check_devices(paths):
    """HypervisorError for a device node a VM's own uid cannot open
    (before anything runs: QEMU would fail later with less to say)."""
    for path in paths:
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise base.HypervisorError('%s: %s' % (path, e.strerror))
        if mode & 0o006 != 0o006:
            raise base.HypervisorError(
                '%s is mode %o: a sandboxed QEMU (its own uid, no groups) '
                'cannot open it; make it 0666 as systemd\'s udev rules do '
                '(KVM checks access itself), or use [bhyve] qemu_accel = '
                'tcg' % (path, mode & 0o777))


def userfaultfd_allowed(path=USERFAULTFD_SYSCTL):
    try:
        with open(path) as f:
            return f.read().strip() == '1'
    except OSError:
        return False


def check_post_copy(path=USERFAULTFD_SYSCTL):
    """HypervisorError unless a sandboxed QEMU can receive a post-copy
    migration: QEMU 7.2 gets its userfaultfd from the system call, which
    the kernel grants a process without CAP_SYS_PTRACE only when
    vm.unprivileged_userfaultfd is 1."""
    if not userfaultfd_allowed(path):
        raise base.HypervisorError(
            '[bhyve] live_migration_fallback = post-copy needs '
            'vm.unprivileged_userfaultfd = 1 when VM processes are '
            'sandboxed (their QEMU has no capability to open a '
            'userfaultfd otherwise): set the sysctl, or choose another '
            'fallback')


def vnc_ports(argv):
    """The TCP ports a ``-vnc HOST:DISPLAY,to=LAST`` may bind (QEMU binds
    its VNC server itself: the one socket not handed to it)."""
    for flag, value in zip(argv, argv[1:]):
        if flag == '-vnc':
            addr, _, opts = value.partition(',')
            first = int(addr.rsplit(':', 1)[1])
            last = first
            for opt in opts.split(','):
                if opt.startswith('to='):
                    last = int(opt[3:])
            return list(range(VNC_BASE + first, VNC_BASE + last + 1))
    return []


def _tail(path):
    try:
        with open(path, 'rb') as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL))
            return f.read().decode(errors='replace').strip()
    except OSError:
        return ''


class Sandbox:
    """Starts sandboxed QEMUs and releases what each held.

    ``cgroup_layout``: cgroups.CgroupsV1/V2 (cgroups.detect() by
    default); ``uid_dir``: where uid allocations are kept (the runtime
    path: a reboot, which ends every VM, also ends their allocations)."""

    def __init__(self, uid_dir=None, uid_range=None, cgroup_layout=None,
                 launcher_path=None):
        self.uids = uids.UidAllocator(
            uid_dir or os.path.join(CONF.bhyve.runtime_path, 'uids'),
            uid_range or CONF.bhyve.sandbox_uid_range)
        self.cgroups = cgroup_layout or cgroups.detect()
        self.launcher_path = launcher_path

    @staticmethod
    def missing_features():
        """What this host lacks for the sandbox, by name ([] = nothing)."""
        return features.missing()

    @staticmethod
    def name(vmdir):
        """One name per VM directory for its uid and cgroup: its runtime
        directory's (an incoming migration's VM on the same host has its
        own)."""
        return os.path.basename(vmdir.runtime)

    def limits(self, spec):
        try:
            return cgroups.limits_for(spec.memory_mb, spec.vcpus,
                                      spec.cpu_quota,
                                      CONF.bhyve.sandbox_memory_overhead_mb,
                                      CONF.bhyve.sandbox_pids_max)
        except ValueError as e:
            raise base.HypervisorError('instance %s: %s' % (spec.uuid, e))

    @staticmethod
    def launch_spec(argv, fds, uid, cgroup_dirs):
        """The launcher.Spec running ``argv`` (already sandbox_argv'd)
        with descriptors ``fds``, of which QEMU may reopen (read) those
        the argv names as /proc/self/fd/N, and bind the VNC ports."""
        readable = reopened_fds(argv)
        return launcher.Spec(
            uid=uid, gid=uid, program=argv, cgroups=cgroup_dirs,
            keep_fds=[fd for fd in fds if fd not in readable],
            ro_fds=readable, rw=devices(argv),
            rx=list(EXEC_PATHS) + [p for p in argv[:1] if not any(
                p.startswith(d + '/') for d in EXEC_PATHS)],
            bind_ports=vnc_ports(argv), unshare=NAMESPACES,
            daemonize=True)

    def start(self, argv, spec, vmdir, fds):
        """Launch QEMU ``argv`` for ``spec`` in ``vmdir`` sandboxed; write
        its pid file and return once its monitor answers. On failure
        nothing of it is left (process, cgroup, uid) and HypervisorError
        says which step failed and why."""
        name = self.name(vmdir)
        pid = None
        try:
            uid = self.uids.allocate(name)
            dirs = self.cgroups.create(name, self.limits(spec))
            lspec = self.launch_spec(sandbox_argv(argv), fds, uid, dirs)
            check_devices(lspec.rw)
            LOG.debug('starting %s sandboxed (uid %d, cgroup %s): %s',
                      spec.uuid, uid, name, ' '.join(lspec.program))
            logfd = os.open(vmdir.vm_log,
                            os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                pid = spawn.start(lspec, self.launcher_path,
                                  stdout=logfd, stderr=logfd).pid
            finally:
                os.close(logfd)
            _write_pid(vmdir.pidfile, pid)
            self._wait_ready(vmdir, pid, spec.uuid)
        except (SandboxError, OSError, ValueError,
                base.HypervisorError) as e:
            if pid is not None:
                base.kill_and_wait(pid, spec.uuid)
                try:
                    os.unlink(vmdir.pidfile)
                except FileNotFoundError:
                    pass
            self.release(vmdir)
            if isinstance(e, base.HypervisorError):
                raise
            raise base.HypervisorError(
                'cannot start instance %s in its sandbox: %s'
                % (spec.uuid, e))
        return pid

    @staticmethod
    def _wait_ready(vmdir, pid, uuid):
        # the socket is bound already (and still held by the driver while
        # QEMU starts): a connection waits in its backlog until QEMU's
        # monitor greets it, whether QEMU lives or not - so ask in short
        # rounds and look at the process in between
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            try:
                qmp.execute(vmdir.control, 'query-status',
                            timeout=min(max(left, 0.1), READY_POLL))
                return
            except base.HypervisorError as e:
                if not base.process_alive(pid, uuid):
                    raise base.HypervisorError(
                        'QEMU for instance %s exited while starting: %s' % (
                            uuid, _tail(vmdir.vm_log) or 'no message'))
                if time.monotonic() >= deadline:
                    raise base.HypervisorError(
                        'QEMU for instance %s did not answer on its '
                        'monitor within %.0f s: %s' % (uuid, READY_TIMEOUT,
                                                       e))
                time.sleep(0.05)

    def adopt(self, src, dst):
        """The VM of VMDir ``src`` (an incoming migration's) becomes the VM
        of ``dst``: its cgroup and uid follow it."""
        old, new = self.name(src), self.name(dst)
        self.cgroups.rename(old, new)
        self.uids.transfer(old, new)

    def release(self, vmdir):
        """Give back the cgroup and uid of the VM of ``vmdir`` (its process
        is gone); idempotent."""
        name = self.name(vmdir)
        # a killed process leaves its cgroup a moment after kill(2) saw it
        # gone (its exit is still being accounted)
        deadline = time.monotonic() + RELEASE_TIMEOUT
        while True:
            try:
                self.cgroups.remove(name)
                break
            except (SandboxError, OSError) as e:
                if time.monotonic() >= deadline:
                    LOG.warning('cgroup %s of %s not removed: %s', name,
                                vmdir.uuid, e)
                    break
                time.sleep(0.02)
        self.uids.release(name)


def _write_pid(path, pid):
    tmp = path + '.new'
    with open(tmp, 'w') as f:
        f.write('%d\n' % pid)
    os.replace(tmp, path)
