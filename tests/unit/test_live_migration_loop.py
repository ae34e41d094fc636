"""The source's orchestration loop (runner.Migration.run) with a
scripted MigrationHandle: what it does for a handle without progress or
cancel (bhyve) and for a post-copy migration whose link breaks.

The handle is scripted (a list of statuses) because these are the paths a
real QEMU reaches only through faults the functional tests cannot time
(postcopy-paused after the switch); QEMU's own behaviour there is checked
in tests/interop/test_qemu_postcopy_interop.py. Nova's post / recover callbacks
are recorders.
"""
import types

from nova.compute import vm_states

from nova_bhyve.hypervisor import base
from nova_bhyve.migration import runner


class Scripted(base.MigrationHandle):
    def __init__(self, statuses, reports_progress=True, can_cancel=True):
        self.statuses = list(statuses)
        self.reports_progress = reports_progress
        self.can_cancel = can_cancel
        self.calls = []
        self.endpoint = types.SimpleNamespace()

    def start_mirror(self):
        self.calls.append('start_mirror')

    def mirror_ready(self):
        return True

    def start_memory(self):
        self.calls.append('start_memory')

    def poll(self):
        status = self.statuses.pop(0) if len(self.statuses) > 1 \
            else self.statuses[0]
        return base.MigrationSnapshot(status=status, rounds=1)

    def apply(self, step):
        self.calls.append(('apply', step.kind))

    def force_complete(self):
        raise NotImplementedError('no force')

    def switchover(self):
        self.calls.append('switchover')

    def finish(self):
        self.calls.append('finish')

    def cancel(self):
        self.calls.append('cancel')
        if not self.can_cancel:
            raise NotImplementedError('no cancel')


class NoPolicy:
    initial_downtime_ms = 50
    wants_postcopy = False
    wants_auto_converge = False
    completion_timeout_s = 0

    def decide(self, progress):
        raise AssertionError('the policy must not run without progress')


class Saved(types.SimpleNamespace):
    def save(self):
        self.saves = getattr(self, 'saves', 0) + 1


def migration(handle, monkeypatch, policy):
    monkeypatch.setattr(runner, 'POLL', 0)
    monkeypatch.setattr(runner, 'policy_factory',
                        lambda data, bw: policy)
    monkeypatch.setattr(runner, 'bandwidth_mibps', lambda: 0)
    # __init__ bypassed: it reads the instance directory, none here
    m = runner.Migration.__new__(runner.Migration)
    hyp = types.SimpleNamespace(
        name='test', pid=lambda vmdir: 1,
        endpoint_from_json=lambda text: types.SimpleNamespace(uri=text),
        migrate_to=lambda *a, **k: handle)
    watcher = types.SimpleNamespace(unwatch=lambda uuid: None,
                                    watch=lambda vmdir: None)
    m.drv = types.SimpleNamespace(hypervisor=hyp, watcher=watcher)
    m.context = None
    m.instance = Saved(uuid='u', vm_state=vm_states.ACTIVE,
                       task_state='migrating', progress=0)
    m.dest = 'dst'
    record = Saved(status='running')
    m.data = types.SimpleNamespace(
        target_connect_addr='{"endpoint": "E"}', migration=record,
        is_shared_instance_path=False,
        obj_attr_is_set=lambda name: name == 'migration')
    m.vmdir = types.SimpleNamespace(uuid='u')
    m.spec = types.SimpleNamespace(memory_mb=1, disks=[])
    import threading
    m._requests, m._lock = [], threading.Lock()
    m.handle = None
    m._last_record = 0.0
    m.downtime_ms = m.switched_at = m.completed_at = m.resumed_at = None
    return m, record


def run(m):
    called = []
    m.run(lambda *a: called.append('post'),
          lambda *a, **k: called.append(('recover', k)), False)
    return called


def test_handle_without_progress_or_cancel(monkeypatch):
    """bhyve: no policy steps, abort and force complete refused (logged),
    the migration completes."""
    h = Scripted(['active'] * 5 + ['completed'], reports_progress=False,
                 can_cancel=False)
    m, record = migration(h, monkeypatch, NoPolicy())
    m.request('abort')
    m.request('force_complete')
    assert run(m) == ['post']
    assert 'cancel' not in h.calls and h.calls[-1] == 'finish'


def test_handle_without_progress_times_out(monkeypatch):
    h = Scripted(['active'], reports_progress=False, can_cancel=False)
    policy = NoPolicy()
    policy.completion_timeout_s = 0.05
    m, record = migration(h, monkeypatch, policy)
    called = run(m)
    assert called[0][0] == 'recover'
    assert 'cancel' in h.calls


def test_post_copy_link_broken_is_not_rolled_back(monkeypatch):
    h = Scripted(['postcopy-active', 'postcopy-active', 'postcopy-paused'])
    policy = types.SimpleNamespace(initial_downtime_ms=50,
                                   decide=lambda p: [])
    m, record = migration(h, monkeypatch, policy)
    real = m._switchover

    def switchover(t0):
        real(t0)
        m.request('abort')             # after the switch: refused
    m._switchover = switchover
    assert run(m) == []                # neither post nor recover
    assert h.calls == ['start_mirror', 'start_memory', 'switchover']
    assert record.status == 'error'
    assert m.instance.vm_state == vm_states.ERROR
    assert m.instance.task_state is None
    assert m.switched_at is not None


def test_post_copy_completes_without_finish(monkeypatch):
    """After switchover() the mirrors are already complete: finish() is not
    called again; the migration record went through 'running (post-copy)'."""
    h = Scripted(['active', 'postcopy-active', 'postcopy-active',
                  'completed'])
    policy = types.SimpleNamespace(initial_downtime_ms=50,
                                   decide=lambda p: [])
    m, record = migration(h, monkeypatch, policy)
    statuses = []
    record.save = lambda: statuses.append(record.status)
    assert run(m) == ['post']
    assert 'running (post-copy)' in statuses
    assert h.calls == ['start_mirror', 'start_memory', 'switchover']
    assert m.completed_at >= m.switched_at


class Resumable(Scripted):
    """A handle whose destination can be told to run the guest
    (resume_destination: None = done, a string = why it may not have, an
    exception = raised, e.g. DestinationRefused)."""

    def __init__(self, statuses, failure=None):
        super().__init__(statuses)
        self.failure = failure

    def resume_destination(self):
        self.calls.append('resume_destination')
        if isinstance(self.failure, Exception):
            raise self.failure
        return self.failure


def test_pre_copy_resumes_the_destination_before_the_post_step(monkeypatch):
    h = Resumable(['active', 'active', 'completed'])
    policy = types.SimpleNamespace(initial_downtime_ms=50,
                                   decide=lambda p: [])
    m, record = migration(h, monkeypatch, policy)
    order = []
    h.calls = order
    called = []
    m.run(lambda *a: order.append('post'),
          lambda *a, **k: called.append('recover'), False)
    assert called == []
    # after the disk copies ended, before Nova's post step
    assert order == ['start_mirror', 'start_memory', 'finish',
                     'resume_destination', 'post']
    assert m.resumed_at >= m.completed_at


def test_pre_copy_resume_outcome_unknown_leaves_it_to_the_post_step(
        monkeypatch, caplog):
    """The request went but no answer came (the destination may have run
    the guest): a warning, and the migration completes (the guest runs at
    post_live_migration_at_destination if it does not yet)."""
    h = Resumable(['active', 'completed'],
                  failure='no answer from the destination to the resume '
                          'request: connection reset')
    policy = types.SimpleNamespace(initial_downtime_ms=50,
                                   decide=lambda p: [])
    m, record = migration(h, monkeypatch, policy)
    assert run(m) == ['post']
    assert h.calls[-2:] == ['finish', 'resume_destination']
    assert m.resumed_at is None
    assert any(r.levelname == 'WARNING' and 'not resumed' in r.getMessage()
               for r in caplog.records)


def test_failed_disk_copy_does_not_resume_the_destination(monkeypatch):
    h = Resumable(['active', 'completed'])

    def finish():
        h.calls.append('finish')
        raise base.HypervisorError('disk copy did not complete: boom')
    h.finish = finish
    policy = types.SimpleNamespace(initial_downtime_ms=50,
                                   decide=lambda p: [])
    m, record = migration(h, monkeypatch, policy)
    called = run(m)
    assert called[0][0] == 'recover'
    assert 'resume_destination' not in h.calls
    assert 'cancel' in h.calls


REFUSED = base.DestinationRefused(
    'cannot reach the destination to resume the guest: connection refused')


def test_pre_copy_resume_refused_keeps_the_guest_here(monkeypatch):
    """The destination certainly did not run the guest (its listener is
    gone: its nova-compute restarted): the source still holds the whole
    guest, so the migration fails - cancel() runs it here again - and Nova's
    rollback cleans the destination; no post step."""
    h = Resumable(['active', 'completed'], failure=REFUSED)
    policy = types.SimpleNamespace(initial_downtime_ms=50,
                                   decide=lambda p: [])
    m, record = migration(h, monkeypatch, policy)
    called = run(m)
    assert [c[0] for c in called] == ['recover']
    assert called[0][1] == {'migration_status': 'failed'}
    assert h.calls[-3:] == ['finish', 'resume_destination', 'cancel']
    assert m.resumed_at is None


def test_pre_copy_resume_refused_on_shared_storage_completes(monkeypatch,
                                                             caplog):
    """Shared instances path: Nova calls no rollback on the destination, a
    source-side rollback would strand its waiting VM; the post step runs
    the guest there instead (warning)."""
    h = Resumable(['active', 'completed'], failure=REFUSED)
    policy = types.SimpleNamespace(initial_downtime_ms=50,
                                   decide=lambda p: [])
    m, record = migration(h, monkeypatch, policy)
    m.data.is_shared_instance_path = True
    assert run(m) == ['post']
    assert 'cancel' not in h.calls
    assert any(r.levelname == 'WARNING' and 'not resumed' in r.getMessage()
               for r in caplog.records)


def test_failure_seen_after_qemu_switched_is_not_rolled_back(monkeypatch):
    """The loop fails (here: a poll error) right after it asked for
    post-copy, before it saw postcopy-active; cancel() finds QEMU in
    post-copy and refuses. A rollback would kill the destination, which
    holds the guest's other half: the instance goes to ERROR instead, both
    VMs kept (seen once in the functional post-copy test, with a QMP
    connection QEMU closed at the switch)."""
    h = Scripted(['active'])
    calls = {'n': 0}

    def poll():
        calls['n'] += 1
        if calls['n'] > 1:
            raise base.HypervisorError('no QMP greeting')
        return base.MigrationSnapshot(status='active', rounds=1)
    h.poll = poll

    def cancel():
        h.calls.append('cancel')
        h.postcopy = True
        raise base.HypervisorError('a migration in post-copy cannot be '
                                   'cancelled')
    h.cancel = cancel
    policy = types.SimpleNamespace(initial_downtime_ms=50,
                                   decide=lambda p: [])
    m, record = migration(h, monkeypatch, policy)
    assert run(m) == []                # neither post nor recover
    assert 'cancel' in h.calls
    assert record.status == 'error'
    assert m.instance.vm_state == vm_states.ERROR
