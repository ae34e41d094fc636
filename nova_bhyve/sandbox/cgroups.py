"""The per-VM cgroup: memory, pids and cpu limits of one VM process tree.

One cgroup per VM under a nova-bhyve parent, on cgroup v2 when the unified
hierarchy has the cpu, memory and pids controllers, else on the v1
hierarchies of those controllers; chosen once (detect) and logged. The
launcher joins the VM's process to it before anything else
(launcher --cgroup DIR, one DIR per hierarchy).

Nova's flavor extra specs map as libvirt maps its <cputune>:
* quota:cpu_shares -> v1 cpu.shares, v2 cpu.weight (the value as is;
  libvirt writes shares into cpu.weight, range 1-10000);
* quota:cpu_period, quota:cpu_quota (microseconds; quota < 0: unlimited) ->
  v1 cpu.cfs_period_us / cpu.cfs_quota_us, v2 cpu.max. libvirt applies the
  quota to each vCPU thread's own cgroup; the VM has one cgroup here, so it
  gets quota x vCPUs (the same total).
Memory: flavor RAM + [bhyve] sandbox_memory_overhead_mb (QEMU's own use).
"""
import dataclasses
import errno
import os
import re
from typing import Optional

from oslo_log import log as logging

from nova_bhyve.sandbox import SandboxError

LOG = logging.getLogger(__name__)

CONTROLLERS = ('cpu', 'memory', 'pids')
DEFAULT_ROOT = '/sys/fs/cgroup'
DEFAULT_PARENT = 'nova-bhyve'
DEFAULT_CPU_PERIOD = 100000             # us, the kernel's default
_NAME = re.compile(r'^[A-Za-z0-9._-]{1,128}$')
MiB = 1024 * 1024


class CgroupError(SandboxError):
    pass


@dataclasses.dataclass
class Limits:
    memory_bytes: int
    pids_max: int
    cpu_shares: Optional[int] = None
    cpu_period: Optional[int] = None    # us
    cpu_quota: Optional[int] = None     # us per period for the whole VM;
                                        # None or < 0: unlimited


def _int_spec(extra_specs, key):
    value = extra_specs.get(key)
    if value is None or value == '':
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError('flavor extra spec %s=%r is not an integer'
                         % (key, value))


def limits_for(memory_mb, vcpus, extra_specs, overhead_mb, pids_max):
    """Limits of a VM of ``memory_mb`` and ``vcpus`` with the flavor's
    ``extra_specs`` (pure)."""
    shares = _int_spec(extra_specs, 'quota:cpu_shares')
    period = _int_spec(extra_specs, 'quota:cpu_period')
    quota = _int_spec(extra_specs, 'quota:cpu_quota')
    if shares is not None and shares < 1:
        raise ValueError('quota:cpu_shares must be positive, not %d'
                         % shares)
    if period is not None and not 1000 <= period <= 1000000:
        raise ValueError('quota:cpu_period must be 1000-1000000 us, not %d'
                         % period)
    if quota is not None and 0 <= quota < 1000:
        raise ValueError('quota:cpu_quota must be >= 1000 us or negative '
                         '(unlimited), not %d' % quota)
    total_quota = None
    if quota is not None and quota >= 0:
        total_quota = quota * max(vcpus, 1)
        period = period or DEFAULT_CPU_PERIOD
    return Limits(memory_bytes=(memory_mb + overhead_mb) * MiB,
                  pids_max=pids_max, cpu_shares=shares, cpu_period=period,
                  cpu_quota=total_quota)


def _write(path, value):
    try:
        with open(path, 'w') as f:
            f.write('%s\n' % value)
    except OSError as e:
        raise CgroupError('cannot write %r to %s: %s'
                          % (value, path, e.strerror))


def _read_words(path):
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return []


def _check_name(name):
    if not _NAME.match(name or '') or not name.strip('.'):
        raise ValueError('not a cgroup name: %r' % (name,))


def v2_mount(root=DEFAULT_ROOT):
    """The unified hierarchy: ``root`` itself (a pure v2 host) or the
    hybrid layout's ``root``/unified; None when there is none."""
    for path in (root, os.path.join(root, 'unified')):
        if os.path.exists(os.path.join(path, 'cgroup.controllers')):
            return path
    return None


def missing_v2(root=DEFAULT_ROOT):
    mount = v2_mount(root)
    if mount is None:
        return list(CONTROLLERS)
    have = _read_words(os.path.join(mount, 'cgroup.controllers'))
    return [c for c in CONTROLLERS if c not in have]


def missing_v1(root=DEFAULT_ROOT):
    return [c for c in CONTROLLERS
            if not os.path.exists(os.path.join(root, c, 'cgroup.procs'))]


class _Cgroups(object):
    version = None

    def __init__(self, parent):
        _check_name(parent)
        self.parent = parent

    def dirs(self, name):
        """The VM's cgroup directories, one per hierarchy: the launcher's
        --cgroup arguments."""
        raise NotImplementedError

    def create(self, name, limits):
        raise NotImplementedError

    def procs(self, name):
        """Pids in the VM's cgroup (any hierarchy)."""
        pids = set()
        for d in self.dirs(name):
            pids.update(int(p) for p in
                        _read_words(os.path.join(d, 'cgroup.procs')))
        return sorted(pids)

    def exists(self, name):
        return any(os.path.isdir(d) for d in self.dirs(name))

    def rename(self, old, new):
        """The cgroup ``old`` becomes ``new``, with its processes (a VM
        that changes name: an incoming live migration adopted)."""
        for src, dst in zip(self.dirs(old), self.dirs(new)):
            try:
                os.rename(src, dst)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise CgroupError('cannot rename %s to %s: %s'
                                  % (src, dst, e.strerror))

    def remove(self, name):
        """Remove the VM's cgroup once its processes are gone; CgroupError
        if some are still in it (they are not killed here)."""
        for d in self.dirs(name):
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno == errno.EBUSY:
                    raise CgroupError('%s still holds processes %s'
                                      % (d, self.procs(name)))
                raise CgroupError('cannot remove %s: %s'
                                  % (d, e.strerror))


class CgroupsV2(_Cgroups):
    version = 2

    def __init__(self, mount, parent=DEFAULT_PARENT):
        super().__init__(parent)
        self.mount = mount

    def _enable(self, path):
        have = _read_words(os.path.join(path, 'cgroup.subtree_control'))
        wanted = [c for c in CONTROLLERS if c not in have]
        if wanted:
            _write(os.path.join(path, 'cgroup.subtree_control'),
                   ' '.join('+' + c for c in wanted))

    def dirs(self, name):
        _check_name(name)
        return [os.path.join(self.mount, self.parent, name)]

    def create(self, name, limits):
        parent = os.path.join(self.mount, self.parent)
        self._enable(self.mount)
        os.makedirs(parent, exist_ok=True)
        self._enable(parent)
        path, = self.dirs(name)
        os.makedirs(path, exist_ok=True)
        _write(os.path.join(path, 'memory.max'), limits.memory_bytes)
        _write(os.path.join(path, 'pids.max'), limits.pids_max)
        if limits.cpu_shares is not None:
            if not 1 <= limits.cpu_shares <= 10000:
                raise CgroupError('quota:cpu_shares %d is out of cgroup '
                                  'v2\'s cpu.weight range 1-10000'
                                  % limits.cpu_shares)
            _write(os.path.join(path, 'cpu.weight'), limits.cpu_shares)
        if limits.cpu_period is not None or limits.cpu_quota is not None:
            quota = limits.cpu_quota
            _write(os.path.join(path, 'cpu.max'), '%s %d' % (
                'max' if quota is None or quota < 0 else quota,
                limits.cpu_period or DEFAULT_CPU_PERIOD))
        return self.dirs(name)


class CgroupsV1(_Cgroups):
    version = 1

    def __init__(self, root=DEFAULT_ROOT, parent=DEFAULT_PARENT):
        super().__init__(parent)
        self.root = root

    def _dir(self, controller, name):
        return os.path.join(self.root, controller, self.parent, name)

    def dirs(self, name):
        _check_name(name)
        return [self._dir(c, name) for c in CONTROLLERS]

    def create(self, name, limits):
        for d in self.dirs(name):
            os.makedirs(d, exist_ok=True)
        mem = self._dir('memory', name)
        _write(os.path.join(mem, 'memory.limit_in_bytes'),
               limits.memory_bytes)
        _write(os.path.join(self._dir('pids', name), 'pids.max'),
               limits.pids_max)
        cpu = self._dir('cpu', name)
        if limits.cpu_shares is not None:
            _write(os.path.join(cpu, 'cpu.shares'), limits.cpu_shares)
        if limits.cpu_period is not None:
            _write(os.path.join(cpu, 'cpu.cfs_period_us'), limits.cpu_period)
        if limits.cpu_quota is not None:
            _write(os.path.join(cpu, 'cpu.cfs_quota_us'),
                   limits.cpu_quota if limits.cpu_quota >= 0 else -1)
        return self.dirs(name)


def detect(root=DEFAULT_ROOT, parent=DEFAULT_PARENT):
    """The cgroup layout to use on this host: v2 if its unified hierarchy
    has every controller needed, else v1; CgroupError naming what is
    missing when neither has them all."""
    mount = v2_mount(root)
    if mount is not None and not missing_v2(root):
        LOG.info('sandbox cgroups: v2 (unified hierarchy at %s, parent %s)',
                 mount, parent)
        return CgroupsV2(mount, parent)
    if not missing_v1(root):
        LOG.info('sandbox cgroups: v1 (%s hierarchies under %s, parent %s)%s',
                 ', '.join(CONTROLLERS), root, parent,
                 '; the unified hierarchy lacks %s' % ', '.join(
                     missing_v2(root)) if mount else '')
        return CgroupsV1(root, parent)
    raise CgroupError(
        'no cgroup hierarchy with the %s controllers: cgroup v2 lacks %s, '
        'v1 lacks %s (under %s)' % (', '.join(CONTROLLERS),
                                    ', '.join(missing_v2(root)),
                                    ', '.join(missing_v1(root)), root))
