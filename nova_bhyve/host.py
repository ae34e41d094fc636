"""Facts about the compute host: CPUs, memory, disk, uptime.

Linux reads /proc; FreeBSD uses sysctl(8). No state, no caching.
"""
import os
import platform
import subprocess

from oslo_utils import units


def is_freebsd():
    return platform.system() == 'FreeBSD'


def vcpus():
    return os.cpu_count() or 1


def _sysctl(name):
    out = subprocess.run(['sysctl', '-n', name], capture_output=True,
                         text=True, check=True).stdout
    return int(out.strip())


def _meminfo():
    values = {}
    with open('/proc/meminfo') as f:
        for line in f:
            key, _, rest = line.partition(':')
            values[key] = int(rest.split()[0]) * units.Ki
    return values


def memory_mb():
    """(total, used) host memory in MiB."""
    if is_freebsd():
        total = _sysctl('hw.physmem')
        page = _sysctl('hw.pagesize')
        free = page * (_sysctl('vm.stats.vm.v_free_count') +
                       _sysctl('vm.stats.vm.v_inactive_count'))
    else:
        info = _meminfo()
        total = info['MemTotal']
        free = info.get('MemAvailable', info['MemFree'])
    return total // units.Mi, (total - free) // units.Mi


def disk_gb(path):
    """(total, used, free) GiB of the file system holding ``path``."""
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    return (total // units.Gi, (total - free) // units.Gi,
            free // units.Gi)


def uptime():
    """The text of uptime(1), as Nova's other drivers report it."""
    return subprocess.run(['uptime'], capture_output=True, text=True,
                          env={'LANG': 'C', 'PATH': os.environ.get(
                              'PATH', '/usr/bin:/bin')},
                          check=False).stdout.strip()


def cpu_info():
    return {'arch': platform.machine(), 'vendor': _cpu_vendor(),
            'topology': {'sockets': 1, 'cores': vcpus(), 'threads': 1},
            'features': []}


def _cpu_vendor():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('vendor_id'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return 'unknown'
