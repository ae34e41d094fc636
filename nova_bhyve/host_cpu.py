"""The host CPU on Linux, from /proc/cpuinfo, in the shape of Nova's libvirt
``cpu_info``: arch, model, vendor, topology (sockets, cores per socket,
threads per core), features.

``model`` is the kernel's model name (libvirt would name its nearest CPU
model instead); ``features`` are the kernel's flag names. The backends add
their own facts (hypervisor/*: ``cpu_info``).
"""
import platform

CPUINFO = '/proc/cpuinfo'
#: libvirt's vendor names for the CPUID vendor strings
VENDORS = {'GenuineIntel': 'Intel', 'AuthenticAMD': 'AMD',
           'HygonGenuine': 'Hygon', 'CentaurHauls': 'VIA'}


def parse(text, arch):
    """cpu_info facts from the text of /proc/cpuinfo (pure)."""
    cpus = []
    current = {}
    for line in text.splitlines() + ['']:
        if not line.strip():
            if current:
                cpus.append(current)
            current = {}
            continue
        key, _, value = line.partition(':')
        current[key.strip()] = value.strip()
    if not cpus:
        raise ValueError('no processor in %s' % CPUINFO)
    first = cpus[0]
    vendor = first.get('vendor_id')
    sockets = len({c['physical id'] for c in cpus if 'physical id' in c})
    try:
        cores = int(first['cpu cores'])
        threads = max(1, int(first['siblings']) // cores)
    except (KeyError, ValueError, ZeroDivisionError):
        # no topology lines (e.g. arm64): each processor a core
        sockets, cores, threads = 1, len(cpus), 1
    flags = first.get('flags') or first.get('Features') or ''
    return {'arch': arch,
            'model': first.get('model name') or first.get('CPU part'),
            'vendor': VENDORS.get(vendor, vendor),
            'topology': {'sockets': sockets or 1, 'cores': cores,
                         'threads': threads},
            'features': sorted(set(flags.split()))}


def read():
    """This host's cpu_info facts (Linux)."""
    with open(CPUINFO) as f:
        return parse(f.read(), platform.machine())
