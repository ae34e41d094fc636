"""Live disk snapshots on a running QEMU: freeze a disk, merge it back.

freeze (libvirt's way, QEMU opens no path): the driver creates the qcow2
overlay itself (libvdsk; the disk's image named as its backing file in the
header, for whoever reads the file later), opens it, hands QEMU the
descriptor (``add-fd``) and adds the overlay node on ``/dev/fdset/N`` with
``backing: null`` (QEMU must not open a backing file by its name); then
``blockdev-snapshot`` puts the node on top of the disk's (QEMU flushes and
drains the disk first, then the guest writes into the overlay): the disk's
own file - and everything under it - stops changing and can be read by
anyone.

thaw: ``block-commit`` of the active layer (the overlay) into the disk
node, ``block-job-complete`` once the job is ready, wait until the job is
gone and the disk node is the device's top node again, ``blockdev-del``
the overlay node and ``remove-fd`` its fdset, remove the overlay file.
The instance ends with the disk layout (and descriptors) it had before.

Node names follow qemu.render_argv: disk N is node ``diskN``; its overlay
is ``diskN-snap``.
"""
import os
import time

from oslo_log import log as logging

from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import fdpass
from nova_bhyve.hypervisor.qemu import qmp
from nova_bhyve.storage import vdsk

LOG = logging.getLogger(__name__)

POLL = 0.05
COMMIT_TIMEOUT = 600.0
QMP_TIMEOUT = 60.0


def node(index):
    return 'disk%d' % index


def overlay_node(index):
    return 'disk%d-snap' % index


def job_id(index):
    return 'nb-commit-disk%d' % index


def overlay_blockdev(index, fdset):
    """blockdev-add arguments of disk ``index``'s overlay on ``fdset``
    (pure). discard=unmap as the disk node has (blockdev-snapshot-sync
    gave its overlay the disk's flags)."""
    return {'driver': 'qcow2', 'node-name': overlay_node(index),
            'discard': 'unmap', 'backing': None,
            'file': {'driver': 'file', 'filename': fdpass.fdset_path(fdset)}}


def snapshot_command(index):
    return ('blockdev-snapshot', {'node': node(index),
                                  'overlay': overlay_node(index)})


def commit_command(index):
    # base-node is essential: without it QEMU commits the whole chain
    # into its bottom image - the shared, cached Glance image.
    return ('block-commit', {'job-id': job_id(index),
                             'device': overlay_node(index),
                             'top-node': overlay_node(index),
                             'base-node': node(index),
                             'auto-dismiss': True})


def _virtual_size(session, name):
    for n in session.execute('query-named-block-nodes'):
        if n.get('node-name') == name:
            return n['image']['virtual-size']
    raise base.HypervisorError('no block node %s' % name)


def freeze(control, index, overlay, backing=None, backing_fmt=None):
    """Put a new qcow2 ``overlay`` (created here, of the disk node's size;
    ``backing``/``backing_fmt`` only written into its header) on top of
    disk ``index``. On failure QEMU is left as it was; the overlay file
    is the caller's to remove."""
    with qmp.Session(control, QMP_TIMEOUT) as s:
        size = _virtual_size(s, node(index))
        try:
            vdsk.create(overlay, 'qcow2', size, backing=backing,
                        backing_fmt=backing_fmt)
        except OSError as e:
            raise base.HypervisorError('cannot create the overlay %s: %s'
                                       % (overlay, e))
        fdset = fdpass.add_file(s, overlay, readonly=False)
        try:
            s.execute('blockdev-add', overlay_blockdev(index, fdset))
            try:
                s.execute(*snapshot_command(index))
            except base.HypervisorError:
                fdpass.rollback(s, 'blockdev-del',
                                {'node-name': overlay_node(index)})
                raise
        except base.HypervisorError:
            fdpass.remove_unused(s, {fdset})
            raise


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
    qmp.execute(control, command, args, timeout=QMP_TIMEOUT)
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
    with qmp.Session(control, QMP_TIMEOUT) as s:
        fdsets = fdpass.node_fdsets(s, lambda n: n == overlay_node(index))
        fdsets |= fdpass.opaque_fdsets(s, [overlay])
        try:
            s.execute('blockdev-del', {'node-name': overlay_node(index)})
        except qmp.QMPError as e:
            LOG.warning('blockdev-del %s: %s', overlay_node(index), e)
        fdpass.remove_unused(s, fdsets)
    os.unlink(overlay)
