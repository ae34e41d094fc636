"""nova-bhyve-launcher: where the installed binary is, and its command line.

Pure: nothing here starts a process (spawn.py does). The exit statuses and
step names mirror native/sandbox/launcher.h (a unit test compares them).
"""
import dataclasses
import os
from typing import Optional
from typing import Sequence

from nova_bhyve.sandbox import SandboxError

BINARY_NAME = 'nova-bhyve-launcher'
# the build step of setup.py compiles it here, inside the installed package
BINARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bin',
                      BINARY_NAME)

# step -> exit status (launcher.h), in the order the launcher runs them
STEPS = (
    ('usage', 2),
    ('cgroup', 10),
    ('unshare', 11),
    ('daemonize', 12),
    ('capabilities', 13),
    ('credentials', 14),
    ('no_new_privs', 15),
    ('landlock', 16),
    ('close_fds', 17),
    ('exec', 18),
)
STEP_OF_STATUS = {status: step for step, status in STEPS}
NAMESPACES = ('ipc', 'uts', 'mount')


class LauncherNotFound(SandboxError):
    pass


def binary(path=None):
    """The launcher to run: ``path`` if given (tests, a build tree), else
    the one installed with the package."""
    path = path or BINARY
    if not os.access(path, os.X_OK):
        raise LauncherNotFound(
            '%s not found or not executable at %s: nova-bhyve must be '
            'installed with `pip install .` (which compiles it), or built '
            'with `make -C native launcher`' % (BINARY_NAME, path))
    return path


@dataclasses.dataclass
class Spec:
    """What one sandboxed program gets. Paths are the Landlock allow rules:
    ``ro`` read files and directories beneath, ``rx`` read + execute,
    ``rw`` read + write existing files (no creation, no removal)."""
    uid: int
    gid: int
    program: Sequence[str]          # absolute path, then its arguments
    cgroups: Sequence[str] = ()
    keep_fds: Sequence[int] = ()
    ro: Sequence[str] = ()
    #: descriptors the program may read the files of (kept open for it;
    #: read through /proc/self/fd/N: its uid need not reach their paths)
    ro_fds: Sequence[int] = ()
    rx: Sequence[str] = ()
    rw: Sequence[str] = ()
    bind_ports: Sequence[int] = ()
    connect_ports: Sequence[int] = ()
    unshare: Sequence[str] = ()
    status_fd: Optional[int] = None
    daemonize: bool = False
    pid_fd: Optional[int] = None


def _check(spec):
    if not spec.program or not os.path.isabs(spec.program[0]):
        raise ValueError('the program must be an absolute path: %r'
                         % (spec.program[:1],))
    for name in ('uid', 'gid'):
        value = getattr(spec, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError('%s must be a positive integer (never 0), '
                             'not %r' % (name, value))
    unknown = set(spec.unshare) - set(NAMESPACES)
    if unknown:
        raise ValueError('unknown namespaces %s (known: %s)'
                         % (sorted(unknown), ', '.join(NAMESPACES)))
    if spec.daemonize != (spec.pid_fd is not None):
        raise ValueError('daemonize and pid_fd go together')
    for port in list(spec.bind_ports) + list(spec.connect_ports):
        if not 0 <= port <= 65535:
            raise ValueError('not a TCP port: %r' % port)


def argv(spec, launcher=None):
    """The launcher's argv for ``spec`` (``launcher``: the binary's path,
    default the installed one, not checked here)."""
    _check(spec)
    args = [launcher or BINARY, '--uid', str(spec.uid),
            '--gid', str(spec.gid)]
    for opt, values in (('--cgroup', spec.cgroups),
                        ('--keep-fd', spec.keep_fds),
                        ('--ro', spec.ro), ('--ro-fd', spec.ro_fds),
                        ('--rx', spec.rx),
                        ('--rw', spec.rw),
                        ('--bind-port', spec.bind_ports),
                        ('--connect-port', spec.connect_ports)):
        for value in values:
            args += [opt, str(value)]
    if spec.unshare:
        args += ['--unshare', ','.join(spec.unshare)]
    if spec.status_fd is not None:
        args += ['--status-fd', str(spec.status_fd)]
    if spec.daemonize:
        args += ['--daemonize', '--pid-fd', str(spec.pid_fd)]
    return args + ['--'] + [str(a) for a in spec.program]


@dataclasses.dataclass
class Status:
    """What the launcher said on its status descriptor."""
    execd: bool                     # it reached execve and it worked
    step: Optional[str] = None      # the failing step, if one failed
    reason: Optional[str] = None


def parse_status(text):
    """Read the status protocol: "error <step>: <reason>" lines (the last
    one counts), "exec" before execve. Text that ends after "exec" with no
    error: the exec happened (the descriptor is close-on-exec)."""
    execd = False
    step = reason = None
    for line in text.splitlines():
        if line == 'exec':
            execd = True
        elif line.startswith('error '):
            head, _, reason = line[len('error '):].partition(': ')
            step = head
            execd = False
    return Status(execd=execd and step is None, step=step, reason=reason)
