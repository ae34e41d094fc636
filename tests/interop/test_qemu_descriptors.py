"""A real QEMU 7.2 (TCG) started by QemuHypervisor holds its resources as
descriptors the driver opened, and opens none of them by path
(hypervisor/qemu/resources.py).

The test guest boots from a qcow2 overlay over a copy of its root image
(the "image cache"), with a read-only raw disk (as a config drive is) and a
tap, in an instances path of 200 characters (unix socket paths have at most
107 bytes: the monitors live in the short [bhyve] runtime_path). Before
QEMU runs, the overlay, the base image and the read-only disk are renamed:
a QEMU that opened any of them by path (or by the backing file name in the
overlay's header) would not start, or would not boot the guest. Then:

* /proc/PID/fd: the disks (read-write and read-only descriptors of the
  overlay, the base, the raw disk), the tap (/dev/net/tun attached to it),
  the three listening sockets the driver bound (QMP, events, serial), the
  console pipe; nothing else under the instances path but the pid file;
* the console log: written by nova-bhyve-conlog (not QEMU), at most
  [bhyve] console_log_keep_bytes while the VM runs, the newest lines kept;
  the logger exits once QEMU is gone;
* QMP works over the inherited socket (power state, a live disk snapshot's
  freeze and thaw: the backing nodes on fdsets take a block-commit);
* kill removes the runtime directory.
"""
import os
import re
import shutil
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
from nova_bhyve.hypervisor.qemu import resources as qemu_resources
from nova_bhyve.hypervisor.qemu import state as qemu_state
from nova_bhyve.storage import vdsk

CONF = conf.CONF
QEMU = shutil.which('qemu-system-x86_64')
KEEP = 8192

pytestmark = pytest.mark.skipif(
    QEMU is None or os.geteuid() != 0 or not os.path.exists('/dev/net/tun'),
    reason='needs qemu-system-x86_64, root and /dev/net/tun')


def _wait(what, cond, timeout=120, poll=0.2):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, 'timed out waiting for ' + what
        time.sleep(poll)


def _fds(pid):
    out = {}
    for name in os.listdir('/proc/%d/fd' % pid):
        try:
            out[int(name)] = os.readlink('/proc/%d/fd/%s' % (pid, name))
        except OSError:
            pass
    return out


def _socket_inode(path):
    """inode of the listening unix socket bound at ``path``."""
    with open('/proc/net/unix') as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path:
                return fields[6]
    return None


def _holders(path):
    """pids with a descriptor on the file at ``path``."""
    st = os.stat(path)
    pids = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            for name in os.listdir('/proc/%s/fd' % entry):
                try:
                    fst = os.stat('/proc/%s/fd/%s' % (entry, name))
                except OSError:
                    continue
                if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino):
                    pids.append(int(entry))
                    break
        except OSError:
            continue
    return pids


@pytest.fixture
def tap():
    name = 'nbfd%s' % uuidlib.uuid4().hex[:8]
    subprocess.run(['ip', 'tuntap', 'add', 'dev', name, 'mode', 'tap'],
                   check=True)
    subprocess.run(['ip', 'link', 'set', 'dev', name, 'up'], check=True)
    yield name
    subprocess.run(['ip', 'link', 'del', 'dev', name], check=False)


@pytest.fixture
def env(tmp_path_factory):
    top = tempfile.mkdtemp(prefix='nbfd-')
    runtime = os.path.join(top, 'rt')
    # a 200-character instances path
    instances = os.path.join(top, 'i' * (200 - len(top) - 1))
    assert len(instances) == 200
    CONF.set_override('qemu_accel', 'tcg', group='bhyve')
    CONF.set_override('runtime_path', runtime, group='bhyve')
    CONF.set_override('console_log_keep_bytes', KEEP, group='bhyve')
    yield top, instances
    CONF.clear_override('qemu_accel', group='bhyve')
    CONF.clear_override('runtime_path', group='bhyve')
    CONF.clear_override('console_log_keep_bytes', group='bhyve')
    shutil.rmtree(top, ignore_errors=True)


def test_qemu_runs_on_descriptors_only(env, tap, test_guest):
    top, instances = env
    manifest = test_guest
    uuid = str(uuidlib.uuid4())
    vm = os.path.join(instances, uuid)
    cache = os.path.join(top, 'cache')
    os.makedirs(vm)
    os.makedirs(cache)
    base_img = os.path.join(cache, 'base.qcow2')
    shutil.copy(manifest['root_qcow2'], base_img)
    overlay = os.path.join(vm, 'disk')
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F',
                    'qcow2', '-b', base_img, overlay], check=True)
    extra = os.path.join(vm, 'disk.config')
    with open(extra, 'wb') as f:
        f.truncate(1 << 20)
    spec = guest.VMSpec(
        uuid=uuid, name='fds', vcpus=1, memory_mb=256,
        disks=[guest.Disk(path=overlay, format='qcow2'),
               guest.Disk(path=extra, format='raw', readonly=True)],
        nics=[guest.Nic(mac='fa:16:3e:00:fd:01', ifname=tap)],
        boot=guest.Boot(kernel=manifest['vmlinuz'],
                        ramdisk=manifest['initrd'],
                        cmdline=manifest['cmdline'] + ' nbtick=1'))
    vmdir = base.VMDir(vm)
    hyp = qemu.QemuHypervisor()
    moved = {p: p + '.moved' for p in (base_img, overlay, extra)}
    real_launch = qemu_state.launch

    def launch(*args, **kwargs):
        # the driver opened everything: take the paths away from QEMU
        for old, new in moved.items():
            os.rename(old, new)
        return real_launch(*args, **kwargs)

    with mock.patch.object(qemu_state, 'launch', launch):
        hyp.start(spec, vmdir)
    pid = hyp.pid(vmdir)
    try:
        assert pid
        log = vmdir.console_log
        # the guest mounted its root: through the overlay and its base
        _wait('root mounted', lambda: b'NOVA-BHYVE-ROOT-MOUNTED' in
              consoles.log_tail(log, 1 << 20) or
              b'tick 3' in consoles.log_tail(log, 1 << 20))
        assert hyp.power_state(vmdir) == power_state.RUNNING

        # -- descriptors -----------------------------------------------
        fds = _fds(pid)
        targets = sorted(fds.values())
        for path in moved.values():
            assert path in targets, (path, targets)
        assert targets.count(moved[overlay]) >= 2        # the set + a dup
        assert targets.count(moved[base_img]) >= 2
        modes = {}
        for fd, target in fds.items():
            try:
                with open('/proc/%d/fdinfo/%d' % (pid, fd)) as f:
                    info = f.read()
            except FileNotFoundError:
                continue        # a transient one of QEMU's, closed since

            flags = int(re.search(r'flags:\s+(\d+)', info).group(1), 8)
            modes.setdefault(target, set()).add(flags & os.O_ACCMODE)
            if target == '/dev/net/tun':
                assert re.search(r'iff:\s+%s' % tap, info), info
        assert modes[moved[base_img]] == {os.O_RDONLY}
        assert modes[moved[extra]] == {os.O_RDONLY}
        assert modes[moved[overlay]] == {os.O_RDWR}
        assert '/dev/net/tun' in targets
        for sock in (vmdir.control, vmdir.events, vmdir.serial):
            assert len(sock) <= base.SUN_PATH_MAX
            assert os.stat(sock).st_mode & 0o777 == 0o600
            inode = _socket_inode(sock)
            assert inode and 'socket:[%s]' % inode in targets, sock
        assert os.stat(vmdir.runtime).st_mode & 0o777 == 0o700
        # under the instances path: the disks and the log of QEMU's own
        # messages (its stdout and stderr: sandboxed, the default) only
        under = sorted(t for t in targets if t.startswith(instances))
        assert under == sorted([moved[overlay]] * under.count(
            moved[overlay]) + [moved[extra]] * under.count(moved[extra]) +
            [vmdir.vm_log] * 2), under
        # the console log is not QEMU's: it writes into a pipe
        assert log not in targets
        assert any(t.startswith('pipe:') for t in targets)

        # -- the console log, bounded while the VM runs -----------------
        logger = [p for p in _holders(log) if p != pid]
        assert len(logger) == 1
        with open('/proc/%d/cmdline' % logger[0], 'rb') as f:
            assert qemu_resources.CONLOG_NAME.encode() in f.read()
        sizes = []

        def ticked(n):
            text = consoles.log_tail(log, 1 << 20)
            sizes.append(len(text))
            return re.search(rb'tick %d\b' % n, text)
        first = int(_wait('a tick', lambda: re.findall(
            rb'tick (\d+)', consoles.log_tail(log, 1 << 20)))[-1])
        _wait('more ticks', lambda: ticked(first + 3), timeout=60)
        assert max(sizes) <= KEEP, sizes
        text = consoles.log_tail(log, 1 << 20)
        # the boot's first lines went (the boot log is much more than
        # KEEP), the newest stayed
        assert b'Linux version' not in text
        assert re.search(rb'tick %d\b' % (first + 3), text)

        # -- QMP over the inherited socket: a live snapshot's block jobs --
        snap = os.path.join(top, 'snap.qcow2')
        hyp.freeze_disk(vmdir, 0, snap)
        hyp.thaw_disk(vmdir, 0, snap)
        assert hyp.power_state(vmdir) == power_state.RUNNING
        # QEMU never wrote its /dev/fdset name into the overlay's header
        assert vdsk.info(moved[overlay])['backing_file'] == base_img
    finally:
        hyp.kill(vmdir)
    assert not os.path.exists(vmdir.runtime)
    _wait('the console logger to exit', lambda: not [
        p for p in logger if os.path.exists('/proc/%d' % p) and
        open('/proc/%d/stat' % p).read().rsplit(')', 1)[1].split()[0]
        != 'Z'], timeout=10)
