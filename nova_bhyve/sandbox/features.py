"""What the host has for the sandbox, and what it lacks.

missing() names each absent feature, for the driver to refuse to start with
a message naming it (or to run unsandboxed only when [bhyve] sandbox is
off). The roots are parameters so a test can point them at a fake /proc or
/sys/fs/cgroup.
"""
import ctypes
import errno
import os
import sys

from nova_bhyve.sandbox import cgroups

# landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
_NR_LANDLOCK_CREATE_RULESET = 444
_LANDLOCK_CREATE_RULESET_VERSION = 1
# what the launcher's rules need at least; newer ABIs add TCP rules (4) and
# signal / abstract socket scoping (6), used when there
MIN_LANDLOCK_ABI = 1


def landlock_abi():
    """The kernel's Landlock ABI version, 0 when it has none (not built
    in, or not enabled at boot: the lsm= kernel parameter)."""
    if not sys.platform.startswith('linux'):
        return 0
    # the C library already loaded into this process (find_library would
    # run ldconfig and uname)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(ctypes.c_long(_NR_LANDLOCK_CREATE_RULESET),
                       ctypes.c_void_p(None), ctypes.c_size_t(0),
                       ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    if abi < 0:
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, 'landlock_create_ruleset: %s'
                          % os.strerror(err))
        return 0
    return abi


def seccomp_available(proc_root='/proc'):
    """The kernel has seccomp (a Seccomp: field in /proc/self/status):
    QEMU's -sandbox on needs it."""
    try:
        with open(os.path.join(proc_root, 'self', 'status')) as f:
            return any(line.startswith('Seccomp:') for line in f)
    except OSError:
        return False


def missing(proc_root='/proc', cgroup_root=cgroups.DEFAULT_ROOT,
            abi=None):
    """Names of the sandbox features this host lacks ([] = all there).
    ``abi``: the Landlock ABI, default: asked from the kernel."""
    lacking = []
    abi = landlock_abi() if abi is None else abi
    if abi < MIN_LANDLOCK_ABI:
        lacking.append('landlock (the kernel reports no Landlock ABI; '
                       'needs CONFIG_SECURITY_LANDLOCK and landlock in '
                       'lsm=)')
    if not seccomp_available(proc_root):
        lacking.append('seccomp (no Seccomp field in %s/self/status)'
                       % proc_root)
    v2, v1 = cgroups.missing_v2(cgroup_root), cgroups.missing_v1(cgroup_root)
    if v2 and v1:
        nowhere = [c for c in cgroups.CONTROLLERS if c in v2 and c in v1]
        for name in nowhere:
            lacking.append('cgroup controller %s (in neither the unified '
                           'hierarchy nor a v1 hierarchy under %s)'
                           % (name, cgroup_root))
        if not nowhere:
            lacking.append('cgroup controllers %s in one layout (v2 lacks '
                           '%s, v1 lacks %s)' % (
                               ', '.join(cgroups.CONTROLLERS),
                               ', '.join(v2), ', '.join(v1)))
    return lacking
