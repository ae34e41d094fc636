"""Warm migration: the warm/cold decision, the restore fallback, and the
whole flow on the bhyve backend.

QEMU runs warm migrations for real in tests/functional/
test_warm_migration.py. bhyve cannot run here: its boundary is faked as in
test_move_rescue.py - ``processutils.execute`` for bhyvectl (argv pinned; it
writes the state files bhyve would), ``supervisor.spawn`` for bhyve itself,
the pids of the processes that would run. Directories, disks and the
driver code are real.
"""
import errno
import json
import os
import signal
from unittest import mock

from nova import exception
from nova import objects
from nova.compute import power_state
from oslo_concurrency import processutils
from oslo_utils import units
import pytest

from nova_bhyve import conf
from nova_bhyve import guest
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.bhyve import backend as bhyve
from nova_bhyve.hypervisor.bhyve import state as bhyve_state
from nova_bhyve.migration import cold as cold_migration
from nova_bhyve.migration import resize
from nova_bhyve.migration import warm as warm_migration
from nova_bhyve.storage import vdsk

import fake_execute
from test_move_rescue import _driver
from test_move_rescue import _image_meta
from test_move_rescue import _instance
from test_move_rescue import _spawned
from test_move_rescue import bhyve_env  # noqa: F401  (a fixture)
from test_move_rescue import UUID

CONF = conf.CONF


@pytest.fixture
def warm_on():
    CONF.set_override('warm_migration', True, group='bhyve')
    # a jailed bhyve cannot be saved (test_bhyve_sandbox.py): outside one
    CONF.set_override('sandbox_jail', False, group='bhyve')
    yield
    CONF.clear_override('warm_migration', group='bhyve')
    CONF.clear_override('sandbox_jail', group='bhyve')


def _flavor(vcpus=1, memory_mb=256, root_gb=1):
    return objects.Flavor(name='f', vcpus=vcpus, memory_mb=memory_mb,
                          root_gb=root_gb, ephemeral_gb=0, swap=0,
                          extra_specs={})


def _spec(tmp_path, disks=('disk',), vcpus=1, memory_mb=256):
    return guest.VMSpec(
        uuid=UUID, name='instance-0000002a', vcpus=vcpus,
        memory_mb=memory_mb,
        disks=[guest.Disk(path=str(tmp_path / d), format='raw')
               for d in disks])


def _bhyve(snapshot=True, state=power_state.RUNNING):
    hv = bhyve.BhyveHypervisor()
    hv._snapshot_support = snapshot
    hv.power_state = mock.Mock(return_value=state)
    return hv


# -- the decision -----------------------------------------------------------

@pytest.mark.parametrize('kw, hv_kw, flavor_kw, why', [
    ({}, {}, {'memory_mb': 512}, 'changes vCPUs/memory (1/256 MiB -> '
                                 '1/512 MiB)'),
    ({}, {}, {'vcpus': 2}, 'changes vCPUs/memory'),
    ({}, {'snapshot': False}, {}, 'bhyve cannot save VM state'),
    ({}, {'state': power_state.SHUTDOWN}, {}, 'not running'),
    ({'disks': ('disk', 'disk.config')}, {}, {}, 'does not rebuild'),
])
def test_cold_when_the_state_cannot_follow(tmp_path, warm_on, kw, hv_kw,
                                           flavor_kw, why):
    mode = warm_migration.choose(_bhyve(**hv_kw), base.VMDir(str(tmp_path)),
                                 _spec(tmp_path, **kw), _flavor(**flavor_kw),
                                 ['disk'])
    assert not mode.warm
    assert why in mode.reason


def test_warm_for_same_cpus_and_memory_even_with_a_bigger_disk(tmp_path,
                                                                warm_on):
    mode = warm_migration.choose(_bhyve(), base.VMDir(str(tmp_path)),
                                 _spec(tmp_path), _flavor(root_gb=20),
                                 ['disk'])
    assert mode.warm


def test_cold_by_default(tmp_path):
    mode = warm_migration.choose(_bhyve(), base.VMDir(str(tmp_path)),
                                 _spec(tmp_path), _flavor(), ['disk'])
    assert (mode.mode, mode.reason) == (warm_migration.COLD,
                                        '[bhyve] warm_migration is off')


def test_restore_refuses_another_machine_and_discards_the_state(tmp_path):
    vmdir = base.VMDir(str(tmp_path))
    hv = _bhyve()
    for p in bhyve_state.files(vmdir.saved_state):
        open(p, 'w').close()
    saved = warm_migration.signature(_spec(tmp_path))
    with mock.patch.object(hv, 'restore') as restore:
        assert not warm_migration.restore(
            hv, _spec(tmp_path, memory_mb=512), vmdir, None, 'b',
            mock.Mock(uuid=UUID), expected_signature=saved)
    assert restore.call_count == 0
    assert os.listdir(str(tmp_path)) == []


def test_signature_ignores_paths_but_not_devices(tmp_path):
    a = _spec(tmp_path)
    b = _spec(tmp_path / 'elsewhere')
    assert warm_migration.signature(a) == warm_migration.signature(b)
    b.disks[0].bus = 'sata'
    assert warm_migration.signature(a) != warm_migration.signature(b)


# -- bhyve: bhyvectl --suspend on the source, bhyve -r on the destination --

def _suspending_bhyve(hv, vmdir):
    """Fakes for the source's running bhyve: bhyvectl --suspend=FILE writes
    FILE, FILE.kern, FILE.meta (as a BHYVE_SNAPSHOT bhyve does) and the VM
    process is gone afterwards."""
    running = [True]

    def bhyvectl(argv):
        if any(a.startswith('--suspend=') for a in argv):
            partial = argv[-1].split('=', 1)[1]
            for p in bhyve_state.files(partial):
                with open(p, 'wb') as f:
                    f.write(b'state of ' + os.path.basename(p).encode())
            running[0] = False
        return 0, '', ''

    return [fake_execute.patch(bhyvectl, only=CONF.bhyve.bhyvectl_path),
            mock.patch.object(hv, 'pid', side_effect=lambda v: 77
                              if running[0] else None),
            mock.patch.object(hv, 'power_state', side_effect=lambda v:
                              power_state.RUNNING if running[0]
                              else power_state.SUSPENDED),
            mock.patch.object(hv, 'supervisor_pid', return_value=66),
            mock.patch.object(hv, 'vmm_exists', return_value=False),
            mock.patch.object(bhyve_state.os, 'kill'),
            mock.patch.object(bhyve_state.base, 'wait_for_exit',
                              return_value=True)]


def test_bhyve_warm_resize_then_revert(bhyve_env, warm_on):
    src = _driver(bhyve_env / 'a', 'a')
    dst = _driver(bhyve_env / 'b', 'b')
    src.hypervisor._snapshot_support = dst.hypervisor._snapshot_support = True
    inst = _instance()
    vmdir = _spawned(src, inst)
    with open(vmdir.console_log, 'w') as f:
        f.write('guest console so far\n')
    patches = _suspending_bhyve(src.hypervisor, vmdir)
    for p in patches:
        p.start()
    try:
        with mock.patch.object(resize, '_dest_compute',
                               return_value='b'):
            info = src.migrate_disk_and_power_off(
                None, inst, CONF.my_ip, _instance(2).flavor, None,
                timeout=1, retry_interval=1)
        argvs = fake_execute.argvs(processutils.execute)
        partial = bhyve_state.partial_path(vmdir.saved_state)
        # suspended, not powered off: no ACPI, no --force-poweroff
        assert argvs[0] == [CONF.bhyve.bhyvectl_path,
                            '--vm=instance-0000002a',
                            '--suspend=%s' % partial]
        bhyve_state.os.kill.assert_any_call(66, signal.SIGUSR1)
    finally:
        for p in patches:
            p.stop()
    warm = json.loads(info)['warm']
    assert warm['files'] == ['suspended.state', 'suspended.state.kern',
                             'suspended.state.meta', 'console.log']
    assert warm['signature']['memory_mb'] == 256
    new = dst.store.vmdir_for(UUID)
    kept = vmdir.path + '_resize'
    for name in warm['files']:     # moved, and kept on the source
        assert open(os.path.join(new.path, name), 'rb').read() == \
            open(os.path.join(kept, name), 'rb').read()

    inst.flavor = _instance(2).flavor
    with mock.patch.object(bhyve.supervisor, 'spawn') as spawn, \
            mock.patch.object(bhyve.BhyveHypervisor, 'vmm_exists',
                              return_value=False), \
            mock.patch.object(bhyve_state, 'wait_started',
                              return_value=True), \
            mock.patch.object(warm_migration.LOG, 'info') as info_log:
        dst.finish_migration(None, None, inst, info, None, _image_meta(),
                             True, {}, power_on=True)
    # resumed with bhyve -r on the destination's own config, not booted
    assert spawn.call_count == 1
    assert spawn.call_args[0][1] == [
        CONF.bhyve.bhyve_path, '-k', os.path.join(new.path, 'bhyve.conf')]
    assert spawn.call_args[1]['first_run_args'] == ['-r', new.saved_state]
    assert not any(os.path.exists(p)
                   for p in bhyve_state.files(new.saved_state))
    # the disk grew under the state; bhyve cannot tell the running guest
    assert vdsk.info(new.disk('disk'))['virtual_size'] == 2 * units.Gi
    assert any('at its next boot' in c.args[0]
               for c in info_log.call_args_list)

    # revert: the destination goes, the source resumes its kept state
    with mock.patch.object(dst.hypervisor, 'kill'):
        dst.destroy(None, inst, None)
    inst.flavor = _instance(1).flavor
    with mock.patch.object(bhyve.supervisor, 'spawn') as spawn, \
            mock.patch.object(bhyve.BhyveHypervisor, 'vmm_exists',
                              return_value=False), \
            mock.patch.object(bhyve.BhyveHypervisor, 'is_running',
                              return_value=False), \
            mock.patch.object(bhyve_state, 'wait_started',
                              return_value=True):
        src.finish_revert_migration(None, inst, None, None, power_on=True)
    assert spawn.call_args[1]['first_run_args'] == ['-r', vmdir.saved_state]
    assert vdsk.info(vmdir.disk('disk'))['virtual_size'] == 1 * units.Gi
    assert not os.path.exists(kept)


def test_bhyve_without_snapshot_support_migrates_cold(bhyve_env, warm_on):
    src = _driver(bhyve_env / 'a', 'a')
    src.hypervisor._snapshot_support = False
    inst = _instance()
    _spawned(src, inst)
    with mock.patch.object(resize, '_dest_compute',
                           return_value='b'), \
            mock.patch.object(bhyve.BhyveHypervisor, 'power_state',
                              return_value=power_state.RUNNING), \
            mock.patch.object(bhyve.BhyveHypervisor, 'vmm_exists',
                              return_value=True), \
            fake_execute.patch(only=CONF.bhyve.bhyvectl_path) as execute:
        info = src.migrate_disk_and_power_off(
            None, inst, CONF.my_ip, _instance(2).flavor, None)
    assert 'warm' not in json.loads(info)
    assert [argv[-1] for argv in fake_execute.argvs(execute)
            if argv[0] == CONF.bhyve.bhyvectl_path] == ['--destroy']


def test_bhyve_failed_copy_resumes_the_guest_on_the_source(bhyve_env,
                                                           warm_on):
    src = _driver(bhyve_env / 'a', 'a')
    _driver(bhyve_env / 'b', 'b')
    src.hypervisor._snapshot_support = True
    inst = _instance()
    vmdir = _spawned(src, inst)
    patches = _suspending_bhyve(src.hypervisor, vmdir)
    for p in patches:
        p.start()

    def no_space(self_, src_path, dst_path):      # fault: destination full
        raise OSError(errno.ENOSPC, 'No space left on device', dst_path)

    try:
        with mock.patch.object(resize, '_dest_compute',
                               return_value='b'), \
                mock.patch.object(cold_migration.LocalCopier, 'copy',
                                  no_space), \
                mock.patch.object(bhyve.supervisor, 'spawn') as spawn, \
                mock.patch.object(bhyve_state, 'wait_started',
                                  return_value=True), \
                pytest.raises(exception.InstanceFaultRollback):
            src.migrate_disk_and_power_off(
                None, inst, CONF.my_ip, _instance(2).flavor, None)
    finally:
        for p in patches:
            p.stop()
    # resumed from the state just saved, not booted; nothing left behind
    assert spawn.call_args[1]['first_run_args'] == ['-r', vmdir.saved_state]
    assert not os.path.exists(vmdir.path + '_resize')
    assert not os.path.exists(str(bhyve_env / 'b' / UUID))
    assert not os.path.exists(vmdir.saved_state)
