"""Cold migration and resize: moving an instance's disks between hosts.

The flow follows Nova's libvirt driver:

* source, ``migrate_disk_and_power_off``: the VM is powered off, the instance
  directory ``<uuid>`` is renamed ``<uuid>_resize`` (kept untouched until
  confirm or revert) and its disks are copied into ``<uuid>`` on the
  destination;
* destination, ``finish_migration``: the spec is rebuilt for the new flavor
  (migration/resize.py, BhyveDriver.new_spec), the root disk is rebased on
  the destination's image cache and grown to the new root_gb;
* source, ``confirm_migration``: ``<uuid>_resize`` is removed;
* source, ``finish_revert_migration``: ``<uuid>_resize`` is renamed back.

Where the disks go:

* the destination is on this machine (its compute runs in this process, or
  its address is this host's ``my_ip``): a local sparse copy into the
  destination compute's instances path. Every compute records its path at
  start, in this process (Nova's functional harness runs several computes
  in one process) and in ``<runtime_path>/computes/<host>`` (several
  nova-compute processes on one machine, as tools/cloud runs them); a
  compute found in neither is assumed to use ours, as the libvirt driver
  assumes;
* another machine: ``ssh DEST mkdir -p``, then ``rsync --sparse`` (or
  ``scp`` when rsync is not installed), as the libvirt driver does, over the
  nova user's ssh keys. NOT EXERCISED by the tests here (one machine, no ssh
  peer); see docs/migration.md.

Only this module moves files; it knows nothing of Nova's objects.
"""
import errno
import os
import shlex
import shutil

from oslo_concurrency import processutils
from oslo_log import log as logging
from oslo_serialization import jsonutils

from nova_bhyve import conf

LOG = logging.getLogger(__name__)
CONF = conf.CONF

RESIZE_SUFFIX = '_resize'
_CHUNK = 1024 * 1024

# host name -> instances path of the computes running in this process
_LOCAL_COMPUTES = {}


class MigrationCopyError(Exception):
    """Copying the disks to the destination failed; the source is intact."""


def _registry(host):
    return os.path.join(CONF.bhyve.runtime_path, 'computes', host)


def register_compute(host, instances_path):
    """Called by each driver's init_host: ``host`` keeps its disks here
    (known to this process, and to the other computes of this machine)."""
    _LOCAL_COMPUTES[host] = instances_path
    path = _registry(host)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(path + '.tmp', 'w') as f:
            f.write(instances_path)
        os.replace(path + '.tmp', path)
    except OSError as e:
        LOG.warning('cannot record the instances path of %s in %s: %s',
                    host, path, e)


def _registered_path(host):
    if host in _LOCAL_COMPUTES:
        return _LOCAL_COMPUTES[host]
    if not host or os.sep in host or host.startswith('.'):
        return None
    try:
        with open(_registry(host)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def resize_path(vmdir_path):
    return vmdir_path.rstrip('/') + RESIZE_SUFFIX


def is_local(dest_ip, dest_compute):
    return (dest_compute in _LOCAL_COMPUTES or
            dest_ip in ('127.0.0.1', '::1', 'localhost', CONF.my_ip))


def target_instances_path(dest_compute, own_instances_path):
    return _registered_path(dest_compute) or own_instances_path


def copy_sparse(src, dst):
    """Copy file ``src`` to ``dst`` without writing all-zero chunks, so a
    sparse raw disk stays sparse (portable: FreeBSD's cp has no --sparse)."""
    zero = bytes(_CHUNK)
    with open(src, 'rb') as fin, open(dst, 'wb') as fout:
        while True:
            data = fin.read(_CHUNK)
            if not data:
                break
            if data == zero[:len(data)]:
                fout.seek(len(data), os.SEEK_CUR)
            else:
                fout.write(data)
        fout.truncate()
        fout.flush()
        os.fsync(fout.fileno())


class LocalCopier:
    """The destination directory is on this machine."""

    remote = False

    def mkdir(self, path):
        os.makedirs(path)

    def copy(self, src, dst):
        copy_sparse(src, dst)

    def remove(self, path):
        shutil.rmtree(path, ignore_errors=True)

    def exists(self, path):
        return os.path.exists(path)


class RemoteCopier:
    """The destination is another host, reached over ssh like the libvirt
    driver's RemoteFilesystem (rsync when installed, else scp)."""

    remote = True

    def __init__(self, host):
        self.host = host
        self.rsync = shutil.which('rsync') is not None

    def _ssh(self, command, **kw):
        # ssh joins its arguments into one remote shell command: quote here
        return processutils.execute('ssh', '-o', 'BatchMode=yes', self.host,
                                    command, **kw)

    def mkdir(self, path):
        self._ssh('mkdir -p %s' % shlex.quote(path))

    def copy(self, src, dst):
        target = '%s:%s' % (self.host, shlex.quote(dst))
        if self.rsync:
            processutils.execute('rsync', '--sparse', '--compress',
                                 '--timeout=300', src, target)
        else:
            processutils.execute('scp', '-B', src, target)

    def remove(self, path):
        self._ssh('rm -rf %s' % shlex.quote(path), check_exit_code=False)

    def exists(self, path):
        out, _ = self._ssh('test -e %s && echo yes || true' %
                           shlex.quote(path))
        return out.strip() == 'yes'


def copier_for(dest_ip, dest_compute):
    if is_local(dest_ip, dest_compute):
        return LocalCopier()
    return RemoteCopier(dest_ip)


def instance_disks(vmdir_path, spec):
    """Names of the spec's disk files that live in the instance directory
    (the ones the instance owns and that must move with it)."""
    names = []
    for disk in spec.disks:
        if os.path.dirname(os.path.abspath(disk.path)) == \
                os.path.abspath(vmdir_path):
            names.append(os.path.basename(disk.path))
    return names


def move_out(vmdir_path, target_dir, disk_names, copier, warm=None):
    """Keep ``vmdir_path`` as ``<uuid>_resize`` and copy its disks into
    ``target_dir`` (through ``copier``). Returns the disk_info string Nova
    hands to the destination's finish_migration.

    ``warm``: a warm migration's saved-state part (warm_migration.save):
    its ``files`` are copied too, and it is passed on in the disk_info.

    On any failure the partial target is removed, the directory gets its
    name back and MigrationCopyError is raised: the source is as it was.
    """
    kept = resize_path(vmdir_path)
    if os.path.exists(kept):
        # a previous migration that was never confirmed nor reverted
        raise MigrationCopyError('%s already exists' % kept)
    os.rename(vmdir_path, kept)
    made_target = False
    try:
        if copier.exists(os.path.join(target_dir, 'spec.json')):
            raise MigrationCopyError(
                'the destination already has an instance in %s' % target_dir)
        copier.remove(target_dir)       # a leftover of a failed attempt
        copier.mkdir(target_dir)
        made_target = True
        for name in list(disk_names) + list((warm or {}).get('files', ())):
            LOG.info('copying %s to %s%s', os.path.join(kept, name),
                     '%s:' % copier.host if copier.remote else '',
                     os.path.join(target_dir, name))
            copier.copy(os.path.join(kept, name),
                        os.path.join(target_dir, name))
    except Exception as e:
        LOG.error('copying the disks of %s failed: %s; restoring the source',
                  os.path.basename(vmdir_path), e)
        if made_target:
            try:
                copier.remove(target_dir)
            except Exception:
                LOG.exception('could not remove the partial copy %s',
                              target_dir)
        os.rename(kept, vmdir_path)
        if isinstance(e, MigrationCopyError):
            raise
        raise MigrationCopyError(_describe(e)) from e
    info = {'source_dir': kept, 'target_dir': target_dir,
            'disks': disk_names}
    if warm:
        info['warm'] = warm
    return jsonutils.dumps(info)


def _describe(e):
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return 'no space left on the destination: %s' % e
    if isinstance(e, processutils.ProcessExecutionError):
        return '%s failed (exit %s): %s' % (e.cmd, e.exit_code,
                                             (e.stderr or '').strip())
    return str(e) or e.__class__.__name__


def discard_kept(vmdir_path):
    """confirm: the source's kept copy goes. True if something was removed."""
    kept = resize_path(vmdir_path)
    if os.path.isdir(kept):
        shutil.rmtree(kept)
        return True
    return False


def restore_kept(vmdir_path):
    """revert: the kept directory becomes the instance directory again.
    Whatever is at ``vmdir_path`` (a same-host destination's copy) must be
    gone already. True if the kept directory was there."""
    kept = resize_path(vmdir_path)
    if not os.path.isdir(kept):
        return False
    os.rename(kept, vmdir_path)
    return True
