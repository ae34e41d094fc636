"""driver.py helpers: console log rotation, the refusal (InvalidInput, so
Nova aborts the build instead of rescheduling) of what the driver
cannot attach yet, and the capabilities it claims. Real files, real Nova
network-model and block-device-info structures; nothing mocked."""
import os
import shutil
import tempfile

from nova import exception
from nova import objects
from nova.network import model as network_model
from nova.virt import driver as nova_driver
import pytest

from nova_bhyve import driver
from nova_bhyve.devices import consoles
from nova_bhyve.devices import volumes

objects.register_all()
UUID = '6d5ba3a0-55a1-4c7c-9a43-3d1b0f6a2b11'


@pytest.fixture
def tmp_dir():
    path = tempfile.mkdtemp(prefix='nb-drv-')
    yield path
    shutil.rmtree(path)


# -- consoles.rotate_log --

def _write(path, data):
    with open(path, 'wb') as f:
        f.write(data)


def _read(path):
    with open(path, 'rb') as f:
        return f.read()


def test_rotate_missing_log_creates_nothing(tmp_dir):
    path = os.path.join(tmp_dir, 'console.log')
    consoles.rotate_log(path, 4096)
    assert not os.path.exists(path)


@pytest.mark.parametrize('size', [0, 1, 4095, 4096])
def test_rotate_small_log_untouched(tmp_dir, size):
    path = os.path.join(tmp_dir, 'console.log')
    data = bytes(i % 251 for i in range(size))
    _write(path, data)
    before = os.stat(path)
    consoles.rotate_log(path, 4096)
    assert _read(path) == data
    assert os.stat(path).st_ino == before.st_ino


@pytest.mark.parametrize('size', [4097, 3 * 4096 + 17, 1 << 20])
def test_rotate_keeps_tail(tmp_dir, size):
    path = os.path.join(tmp_dir, 'console.log')
    data = bytes(i % 251 for i in range(size))
    _write(path, data)
    consoles.rotate_log(path, 4096)
    assert _read(path) == data[-4096:]


def test_rotate_twice_is_stable(tmp_dir):
    path = os.path.join(tmp_dir, 'console.log')
    _write(path, b'a' * 5000 + b'tail-marker')
    consoles.rotate_log(path, 100)
    first = _read(path)
    consoles.rotate_log(path, 100)
    assert _read(path) == first
    assert len(first) == 100 and first.endswith(b'tail-marker')


# -- volumes.refuse_at_boot --

def instance():
    return objects.Instance(uuid=UUID, id=42)


def bdi(**kw):
    info = {'root_device_name': '/dev/vda', 'ephemerals': [],
            'block_device_mapping': [], 'swap': None}
    info.update(kw)
    return info


@pytest.mark.parametrize('network_info,block_device_info', [
    (None, None),
    (network_model.NetworkInfo([]), None),
    ([], bdi()),
    (None, {}),
    (None, bdi(swap={'device_name': None, 'swap_size': 0})),
])
def test_refuse_unsupported_accepts_plain_instance(network_info,
                                                   block_device_info):
    assert volumes.refuse_at_boot(block_device_info) is None


def test_refuse_volumes():
    volume = {'connection_info': {'driver_volume_type': 'iscsi'},
              'mount_device': '/dev/vdb', 'delete_on_termination': False}
    with pytest.raises(exception.InvalidInput) as e:
        volumes.refuse_at_boot(bdi(block_device_mapping=[volume]))
    assert 'volumes are not supported' in str(e.value)


def test_refuse_ephemerals():
    eph = {'num': 0, 'size': 1, 'device_name': '/dev/vdb',
           'guest_format': None, 'disk_bus': 'virtio', 'device_type': 'disk'}
    with pytest.raises(exception.InvalidInput) as e:
        volumes.refuse_at_boot(bdi(ephemerals=[eph]))
    assert 'ephemeral and swap disks are not supported' in str(e.value)


def test_refuse_swap():
    with pytest.raises(exception.InvalidInput) as e:
        volumes.refuse_at_boot(
            bdi(swap={'device_name': '/dev/vdc', 'swap_size': 512}))
    assert 'ephemeral and swap disks are not supported' in str(e.value)


# -- capabilities -------------------------------------------------------------

def test_capabilities_has_every_nova_key():
    caps = driver.BhyveDriver.capabilities
    missing = set(nova_driver.ComputeDriver.capabilities) - set(caps)
    assert not missing
    assert all(isinstance(v, bool) for v in caps.values())


def test_capabilities_claim_the_image_formats_libvdsk_reads():
    caps = driver.BhyveDriver.capabilities
    image_types = {k[len('supports_image_type_'):]
                   for k, v in caps.items()
                   if k.startswith('supports_image_type_') and v}
    assert image_types == {'raw', 'qcow2', 'vmdk', 'vdi', 'vhd'}
    # every image type nova knows is stated, not left implicit
    nova_types = {k for k in nova_driver.ComputeDriver.capabilities
                  if k.startswith('supports_image_type_')}
    assert {'supports_image_type_iso', 'supports_image_type_vmdk',
            'supports_image_type_aki'} <= nova_types
    assert nova_types <= set(caps)


def test_capabilities_do_not_alter_nova_defaults():
    assert nova_driver.ComputeDriver.capabilities[
        'supports_image_type_qcow2'] is False
    assert driver.BhyveDriver.capabilities is not \
        nova_driver.ComputeDriver.capabilities
