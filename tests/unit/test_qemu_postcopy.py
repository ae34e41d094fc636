"""The QMP sequence of the post-copy switchover, on both sides.

QEMU is replaced by a recorder of QMP commands (qmp.execute) answering what
a real QEMU 7.2 answers at that point of a migration (the real behaviour is
checked in tests/interop/test_qemu_postcopy_interop.py and, through Nova,
tests/functional/test_live_migration.py TestPostCopy). The resume request
travels over a real loopback socket to a real ResumeListener.
"""
import types

import pytest

from nova_bhyve import guest
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import migration as qemu_migration
from nova_bhyve.hypervisor.qemu import postcopy as qemu_postcopy
from nova_bhyve.hypervisor.qemu import qmp

UUID = '6d5ba3a0-55a1-4c7c-9a43-3d1b0f6a2b11'


class FakeQEMU:
    """Records (socket, command, args); ``state``: per socket path, the
    migration status and run state it reports."""

    def __init__(self):
        self.calls = []
        self.state = {}

    def execute(self, path, command, args=None, timeout=30.0):
        self.calls.append((path, command, args))
        st = self.state[path]
        if command == 'query-migrate':
            return {'status': st['migration']}
        if command == 'query-status':
            return {'status': st['run']}
        if command == 'cont':
            st['run'] = 'running'
        if command == 'query-jobs':
            return [{'id': j, 'status': 'concluded'} for j in st['jobs']]
        if command == 'job-dismiss':
            st['jobs'].remove(args['id'])
        return {}

    def commands(self, path):
        return [c for p, c, _ in self.calls if p == path]


@pytest.fixture
def fake(monkeypatch):
    f = FakeQEMU()
    monkeypatch.setattr(qmp, 'execute', f.execute)
    return f


def vmdir(tmp_path, name):
    d = base.VMDir(str(tmp_path / name / UUID))
    return d


def test_switchover_completes_mirrors_then_resumes_destination(tmp_path,
                                                                fake):
    src, dst = vmdir(tmp_path, 'src'), vmdir(tmp_path, 'dst')
    fake.state[dst.control] = {'migration': 'postcopy-active',
                               'run': 'paused', 'jobs': []}
    fake.state[src.control] = {'migration': 'postcopy-active',
                               'run': 'finish-migrate',
                               'jobs': ['nb-mirror-disk0']}
    port, token = qemu_postcopy.listen(dst, '127.0.0.1')
    try:
        ep = qemu_migration.Endpoint(uri='tcp:127.0.0.1:4444',
                                     nbd_host='127.0.0.1', nbd_port=5555,
                                     resume_port=port, resume_token=token)
        spec = guest.VMSpec(uuid=UUID, name='instance-1', vcpus=1,
                            memory_mb=128,
                            disks=[guest.Disk(path='/i/%s/disk' % UUID)])
        out = qemu_migration.OutgoingMigration(
            types.SimpleNamespace(pid=lambda v: 1), src, spec, ep, 0,
            types.SimpleNamespace(wants_postcopy=True))
        out.memory_started = True
        out.jobs, out.nodes = ['nb-mirror-disk0'], ['mig-disk0']
        assert out.switchover() is None
    finally:
        qemu_postcopy.close(dst)
    # source: soft cancel = complete the ready mirror, then drop the node
    assert fake.commands(src.control) == [
        'block-job-cancel', 'query-jobs', 'job-dismiss', 'blockdev-del']
    assert fake.calls[0][2] == {'device': 'nb-mirror-disk0', 'force': False}
    # destination, only after the source's mirror ended
    assert fake.commands(dst.control) == [
        'query-migrate', 'nbd-server-stop', 'query-status', 'cont',
        'query-status']
    last_src = max(i for i, c in enumerate(fake.calls) if c[0] == src.control)
    first_dst = min(i for i, c in enumerate(fake.calls)
                    if c[0] == dst.control)
    assert last_src < first_dst
    assert fake.state[dst.control]['run'] == 'running'
    # a post-copy migration cannot be cancelled any more
    with pytest.raises(base.HypervisorError, match='post-copy'):
        out.cancel()
    assert out.force_complete() == 'postcopy'
    assert 'migrate_cancel' not in fake.commands(src.control)


def test_resume_refused_when_the_switch_never_arrives(tmp_path, fake,
                                                     monkeypatch):
    """The source reported postcopy-active; the destination stays 'active'
    (pre-copy pages still loading) for longer than SOURCE_AHEAD_WAIT: it
    refuses and never runs the guest."""
    monkeypatch.setattr(qemu_postcopy, 'SOURCE_AHEAD_WAIT', 0.3)
    dst = vmdir(tmp_path, 'dst')
    fake.state[dst.control] = {'migration': 'active', 'run': 'inmigrate',
                               'jobs': []}
    port, token = qemu_postcopy.listen(dst, '127.0.0.1')
    try:
        # refused: the source may take the guest back
        with pytest.raises(base.DestinationRefused,
                           match='refused: .*active .the source reported '
                                 'postcopy-active.: not in post-copy'):
            qemu_postcopy.request_resume('127.0.0.1', port, token,
                                         'postcopy-active')
    finally:
        qemu_postcopy.close(dst)
    assert set(fake.commands(dst.control)) == {'query-migrate'}
    assert fake.state[dst.control]['run'] == 'inmigrate'


def test_resume_with_a_wrong_token_does_nothing(tmp_path, fake):
    dst = vmdir(tmp_path, 'dst')
    fake.state[dst.control] = {'migration': 'postcopy-active',
                               'run': 'paused', 'jobs': []}
    port, _ = qemu_postcopy.listen(dst, '127.0.0.1')
    try:
        with pytest.raises(base.HypervisorError, match='wrong token'):
            qemu_postcopy.request_resume('127.0.0.1', port, 'f' * 32,
                                         'postcopy-active')
    finally:
        qemu_postcopy.close(dst)
    assert fake.calls == []


def test_switchover_without_listener_leaves_the_resume_to_nova(tmp_path,
                                                              fake):
    """Destination nova-compute restarted (no listener): not an error, the
    guest runs at post_live_migration_at_destination."""
    src = vmdir(tmp_path, 'src')
    fake.state[src.control] = {'migration': 'postcopy-active',
                               'run': 'finish-migrate', 'jobs': []}
    port, token = qemu_postcopy.listen(vmdir(tmp_path, 'gone'), '127.0.0.1')
    qemu_postcopy.close(vmdir(tmp_path, 'gone'))
    ep = qemu_migration.Endpoint(uri='tcp:127.0.0.1:4444',
                                 resume_port=port, resume_token=token)
    out = qemu_migration.OutgoingMigration(
        types.SimpleNamespace(pid=lambda v: 1), src, None, ep, 0, None)
    assert 'cannot reach the destination' in out.switchover()


def test_finish_incoming_after_post_copy_does_not_cont_again(tmp_path,
                                                             fake):
    dst = vmdir(tmp_path, 'dst')
    fake.state[dst.control] = {'migration': 'completed', 'run': 'running',
                               'jobs': []}
    qemu_migration.finish_incoming(None, dst)
    assert fake.commands(dst.control) == [
        'query-migrate', 'nbd-server-stop', 'query-status']


def test_finish_incoming_pre_copy_runs_the_guest(tmp_path, fake):
    dst = vmdir(tmp_path, 'dst')
    fake.state[dst.control] = {'migration': 'completed', 'run': 'paused',
                               'jobs': []}
    qemu_migration.finish_incoming(None, dst)
    assert fake.commands(dst.control) == [
        'query-migrate', 'nbd-server-stop', 'query-status', 'cont',
        'query-status']


def test_cancel_refused_when_qemu_already_switched(tmp_path, fake):
    """The policy's postcopy step was applied but the loop has not seen
    postcopy-active yet: cancel must not migrate_cancel."""
    src = vmdir(tmp_path, 'src')
    fake.state[src.control] = {'migration': 'postcopy-paused',
                               'run': 'finish-migrate', 'jobs': []}
    out = qemu_migration.OutgoingMigration(
        types.SimpleNamespace(pid=lambda v: 1), src, None,
        qemu_migration.Endpoint(uri='tcp:h:1'), 0, None)
    out.memory_started = True
    with pytest.raises(base.HypervisorError, match='cannot be cancelled'):
        out.cancel()
    assert fake.commands(src.control) == ['query-migrate']


@pytest.mark.parametrize('source_status', ['completed', 'postcopy-active'])
def test_resume_waits_for_the_destination_to_catch_up(tmp_path, fake,
                                                      monkeypatch,
                                                      source_status):
    """The source asks as soon as it sees 'completed' (after finish()) or
    'postcopy-active' (switchover()); the destination, still loading the
    end of the stream or the switch for a moment (QEMU's source does not
    wait for it), waits for its own status to say the same, then runs the
    guest. finish_incoming later runs no second 'cont' and finds the
    listener closed."""
    src, dst = vmdir(tmp_path, 'src'), vmdir(tmp_path, 'dst')
    fake.state[src.control] = {'migration': source_status,
                               'run': 'postmigrate', 'jobs': []}
    fake.state[dst.control] = {'migration': 'active', 'run': 'paused',
                               'jobs': []}
    real = fake.execute
    loads = []

    def execute(path, command, args=None, timeout=30.0):
        if path == dst.control and command == 'query-migrate':
            loads.append(1)
            if len(loads) == 3:
                fake.state[dst.control]['migration'] = source_status
        return real(path, command, args, timeout)
    monkeypatch.setattr(qmp, 'execute', execute)
    port, token = qemu_postcopy.listen(dst, '127.0.0.1')
    try:
        ep = qemu_migration.Endpoint(uri='tcp:127.0.0.1:4444',
                                     resume_port=port, resume_token=token)
        out = qemu_migration.OutgoingMigration(
            types.SimpleNamespace(pid=lambda v: 1), src, None, ep, 0, None)
        if source_status == 'completed':
            out.finish()
            assert out.resume_destination() is None
        else:
            out.memory_started = True
            assert out.switchover() is None
    finally:
        qemu_postcopy.close(dst)
    assert fake.commands(dst.control) == [
        'query-migrate', 'query-migrate', 'query-migrate', 'nbd-server-stop',
        'query-status', 'cont', 'query-status']
    assert fake.state[dst.control]['run'] == 'running'
    fake.state[dst.control]['migration'] = 'completed'   # post-copy ended
    del fake.calls[:]
    qemu_migration.finish_incoming(None, dst)
    assert 'cont' not in fake.commands(dst.control)


def test_resume_without_the_source_status_does_not_wait(tmp_path, fake):
    """A request that does not say what the source saw, while pre-copy
    memory is still coming, is refused at once: the guest must not run on
    stale pages."""
    dst = vmdir(tmp_path, 'dst')
    fake.state[dst.control] = {'migration': 'active', 'run': 'paused',
                               'jobs': []}
    with pytest.raises(base.HypervisorError, match='not in post-copy'):
        qemu_postcopy.resume_now(dst)
    assert fake.commands(dst.control) == ['query-migrate']
    assert fake.state[dst.control]['run'] == 'paused'


def test_prepare_incoming_opens_the_resume_listener_without_post_copy(
        tmp_path, fake, monkeypatch):
    """Every QEMU live migration gets the resume channel, not only those
    whose policy may switch to post-copy."""
    from nova_bhyve.hypervisor.qemu import state as qemu_state
    dst = vmdir(tmp_path, 'dst')
    fake.state[dst.control] = {'migration': 'setup', 'run': 'inmigrate',
                               'jobs': []}
    monkeypatch.setattr(qemu_state, 'launch', lambda *a: None)
    spec = guest.VMSpec(uuid=UUID, name='instance-1', vcpus=1, memory_mb=128,
                        disks=[guest.Disk(path='/i/%s/disk' % UUID)])
    ep = qemu_migration.prepare_incoming(
        None, ['qemu'], spec, dst, '127.0.0.1', block=False,
        policy=types.SimpleNamespace(wants_postcopy=False,
                                     wants_auto_converge=False))
    try:
        assert ep.resume_port and ep.resume_token
        with pytest.raises(base.HypervisorError, match='wrong token'):
            qemu_postcopy.request_resume('127.0.0.1', ep.resume_port, 'x',
                                         'completed')
    finally:
        qemu_postcopy.close(dst)


def test_listener_closes_when_its_vm_process_ends(tmp_path):
    """Shared instances path, failed migration: Nova calls no rollback on
    the destination and the incoming QEMU exits on its own; its resume
    listener must not outlive it. A real process stands in for QEMU (its
    command line carries the VM's uuid, as QEMU's does)."""
    import os
    import subprocess
    import time
    dst = vmdir(tmp_path, 'dst')
    os.makedirs(dst.path)
    proc = subprocess.Popen(['sh', '-c', 'sleep 60', dst.uuid])
    try:
        with open(dst.pidfile, 'w') as f:
            f.write('%d\n' % proc.pid)
        port, token = qemu_postcopy.listen(dst, '127.0.0.1')
        listener = qemu_postcopy._listeners[dst.path]
        time.sleep(1.5)                   # more than one accept timeout
        assert not listener.closed         # the VM runs: it stays open
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while dst.path in qemu_postcopy._listeners and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert dst.path not in qemu_postcopy._listeners
    assert listener.closed
    with pytest.raises(base.HypervisorError, match='cannot reach'):
        qemu_postcopy.request_resume('127.0.0.1', port, token, 'completed',
                                     timeout=5)


def test_request_to_no_listener_is_a_refusal(tmp_path):
    """Nothing listens (the destination's nova-compute restarted): the
    request never left, the destination certainly did not run the guest."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]         # closed again: nobody listens
    with pytest.raises(base.DestinationRefused, match='cannot reach'):
        qemu_postcopy.request_resume('127.0.0.1', port, 'x', 'completed',
                                     timeout=5)


def test_destination_answers_refused_or_error(tmp_path, fake, monkeypatch):
    """'refused: ' when it did nothing (a wrong status: above; an
    unreadable VM: here) - the source may take the guest back; 'error: '
    when running it failed part-way (the guest may run there) - the source
    must not."""
    dst = vmdir(tmp_path, 'dst')
    # QMP unreachable (the incoming VM is gone): nothing done
    real = fake.execute

    def unreachable(path, command, args=None, timeout=30.0):
        if path == dst.control:
            raise base.HypervisorError('cannot reach QMP socket')
        return real(path, command, args, timeout)
    monkeypatch.setattr(qmp, 'execute', unreachable)
    with pytest.raises(base.DestinationRefused, match='cannot read'):
        qemu_postcopy.resume_now(dst, source_status='completed')
    # 'cont' did not make it run: not a refusal
    stuck = {'migration': 'completed', 'run': 'paused', 'jobs': []}

    def cont_fails(path, command, args=None, timeout=30.0):
        if command == 'query-migrate':
            return {'status': stuck['migration']}
        if command == 'query-status':
            return {'status': stuck['run']}
        return {}
    monkeypatch.setattr(qmp, 'execute', cont_fails)
    port, token = qemu_postcopy.listen(dst, '127.0.0.1')
    try:
        with pytest.raises(base.HypervisorError, match='error: ') as e:
            qemu_postcopy.request_resume('127.0.0.1', port, token,
                                         'completed')
        assert not isinstance(e.value, base.DestinationRefused)
    finally:
        qemu_postcopy.close(dst)


@pytest.mark.parametrize('status,killed', [
    ('setup', True), ('active', True), ('device', True), (None, True),
    ('postcopy-active', False), ('postcopy-paused', False),
    ('completed', False), ('failed', False)])
def test_restarted_destination_stops_only_an_unfinished_incoming_vm(
        tmp_path, fake, status, killed):
    dst = vmdir(tmp_path, 'dst')
    fake.state[dst.control] = {'migration': status, 'run': 'paused',
                               'jobs': []}
    kills = []
    hyp = types.SimpleNamespace(pid=lambda v: 42,
                                kill=lambda v: kills.append(v))
    found = qemu_migration.stop_unfinished_incoming(hyp, dst)
    assert bool(kills) == killed
    assert found == ((status or 'none') if killed else None)


def test_restarted_destination_leaves_an_unreadable_vm_alone(tmp_path,
                                                            monkeypatch):
    dst = vmdir(tmp_path, 'dst')

    def unreachable(path, command, args=None, timeout=30.0):
        raise base.HypervisorError('QMP query-migrate: timed out')
    monkeypatch.setattr(qmp, 'execute', unreachable)
    kills = []
    hyp = types.SimpleNamespace(pid=lambda v: 42,
                                kill=lambda v: kills.append(v))
    assert qemu_migration.stop_unfinished_incoming(hyp, dst) is None
    assert kills == []
