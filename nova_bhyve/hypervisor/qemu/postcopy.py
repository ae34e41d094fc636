"""The resume channel of a QEMU live migration: the source tells the
destination when to run the guest.

The destination QEMU is started with ``-S``: it does not run the guest on
its own when the memory stream ends, nor at a post-copy switch (QEMU 7.2
keeps it ``paused`` at ``postcopy-active``: checked by experiment and
tests/interop/test_qemu_postcopy_interop.py). Without ``-S`` it could start
the guest before the source has finished copying the disks. The source
decides the moment, once the disks are in sync, in two cases:

* pre-copy: QEMU reports ``completed`` (the source's vCPUs are stopped, all
  memory sent) and the block mirrors into the destination's NBD exports
  completed (hypervisor/qemu/migration.py: OutgoingMigration.finish, then
  ``resume_destination``) - the point where libvirt's Finish phase resumes
  the guest, before Nova's post step;
* post-copy: QEMU reports ``postcopy-active`` (the source's vCPUs are
  stopped, the disks no longer change), the mirrors completed
  (``switchover``); the guest then runs while its remaining memory pages
  are fetched on demand from the source.

Either way:

1. the destination opened its *resume listener* in prepare_incoming (for
   every QEMU live migration): an address and port in the Endpoint, plus a
   per-migration token;
2. the source connects and sends the token;
3. the destination checks the token and the incoming migration's status
   (``postcopy-active`` or ``completed``), stops its NBD server and runs the
   guest (QMP ``cont``); it answers ``ok`` or the error.

The source states what it saw (``completed`` or ``postcopy-active``): it
sees it first - QEMU's source does not wait for the destination, which may
still be loading the device state that ends the stream or carries the
switch - so the destination waits up to SOURCE_AHEAD_WAIT seconds for its
own status to say the same. It runs the guest only on its own status, never
on the source's word (while pre-copy memory is still coming, the guest
would run on stale pages).

The listener lives in the destination's nova-compute process. If it is gone
(nova-compute restarted) nothing answers: a refusal - the destination
certainly did not run the guest - as is an answer starting ``refused:``
(it did nothing). After a completed pre-copy the source then takes the
guest back and fails the migration (migration/runner.py: Migration
._resume_destination; shared instances path and post-copy: the guest runs
once Nova's post_live_migration_at_destination is reached instead -
finish_incoming, which also closes the listener and runs ``cont`` only if
the guest is not running yet). An ``error:`` answer or none leaves the
outcome unknown: the post step, never a second copy of the guest.
"""
import hmac
import secrets
import socket
import threading
import time

from oslo_log import log as logging

from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import qmp

LOG = logging.getLogger(__name__)

#: seconds the source waits for the destination's answer
RESUME_TIMEOUT = 60.0
#: incoming migration statuses in which the guest may run
RESUMABLE = ('postcopy-active', 'completed')
#: incoming statuses while the stream is still being loaded
LOADING = ('setup', 'active', 'device')
#: seconds the destination waits for its own status to catch up with the
#: one the source reported ('completed' or 'postcopy-active')
SOURCE_AHEAD_WAIT = 10.0
_MAX_LINE = 256
#: how an answer starts when the destination did nothing (the guest did not
#: run here); 'error: ' means it may have got part of the way
REFUSED = 'refused: '

_listeners = {}
_lock = threading.Lock()


def resume_now(vmdir, timeout=30.0, source_status=None):
    """Destination: run the incoming guest now; returns the incoming
    migration's status. DestinationRefused, having done nothing, unless it
    is in post-copy or completed (never while pre-copy memory is still
    coming: the guest would run on stale pages) or when its status cannot
    be read (the VM is gone); HypervisorError if running it failed.
    ``source_status``: what the source reported ('completed' or
    'postcopy-active'); the end of the stream or the switch may still be
    loading here, so wait up to SOURCE_AHEAD_WAIT seconds for this side to
    get there too."""
    try:
        status = _caught_up_status(vmdir, source_status)
    except base.HypervisorError as e:
        raise base.DestinationRefused(
            'cannot read the incoming migration of %s: %s' % (vmdir.uuid, e))
    if status not in RESUMABLE:
        raise base.DestinationRefused(
            'the incoming migration of %s is %s%s: not in post-copy nor '
            'completed, the guest cannot run here yet' % (
                vmdir.uuid, status,
                ' (the source reported %s)' % source_status
                if source_status else ''))
    try:
        qmp.execute(vmdir.control, 'nbd-server-stop')
    except qmp.QMPError as e:
        LOG.debug('nbd-server-stop on %s: %s', vmdir.uuid, e)
    if qmp.execute(vmdir.control, 'query-status')['status'] != 'running':
        qmp.execute(vmdir.control, 'cont', timeout=timeout)
    state = qmp.execute(vmdir.control, 'query-status')['status']
    if state != 'running':
        raise base.HypervisorError('instance %s is %s after cont'
                                   % (vmdir.uuid, state))
    return status


def _caught_up_status(vmdir, source_status):
    status = qmp.execute(vmdir.control, 'query-migrate').get('status')
    deadline = time.monotonic() + SOURCE_AHEAD_WAIT
    while (source_status in RESUMABLE and status in LOADING
           and time.monotonic() < deadline):
        time.sleep(0.01)
        status = qmp.execute(vmdir.control, 'query-migrate').get('status')
    return status


class ResumeListener:
    """Destination: waits (in a thread) for the source's one resume request
    for the incoming VM in ``vmdir`` (post-copy switch or pre-copy
    completion)."""

    def __init__(self, vmdir, host):
        self.vmdir = vmdir
        self.token = secrets.token_hex(16)
        family = socket.AF_INET6 if ':' in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(4)
        self.sock.settimeout(1.0)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        self.resumed = False
        #: the incoming QEMU's pid (None: no pid file, nothing to watch)
        self._pid = vmdir.read_pid()
        self._thread = threading.Thread(
            target=self._serve, daemon=True,
            name='migration-resume-%s' % vmdir.uuid)
        self._thread.start()

    def _serve(self):
        while not self.closed and not self.resumed:
            try:
                conn, peer = self.sock.accept()
            except socket.timeout:
                if self._vm_gone():
                    LOG.debug('the incoming VM %s is gone: its resume '
                              'listener closes', self.vmdir.uuid)
                    break
                continue
            except OSError:
                break
            with conn:
                self._answer(conn, peer)
        _forget(self)
        self.close()

    def _vm_gone(self):
        """The incoming VM's process ended (a failed migration over a shared
        instances path: Nova calls no rollback on the destination, the
        QEMU exits on its own - nothing else would close this listener)."""
        return self._pid is not None and not base.process_alive(
            self._pid, self.vmdir.uuid)

    def _answer(self, conn, peer):
        conn.settimeout(10.0)
        try:
            line = conn.makefile('rb').readline(_MAX_LINE).strip().decode(
                'ascii', 'replace')
        except OSError as e:
            LOG.warning('resume request from %s: %s', peer, e)
            return
        token, _, source_status = line.partition(' ')
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            LOG.warning('resume request for %s from %s with a '
                        'wrong token: ignored', self.vmdir.uuid, peer)
            reply = REFUSED + 'wrong token'
        else:
            try:
                status = resume_now(self.vmdir,
                                    source_status=source_status or None)
                self.resumed = True
                reply = 'ok'
                if status == 'completed':
                    LOG.info('the guest %s runs here: the source completed '
                             'the migration', self.vmdir.uuid)
                else:
                    LOG.info('post-copy: the guest %s runs here; its '
                             'remaining memory comes from the source on '
                             'demand', self.vmdir.uuid)
            except (base.HypervisorError, OSError) as e:
                LOG.error('resume of %s failed: %s',
                          self.vmdir.uuid, e)
                # refused: nothing was done here, the guest did not run
                reply = ('%s%s' % (
                    REFUSED if isinstance(e, base.DestinationRefused)
                    else 'error: ', e))
        try:
            conn.sendall(reply.encode() + b'\n')
        except OSError:
            pass

    def close(self):
        self.closed = True
        try:
            # stop listening now: close() alone leaves the socket open until
            # the accept() in progress in _serve returns, and a request
            # meanwhile would be taken, then reset - not refused
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def listen(vmdir, host):
    """Open the resume listener of the incoming VM in ``vmdir``; returns
    (port, token)."""
    listener = ResumeListener(vmdir, host)
    with _lock:
        old = _listeners.pop(vmdir.path, None)
        _listeners[vmdir.path] = listener
    if old:
        old.close()
    return listener.port, listener.token


def _forget(listener):
    """Drop ``listener`` from the registry if it is still the one there."""
    with _lock:
        if _listeners.get(listener.vmdir.path) is listener:
            del _listeners[listener.vmdir.path]


def close(vmdir):
    """Close the resume listener of ``vmdir`` (if any)."""
    with _lock:
        listener = _listeners.pop(vmdir.path, None)
    if listener:
        listener.close()


def request_resume(host, port, token, source_status,
                   timeout=RESUME_TIMEOUT):
    """Source: ask the destination to run the guest now; ``source_status``
    is what QEMU reports here ('completed', or 'postcopy-active' at a
    post-copy switch). DestinationRefused when the destination certainly
    did not run the guest (unreachable, or it refused before acting),
    HypervisorError when that is not known (no answer, or an error after it
    started)."""
    if source_status not in RESUMABLE:
        raise ValueError('resume requested at %r' % (source_status,))
    line = '%s %s' % (token, source_status)
    try:
        s = socket.create_connection((host.strip('[]'), int(port)),
                                     timeout=timeout)
    except OSError as e:
        # nothing was sent: the destination did not run the guest (its
        # nova-compute restarted and lost the listener, or it is gone)
        raise base.DestinationRefused('cannot reach the destination to '
                                      'resume the guest: %s' % e)
    try:
        with s:
            s.sendall(line.encode() + b'\n')
            reply = s.makefile('rb').readline(_MAX_LINE).strip().decode(
                'utf-8', 'replace')
    except OSError as e:
        raise base.HypervisorError('no answer from the destination to the '
                                   'resume request: %s' % e)
    if reply.startswith(REFUSED):
        raise base.DestinationRefused('the destination did not resume the '
                                      'guest: %s' % reply)
    if reply != 'ok':
        raise base.HypervisorError('the destination did not resume the '
                                   'guest: %s' % (reply or 'no answer'))
