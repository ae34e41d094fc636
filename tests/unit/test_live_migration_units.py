"""The pure parts of live migration: the incoming QEMU's command line, the
QMP sequences on both sides, the mapping of QEMU's counters onto progress,
the fallback convergence policy and the source's refusals.

The real migrations run in tests/functional/test_live_migration.py; here
nothing runs QEMU.
"""
import os
import shutil
import types

from nova import exception
from nova.objects import migrate_data as migrate_data_obj
import pytest

from nova_bhyve import guest
from nova_bhyve import instance_store
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import migration as qemu_migration
from nova_bhyve.migration import incoming
from nova_bhyve.migration import live as live_migration
from nova_bhyve.migration import runner

UUID = '6d5ba3a0-55a1-4c7c-9a43-3d1b0f6a2b11'


def spec():
    return guest.VMSpec(
        uuid=UUID, name='instance-1', vcpus=1, memory_mb=128,
        disks=[guest.Disk(path='/i/%s/disk' % UUID),
               guest.Disk(path='/i/%s/disk.config' % UUID, format='raw',
                          device='cdrom', readonly=True),
               guest.Disk(path='/dev/sdb', format='raw', serial='vol-1')])


def test_incoming_argv_appends_defer_and_stays_stopped():
    argv = ['qemu-system-x86_64', '-m', '128M']
    assert qemu_migration.incoming_argv(argv) == argv + [
        '-S', '-incoming', 'defer']


def test_only_own_writable_disks_are_migrated():
    assert [i for i, _ in base.migrated_disks(spec())] == [0]


def test_nbd_commands_start_on_the_passed_socket():
    assert qemu_migration.nbd_commands(spec()) == [
        ('nbd-server-start', {'addr': {'type': 'fd',
                                       'data': {'str': 'nbd-listen'}}}),
        ('nbd-server-add', {'device': 'disk0', 'name': 'disk0',
                            'writable': True}),
    ]
    assert qemu_migration.stream_command() == (
        'migrate-incoming', {'uri': 'fd:migration'})


def test_mirror_commands_top_for_overlays_full_otherwise():
    add, mirror = qemu_migration.mirror_commands(spec(), backed={0},
                                                 speed=1048576)
    assert add == ('blockdev-add', {
        'driver': 'nbd', 'node-name': 'mig-disk0',
        'server': {'type': 'fd', 'str': 'mig-disk0'},
        'export': 'disk0'})
    assert mirror == ('blockdev-mirror', {
        'job-id': 'nb-mirror-disk0', 'device': 'disk0',
        'target': 'mig-disk0', 'sync': 'top', 'auto-dismiss': False,
        'speed': 1048576})
    _, mirror = qemu_migration.mirror_commands(spec(), backed=(), speed=0)
    assert mirror[1]['sync'] == 'full' and 'speed' not in mirror[1]


def test_endpoint_json_round_trip():
    ep = qemu_migration.Endpoint(uri='tcp:h:1', nbd_host='h', nbd_port=2,
                                 stream_token='ab' * 16)
    assert qemu_migration.Endpoint.from_json(ep.to_json()) == ep
    v6 = qemu_migration.Endpoint(uri='tcp:[fd00::2]:49152')
    assert (v6.host, v6.port) == ('fd00::2', 49152)


def test_endpoint_of_an_older_destination_has_no_stream_token():
    old = '{"nbd_host": null, "nbd_port": null, "resume_port": 7, ' \
          '"resume_token": "t", "uri": "tcp:h:1"}'
    assert qemu_migration.Endpoint.from_json(old).stream_token is None


def test_snapshot_maps_qemu_counters():
    info = {'status': 'active', 'ram': {
        'total': 1000, 'transferred': 600, 'remaining': 400,
        'dirty-pages-rate': 10, 'page-size': 4096, 'mbps': 8.0,
        'dirty-sync-count': 3}, 'downtime': 42,
        'cpu-throttle-percentage': 20}
    jobs = [{'device': 'nb-mirror-disk0', 'len': 100, 'offset': 70},
            {'device': 'nb-mirror-disk1', 'len': 50, 'offset': 50}]
    snap = qemu_migration.snapshot_from(info, jobs)
    assert (snap.memory_total, snap.memory_processed,
            snap.memory_remaining) == (1000, 600, 400)
    assert snap.dirty_rate == 40960
    assert snap.bandwidth == 1e6
    assert snap.rounds == 3 and snap.downtime_ms == 42
    assert (snap.disk_total, snap.disk_processed,
            snap.disk_remaining) == (150, 120, 30)
    progress = runner._progress(12.5, snap)
    assert progress.elapsed == 12.5 and progress.disk_remaining == 30
    assert progress.cpu_throttle == 20
    assert type(progress).__module__ == 'nova_bhyve.migration.policy'


def test_default_policy_is_the_convergence_policy():
    from nova_bhyve.migration import policy as migration_policy
    policy = runner.default_policy(1024 ** 3, 0)
    assert isinstance(policy, migration_policy.ConvergencePolicy)


class _Drv:
    def __init__(self, tmp_path):
        self.instances_path = str(tmp_path)
        self.host_name = 'src'
        self.hypervisor = types.SimpleNamespace(
            supports_live_migration=True, supports_block_migration=True,
            name='qemu', is_running=lambda vmdir: True,
            check_live_migration=lambda vmdir, block, bw: None,
            check_machine=lambda machine: None)

        self.store = types.SimpleNamespace(vmdir=lambda instance: None)


def _instance(config_drive=False):
    return types.SimpleNamespace(uuid=UUID, config_drive=config_drive,
                                 metadata={}, system_metadata={},
                                 image_meta=types.SimpleNamespace(
                                     properties={}))


def test_dest_check_returns_a_class_nova_registers(tmp_path):
    drv = _Drv(tmp_path)
    data = live_migration.dest_check(drv, _instance(), None, False)
    assert isinstance(data, migrate_data_obj.LibvirtLiveMigrateData)
    assert 'block_migration' not in data      # 'auto': the source decides
    assert (tmp_path / data.filename).exists()
    live_migration.cleanup_dest_check(drv, data)
    assert not (tmp_path / data.filename).exists()


def test_source_check_decides_block_migration(tmp_path, monkeypatch):
    monkeypatch.setattr(live_migration.configdrive, 'required',
                        lambda inst: False)
    src = _Drv(tmp_path / 'src')
    dst = _Drv(tmp_path / 'dst')
    (tmp_path / 'src').mkdir()
    data = live_migration.dest_check(dst, _instance(), None, False)
    data = live_migration.source_check(src, _instance(), data, None)
    assert data.block_migration is True
    assert data.is_shared_instance_path is False
    # block_migration=False on local disks is refused
    data = live_migration.dest_check(dst, _instance(), False, False)
    with pytest.raises(exception.InvalidSharedStorage):
        live_migration.source_check(src, _instance(), data, None)


def test_source_check_shared_instances_path(tmp_path, monkeypatch):
    monkeypatch.setattr(live_migration.configdrive, 'required',
                        lambda inst: True)
    src = _Drv(tmp_path)
    data = live_migration.dest_check(src, _instance(), None, False)
    data = live_migration.source_check(src, _instance(), data, None)
    assert data.is_shared_instance_path is True
    assert data.block_migration is False    # nothing to copy
    # a block migration over shared storage is refused
    data = live_migration.dest_check(src, _instance(), True, False)
    with pytest.raises(exception.InvalidLocalStorage):
        live_migration.source_check(src, _instance(), data, None)


def test_source_check_refusals(tmp_path, monkeypatch):
    src = _Drv(tmp_path)
    dst = _Drv(tmp_path / 'dst')
    monkeypatch.setattr(live_migration.configdrive, 'required',
                        lambda inst: True)
    data = live_migration.dest_check(dst, _instance(), None, False)
    with pytest.raises(exception.MigrationPreCheckError,
                       match='config drive'):
        live_migration.source_check(src, _instance(), data, None)
    monkeypatch.setattr(live_migration.configdrive, 'required',
                        lambda inst: False)
    bdi = {'block_device_mapping': [{'connection_info': {}}]}
    with pytest.raises(exception.MigrationPreCheckError, match='volumes'):
        live_migration.source_check(src, _instance(), data, bdi)


def test_incoming_policy_matches_the_sources_estimate(monkeypatch):
    seen = []
    monkeypatch.setattr(runner, 'policy_factory',
                        lambda data, bw: seen.append((data, bw)) or 'p')
    monkeypatch.setattr(runner, 'bandwidth_mibps', lambda: 7)
    info = {'disks': [{'disk_size': 4096}, {'disk_size': 0}]}
    assert live_migration._incoming_policy(spec(), info) == 'p'
    assert seen == [(128 * 1024 * 1024 + 4096, 7)]


def test_rollback_at_destination_removes_the_vm_and_unplugs_its_ports(
        tmp_path):
    """Issue 5's 'unplug on migration rollback' for live migration: the
    incoming VM's directory goes and every port's device is deleted
    (device operations recorded, not run)."""
    from unittest import mock

    from nova.network import model

    from nova_bhyve.hypervisor import base
    from nova_bhyve.net import vif as network

    uuid = 'a0a0a0a0-0000-4000-8000-000000000002'
    vmdir = base.VMDir(str(tmp_path / uuid))
    os.makedirs(vmdir.path)
    incoming.mark(vmdir, 'compute')
    impl = mock.Mock()
    impl.in_use.return_value = False
    drv = types.SimpleNamespace(
        store=types.SimpleNamespace(vmdir_for=lambda u: vmdir),
        remove_instance_dir=mock.Mock(
            side_effect=lambda d: shutil.rmtree(d.path)),
        vifs=network.VifPlugger(impl=impl))
    vifs = [model.VIF(id='5e1c1a83-8d4c-4a6b-9b5e-6f0f3b1c2d4e', type='tap',
                      address='fa:16:3e:11:22:33', vnic_type='normal',
                      devname='tap5e1c1a83-8d')]
    live_migration.rollback_at_destination(
        drv, types.SimpleNamespace(uuid=uuid), vifs, True)
    drv.remove_instance_dir.assert_called_once_with(vmdir)
    assert not os.path.exists(vmdir.path)
    impl.delete.assert_called_once_with('tap5e1c1a83-8d')


# -- the memory loop's poll interval -----------------------------------------

def _snap(status='active', remaining=0, disk=0, bandwidth=0.0):
    return base.MigrationSnapshot(status=status, memory_remaining=remaining,
                                   disk_remaining=disk, bandwidth=bandwidth)


def test_poll_interval_fast_only_near_the_end():
    poll, fast = runner.POLL, runner.FAST_POLL
    assert fast < poll
    bw = 32 * 2 ** 20                       # 32 MiB/s measured
    # far from the end: more than one POLL's worth of data left
    assert runner.poll_interval(
        _snap(remaining=int(bw * poll) + 1, bandwidth=bw)) == poll
    # memory alone fits, memory + disk does not
    assert runner.poll_interval(
        _snap(remaining=int(bw * poll) - 4096, disk=8192,
              bandwidth=bw)) == poll
    # within one POLL at the measured bandwidth: poll fast
    assert runner.poll_interval(
        _snap(remaining=int(bw * poll), bandwidth=bw)) == fast
    assert runner.poll_interval(
        _snap(remaining=4096, disk=4096, bandwidth=bw)) == fast
    # no bandwidth measured yet (first poll, or a backend without
    # counters): nothing to judge by
    assert runner.poll_interval(_snap(remaining=0)) == poll
    assert runner.poll_interval(_snap(status='setup')) == poll
    # QEMU's last step before the switchover
    for status in ('device', 'pre-switchover'):
        assert runner.poll_interval(_snap(status=status)) == fast
    # post-copy, final states: not the near-end of pre-copy
    for status in ('postcopy-active', 'completed', 'failed'):
        assert runner.poll_interval(
            _snap(status=status, remaining=0, bandwidth=bw)) == poll


def test_poll_interval_fast_while_a_switch_is_pending():
    """After migrate-start-postcopy (or a force complete) the source's
    vCPUs are stopped: the switch is looked for every FAST_POLL."""
    poll, fast = runner.POLL, runner.FAST_POLL
    far = _snap(remaining=2 ** 30, bandwidth=2 ** 20)
    assert runner.poll_interval(far) == poll
    assert runner.poll_interval(far, switching=True) == fast
    assert runner.poll_interval(
        far, runner.FAST_POLL_BUDGET, switching=True) == poll
    post = _snap(status='postcopy-active', remaining=2 ** 30)
    assert runner.poll_interval(post, switching=True) == poll


def test_poll_interval_fast_polling_is_bounded():
    """A migration hovering just above its downtime limit does not poll
    fast for ever: past FAST_POLL_BUDGET seconds of fast polls, POLL."""
    near = _snap(remaining=4096, bandwidth=2 ** 20)
    budget = runner.FAST_POLL_BUDGET
    assert runner.poll_interval(near, budget - 0.01) == \
        runner.FAST_POLL
    assert runner.poll_interval(near, budget) == runner.POLL
    assert runner.poll_interval(_snap(status='device'), budget) == \
        runner.POLL


# -- live_migration_abort after a nova-compute restart ------------------------

class _OrphanHypervisor:
    """Stands in for the hypervisor at the driver boundary (the real QEMU
    side is tests/interop/test_qemu_orphaned_migration.py): records the
    call, answers as told."""

    def __init__(self, pid=1234, found='active', error=None):
        self._pid, self.found, self.error = pid, found, error
        self.calls = []

    def pid(self, vmdir):
        return self._pid

    def cancel_orphaned_migration(self, vmdir, resume):
        self.calls.append((vmdir.uuid, resume))
        if self.error is not None:
            raise self.error
        return self.found


def _orphan_driver(hyp, tmp_path):
    from nova_bhyve import driver as driver_mod
    drv = driver_mod.BhyveDriver.__new__(driver_mod.BhyveDriver)
    drv.hypervisor = hyp
    drv._live_migrations = {}
    drv.store = instance_store.InstanceStore(str(tmp_path))
    watched = []
    drv.watcher = types.SimpleNamespace(watch=watched.append)
    return drv, watched


def _orphan_instance(vm_state='active'):
    return types.SimpleNamespace(uuid=UUID, vm_state=vm_state)


def test_abort_after_restart_cancels_and_resumes(tmp_path):
    hyp = _OrphanHypervisor()
    drv, watched = _orphan_driver(hyp, tmp_path)
    drv.live_migration_abort(_orphan_instance())
    assert hyp.calls == [(UUID, True)]
    assert [v.uuid for v in watched] == [UUID]
    # a guest the user had paused stays paused
    drv.live_migration_abort(_orphan_instance('paused'))
    assert hyp.calls[-1] == (UUID, False)


@pytest.mark.parametrize('hyp', [
    _OrphanHypervisor(pid=None),                  # no VM process
    _OrphanHypervisor(found=None),                # no migration in it
    _OrphanHypervisor(error=NotImplementedError()),   # bhyve: no cancel
], ids=['no-process', 'no-migration', 'backend-cannot'])
def test_abort_after_restart_with_nothing_to_stop(hyp, tmp_path):
    drv, watched = _orphan_driver(hyp, tmp_path)
    with pytest.raises(exception.NoActiveMigrationForInstance):
        drv.live_migration_abort(_orphan_instance())
    assert watched == []


def test_abort_after_restart_in_post_copy_says_why(tmp_path):
    from nova_bhyve.hypervisor import base
    hyp = _OrphanHypervisor(error=base.HypervisorError(
        'the live migration of x is in post-copy (postcopy-active)'))
    drv, _ = _orphan_driver(hyp, tmp_path)
    with pytest.raises(exception.MigrationError, match='post-copy'):
        drv.live_migration_abort(_orphan_instance())


# -- a restarted destination -------------------------------------------------

@pytest.mark.parametrize('shared', [False, True])
def test_restarted_destination_stops_its_own_unfinished_incoming_vm(
        tmp_path, shared):
    """init_host: the incoming VM this host receives (the marker names it:
    on a shared instances path every host sees the runtime directory) goes
    to the hypervisor's stop_unfinished_incoming; another host's, or one
    from a marker without a host, is left alone."""
    from nova_bhyve.hypervisor import base
    uuid = 'a0a0a0a0-0000-4000-8000-000000000003'
    vmdir = base.VMDir(str(tmp_path / uuid))
    os.makedirs(vmdir.path)
    asked = []
    hyp = types.SimpleNamespace(
        stop_unfinished_incoming=lambda vm: asked.append(vm.path) or 'active')
    drv = types.SimpleNamespace(host_name='compute2', hypervisor=hyp)
    vm = incoming.runtime_dir(vmdir) if shared else vmdir
    if shared:
        os.makedirs(vm.path)
    incoming.mark(vm, drv.host_name)
    assert incoming.is_incoming(vmdir)
    live_migration.after_restart_at_destination(drv, vmdir)
    assert asked == [vm.path]
    # seen from another host (shared storage), or an unrecorded host
    other = types.SimpleNamespace(host_name='compute', hypervisor=hyp)
    live_migration.after_restart_at_destination(other, vmdir)
    with open(os.path.join(vm.path, incoming.MARKER),
              'w'):
        pass
    live_migration.after_restart_at_destination(drv, vmdir)
    assert asked == [vm.path]
