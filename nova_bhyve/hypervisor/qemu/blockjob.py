"""Live disk snapshots on a running QEMU: freeze a disk, merge it back.

freeze: ``blockdev-snapshot-sync`` puts a new qcow2 overlay on top of the
disk's node (QEMU flushes and drains the disk first, then the guest writes
into the overlay): the disk's own file - and everything under it - stops
changing and can be read by anyone.

thaw: ``block-commit`` of the active layer (the overlay) into the disk
node, ``block-job-complete`` once the job is ready, wait until the job is
gone and the disk node is the device's top node again, remove the overlay.
The instance ends with the disk layout it had before.

Node names follow qemu.render_argv: disk N is node ``diskN``; its overlay
is ``diskN-snap``.
"""
import os
import time

from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import qmp

POLL = 0.05
COMMIT_TIMEOUT = 600.0


def node(index):
    return 'disk%d' % index


def overlay_node(index):
    return 'disk%d-snap' % index


def job_id(index):
    return 'nb-commit-disk%d' % index


def freeze_commands(index, overlay):
    """The QMP commands that freeze disk ``index`` (pure)."""
    return [('blockdev-snapshot-sync', {
        'node-name': node(index), 'snapshot-file': overlay,
        'snapshot-node-name': overlay_node(index), 'format': 'qcow2',
        'mode': 'absolute-paths'})]


def commit_command(index):
    # base-node is essential: without it QEMU commits the whole chain
    # into its bottom image - the shared, cached Glance image.
    return ('block-commit', {'job-id': job_id(index),
                             'device': overlay_node(index),
                             'top-node': overlay_node(index),
                             'base-node': node(index),
                             'auto-dismiss': True})


def freeze(control, index, overlay):
    for command, args in freeze_commands(index, overlay):
        qmp.execute(control, command, args, timeout=60.0)


def _job(control, jid):
    for job in qmp.execute(control, 'query-block-jobs'):
        if job.get('device') == jid:
            return job
    return None


def _top_node(control, index):
    """node-name of the top node of the device holding disk ``index``
    (its BlockBackend is anonymous: found by the node names we gave)."""
    for dev in qmp.execute(control, 'query-block'):
        top = (dev.get('inserted') or {}).get('node-name')
        if top in (node(index), overlay_node(index)):
            return top
    return None


def thaw(control, index, overlay, timeout=COMMIT_TIMEOUT):
    """Commit ``overlay`` into disk ``index`` and remove it."""
    jid = job_id(index)
    command, args = commit_command(index)
    qmp.execute(control, command, args, timeout=60.0)
    deadline = time.monotonic() + timeout
    completed = False
    while True:
        job = _job(control, jid)
        if job is None:
            break
        if job.get('ready') and not completed:
            qmp.execute(control, 'block-job-complete', {'device': jid})
            completed = True
        if time.monotonic() > deadline:
            qmp.execute(control, 'block-job-cancel', {'device': jid})
            raise base.HypervisorError(
                'merging the snapshot overlay of disk %d did not finish '
                'within %.0f s' % (index, timeout))
        time.sleep(POLL)
    top = _top_node(control, index)
    if top != node(index):
        raise base.HypervisorError(
            'merging overlay %s back failed: the disk top node is %s'
            % (overlay, top))
    os.unlink(overlay)
