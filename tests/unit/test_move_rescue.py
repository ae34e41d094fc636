"""Cold migration file moves, disk growth/rebase, and the driver's resize,
revert, confirm, rescue and unrescue on the bhyve backend.

The QEMU backend runs all of these for real in tests/functional
(test_resize_migrate.py, test_rescue.py). bhyve cannot run here, so the same
driver code is driven with the bhyve backend and only its boundary is
faked: ``supervisor.spawn`` (would start bhyve) and ``processutils.execute``
for bhyvectl (fake_execute.py), whose argv is pinned. Disks and directories
are real files; disk images are made and read with the real libvdsk (and
qemu-img as the oracle).
"""
import json
import os
import subprocess
from unittest import mock

from nova import exception
from nova import objects
from oslo_concurrency import processutils
from oslo_utils import units
import pytest

from nova_bhyve import conf
from nova_bhyve import driver
from nova_bhyve import instance_store
from nova_bhyve import rescue
from nova_bhyve.hypervisor.bhyve import backend as bhyve
from nova_bhyve.hypervisor.bhyve import config as bhyve_config
from nova_bhyve.migration import cold as cold_migration
from nova_bhyve.migration import resize
from nova_bhyve.storage import disks
from nova_bhyve.storage import image_cache as storage
from nova_bhyve.storage import vdsk

import fake_execute

objects.register_all()
CONF = conf.CONF
UUID = '6d5ba3a0-55a1-4c7c-9a43-3d1b0f6a2b11'


# -- cold_migration: files --------------------------------------------------

def test_copy_sparse_keeps_holes_and_data(tmp_path):
    src = tmp_path / 'src'
    with open(src, 'wb') as f:
        f.write(b'head')
        f.seek(8 * units.Mi)
        f.write(b'middle')
        f.truncate(32 * units.Mi)            # trailing hole
    dst = tmp_path / 'dst'
    cold_migration.copy_sparse(str(src), str(dst))
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_blocks * 512 < 4 * units.Mi


def _instance_dir(root, uuid=UUID, files=('disk', 'spec.json', 'bhyve.conf')):
    path = os.path.join(root, uuid)
    os.makedirs(path)
    for name in files:
        with open(os.path.join(path, name), 'wb') as f:
            f.write(name.encode() * 100)
    return path


def test_move_out_keeps_source_and_copies_disks_only(tmp_path):
    src = _instance_dir(str(tmp_path / 'a'))
    target = str(tmp_path / 'b' / UUID)
    info = json.loads(cold_migration.move_out(
        src, target, ['disk'], cold_migration.LocalCopier()))
    kept = src + '_resize'
    assert info == {'source_dir': kept, 'target_dir': target,
                    'disks': ['disk']}
    assert not os.path.exists(src)
    assert sorted(os.listdir(kept)) == ['bhyve.conf', 'disk', 'spec.json']
    assert os.listdir(target) == ['disk']
    # revert puts it back; confirm removes it
    assert cold_migration.restore_kept(src)
    assert sorted(os.listdir(src)) == ['bhyve.conf', 'disk', 'spec.json']
    assert not cold_migration.discard_kept(src)


class _FailingCopier(cold_migration.LocalCopier):
    def copy(self, src, dst):
        with open(dst, 'wb') as f:
            f.write(b'partial')
        raise OSError(28, 'No space left on device', dst)


def test_move_out_failure_restores_source_and_cleans_target(tmp_path):
    src = _instance_dir(str(tmp_path / 'a'))
    before = {n: open(os.path.join(src, n), 'rb').read()
              for n in os.listdir(src)}
    target = str(tmp_path / 'b' / UUID)
    with pytest.raises(cold_migration.MigrationCopyError,
                       match='no space left on the destination'):
        cold_migration.move_out(src, target, ['disk'], _FailingCopier())
    assert not os.path.exists(target)
    assert not os.path.exists(src + '_resize')
    assert {n: open(os.path.join(src, n), 'rb').read()
            for n in os.listdir(src)} == before


def test_move_out_refuses_a_destination_with_an_instance(tmp_path):
    src = _instance_dir(str(tmp_path / 'a'))
    other = _instance_dir(str(tmp_path / 'b'))
    with pytest.raises(cold_migration.MigrationCopyError,
                       match='already has an instance'):
        cold_migration.move_out(src, other, ['disk'],
                                cold_migration.LocalCopier())
    assert os.path.exists(os.path.join(other, 'spec.json'))
    assert os.path.exists(os.path.join(src, 'disk'))


def test_remote_copier_argv_rsync_and_scp():
    calls = []

    def execute(*argv, **kw):
        calls.append(list(argv))
        return 'yes\n', ''

    with mock.patch.object(processutils, 'execute', execute), \
            mock.patch('shutil.which', return_value='/usr/bin/rsync'):
        c = cold_migration.RemoteCopier('10.0.0.2')
        c.mkdir('/var/lib/nova/instances/u u')
        c.copy('/var/lib/nova/instances/u_resize/disk',
               '/var/lib/nova/instances/u/disk')
        assert c.exists('/x')
        c.remove('/var/lib/nova/instances/u')
    with mock.patch.object(processutils, 'execute', execute), \
            mock.patch('shutil.which', return_value=None):
        cold_migration.RemoteCopier('10.0.0.2').copy('/a/disk', '/b/disk')
    ssh = ['ssh', '-o', 'BatchMode=yes', '10.0.0.2']
    assert calls == [
        ssh + ["mkdir -p '/var/lib/nova/instances/u u'"],
        ['rsync', '--sparse', '--compress', '--timeout=300',
         '/var/lib/nova/instances/u_resize/disk',
         '10.0.0.2:/var/lib/nova/instances/u/disk'],
        ssh + ['test -e /x && echo yes || true'],
        ssh + ['rm -rf /var/lib/nova/instances/u'],
        ['scp', '-B', '/a/disk', '10.0.0.2:/b/disk'],
    ]


def test_local_or_remote_and_target_path():
    cold_migration.register_compute('inproc', '/srv/inproc')
    assert cold_migration.is_local('192.0.2.9', 'inproc')
    assert cold_migration.is_local(CONF.my_ip, 'elsewhere')
    assert not cold_migration.is_local('192.0.2.9', 'elsewhere')
    assert cold_migration.target_instances_path('inproc', '/own') == \
        '/srv/inproc'
    assert cold_migration.target_instances_path('elsewhere', '/own') == \
        '/own'


def test_a_compute_of_another_process_on_this_machine(runtime_path):
    # another nova-compute process of this machine (tools/cloud runs two)
    # recorded its instances path under [bhyve] runtime_path at start
    cold_migration.register_compute('peer', '/srv/peer')
    del cold_migration._LOCAL_COMPUTES['peer']       # not this process's
    with open(os.path.join(runtime_path, 'computes', 'peer')) as f:
        assert f.read() == '/srv/peer'
    assert cold_migration.target_instances_path('peer', '/own') == \
        '/srv/peer'
    # a host name is never taken as a path
    for name in ('../peer', '.hidden', ''):
        assert cold_migration.target_instances_path(name, '/own') == '/own'


# -- storage: grow and rebase moved disks ----------------------------------

def test_grow_raw_is_sparse_truncate(tmp_path):
    path = str(tmp_path / 'disk')
    vdsk.create(path, 'raw', 1 * units.Mi)
    assert disks.grow_disk(path, 3 * units.Mi) == 3 * units.Mi
    assert os.path.getsize(path) == 3 * units.Mi
    # never shrinks
    assert disks.grow_disk(path, 1 * units.Mi) == 3 * units.Mi


def test_grow_and_rebase_qcow2_overlay(tmp_path):
    base1 = str(tmp_path / 'base1')
    base2 = str(tmp_path / 'base2')
    for b in (base1, base2):
        vdsk.create(b, 'raw', 2 * units.Mi)
        with vdsk.open(b, fmt='raw') as img:
            img.write(0, b'same image data')
            img.flush()
    disk = str(tmp_path / 'disk')
    vdsk.create(disk, 'qcow2', 2 * units.Mi, backing=base1,
                backing_fmt='raw')
    assert disks.rebase_root_disk(disk, base2, 'raw')
    assert not disks.rebase_root_disk(disk, base2, 'raw')
    assert disks.grow_disk(disk, 5 * units.Mi) == 5 * units.Mi
    info = vdsk.info(disk)
    assert (info['backing_file'], info['backing_format']) == (base2, 'raw')
    # qemu-img agrees, and the data still reads through the new backing
    out = json.loads(subprocess.run(
        ['qemu-img', 'info', '--output=json', disk], check=True,
        capture_output=True, text=True).stdout)
    assert out['virtual-size'] == 5 * units.Mi
    with vdsk.open(disk, readonly=True) as img:
        assert img.read(0, 15) == b'same image data'


# -- the driver on the bhyve backend ------------------------------------------

@pytest.fixture
def bhyve_env(tmp_path):
    bootrom = tmp_path / 'BHYVE_UEFI.fd'
    bootrom.write_bytes(b'firmware')
    CONF.set_override('hypervisor', 'bhyve', group='bhyve')
    CONF.set_override('bhyve_bootrom', str(bootrom), group='bhyve')
    # no VNC: a started VM records its console ports in spec.json, and
    # these tests compare spec.json before and after
    CONF.set_override('enabled', False, group='vnc')
    # bhyve outside a jail: save/restore (warm migration) is refused in
    # one; the jailed start is pinned by test_bhyve_sandbox.py
    CONF.set_override('sandbox_jail', False, group='bhyve')
    yield tmp_path
    CONF.clear_override('sandbox_jail', group='bhyve')
    CONF.clear_override('enabled', group='vnc')
    CONF.clear_override('hypervisor', group='bhyve')
    CONF.clear_override('bhyve_bootrom', group='bhyve')
    CONF.clear_override('instances_path')


def _driver(path, host):
    CONF.set_override('instances_path', str(path))
    drv = driver.BhyveDriver(None)
    drv.host_name = host
    cold_migration.register_compute(host, str(path))
    return drv


def _instance(root_gb=1, kernel_id=None):
    flavor = objects.Flavor(name='f%d' % root_gb, vcpus=1, memory_mb=256,
                            root_gb=root_gb, ephemeral_gb=0, swap=0,
                            extra_specs={})
    return objects.Instance(uuid=UUID, id=42, flavor=flavor,
                            image_ref='img-1', kernel_id=kernel_id,
                            ramdisk_id=None, host='a', node='a',
                            config_drive='', launched_at=None,
                            system_metadata={})


def _image_meta():
    return objects.ImageMeta.from_dict({'id': 'img-1', 'disk_format': 'raw',
                                        'properties': {}})


def _spawned(drv, instance, size=1 * units.Gi):
    """An instance directory as spawn leaves it on bhyve: a raw disk and
    the spec (spawn itself is covered by the spawn tests)."""
    vmdir = drv.store.vmdir_for(instance.uuid)
    os.makedirs(vmdir.path)
    vdsk.create(vmdir.disk('disk'), 'raw', size)
    with vdsk.open(vmdir.disk('disk'), fmt='raw') as img:
        img.write(0, b'instance data')
        img.flush()
    root = driver.guest.Disk(path=vmdir.disk('disk'), format='raw')
    instance_store.write_spec(
        vmdir, driver.guest.build(instance, _image_meta(), root))
    return vmdir


def _bhyvectl_calls(execute):
    return [argv for argv in fake_execute.argvs(execute)
            if argv[0] == CONF.bhyve.bhyvectl_path]


def test_bhyve_resize_to_other_host_confirm(bhyve_env):
    src = _driver(bhyve_env / 'a', 'a')
    dst = _driver(bhyve_env / 'b', 'b')
    assert src.hypervisor.name == 'bhyve'
    inst = _instance()
    vmdir = _spawned(src, inst)
    spawns = []
    with mock.patch.object(resize, '_dest_compute',
                           return_value='b'), \
            mock.patch.object(bhyve.BhyveHypervisor, 'vmm_exists',
                              return_value=True), \
            fake_execute.patch(only=CONF.bhyve.bhyvectl_path) as execute, \
            mock.patch.object(bhyve.supervisor, 'spawn',
                              side_effect=lambda *a, **k: spawns.append(a)):
        info = src.migrate_disk_and_power_off(
            None, inst, CONF.my_ip, _instance(2).flavor, None,
            timeout=1, retry_interval=1)
        # power off released the vmm instance by name
        assert _bhyvectl_calls(execute) == [
            [CONF.bhyve.bhyvectl_path, '--vm=instance-0000002a',
             '--destroy']]
        inst.flavor = _instance(2).flavor
        dst.finish_migration(None, None, inst, info, None, _image_meta(),
                             True, {}, power_on=True)
    new = dst.store.vmdir_for(UUID)
    # the disk moved, grown (sparse, raw: bhyve has no qcow2) to 2 GiB
    assert vdsk.info(new.disk('disk')) ['virtual_size'] == 2 * units.Gi
    with vdsk.open(new.disk('disk'), readonly=True) as img:
        assert img.read(0, 13) == b'instance data'
    # bhyve is started on the destination's own paths
    assert spawns[0][0] == new.path
    assert spawns[0][1] == [CONF.bhyve.bhyve_path, '-k',
                            os.path.join(new.path, 'bhyve.conf')]
    tree = bhyve_config.parse_config(open(os.path.join(new.path,
                                                'bhyve.conf')).read())
    assert tree['pci.0.2.0.path'] == new.disk('disk')
    assert tree['memory.size'] == '256M'
    assert src.list_instance_uuids() == []
    assert os.path.isdir(vmdir.path + '_resize')
    src.confirm_migration(None, None, inst, None)
    assert os.listdir(str(bhyve_env / 'a')) == []


def test_bhyve_resize_revert_restores_the_source_exactly(bhyve_env):
    src = _driver(bhyve_env / 'a', 'a')
    dst = _driver(bhyve_env / 'b', 'b')
    inst = _instance()
    vmdir = _spawned(src, inst)
    before = {n: open(os.path.join(vmdir.path, n), 'rb').read()
              for n in os.listdir(vmdir.path)}
    with mock.patch.object(resize, '_dest_compute',
                           return_value='b'), \
            mock.patch.object(bhyve.BhyveHypervisor, 'vmm_exists',
                              return_value=False), \
            mock.patch.object(bhyve.supervisor, 'spawn') as spawn:
        info = src.migrate_disk_and_power_off(
            None, inst, CONF.my_ip, _instance(2).flavor, None)
        dst.finish_migration(None, None, inst, info, None, _image_meta(),
                             True, {}, power_on=False)
        dst.destroy(None, inst, None)
        src.finish_revert_migration(None, inst, None, None, power_on=False)
        assert spawn.call_count == 0
    assert os.listdir(str(bhyve_env / 'b')) == []
    after = {n: open(os.path.join(vmdir.path, n), 'rb').read()
             for n in os.listdir(vmdir.path)}
    assert set(after) >= set(before)
    assert all(after[n] == before[n] for n in before)
    assert src.list_instance_uuids() == [UUID]


def test_bhyve_resize_down_refused_before_power_off(bhyve_env):
    src = _driver(bhyve_env / 'a', 'a')
    inst = _instance(2)
    _spawned(src, inst, size=2 * units.Gi)
    with mock.patch.object(src.hypervisor, 'kill') as kill, \
            pytest.raises(exception.InstanceFaultRollback):
        src.migrate_disk_and_power_off(None, inst, CONF.my_ip,
                                       _instance(1).flavor, None)
    assert kill.call_count == 0
    assert src.list_instance_uuids() == [UUID]


def _fetch(drv, tmp_path, base_content=b'rescue image'):
    base = str(tmp_path / 'rescue-base')
    vdsk.create(base, 'raw', 4 * units.Mi)
    with vdsk.open(base, fmt='raw') as img:
        img.write(0, base_content)
        img.flush()
    return mock.patch.object(storage, 'fetch_image',
                             return_value=(base, 'raw'))


def test_bhyve_rescue_config_and_unrescue(bhyve_env):
    drv = _driver(bhyve_env / 'a', 'a')
    inst = _instance()
    vmdir = _spawned(drv, inst)
    spec_before = open(vmdir.spec).read()
    with _fetch(drv, bhyve_env), \
            mock.patch.object(driver.images, 'get_info',
                              return_value={'properties': {}}), \
            mock.patch.object(bhyve.BhyveHypervisor, 'vmm_exists',
                              return_value=False), \
            mock.patch.object(bhyve.supervisor, 'spawn') as spawn:
        drv.rescue(None, inst, None, _image_meta(), 'pw', None, None)
        tree = bhyve_config.parse_config(open(os.path.join(vmdir.path,
                                                    'bhyve.conf')).read())
        # the rescue disk first (UEFI boots it), the instance's disk next
        assert tree['pci.0.2.0.path'] == rescue.disk_path(vmdir)
        assert tree['pci.0.3.0.path'] == vmdir.disk('disk')
        assert vdsk.info(rescue.disk_path(vmdir))['format'] == 'raw'
        assert rescue.is_rescued(vmdir)
        drv.unrescue(None, inst)
        tree = bhyve_config.parse_config(open(os.path.join(vmdir.path,
                                                    'bhyve.conf')).read())
        assert tree['pci.0.2.0.path'] == vmdir.disk('disk')
        assert 'pci.0.3.0.path' not in tree
        assert spawn.call_count == 2
    assert open(vmdir.spec).read() == spec_before
    assert not os.path.exists(rescue.disk_path(vmdir))
    assert not rescue.is_rescued(vmdir)


def test_bhyve_rescue_with_kernel_image_refused_cleanly(bhyve_env):
    drv = _driver(bhyve_env / 'a', 'a')
    inst = _instance()
    vmdir = _spawned(drv, inst)
    with _fetch(drv, bhyve_env), \
            mock.patch.object(driver.images, 'get_info',
                              return_value={'properties': {
                                  'kernel_id': 'k-1'}}), \
            mock.patch.object(bhyve.BhyveHypervisor, 'vmm_exists',
                              return_value=False), \
            mock.patch.object(bhyve.supervisor, 'spawn') as spawn, \
            pytest.raises(exception.InstanceDeployFailure,
                          match='direct kernel boot'):
        drv.rescue(None, inst, None, _image_meta(), 'pw', None, None)
    assert spawn.call_count == 0
    assert not rescue.is_rescued(vmdir)
    assert not os.path.exists(rescue.disk_path(vmdir))


def test_capabilities_claim_move_operations():
    caps = driver.BhyveDriver.capabilities
    assert caps['supports_evacuate'] is True
    assert caps['supports_migrate_to_same_host'] is True


@pytest.mark.parametrize('allowed', [True, False])
def test_cold_migration_to_the_same_host_is_the_operators_choice(
        bhyve_env, allowed):
    CONF.set_override('cold_migrate_to_same_host', allowed, group='bhyve')
    try:
        drv = driver.BhyveDriver(None)
        assert drv.capabilities['supports_migrate_to_same_host'] is allowed
        # Nova turns the capability into the trait the API checks
        assert drv.capabilities_as_traits()[
            'COMPUTE_SAME_HOST_COLD_MIGRATE'] is allowed
    finally:
        CONF.clear_override('cold_migrate_to_same_host', group='bhyve')


def test_finish_migration_refuses_flavor_larger_than_this_host(bhyve_env):
    """The destination's own check (placement's inventory may have been
    wrong): InvalidInput before it writes a spec, plugs or starts anything;
    the moved disk is left as it came."""
    dst = _driver(bhyve_env / 'b', 'b')
    inst = _instance()
    vmdir = _spawned(dst, inst)          # the disk as moved here
    os.unlink(vmdir.spec)
    before = os.listdir(vmdir.path)
    inst.flavor.vcpus = driver.host.vcpus() + 1
    with mock.patch.object(dst.vifs, 'plug_all') as plug, \
            mock.patch.object(dst.hypervisor, 'start') as start:
        with pytest.raises(exception.InvalidInput) as e:
            dst.finish_migration(None, None, inst, None, [], _image_meta(),
                                 True, None)
    assert 'vCPUs, but this host has only' in str(e.value)
    assert not plug.called and not start.called
    assert sorted(before) == sorted(os.listdir(vmdir.path))


def test_volumes_follow_a_cold_migration(bhyve_env, tmp_path):
    """The destination connects the instance's volumes again (os-brick's
    local connector on a real file) and puts them in the new spec after
    the root disk; the source disconnects them; a revert connects them on
    the source again."""
    vol = tmp_path / 'vol.raw'
    vol.write_bytes(b'\0' * 1024 * 1024)
    vol_id = 'c0ffee00-0000-4000-8000-000000000001'
    conn = {'driver_volume_type': 'local',
            'data': {'device_path': str(vol), 'volume_id': vol_id},
            'serial': vol_id}
    bdi = {'block_device_mapping': [{'connection_info': conn,
                                     'mount_device': '/dev/vdb'}]}
    src = _driver(bhyve_env / 'a', 'a')
    dst = _driver(bhyve_env / 'b', 'b')
    inst = _instance()
    _spawned(src, inst)
    with mock.patch.object(resize, '_dest_compute',
                           return_value='b'), \
            mock.patch.object(bhyve.BhyveHypervisor, 'vmm_exists',
                              return_value=False), \
            mock.patch.object(bhyve.supervisor, 'spawn'), \
            mock.patch.object(driver.volumes, 'disconnect') as disconnect:
        info = src.migrate_disk_and_power_off(
            None, inst, CONF.my_ip, _instance(2).flavor, None,
            block_device_info=bdi)
        assert [c.args[0] for c in disconnect.call_args_list] == [conn]
        dst.finish_migration(None, None, inst, info, None, _image_meta(),
                             True, {}, block_device_info=bdi,
                             power_on=False)
    spec = instance_store.read_spec(dst.store.vmdir_for(UUID))
    assert [d.serial for d in spec.disks] == [None, vol_id]
    assert spec.disks[1].path == str(vol)
