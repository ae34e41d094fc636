"""Live migration, source side: the runner that drives one migration to
its end.

``Migration.run`` (Nova's live migration thread, inside
driver.live_migration) starts the backend's MigrationHandle, polls it,
reports progress into Nova's migration record, applies the convergence
policy's steps (migration.policy), takes abort / force-complete requests,
switches to post-copy, has the destination run the guest as soon as the
memory copy completes, and calls Nova's post or recover method. The steps
Nova calls on either host are in migration.live. See docs/migration.md.
"""
import json
import os
import shutil
import threading
import time

from nova import exception
from nova.compute import vm_states
from oslo_log import log as logging
from oslo_utils import units

from nova_bhyve import conf
from nova_bhyve import instance_store
from nova_bhyve.hypervisor import base
from nova_bhyve.migration import incoming
from nova_bhyve.migration import policy as migration_policy

LOG = logging.getLogger(__name__)
CONF = conf.CONF

POLL = 0.5
#: the poll interval near the end of the memory phase (poll_interval)
FAST_POLL = 0.02
#: at most this many seconds of fast polling per migration: a migration
#: that hovers just above its downtime limit does not hammer QMP for ever
FAST_POLL_BUDGET = 10.0
#: statuses of QEMU's last step before the switchover
#: (pause-before-switchover)
SWITCHOVER_STATUSES = ('device', 'pre-switchover')
#: the migration record is saved every this many seconds
RECORD_INTERVAL = 2.0
#: migration statuses (MigrationHandle.poll) after the post-copy link
#: broke: the backend waits for a recovery, the guest is split
POSTCOPY_BROKEN = ('postcopy-paused', 'postcopy-recover')


def default_policy(data_bytes, bandwidth_mibps):
    return migration_policy.ConvergencePolicy.from_conf(
        CONF.bhyve, data_bytes, bandwidth_mibps)


#: callable(data_bytes, bandwidth_mibps) -> a policy with the
#: ConvergencePolicy interface; replaceable (tests inject their own)
policy_factory = default_policy


def _progress(elapsed, snap):
    return migration_policy.Progress(
        elapsed=elapsed, rounds=snap.rounds,
        memory_total=snap.memory_total,
        memory_processed=snap.memory_processed,
        memory_remaining=snap.memory_remaining,
        dirty_rate=snap.dirty_rate, bandwidth=snap.bandwidth,
        disk_remaining=snap.disk_remaining, cpu_throttle=snap.cpu_throttle)


def poll_interval(snap, fast_spent=0.0, switching=False):
    """Seconds to sleep before the next poll of the memory phase: POLL, or
    FAST_POLL near the end - the status is QEMU's last step before the
    switchover, or what remains (memory + disk) would be sent within about
    one POLL at the measured bandwidth - so that 'completed' is seen (and
    the destination resumed) within FAST_POLL instead of up to POLL after
    it happened. ``fast_spent``: the seconds of fast polling so far; past
    FAST_POLL_BUDGET it is POLL again. The policy still decides per pass
    (it ignores polls that bring no new pass). ``switching``: a switch to
    post-copy or a force complete was requested and its outcome not seen
    yet - the source's vCPUs stop at once, so poll fast for it too."""
    if fast_spent >= FAST_POLL_BUDGET:
        return POLL
    if snap.status in SWITCHOVER_STATUSES:
        return FAST_POLL
    if switching and snap.status == 'active':
        return FAST_POLL
    if snap.status != 'active' or not snap.bandwidth:
        return POLL
    remaining = snap.memory_remaining + snap.disk_remaining
    return FAST_POLL if remaining <= snap.bandwidth * POLL else POLL


def bandwidth_mibps():
    """The cap for one migration. Nova's API passes no per-migration
    bandwidth (os-migrateLive has host, block_migration, force), so it is
    [bhyve] live_migration_bandwidth."""
    return CONF.bhyve.live_migration_bandwidth


def allocated_bytes(path):
    """Bytes a disk file takes on its file system (0 if it is gone)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


class _Abort(Exception):
    def __init__(self, reason, status='failed'):
        super().__init__(reason)
        self.status = status


class _PostcopyBroken(Exception):
    """The migration failed after the switch to post-copy: the guest's
    memory is split between the hosts, there is nothing to roll back to."""


class Migration:
    """The source side of one live migration (runs in Nova's live
    migration thread, inside driver.live_migration)."""

    def __init__(self, drv, context, instance, dest, migrate_data):
        self.drv = drv
        self.context = context
        self.instance = instance
        self.dest = dest
        self.data = migrate_data
        self.vmdir = drv.store.vmdir(instance)
        self.spec = instance_store.read_spec(self.vmdir)
        self._requests = []
        self._lock = threading.Lock()
        self.handle = None
        self._last_record = 0.0
        self.downtime_ms = None
        #: monotonic times of the post-copy switch (None: pre-copy only)
        #: and of the end of the memory stream
        self.switched_at = None
        self.completed_at = None
        #: monotonic time the destination ran the guest after a pre-copy
        #: completion (None: it runs at Nova's post step)
        self.resumed_at = None

    # requests from other threads (Nova's abort / force-complete RPCs)
    def request(self, what):
        with self._lock:
            self._requests.append(what)

    def _take_requests(self):
        with self._lock:
            reqs, self._requests = self._requests, []
        return reqs

    def _data_bytes(self):
        total = self.spec.memory_mb * units.Mi
        for disk in self.spec.disks:
            if not disk.serial:
                total += allocated_bytes(disk.path)
        return total

    def run(self, post_method, recover_method, block_migration):
        target = json.loads(self.data.target_connect_addr or '{}')
        if 'endpoint' not in target:
            raise exception.MigrationError(
                reason='the destination sent no migration endpoint')
        endpoint = self.drv.hypervisor.endpoint_from_json(target['endpoint'])
        mibps = bandwidth_mibps()
        policy = policy_factory(self._data_bytes(), mibps)
        self.handle = self.drv.hypervisor.migrate_to(
            self.vmdir, self.spec, endpoint, mibps * units.Mi, policy,
            backed=target.get('backed', ()))
        self.drv.watcher.unwatch(self.instance.uuid)
        LOG.info('live migration to %s (%s) started: bandwidth cap %s, '
                 'initial downtime %d ms, policy %s', self.dest,
                 getattr(endpoint, 'uri', endpoint),
                 '%d MiB/s' % mibps if mibps else 'none',
                 policy.initial_downtime_ms, type(policy).__name__,
                 instance=self.instance)
        t0 = time.monotonic()
        try:
            self._migrate(policy, t0)
        except _PostcopyBroken as e:
            self._split(e)
            return
        except Exception as e:
            if self.switched_at is not None:
                self._split(e)
                return
            status = getattr(e, 'status', 'failed')
            LOG.error('live migration to %s %s: %s', self.dest,
                      'cancelled' if status == 'cancelled' else 'failed', e,
                      instance=self.instance)
            if not self._give_up():
                # QEMU had switched to post-copy before the failure was
                # seen: a rollback would kill the guest's other half
                self._split(e)
                return
            recover_method(self.context, self.instance, self.dest,
                           self.data, migration_status=status)
            return
        LOG.info('live migration to %s completed in %.1f s (downtime '
                 'reported by the hypervisor: %s ms; %s)', self.dest,
                 time.monotonic() - t0, self.downtime_ms,
                 'post-copy: the guest runs on the destination already'
                 if self.switched_at is not None else
                 'the guest runs on the destination already'
                 if self.resumed_at is not None else
                 'the guest runs again once the destination resumes it in '
                 'post_live_migration_at_destination',
                 instance=self.instance)
        post_method(self.context, self.instance, self.dest, block_migration,
                    self.data)

    def _split(self, error):
        """A failure past the post-copy switch. Neither host holds the whole
        guest: no rollback (Nova's would kill the destination VM, which
        holds the pages the guest wrote since the switch) and no post step.
        Both QEMU processes are left as they are, for QEMU's post-copy
        recovery or an operator; the instance goes to ERROR, the migration
        record to 'error'."""
        LOG.error('live migration to %s failed after the switch to '
                  'post-copy: %s. The guest\'s memory is split between this '
                  'host and %s and cannot be rolled back; both VM processes '
                  'are left running (QEMU postcopy-paused: recoverable with '
                  'migrate-recover on the destination and migrate resume=true '
                  'here while both live). The instance is set to ERROR.',
                  self.dest, error, self.dest, instance=self.instance)
        self._set_migration_status('error')
        try:
            self.instance.vm_state = vm_states.ERROR
            self.instance.task_state = None
            self.instance.save()
        except Exception:
            LOG.exception('cannot set the instance to ERROR',
                          instance=self.instance)

    def _set_migration_status(self, status):
        """Nova's migration record gets ``status`` (best effort: a failure
        to save is logged, the migration goes on)."""
        migration = self._migration_record()
        if migration is None:
            return
        try:
            migration.status = status
            migration.save()
        except Exception as e:
            LOG.warning('cannot save the migration status: %s', e,
                        instance=self.instance)

    def _migration_record(self):
        if not self.data.obj_attr_is_set('migration'):
            return None
        return getattr(self.data, 'migration', None)

    def _give_up(self):
        """Cancel the migration, the guest runs here again. False when it
        cannot be: QEMU is past the post-copy switch (the handle's cancel()
        refused and says so)."""
        try:
            self.handle.cancel()
        except Exception:
            if getattr(self.handle, 'postcopy', False):
                return False
            LOG.exception('cancelling the migration failed',
                          instance=self.instance)
        if self.data.is_shared_instance_path:
            # Nova calls no rollback on the destination for shared storage:
            # the waiting destination VM is made to exit, and its runtime
            # directory (visible here) goes
            self.handle.release_destination()
            runtime = incoming.runtime_dir(self.vmdir)
            pid = runtime.read_pid()
            if pid and not base.wait_for_exit(pid, 30, runtime.uuid):
                LOG.warning('the destination VM %d did not exit', pid,
                            instance=self.instance)
            shutil.rmtree(runtime.path, ignore_errors=True)
            base.remove_runtime_dir(runtime)
        if self.drv.hypervisor.pid(self.vmdir) is not None:
            self.drv.watcher.watch(self.vmdir)
        else:
            LOG.error('the VM process is gone after the failed migration',
                      instance=self.instance)
        return True

    def _handle_requests(self):
        for what in self._take_requests():
            if what == 'abort':
                if not self.handle.can_cancel:
                    LOG.warning('abort requested: refused, the %s backend '
                                'cannot cancel a running live migration',
                                self.drv.hypervisor.name,
                                instance=self.instance)
                    continue
                if self.switched_at is not None:
                    LOG.warning('abort requested after the switch to '
                                'post-copy: refused (the guest runs on the '
                                'destination already)', instance=self.instance)
                    continue
                raise _Abort('aborted on request', status='cancelled')
            if what == 'force_complete':
                try:
                    how = self.handle.force_complete()
                    self._switch_requested = True
                except NotImplementedError as e:
                    LOG.warning('force complete refused: %s', e,
                                instance=self.instance)
                    continue
                LOG.info('live migration forced to complete (%s)', how,
                         instance=self.instance)

    def _decide(self, policy, t0, snap, memory_phase):
        if not self.handle.reports_progress:
            # status only: no counters for the policy; its completion
            # timeout still ends the wait (the backend cannot cancel: the
            # rollback on the destination ends the migration there)
            limit = getattr(policy, 'completion_timeout_s', 0)
            if limit and time.monotonic() - t0 > limit:
                raise _Abort('not finished within the completion timeout '
                             'of %.0f s (the %s backend reports no '
                             'progress)' % (limit, self.drv.hypervisor.name))
            return
        for step in policy.decide(_progress(time.monotonic() - t0, snap)):
            if step.kind == 'abort':
                raise _Abort('convergence policy: ' + step.reason)
            if not memory_phase:
                continue
            LOG.info('live migration: %s %s: %s', step.kind,
                     '' if step.value is None else step.value, step.reason,
                     instance=self.instance)
            self.handle.apply(step)
            if step.kind == 'postcopy':
                self._switch_requested = True

    def _alive(self):
        if self.drv.hypervisor.pid(self.vmdir) is None:
            raise _Abort('the VM process exited during the migration')

    def _migrate(self, policy, t0):
        h = self.handle
        h.start_mirror()
        while True:
            self._alive()
            self._handle_requests()
            if h.mirror_ready():
                break
            snap = h.poll()
            self._record(snap)
            self._decide(policy, t0, snap, memory_phase=False)
            time.sleep(POLL)
        LOG.info('disks in sync after %.1f s; sending memory',
                 time.monotonic() - t0, instance=self.instance)
        h.start_memory()
        fast_spent = 0.0
        #: post-copy or force complete asked for, outcome not polled yet
        self._switch_requested = False
        while True:
            self._alive()
            self._handle_requests()
            snap = h.poll()
            if h.reports_progress:
                self._record(snap)
            if snap.status == 'completed':
                break
            if snap.status in POSTCOPY_BROKEN:
                raise _PostcopyBroken(
                    'QEMU reports %s: the post-copy link to the destination '
                    'broke' % snap.status)
            if snap.status == 'postcopy-active' and self.switched_at is None:
                self._switchover(t0)
                continue
            if snap.status in ('failed', 'cancelled'):
                raise _Abort('QEMU reports the migration %s: %s' % (
                    snap.status, snap.error or 'no reason given'))
            h.mirror_ready()          # raises when a disk copy failed
            self._decide(policy, t0, snap, memory_phase=True)
            interval = poll_interval(snap, fast_spent,
                                     switching=self._switch_requested)
            if interval < POLL:
                fast_spent += interval
            time.sleep(interval)
        self.completed_at = time.monotonic()
        self.downtime_ms = snap.downtime_ms
        if self.switched_at is not None:
            LOG.info('post-copy: all memory on the destination %.1f s after '
                     'the switch', self.completed_at - self.switched_at,
                     instance=self.instance)
        else:
            # the guest is stopped on both hosts until the resume: nothing
            # else (the record's save below) comes first
            h.finish()
            self._resume_destination()
        if h.reports_progress:
            self._record(snap, force=True)

    def _resume_destination(self):
        """Pre-copy completed, disks in sync: the guest runs on the
        destination now (as libvirt's Finish phase does), not only when
        Nova's post step reaches it. When the destination certainly did
        not run it (DestinationRefused: its listener is gone - its
        nova-compute restarted - or it refused before acting) the guest,
        still whole here, stays: the migration fails and Nova's rollback
        cleans the destination. With a shared instances path Nova calls no
        rollback there, so the destination's waiting VM would be stranded:
        the post step runs the guest there instead, as for any other
        failure of the request, which leaves the outcome unknown."""
        try:
            failure = self.handle.resume_destination()
        except NotImplementedError:
            return
        except base.DestinationRefused as e:
            if not self.data.is_shared_instance_path:
                raise _Abort('the destination did not take the guest (%s); '
                             'it stays on this host' % e)
            failure = str(e)
        if failure:
            LOG.warning('the guest was not resumed on %s right away (%s); '
                        'it runs once Nova\'s post step reaches the '
                        'destination', self.dest, failure,
                        instance=self.instance)
            return
        self.resumed_at = time.monotonic()
        LOG.info('the guest runs on %s %.3f s after the memory stream '
                 'completed', self.dest, self.resumed_at - self.completed_at,
                 instance=self.instance)

    def _switchover(self, t0):
        """The source is in postcopy-active: disks in sync, then the guest
        runs on the destination while the rest of its memory follows."""
        self.switched_at = time.monotonic()
        LOG.info('switched to post-copy after %.1f s: completing the disk '
                 'copy, then resuming the guest on %s',
                 self.switched_at - t0, self.dest, instance=self.instance)
        self._set_migration_status('running (post-copy)')
        try:
            failure = self.handle.switchover()
        except base.HypervisorError as e:
            raise _PostcopyBroken(str(e))
        if failure:
            LOG.warning('post-copy: the guest was not resumed on %s right '
                        'away (%s); it runs once Nova\'s post step reaches '
                        'the destination', self.dest, failure,
                        instance=self.instance)
        else:
            LOG.info('post-copy: the guest runs on %s %.1f s after the '
                     'switch', self.dest, time.monotonic() - self.switched_at,
                     instance=self.instance)

    def _record(self, snap, force=False):
        """Progress into Nova's migration record (and the instance's
        progress percentage), at most every RECORD_INTERVAL seconds."""
        now = time.monotonic()
        if not force and now - self._last_record < RECORD_INTERVAL:
            return
        self._last_record = now
        migration = getattr(self.data, 'migration', None) \
            if self.data.obj_attr_is_set('migration') else None
        if migration is None:
            return
        migration.memory_total = snap.memory_total
        migration.memory_processed = snap.memory_processed
        migration.memory_remaining = snap.memory_remaining
        migration.disk_total = snap.disk_total
        migration.disk_processed = snap.disk_processed
        migration.disk_remaining = snap.disk_remaining
        try:
            migration.save()
        except Exception as e:
            LOG.warning('cannot save the migration progress: %s', e,
                        instance=self.instance)
        total = snap.memory_total + snap.disk_total
        if total:
            done = snap.memory_processed + snap.disk_processed
            progress = min(100, int(100 * done / total))
            if snap.status == 'completed':
                progress = 100
            try:
                self.instance.progress = progress
                self.instance.save()
            except Exception as e:
                LOG.debug('instance progress not saved: %s', e)
