"""host_cpu.parse on /proc/cpuinfo texts: this CI host's (an AMD EPYC
guest), a two-socket Intel host with hyper-threading and an arm64 board
(trimmed to the lines the parser reads and a few it must skip)."""
from nova_bhyve import host_cpu

AMD_VM = """\
processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 17
model name	: AMD EPYC
physical id	: 0
siblings	: 2
core id		: 0
cpu cores	: 2
flags		: fpu vme de pse tsc msr sse sse2 avx avx2 avx512f hypervisor
bugs		: sysret_ss_attrs null_seg spectre_v1
power management:

processor	: 1
vendor_id	: AuthenticAMD
model name	: AMD EPYC
physical id	: 0
siblings	: 2
core id		: 1
cpu cores	: 2
flags		: fpu vme de pse tsc msr sse sse2 avx avx2 avx512f hypervisor
power management:

"""


def _intel_cpu(n, socket, core):
    return """\
processor	: %d
vendor_id	: GenuineIntel
cpu family	: 6
model		: 85
model name	: Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz
physical id	: %d
siblings	: 4
core id		: %d
cpu cores	: 2
flags		: fpu vme sse sse2 ht vmx avx avx2 avx512f pdpe1gb
""" % (n, socket, core)


# 2 sockets x 2 cores x 2 threads: 8 processors
INTEL_2S = '\n'.join(_intel_cpu(n, n // 4, n % 4 // 2) for n in range(8))

ARM64 = """\
processor	: 0
BogoMIPS	: 108.00
Features	: fp asimd evtstrm crc32 cpuid
CPU implementer	: 0x41
CPU architecture: 8
CPU part	: 0xd08

processor	: 1
BogoMIPS	: 108.00
Features	: fp asimd evtstrm crc32 cpuid
CPU implementer	: 0x41
CPU architecture: 8
CPU part	: 0xd08
"""


def test_amd_guest():
    assert host_cpu.parse(AMD_VM, 'x86_64') == {
        'arch': 'x86_64', 'model': 'AMD EPYC', 'vendor': 'AMD',
        'topology': {'sockets': 1, 'cores': 2, 'threads': 1},
        'features': ['avx', 'avx2', 'avx512f', 'de', 'fpu', 'hypervisor',
                     'msr', 'pse', 'sse', 'sse2', 'tsc', 'vme']}


def test_two_intel_sockets_with_hyper_threading():
    info = host_cpu.parse(INTEL_2S, 'x86_64')
    assert info['vendor'] == 'Intel'
    assert info['model'] == 'Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz'
    assert info['topology'] == {'sockets': 2, 'cores': 2, 'threads': 2}
    assert 'vmx' in info['features'] and 'avx512f' in info['features']


def test_arm64_without_topology_lines():
    info = host_cpu.parse(ARM64, 'aarch64')
    assert info['topology'] == {'sockets': 1, 'cores': 2, 'threads': 1}
    assert info['model'] == '0xd08' and info['vendor'] is None
    assert info['features'] == ['asimd', 'cpuid', 'crc32', 'evtstrm', 'fp']


def test_empty_text_is_an_error():
    try:
        host_cpu.parse('', 'x86_64')
    except ValueError as e:
        assert 'no processor' in str(e)
    else:
        raise AssertionError('no ValueError')
