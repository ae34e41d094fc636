"""Files handed to a running QEMU as descriptors, over QMP (SCM_RIGHTS).

Every run-time operation that needs a file gets a descriptor the driver
opened, as libvirt hands them over, never a path QEMU would open itself:

* block nodes: ``add-fd`` puts the descriptor into a new fdset (QEMU
  chooses the id: the lowest one no set has, atomically, so two operations
  at once never share a set, and no set a node uses is ever reused), and
  the node's ``file.filename`` is ``/dev/fdset/N`` (QEMU dups the
  descriptor of the access mode it asks for);
* everything else (a tap, a migration stream): ``getfd`` names the
  descriptor, the command consuming it takes the name (``fd=NAME``,
  ``fd:NAME``).

The command that consumes a descriptor runs on the same qmp.Session as the
one that passed it (QEMU may close an unused fdset when the monitor
connection that made it closes). The driver's copy is closed once QEMU has
its own.

An fdset outlives the node that used it (QEMU closes it only when it is
removed, or when no monitor is connected): whoever deletes a node removes
its sets afterwards (``remove_unused``). QEMU closes a removed set's
descriptor at once while the guest runs, else at its next cleanup (a
monitor connection closing) once it runs.
"""
import os
import re

from oslo_log import log as logging

from nova_bhyve.hypervisor import base

LOG = logging.getLogger(__name__)

_FDSET = re.compile(r'/dev/fdset/(\d+)')


def fdset_path(fdset):
    return '/dev/fdset/%d' % fdset


def open_file(path, readonly=False, create_mode=None):
    """A close-on-exec descriptor of ``path``: O_RDONLY or O_RDWR; with
    ``create_mode``, O_WRONLY created (or truncated) with that mode."""
    if create_mode is not None:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC |
                       os.O_CLOEXEC, create_mode)
    return os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) |
                   os.O_CLOEXEC)


def add_fd(session, fd, opaque):
    """Put ``fd`` into a new fdset (its id chosen by QEMU); returns the
    id. ``opaque`` (the file's path) is what query-fdsets shows."""
    return session.execute('add-fd', {'opaque': opaque},
                           fds=[fd])['fdset-id']


def add_file(session, path, readonly):
    """Open ``path`` and put it into a new fdset; returns the set's id.
    The driver's descriptor is closed again (QEMU holds its own)."""
    try:
        fd = open_file(path, readonly)
    except OSError as e:
        raise base.HypervisorError('cannot open %s: %s' % (path, e))
    try:
        return add_fd(session, fd, path)
    finally:
        os.close(fd)


def give(session, name, fd):
    """``getfd``: QEMU holds a copy of ``fd`` under ``name`` until a
    command consumes it (or ``closefd``)."""
    session.execute('getfd', {'fdname': name}, fds=[fd])


def take_back(session, name):
    """``closefd`` of a name no command consumed (a rollback step: its
    failure is logged)."""
    try:
        session.execute('closefd', {'fdname': name})
    except base.HypervisorError as e:
        LOG.debug('closefd %s: %s', name, e)


def rollback(session, command, arguments):
    """A rollback step (``blockdev-del``, ``netdev_del``... of what was
    just added): its failure is logged, so that the caller raises the
    error that made it roll back."""
    try:
        session.execute(command, arguments)
    except base.HypervisorError as e:
        LOG.warning('rollback: %s %s failed: %s', command, arguments, e)


def opaque_fdsets(session, opaques):
    """Ids of the fdsets holding a descriptor whose opaque is one of
    ``opaques`` (the paths add_file was given)."""
    opaques = set(opaques)
    return {s['fdset-id'] for s in session.execute('query-fdsets')
            if any(f.get('opaque') in opaques for f in s.get('fds', ()))}


def _node_files(session):
    return {n.get('node-name'): n.get('file') or ''
            for n in session.execute('query-named-block-nodes')}


def node_fdsets(session, match):
    """Ids of the fdsets the block nodes whose name satisfies ``match``
    read from (their backing nodes' included: a node's filename names its
    whole tree, ``json:{...}`` when it has explicit children)."""
    out = set()
    for name, filename in _node_files(session).items():
        if name and match(name):
            out.update(int(n) for n in _FDSET.findall(filename))
    return out


def remove_unused(session, fdsets):
    """``remove-fd`` each of ``fdsets`` that no block node uses any more
    (one still in use is left alone: QEMU may reopen it by its name).
    Errors are logged, not raised: this is cleanup after the operation."""
    if not fdsets:
        return set()
    try:
        used = set()
        for filename in _node_files(session).values():
            used.update(int(n) for n in _FDSET.findall(filename))
    except base.HypervisorError as e:
        LOG.warning('cannot list block nodes, fdsets %s kept: %s',
                    sorted(fdsets), e)
        return set()
    removed = set()
    for fdset in sorted(set(fdsets) - used):
        try:
            session.execute('remove-fd', {'fdset-id': fdset})
            removed.add(fdset)
        except base.HypervisorError as e:
            LOG.warning('remove-fd %d: %s', fdset, e)
    if set(fdsets) & used:
        LOG.debug('fdsets %s still in use, kept', sorted(set(fdsets) & used))
    return removed
