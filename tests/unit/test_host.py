"""host.py on this Linux host, checked against independent sources
(sysconf, statvfs via shutil, /proc/cpuinfo). Nothing mocked."""
import os
import platform
import shutil
import tempfile

from oslo_utils import units

from nova_bhyve import host


def test_not_freebsd_here():
    assert host.is_freebsd() is (platform.system() == 'FreeBSD')
    assert host.is_freebsd() is False


def test_vcpus():
    assert host.vcpus() == os.cpu_count()
    assert host.vcpus() >= 1


def test_memory_mb_matches_sysconf():
    total, used = host.memory_mb()
    phys = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    assert abs(total - phys // units.Mi) <= 1
    assert total >= 64
    assert 0 < used < total


def test_memory_used_excludes_available():
    _, used = host.memory_mb()
    avail = None
    with open('/proc/meminfo') as f:
        for line in f:
            if line.startswith('MemAvailable:'):
                avail = int(line.split()[1]) // 1024
    total = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') \
        // units.Mi
    # memory is in motion between the two reads: allow some slack
    assert abs(used - (total - avail)) < max(64, total // 20)


def test_disk_gb_matches_disk_usage():
    path = tempfile.gettempdir()
    total, used, free = host.disk_gb(path)
    usage = shutil.disk_usage(path)
    assert total == usage.total // units.Gi
    assert abs(free - usage.free // units.Gi) <= 1
    assert 0 <= used <= total
    assert 0 <= free <= total
    # used counts what an unprivileged user cannot have (reserved blocks)
    assert abs((total - free) - used) <= 1


def test_uptime_text():
    text = host.uptime()
    assert text
    assert 'load average' in text
    assert '\n' not in text


def test_cpu_info():
    info = host.cpu_info()
    assert info['arch'] == platform.machine()
    assert info['topology'] == {'sockets': 1, 'cores': host.vcpus(),
                                'threads': 1}
    with open('/proc/cpuinfo') as f:
        vendors = {line.split(':', 1)[1].strip() for line in f
                   if line.startswith('vendor_id')}
    assert info['vendor'] in (vendors or {'unknown'})
