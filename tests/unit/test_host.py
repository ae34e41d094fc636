"""host.py on this Linux host, checked against independent sources read
here (/proc/meminfo, /proc/stat, /proc/uptime, /proc/loadavg, os.statvfs,
sysconf, uptime(1) itself). Nothing mocked."""
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time

from oslo_utils import units
import pytest

from nova_bhyve import host
from nova_bhyve import host_cpu


def _meminfo_kib():
    values = {}
    with open('/proc/meminfo') as f:
        for line in f:
            key, _, rest = line.partition(':')
            values[key] = int(rest.split()[0])
    return values


def test_not_freebsd_here():
    assert host.is_freebsd() is (platform.system() == 'FreeBSD')
    assert host.is_freebsd() is False


def test_vcpus():
    with open('/proc/stat') as f:
        online = sum(1 for line in f if re.match(r'cpu\d+ ', line))
    assert host.vcpus() == online
    assert host.vcpus() == os.cpu_count()
    assert host.vcpus() >= 1


def test_memory_total_matches_meminfo_and_sysconf():
    total, used = host.memory_mb()
    assert abs(total - _meminfo_kib()['MemTotal'] // 1024) <= 1
    phys = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    assert abs(total - phys // units.Mi) <= 1
    assert total >= 64
    assert 0 < used < total


def test_memory_used_excludes_available():
    _, used = host.memory_mb()
    info = _meminfo_kib()
    expected = (info['MemTotal'] - info['MemAvailable']) // 1024
    total = info['MemTotal'] // 1024
    # memory is in motion between the two reads: allow some slack
    assert abs(used - expected) < max(64, total // 20)


@pytest.mark.parametrize('path', [tempfile.gettempdir(), '/'])
def test_disk_gb_matches_statvfs(path):
    total, used, free = host.disk_gb(path)
    st = os.statvfs(path)
    st_total = st.f_blocks * st.f_frsize
    st_free = st.f_bavail * st.f_frsize
    assert total == st_total // units.Gi
    # others write meanwhile
    assert abs(free - st_free // units.Gi) <= 1
    # used counts what an unprivileged user cannot have (reserved blocks)
    assert abs(used - (st_total - st_free) // units.Gi) <= 1
    assert 0 <= used <= total
    assert 0 <= free <= total


def test_disk_gb_missing_path():
    with pytest.raises(FileNotFoundError):
        host.disk_gb('/nonexistent/nova-bhyve')


# uptime(1) of procps: " HH:MM:SS up [D day(s), ](H:MM|M min), N user(s),
#  load average: a, b, c" (host.uptime drops the leading space)
UPTIME = re.compile(
    r'^(\d\d):(\d\d):(\d\d) up (?:(\d+) days?, )?'
    r'(?:\s?(\d+):(\d\d)|(\d+) min), +(\d+) users?,  '
    r'load average: (\d+\.\d\d), (\d+\.\d\d), (\d+\.\d\d)$')


def _parse(text):
    m = UPTIME.match(text)
    assert m, 'not uptime(1)\'s format: %r' % text
    hh, mm, ss, days, hours, minutes, only_min, users = (
        int(g) if g else 0 for g in m.groups()[:8])
    return {'clock': hh * 3600 + mm * 60 + ss,
            'up_min': days * 1440 + hours * 60 + minutes + only_min,
            'users': users,
            'load': [float(g) for g in m.groups()[8:]]}


def _at(hh, mm, ss):
    """A time stamp whose local time of day is hh:mm:ss."""
    return time.mktime((2024, 1, 2, hh, mm, ss, 0, 0, -1))


@pytest.mark.parametrize('up, users, load, expected', [
    (25 * 60 + 59, 0, (1.98, 2.17, 1.97),
     '10:23:45 up 25 min,  0 user,  load average: 1.98, 2.17, 1.97'),
    (59, 1, (0, 0.01, 0.05),
     '10:23:45 up 0 min,  1 user,  load average: 0.00, 0.01, 0.05'),
    (2 * 3600 + 60, 1, (0, 0, 0),
     '10:23:45 up  2:01,  1 user,  load average: 0.00, 0.00, 0.00'),
    (86400 + 5 * 60, 2, (0.5, 0.25, 0.125),
     '10:23:45 up 1 day, 5 min,  2 users,  load average: 0.50, 0.25, 0.12'),
    (3 * 86400 + 12 * 3600 + 30 * 60, 12, (10.5, 9, 8.25),
     '10:23:45 up 3 days, 12:30, 12 users,  load average: 10.50, 9.00, '
     '8.25'),
])
def test_uptime_text_format(up, users, load, expected):
    now = _at(10, 23, 45)
    assert host.uptime_text(now, now - up, users, load) == expected
    assert UPTIME.match(expected)


def test_uptime_boot_time_matches_proc_uptime():
    with open('/proc/uptime') as f:
        up = float(f.read().split()[0])
    text = host.uptime()
    assert '\n' not in text and not text.startswith(' ')
    assert abs(_parse(text)['up_min'] - int(up) // 60) <= 1


@pytest.mark.skipif(shutil.which('uptime') is None,
                    reason='no uptime(1) on this host to compare with')
def test_uptime_matches_uptime_command():
    ours = _parse(host.uptime())
    out = subprocess.run(['uptime'], capture_output=True, text=True,
                         env={'LANG': 'C', 'PATH': os.environ['PATH']},
                         check=True).stdout
    assert out.startswith(' ') and out.endswith('\n')
    theirs = _parse(out.strip())
    with open('/proc/loadavg') as f:
        proc_load = [float(v) for v in f.read().split()[:3]]
    # the clock may pass midnight between the two reads
    assert min(abs(ours['clock'] - theirs['clock']),
               86400 - abs(ours['clock'] - theirs['clock'])) <= 5
    assert abs(ours['up_min'] - theirs['up_min']) <= 1
    assert ours['users'] == theirs['users']
    for a, b, c in zip(ours['load'], theirs['load'], proc_load):
        assert abs(a - b) <= max(0.5, b * 0.25)
        assert abs(a - c) <= max(0.5, c * 0.25)


def test_cpu_info_from_proc_cpuinfo_agrees_with_lscpu():
    """host_cpu.read() on this host against lscpu(1), an independent
    reader of the same kernel facts."""
    lscpu = shutil.which('lscpu')
    if lscpu is None:
        pytest.skip('no lscpu')
    out = subprocess.run([lscpu], capture_output=True, text=True,
                         env={'LC_ALL': 'C', 'PATH': os.environ['PATH']},
                         check=True).stdout
    facts = {k.strip(): v.strip() for k, _, v in
             (line.partition(':') for line in out.splitlines())}
    info = host_cpu.read()
    assert info['arch'] == platform.machine() == facts['Architecture']
    assert info['model'] == facts['Model name']
    assert info['topology'] == {
        'sockets': int(facts['Socket(s)']),
        'cores': int(facts['Core(s) per socket']),
        'threads': int(facts['Thread(s) per core'])}
    assert info['features'] == sorted(facts['Flags'].split())
    n = info['topology']
    assert n['sockets'] * n['cores'] * n['threads'] == host.vcpus()
