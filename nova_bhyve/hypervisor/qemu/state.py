"""QEMU save/restore: suspend a VM to a file in its directory, resume it.

QEMU opens no path for either: the driver opens the state file and hands
QEMU the descriptor over QMP (``getfd``), the migration URI is
``fd:NAME`` (no ``exec:``: QEMU spawns nothing, its sandbox denies it).

save: QMP ``stop`` (the vCPUs halt, the state no longer changes), the
driver creates ``FILE.partial`` (mode 0600), migration to it with the
bandwidth cap lifted, wait for the migration to complete, fsync, rename to
FILE, ``quit``. The rename is the commit point: ``vmdir.saved_state``
exists only when it holds a complete state, and a VM directory with that
file and no VM process is SUSPENDED.

restore: the VM's usual command line plus ``-S -incoming defer``; once
QEMU is up, the driver opens FILE and passes it with ``migrate-incoming
fd:NAME``; QEMU loads the state, we wait for the incoming migration to
complete, then ``cont``. The file is removed once the guest runs again.
"""
import os
import subprocess
import time

from oslo_log import log as logging

from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import fdpass
from nova_bhyve.hypervisor.qemu import qmp

LOG = logging.getLogger(__name__)

#: first bytes of a QEMU migration stream (QEMU_VM_FILE_MAGIC, version 3)
MAGIC = b'QEVM\x00\x00\x00\x03'
#: migration bandwidth for a save: as fast as the disk takes it (QEMU's
#: default cap is 32 MiB/s, meant for live migration over a network)
SAVE_BANDWIDTH = 64 * 1024 ** 3
SAVE_TIMEOUT = 600.0
RESTORE_TIMEOUT = 600.0
POLL = 0.05
#: the names the state file's descriptor has in QEMU (getfd)
SAVE_FD = 'nb-save'
RESTORE_FD = 'nb-restore'
#: a state holds guest memory
STATE_MODE = 0o600


def partial_path(path):
    return path + '.partial'


def fd_uri(name):
    """The migration URI of the descriptor QEMU holds as ``name``."""
    return 'fd:%s' % name


def incoming_argv(argv):
    """``argv`` (a complete QEMU command line) waiting for its state
    (``migrate-incoming``, see restore): stay paused after loading (-S) so
    the caller decides when to run."""
    return list(argv) + ['-S', '-incoming', 'defer']


def check_state_file(path):
    """Refuse a missing, empty or foreign state file before starting QEMU
    on it (a truncated one is caught by QEMU while loading)."""
    try:
        with open(path, 'rb') as f:
            head = f.read(len(MAGIC))
    except FileNotFoundError:
        raise base.HypervisorError('saved state %s does not exist' % path)
    except OSError as e:
        raise base.HypervisorError('cannot read saved state %s: %s'
                                   % (path, e))
    if head != MAGIC:
        raise base.HypervisorError(
            'saved state %s is not a QEMU state file (bad header %r)'
            % (path, head))


def _alive(hyp, vmdir):
    return hyp.pid(vmdir) is not None


def wait_migration(vmdir, alive, timeout, what):
    """Poll query-migrate until it completes; HypervisorError if it fails,
    the process dies or ``timeout`` passes. Returns the final reply."""
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            raise base.HypervisorError('QEMU exited during %s' % what)
        try:
            info = qmp.execute(vmdir.control, 'query-migrate')
        except base.HypervisorError:
            if not alive():
                raise base.HypervisorError('QEMU exited during %s' % what)
            raise
        status = info.get('status')
        if status == 'completed':
            return info
        if status in ('failed', 'cancelled'):
            raise base.HypervisorError('%s failed: %s' % (
                what, info.get('error-desc', status)))
        if time.monotonic() > deadline:
            raise base.HypervisorError('%s did not complete within %.0f s '
                                       '(status %s)' % (what, timeout, status))
        time.sleep(POLL)


def _fsync(fd, path):
    os.fsync(fd)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save(hyp, vmdir, timeout=None, bandwidth=None):
    """Suspend the VM in ``vmdir`` to ``vmdir.saved_state``.

    On failure the partial file is removed; a VM that still runs is let
    run again (``cont``) and the error is raised."""
    timeout = timeout or SAVE_TIMEOUT
    bandwidth = bandwidth or SAVE_BANDWIDTH
    path = vmdir.saved_state
    partial = partial_path(path)
    pid = hyp.pid(vmdir)
    if pid is None:
        raise base.HypervisorError('instance %s has no VM process to save'
                                   % vmdir.uuid)
    was_running = qmp.execute(vmdir.control,
                              'query-status')['status'] == 'running'
    t0 = time.monotonic()
    fd = None
    try:
        with qmp.Session(vmdir.control) as s:
            s.execute('stop')
            s.execute('migrate-set-parameters',
                      {'max-bandwidth': int(bandwidth)})
            fd = fdpass.open_file(partial, create_mode=STATE_MODE)
            fdpass.give(s, SAVE_FD, fd)
            try:
                s.execute('migrate', {'uri': fd_uri(SAVE_FD)})
            except base.HypervisorError:
                fdpass.take_back(s, SAVE_FD)
                raise
        info = wait_migration(vmdir, lambda: hyp.pid(vmdir) is not None,
                              timeout, 'saving the state of %s' % vmdir.uuid)
        _fsync(fd, partial)
        os.rename(partial, path)
    except Exception:
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(partial)
        except FileNotFoundError:
            pass
        if hyp.pid(vmdir) is not None:
            # a migration still running (timed out) writes no more
            try:
                qmp.execute(vmdir.control, 'migrate_cancel')
            except base.HypervisorError as e:
                LOG.debug('migrate_cancel: %s', e)
        if was_running and hyp.pid(vmdir) is not None:
            try:
                qmp.execute(vmdir.control, 'cont')
            except base.HypervisorError as e:
                LOG.warning('instance %s: cannot resume vCPUs after a failed '
                            'save: %s', vmdir.uuid, e)
        raise
    os.close(fd)
    LOG.info('instance %s: state saved to %s (%d bytes, %.2f s, '
             'migration total %s ms)', vmdir.uuid, path,
             os.path.getsize(path), time.monotonic() - t0,
             info.get('total-time'))
    # The state is committed: end the process (quit, SIGKILL as fallback).
    try:
        qmp.execute(vmdir.control, 'quit')
    except base.HypervisorError:
        pass
    if not base.wait_for_exit(pid, 30, vmdir.uuid):
        LOG.warning('instance %s: QEMU did not quit after save, killing it',
                    vmdir.uuid)
    hyp.kill(vmdir)


def launch(hyp, argv, vmdir, uuid, fds=(), spec=None):
    """Run QEMU ``argv`` for VMDir ``vmdir`` inheriting exactly the
    descriptors ``fds`` (besides its standard ones, all others are closed
    in the child); HypervisorError with QEMU's messages when it does not
    come up. Sandboxed (``hyp.sandbox``, needs the VMSpec ``spec``): under
    the launcher (qemu/sandboxed.py); else QEMU daemonizes itself.
    QemuHypervisor.start, restore and the incoming side of a live
    migration all start QEMU through here."""
    if os.path.exists(vmdir.pidfile):
        os.unlink(vmdir.pidfile)
    if hyp.sandbox is not None:
        if spec is None:
            raise base.HypervisorError('a sandboxed start of %s needs its '
                                       'spec' % uuid)
        hyp.sandbox.start(argv, spec, vmdir, fds)
        return
    LOG.debug('starting %s: %s', uuid, ' '.join(argv))
    # subprocess rather than processutils.execute (the one-shot commands'
    # seam): QEMU forks its long-lived daemon off this command, as the VM
    # starts elsewhere (accel's calibration guest, the bhyve supervisor).
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, check=False,
                          cwd=vmdir.path, close_fds=True,
                          pass_fds=tuple(fds))
    if proc.returncode != 0:
        raise base.HypervisorError(
            'QEMU failed to start instance %s (exit %d): %s' % (
                uuid, proc.returncode, proc.stderr.strip()))
    if hyp.pid(vmdir) is None:
        raise base.HypervisorError(
            'QEMU for instance %s exited right after starting' % uuid)


def _load(vmdir, path):
    """Hand the state file to the waiting QEMU: migrate-incoming from its
    descriptor."""
    try:
        fd = fdpass.open_file(path, readonly=True)
    except OSError as e:
        raise base.HypervisorError('cannot open saved state %s: %s'
                                   % (path, e))
    try:
        with qmp.Session(vmdir.control) as s:
            fdpass.give(s, RESTORE_FD, fd)
            try:
                s.execute('migrate-incoming', {'uri': fd_uri(RESTORE_FD)})
            except base.HypervisorError:
                fdpass.take_back(s, RESTORE_FD)
                raise
    finally:
        os.close(fd)


def restore(hyp, argv, vmdir, uuid, timeout=RESTORE_TIMEOUT, fds=(),
            spec=None):
    """Start QEMU with ``argv`` (its normal command line) from the saved
    state, run the guest, remove the state file.

    On failure QEMU is killed, the state file is kept (a later hard reboot
    discards it) and HypervisorError says why."""
    path = vmdir.saved_state
    check_state_file(path)
    t0 = time.monotonic()
    try:
        launch(hyp, incoming_argv(argv), vmdir, uuid, fds, spec)
        _load(vmdir, path)
        wait_migration(vmdir, lambda: hyp.pid(vmdir) is not None, timeout,
                       'loading the saved state of %s' % uuid)
        qmp.execute(vmdir.control, 'cont')
    except base.HypervisorError as e:
        hyp.kill(vmdir)
        raise base.HypervisorError(
            'cannot resume instance %s from %s (corrupt or incompatible '
            'saved state?): %s' % (uuid, path, e))
    os.unlink(path)
    LOG.info('instance %s: restored from saved state in %.2f s', uuid,
             time.monotonic() - t0)
