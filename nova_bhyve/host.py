"""Facts about the compute host: CPUs, memory, disk, uptime.

CPUs, memory, disk and boot time come from psutil (a Nova requirement),
which reads them on Linux (/proc, statvfs) and on FreeBSD (sysctl, statfs)
alike: one code path for both, no command run. No state, no caching.
"""
import os
import platform
import time

from nova.objects import fields as obj_fields
import os_resource_classes as orc
from oslo_config import cfg
from oslo_serialization import jsonutils
from oslo_utils import units
import psutil

CONF = cfg.CONF


def is_freebsd():
    return platform.system() == 'FreeBSD'


def vcpus():
    """Logical CPUs of the host."""
    return psutil.cpu_count(logical=True) or 1


def memory_mb():
    """(total, used) host memory in MiB; used is what is not available to
    new processes without swapping (Linux: MemTotal - MemAvailable; FreeBSD:
    hw.physmem less free, inactive and cached pages)."""
    mem = psutil.virtual_memory()
    return mem.total // units.Mi, (mem.total - mem.available) // units.Mi


def disk_gb(path):
    """(total, used, free) GiB of the file system holding ``path``; free is
    what an unprivileged user can still write, used everything else
    (reserved blocks included)."""
    usage = psutil.disk_usage(path)
    return (usage.total // units.Gi, (usage.total - usage.free) // units.Gi,
            usage.free // units.Gi)


def uptime_text(now, boot_time, users, loadavg):
    """procps uptime(1)'s line for these facts (local time of day), without
    its leading space: ``10:23:45 up 3 days,  2:01,  2 users,  load average:
    0.00, 0.01, 0.05``."""
    up = int(now - boot_time)
    days, hours, minutes = up // 86400, up // 3600 % 24, up // 60 % 60
    text = time.strftime('%H:%M:%S', time.localtime(now)) + ' up '
    if days:
        text += '%d %s, ' % (days, 'days' if days > 1 else 'day')
    if hours:
        text += '%2d:%02d, ' % (hours, minutes)
    else:
        text += '%d min, ' % minutes
    text += '%2d %s,  load average: %.2f, %.2f, %.2f' % (
        (users, 'users' if users > 1 else 'user') + tuple(loadavg))
    return text


def uptime():
    """The text of uptime(1), as Nova's other drivers report it (libvirt:
    ``env LANG=C uptime``), in procps' format on every host (FreeBSD's
    uptime(1) words it slightly differently; Nova passes it on unparsed)."""
    return uptime_text(time.time(), psutil.boot_time(), len(psutil.users()),
                       os.getloadavg())


def available_resource(nodename, instances_path, vcpus_used, hv_info,
                       cpu_info):
    """The resource view of get_available_resource (Nova's dict);
    ``cpu_info``: the backend's (Hypervisor.cpu_info)."""
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
        'cpu_info': jsonutils.dumps(cpu_info),
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
