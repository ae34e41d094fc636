"""hypervisor/qemu/backend.py: the exact QEMU command line for
representative specs, and the power state when the VM process is absent.

render_argv is pure, so the argv is pinned element by element; the
descriptors it names (qemu_resources.numbered: as open_all numbers them:
monitors, one descriptor per disk image, taps, the console pipe last). The
option syntax (``-blockdev`` dotted keys, ``,,`` escaping,
``ide-cd``/``ide-hd`` on ``ahci0.N``, ``-add-fd``, ``fd=`` of a listening
socket and of a tap) was checked against qemu-system-x86_64 7.2. Nothing is
mocked: power_state is driven by real pid files and real child processes.
"""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading

from nova.compute import power_state
import pytest

from nova_bhyve import guest
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import backend as qemu
from nova_bhyve.hypervisor.qemu import resources as qemu_resources

UUID = '6d5ba3a0-55a1-4c7c-9a43-3d1b0f6a2b11'
Q = '/usr/bin/qemu-system-x86_64'
VM = '/var/lib/nova/instances/' + UUID


def spec(disks=(), nics=(), boot=None, name='instance-0000002a'):
    return guest.VMSpec(uuid=UUID, name=name, vcpus=2, memory_mb=1024,
                        disks=list(disks), nics=list(nics),
                        boot=boot or guest.Boot())


def resources(s, chains=None):
    """The Resources open_all would give ``s`` (numbered: fds 3 QMP, 4
    events, 5 serial socket, then the images', the taps', the console
    pipe's; fdsets from 1)."""
    return qemu_resources.numbered(s, chains)


def common(res, vm=VM, name='instance-0000002a', accel='tcg'):
    add_fds = []
    for fd, fdset, opaque in res.add_fds:
        add_fds += ['-add-fd', 'fd=%d,set=%d,opaque=%s' % (
            fd, fdset, opaque.replace(',', ',,'))]
    return [
        Q,
        '-name', 'guest=%s,debug-threads=on' % name,
        '-uuid', UUID,
        '-machine', 'q35,accel=%s' % accel,
        '-smp', '2',
        # TCG: 8 KiB short (qemu.memory_size: QEMU < 9.0 loses writes
        # during a live migration of a RAM block of a multiple of 256 KiB)
        '-m', '1048568K' if accel == 'tcg' else '1024M',
        '-nodefaults', '-no-user-config',
        '-display', 'none',
    ] + add_fds + [
        # the serial console's socket and the monitors: listening sockets
        # the driver bound; the console log: the logger's pipe
        '-chardev', 'socket,id=serial0,fd=5,server=on,wait=off,'
                    'logfile=/dev/fdset/%d,logappend=on' % res.console,
        '-serial', 'chardev:serial0',
        '-chardev', 'socket,id=qmp,fd=3,server=on,wait=off',
        '-mon', 'chardev=qmp,mode=control',
        '-chardev', 'socket,id=qmp-events,fd=4,server=on,wait=off',
        '-mon', 'chardev=qmp-events,mode=control',
        '-pidfile', '%s/vm.pid' % vm,
        '-daemonize',
    ]


def blockdev(node, fdset, fmt='qcow2', ro='off'):
    return ['-blockdev', 'driver=%s,node-name=%s,read-only=%s,discard=unmap,'
                         'file.driver=file,file.filename=/dev/fdset/%d'
            % (fmt, node, ro, fdset)]


def test_direct_kernel_boot_virtio_root():
    s = spec(disks=[guest.Disk(path=VM + '/disk')],
             boot=guest.Boot(kernel='/cache/vmlinuz', ramdisk='/cache/initrd',
                             cmdline='console=ttyS0 root=/dev/vda rw'))
    res = resources(s)
    argv = qemu.render_argv(s, base.VMDir(VM), Q, 'tcg', res)
    # the kernel and initrd: descriptors the driver opened (after the disk,
    # 6, and the console pipe, 7), reopened by QEMU through /proc
    assert (res.kernel, res.initrd) == (8, 9)
    assert argv == common(res) + [
        '-kernel', '/proc/self/fd/8',
        '-initrd', '/proc/self/fd/9',
        '-append', 'console=ttyS0 root=/dev/vda rw',
    ] + blockdev('disk0', 1) + [
        # no bootindex: the kernel is loaded directly
        '-device', 'virtio-blk-pci,drive=disk0',
    ]


def test_direct_kernel_boot_without_ramdisk_and_cmdline():
    s = spec(disks=[guest.Disk(path=VM + '/disk')],
             boot=guest.Boot(kernel='/cache/vmlinuz'))
    res = resources(s)
    argv = qemu.render_argv(s, base.VMDir(VM), Q, 'tcg', res)
    assert res.initrd is None
    assert argv == common(res) + ['-kernel', '/proc/self/fd/8'] + \
        blockdev('disk0', 1) + \
        ['-device', 'virtio-blk-pci,drive=disk0']


def test_firmware_boot_virtio_sata_cdrom_one_ahci_controller():
    s = spec(disks=[
        guest.Disk(path=VM + '/disk'),
        guest.Disk(path='/data/extra.raw', format='raw', bus='sata'),
        guest.Disk(path=VM + '/disk.config', format='raw', bus='sata',
                   device='cdrom', readonly=True),
    ])
    res = resources(s)
    argv = qemu.render_argv(s, base.VMDir(VM), Q, 'tcg', res)
    assert argv == common(res) + [
        '-device', 'ich9-ahci,id=ahci0',
    ] + blockdev('disk0', 1) + [
        '-device', 'virtio-blk-pci,drive=disk0,bootindex=1',
    ] + blockdev('disk1', 2, fmt='raw') + [
        '-device', 'ide-hd,drive=disk1,bus=ahci0.0',
    ] + blockdev('disk2', 3, fmt='raw', ro='on') + [
        '-device', 'ide-cd,drive=disk2,bus=ahci0.1',
    ]
    assert argv.count('ich9-ahci,id=ahci0') == 1


def test_firmware_boot_sata_root_gets_bootindex_and_ahci_port0():
    s = spec(disks=[guest.Disk(path=VM + '/disk', bus='ide'),
                    guest.Disk(path='/d/2', bus='ide')])
    res = resources(s)
    argv = qemu.render_argv(s, base.VMDir(VM), Q, 'tcg', res)
    assert argv == common(res) + ['-device', 'ich9-ahci,id=ahci0'] + \
        blockdev('disk0', 1) + \
        ['-device', 'ide-hd,drive=disk0,bus=ahci0.0,bootindex=1'] + \
        blockdev('disk1', 2) + \
        ['-device', 'ide-hd,drive=disk1,bus=ahci0.1']


def test_virtio_only_has_no_ahci_controller():
    s = spec(disks=[guest.Disk(path='/d/1'), guest.Disk(path='/d/2')])
    argv = qemu.render_argv(s, base.VMDir(VM), Q, 'tcg', resources(s))
    assert not any(a.startswith('ich9-ahci') for a in argv)
    assert argv[-2:] == ['-device', 'virtio-blk-pci,drive=disk1']


def test_cdrom_with_default_bus_still_gets_ahci_controller():
    s = spec(disks=[guest.Disk(path='/d/root'),
                    guest.Disk(path='/d/cd.iso', format='raw',
                               device='cdrom', readonly=True)])
    argv = qemu.render_argv(s, base.VMDir(VM), Q, 'tcg', resources(s))
    assert 'ide-cd,drive=disk1,bus=ahci0.0' in argv
    assert 'ich9-ahci,id=ahci0' in argv


def test_nics_with_mtu():
    s = spec(disks=[guest.Disk(path='/d/1')], nics=[
        guest.Nic(mac='fa:16:3e:00:00:01', ifname='tap1', mtu=1450),
        guest.Nic(mac='fa:16:3e:00:00:02', ifname='tap2'),
        # host_mtu is a virtio-net property: not given to e1000
        guest.Nic(mac='fa:16:3e:00:00:03', ifname='tap3', model='e1000',
                  mtu=9000),
    ])
    res = resources(s)
    assert res.taps == [7, 8, 9]
    argv = qemu.render_argv(s, base.VMDir(VM), Q, 'tcg', res)
    # the taps: /dev/net/tun descriptors the driver attached to them
    assert argv[-12:] == [
        '-netdev', 'tap,id=net0,fd=7',
        '-device', 'virtio-net-pci,netdev=net0,mac=fa:16:3e:00:00:01,'
                   'host_mtu=1450',
        '-netdev', 'tap,id=net1,fd=8',
        '-device', 'virtio-net-pci,netdev=net1,mac=fa:16:3e:00:00:02',
        '-netdev', 'tap,id=net2,fd=9',
        '-device', 'e1000,netdev=net2,mac=fa:16:3e:00:00:03',
    ]


def test_commas_escaped_in_names_and_paths():
    vm = '/srv/a,b/' + UUID
    s = spec(name='web,1', disks=[guest.Disk(path='/img/x,y.qcow2')],
             nics=[guest.Nic(mac='fa:16:3e:00:00:01', ifname='t,0')],
             boot=guest.Boot(kernel='/k,1/vmlinuz'))
    res = resources(s)
    argv = qemu.render_argv(s, base.VMDir(vm), Q, 'tcg', res)
    assert argv == common(res, vm=vm, name='web,,1') + [
        # -pidfile takes a plain path, not an option string
        '-kernel', '/proc/self/fd/%d' % res.kernel,
    ] + blockdev('disk0', 1) + [
        '-device', 'virtio-blk-pci,drive=disk0',
        '-netdev', 'tap,id=net0,fd=7',
        '-device', 'virtio-net-pci,netdev=net0,mac=fa:16:3e:00:00:01',
    ]
    assert argv[argv.index('-add-fd') + 1] == \
        'fd=6,set=1,opaque=/img/x,,y.qcow2'


def test_overlay_gets_its_backing_chain_as_nodes_on_fdsets():
    """An overlay's backing images are nodes of their own, each on its
    fdset and read-only, named from the top: QEMU never opens a backing
    file by the name in the qcow2 header."""
    s = spec(disks=[guest.Disk(path=VM + '/disk')])
    res = resources(s, chains={0: [('/cache/base.qcow2', 'qcow2'),
                                   ('/cache/bottom.raw', 'raw')]})
    argv = qemu.render_argv(s, base.VMDir(VM), Q, 'tcg', res)
    assert argv[argv.index('-daemonize') + 1:] == [
        '-blockdev', 'driver=raw,node-name=disk0-b2,read-only=on,'
                     'file.driver=file,file.filename=/dev/fdset/3',
        '-blockdev', 'driver=qcow2,node-name=disk0-b1,read-only=on,'
                     'file.driver=file,file.filename=/dev/fdset/2,'
                     'backing=disk0-b2',
        '-blockdev', 'driver=qcow2,node-name=disk0,read-only=off,'
                     'discard=unmap,file.driver=file,'
                     'file.filename=/dev/fdset/1,backing=disk0-b1',
        '-device', 'virtio-blk-pci,drive=disk0,bootindex=1',
    ]
    # one descriptor per image (read-write, then read-only), the console
    assert [(fd, fdset) for fd, fdset, _ in res.add_fds] == [
        (6, 1), (7, 2), (8, 3), (9, 4)]
    assert [i.readonly for i in res.disks[0]] == [False, True, True]


@pytest.mark.parametrize('accel,model,cpu', [
    ('kvm', None, ['-cpu', 'host']),
    ('tcg', None, []),
    ('tcg', 'qemu64', ['-cpu', 'qemu64']),
    ('kvm', 'Skylake-Client', ['-cpu', 'Skylake-Client']),
])
def test_accelerator_and_cpu_model(accel, model, cpu):
    s = spec(disks=[guest.Disk(path='/d/1')])
    res = resources(s)
    argv = qemu.render_argv(s, base.VMDir(VM), Q, accel, res, model)
    assert argv == common(res, accel=accel) + cpu + blockdev('disk0', 1) + \
        ['-device', 'virtio-blk-pci,drive=disk0,bootindex=1']


@pytest.fixture
def short_tmp():
    """A short temp dir: unix socket paths are limited to 107 bytes, which
    pytest's tmp_path plus a uuid can exceed."""
    path = tempfile.mkdtemp(prefix='nbq-')
    yield path
    shutil.rmtree(path)


def test_render_argv_agrees_with_real_qemu_option_parser(short_tmp):
    """QEMU itself parses the rendered options (comma escapes, -blockdev
    keys, ide-cd on the AHCI bus): started paused with -S and quit at
    once over QMP. Runs only where qemu-system-x86_64 exists."""
    binary = '/usr/bin/qemu-system-x86_64'
    if not os.access(binary, os.X_OK):
        pytest.skip('no qemu-system-x86_64')
    vm = os.path.join(short_tmp, 'a,b', UUID)
    os.makedirs(vm)
    for name in ('root,1.raw', 'cd.raw'):
        with open(os.path.join(vm, name), 'wb') as f:
            f.truncate(1 << 20)
    s = spec(name='x,y', disks=[
        guest.Disk(path=os.path.join(vm, 'root,1.raw'), format='raw',
                   bus='sata'),
        guest.Disk(path=os.path.join(vm, 'cd.raw'), format='raw',
                   bus='sata', device='cdrom', readonly=True)])
    vmdir = base.VMDir(vm)
    res = qemu_resources.open_all(s, vmdir, 65536)
    try:
        argv = qemu.render_argv(s, vmdir, binary, 'tcg', res) + ['-S']
        proc = subprocess.run(argv, capture_output=True, text=True,
                              timeout=60, cwd=vm, pass_fds=res.fds)
    finally:
        res.close()
    assert proc.returncode == 0, proc.stderr
    pid = vmdir.read_pid()
    try:
        assert base.process_alive(pid, UUID)
        reply = _qmp(vmdir.control, 'query-name')
        assert reply == {'name': 'x,y'}
        _qmp(vmdir.control, 'quit')
        assert base.wait_for_exit(pid, 20, UUID)
    finally:
        base.kill_and_wait(pid, UUID)


def _qmp(path, command):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        f = s.makefile('rwb')
        json.loads(f.readline())
        for cmd in ('qmp_capabilities', command):
            f.write(json.dumps({'execute': cmd}).encode() + b'\n')
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if 'event' not in msg:
                    break
        return msg.get('return')


# -- power_state ------------------------------------------------------------

@pytest.fixture
def vmdir(short_tmp):
    path = os.path.join(short_tmp, UUID)
    os.mkdir(path)
    d = base.VMDir(path)
    base.make_runtime_dir(d)
    return d


@pytest.fixture
def marked_process(spawn_marked):
    """A real `sleep` whose command line carries the instance uuid, as
    QEMU's does (-uuid); stopped by its PID."""
    return spawn_marked(UUID, reap=False)


def test_power_state_no_pidfile_is_shutdown(vmdir):
    assert qemu.QemuHypervisor().power_state(vmdir) == power_state.SHUTDOWN


def test_power_state_dead_pid_is_shutdown(vmdir):
    proc = subprocess.Popen(['/bin/true'])
    proc.wait()
    with open(vmdir.pidfile, 'w') as f:
        f.write('%d\n' % proc.pid)
    assert qemu.QemuHypervisor().power_state(vmdir) == power_state.SHUTDOWN


def test_power_state_recycled_pid_is_shutdown(vmdir):
    # A live process that is not this VM (its cmdline lacks the uuid).
    with open(vmdir.pidfile, 'w') as f:
        f.write('%d\n' % os.getpid())
    assert qemu.QemuHypervisor().power_state(vmdir) == power_state.SHUTDOWN


def test_power_state_alive_without_monitor_is_nostate(vmdir, marked_process):
    with open(vmdir.pidfile, 'w') as f:
        f.write('%d\n' % marked_process.pid)
    assert qemu.QemuHypervisor().power_state(vmdir) == power_state.NOSTATE


def _serve_status(path, status):
    """One-connection fake QMP monitor answering query-status."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def run():
        conn, _ = srv.accept()
        with conn, conn.makefile('rwb') as f:
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f.flush()
            json.loads(f.readline())
            f.write(b'{"return": {}}\n')
            f.flush()
            assert json.loads(f.readline()) == {'execute': 'query-status'}
            f.write(json.dumps({'return': {'status': status,
                                           'running': False}}).encode()
                    + b'\n')
            f.flush()
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize('status,state', [
    ('running', power_state.RUNNING),
    ('paused', power_state.PAUSED),
    ('inmigrate', power_state.PAUSED),
    ('suspended', power_state.SUSPENDED),
    ('shutdown', power_state.SHUTDOWN),
    ('internal-error', power_state.CRASHED),
    ('guest-panicked', power_state.CRASHED),
    ('some-future-state', power_state.NOSTATE),
])
def test_power_state_maps_qmp_status(vmdir, marked_process, status, state):
    with open(vmdir.pidfile, 'w') as f:
        f.write('%d\n' % marked_process.pid)
    t = _serve_status(vmdir.control, status)
    assert qemu.QemuHypervisor().power_state(vmdir) == state
    t.join(5)
    assert not t.is_alive()


def test_memory_size_under_tcg_is_not_a_multiple_of_256k():
    """QEMU < 9.0's dirty-bitmap fast path (which loses TCG writes during a
    live migration) is taken for RAM blocks of a multiple of 64 pages."""
    for mb in (64, 128, 1024, 4096):
        size = qemu.memory_size(mb, 'tcg')
        assert size.endswith('K')
        kib = int(size[:-1])
        assert kib % 256 != 0 and kib % 8 == 0        # QEMU aligns to 8 KiB
        assert mb * 1024 - kib == 8
        assert qemu.memory_size(mb, 'kvm') == '%dM' % mb


def test_host_info_version_of_the_real_binary():
    """``qemu -version`` runs (processutils.execute) and its version is
    Nova's integer, checked against the binary's own output. Runs only
    where qemu-system-x86_64 exists."""
    binary = shutil.which('qemu-system-x86_64')
    if binary is None:
        pytest.skip('no qemu-system-x86_64')
    out = subprocess.run([binary, '-version'], capture_output=True,
                         text=True, check=True).stdout
    major, minor, micro = (out.split('version ')[1].split()[0].split('.') +
                           ['0', '0'])[:3]
    hv = qemu.QemuHypervisor()
    hv.binary = binary
    hv._accel = 'tcg'                 # no calibration run
    assert hv.host_info() == {
        'hypervisor_type': 'qemu',
        'hypervisor_version': (int(major) * 1000000 + int(minor) * 1000 +
                               int(micro))}
