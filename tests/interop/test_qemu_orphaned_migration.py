"""qemu_migration.cancel_orphaned on real QEMU 7.2 migrations: what the
driver does when Nova, starting a restarted source nova-compute, asks to
abort a live migration that no thread of this process drives any more
(nova_bhyve.migration.live.abort_orphaned).

The two QEMU processes and the memory-rewriting boot-sector guest are
test_qemu_migration_policy.py's ``pair`` (TCG, 64 MiB, unix socket). A
small stand-in gives cancel_orphaned the QMP socket and a name; nothing is
mocked.
"""
import time
import types

import pytest
import test_qemu_migration_policy

from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import migration as qemu_migration
from nova_bhyve.hypervisor.qemu import qmp

QEMU = test_qemu_migration_policy.QEMU
#: the fixture: two QEMU processes and the boot-sector guest
pair = test_qemu_migration_policy.pair

pytestmark = pytest.mark.skipif(QEMU is None,
                                reason='qemu-system-x86_64 not installed')


def _vmdir(sock):
    return types.SimpleNamespace(control=sock, uuid='orphan-test')


def _start(socks, speed, postcopy=False, downtime_ms=300,
           late_block_activate=False):
    src, dst = socks['src'], socks['dst']
    if postcopy:
        for sock in (src, dst):
            qmp.execute(sock, 'migrate-set-capabilities', {'capabilities': [
                {'capability': 'postcopy-ram', 'state': True}]})
    if late_block_activate:
        qmp.execute(dst, 'migrate-set-capabilities', {'capabilities': [
            {'capability': 'late-block-activate', 'state': True}]})
    qmp.execute(dst, 'migrate-incoming', {'uri': socks['uri']})
    params = {'max-bandwidth': speed, 'downtime-limit': downtime_ms}
    if postcopy:
        # post-copy has its own cap (0 = none): without it the 64 MiB go
        # at once and the migration may complete before it is looked at
        params['max-postcopy-bandwidth'] = speed
    qmp.execute(src, 'migrate-set-parameters', params)
    qmp.execute(src, 'migrate', {'uri': socks['uri']})


def _wait_status(sock, wanted, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        status = qmp.execute(sock, 'query-migrate').get('status')
        if status in wanted:
            return status
        assert time.monotonic() < deadline, 'migration is %s' % status
        time.sleep(0.1)


def test_a_running_pre_copy_is_cancelled_and_the_guest_runs(pair):
    _start(pair, 256 * 1024)                  # cannot converge
    _wait_status(pair['src'], ('active',))
    found = qemu_migration.cancel_orphaned(_vmdir(pair['src']), resume=True)
    assert found == 'active'
    assert qmp.execute(pair['src'], 'query-migrate')['status'] == 'cancelled'
    assert qmp.execute(pair['src'], 'query-status')['status'] == 'running'
    # the destination gives up by itself when its stream breaks
    dst = pair['procs'][1]
    assert dst.wait(timeout=60) != 0


@pytest.mark.parametrize('pair,late_block_activate', [
    ({'own_disks': True, 'paused': True}, False),
    ({'paused': True}, True)], indirect=['pair'], ids=['own', 'shared'])
def test_a_completed_copy_runs_again_here(pair, late_block_activate):
    """The memory went and the source is stopped (postmigrate), waiting for
    a post step nobody will run; the destination (-S) waits too: the guest
    runs here again - with the destination on its own disk copy (as after a
    block migration), or on the same disk (shared storage) when it is set
    up as the driver does it (qemu_migration_params.incoming_qmp:
    late-block-activate, so it has not taken the disks at the end of the
    stream)."""
    _start(pair, 1 << 40, downtime_ms=60000,
           late_block_activate=late_block_activate)
    _wait_status(pair['src'], ('completed',))
    assert qmp.execute(pair['src'], 'query-status')['status'] != 'running'
    found = qemu_migration.cancel_orphaned(_vmdir(pair['src']), resume=True)
    assert found == 'completed'
    assert qmp.execute(pair['src'], 'query-status')['status'] == 'running'


@pytest.mark.parametrize('pair', [{'paused': True}], indirect=True)
def test_a_completed_copy_on_shared_disks_says_why(pair):
    """Shared storage, a destination without late-block-activate (QEMU's
    default; the driver sets it): QEMU activated the destination's disks at
    the end of the stream (even with -S) and holds their locks; the guest
    cannot run here and the error says so."""
    _start(pair, 1 << 40, downtime_ms=60000)
    _wait_status(pair['src'], ('completed',))
    with pytest.raises(base.HypervisorError, match='holds the disks'):
        qemu_migration.cancel_orphaned(_vmdir(pair['src']), resume=True)
    assert qmp.execute(pair['src'], 'query-status')['status'] != 'running'


def test_resume_false_leaves_a_paused_guest_paused(pair):
    """A guest the user paused before the migration stays paused."""
    qmp.execute(pair['src'], 'stop')
    _start(pair, 256 * 1024)
    _wait_status(pair['src'], ('active', 'completed'))
    qemu_migration.cancel_orphaned(_vmdir(pair['src']), resume=False)
    assert qmp.execute(pair['src'], 'query-status')['status'] != 'running'


def test_post_copy_is_refused(pair):
    _start(pair, 256 * 1024, postcopy=True)
    _wait_status(pair['src'], ('active',))
    qmp.execute(pair['src'], 'migrate-start-postcopy')
    _wait_status(pair['src'], ('postcopy-active',))
    with pytest.raises(base.HypervisorError, match='post-copy'):
        qemu_migration.cancel_orphaned(_vmdir(pair['src']), resume=True)
    assert qmp.execute(pair['src'], 'query-migrate')['status'] in (
        'postcopy-active', 'completed')


def test_no_migration_changes_nothing(pair):
    assert qemu_migration.cancel_orphaned(_vmdir(pair['src']),
                                          resume=True) is None
    assert qmp.execute(pair['src'], 'query-status')['status'] == 'running'
