"""bhyve save/restore (suspend/resume) - only with a BHYVE_SNAPSHOT build.

NEVER EXERCISED ON A REAL FREEBSD HOST; pinned by unit tests with
processutils.execute mocked for bhyvectl and the supervisor's spawn for
bhyve. Checked against bhyvectl(8) and bhyve(8) of FreeBSD 13/14 built with
``WITH_BHYVE_SNAPSHOT``:

* ``bhyvectl --vm=NAME --suspend=FILE`` asks the running bhyve (over its
  control socket in /var/run/bhyve/) to write the guest memory to FILE,
  the vCPU/device state to FILE.kern and the VM metadata to FILE.meta, and
  to exit; it exits with status 0, which the supervisor would take for a
  reboot, so the supervisor is told first (SIGUSR1) that the next exit is
  final;
* ``bhyve -k CONFIG -r FILE`` restores (``-r FILE`` on that first start
  only: the supervisor restarts a guest that reboots later without it):
  same device configuration, memory
  and vCPU count from the snapshot.

Support is detected from bhyvectl's usage text: only BHYVE_SNAPSHOT builds
list ``--suspend=<filename>``. Without it save/restore raise
NotImplementedError.

As for QEMU, FILE is written under a temporary name and renamed (the .kern
and .meta companions first, FILE last): FILE's presence is the commit point.
"""
import os
import signal
import subprocess
import time

from oslo_concurrency import processutils

from nova_bhyve.hypervisor import base

SUFFIXES = ('.kern', '.meta')
SAVE_TIMEOUT = 600.0
POLL = 0.1
USAGE_TIMEOUT = 30


def usage_text(bhyvectl, timeout=USAGE_TIMEOUT):
    """``bhyvectl --help``'s output (bhyvectl prints its usage on stderr
    and exits 1); '' when it cannot run or has not finished within
    ``timeout`` seconds (it is killed then: processutils.execute does not)."""
    started = []
    try:
        out, err = processutils.execute(bhyvectl, '--help',
                                        check_exit_code=False,
                                        timeout=timeout,
                                        on_execute=started.append)
    except OSError:
        return ''
    except subprocess.TimeoutExpired:
        for proc in started:
            proc.kill()
            proc.wait()
        return ''
    return (out or '') + (err or '')


def snapshot_supported(bhyvectl):
    """True if this bhyvectl was built with BHYVE_SNAPSHOT."""
    return '--suspend=' in usage_text(bhyvectl)


def files(path):
    return [path] + [path + s for s in SUFFIXES]


def partial_path(path):
    return path + '.partial'


def check_state_files(path):
    missing = [p for p in files(path) if not os.path.isfile(p)]
    if missing:
        raise base.HypervisorError('saved state incomplete: %s missing'
                                   % ', '.join(missing))


def signal_process(pid, signum):
    if pid:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def save(hyp, vmdir, timeout=SAVE_TIMEOUT):
    path = vmdir.saved_state
    partial = partial_path(path)
    name = hyp.vm_name(vmdir)
    vm = hyp.pid(vmdir)
    if vm is None:
        raise base.HypervisorError('instance %s has no bhyve process to save'
                                   % vmdir.uuid)
    sup = hyp.supervisor_pid(vmdir)
    signal_process(sup, signal.SIGUSR1)   # bhyve's exit 0 is not a reboot
    try:
        hyp.bhyvectl_call(name, '--suspend=%s' % partial)
        if not base.wait_for_exit(vm, timeout, vmdir.uuid, poll=POLL):
            raise base.HypervisorError(
                'bhyve did not exit within %.0f s after --suspend' % timeout)
        check_state_files(partial)
    except Exception:
        for p in files(partial):
            if os.path.exists(p):
                os.unlink(p)
        if hyp.pid(vmdir) is not None:
            signal_process(sup, signal.SIGUSR2)   # still running: reboots
        raise
    for suffix in SUFFIXES:
        os.rename(partial + suffix, path + suffix)
    os.rename(partial, path)
    if sup:
        base.wait_for_exit(sup, 30, vmdir.uuid, poll=POLL)
    hyp.destroy_vmm(name)


def restore_args(path):
    """What bhyve's first start after a save gets appended to its argv."""
    return ['-r', path]


def wait_started(hyp, vmdir, name, settle=2.0, timeout=60.0):
    """bhyve reads the state files at start-up: they may go once its vmm
    instance exists and the process has lived ``settle`` seconds."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        if hyp.pid(vmdir) is None:
            return False
        if hyp.vmm_exists(name):
            seen = seen or time.monotonic()
            if time.monotonic() - seen >= settle:
                return True
        time.sleep(POLL)
    return False
