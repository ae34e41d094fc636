"""Facts about the compute host: CPUs, memory, disk, uptime.

Linux reads /proc; FreeBSD uses sysctl(8). No state, no caching.
"""
import os
import platform
import subprocess

from nova.objects import fields as obj_fields
import os_resource_classes as orc
from oslo_config import cfg
from oslo_serialization import jsonutils
from oslo_utils import units

CONF = cfg.CONF


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


def available_resource(nodename, instances_path, vcpus_used, hv_info):
    """The resource view of get_available_resource (Nova's dict)."""
    mem_total, mem_used = memory_mb()
    disk_total, disk_used, disk_free = disk_gb(instances_path)
    return {
        'vcpus': vcpus(),
        'memory_mb': mem_total,
        'local_gb': disk_total,
        'vcpus_used': vcpus_used,
        'memory_mb_used': mem_used,
        'local_gb_used': disk_used,
        'hypervisor_type': hv_info['hypervisor_type'],
        'hypervisor_version': hv_info['hypervisor_version'],
        'hypervisor_hostname': nodename,
        'cpu_info': jsonutils.dumps(cpu_info()),
        'disk_available_least': disk_free,
        'supported_instances': [(obj_fields.Architecture.X86_64,
                                 hv_info['hypervisor_type'],
                                 obj_fields.VMMode.HVM)],
        'numa_topology': None,
    }


def inventory(instances_path, ratios, reserved_disk_gb):
    """Placement inventory of this host: VCPU, MEMORY_MB, DISK_GB, with
    Nova's allocation ratios and reservations."""
    mem_total, _ = memory_mb()
    disk_total = disk_gb(instances_path)[0]
    cpus = vcpus()

    def record(total, rc, reserved):
        return {'total': total, 'min_unit': 1, 'max_unit': total,
                'step_size': 1, 'allocation_ratio': ratios[rc],
                'reserved': reserved}
    return {
        orc.VCPU: record(cpus, orc.VCPU, CONF.reserved_host_cpus),
        orc.MEMORY_MB: record(mem_total, orc.MEMORY_MB,
                              CONF.reserved_host_memory_mb),
        orc.DISK_GB: record(disk_total, orc.DISK_GB, reserved_disk_gb),
    }
