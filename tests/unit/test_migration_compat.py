"""The live-migration compatibility rules (migration/compat.py) and the
destination's check (live.dest_check) that applies them to the source's
compute record: each refusal, and acceptance."""
import json
import os
import re
import types

from nova import exception
import pytest

from nova_bhyve.hypervisor import base
from nova_bhyve.migration import compat
from nova_bhyve.migration import live
from nova_bhyve.migration import resize


def kvm_host(**kw):
    info = {'arch': 'x86_64', 'model': 'AMD EPYC', 'vendor': 'AMD',
            'topology': {'sockets': 1, 'cores': 2, 'threads': 1},
            'features': ['avx', 'avx2', 'sse2'], 'accelerator': 'kvm',
            'hypervisor_type': 'qemu', 'hypervisor_version': 7002022,
            'machine_types': ['pc-q35-7.1', 'pc-q35-7.2'],
            'guest_cpu': 'host'}
    info.update(kw)
    return info


def tcg_host(**kw):
    return kvm_host(accelerator='tcg', guest_cpu='default', **kw)


def test_same_hosts_are_compatible():
    assert compat.refusals(kvm_host(), kvm_host()) == []
    assert compat.refusals(tcg_host(), tcg_host()) == []


def test_a_newer_destination_with_more_features_is_compatible():
    dest = kvm_host(hypervisor_version=8002000,
                    features=['avx', 'avx2', 'avx512f', 'sse2'])
    assert compat.refusals(kvm_host(), dest) == []


@pytest.mark.parametrize('source,dest,reason', [
    (kvm_host(), tcg_host(), 'under KVM, this host under TCG'),
    (tcg_host(), kvm_host(), 'under TCG, this host under KVM'),
    (kvm_host(), kvm_host(hypervisor_version=7001000),
     'qemu 7.1.0 here is older than the source\'s 7.2.22'),
    (kvm_host(), kvm_host(features=['avx', 'sse2']),
     'lacks features of the source\'s, which the guest CPU \\(host\\) may '
     'use: avx2'),
    (kvm_host(), kvm_host(vendor='Intel'), 'CPU is AMD, this host\'s Intel'),
    (kvm_host(), kvm_host(guest_cpu='Haswell'),
     'guest CPU model differs \\(source: host, here: Haswell'),
    (kvm_host(), kvm_host(arch='aarch64'), 'x86_64, this host aarch64'),
])
def test_refusals(source, dest, reason):
    reasons = compat.refusals(source, dest)
    assert [r for r in reasons if re.search(reason, r)], reasons


def test_tcg_ignores_the_host_cpus():
    """Under TCG the guest CPU is emulated: vendor and features of the
    hosts do not matter."""
    dest = tcg_host(vendor='Intel', features=['sse2'])
    assert compat.refusals(tcg_host(), dest) == []


def test_facts_an_older_source_did_not_report_are_not_checked():
    old = {'arch': 'x86_64', 'vendor': 'AuthenticAMD',
           'topology': {'sockets': 1, 'cores': 2, 'threads': 1},
           'features': []}
    assert compat.refusals(old, kvm_host()) == []


def test_machine_refusal():
    assert compat.machine_refusal('pc-q35-7.2', kvm_host()) is None
    assert compat.machine_refusal(None, kvm_host()) is None
    assert compat.machine_refusal('pc-q35-7.2', {}) is None    # not said
    assert compat.machine_refusal(
        'pc-q35-8.0', kvm_host()) == ('machine type pc-q35-8.0 is unknown '
                                      'to the destination\'s qemu 7.2.22')


# -- live.dest_check ---------------------------------------------------------

class _Hyp:
    name = 'qemu'
    supports_live_migration = True
    supports_block_migration = True

    def __init__(self, info, machines=('pc-q35-7.2',)):
        self.info, self.machines = info, machines

    def cpu_info(self):
        return self.info

    def check_live_migration(self, vmdir, block, bandwidth):
        pass

    def check_machine(self, machine):
        if machine and machine not in self.machines:
            raise base.HypervisorError('machine type %s is unknown' %
                                       machine)


def _drv(tmp_path, info, **kw):
    return types.SimpleNamespace(instances_path=str(tmp_path),
                                 host_name='compute2',
                                 hypervisor=_Hyp(info, **kw))


def _instance(machine='pc-q35-7.2'):
    props = {'hw_machine_type': machine} if machine else {}
    return types.SimpleNamespace(
        uuid='6d5ba3a0-55a1-4c7c-9a43-3d1b0f6a2b11',
        image_meta=types.SimpleNamespace(properties=props))


def _src(info):
    return {'host': 'compute', 'cpu_info': json.dumps(info),
            'hypervisor_version': info['hypervisor_version']}


def test_dest_check_refuses_before_leaving_anything(tmp_path):
    drv = _drv(tmp_path, tcg_host())
    with pytest.raises(exception.MigrationPreCheckError,
                       match='compute2 cannot take this guest: the source '
                             'runs its guests under KVM'):
        live.dest_check(drv, _instance(), None, False, _src(kvm_host()))
    assert os.listdir(tmp_path) == []        # no shared-storage probe


def test_dest_check_refuses_an_unknown_machine(tmp_path):
    drv = _drv(tmp_path, kvm_host(), machines=('pc-q35-7.1',))
    with pytest.raises(exception.MigrationPreCheckError,
                       match='machine type pc-q35-7.2 is unknown'):
        live.dest_check(drv, _instance(), None, False, _src(kvm_host()))
    assert os.listdir(tmp_path) == []


def test_dest_check_accepts_a_compatible_source(tmp_path):
    drv = _drv(tmp_path, kvm_host(hypervisor_version=8000000))
    data = live.dest_check(drv, _instance(), None, False, _src(kvm_host()))
    assert os.listdir(tmp_path) == [data.filename]


def test_dest_check_without_a_source_record(tmp_path):
    drv = _drv(tmp_path, kvm_host())
    data = live.dest_check(drv, _instance(None), None, False, None)
    assert data.filename


def test_dest_check_bad_source_cpu_info(tmp_path):
    drv = _drv(tmp_path, kvm_host())
    with pytest.raises(exception.InvalidCPUInfo):
        live.dest_check(drv, _instance(), None, False,
                        {'cpu_info': '[1, 2]'})


# -- resize / cold migration: the machine travels and is checked ----------

def test_disk_info_carries_the_machine_and_the_destination_checks_it():
    info = resize._with_machine(json.dumps({'disks': ['disk']}),
                                'pc-q35-7.2')
    assert json.loads(info) == {'disks': ['disk'], 'machine': 'pc-q35-7.2'}
    ok = types.SimpleNamespace(hypervisor=_Hyp(kvm_host()))
    assert resize._moved_machine(ok, info) == 'pc-q35-7.2'
    assert resize._moved_machine(ok, '{}') is None      # an older source
    old = types.SimpleNamespace(hypervisor=_Hyp(kvm_host(),
                                                machines=('pc-q35-7.1',)))
    with pytest.raises(exception.ResizeError, match='pc-q35-7.2 is unknown'):
        resize._moved_machine(old, info)


def test_source_refuses_a_destination_without_the_machine(monkeypatch):
    node = types.SimpleNamespace(cpu_info=json.dumps(kvm_host(
        hypervisor_version=6002000, machine_types=['pc-q35-6.2'])))
    monkeypatch.setattr(
        resize.objects.ComputeNode, 'get_first_node_by_host_for_old_compat',
        lambda context, host: node)
    with pytest.raises(exception.InstanceFaultRollback) as e:
        resize._refuse_unknown_machine(None, 'compute2', 'pc-q35-7.2')
    assert 'pc-q35-7.2 is unknown to the destination\'s qemu 6.2.0' in str(
        e.value.inner_exception)
    resize._refuse_unknown_machine(None, 'compute2', 'pc-q35-6.2')
