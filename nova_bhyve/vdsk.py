"""Pythonic API over libvdsk (native/vdsk), the virtual disk image library.

Formats: raw, qcow2, vmdk, vdi, vpc (VHD; "vhd" is accepted as an alias and
reported as "vpc", as qemu-img does).

    vdsk.create('/var/lib/x/disk', 'qcow2', 10 * units.Gi,
                backing='/var/lib/x/_base/abc', backing_fmt='raw')
    vdsk.info(path) -> {'format': 'qcow2', 'virtual_size': ..., ...}
    with vdsk.open(path) as img:
        data = img.read(0, 4096)

Every failure raises VdskError (an OSError: errno + the library's message).
"""
import errno as _errno
import os
import threading

from nova_bhyve._vdsk import ffi, lib

__all__ = ['VdskError', 'Image', 'create', 'info', 'open', 'check',
           'snapshot_create', 'snapshot_list', 'snapshot_apply',
           'snapshot_delete']


class VdskError(OSError):
    """A libvdsk failure; .errno is the errno code, str() the message."""


def _error(filename=None):
    code = lib.vdsk_errno() or _errno.EIO
    msg = ffi.string(lib.vdsk_errmsg()).decode('utf-8', 'replace')
    return VdskError(code, msg, filename)


def _path(path):
    return os.fsencode(path)


def _opt(s):
    return ffi.NULL if s is None else s.encode('utf-8')


def _str(chars):
    s = ffi.string(chars).decode('utf-8', 'surrogateescape')
    return s or None


def create(path, fmt, size, backing=None, backing_fmt=None,
           cluster_size=None, subformat=None):
    """Create an image; an existing file at path is replaced.

    subformat (like qemu-img's -o subformat=): vmdk 'monolithicSparse'
    (the only one created); vdi 'dynamic' (default) or 'static'; vpc
    'dynamic' (default) or 'fixed'.  vpc sizes are rounded up to a CHS
    geometry as qemu-img does.

    size may be 0 with a backing file: the overlay then gets the backing
    file's virtual size.  A relative backing path is relative to the new
    image's directory.  Without backing_fmt the backing file's probed
    format is recorded in the image.
    """
    if backing is not None:
        backing = os.fsencode(backing)
    if int(size) < 0:
        raise VdskError(_errno.EINVAL, 'negative size', path)
    rc = lib.vdsk_create_subformat(
        _path(path), fmt.encode('utf-8'), _opt(subformat), int(size),
        ffi.NULL if backing is None else backing, _opt(backing_fmt),
        int(cluster_size or 0))
    if rc < 0:
        raise _error(path)


def info(path, fmt=None):
    """Describe an image without opening its backing file.

    Keys: format, virtual_size, cluster_size (None for raw), backing_file
    (None if absent, as stored in the image), backing_format, actual_size
    (bytes allocated on the host), version, dirty.
    """
    d = lib.vdsk_open(_path(path), _opt(fmt),
                      lib.VDSK_RDONLY | lib.VDSK_NO_BACKING)
    if d == ffi.NULL:
        raise _error(path)
    try:
        out = ffi.new('struct vdsk_info *')
        if lib.vdsk_info(d, out) < 0:
            raise _error(path)
    finally:
        lib.vdsk_close(d)
    return {
        'format': _str(out.format),
        'virtual_size': out.virtual_size,
        'cluster_size': out.cluster_size or None,
        'backing_file': _str(out.backing_file),
        'backing_format': _str(out.backing_format),
        'actual_size': out.actual_size,
        'version': out.version or None,
        'dirty': bool(out.dirty),
        'snapshots': out.nb_snapshots,
    }


class Image(object):
    """An open image.  Calls are serialised by a lock: libvdsk allows one
    thread at a time per image."""

    def __init__(self, path, fmt=None, readonly=False):
        self.path = path
        flags = lib.VDSK_RDONLY if readonly else 0
        d = lib.vdsk_open(_path(path), _opt(fmt), flags)
        if d == ffi.NULL:
            raise _error(path)
        self._d = ffi.gc(d, lib.vdsk_close)
        self._lock = threading.Lock()
        self.readonly = readonly

    def _handle(self):
        if self._d is None:
            raise VdskError(_errno.EBADF, 'image is closed', self.path)
        return self._d

    @property
    def size(self):
        return lib.vdsk_size(self._handle())

    def _check(self, offset, length):
        if offset < 0 or length < 0:
            raise VdskError(_errno.EINVAL, 'negative offset or length',
                            self.path)

    def read(self, offset, length):
        self._check(offset, length)
        buf = ffi.new('char[]', length) if length else None
        with self._lock:
            if length and lib.vdsk_read(self._handle(), buf, offset,
                                        length) < 0:
                raise _error(self.path)
        return ffi.buffer(buf, length)[:] if length else b''

    def write(self, offset, data):
        data = bytes(data) if not isinstance(data, bytes) else data
        self._check(offset, len(data))
        with self._lock:
            if data and lib.vdsk_write(self._handle(), ffi.from_buffer(data),
                                       offset, len(data)) < 0:
                raise _error(self.path)

    def discard(self, offset, length):
        """Free the whole clusters in the range; they read as zeroes."""
        self._check(offset, length)
        with self._lock:
            if lib.vdsk_discard(self._handle(), offset, length) < 0:
                raise _error(self.path)

    def resize(self, size):
        """Grow, or shrink when nothing is allocated past the new end."""
        self._check(size, 0)
        with self._lock:
            if lib.vdsk_resize(self._handle(), size) < 0:
                raise _error(self.path)

    def write_compressed(self, offset, data):
        """Write one whole aligned cluster compressed (qcow2)."""
        data = bytes(data)
        self._check(offset, len(data))
        with self._lock:
            if lib.vdsk_write_compressed(self._handle(),
                                         ffi.from_buffer(data), offset,
                                         len(data)) < 0:
                raise _error(self.path)

    def flush(self):
        with self._lock:
            if lib.vdsk_flush(self._handle()) < 0:
                raise _error(self.path)

    def close(self):
        with self._lock:
            d, self._d = self._d, None
            if d is not None:
                ffi.release(d)  # runs vdsk_close now

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open(path, fmt=None, readonly=False):  # noqa: A001 - mirrors io.open
    return Image(path, fmt=fmt, readonly=readonly)


def check(path, repair=False, fmt=None):
    """Check an image like `qemu-img check`; repair=True (or 'leaks')
    repairs leaked clusters.  Returns a dict: corruptions, leaks,
    corruptions_fixed, leaks_fixed, allocated_clusters, total_clusters."""
    res = ffi.new('struct vdsk_check *')
    flags = lib.VDSK_CHECK_REPAIR_LEAKS if repair else 0
    if lib.vdsk_check(_path(path), _opt(fmt), flags, res) < 0:
        raise _error(path)
    return {k: getattr(res, k) for k in (
        'corruptions', 'leaks', 'corruptions_fixed', 'leaks_fixed',
        'allocated_clusters', 'total_clusters')}


def _snap(path, fn, *args):
    d = lib.vdsk_open(_path(path), ffi.NULL, lib.VDSK_NO_BACKING)
    if d == ffi.NULL:
        raise _error(path)
    try:
        if fn(d, *args) < 0:
            raise _error(path)
    finally:
        lib.vdsk_close(d)


def snapshot_create(path, name):
    _snap(path, lib.vdsk_snapshot_create, name.encode('utf-8'))


def snapshot_apply(path, name):
    _snap(path, lib.vdsk_snapshot_apply, name.encode('utf-8'))


def snapshot_delete(path, name):
    _snap(path, lib.vdsk_snapshot_delete, name.encode('utf-8'))


def snapshot_list(path):
    """[{'id', 'name', 'vm_state_size', 'disk_size', 'date_sec',
    'date_nsec', 'vm_clock_nsec'}, ...] in table order."""
    d = lib.vdsk_open(_path(path), ffi.NULL,
                      lib.VDSK_RDONLY | lib.VDSK_NO_BACKING)
    if d == ffi.NULL:
        raise _error(path)
    try:
        n = lib.vdsk_snapshot_list(d, ffi.NULL, 0)
        out = ffi.new('struct vdsk_snapshot[]', max(n, 1))
        if n < 0 or lib.vdsk_snapshot_list(d, out, n) < 0:
            raise _error(path)
    finally:
        lib.vdsk_close(d)
    return [{'id': ffi.string(s.id).decode('utf-8', 'replace'),
             'name': ffi.string(s.name).decode('utf-8', 'replace'),
             'vm_state_size': s.vm_state_size, 'disk_size': s.disk_size,
             'date_sec': s.date_sec, 'date_nsec': s.date_nsec,
             'vm_clock_nsec': s.vm_clock_nsec} for s in out[0:n]]
