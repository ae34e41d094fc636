"""The descriptors a QEMU process starts with.

The driver opens every resource of a VM itself and QEMU inherits the
descriptors, so that QEMU needs no path access for them (the first step to
running it sandboxed: its own uid, no capabilities, Landlock allowing only
its binary, libraries, firmware and kernel/initrd):

* the monitors: listening unix sockets bound by the driver (mode 0600) in
  the VM's runtime directory (``VMDir.runtime``, under ``[bhyve]
  runtime_path``: short, whatever instances_path is), given as
  ``-chardev socket,fd=N,server=on,wait=off``; the serial console's
  socket too (unix, or TCP for Nova's serial console: the driver binds
  the port Nova allocated);
* the disks: each image of each disk's chain opened by the driver (the
  chain read from the images with libvdsk), put in an fdset (``-add-fd``)
  and opened by QEMU as ``/dev/fdset/S``; every image that has a backing
  file gets its backing node explicitly (``backing=``), so QEMU never opens
  a backing file by the name in the image's header. One descriptor per
  set, opened read-write or read-only as QEMU opens the node (QEMU picks a
  descriptor of the access mode it asks for). Not a read-only companion
  for writable images: QEMU's image locks (OFD locks) stay on every open
  file description the set holds, and a read-only one QEMU once used
  keeps "write" unshared: a later block-commit into the image then fails
  to get its write lock (seen with QEMU 7.2);
* the taps: ``/dev/net/tun`` attached to the tap the VIF plugging made
  (TUNSETIFF with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, as QEMU does),
  ``-netdev tap,fd=N``;
* a direct boot's kernel and initrd: read-only descriptors QEMU reopens
  as ``/proc/self/fd/N`` (its -kernel/-initrd take no fdset; a sandboxed
  QEMU may read exactly these files, whatever the directories above them
  allow its uid);
* the console log: QEMU writes the serial console into a pipe (its write
  end in an fdset, ``logfile=/dev/fdset/S``); the read end goes to
  nova-bhyve-conlog (native/conlog), a detached process per VM that appends
  to console.log, keeps it at most ``[bhyve] console_log_keep_bytes`` while
  the VM runs, and exits when the pipe closes (QEMU is gone).

Every descriptor is opened close-on-exec; subprocess's ``pass_fds`` hands
exactly these to QEMU (all others are closed in the child), and the driver
closes its copies once QEMU started (``close``).

What QEMU still opens by path: its pid file when not sandboxed
(``-pidfile``, in the instance directory) and its firmware
(docs/sandbox.md). Run-time operations hand it descriptors over QMP
(fdpass.py).
"""
import dataclasses
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import typing

from oslo_log import log as logging

from nova_bhyve.hypervisor import base
from nova_bhyve.storage import vdsk

LOG = logging.getLogger(__name__)

#: how deep a backing chain may be
MAX_CHAIN = 16
#: the console logger, compiled into the package at install (setup.py)
CONLOG_NAME = 'nova-bhyve-conlog'
CONLOG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'libexec', CONLOG_NAME)

# linux/if_tun.h
TUNSETIFF = 0x400454ca
TUNGETFEATURES = 0x800454cf
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100


@dataclasses.dataclass
class Image:
    """One image of a disk's chain, top first: its fdset and format."""
    fdset: int
    format: str
    readonly: bool
    path: str


@dataclasses.dataclass
class Resources:
    """What render_argv needs to name the descriptors (pure data: unit
    tests build one by hand) and, once opened, the descriptors."""
    qmp: int = None
    events: int = None
    serial: int = None                 # unix or TCP listening socket
    console: int = None                # fdset of the console pipe
    kernel: int = None                 # direct boot: read-only fds
    initrd: int = None
    disks: list = dataclasses.field(default_factory=list)  # [[Image]]
    taps: list = dataclasses.field(default_factory=list)   # [fd]
    #: (fd, fdset, opaque): the -add-fd options
    add_fds: list = dataclasses.field(default_factory=list)
    #: every descriptor QEMU inherits
    fds: list = dataclasses.field(default_factory=list)
    _socks: typing.List[socket.socket] = dataclasses.field(
        default_factory=list)

    def close(self):
        """Close the driver's copies (after QEMU started, or failed to)."""
        for s in self._socks:
            s.close()
        for fd in self.fds:
            if not any(s.fileno() == fd for s in self._socks):
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._socks, self.fds = [], []

    # -- opening ----------------------------------------------------------

    def _fdset(self, fds, opaque):
        fdset = 1 + len({s for _, s, _ in self.add_fds})
        for fd in fds:
            self.add_fds.append((fd, fdset, opaque))
        return fdset

    def _fdset_numbered(self, fds, path, fmt, readonly):
        return Image(self._fdset(fds, path), fmt, readonly, path)

    def _keep(self, fd):
        self.fds.append(fd)
        return fd

    def _listen(self, path):
        # in a directory of mode 0700 (make_runtime_dir): nobody else can
        # reach the socket before its chmod (no umask dance: it is
        # process-wide, other threads create files meanwhile)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socks.append(sock)
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
        return self._keep(sock.fileno())

    def _listen_tcp(self, host, port):
        # Nova's serial console: the driver binds the port it allocated
        family = socket.AF_INET6 if ':' in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        self._socks.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise base.HypervisorError('cannot listen for the serial '
                                       'console on %s:%d: %s'
                                       % (host, port, e))
        sock.listen(1)
        return self._keep(sock.fileno())

    def _open(self, path, readonly):
        return self._keep(os.open(path, os.O_RDONLY if readonly
                                  else os.O_RDWR))

    def _image(self, path, fmt, readonly):
        return self._fdset_numbered([self._open(path, readonly)], path, fmt,
                                    readonly)


def numbered(spec, chains=None):
    """The Resources open_all would give ``spec``, with made-up numbers and
    nothing opened (pure: to render a command line without a VM): fds 3
    (QMP), 4 (events), 5 (serial console socket), then one per
    image, tap and the console pipe, in open_all's order;
    fdsets from 1. ``chains``: {disk index: [(path, format)]}, the backing
    images below each disk."""
    res = Resources(qmp=3, events=4, serial=5)
    fds = iter(range(6, 1 << 16))
    for i, disk in enumerate(spec.disks):
        images = [(disk.path, disk.format)] + list(
            (chains or {}).get(i, ()))
        res.disks.append([])
        for n, (path, fmt) in enumerate(images):
            ro = disk.readonly or n > 0
            res.disks[-1].append(res._fdset_numbered([next(fds)], path,
                                                     fmt, ro))
    res.taps = [next(fds) for _ in spec.nics]
    res.console = res._fdset([next(fds)], 'console')
    if spec.boot.kernel:
        res.kernel = next(fds)
        if spec.boot.ramdisk:
            res.initrd = next(fds)
    return res


def disk_chain(path, fmt):
    """[(path, format)] of a disk and its backing files, top first, read
    from the images' headers with libvdsk."""
    chain = [(path, fmt)]
    while fmt != 'raw':
        info = vdsk.info(path, fmt)
        backing = info.get('backing_file')
        if not backing:
            break
        if len(chain) >= MAX_CHAIN:
            raise base.HypervisorError('backing chain of %s deeper than %d'
                                       % (chain[0][0], MAX_CHAIN))
        if backing.startswith(('json:', '/dev/fdset/')) or \
                '://' in backing:
            raise base.HypervisorError('%s: unsupported backing file %r'
                                       % (path, backing))
        path = os.path.join(os.path.dirname(path), backing)
        fmt = info.get('backing_format') or vdsk.info(path)['format']
        chain.append((path, fmt))
    return chain


def open_tap(ifname):
    """/dev/net/tun attached to the existing tap ``ifname``, as QEMU's
    tap_open would (vnet headers when the kernel has them)."""
    fd = os.open('/dev/net/tun', os.O_RDWR)
    try:
        features = struct.unpack('I', fcntl.ioctl(
            fd, TUNGETFEATURES, struct.pack('I', 0)))[0]
        flags = IFF_TAP | IFF_NO_PI
        if features & IFF_VNET_HDR:
            flags |= IFF_VNET_HDR
        name = ifname.encode()
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack('16sH22x', name, flags))
        except OSError:
            # a tap created multi-queue takes only multi-queue attaches
            fcntl.ioctl(fd, TUNSETIFF, struct.pack(
                '16sH22x', name, flags | IFF_MULTI_QUEUE))
    except OSError as e:
        os.close(fd)
        raise base.HypervisorError('cannot open tap %s: %s' % (ifname, e))
    return fd


def conlog_binary():
    if os.access(CONLOG, os.X_OK):
        return CONLOG
    found = shutil.which(CONLOG_NAME)
    if not found:
        raise base.HypervisorError('%s not found (at %s or on PATH): the '
                                   'package was not built completely'
                                   % (CONLOG_NAME, CONLOG))
    return found


def start_console_logger(log_path, keep_bytes):
    """A pipe whose read end a detached nova-bhyve-conlog drains into
    ``log_path``; returns the write end (close-on-exec)."""
    rfd, wfd = os.pipe()
    logfd = None
    try:
        logfd = os.open(log_path, os.O_RDWR | os.O_APPEND | os.O_CREAT,
                        0o640)
        proc = subprocess.run([conlog_binary(), str(int(keep_bytes))],
                              stdin=rfd, stdout=logfd,
                              stderr=subprocess.PIPE, check=False,
                              close_fds=True)
        if proc.returncode != 0:
            raise base.HypervisorError('%s failed (exit %d): %s' % (
                CONLOG_NAME, proc.returncode,
                proc.stderr.decode(errors='replace').strip()))
    except BaseException:
        os.close(wfd)
        raise
    finally:
        os.close(rfd)
        if logfd is not None:
            os.close(logfd)
    return wfd


def open_all(spec, vmdir, console_keep_bytes):
    """Open every resource of the VM of ``spec``: a Resources whose ``fds``
    QEMU inherits. A fresh runtime directory is made first (stale sockets
    of an earlier run removed). On failure what was opened is closed."""
    res = Resources()
    try:
        base.make_runtime_dir(vmdir)
        res.qmp = res._listen(vmdir.control)
        res.events = res._listen(vmdir.events)
        c = spec.consoles
        res.serial = (res._listen_tcp(c.serial_host, c.serial_port)
                      if c.serial_port else res._listen(vmdir.serial))
        for disk in spec.disks:
            chain = disk_chain(disk.path, disk.format)
            res.disks.append([
                res._image(path, fmt, disk.readonly or n > 0)
                for n, (path, fmt) in enumerate(chain)])
        for nic in spec.nics:
            res.taps.append(res._keep(open_tap(nic.ifname)))
        wfd = res._keep(start_console_logger(vmdir.console_log,
                                             console_keep_bytes))
        res.console = res._fdset([wfd], 'console')
        if spec.boot.kernel:
            res.kernel = res._open(spec.boot.kernel, True)
            if spec.boot.ramdisk:
                res.initrd = res._open(spec.boot.ramdisk, True)
    except BaseException:
        res.close()
        raise
    return res
