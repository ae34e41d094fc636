"""QEMU live migration: incoming VM on the destination, outgoing migration
(block mirror + memory) on the source.

Every TCP connection of a migration is made by nova-compute and handed to
QEMU as a descriptor (qemu_channel): QEMU neither listens nor connects.

Destination (``prepare_incoming``): the VM's usual command line plus
``-S -incoming defer``; its writable instance disks are exported over NBD
(``nbd-server-start`` on a listening socket nova-compute bound on the
inbound address and passed with ``getfd``, ``nbd-server-add
writable=true`` per disk; the exports are named after the block nodes,
``diskN``); nova-compute listens for the memory stream (qemu_channel:
the source's connection, checked by its token, goes to QEMU with
``migrate-incoming fd:migration``); it opens the resume listener
(qemu_postcopy: the resume channel). ``-S``: the guest is not run
when the memory stream ends; it runs (NBD server stopped, ``cont``) once the
source has synchronised the disks and let go of them - the order libvirt
uses for NBD storage migration - when the source asks through the resume
listener, else at ``finish_incoming`` (Nova's post step), which runs
``cont`` only if the guest is not running yet.

Source (``OutgoingMigration``):

1. capabilities and parameters (qemu_migration_params.initial_qmp:
   bandwidth cap, downtime, auto-converge / postcopy as the convergence
   policy wants);
2. block migration: per disk, a connection to the destination's NBD
   server passed with ``getfd`` and ``blockdev-add`` of its export on it
   (server ``{type: fd}``) as node ``mig-diskN``, ``blockdev-mirror`` into
   it (sync ``top`` for an overlay - the destination made its own overlay
   over its own copy of the same image, so only the top layer moves;
   ``full`` otherwise;
   background copy mode: a stalled network never blocks guest writes);
   wait until every job is ready;
3. the memory stream's connection (qemu_channel.connect_stream: token
   sent, accepted by the destination) passed with ``getfd``, ``migrate``
   to ``fd:migration``; ``poll()`` reads ``query-migrate``
   and ``query-block-jobs``;
   Post-copy (the policy's fallback): once QEMU reports
   ``postcopy-active`` (vCPUs stopped here), ``switchover()`` completes the
   mirrors as in 4. and asks the destination to run the guest now
   (qemu_postcopy: the resume listener); memory keeps coming on demand
   until ``completed``. A post-copy migration cannot be cancelled: the
   guest's state is split between the hosts (``cancel()`` refuses);
4. once QEMU reports ``completed`` (vCPUs stopped, memory sent):
   ``block-job-cancel`` of each ready mirror (for a ready mirror this means
   "finish the copy, do not pivot"), wait for the jobs to conclude without
   error, ``blockdev-del`` the NBD nodes (``finish()``); then
   ``resume_destination()`` asks the destination to run the guest now
   (qemu_postcopy), as libvirt's Finish phase does, before Nova's post
   step.

``cancel()`` at any point: ``migrate_cancel``, forced cancel of the mirror
jobs, NBD nodes removed, the vCPUs run again if they were running before.
"""
import dataclasses
import json
import secrets
import time

from oslo_log import log as logging

from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import channel as qemu_channel
from nova_bhyve.hypervisor.qemu import (
    migration_params as qemu_migration_params,
)
from nova_bhyve.hypervisor.qemu import postcopy as qemu_postcopy
from nova_bhyve.hypervisor.qemu import qmp
from nova_bhyve.hypervisor.qemu import state as qemu_state

LOG = logging.getLogger(__name__)

POLL = 0.2
MIRROR_READY_TIMEOUT = 3600.0
JOB_END_TIMEOUT = 120.0
INCOMING_TIMEOUT = 60.0
#: migration statuses after which QEMU does nothing more
FINAL = ('completed', 'failed', 'cancelled')
#: statuses of a migration past the post-copy switch
POSTCOPY = ('postcopy-active', 'postcopy-paused', 'postcopy-recover')
#: the post-copy link broke: QEMU waits for a recovery, the guest's memory
#: is split between the hosts
POSTCOPY_BROKEN = ('postcopy-paused', 'postcopy-recover')
#: getfd names: the memory stream (either side), the destination's NBD
#: listening socket; a source's NBD connection is named after its node
STREAM_FD = 'migration'
NBD_LISTEN_FD = 'nbd-listen'


def export_name(index):
    return 'disk%d' % index


def target_node(index):
    return 'mig-disk%d' % index


def mirror_job(index):
    return 'nb-mirror-disk%d' % index


def _hostport(host, port):
    return '[%s]:%d' % (host, port) if ':' in host else '%s:%d' % (host, port)


def incoming_argv(argv):
    """The destination's command line: the source's device model, waiting
    for ``migrate-incoming`` and not running the guest afterwards."""
    return list(argv) + ['-S', '-incoming', 'defer']


def nbd_commands(spec):
    """QMP commands of the destination's NBD server for a block migration
    (pure): started on the listening socket passed as NBD_LISTEN_FD (the
    first command consumes it), one writable export per migrated disk."""
    cmds = [('nbd-server-start', {'addr': {
        'type': 'fd', 'data': {'str': NBD_LISTEN_FD}}})]
    for i, _ in base.migrated_disks(spec):
        cmds.append(('nbd-server-add', {
            'device': export_name(i), 'name': export_name(i),
            'writable': True}))
    return cmds


def stream_command():
    """The QMP command that consumes the memory stream's descriptor
    STREAM_FD on the destination (``migrate`` takes the same URI on the
    source)."""
    return 'migrate-incoming', {'uri': 'fd:' + STREAM_FD}


@dataclasses.dataclass
class Endpoint:
    """Where the source sends the migration (JSON-able; it travels in
    Nova's migrate_data)."""
    uri: str                       # memory stream: where the source
    #                                connects, e.g. tcp:10.0.0.2:49152
    nbd_host: str = None           # disk stream (block migration)
    nbd_port: int = None
    resume_port: int = None        # resume listener (qemu_postcopy)
    resume_token: str = None
    #: the memory stream's token (qemu_channel); None: a destination of an
    #: older version, whose QEMU listens itself
    stream_token: str = None

    @property
    def host(self):
        return self.uri[len('tcp:'):].rsplit(':', 1)[0].strip('[]')

    @property
    def port(self):
        return int(self.uri.rsplit(':', 1)[1])

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        return cls(**json.loads(text))


def prepare_incoming(hyp, argv, spec, vmdir, host, block, policy=None,
                     timeout=INCOMING_TIMEOUT, fds=()):
    """Start the destination VM from ``argv`` (its normal command line)
    waiting for the migration; return its Endpoint. ``policy``: the
    convergence policy, for the capabilities both sides need
    (qemu_migration_params.incoming_qmp: post-copy). The sockets are
    nova-compute's: the NBD server's listening socket goes to QEMU, the
    memory stream's connection once the source made it (qemu_channel). On
    failure the VM process is killed and HypervisorError raised."""
    stream = qemu_channel.listening_socket(host)
    nbd = None
    try:
        nbd = qemu_channel.listening_socket(host) if block else None
        stream_port = stream.getsockname()[1]
        nbd_port = nbd.getsockname()[1] if nbd else None
        try:
            qemu_state.launch(hyp, incoming_argv(argv), vmdir, spec.uuid,
                              fds, spec)
        except base.HypervisorError:
            hyp.kill(vmdir)
            raise
        token = secrets.token_hex(qemu_channel.TOKEN_HEX // 2)
        try:
            for command, args in qemu_migration_params.incoming_qmp(policy):
                qmp.execute(vmdir.control, command, args, timeout=timeout)
            if nbd:
                start_nbd_server(vmdir.control, spec, nbd, timeout)
            command, args = stream_command()
            qemu_channel.accept_stream(vmdir, stream, token, STREAM_FD,
                                       command, args)
            stream = None               # the acceptor's now
            resume_port, resume_token = qemu_postcopy.listen(vmdir, host)
        except (base.HypervisorError, OSError):
            hyp.kill(vmdir)             # closes the listeners too
            raise
    finally:
        for sock in (stream, nbd):
            if sock is not None:
                sock.close()
    return Endpoint(uri='tcp:' + _hostport(host, stream_port),
                    nbd_host=host if block else None, nbd_port=nbd_port,
                    resume_port=resume_port, resume_token=resume_token,
                    stream_token=token)


def start_nbd_server(control, spec, sock, timeout=INCOMING_TIMEOUT):
    """Destination: the NBD server of a block migration on ``sock`` (a
    listening socket; QEMU gets its own copy), its exports."""
    cmds = nbd_commands(spec)
    command, args = cmds[0]
    qemu_channel.hand_over(control, sock, NBD_LISTEN_FD, command, args,
                           timeout)
    for command, args in cmds[1:]:
        qmp.execute(control, command, args, timeout=timeout)


def close_listeners(vmdir):
    """Close what nova-compute listens on for the incoming VM in
    ``vmdir``: the memory stream's port and the resume listener."""
    qemu_channel.close(vmdir)
    qemu_postcopy.close(vmdir)


def finish_incoming(hyp, vmdir, timeout=INCOMING_TIMEOUT):
    """Destination, Nova's post step: the memory stream must have
    completed; close the resume listener, stop the NBD server and run the
    guest unless the source already had it run (resume_destination, or a
    post-copy switchover). The source saw 'completed' first: the
    destination may need a moment to say so too."""
    close_listeners(vmdir)
    deadline = time.monotonic() + timeout
    while True:
        status = qmp.execute(vmdir.control, 'query-migrate').get('status')
        if status != 'postcopy-active' or time.monotonic() > deadline:
            break
        time.sleep(POLL)
    if status != 'completed':
        raise base.HypervisorError(
            'the incoming migration of %s is %s, not completed' % (
                vmdir.uuid, status))
    try:
        qmp.execute(vmdir.control, 'nbd-server-stop')
    except qmp.QMPError as e:
        LOG.debug('nbd-server-stop on %s: %s', vmdir.uuid, e)
    state = qmp.execute(vmdir.control, 'query-status')['status']
    if state != 'running':
        qmp.execute(vmdir.control, 'cont', timeout=timeout)
        state = qmp.execute(vmdir.control, 'query-status')['status']
    if state != 'running':
        raise base.HypervisorError('instance %s is %s after the migration'
                                   % (vmdir.uuid, state))


# -- source -----------------------------------------------------------------

def mirror_commands(spec, backed, speed):
    """QMP commands that start mirroring the disks into the destination's
    NBD exports (pure). Each ``blockdev-add`` consumes the connection to
    the NBD server passed under the node's name (``getfd``: the caller's).
    ``backed``: indices of disks that are overlays over an image both hosts
    hold (sync top); others are copied whole."""
    cmds = []
    for i, _ in base.migrated_disks(spec):
        cmds.append(('blockdev-add', {
            'driver': 'nbd', 'node-name': target_node(i),
            'server': {'type': 'fd', 'str': target_node(i)},
            'export': export_name(i)}))
        args = {'job-id': mirror_job(i), 'device': export_name(i),
                'target': target_node(i),
                'sync': 'top' if i in backed else 'full',
                'auto-dismiss': False}
        if speed:
            args['speed'] = int(speed)
        cmds.append(('blockdev-mirror', args))
    return cmds


def snapshot_from(migrate_info, jobs):
    """Map query-migrate and query-block-jobs replies onto a Snapshot
    (pure)."""
    ram = migrate_info.get('ram') or {}
    page = ram.get('page-size') or 4096
    snap = base.MigrationSnapshot(
        status=migrate_info.get('status') or 'none',
        memory_total=int(ram.get('total', 0)),
        memory_processed=int(ram.get('transferred', 0)),
        memory_remaining=int(ram.get('remaining', 0)),
        dirty_rate=float(ram.get('dirty-pages-rate', 0)) * page,
        bandwidth=float(ram.get('mbps', 0)) * 1e6 / 8,
        rounds=int(ram.get('dirty-sync-count', 0)),
        error=migrate_info.get('error-desc'),
        downtime_ms=migrate_info.get('downtime'),
        cpu_throttle=migrate_info.get('cpu-throttle-percentage'))
    for job in jobs:
        total, done = int(job.get('len', 0)), int(job.get('offset', 0))
        snap.disk_total += total
        snap.disk_processed += done
        snap.disk_remaining += max(0, total - done)
    return snap


class OutgoingMigration(base.MigrationHandle):
    """A running live migration of the VM in ``vmdir`` (source side)."""

    def __init__(self, hyp, vmdir, spec, endpoint, bandwidth, policy,
                 backed=()):
        self.hyp = hyp
        self.vmdir = vmdir
        self.spec = spec
        self.endpoint = endpoint
        self.bandwidth = bandwidth
        self.policy = policy
        self.block = endpoint.nbd_port is not None
        self.backed = set(backed)
        self.disks = [i for i, _ in base.migrated_disks(spec)] if self.block \
            else []
        self.nodes = []              # NBD target nodes we added
        self.jobs = []               # mirror jobs we started
        self.memory_started = False
        self.postcopy = False        # switchover() done
        self.paused_by_us = False
        self.cancelled = False
        self.was_running = False

    def _qmp(self, command, args=None, timeout=30.0):
        return qmp.execute(self.vmdir.control, command, args or None,
                           timeout=timeout)

    # -- start ----------------------------------------------------------

    def start_mirror(self):
        """Set the parameters and start the disk copy (if any)."""
        self.was_running = self._qmp('query-status')['status'] == 'running'
        initial = qemu_migration_params.initial_qmp(self.policy,
                                                    self.bandwidth)
        for command, args in initial:
            self._qmp(command, args)
        if not self.block:
            return                # shared storage: no disk copy
        for command, args in mirror_commands(self.spec, self.backed,
                                             self.bandwidth):
            if command == 'blockdev-add':
                self._add_nbd_target(args)
                self.nodes.append(args['node-name'])
            else:
                self._qmp(command, args, timeout=60.0)
                self.jobs.append(args['job-id'])

    def _add_nbd_target(self, args):
        """``blockdev-add`` of an NBD export on a connection made here."""
        sock = qemu_channel.connect(self.endpoint.nbd_host,
                                    self.endpoint.nbd_port, 'NBD server')
        try:
            qemu_channel.hand_over(self.vmdir.control, sock,
                                   args['server']['str'], 'blockdev-add',
                                   args, timeout=60.0)
        finally:
            sock.close()

    def _jobs(self):
        """Our mirror jobs as query-jobs reports them, by id."""
        return {j['id']: j for j in self._qmp('query-jobs')
                if j['id'] in self.jobs}

    def mirror_ready(self):
        """True once every mirror job is ready; HypervisorError if one
        failed or vanished."""
        jobs = self._jobs()
        for jid in self.jobs:
            job = jobs.get(jid)
            if job is None:
                raise base.HypervisorError('disk copy %s vanished' % jid)
            if job.get('error') or job['status'] in ('aborting',
                                                     'concluded', 'null'):
                raise base.HypervisorError('disk copy %s failed: %s' % (
                    jid, job.get('error') or job['status']))
        return all(jobs[j]['status'] == 'ready' for j in self.jobs)

    def start_memory(self):
        """The memory stream on a connection made here and accepted by the
        destination (qemu_channel), passed to QEMU: ``migrate fd:``."""
        sock = qemu_channel.connect_stream(self.endpoint.host,
                                           self.endpoint.port,
                                           self.endpoint.stream_token)
        try:
            qemu_channel.hand_over(self.vmdir.control, sock, STREAM_FD,
                                   'migrate', {'uri': 'fd:' + STREAM_FD})
        finally:
            sock.close()
        self.memory_started = True

    def release_destination(self):
        """Make a destination VM still waiting for its memory stream exit:
        QEMU 7.2 exits when an incoming stream does not load, so it gets
        one that does not (a failed migration over a shared instances path:
        Nova calls no rollback there). Once the stream went, the port is
        closed and QEMU exits by itself when the stream breaks."""
        try:
            sock = qemu_channel.connect_stream(
                self.endpoint.host, self.endpoint.port,
                self.endpoint.stream_token, timeout=10.0)
        except base.HypervisorError as e:
            LOG.debug('releasing the destination of %s: %s',
                      self.vmdir.uuid, e)
            return
        with sock:
            try:
                sock.sendall(b'not a migration stream\n' * 8)
            except OSError as e:
                LOG.debug('releasing the destination of %s: %s',
                          self.vmdir.uuid, e)

    # -- watch ----------------------------------------------------------

    def poll(self):
        info = self._qmp('query-migrate') if self.memory_started else {}
        jobs = [j for j in self._qmp('query-block-jobs')
                if j.get('device') in self.jobs]
        snap = snapshot_from(info, jobs)
        if not self.memory_started:
            snap.status = 'mirroring'
        return snap

    def apply(self, step):
        for command, args in qemu_migration_params.qmp_for_step(step):
            if command == 'migrate_cancel':
                self.cancel()
            else:
                self._qmp(command, args)

    def force_complete(self):
        """Make the migration converge now: post-copy when the policy
        enabled it and memory is moving, else stop the vCPUs (the guest
        runs again on the destination, or on the source if it fails)."""
        if self.postcopy:
            return 'postcopy'        # already switched
        if self.memory_started and getattr(self.policy, 'wants_postcopy',
                                           False):
            self._qmp('migrate-start-postcopy')
            return 'postcopy'
        self._qmp('stop')
        self.paused_by_us = True
        return 'paused'

    # -- end ------------------------------------------------------------

    def _end_jobs(self, force, timeout=JOB_END_TIMEOUT):
        """End our mirror jobs and NBD target nodes (end_mirror_jobs);
        returns the errors."""
        errors = end_mirror_jobs(self.vmdir.control, self.jobs, self.nodes,
                                 force, timeout)
        self.jobs, self.nodes = [], []
        return errors

    def finish(self):
        """After QEMU reported 'completed': complete the disk copies
        (soft cancel of ready mirrors). HypervisorError if one failed - the
        destination's disks are then not trustworthy."""
        errors = self._end_jobs(force=False)
        if errors:
            raise base.HypervisorError('disk copy did not complete: %s'
                                       % '; '.join(errors))

    def resume_destination(self):
        """After finish(): ask the destination to run the guest now (the
        disks are in sync and the source lets go of them). Returns None, or
        the reason it may not have (the guest then runs at finish_incoming,
        in Nova's post step: correct, only later). DestinationRefused when
        it certainly did not: the guest is still whole here, and
        cancel() takes it back."""
        try:
            self._request_resume('completed')
        except base.DestinationRefused:
            raise
        except base.HypervisorError as e:
            return str(e)
        return None

    def _request_resume(self, source_status):
        if not self.endpoint.resume_port:
            raise base.HypervisorError(
                'the destination opened no resume listener')
        qemu_postcopy.request_resume(self.endpoint.host,
                                     self.endpoint.resume_port,
                                     self.endpoint.resume_token,
                                     source_status)

    def switchover(self):
        """QEMU reports postcopy-active (the vCPUs here are stopped, the
        disks no longer change): complete the disk copies, then ask the
        destination to run the guest while memory still comes on demand.
        Returns None, or the reason the destination did not resume the
        guest (it then runs at finish_incoming: correct, only later).
        HypervisorError if a disk copy failed: the guest can then run on
        neither host (see docs/migration.md, "Post-copy")."""
        self.postcopy = True
        errors = self._end_jobs(force=False)
        if errors:
            raise base.HypervisorError(
                'disk copy did not complete after the switch to post-copy: '
                '%s' % '; '.join(errors))
        try:
            self._request_resume('postcopy-active')
        except base.HypervisorError as e:
            # past the switch nothing can be taken back: Nova's post step
            # runs the guest there (finish_incoming)
            return str(e)
        return None

    def cancel(self):
        """Stop everything; the guest keeps running here. Idempotent.
        Refused past the post-copy switch (the destination holds part of
        the guest's state: cancelling would lose the guest)."""
        if self.postcopy:
            raise base.HypervisorError(
                'a migration in post-copy cannot be cancelled')
        if self.hyp.pid(self.vmdir) is None:
            self.cancelled = True
            return
        if self.memory_started and self._qmp('query-migrate').get(
                'status') in POSTCOPY:
            self.postcopy = True
            raise base.HypervisorError(
                'a migration in post-copy cannot be cancelled')
        self.cancelled = True
        if self.memory_started:
            try:
                self._qmp('migrate_cancel')
            except base.HypervisorError as e:
                LOG.warning('migrate_cancel on %s: %s', self.vmdir.uuid, e)
            deadline = time.monotonic() + JOB_END_TIMEOUT
            while time.monotonic() < deadline:
                status = self._qmp('query-migrate').get('status')
                if status in FINAL or status is None:
                    break
                time.sleep(POLL)
        self._end_jobs(force=True)
        self.resume_guest()

    def resume_guest(self):
        """Run the vCPUs again if the migration (or force_complete) left
        them stopped while the guest was running before."""
        status = self._qmp('query-status')['status']
        if status != 'running' and (self.was_running or self.paused_by_us):
            self._qmp('cont')
            self.paused_by_us = False


#: incoming statuses before the guest can run here: the source holds it all
UNFINISHED_INCOMING = (None, 'none', 'setup', 'active', 'device')


def stop_unfinished_incoming(hyp, vmdir):
    """Destination, nova-compute restarted: kill the incoming VM of
    ``vmdir`` while its pre-copy stream is still loading (this process lost
    the migration's resume listener; the source keeps the guest and rolls
    back when the stream breaks). Returns the status it was killed in;
    None when left alone: not running, post-copy or completed (the guest's
    state is here, or a resume may be in flight), or its status cannot be
    read (killing a VM that may run the guest is never a guess)."""
    if hyp.pid(vmdir) is None:
        return None
    try:
        status = qmp.execute(vmdir.control, 'query-migrate').get('status')
    except base.HypervisorError as e:
        LOG.warning('incoming VM %s: cannot read its migration status (%s); '
                    'left alone', vmdir.uuid, e)
        return None
    if status not in UNFINISHED_INCOMING:
        return None
    close_listeners(vmdir)
    hyp.kill(vmdir)
    return status or 'none'


# -- an outgoing migration nobody drives any more ---------------------------

def cancel_orphaned(vmdir, resume, timeout=JOB_END_TIMEOUT):
    """The source nova-compute restarted during a live migration (Nova then
    calls live_migration_abort from its start-up, with no migration thread
    left in this process): stop what QEMU still does for it and give the
    guest back its vCPUs here. Returns what was found ('active',
    'completed', ...; None: no migration), after:

    * pre-copy still running: ``migrate_cancel``, waited for;
    * pre-copy completed (the memory went, the destination waits paused for
      a ``cont`` nobody will send): nothing to cancel, the guest runs here
      again - Nova keeps the instance on this host; on shared storage that
      needs the destination's ``late-block-activate`` (set by
      prepare_incoming: it takes the disks only at ``cont``), otherwise it
      holds their locks since the end of the stream: HypervisorError;
    * post-copy: HypervisorError - the guest runs on the destination, its
      memory is split between the hosts; nothing here may be undone;
    * our block mirror jobs: abandoned (force-cancelled and dismissed), the
      NBD target nodes removed;
    * ``resume``: ``cont`` unless the guest runs (False keeps a guest the
      user paused before the migration paused).
    """
    status = qmp.execute(vmdir.control, 'query-migrate').get('status')
    if status in POSTCOPY:
        raise base.HypervisorError(
            'the live migration of %s is in post-copy (%s): the guest runs on '
            'the destination and cannot be taken back' % (vmdir.uuid, status))
    if status not in (None, 'none') + FINAL:
        qmp.execute(vmdir.control, 'migrate_cancel')
        deadline = time.monotonic() + timeout
        while status not in FINAL:
            if time.monotonic() > deadline:
                raise base.HypervisorError(
                    'the live migration of %s did not stop within %.0f s of '
                    'migrate_cancel (%s)' % (vmdir.uuid, timeout, status))
            time.sleep(POLL)
            status = qmp.execute(vmdir.control, 'query-migrate').get(
                'status')
        status = 'active'
    jobs = [j['id'] for j in qmp.execute(vmdir.control, 'query-jobs')
            if j['id'].startswith(mirror_job(0)[:-1])]
    nodes = [n['node-name'] for n in qmp.execute(
        vmdir.control, 'query-named-block-nodes', {'flat': True})
        if n.get('node-name', '').startswith(target_node(0)[:-1])]
    # abandoned copies: what they ended with does not matter, only that
    # they ended
    stuck = end_mirror_jobs(vmdir.control, jobs, nodes, True, timeout,
                            stuck_only=True)
    if stuck:
        raise base.HypervisorError('%s (%s)' % ('; '.join(stuck), vmdir.uuid))
    if resume and qmp.execute(vmdir.control,
                              'query-status')['status'] != 'running':
        try:
            qmp.execute(vmdir.control, 'cont')
        except qmp.QMPError as e:
            if status != 'completed':
                raise
            # the destination took the disks: it runs the guest, or was
            # started without late-block-activate (QEMU then activates
            # them when the stream completes, even with -S)
            raise base.HypervisorError(
                'the live migration of %s had completed its memory copy and '
                'the destination VM holds the disks (shared storage): the '
                'guest cannot run here (%s); it is on the destination'
                % (vmdir.uuid, e))
    return None if status in (None, 'none') else status


def end_mirror_jobs(control, jobs, nodes, force, timeout,
                    stuck_only=False):
    """Cancel the mirror ``jobs`` of the QEMU on QMP socket ``control``
    (soft: finish the copy of a ready job; ``force``: abandon it), wait
    until they conclude, dismiss them, then remove the NBD target ``nodes``.
    Returns the errors the jobs ended with (``stuck_only``: only jobs that
    did not end within ``timeout`` seconds count)."""
    for jid in jobs:
        try:
            qmp.execute(control, 'block-job-cancel',
                        {'device': jid, 'force': force})
        except qmp.QMPError as e:
            LOG.debug('block-job-cancel %s: %s', jid, e)
    errors = []
    deadline = time.monotonic() + timeout
    pending = list(jobs)
    while pending:
        states = {j['id']: j for j in qmp.execute(control, 'query-jobs')}
        for jid in list(pending):
            job = states.get(jid)
            if job is None:
                pending.remove(jid)
            elif job['status'] == 'concluded':
                if job.get('error') and not stuck_only:
                    errors.append('%s: %s' % (jid, job['error']))
                try:
                    qmp.execute(control, 'job-dismiss', {'id': jid})
                except qmp.QMPError as e:
                    LOG.debug('job-dismiss %s: %s', jid, e)
                pending.remove(jid)
        if pending and time.monotonic() > deadline:
            errors.append('disk copy jobs %s did not end within %.0f s'
                          % (', '.join(pending), timeout))
            break
        if pending:
            time.sleep(POLL)
    for node in nodes:
        try:
            qmp.execute(control, 'blockdev-del', {'node-name': node})
        except qmp.QMPError as e:
            LOG.debug('blockdev-del %s: %s', node, e)
    return errors
