"""A real QEMU 7.2 (TCG) opens no file for the run-time operations: the
driver hands it every file as a descriptor over QMP (qemu/fdpass.py).

One guest (the test guest, direct boot, a tap) started by QemuHypervisor
goes through volume attach/detach, NIC attach/detach, a live snapshot's
freeze/thaw of a data disk, suspend (save) and resume (restore), while
strace watches QEMU (every thread, and any child it would make) for
open/openat/openat2/execve: no call names a path under the test's
directory (volumes, overlays, the state file and the instance directory
all live there) or /dev/net/tun, and nothing is executed (``exec:cat``
would be). Besides:

* the volume and the snapshot overlay are renamed as soon as the driver
  opened them, before QEMU hears of them: QEMU uses them all the same
  (writes through the node land in the renamed file; the commit merges
  the overlay's data), so it never looked them up by name;
* /proc/PID/fd: QEMU holds the volume (read-write) and the overlay while
  attached, and neither after detach/thaw (their fdsets removed); a
  hot-plugged NIC is one more /dev/net/tun attached to its tap, gone
  after detach;
* the restored guest runs on (its ticks go on) and the state file is
  removed.
"""
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from unittest import mock
import uuid as uuidlib

from nova.compute import power_state
import pytest

from nova_bhyve import conf
from nova_bhyve import guest
from nova_bhyve.devices import consoles
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import backend as qemu
from nova_bhyve.hypervisor.qemu import fdpass
from nova_bhyve.hypervisor.qemu import qmp
from nova_bhyve.hypervisor.qemu import state as qemu_state
from nova_bhyve.storage import vdsk

CONF = conf.CONF
QEMU = shutil.which('qemu-system-x86_64')
STRACE = shutil.which('strace')
MiB = 1024 * 1024

pytestmark = pytest.mark.skipif(
    QEMU is None or STRACE is None or os.geteuid() != 0 or
    not os.path.exists('/dev/net/tun'),
    reason='needs qemu-system-x86_64, strace, root and /dev/net/tun')


def _wait(what, cond, timeout=180, poll=0.2):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, 'timed out waiting for ' + what
        time.sleep(poll)


def _fds(pid):
    """{target: {access modes}} of QEMU's descriptors."""
    out = {}
    for name in os.listdir('/proc/%d/fd' % pid):
        try:
            target = os.readlink('/proc/%d/fd/%s' % (pid, name))
            with open('/proc/%d/fdinfo/%s' % (pid, name)) as f:
                info = f.read()
        except OSError:
            continue
        flags = int(re.search(r'flags:\s+(\d+)', info).group(1), 8)
        out.setdefault(target, []).append((flags & os.O_ACCMODE, info))
    return out


def _tun_ifaces(pid):
    return sorted(re.search(r'iff:\s+(\S+)', info).group(1)
                  for _, info in _fds(pid).get('/dev/net/tun', ()))


class Watch:
    """strace attached to every thread of ``pid`` (and following any child
    it makes) for the calls that open or run a file."""

    def __init__(self, pid, log):
        self.pid, self.log = pid, log
        self.proc = subprocess.Popen(
            [STRACE, '-f', '-qq', '-e', 'trace=open,openat,openat2,execve',
             '-o', log, '-p', str(pid)], stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        _wait('strace to attach', self._attached, timeout=30, poll=0.05)

    def _attached(self):
        assert self.proc.poll() is None, self.proc.stderr.read()
        tasks = os.listdir('/proc/%d/task' % self.pid)
        for tid in tasks:
            with open('/proc/%d/task/%s/status' % (self.pid, tid)) as f:
                if 'TracerPid:\t0\n' in f.read():
                    return False
        return True

    def stop(self):
        """Detach; the lines strace wrote."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        self.proc.stderr.close()
        with open(self.log) as f:
            return f.read().splitlines()


def _forbidden(lines, top):
    return [ln for ln in lines if top in ln or '/dev/net/tun' in ln or
            'execve(' in ln]


@pytest.fixture
def taps():
    names = ['nbrt%s' % uuidlib.uuid4().hex[:8] for _ in range(2)]
    for name in names:
        subprocess.run(['ip', 'tuntap', 'add', 'dev', name, 'mode', 'tap'],
                       check=True)
        subprocess.run(['ip', 'link', 'set', 'dev', name, 'up'], check=True)
    yield names
    for name in names:
        subprocess.run(['ip', 'link', 'del', 'dev', name], check=False)


@pytest.fixture
def env():
    top = tempfile.mkdtemp(prefix='nbrtfd-')
    CONF.set_override('qemu_accel', 'tcg', group='bhyve')
    CONF.set_override('runtime_path', os.path.join(top, 'rt'),
                      group='bhyve')
    yield top
    CONF.clear_override('qemu_accel', group='bhyve')
    CONF.clear_override('runtime_path', group='bhyve')
    shutil.rmtree(top, ignore_errors=True)


@contextlib.contextmanager
def _renamed_once_opened(paths):
    """Each of ``paths`` is renamed to PATH.moved as soon as the driver
    opened it (fdpass.open_file), before QEMU hears of it."""
    real = fdpass.open_file

    def open_file(path, *args, **kwargs):
        fd = real(path, *args, **kwargs)
        if path in paths:
            os.rename(path, path + '.moved')
        return fd
    with mock.patch.object(fdpass, 'open_file', open_file):
        yield


class Shell:
    """The test guest's root shell on its serial console."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(120)
        self.sock.connect(path)
        self.run('stty -echo 2>/dev/null; dmesg -n 1; true')

    def run(self, cmd):
        """Run ``cmd`` (it must succeed); its output."""
        tag = uuidlib.uuid4().hex[:8]
        self.sock.sendall(('%s; echo "@@$?@%s@@"\n' % (cmd, tag)).encode())
        done = re.compile(rb'@@(\d+)@%s@@' % tag.encode())
        buf = b''
        while not done.search(buf):
            chunk = self.sock.recv(4096)
            assert chunk, 'serial console closed: %r' % buf
            buf += chunk
        m = done.search(buf)
        assert m.group(1) == b'0', (cmd, buf)
        return buf[:m.start()].decode(errors='replace')

    def fill(self, dev, byte, offset):
        """Write 64 KiB of ``byte`` (octal escape) at ``offset`` of
        /dev/``dev``, synced."""
        self.run("dd if=/dev/zero bs=65536 count=1 2>/dev/null | "
                 "tr '\\000' '\\%s' | dd of=/dev/%s bs=65536 seek=%d "
                 "conv=fsync 2>/dev/null" % (byte, dev, offset // 65536))

    def close(self):
        self.sock.close()


def _fdset_opaques(vmdir):
    return sorted(f['opaque'] for s in qmp.execute(vmdir.control,
                                                   'query-fdsets')
                  for f in s['fds'])


def _ticks(log):
    return [int(n) for n in re.findall(rb'tick (\d+)',
                                       consoles.log_tail(log, 1 << 20))]


def test_runtime_operations_hand_qemu_descriptors(env, taps, test_guest):
    top = env
    manifest = test_guest
    uuid = str(uuidlib.uuid4())
    vm = os.path.join(top, 'instances', uuid)
    os.makedirs(vm)
    root = os.path.join(vm, 'disk')
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F',
                    'qcow2', '-b', manifest['root_qcow2'], root],
                   check=True)
    data = os.path.join(vm, 'disk.data')
    with open(data, 'wb') as f:
        f.truncate(4 * MiB)
    spec = guest.VMSpec(
        uuid=uuid, name='rtfds', vcpus=1, memory_mb=256, hotplug_ports=2,
        disks=[guest.Disk(path=root, format='qcow2'),
               guest.Disk(path=data, format='raw')],
        nics=[guest.Nic(mac='fa:16:3e:00:fd:11', ifname=taps[0])],
        boot=guest.Boot(kernel=manifest['vmlinuz'],
                        ramdisk=manifest['initrd'],
                        cmdline=manifest['cmdline'] + ' nbtick=1'))
    vmdir = base.VMDir(vm)
    hyp = qemu.QemuHypervisor()
    hyp.start(spec, vmdir)
    watches = []
    try:
        pid = hyp.pid(vmdir)
        _wait('the guest shell', lambda: manifest['markers']['shell_ready']
              .encode() in consoles.log_tail(vmdir.console_log, 1 << 20))
        shell = Shell(vmdir.serial)
        watches.append(Watch(pid, os.path.join(top, 'strace-1')))
        base_fdsets = _fdset_opaques(vmdir)

        # -- a volume: attach, I/O through the node, detach --------------
        vol_id = str(uuidlib.uuid4())
        volume = os.path.join(top, 'volume')
        with open(volume, 'wb') as f:
            f.truncate(8 * MiB)
        disk = guest.Disk(path=volume, format='raw', serial=vol_id)
        with _renamed_once_opened({volume}):
            hyp.attach_disk(vmdir, disk)
        assert not os.path.exists(volume)
        moved = volume + '.moved'
        assert [m for m, _ in _fds(pid)[moved]] == [os.O_RDWR] * len(
            _fds(pid)[moved])
        # the guest writes into it: through QEMU's descriptor
        dev = _wait('the volume in the guest', lambda: shell.run(
            'for d in /sys/block/vd*; do [ "$(cat $d/serial)" = "%s" ] && '
            'echo "DEV=${d##*/}"; done; true' % vol_id[:20]).partition(
                'DEV=')[2].split())[0]
        shell.fill(dev, '132', MiB)                  # 'Z'
        with open(moved, 'rb') as f:
            f.seek(MiB)
            assert f.read(65536) == b'\x5a' * 65536
        hyp.detach_disk(vmdir, disk)
        assert moved not in _fds(pid)
        assert _fdset_opaques(vmdir) == base_fdsets

        # -- a NIC: attach, detach --------------------------------------
        nic = guest.Nic(mac='fa:16:3e:00:fd:12', ifname=taps[1])
        port = sorted({'hp0', 'hp1'} - hyp.used_hotplug_ports(vmdir))[0]
        hyp.attach_nic(vmdir, nic, port)
        assert _tun_ifaces(pid) == sorted(taps)
        hyp.detach_nic(vmdir, nic)
        assert _tun_ifaces(pid) == [taps[0]]

        # -- a live snapshot of the data disk: freeze, write, thaw -------
        overlay = os.path.join(vm, 'snapshot-overlay-1.qcow2')
        with _renamed_once_opened({overlay}):
            hyp.freeze_disk(vmdir, 1, overlay, disk=spec.disks[1])
        assert vdsk.info(overlay + '.moved')['backing_file'] == data
        shell.fill('vdb', '245', 2 * MiB)            # 0xa5
        with open(data, 'rb') as f:
            f.seek(2 * MiB)
            assert f.read(65536) == bytes(65536)     # frozen
        os.rename(overlay + '.moved', overlay)       # thaw unlinks it
        hyp.thaw_disk(vmdir, 1, overlay)
        assert not os.path.exists(overlay)
        with open(data, 'rb') as f:
            f.seek(2 * MiB)
            assert f.read(65536) == b'\xa5' * 65536  # merged
        assert not [t for t in _fds(pid) if 'overlay' in t]
        assert _fdset_opaques(vmdir) == base_fdsets
        assert hyp.power_state(vmdir) == power_state.RUNNING

        # -- suspend ----------------------------------------------------
        shell.close()
        hyp.save(vmdir)
        assert hyp.pid(vmdir) is None
        qemu_state.check_state_file(vmdir.saved_state)
        lines = watches[0].stop()
        assert lines, 'strace saw nothing at all'
        assert _forbidden(lines, top) == []
        last_tick = _ticks(vmdir.console_log)[-1]

        # -- resume: strace from the moment QEMU is up -------------------
        real_launch = qemu_state.launch

        def launch(*args, **kwargs):
            real_launch(*args, **kwargs)
            watches.append(Watch(hyp.pid(vmdir),
                                 os.path.join(top, 'strace-2')))
        with mock.patch.object(qemu_state, 'launch', launch):
            hyp.restore(spec, vmdir)
        pid = hyp.pid(vmdir)
        assert not os.path.exists(vmdir.saved_state)
        _wait('the restored guest to tick on', lambda: max(
            _ticks(vmdir.console_log)) > last_tick + 1, timeout=60)
        assert not [t for t in _fds(pid) if 'suspended' in t]
        lines = watches[1].stop()
        assert _forbidden(lines, top) == []
        assert hyp.power_state(vmdir) == power_state.RUNNING
    finally:
        for w in watches:
            w.stop()
        hyp.kill(vmdir)
