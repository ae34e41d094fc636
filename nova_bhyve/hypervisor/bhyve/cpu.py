"""The host CPU on FreeBSD, for get_available_resource's ``cpu_info``.

NEVER RUN ON FREEBSD; the command is pinned by tests/unit/test_bhyve_cpu.py.

* ``sysctl -n hw.machine hw.model hw.ncpu kern.smp.cores
  kern.smp.threads_per_core``: one value a line, in that order (arch, the
  CPU's brand string, logical CPUs, physical cores of the whole host,
  hardware threads per core);
* sockets, vendor and features are not sysctls: they are read from the
  kernel's boot messages, /var/run/dmesg.boot (``FreeBSD/SMP: 2 package(s)
  x 8 core(s) x 2 hardware threads``, ``Origin="GenuineIntel"``,
  ``Features=0x...<FPU,VME,...>`` and the other ``...Features...=`` lines,
  printed by sys/x86/x86/identcpu.c and mp_x86.c). Without that file they
  are reported unknown (None, no features), not guessed.
"""
import re

from oslo_concurrency import processutils

SYSCTL = '/sbin/sysctl'
SYSCTLS = ('hw.machine', 'hw.model', 'hw.ncpu', 'kern.smp.cores',
           'kern.smp.threads_per_core')
DMESG_BOOT = '/var/run/dmesg.boot'
VENDORS = {'GenuineIntel': 'Intel', 'AuthenticAMD': 'AMD'}

_FEATURES = re.compile(r'^\s*[A-Za-z0-9 ]*Features[0-9]*=0x[0-9a-fA-F]+'
                       r'<([^>]*)>')
_ORIGIN = re.compile(r'Origin\s*=\s*"([^"]+)"')
_SMP = re.compile(r'FreeBSD/SMP: (\d+) package\(s\)')


def sysctl_argv():
    return [SYSCTL, '-n'] + list(SYSCTLS)


def parse_sysctl(out):
    """{name: value} of the sysctl output (one value a line)."""
    values = out.splitlines()
    if len(values) != len(SYSCTLS):
        raise ValueError('sysctl printed %d values for %d names: %r'
                         % (len(values), len(SYSCTLS), out))
    return dict(zip(SYSCTLS, (v.strip() for v in values)))


def parse_dmesg(text):
    """(packages, vendor, features) from dmesg.boot; None for what it
    does not say."""
    packages = vendor = None
    features = set()
    for line in text.splitlines():
        m = _FEATURES.match(line)
        if m:
            features.update(f.strip().lower() for f in m.group(1).split(',')
                            if f.strip())
            continue
        m = _ORIGIN.search(line)
        if m and vendor is None:
            vendor = m.group(1)
        m = _SMP.search(line)
        if m and packages is None:
            packages = int(m.group(1))
    return packages, vendor, sorted(features)


def cpu_info(sysctl_out, dmesg_text):
    """cpu_info facts (pure)."""
    s = parse_sysctl(sysctl_out)
    packages, vendor, features = parse_dmesg(dmesg_text or '')
    total_cores = int(s['kern.smp.cores'])
    return {'arch': s['hw.machine'], 'model': s['hw.model'],
            'vendor': VENDORS.get(vendor, vendor),
            'topology': {
                'sockets': packages,
                'cores': (total_cores // packages if packages
                          else None),
                'threads': int(s['kern.smp.threads_per_core'])},
            'features': features}


def read():
    """This host's cpu_info facts (runs sysctl, reads dmesg.boot)."""
    out, _ = processutils.execute(*sysctl_argv())
    try:
        with open(DMESG_BOOT, errors='replace') as f:
            dmesg = f.read()
    except OSError:
        dmesg = None
    return cpu_info(out, dmesg)
