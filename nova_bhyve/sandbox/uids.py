"""One uid per VM, from [bhyve] sandbox_uid_range.

Each VM's QEMU runs as its own uid (and the gid of the same number), so two
VMs can never signal, ptrace or read each other. The allocation is a file
per uid in a state directory, created atomically (link(2) of a complete
file: it fails if the uid is taken), holding the owner (the instance
uuid); a restarted nova-compute finds them there, and release removes the
file when the VM is deleted.
"""
import errno
import grp
import os
import pwd
import re
import tempfile

from oslo_log import log as logging

from nova_bhyve.sandbox import SandboxError

LOG = logging.getLogger(__name__)

_RANGE = re.compile(r'^\s*(\d+)\s*-\s*(\d+)\s*$')
_OWNER = re.compile(r'^[A-Za-z0-9._-]{1,128}$')


class NoFreeUid(SandboxError):
    pass


def parse_range(text):
    """"64000-64999" -> (64000, 64999), both ends included; never 0."""
    m = _RANGE.match(text or '')
    if not m:
        raise ValueError('sandbox_uid_range must look like "64000-64999", '
                         'not %r' % (text,))
    lo, hi = int(m.group(1)), int(m.group(2))
    if lo < 1 or hi < lo or hi >= 2 ** 32 - 1:
        raise ValueError('sandbox_uid_range %r: need 1 <= first <= last < '
                         '4294967295' % (text,))
    return lo, hi


def _taken_by_the_system(uid):
    """A uid (or gid) the host's user or group database knows belongs to
    someone else: never handed to a VM."""
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


class UidAllocator(object):
    def __init__(self, state_dir, uid_range):
        self.state_dir = state_dir
        self.first, self.last = (parse_range(uid_range)
                                 if isinstance(uid_range, str)
                                 else uid_range)
        os.makedirs(state_dir, mode=0o700, exist_ok=True)

    def _path(self, uid):
        return os.path.join(self.state_dir, str(uid))

    def allocated(self):
        """{uid: owner} of every allocation on disk within the range."""
        found = {}
        for name in os.listdir(self.state_dir):
            if not name.isdigit():
                continue
            uid = int(name)
            if not self.first <= uid <= self.last:
                continue
            try:
                with open(self._path(uid)) as f:
                    found[uid] = f.read().strip()
            except FileNotFoundError:
                continue            # released meanwhile
        return found

    def lookup(self, owner):
        for uid, who in self.allocated().items():
            if who == owner:
                return uid
        return None

    def allocate(self, owner):
        """The uid of ``owner`` (an instance uuid): the one it has, else
        the lowest free one. NoFreeUid when the range is used up."""
        if not _OWNER.match(owner or ''):
            raise ValueError('not an owner name: %r' % (owner,))
        uid = self.lookup(owner)
        if uid is not None:
            return uid
        taken = self.allocated()
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix='.new-')
        try:
            with os.fdopen(fd, 'w') as f:
                f.write(owner + '\n')
                f.flush()
                os.fsync(f.fileno())
            for uid in range(self.first, self.last + 1):
                if uid in taken:
                    continue
                if _taken_by_the_system(uid):
                    LOG.warning('uid %d of sandbox_uid_range belongs to a '
                                'user or group of this host: skipped', uid)
                    continue
                try:
                    os.link(tmp, self._path(uid))
                except OSError as e:
                    if e.errno == errno.EEXIST:
                        continue    # taken by a concurrent allocation
                    raise
                self._sync_dir()
                return uid
        finally:
            os.unlink(tmp)
        raise NoFreeUid(
            'no free uid left in [bhyve] sandbox_uid_range %d-%d (%d VMs '
            'hold one, state in %s): widen the range'
            % (self.first, self.last, len(taken), self.state_dir))

    def transfer(self, owner, new_owner):
        """The uid of ``owner`` now belongs to ``new_owner`` (the same
        process under another name); returns it, None if it had none."""
        if not _OWNER.match(new_owner or ''):
            raise ValueError('not an owner name: %r' % (new_owner,))
        uid = self.lookup(owner)
        if uid is None:
            return None
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix='.new-')
        with os.fdopen(fd, 'w') as f:
            f.write(new_owner + '\n')
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path(uid))
        self._sync_dir()
        return uid

    def release(self, owner):
        """Give back the uid of ``owner``; returns it, or None if it had
        none (a release is idempotent)."""
        uid = self.lookup(owner)
        if uid is None:
            return None
        try:
            os.unlink(self._path(uid))
        except FileNotFoundError:
            return None
        self._sync_dir()
        return uid

    def _sync_dir(self):
        fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
