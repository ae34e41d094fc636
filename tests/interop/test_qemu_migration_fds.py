"""A block + memory live migration between two real QEMU 7.2 processes that
cannot open a TCP socket of their own: each runs under nova-bhyve-launcher
(its own uid, no capabilities, no_new_privs, Landlock: read/exec of /usr
and the libraries, nothing else - and, kernel ABI >= 4, no TCP port to bind
or connect to). Every connection is the driver's (hypervisor/qemu/
channel.py), handed over with QMP ``getfd``: the destination's NBD server
gets a listening socket, the source's NBD client and both ends of the
memory stream get connected ones.

The driver's own functions drive it: the destination's capabilities,
``start_nbd_server`` and ``accept_stream`` (what prepare_incoming does
after starting QEMU), the source's ``OutgoingMigration`` (start_mirror,
mirror_ready, start_memory, poll, finish / switchover) and the resume
request. The guest is test_qemu_migration_policy.py's memory-rewriting
boot sector (TCG, 64 MiB); the migrated disk is a raw 4 MiB image of
random bytes, the destination's starts as zeros.

``test_the_sandbox_refuses_qemus_own_tcp`` is the control: under the same
rules, what the driver had QEMU do before (``nbd-server-start`` on an inet
address, ``migrate tcp:``) is refused by the kernel.
"""
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import types

import pytest
from test_qemu_migration_policy import BOOT_CODE
from test_qemu_migration_policy import QEMU

from nova_bhyve import guest
from nova_bhyve.hypervisor.qemu import channel as qemu_channel
from nova_bhyve.hypervisor.qemu import migration as qemu_migration
from nova_bhyve.hypervisor.qemu import migration_params
from nova_bhyve.hypervisor.qemu import postcopy as qemu_postcopy
from nova_bhyve.hypervisor.qemu import qmp
from nova_bhyve.sandbox import features
from nova_bhyve.sandbox import launcher
from nova_bhyve.sandbox import spawn
from nova_bhyve.sandbox import uids

pytestmark = [
    pytest.mark.skipif(QEMU is None, reason='qemu-system-x86_64 missing'),
    pytest.mark.skipif(os.geteuid() != 0,
                       reason='the launcher changes uid: needs root'),
    pytest.mark.skipif(features.landlock_abi() < 4,
                       reason='needs Landlock ABI >= 4 (TCP rules)'),
]
UUID = '0f6b3c1e-2a8d-4c55-9d1e-7b2f4a9c8e01'
DISK_BYTES = 4 << 20
RX = [p for p in ('/usr', '/lib', '/lib64') if os.path.exists(p)]


class Sandboxed:
    """One QEMU under the launcher: its QMP socket and disks are
    descriptors opened here (as hypervisor/qemu/resources.py does)."""

    def __init__(self, tmp, name, uid, disk, incoming=False):
        self.control = os.path.join(tmp, name + '.sock')
        self.path = os.path.join(tmp, name)
        self.uuid = UUID
        mon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mon.bind(self.control)
        mon.listen(4)
        floppy = os.open(os.path.join(tmp, 'boot.img'), os.O_RDONLY)
        disk_fd = os.open(disk, os.O_RDWR)
        keep = [mon.fileno(), floppy, disk_fd]
        argv = [os.path.realpath(QEMU), '-machine', 'pc', '-accel', 'tcg',
                '-m', '64', '-nodefaults', '-display', 'none',
                '-boot', 'a', '-sandbox', 'on',
                '-chardev', 'socket,id=qmp,fd=%d,server=on,wait=off'
                % mon.fileno(),
                '-mon', 'chardev=qmp,mode=control',
                '-add-fd', 'fd=%d,set=1' % floppy,
                '-drive', 'file=/dev/fdset/1,format=raw,if=floppy,'
                          'readonly=on',
                '-add-fd', 'fd=%d,set=2' % disk_fd,
                '-blockdev', 'driver=raw,node-name=disk0,file.driver=file,'
                             'file.filename=/dev/fdset/2']
        if incoming:
            argv = qemu_migration.incoming_argv(argv)
        try:
            for fd in keep:
                os.set_inheritable(fd, True)
            self.launched = spawn.start(launcher.Spec(
                uid=uid, gid=uid, program=argv, keep_fds=keep, rx=RX),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        finally:
            mon.close()
            os.close(floppy)
            os.close(disk_fd)
        self.pid = self.launched.pid

    def read_pid(self):
        return self.pid

    def qmp(self, command, args=None):
        return qmp.execute(self.control, command, args, timeout=30)

    def tcp_sockets(self):
        """The TCP sockets this QEMU holds: {inode: local port}."""
        tcp = _tcp_table()
        out = {}
        for name in os.listdir('/proc/%d/fd' % self.pid):
            try:
                target = os.readlink('/proc/%d/fd/%s' % (self.pid, name))
            except OSError:
                continue
            inode = target[len('socket:['):-1]
            if target.startswith('socket:[') and inode in tcp:
                out[int(inode)] = tcp[inode]
        return out

    def stop(self):
        self.launched.proc.kill()
        _, err = self.launched.proc.communicate(timeout=30)
        return err.decode(errors='replace')


def _tcp_table():
    """/proc/net/tcp{,6}: inode -> local port."""
    out = {}
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                out[fields[9]] = int(fields[1].rsplit(':', 1)[1], 16)
    return out


@pytest.fixture
def passed(monkeypatch):
    """Inodes of the sockets the driver hands to a QEMU."""
    inodes = set()
    real = qemu_channel.hand_over

    def hand_over(control, sock, *args, **kwargs):
        inodes.add(os.fstat(sock.fileno()).st_ino)
        return real(control, sock, *args, **kwargs)
    monkeypatch.setattr(qemu_channel, 'hand_over', hand_over)
    return inodes


def _sha(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def hosts():
    """Source and destination QEMU under the launcher, each with its own
    uid; killed by pid at the end."""
    tmp = tempfile.mkdtemp(prefix='nb-mfd-')
    os.chmod(tmp, 0o755)
    state = tempfile.mkdtemp(prefix='nb-mfd-uids-')
    alloc = uids.UidAllocator(state, '64900-64999')
    sector = bytearray(512)
    sector[:len(BOOT_CODE)] = BOOT_CODE
    sector[510:] = b'\x55\xaa'
    with open(os.path.join(tmp, 'boot.img'), 'wb') as f:
        f.write(bytes(sector) + bytes(512 * 2879))
    disks = {'src': os.path.join(tmp, 'src.img'),
             'dst': os.path.join(tmp, 'dst.img')}
    with open(disks['src'], 'wb') as f:
        f.write(os.urandom(DISK_BYTES))
    with open(disks['dst'], 'wb') as f:
        f.truncate(DISK_BYTES)
    started = []
    try:
        for name in ('src', 'dst'):
            uid = alloc.allocate('mfd-%d-%s' % (os.getpid(), name))
            os.chown(disks[name], uid, uid)
            started.append(Sandboxed(tmp, name, uid, disks[name],
                                     incoming=name == 'dst'))
        yield types.SimpleNamespace(src=started[0], dst=started[1],
                                    disks=disks, tmp=tmp)
    finally:
        for vm in started:
            qemu_migration.close_listeners(vm)
            vm.stop()
        for name in ('src', 'dst'):
            alloc.release('mfd-%d-%s' % (os.getpid(), name))
        shutil.rmtree(state)
        shutil.rmtree(tmp)


def _spec():
    return guest.VMSpec(uuid=UUID, name='instance-1', vcpus=1, memory_mb=64,
                        disks=[guest.Disk(path='/x/disk', format='raw')])


def _prepare(dst, policy):
    """What prepare_incoming does once QEMU runs, with its functions."""
    for command, args in migration_params.incoming_qmp(policy):
        dst.qmp(command, args)
    nbd = qemu_channel.listening_socket('127.0.0.1')
    stream = qemu_channel.listening_socket('127.0.0.1')
    with nbd:
        qemu_migration.start_nbd_server(dst.control, _spec(), nbd)
        nbd_port = nbd.getsockname()[1]
    token = '%032x' % int.from_bytes(os.urandom(16), 'big')
    port = stream.getsockname()[1]
    command, args = qemu_migration.stream_command()
    acceptor = qemu_channel.accept_stream(dst, stream, token,
                                          qemu_migration.STREAM_FD,
                                          command, args)
    resume_port, resume_token = qemu_postcopy.listen(dst, '127.0.0.1')
    return acceptor, qemu_migration.Endpoint(
        uri='tcp:127.0.0.1:%d' % port, nbd_host='127.0.0.1',
        nbd_port=nbd_port, resume_port=resume_port,
        resume_token=resume_token, stream_token=token)


def _until(fn, what, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_block_migration_over_passed_descriptors(hosts, passed):
    _migrate(hosts, postcopy=False, passed=passed)


def _unprivileged_userfaultfd():
    with open('/proc/sys/vm/unprivileged_userfaultfd') as f:
        return f.read().strip() == '1'


def test_post_copy_needs_unprivileged_userfaultfd(hosts, passed):
    """Post-copy needs userfaultfd on the destination. QEMU 7.2 gets it
    from the userfaultfd(2) system call, which a process without
    CAP_SYS_PTRACE may use for guest memory only when the host sets
    vm.unprivileged_userfaultfd = 1 (QEMU 7.2 does not use
    /dev/userfaultfd). Without it the sandboxed destination refuses the
    capability, before anything moved."""
    if _unprivileged_userfaultfd():
        _migrate(hosts, postcopy=True, passed=passed)
        return
    caps = migration_params.incoming_qmp(types.SimpleNamespace(
        wants_postcopy=True, wants_auto_converge=False))
    with pytest.raises(qmp.QMPError, match='Postcopy is not supported'):
        hosts.dst.qmp(*caps[0])


def _only_passed(hosts, ep, passed):
    """Every TCP socket either QEMU holds is one the driver handed it, or
    (the destination's NBD server) one it accepted on the listening socket
    it was handed: neither QEMU bound or connected one - Landlock would
    have refused it, as the control test shows. Returns the sockets."""
    src, dst = hosts.src.tcp_sockets(), hosts.dst.tcp_sockets()
    assert set(src) <= passed, (src, passed)
    accepted = {i for i, port in dst.items() if port == ep.nbd_port}
    assert set(dst) - accepted <= passed, (dst, passed)
    return src, dst


def _migrate(hosts, postcopy, passed):
    src, dst = hosts.src, hosts.dst
    policy = types.SimpleNamespace(wants_postcopy=postcopy,
                                   wants_auto_converge=False,
                                   initial_downtime_ms=300)
    acceptor, ep = _prepare(dst, policy)
    out = qemu_migration.OutgoingMigration(
        types.SimpleNamespace(pid=lambda v: src.pid), src, _spec(), ep,
        # post-copy: a cap keeps pre-copy from completing before the switch
        256 * 1024 if postcopy else 0, policy)
    out.start_mirror()
    _until(out.mirror_ready, 'the disk copy never got ready')
    srcs, dsts = _only_passed(hosts, ep, passed)
    assert len(srcs) == 1                   # the NBD client's connection
    assert len(dsts) == 2                   # the NBD listener, its client
    out.start_memory()
    assert acceptor.handed_to is not None
    _only_passed(hosts, ep, passed)
    if postcopy:
        _until(lambda: out.poll().status == 'active', 'no pre-copy')
        src.qmp('migrate-start-postcopy')
        _until(lambda: out.poll().status == 'postcopy-active',
               'no switch to post-copy')
        assert out.switchover() is None         # mirrors done, dst resumed
        assert dst.qmp('query-status')['status'] == 'running'
    snap = _until(lambda: (lambda s: s if s.status in qemu_migration.FINAL
                           else None)(out.poll()), 'the migration never ended')
    assert snap.status == 'completed', snap.error
    if not postcopy:
        out.finish()
        assert out.resume_destination() is None
    assert dst.qmp('query-migrate')['status'] == 'completed'
    assert dst.qmp('query-status')['status'] == 'running'
    assert _sha(hosts.disks['dst']) == _sha(hosts.disks['src'])
    # the NBD targets went with their connections, the stream ended
    _until(lambda: not src.tcp_sockets(), 'the source is still connected')


def test_the_sandbox_refuses_qemus_own_tcp(hosts):
    """The control: what QEMU did by itself before this change fails under
    the same rules - bind for the NBD server, connect for the stream."""
    src, dst = hosts.src, hosts.dst
    with pytest.raises(qmp.QMPError, match='Permission denied'):
        dst.qmp('nbd-server-start', {'addr': {'type': 'inet', 'data': {
            'host': '127.0.0.1', 'port': '0'}}})
    with socket.socket() as lsn:
        lsn.bind(('127.0.0.1', 0))
        lsn.listen(1)
        src.qmp('migrate', {'uri': 'tcp:127.0.0.1:%d'
                            % lsn.getsockname()[1]})
        info = _until(lambda: (lambda i: i if i.get('status') in
                               qemu_migration.FINAL else None)(
            src.qmp('query-migrate')), 'migrate did not end')
    assert info['status'] == 'failed'
    assert 'Permission denied' in info.get('error-desc', '')
    assert src.tcp_sockets() == {} and dst.tcp_sockets() == {}
