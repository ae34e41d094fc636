"""Warm migration: cold migrate / resize without rebooting the guest.

With ``[bhyve] warm_migration = True`` Nova's cold migrate and resize keep
the guest's memory: on the source the running VM is suspended (the
backend's save: QEMU migration to a file, bhyve ``bhyvectl --suspend``)
into the instance directory instead of being powered off; the state files
(and the console log, so the guest's console history continues) move with
the disks (migration/cold.py: move_out); the destination restores the VM from
them instead of booting it. The source's ``<uuid>_resize`` copy keeps its
own state file, so a revert resumes the guest on the source as it was when
it was suspended. Confirm deletes that copy with the rest of the directory.

When a migration is cold instead (the decision and why are logged, see
``choose``): the option is off; the backend cannot save (bhyve without
BHYVE_SNAPSHOT); the guest is not running; the new flavor changes vCPUs or
memory (the saved state holds the old CPU and RAM layout: QEMU refuses to
load it into a machine with another ``-m``/``-smp``, bhyve restores the
snapshot's own sizes); the VM has devices the destination does not rebuild
(a config drive or volumes: finish_migration rebuilds the root disk and
the NICs only); or the save fails (the VM then keeps running and is
powered off the usual way).

A bigger root disk does not prevent a warm migration: the disk file grows
before the restore, and the restored guest keeps the capacity it read at
boot until told otherwise. QEMU: after the restore the driver re-announces
the disk size (QMP ``block_resize`` to the current size), the virtio-blk
device raises a config-change interrupt and the guest sees the new size at
once (checked by the functional test). bhyve has no such notification: the
guest sees the new size after its next boot.

A restore that fails on the destination (a corrupt or incompatible state,
a QEMU refusing it) is never fatal to the instance: the failure is
recorded as a failed instance-action event with the reason (``openstack
server event show``), the destination's copy of the state is discarded and
the guest boots from its moved disk there - what a cold migration would
have done. Nothing is lost: the source still holds the disk and the state
as they were saved, and reverting the resize resumes the original guest.
"""
import os

from nova import exception
from nova.compute import power_state
from nova.compute import utils as compute_utils
from oslo_log import log as logging
from oslo_serialization import jsonutils

from nova_bhyve import conf
from nova_bhyve.hypervisor import base

LOG = logging.getLogger(__name__)
CONF = conf.CONF

WARM = 'warm'
COLD = 'cold'

#: instance-action events recording each warm step (visible with
#: ``openstack server event show``; a failure carries its reason)
EVENT_SAVE = 'compute_bhyve_warm_migration_save'
EVENT_RESTORE = 'compute_bhyve_warm_migration_restore'

CONSOLE_LOG = 'console.log'


class Mode:
    """How one migration moves the guest, and why."""

    def __init__(self, mode, reason):
        self.mode = mode
        self.reason = reason

    @property
    def warm(self):
        return self.mode == WARM

    def __repr__(self):
        return '%s (%s)' % (self.mode, self.reason)


def signature(spec):
    """What a saved VM state depends on in ``spec``: the virtual hardware
    (CPUs, memory, devices in order), not where its files are. A state
    saved from one spec can be restored with another of equal signature."""
    return {
        'vcpus': spec.vcpus,
        'memory_mb': spec.memory_mb,
        'disks': [[d.format, d.bus, d.device, bool(d.readonly), d.serial]
                  for d in spec.disks],
        'nics': [[n.model, n.mac.lower(), n.mtu] for n in spec.nics],
        'direct_kernel_boot': bool(spec.boot.kernel),
        'hotplug_ports': spec.hotplug_ports,
        'framebuffer': bool(spec.consoles.vnc_host and
                            spec.consoles.vnc_port),
    }


def choose(hypervisor, vmdir, spec, flavor, rebuilt_disks):
    """Warm or cold for moving the VM of ``spec`` to ``flavor``.

    ``rebuilt_disks``: names of the disk files the destination rebuilds the
    spec with (the root disk)."""
    if not CONF.bhyve.warm_migration:
        return Mode(COLD, '[bhyve] warm_migration is off')
    if not hypervisor.can_save():
        return Mode(COLD, '%s cannot save VM state on this host'
                    % hypervisor.name)
    state = hypervisor.power_state(vmdir)
    if state != power_state.RUNNING:
        return Mode(COLD, 'the guest is not running (power state %s)'
                    % power_state.STATE_MAP.get(state, state))
    if (flavor.vcpus, flavor.memory_mb) != (spec.vcpus, spec.memory_mb):
        return Mode(COLD, 'the new flavor changes vCPUs/memory (%d/%d MiB '
                    '-> %d/%d MiB): a saved state restores only into the '
                    'same CPUs and memory' % (spec.vcpus, spec.memory_mb,
                                              flavor.vcpus,
                                              flavor.memory_mb))
    names = [os.path.basename(d.path) for d in spec.disks]
    if names != list(rebuilt_disks) or any(d.serial for d in spec.disks):
        return Mode(COLD, 'the VM has disks the destination does not '
                    'rebuild (%s): a config drive or volumes'
                    % ', '.join(names))
    return Mode(WARM, 'the guest is suspended here and resumed there')


def _reporter(context, event, host, instance):
    """An instance-action event around a warm step (none without a
    request context: unit tests drive the driver without one)."""
    if context is None:
        return _NoEvent()
    return compute_utils.EventReporter(context, event, host, instance.uuid,
                                       graceful_exit=True)


class _NoEvent:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def save(hypervisor, vmdir, spec, context, host, instance):
    """Suspend the VM into ``vmdir``. Returns the warm part of the disk_info
    (files to move, the hardware signature), or None when the save failed
    (logged and recorded; the backend lets a VM whose save failed run on,
    the caller then powers it off as for a cold migration)."""
    try:
        with _reporter(context, EVENT_SAVE, host, instance):
            try:
                hypervisor.save(vmdir)
            except (base.HypervisorError, NotImplementedError,
                    OSError) as e:
                # a Nova exception: its message is the event's details
                raise exception.InstanceSuspendFailure(
                    reason=str(e) or 'not supported') from e
    except exception.InstanceSuspendFailure as e:
        LOG.warning('warm migration: saving the VM state failed (%s); '
                    'migrating cold', e, instance=instance)
        hypervisor.discard_saved_state(vmdir)
        return None
    files = [os.path.basename(p) for p in
             [vmdir.saved_state] + list(hypervisor.saved_state_extra(vmdir))]
    if os.path.exists(os.path.join(vmdir.path, CONSOLE_LOG)):
        files.append(CONSOLE_LOG)
    return {'files': files, 'signature': signature(spec)}


def parse(disk_info):
    """The warm part of a disk_info from migrate_disk_and_power_off, or
    None for a cold migration."""
    try:
        info = jsonutils.loads(disk_info or '{}')
    except ValueError:
        return None
    return info.get(WARM) if isinstance(info, dict) else None


def restore(hypervisor, spec, vmdir, context, host, instance,
            expected_signature=None, grown_disks=()):
    """Resume the VM of ``spec`` from the state saved in ``vmdir``.

    Returns True when the guest runs again from its state. False when the
    caller must boot it instead (the restore failed or does not fit the
    spec): the reason is logged and recorded as a failed instance-action
    event, and the state files here are discarded (a boot must not leave
    a SUSPENDED-looking directory behind).

    ``grown_disks``: (index, size) of disks whose files grew while the VM
    was saved: the running guest is told their new size where the backend
    can (QEMU), else it sees it at its next boot."""
    try:
        with _reporter(context, EVENT_RESTORE, host, instance):
            try:
                if expected_signature is not None and \
                        signature(spec) != expected_signature:
                    raise base.HypervisorError(
                        'the VM here would not match the saved state: '
                        '%s != %s' % (signature(spec), expected_signature))
                hypervisor.restore(spec, vmdir)
            except (base.HypervisorError, NotImplementedError,
                    OSError) as e:
                raise exception.InstanceResumeFailure(
                    reason=str(e) or 'not supported') from e
    except exception.InstanceResumeFailure as e:
        LOG.warning('warm migration: cannot resume the guest from its saved '
                    'state (%s); booting it from its disk instead (the '
                    'source keeps its state until the resize is confirmed: '
                    'a revert resumes it there)', e, instance=instance)
        hypervisor.discard_saved_state(vmdir)
        return False
    for index, size in grown_disks:
        try:
            hypervisor.announce_disk_size(vmdir, index, size)
            LOG.info('warm migration: the guest was told disk %d grew to %d '
                     'bytes', index, size, instance=instance)
        except NotImplementedError:
            LOG.info('warm migration: %s cannot tell a running guest that '
                     'disk %d grew; the guest sees %d bytes at its next '
                     'boot', hypervisor.name, index, size, instance=instance)
        except base.HypervisorError as e:
            LOG.warning('warm migration: telling the guest disk %d grew '
                        'failed: %s; it sees the new size at its next boot',
                        index, e, instance=instance)
    return True
