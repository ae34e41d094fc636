"""Post-copy switchover of a QEMU live migration across two hosts.

QEMU 7.2 keeps a destination started with ``-S`` paused when the source
switches to post-copy (``migrate-start-postcopy``): both sides report
``postcopy-active``, the destination's run state is ``paused`` (checked by
experiment, and tests/interop/test_qemu_postcopy_interop.py). Without ``-S`` it
would start the guest at the switch, before the source has finished copying
the disks - so ``-S`` stays, and the destination is told to run the guest
once the disks are in sync:

1. the source sees ``postcopy-active`` (its vCPUs are stopped: the disks no
   longer change), completes its block mirrors into the destination's NBD
   exports (qemu_migration.OutgoingMigration.switchover);
2. it connects to the destination's *resume listener* (an address and port
   in the Endpoint, opened by prepare_incoming when the policy may switch to
   post-copy) and sends the per-migration token;
3. the destination checks the token, stops its NBD server and runs the
   guest (QMP ``cont``) while the remaining memory pages are still fetched
   on demand from the source; it answers ``ok`` or the error.

The listener lives in the destination's nova-compute process. If it is gone
(nova-compute restarted) the resume fails on the source with a warning and
the guest runs once Nova's post_live_migration_at_destination is reached -
correct, only without the benefit of post-copy.
"""
import hmac
import secrets
import socket
import threading

from oslo_log import log as logging

from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor import qmp

LOG = logging.getLogger(__name__)

#: seconds the source waits for the destination's answer
RESUME_TIMEOUT = 60.0
#: incoming migration statuses in which the guest may run
RESUMABLE = ('postcopy-active', 'completed')
_MAX_LINE = 256

_listeners = {}
_lock = threading.Lock()


def resume_now(vmdir, timeout=30.0):
    """Destination: run the incoming guest during post-copy. HypervisorError
    unless the incoming migration is in post-copy (or completed)."""
    status = qmp.execute(vmdir.control, 'query-migrate').get('status')
    if status not in RESUMABLE:
        raise base.HypervisorError(
            'the incoming migration of %s is %s: not in post-copy, the guest '
            'cannot run here yet' % (vmdir.uuid, status))
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


class ResumeListener:
    """Destination: waits (in a thread) for the source's one resume request
    for the incoming VM in ``vmdir``."""

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
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name='postcopy-resume-%s' % vmdir.uuid)
        self._thread.start()

    def _serve(self):
        while not self.closed and not self.resumed:
            try:
                conn, peer = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            with conn:
                self._answer(conn, peer)
        self.close()

    def _answer(self, conn, peer):
        conn.settimeout(10.0)
        try:
            line = conn.makefile('rb').readline(_MAX_LINE).strip().decode(
                'ascii', 'replace')
        except OSError as e:
            LOG.warning('post-copy resume request from %s: %s', peer, e)
            return
        if not hmac.compare_digest(line, self.token):
            LOG.warning('post-copy resume request for %s from %s with a '
                        'wrong token: ignored', self.vmdir.uuid, peer)
            reply = 'error: wrong token'
        else:
            try:
                resume_now(self.vmdir)
                self.resumed = True
                reply = 'ok'
                LOG.info('post-copy: the guest %s runs here; its remaining '
                         'memory comes from the source on demand',
                         self.vmdir.uuid)
            except (base.HypervisorError, OSError) as e:
                LOG.error('post-copy resume of %s failed: %s',
                          self.vmdir.uuid, e)
                reply = 'error: %s' % e
        try:
            conn.sendall(reply.encode() + b'\n')
        except OSError:
            pass

    def close(self):
        self.closed = True
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


def close(vmdir):
    """Close the resume listener of ``vmdir`` (if any)."""
    with _lock:
        listener = _listeners.pop(vmdir.path, None)
    if listener:
        listener.close()


def request_resume(host, port, token, timeout=RESUME_TIMEOUT):
    """Source: ask the destination to run the guest now. HypervisorError
    with the destination's reason when it did not."""
    try:
        with socket.create_connection((host.strip('[]'), int(port)),
                                      timeout=timeout) as s:
            s.sendall(token.encode() + b'\n')
            reply = s.makefile('rb').readline(_MAX_LINE).strip().decode(
                'utf-8', 'replace')
    except OSError as e:
        raise base.HypervisorError('cannot reach the destination to resume '
                                   'the guest: %s' % e)
    if reply != 'ok':
        raise base.HypervisorError('the destination did not resume the '
                                   'guest: %s' % (reply or 'no answer'))
