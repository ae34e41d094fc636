"""The per-instance directories under instances_path, and their spec files.

``<instances_path>/<uuid>/`` holds an instance's spec (``spec.json``), its
VM's pid file, sockets and console log, and its disks; hypervisor.base.VMDir
names those files. Every other module reaches them through an
InstanceStore. A spec is written only here: under one lock per directory
and atomically (a temporary file, fsync, rename), so a crash leaves the old
spec or the new one, never half of one, and two operations changing the
same spec (a volume attach racing an interface attach) never lose each
other's change - they use ``updating``.
"""
import contextlib
import os
import shutil

from nova import exception
from oslo_concurrency import lockutils
from oslo_log import log as logging
from oslo_utils import uuidutils

from nova_bhyve import guest
from nova_bhyve.hypervisor import base

LOG = logging.getLogger(__name__)

SPEC = 'spec.json'


def _lock(vmdir):
    return lockutils.lock('nova-bhyve-spec-' + os.path.abspath(vmdir.path))


def _spec_path(vmdir, name):
    return os.path.join(vmdir.path, name)


def read_spec(vmdir, name=SPEC):
    """The VMSpec saved in ``vmdir`` (OSError, ValueError when there is
    none or it is unreadable)."""
    with open(_spec_path(vmdir, name)) as f:
        return guest.VMSpec.from_json(f.read())


def _write(vmdir, spec, name):
    path = _spec_path(vmdir, name)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(spec.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_spec(vmdir, spec, name=SPEC):
    """Save ``spec`` in ``vmdir`` (atomically, under the directory's
    lock)."""
    with _lock(vmdir):
        _write(vmdir, spec, name)


@contextlib.contextmanager
def updating(vmdir, name=SPEC):
    """``with updating(vmdir) as spec:`` - read, change, and save the spec
    when the block ends without an exception, all under the directory's
    lock."""
    with _lock(vmdir):
        spec = read_spec(vmdir, name)
        yield spec
        _write(vmdir, spec, name)


def write_spec_if_unchanged(vmdir, spec, before, name=SPEC):
    """Save ``spec`` only if the saved one still reads ``before`` (its JSON
    when it was loaded): a transient spec (e.g. a rescue VM's) derived from
    it is never written over it. True if it was saved."""
    with _lock(vmdir):
        try:
            with open(_spec_path(vmdir, name)) as f:
                if f.read() != before:
                    return False
        except OSError:
            return False
        _write(vmdir, spec, name)
        return True


class InstanceStore:
    """The instance directories of one driver (one instances_path)."""

    def __init__(self, instances_path):
        self.path = instances_path

    def vmdir_for(self, uuid):
        return base.VMDir(os.path.join(self.path, uuid))

    def vmdir(self, instance, must_exist=True):
        """The instance's directory; InstanceNotFound when ``must_exist``
        and it has no spec."""
        vmdir = self.vmdir_for(instance.uuid)
        if must_exist and not os.path.exists(vmdir.spec):
            raise exception.InstanceNotFound(instance_id=instance.uuid)
        return vmdir

    def exists(self, uuid):
        return os.path.exists(self.vmdir_for(uuid).spec)

    def vmdirs(self):
        """Every instance directory with a spec (not ``<uuid>_resize``,
        a resize's kept source copy), sorted by uuid."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        vmdirs = [self.vmdir_for(n) for n in sorted(names)
                  if uuidutils.is_uuid_like(n)]
        return [d for d in vmdirs if os.path.exists(d.spec)]

    def specs(self):
        """(vmdir, spec) of every readable instance directory."""
        found = []
        for vmdir in self.vmdirs():
            try:
                found.append((vmdir, read_spec(vmdir)))
            except (OSError, ValueError, TypeError) as e:
                LOG.warning('unreadable spec in %s: %s', vmdir.path, e)
        return found

    def load(self, instance):
        """(vmdir, spec) of an existing instance."""
        vmdir = self.vmdir(instance)
        return vmdir, read_spec(vmdir)

    def create(self, instance):
        """A new, empty directory for ``instance``; InstanceExists when it
        has a spec already."""
        vmdir = self.vmdir_for(instance.uuid)
        if os.path.exists(vmdir.spec):
            raise exception.InstanceExists(name=instance.name)
        os.makedirs(vmdir.path, exist_ok=True)
        return vmdir

    @staticmethod
    def remove(vmdir):
        """Remove the directory and everything in it (its VM must be
        gone)."""
        shutil.rmtree(vmdir.path, ignore_errors=True)
