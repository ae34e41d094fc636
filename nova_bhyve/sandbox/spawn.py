"""Start a program under nova-bhyve-launcher and learn whether the sandbox
came up: the launcher reports on a status pipe ("error <step>: <reason>",
or "exec" and then end of file at the exec, the pipe being close-on-exec).
"""
import dataclasses
import os
import select
import subprocess
import time
from typing import Optional

from nova_bhyve.sandbox import launcher
from nova_bhyve.sandbox import SandboxError

# a sandbox that is not up after this long is not coming up
DEFAULT_TIMEOUT = 30.0
# what the sandboxed program sees of nova-compute's environment: nothing
# but a PATH (nova-compute's may carry credentials)
MINIMAL_ENV = {'PATH': '/usr/sbin:/usr/bin:/sbin:/bin', 'LC_ALL': 'C'}


class LaunchFailed(SandboxError):
    def __init__(self, step, reason, returncode):
        self.step = step
        self.reason = reason
        self.returncode = returncode
        super().__init__('sandbox step %s failed: %s (launcher exit status '
                         '%s)' % (step, reason, returncode))


@dataclasses.dataclass
class Launched:
    pid: int                                # the sandboxed program's pid
    proc: Optional[subprocess.Popen] = None   # None when daemonized


def _read_until_eof(fd, deadline):
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        data = os.read(fd, 4096)
        if not data:
            return b''.join(chunks).decode('utf-8', 'replace')
        chunks.append(data)


def _failure(status, returncode):
    step = status.step or launcher.STEP_OF_STATUS.get(returncode, 'unknown')
    reason = status.reason or (
        'the launcher ended without saying why (exit status %s)'
        % returncode)
    return LaunchFailed(step, reason, returncode)


def start(spec, launcher_path=None, env=None, timeout=DEFAULT_TIMEOUT,
          stdin=subprocess.DEVNULL, stdout=None, stderr=None):
    """Run ``spec`` (a launcher.Spec; its status_fd and pid_fd are filled
    in here) and return a Launched once the program is exec'd, or raise
    LaunchFailed naming the step. ``spec.keep_fds`` must be open here."""
    path = launcher.binary(launcher_path)
    status_r, status_w = os.pipe()
    pid_r = pid_w = None
    try:
        spec = dataclasses.replace(spec, status_fd=status_w)
        pass_fds = list(spec.keep_fds) + list(spec.ro_fds) + [status_w]
        if spec.daemonize:
            pid_r, pid_w = os.pipe()
            spec = dataclasses.replace(spec, pid_fd=pid_w)
            pass_fds.append(pid_w)
        proc = subprocess.Popen(
            launcher.argv(spec, path), pass_fds=pass_fds,
            env=MINIMAL_ENV if env is None else env,
            stdin=stdin, stdout=stdout, stderr=stderr)
        os.close(status_w)
        status_w = None
        if pid_w is not None:
            os.close(pid_w)
            pid_w = None
        deadline = time.monotonic() + timeout
        try:
            text = _read_until_eof(status_r, deadline)
        except TimeoutError:
            proc.kill()
            proc.wait()
            raise LaunchFailed('timeout', 'no exec within %ss' % timeout,
                               proc.returncode)
        status = launcher.parse_status(text)
        if not spec.daemonize:
            if not status.execd:
                raise _failure(status, proc.wait())
            return Launched(pid=proc.pid, proc=proc)
        # daemonized: the launcher's first process exits once the program
        # is exec'd (0) or a step failed (that step's status)
        returncode = proc.wait(max(deadline - time.monotonic(), 1))
        if returncode != 0 or not status.execd:
            raise _failure(status, returncode)
        pid_text = _read_until_eof(pid_r, deadline).strip()
        if not pid_text.isdigit():
            raise LaunchFailed('daemonize', 'no pid reported: %r'
                               % pid_text, returncode)
        return Launched(pid=int(pid_text))
    finally:
        for fd in (status_r, status_w, pid_r, pid_w):
            if fd is not None:
                os.close(fd)
