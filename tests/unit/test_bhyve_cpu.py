"""bhyve's cpu_info: the exact sysctl command, its output and
/var/run/dmesg.boot parsed (FreeBSD 14 amd64 boot messages, trimmed)."""
from unittest import mock

import pytest

from nova_bhyve.hypervisor.bhyve import backend as bhyve
from nova_bhyve.hypervisor.bhyve import cpu as bhyve_cpu

import fake_execute

SYSCTL_OUT = ('amd64\nIntel(R) Xeon(R) CPU E5-2650 v2 @ 2.60GHz\n32\n16\n'
              '2\n')
DMESG = """\
FreeBSD 14.1-RELEASE releng/14.1-n267679-10e31f0946d8 GENERIC amd64
CPU: Intel(R) Xeon(R) CPU E5-2650 v2 @ 2.60GHz (2600.05-MHz K8-class CPU)
  Origin="GenuineIntel"  Id=0x306e4  Family=0x6  Model=0x3e  Stepping=4
  Features=0xbfebfbff<FPU,VME,DE,PSE,TSC,MSR,PAE,MCE,CX8,APIC,SEP,MTRR>
  Features2=0x7fbee3ff<SSE3,PCLMULQDQ,VMX,SSSE3,CX16,SSE4.1,SSE4.2,AVX>
  AMD Features=0x2c100800<SYSCALL,NX,Page1GB,RDTSCP,LM>
  AMD Features2=0x1<LAHF>
  Structured Extended Features=0x281<FSGSBASE,SMEP,ERMS>
  XSAVE Features=0x1<XSAVEOPT>
  VT-x: PAT,HLT,MTF,PAUSE,EPT,UG,VPID,VID,PostIntr
  TSC: P-state invariant, performance statistics
real memory  = 137438953472 (131072 MB)
FreeBSD/SMP: Multiprocessor System Detected: 32 CPUs
FreeBSD/SMP: 2 package(s) x 8 core(s) x 2 hardware threads
"""


def test_the_sysctl_command():
    assert bhyve_cpu.sysctl_argv() == [
        '/sbin/sysctl', '-n', 'hw.machine', 'hw.model', 'hw.ncpu',
        'kern.smp.cores', 'kern.smp.threads_per_core']


def test_cpu_info_from_sysctl_and_dmesg():
    info = bhyve_cpu.cpu_info(SYSCTL_OUT, DMESG)
    assert info['arch'] == 'amd64'
    assert info['model'] == 'Intel(R) Xeon(R) CPU E5-2650 v2 @ 2.60GHz'
    assert info['vendor'] == 'Intel'
    assert info['topology'] == {'sockets': 2, 'cores': 8, 'threads': 2}
    assert {'fpu', 'vmx', 'avx', 'sse4.2', 'lm', 'lahf', 'smep',
            'xsaveopt'} <= set(info['features'])
    assert 'ept' not in info['features']        # VT-x line: not a feature
    assert info['features'] == sorted(info['features'])


def test_without_dmesg_boot_the_unknown_stays_unknown():
    info = bhyve_cpu.cpu_info(SYSCTL_OUT, None)
    assert info['topology'] == {'sockets': None, 'cores': None,
                                'threads': 2}
    assert info['vendor'] is None and info['features'] == []


def test_sysctl_output_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match='5 names'):
        bhyve_cpu.parse_sysctl('amd64\n')


def test_backend_cpu_info_runs_exactly_that_command(tmp_path):
    dmesg = tmp_path / 'dmesg.boot'
    dmesg.write_text(DMESG)
    with fake_execute.patch(out=SYSCTL_OUT) as execute, \
            mock.patch.object(bhyve_cpu, 'DMESG_BOOT', str(dmesg)):
        info = bhyve.BhyveHypervisor().cpu_info()
    assert fake_execute.argvs(execute) == [bhyve_cpu.sysctl_argv()]
    assert info['accelerator'] == 'vmm' and info['guest_cpu'] == 'host'
    assert info['hypervisor_type'] == 'bhyve'
    assert info['machine_types'] == []
    assert info['topology']['sockets'] == 2


def test_bhyve_has_no_machine_types():
    """resolve_machine is a no-op whatever the image asks; check_machine
    accepts anything (there is nothing to check)."""
    hv = bhyve.BhyveHypervisor()
    with fake_execute.patch() as execute:
        assert hv.resolve_machine(None) is None
        assert hv.resolve_machine('pc-q35-7.2') is None
        assert hv.check_machine(None) is None
        assert hv.check_machine('pc-q35-7.2') is None
    assert execute.call_count == 0
