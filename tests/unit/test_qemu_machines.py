"""QEMU machine types: ``-machine help`` parsed (QEMU 7.2's output,
trimmed, and the real binary's where it exists), the alias resolved to
its versioned machine, what is refused, the spec's machine on the command
line and in spec.json."""
import os
import shutil
import subprocess

from nova import exception
from nova import objects
import pytest

from nova_bhyve import conf
from nova_bhyve import driver
from nova_bhyve import guest
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import backend as qemu
from nova_bhyve.hypervisor.qemu import machines
from nova_bhyve.hypervisor.qemu import resources as qemu_resources

import fake_execute

HELP_72 = """\
Supported machines are:
microvm              microvm (i386)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)
pc-i440fx-7.1        Standard PC (i440FX + PIIX, 1996)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)
pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)
pc-q35-7.1           Standard PC (Q35 + ICH9, 2009)
pc-q35-4.0.1         Standard PC (Q35 + ICH9, 2009)
pc-q35-2.10          Standard PC (Q35 + ICH9, 2009)
isapc                ISA-only PC
none                 empty machine
"""
UUID = '6d5ba3a0-55a1-4c7c-9a43-3d1b0f6a2b11'
CONF = conf.CONF
objects.register_all()


@pytest.fixture(autouse=True)
def _no_cache():
    machines._cache.clear()
    yield
    machines._cache.clear()


def test_parse_names_and_aliases():
    m = machines.parse(HELP_72)
    assert m.aliases == {'pc': 'pc-i440fx-7.2', 'q35': 'pc-q35-7.2'}
    assert 'pc-q35-4.0.1' in m.names and 'none' in m.names
    assert m.versioned_q35() == ['pc-q35-2.10', 'pc-q35-4.0.1',
                                 'pc-q35-7.1', 'pc-q35-7.2']


def test_default_and_alias_resolve_to_the_versioned_machine():
    m = machines.parse(HELP_72)
    assert m.resolve(None) == 'pc-q35-7.2'
    assert m.resolve('q35') == 'pc-q35-7.2'
    assert m.resolve('pc-q35-7.1') == 'pc-q35-7.1'       # kept as asked


@pytest.mark.parametrize('name,why', [
    ('pc-q35-9.2', 'unknown'),
    ('virt', 'unknown'),
    ('pc', 'not a q35 machine'),
    ('pc-i440fx-7.1', 'not a q35 machine'),
    ('microvm', 'not a q35 machine'),
])
def test_refused_machines(name, why):
    with pytest.raises(ValueError, match=why):
        machines.parse(HELP_72).resolve(name)


def test_probe_runs_machine_help_once_per_binary():
    with fake_execute.patch(out=HELP_72) as execute:
        assert machines.probe('/q').resolve(None) == 'pc-q35-7.2'
        machines.probe('/q')
        machines.probe('/other')
    assert fake_execute.argvs(execute) == [['/q', '-machine', 'help'],
                                           ['/other', '-machine', 'help']]


def test_backend_refuses_what_its_qemu_lacks():
    hv = qemu.QemuHypervisor()
    hv.binary = '/q'
    with fake_execute.patch(out=HELP_72):
        assert hv.resolve_machine('q35') == 'pc-q35-7.2'
        with pytest.raises(base.HypervisorError, match='not a q35'):
            hv.resolve_machine('pc')
        hv.check_machine('pc-q35-7.1')
        hv.check_machine(None)                  # a spec older than machine
        with pytest.raises(base.HypervisorError,
                           match='pc-q35-8.0 is unknown'):
            hv.check_machine('pc-q35-8.0')


def test_backend_without_its_binary():
    hv = qemu.QemuHypervisor()
    hv.binary = '/nonexistent/qemu-system-x86_64'
    with pytest.raises(base.HypervisorError, match='cannot list'):
        hv.resolve_machine(None)


def test_the_real_qemu_has_a_versioned_q35():
    binary = shutil.which('qemu-system-x86_64')
    if binary is None:
        pytest.skip('no qemu-system-x86_64')
    out = subprocess.run([binary, '-machine', 'help'], capture_output=True,
                         text=True, check=True).stdout
    alias = [line.split('(alias of ')[1].rstrip(')')
             for line in out.splitlines() if line.startswith('q35 ')]
    assert machines.probe(binary).resolve(None) == alias[0]
    assert alias[0].startswith('pc-q35-')


def _spec(machine=None):
    return guest.VMSpec(uuid=UUID, name='i-1', vcpus=1, memory_mb=128,
                        machine=machine)


def test_the_spec_machine_is_rendered():
    s = _spec('pc-q35-7.1')
    argv = qemu.render_argv(s, base.VMDir('/i/' + UUID), '/q', 'kvm',
                            qemu_resources.numbered(s, None))
    assert argv[argv.index('-machine') + 1] == 'pc-q35-7.1,accel=kvm'


def test_spec_json_keeps_the_machine_and_reads_older_specs():
    s = _spec('pc-q35-7.2')
    assert guest.VMSpec.from_json(s.to_json()).machine == 'pc-q35-7.2'
    old = s.to_json().replace('"machine": "pc-q35-7.2",', '')
    assert '"machine"' not in old
    assert guest.VMSpec.from_json(old).machine is None


# -- the driver: refused at spawn, recorded for the instance ------------------

def _instance():
    flavor = objects.Flavor(name='f1', vcpus=1, memory_mb=128, root_gb=1,
                            ephemeral_gb=0, swap=0, extra_specs={})
    return objects.Instance(uuid=UUID, id=42, flavor=flavor,
                            image_ref='img-1', kernel_id=None,
                            ramdisk_id=None, host='a', node='a',
                            config_drive='', system_metadata={})


@pytest.fixture
def qemu_driver(tmp_path):
    CONF.set_override('instances_path', str(tmp_path / 'instances'))
    CONF.set_override('hypervisor', 'qemu', group='bhyve')
    CONF.set_override('qemu_binary', '/q', group='bhyve')
    yield driver.BhyveDriver(None)
    for name, group in (('instances_path', None), ('hypervisor', 'bhyve'),
                        ('qemu_binary', 'bhyve')):
        CONF.clear_override(name, group=group)


@pytest.mark.parametrize('asked,why', [('pc-q35-99.0', 'unknown'),
                                       ('pc', 'not a q35 machine')])
def test_spawn_refuses_the_image_before_making_anything(qemu_driver, asked,
                                                        why):
    meta = objects.ImageMeta.from_dict({
        'id': 'c0ffee00-0000-4000-8000-000000000001', 'disk_format': 'raw',
        'properties': {'hw_machine_type': asked}})
    with fake_execute.patch(out=HELP_72, only='/q'):
        with pytest.raises(exception.ImageUnacceptable, match=why):
            qemu_driver.spawn(None, _instance(), meta, [], None, {},
                              network_info=[])
    assert not os.path.exists(qemu_driver.store.vmdir_for(UUID).path)


def test_the_machine_is_recorded_in_the_image_metadata():
    inst = _instance()
    driver._record_machine(inst, 'pc-q35-7.2')
    assert inst.system_metadata['image_hw_machine_type'] == 'pc-q35-7.2'
    assert inst.image_meta.properties.hw_machine_type == 'pc-q35-7.2'
    driver._record_machine(inst, None)              # bhyve: nothing
    assert inst.system_metadata == {'image_hw_machine_type': 'pc-q35-7.2'}
