"""guest.py: the VM spec built from real Nova objects (no mocks), flavor and
image checks, and the JSON round trip used to adopt VMs after a restart."""
import json

from nova import exception
from nova import objects
import pytest

from nova_bhyve import guest

objects.register_all()

UUID = '6d5ba3a0-55a1-4c7c-9a43-3d1b0f6a2b11'
IMAGE_ID = '0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0'


def flavor(vcpus=2, memory_mb=512, root_gb=1, name='m1.test'):
    return objects.Flavor(vcpus=vcpus, memory_mb=memory_mb, root_gb=root_gb,
                          ephemeral_gb=0, swap=0, name=name)


def instance(**flavor_kw):
    # instance.name comes from CONF.instance_name_template and the id.
    return objects.Instance(uuid=UUID, id=42, flavor=flavor(**flavor_kw))


def image_meta(properties=None, with_id=True):
    d = {'properties': properties or {}, 'disk_format': 'qcow2'}
    if with_id:
        d['id'] = IMAGE_ID
    return objects.ImageMeta.from_dict(d)


def root(path='/var/lib/nova/instances/x/disk'):
    return guest.Disk(path=path, format='qcow2')


# -- build ------------------------------------------------------------------

def test_build_firmware_boot_defaults():
    spec = guest.build(instance(), image_meta(), root())
    assert spec == guest.VMSpec(
        uuid=UUID, name='instance-0000002a', vcpus=2, memory_mb=512,
        disks=[guest.Disk(path='/var/lib/nova/instances/x/disk',
                          format='qcow2', bus='virtio', device='disk',
                          readonly=False)],
        nics=[], boot=guest.Boot(kernel=None, ramdisk=None, cmdline=None))


def test_build_takes_flavor_sizes():
    spec = guest.build(instance(vcpus=7, memory_mb=3072), image_meta(),
                       root())
    assert (spec.vcpus, spec.memory_mb) == (7, 3072)


def test_build_direct_kernel_boot_default_cmdline():
    spec = guest.build(instance(), image_meta(), root(), kernel='/k/vmlinuz',
                       ramdisk='/k/initrd')
    assert spec.boot == guest.Boot(kernel='/k/vmlinuz', ramdisk='/k/initrd',
                                   cmdline='console=ttyS0')


def test_build_direct_kernel_boot_cmdline_from_image():
    meta = image_meta({'os_command_line': 'root=/dev/vda console=ttyS0 rw'})
    spec = guest.build(instance(), meta, root(), kernel='/k/vmlinuz')
    assert spec.boot == guest.Boot(kernel='/k/vmlinuz', ramdisk=None,
                                   cmdline='root=/dev/vda console=ttyS0 rw')


def test_build_ramdisk_without_kernel_refused():
    with pytest.raises(exception.ImageUnacceptable) as e:
        guest.build(instance(), image_meta(), root(), ramdisk='/k/initrd')
    assert 'ramdisk_id needs a kernel_id' in str(e.value)
    assert IMAGE_ID in str(e.value)


def test_build_sets_root_disk_bus_from_image():
    spec = guest.build(instance(), image_meta({'hw_disk_bus': 'sata'}),
                       root())
    assert [d.bus for d in spec.disks] == ['sata']


def test_build_passes_nics_as_list():
    nic = guest.Nic(mac='fa:16:3e:00:00:01', ifname='tap0', mtu=1450)
    spec = guest.build(instance(), image_meta(), root(), nics=(nic,))
    assert spec.nics == [nic]


def test_build_validates_flavor_first():
    with pytest.raises(exception.InvalidInput):
        guest.build(instance(memory_mb=16), image_meta(), root())


# -- validate_flavor --------------------------------------------------------

@pytest.mark.parametrize('vcpus,memory_mb', [(1, 32), (64, 32), (2, 4096)])
def test_validate_flavor_accepts(vcpus, memory_mb):
    assert guest.validate_flavor(flavor(vcpus, memory_mb)) is None


@pytest.mark.parametrize('vcpus,memory_mb,words', [
    (0, 512, '0 vCPUs is outside 1..64'),
    (65, 512, '65 vCPUs is outside 1..64'),
    (2, 31, '31 MiB of memory is below the minimum of 32 MiB'),
])
def test_validate_flavor_refuses(vcpus, memory_mb, words):
    with pytest.raises(exception.InvalidInput) as e:
        guest.validate_flavor(flavor(vcpus, memory_mb, name='tiny'))
    assert words in str(e.value)
    assert 'flavor tiny' in str(e.value)


# -- validate_flavor_fits_host ----------------------------------------------

@pytest.mark.parametrize('vcpus,memory_mb', [(1, 32), (4, 8192), (3, 100)])
def test_flavor_fits_host_up_to_its_size(vcpus, memory_mb):
    assert guest.validate_flavor_fits_host(flavor(vcpus, memory_mb),
                                           4, 8192) is None


@pytest.mark.parametrize('vcpus,memory_mb,words', [
    (5, 512, '5 vCPUs, but this host has only 4 CPUs'),
    (1, 8193, '8193 MiB of memory, but this host has only 8192 MiB'),
    (5, 9000, '5 vCPUs, but this host has only 4 CPUs'),
])
def test_flavor_larger_than_host_refused(vcpus, memory_mb, words):
    with pytest.raises(exception.InvalidInput) as e:
        guest.validate_flavor_fits_host(flavor(vcpus, memory_mb, name='big'),
                                        4, 8192)
    assert words in str(e.value)
    assert 'flavor big' in str(e.value)


# -- disk_bus ---------------------------------------------------------------

def test_disk_bus_default_virtio():
    assert guest.disk_bus(image_meta()) == 'virtio'


@pytest.mark.parametrize('bus', ['virtio', 'sata', 'ide'])
def test_disk_bus_supported(bus):
    assert guest.disk_bus(image_meta({'hw_disk_bus': bus})) == bus


@pytest.mark.parametrize('bus', ['scsi', 'usb', 'xen', 'fdc'])
def test_disk_bus_unsupported(bus):
    with pytest.raises(exception.ImageUnacceptable) as e:
        guest.disk_bus(image_meta({'hw_disk_bus': bus}))
    assert 'hw_disk_bus=%s is not supported' % bus in str(e.value)
    assert IMAGE_ID in str(e.value)


def test_disk_bus_unsupported_image_without_id():
    with pytest.raises(exception.ImageUnacceptable) as e:
        guest.disk_bus(image_meta({'hw_disk_bus': 'scsi'}, with_id=False))
    assert 'hw_disk_bus=scsi' in str(e.value)


# -- JSON round trip ---------------------------------------------------------

def full_spec():
    return guest.VMSpec(
        uuid=UUID, name='instance-0000002a', vcpus=3, memory_mb=768,
        disks=[guest.Disk(path='/i/disk', format='qcow2', bus='virtio'),
               guest.Disk(path='/i/config,drive', format='raw', bus='sata',
                          device='cdrom', readonly=True)],
        nics=[guest.Nic(mac='fa:16:3e:00:00:01', ifname='tap0', mtu=9000),
              guest.Nic(mac='fa:16:3e:00:00:02', ifname='tap1',
                        model='e1000')],
        boot=guest.Boot(kernel='/k/vmlinuz', ramdisk='/k/initrd',
                        cmdline='console=ttyS0 root=/dev/vda'))


def test_json_round_trip_full():
    spec = full_spec()
    back = guest.VMSpec.from_json(spec.to_json())
    assert back == spec
    assert isinstance(back.disks[1], guest.Disk)
    assert isinstance(back.nics[0], guest.Nic)
    assert isinstance(back.boot, guest.Boot)


def test_json_round_trip_minimal():
    spec = guest.VMSpec(uuid=UUID, name='n', vcpus=1, memory_mb=32)
    assert guest.VMSpec.from_json(spec.to_json()) == spec


def test_json_is_plain_data():
    data = json.loads(full_spec().to_json())
    assert data['disks'][1] == {'path': '/i/config,drive', 'format': 'raw',
                                'bus': 'sata', 'device': 'cdrom',
                                'readonly': True, 'serial': None}
    assert data['boot']['kernel'] == '/k/vmlinuz'
    assert data['nics'][0]['mtu'] == 9000
    assert data['consoles'] == {'serial_host': None, 'serial_port': None,
                                'vnc_host': None, 'vnc_port': None}
    assert data['hotplug_ports'] == 0


def test_from_json_of_a_spec_written_before_consoles_and_volumes():
    # specs saved by an older nova-bhyve (adopted VMs) still load
    text = json.dumps({'uuid': UUID, 'name': 'n', 'vcpus': 1,
                       'memory_mb': 64,
                       'disks': [{'path': '/d', 'format': 'raw',
                                  'bus': 'virtio', 'device': 'disk',
                                  'readonly': False}]})
    spec = guest.VMSpec.from_json(text)
    assert spec.disks[0].serial is None
    assert spec.consoles == guest.Consoles()
    assert spec.hotplug_ports == 0
    assert guest.VMSpec.from_json(spec.to_json()) == spec


def test_from_json_tolerates_missing_lists_and_null_boot():
    text = json.dumps({'uuid': UUID, 'name': 'n', 'vcpus': 1,
                       'memory_mb': 64, 'boot': None})
    spec = guest.VMSpec.from_json(text)
    assert spec == guest.VMSpec(uuid=UUID, name='n', vcpus=1, memory_mb=64)


def test_from_json_rejects_unknown_keys():
    text = json.dumps({'uuid': UUID, 'name': 'n', 'vcpus': 1,
                       'memory_mb': 64, 'bogus': 1})
    with pytest.raises(TypeError):
        guest.VMSpec.from_json(text)


def test_build_keeps_the_flavor_cpu_quota_specs_only():
    inst = instance()
    inst.flavor.extra_specs = {'quota:cpu_shares': '512',
                               'quota:cpu_quota': 20000,
                               'hw:cpu_policy': 'shared'}
    spec = guest.build(inst, image_meta(), root())
    assert spec.cpu_quota == {'quota:cpu_shares': '512',
                              'quota:cpu_quota': '20000'}
    assert guest.VMSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize('specs,words', [
    ({'quota:cpu_shares': 'lots'}, 'not an integer'),
    ({'quota:cpu_period': '10'}, '1000-1000000'),
    ({'quota:cpu_quota': '5'}, '>= 1000'),
])
def test_build_refuses_cpu_quota_specs_no_cgroup_takes(specs, words):
    inst = instance()
    inst.flavor.extra_specs = specs
    with pytest.raises(exception.InvalidInput, match='m1.test: .*' + words):
        guest.build(inst, image_meta(), root())
