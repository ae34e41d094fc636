"""The bhyve backend at its boundary, and the VM supervisor for real.

bhyve(8) and bhyvectl(8) cannot run here (no FreeBSD, no vmm(4)), so:

* the config tree written for ``bhyve -k`` is pinned key by key, and every
  key/value was checked against bhyve_config(5), bhyve(8) and the sources of
  usr.sbin/bhyve (pci_ahci.c: ``ahci-hd``/``ahci-cd`` are only command-line
  aliases, the tree needs ``device=ahci`` + ``port.N.type``; net_backends.c:
  ``backend``/``mac``/``mtu``; pci_lpc.c: ``lpc.com1.path``, ``lpc.bootrom``);
* the bhyvectl argv is pinned with ``processutils.execute`` mocked
  (fake_execute.py), and only for bhyvectl;
* bhyve itself is replaced by a small shell script ("fake bhyve") that exits
  with scripted bhyve(8) exit statuses and handles SIGTERM the way bhyve
  does (it ends with status 1, "powered off"). The supervisor, the detaching,
  the pid files, the restarts, exit.status and the console reader run for
  real. Every process a test starts is stopped by its PID.
"""
import os
import signal
import time
from unittest import mock

from nova.compute import power_state
import pytest

from nova_bhyve import conf
from nova_bhyve import guest
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.bhyve import backend as bhyve
from nova_bhyve.hypervisor.bhyve import config as bhyve_config
from nova_bhyve.hypervisor.bhyve import supervisor

import fake_execute

CONF = conf.CONF
UUID = '6d5ba3a0-55a1-4c7c-9a43-3d1b0f6a2b11'
BOOTROM = '/usr/local/share/uefi-firmware/BHYVE_UEFI.fd'


@pytest.fixture(autouse=True)
def _conf():
    # bhyve started as it is, outside a jail ([bhyve] sandbox_jail off):
    # the jailed start is test_bhyve_sandbox.py's
    CONF.set_override('sandbox_jail', False, group='bhyve')
    yield
    CONF.clear_override('bhyve_bootrom', group='bhyve')
    CONF.clear_override('bhyve_path', group='bhyve')
    CONF.clear_override('bhyvectl_path', group='bhyve')
    CONF.clear_override('sandbox_jail', group='bhyve')


def spec(disks=(), nics=(), boot=None, vcpus=2, memory_mb=1024):
    return guest.VMSpec(uuid=UUID, name='instance-0000002a', vcpus=vcpus,
                        memory_mb=memory_mb, disks=list(disks),
                        nics=list(nics), boot=boot or guest.Boot())


def raw(path, **kw):
    return guest.Disk(path=path, format='raw', **kw)


COMMON = [
    ('name', 'instance-0000002a'),
    ('uuid', UUID),
    ('cpus', '2'),
    ('memory.size', '1024M'),
    ('acpi_tables', 'true'),
    ('destroy_on_poweroff', 'true'),
    ('rtc.use_localtime', 'false'),
    ('x86.vmexit_on_hlt', 'true'),
    ('x86.vmexit_on_pause', 'true'),
    ('pci.0.0.0.device', 'hostbridge'),
    ('pci.0.31.0.device', 'lpc'),
    ('lpc.com1.path', '/dev/nmdm%sA' % UUID),
    ('lpc.bootrom', BOOTROM),
]


def render(s):
    vmdir = base.VMDir('/vms/' + UUID)
    return list(bhyve_config.render_config(s, vmdir).items())


# -- the config tree ------------------------------------------------------

def test_firmware_boot_one_virtio_disk_one_nic():
    s = spec(disks=[raw('/vms/%s/disk' % UUID)],
             nics=[guest.Nic(mac='FA:16:3E:12:34:56', ifname='tap7')])
    assert render(s) == COMMON + [
        ('pci.0.2.0.device', 'virtio-blk'),
        ('pci.0.2.0.path', '/vms/%s/disk' % UUID),
        ('pci.0.3.0.device', 'virtio-net'),
        ('pci.0.3.0.backend', 'tap7'),
        ('pci.0.3.0.mac', 'fa:16:3e:12:34:56'),
    ]


def test_three_virtio_disks_one_readonly():
    s = spec(disks=[raw('/d/a'), raw('/d/b'), raw('/d/c', readonly=True)])
    assert render(s) == COMMON + [
        ('pci.0.2.0.device', 'virtio-blk'), ('pci.0.2.0.path', '/d/a'),
        ('pci.0.3.0.device', 'virtio-blk'), ('pci.0.3.0.path', '/d/b'),
        ('pci.0.4.0.device', 'virtio-blk'), ('pci.0.4.0.path', '/d/c'),
        ('pci.0.4.0.ro', 'true'),
    ]


def test_sata_ide_and_cdrom_share_one_ahci_controller():
    s = spec(disks=[raw('/d/root', bus='sata'),
                    raw('/d/data', bus='virtio'),
                    raw('/d/second', bus='sata'),
                    raw('/d/legacy', bus='ide'),
                    raw('/d/config.iso', bus='ide', device='cdrom'),
                    raw('/d/virtio.iso', bus='virtio', device='cdrom')])
    assert render(s) == COMMON + [
        # the controller takes the slot of its first disk: root stays first
        ('pci.0.2.0.device', 'ahci'),
        ('pci.0.2.0.port.0.type', 'hd'),
        ('pci.0.2.0.port.0.path', '/d/root'),
        ('pci.0.3.0.device', 'virtio-blk'),
        ('pci.0.3.0.path', '/d/data'),
        ('pci.0.2.0.port.1.type', 'hd'),
        ('pci.0.2.0.port.1.path', '/d/second'),
        ('pci.0.2.0.port.2.type', 'hd'),
        ('pci.0.2.0.port.2.path', '/d/legacy'),
        ('pci.0.2.0.port.3.type', 'cd'),
        ('pci.0.2.0.port.3.path', '/d/config.iso'),
        ('pci.0.2.0.port.3.ro', 'true'),
        # a virtio "cdrom" cannot be virtio-blk: it is an AHCI CD too
        ('pci.0.2.0.port.4.type', 'cd'),
        ('pci.0.2.0.port.4.path', '/d/virtio.iso'),
        ('pci.0.2.0.port.4.ro', 'true'),
    ]


def test_nics_virtio_with_mtu_and_e1000():
    s = spec(disks=[raw('/d/root')],
             nics=[guest.Nic(mac='fa:16:3e:00:00:01', ifname='tap0',
                             mtu=1450),
                   guest.Nic(mac='fa:16:3e:00:00:02', ifname='tap1',
                             model='e1000', mtu=1450),
                   guest.Nic(mac='fa:16:3e:00:00:03', ifname='vmnet3')])
    assert render(s) == COMMON + [
        ('pci.0.2.0.device', 'virtio-blk'), ('pci.0.2.0.path', '/d/root'),
        ('pci.0.3.0.device', 'virtio-net'), ('pci.0.3.0.backend', 'tap0'),
        ('pci.0.3.0.mac', 'fa:16:3e:00:00:01'), ('pci.0.3.0.mtu', '1450'),
        # e1000 has no mtu setting (bhyve(8): mtu is virtio-net only)
        ('pci.0.4.0.device', 'e1000'), ('pci.0.4.0.backend', 'tap1'),
        ('pci.0.4.0.mac', 'fa:16:3e:00:00:02'),
        ('pci.0.5.0.device', 'virtio-net'), ('pci.0.5.0.backend', 'vmnet3'),
        ('pci.0.5.0.mac', 'fa:16:3e:00:00:03'),
    ]


def test_bootrom_comes_from_the_option():
    CONF.set_override('bhyve_bootrom', '/fw/CODE.fd', group='bhyve')
    tree = bhyve_config.render_config(spec(disks=[raw('/d/r')]), None)
    assert tree['lpc.bootrom'] == '/fw/CODE.fd'


def test_memory_and_cpus():
    tree = bhyve_config.render_config(spec(vcpus=16, memory_mb=65536), None)
    assert (tree['cpus'], tree['memory.size']) == ('16', '65536M')


def test_kernel_boot_is_refused():
    s = spec(disks=[raw('/d/r')],
             boot=guest.Boot(kernel='/k/vmlinuz', ramdisk='/k/initrd',
                             cmdline='console=ttyS0'))
    with pytest.raises(base.HypervisorError, match='direct kernel boot'):
        bhyve_config.render_config(s, None)


@pytest.mark.parametrize('bad, match', [
    (dict(disks=[guest.Disk(path='/d/r', format='qcow2')]), 'raw'),
    (dict(nics=[guest.Nic(mac='fa:16:3e:00:00:01', ifname='vnet0')]),
     'tap'),
    (dict(nics=[guest.Nic(mac='fa-16-3e-00-00-01', ifname='tap0')]), 'MAC'),
    (dict(nics=[guest.Nic(mac='fa:16:3e:00:00:01', ifname='tap0',
                          model='rtl8139')]), 'rtl8139'),
    (dict(disks=[raw('/d/%d' % i) for i in range(30)]), 'no free PCI slot'),
    (dict(disks=[raw('/d/%d' % i, bus='sata') for i in range(33)]),
     'more than 32'),
])
def test_what_bhyve_cannot_run_is_refused(bad, match):
    with pytest.raises(base.HypervisorError, match=match):
        bhyve_config.render_config(spec(**bad), None)


def test_empty_bootrom_is_refused():
    CONF.set_override('bhyve_bootrom', '', group='bhyve')
    with pytest.raises(base.HypervisorError, match='bhyve_bootrom'):
        bhyve_config.render_config(spec(), None)


def test_config_file_format(tmp_path):
    tree = bhyve_config.render_config(spec(disks=[raw('/d/100%disk')]), None)
    path = bhyve_config.write_config(tree, str(tmp_path / 'bhyve.conf'))
    text = open(path).read()
    lines = text.splitlines()
    assert lines[0].startswith('#')           # comments are skipped by -k
    assert lines[1:3] == ['name=instance-0000002a', 'uuid=' + UUID]
    assert 'pci.0.2.0.path=/d/100%%disk' in lines    # % escaped for %(var)
    assert all(' = ' not in line and '=' in line for line in lines[1:])
    assert list(bhyve_config.parse_config(text).items()) == list(tree.items())


def test_config_rejects_newlines():
    with pytest.raises(base.HypervisorError):
        bhyve_config.format_config({'pci.0.2.0.path': '/d/a\nname=evil'})


def test_freebsd_version():
    assert bhyve.freebsd_version('14.1-RELEASE-p5') == 14001
    assert bhyve.freebsd_version('15.0-CURRENT') == 15000
    assert bhyve.freebsd_version('') == 0


# -- the commands (bhyvectl mocked: it cannot run here) -------------------

def _vmdir_with_config(tmp_path):
    vmdir = base.VMDir(str(tmp_path / UUID))
    os.makedirs(vmdir.path)
    tree = bhyve_config.render_config(spec(disks=[raw('/d/r')]), vmdir)
    bhyve_config.write_config(tree, bhyve.BhyveHypervisor.config_path(vmdir))
    return vmdir


def test_bhyve_argv():
    CONF.set_override('bhyve_path', '/usr/sbin/bhyve', group='bhyve')
    assert bhyve.BhyveHypervisor().bhyve_argv('/vms/x/bhyve.conf') == [
        '/usr/sbin/bhyve', '-k', '/vms/x/bhyve.conf']


@pytest.mark.parametrize('method, op', [
    ('force_reset', '--force-reset'),
    ('force_poweroff', '--force-poweroff'),
])
def test_bhyvectl_argv(tmp_path, method, op):
    vmdir = _vmdir_with_config(tmp_path)
    hv = bhyve.BhyveHypervisor()
    with fake_execute.patch() as execute:
        getattr(hv, method)(vmdir)
    assert fake_execute.argvs(execute) == [[
        '/usr/sbin/bhyvectl', '--vm=instance-0000002a', op]]


def test_kill_destroys_the_vmm_instance(tmp_path):
    vmdir = _vmdir_with_config(tmp_path)
    hv = bhyve.BhyveHypervisor()
    with fake_execute.patch() as execute, \
            mock.patch.object(hv, 'vmm_exists', return_value=True):
        hv.kill(vmdir)
    assert fake_execute.argvs(execute) == [
        ['/usr/sbin/bhyvectl', '--vm=instance-0000002a', '--destroy']]
    assert supervisor.read_exit_status(vmdir.path)['outcome'] == 'killed'
    assert hv.power_state(vmdir) == power_state.SHUTDOWN


def test_kill_without_vmm_instance_runs_nothing(tmp_path):
    vmdir = _vmdir_with_config(tmp_path)
    hv = bhyve.BhyveHypervisor()
    with fake_execute.patch() as execute, \
            mock.patch.object(hv, 'vmm_exists', return_value=False):
        hv.kill(vmdir)
    execute.assert_not_called()


def test_kill_of_a_vm_never_configured(tmp_path):
    hv = bhyve.BhyveHypervisor()
    with fake_execute.patch() as execute:
        hv.kill(base.VMDir(str(tmp_path / 'gone')))
        hv.kill(base.VMDir(str(tmp_path)))
    execute.assert_not_called()
    assert hv.power_state(base.VMDir(str(tmp_path / 'gone'))) == (
        power_state.SHUTDOWN)


def test_bhyvectl_failure_is_a_hypervisor_error(tmp_path):
    vmdir = _vmdir_with_config(tmp_path)
    hv = bhyve.BhyveHypervisor()
    with fake_execute.patch(rc=1, err='vm_open: No such'):
        with pytest.raises(base.HypervisorError, match='No such'):
            hv.force_reset(vmdir)


def test_pause_is_not_implemented(tmp_path):
    hv = bhyve.BhyveHypervisor()
    with pytest.raises(NotImplementedError):
        hv.pause(base.VMDir(str(tmp_path)))
    with pytest.raises(NotImplementedError):
        hv.unpause(base.VMDir(str(tmp_path)))


def test_host_info():
    info = bhyve.BhyveHypervisor().host_info()
    assert info['hypervisor_type'] == 'bhyve'
    assert isinstance(info['hypervisor_version'], int)


# -- the exit policy (pure) ------------------------------------------------

@pytest.mark.parametrize('status, action, outcome', [
    (0, supervisor.RESTART, 'reboot'),
    (1, supervisor.STOP, 'poweroff'),
    (2, supervisor.STOP, 'halt'),
    (3, supervisor.ERROR, 'triple fault'),
    (4, supervisor.ERROR, 'error'),
    (64, supervisor.ERROR, 'exit status 64'),     # EX_USAGE
    (71, supervisor.ERROR, 'exit status 71'),     # EX_OSERR
    (100, supervisor.ERROR, 'exit status 100'),   # unknown suspend reason
    (-9, supervisor.ERROR, 'killed by signal 9'),
    (-15, supervisor.ERROR, 'killed by signal 15'),
])
def test_bhyve_policy(status, action, outcome):
    assert supervisor.decide('bhyve', status) == (action, outcome)


@pytest.mark.parametrize('status, action, outcome', [
    (0, supervisor.STOP, 'reboot'),       # no restart once a stop was asked
    (1, supervisor.STOP, 'poweroff'),
    (4, supervisor.ERROR, 'error'),
    (-15, supervisor.STOP, 'terminated'),
    (-9, supervisor.ERROR, 'killed by signal 9'),
])
def test_bhyve_policy_after_stop_request(status, action, outcome):
    assert supervisor.decide('bhyve', status, stop_requested=True) == (
        action, outcome)


def test_oneshot_policy():
    assert supervisor.decide('oneshot', 0) == (supervisor.STOP, 'exited')
    assert supervisor.decide('oneshot', 1) == (supervisor.ERROR,
                                               'exit status 1')
    with pytest.raises(ValueError):
        supervisor.decide('libvirt', 0)


def test_restart_loop_guard():
    assert supervisor.restart_allowed([], 100.0, 3, 60)
    assert supervisor.restart_allowed([50.0, 60.0], 100.0, 3, 60)
    assert not supervisor.restart_allowed([50.0, 60.0, 70.0], 100.0, 3, 60)
    assert supervisor.restart_allowed([10.0, 20.0, 70.0], 100.0, 3, 60)


# -- the supervisor, for real, with a fake bhyve --------------------------

FAKE_BHYVE = r'''#!/bin/sh
# fake bhyve: each run takes the next line "STATUS [HOLD [TERM_STATUS]]"
# of ./script, waits HOLD seconds, exits STATUS; on SIGTERM (bhyve: ACPI
# power button) it exits TERM_STATUS (default 1, "powered off").
d=$(dirname "$0")
trap 'echo TERM >> "$d/signals"; kill $child 2>/dev/null; exit ${tst:-1}' TERM
line=$(head -n 1 "$d/script")
tail -n +2 "$d/script" > "$d/script.new"; mv "$d/script.new" "$d/script"
st=$(echo $line | cut -s -d' ' -f1); st=${st:-$line}
hold=$(echo $line | cut -s -d' ' -f2); tst=$(echo $line | cut -s -d' ' -f3)
echo "$$ $*" >> "$d/runs"
sleep "${hold:-0}" & child=$!
echo $child >> "$d/children"
wait $child
exit ${st:-4}
'''


class Fake:
    def __init__(self, root):
        self.dir = root / 'fakebin'
        self.dir.mkdir()
        self.bin = str(self.dir / 'bhyve')
        with open(self.bin, 'w') as f:
            f.write(FAKE_BHYVE)
        os.chmod(self.bin, 0o755)
        self.vmdir = base.VMDir(str(root / UUID))
        os.makedirs(self.vmdir.path)

    def script(self, *lines):
        (self.dir / 'script').write_text(''.join(x + '\n' for x in lines))

    def _lines(self, name):
        try:
            return (self.dir / name).read_text().split('\n')[:-1]
        except FileNotFoundError:
            return []

    def runs(self):
        return [x.split(' ', 1) for x in self._lines('runs')]

    def signals(self):
        return self._lines('signals')

    def pids(self):
        pids = [supervisor.read_pidfile(os.path.join(self.vmdir.path, n))
                for n in (supervisor.SUPERVISOR_PIDFILE,
                          supervisor.VM_PIDFILE)]
        pids += [int(r[0]) for r in self.runs()]
        pids += [int(p) for p in self._lines('children') if p]
        return [p for p in pids if p]

    def spawn(self, policy='bhyve', **kw):
        return supervisor.spawn(self.vmdir.path,
                                [self.bin, '-k', self.vmdir.path + '/x'],
                                policy=policy, **kw)

    def wait_status(self, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = supervisor.read_exit_status(self.vmdir.path)
            if st is not None and not os.path.exists(os.path.join(
                    self.vmdir.path, supervisor.SUPERVISOR_PIDFILE)):
                return st
            time.sleep(0.05)
        raise AssertionError('supervisor did not finish; log:\n' + open(
            os.path.join(self.vmdir.path, supervisor.LOGFILE)).read())

    def wait_runs(self, n, timeout=10):
        deadline = time.monotonic() + timeout
        while len(self.runs()) < n:
            assert time.monotonic() < deadline, 'fake bhyve did not run'
            time.sleep(0.05)


@pytest.fixture
def fake(tmp_path):
    f = Fake(tmp_path)
    yield f
    for pid in set(f.pids()):                 # stop what we started, by PID
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _ppid(pid):
    with open('/proc/%d/stat' % pid) as f:
        return int(f.read().rsplit(')', 1)[1].split()[1])


def test_reboots_are_restarts_then_poweroff_stops(fake):
    fake.script('0', '0', '1 1')
    sup = fake.spawn()
    assert sup and base.process_alive(sup, UUID)
    assert _ppid(sup) != os.getpid()                 # detached ...
    assert os.getsid(sup) != os.getsid(0)            # ... in its own session
    fake.wait_runs(3)
    vm = fake.vmdir.read_pid()
    assert vm == int(fake.runs()[2][0]) and base.process_alive(vm, UUID)
    st = fake.wait_status()
    assert (st['status'], st['outcome'], st['action'], st['error'],
            st['restarts']) == (1, 'poweroff', 'stop', False, 2)
    runs = fake.runs()
    assert len(runs) == 3 and len({r[0] for r in runs}) == 3
    assert all(r[1] == '-k %s/x' % fake.vmdir.path for r in runs)
    assert base.wait_for_exit(sup, 5)                     # it ended
    assert fake.vmdir.read_pid() is None                     # cleaned up
    assert not os.path.exists(os.path.join(fake.vmdir.path,
                                           supervisor.SUPERVISOR_PIDFILE))


def test_first_run_args_only_on_the_first_start(fake):
    # bhyve -r STATE resumes a saved VM; when that guest reboots (exit 0)
    # bhyve must start without -r: the state files are gone by then
    fake.script('0', '1')
    fake.spawn(first_run_args=['-r', '/saved/state'])
    st = fake.wait_status()
    assert (st['outcome'], st['restarts']) == ('poweroff', 1)
    assert [r[1] for r in fake.runs()] == [
        '-k %s/x -r /saved/state' % fake.vmdir.path,
        '-k %s/x' % fake.vmdir.path]


def test_error_status_is_recorded(fake):
    fake.script('4')
    fake.spawn()
    st = fake.wait_status()
    assert (st['status'], st['outcome'], st['error'], st['restarts']) == (
        4, 'error', True, 0)
    assert len(fake.runs()) == 1


def test_triple_fault_is_an_error(fake):
    fake.script('0', '3')
    fake.spawn()
    st = fake.wait_status()
    assert (st['status'], st['outcome'], st['error'], st['restarts']) == (
        3, 'triple fault', True, 1)


def test_sigterm_is_forwarded_as_acpi_shutdown(fake):
    fake.script('0 30')
    sup = fake.spawn()
    fake.wait_runs(1)
    os.kill(sup, signal.SIGTERM)
    st = fake.wait_status()
    assert fake.signals() == ['TERM']
    assert (st['status'], st['outcome'], st['error']) == (1, 'poweroff',
                                                          False)
    assert len(fake.runs()) == 1


def test_no_restart_when_guest_reboots_after_a_stop_request(fake):
    fake.script('1 30 0', '1')        # on SIGTERM this guest "reboots"
    sup = fake.spawn()
    fake.wait_runs(1)
    os.kill(sup, signal.SIGTERM)
    st = fake.wait_status()
    assert (st['status'], st['outcome'], st['action']) == (0, 'reboot',
                                                           'stop')
    assert len(fake.runs()) == 1


def test_unexecutable_command_is_an_error(fake, tmp_path):
    supervisor.spawn(fake.vmdir.path, [str(tmp_path / 'missing')])
    st = fake.wait_status()
    assert st['error'] and st['outcome'].startswith('cannot execute')


def test_console_device_is_copied_to_console_log(fake):
    master, slave = os.openpty()
    try:
        fake.script('0 30')
        sup = fake.spawn(console_device=os.ttyname(slave))
        os.close(slave)
        slave = None
        fake.wait_runs(1)
        log = os.path.join(fake.vmdir.path, supervisor.CONSOLE_LOG)
        deadline = time.monotonic() + 10
        data = b''
        while b'GUEST-BOOTED' not in data:
            assert time.monotonic() < deadline, data
            os.write(master, b'Linux version 6.1\r\nGUEST-BOOTED\r\n')
            time.sleep(0.3)
            data = open(log, 'rb').read() if os.path.exists(log) else b''
        os.kill(sup, signal.SIGTERM)
        fake.wait_status()
    finally:
        os.close(master)
        if slave is not None:
            os.close(slave)


def test_cli_requires_argv():
    with pytest.raises(SystemExit):
        supervisor.main(['--vmdir', '/nonexistent'])


# -- the backend's start/stop path with the fake bhyve ---------------------

def test_backend_start_shutdown_kill(fake, tmp_path):
    bootrom = tmp_path / 'BHYVE_UEFI.fd'
    bootrom.write_bytes(b'\0' * 16)
    CONF.set_override('bhyve_bootrom', str(bootrom), group='bhyve')
    CONF.set_override('bhyve_path', fake.bin, group='bhyve')
    hv = bhyve.BhyveHypervisor()
    s = spec(disks=[raw('/d/root')])
    fake.script('0 30', '0 30')
    with mock.patch.object(hv, 'vmm_exists', return_value=False), \
            fake_execute.patch() as execute:
        hv.start(s, fake.vmdir)
        fake.wait_runs(1)
        cfg = hv.config_path(fake.vmdir)
        assert fake.runs()[0][1] == '-k ' + cfg
        tree = bhyve_config.parse_config(open(cfg).read())
        assert tree['lpc.bootrom'] == str(bootrom)
        assert hv.power_state(fake.vmdir) == power_state.RUNNING
        assert hv.pid(fake.vmdir) == int(fake.runs()[0][0])
        with pytest.raises(base.HypervisorError, match='already running'):
            hv.start(s, fake.vmdir)
        assert hv.shutdown(fake.vmdir, timeout=10, retry_interval=5)
        st = fake.wait_status()
        assert st['outcome'] == 'poweroff'
        assert hv.power_state(fake.vmdir) == power_state.SHUTDOWN

        hv.start(s, fake.vmdir)                 # again, then a hard kill
        fake.wait_runs(2)
        sup = hv.supervisor_pid(fake.vmdir)
        vm = hv.pid(fake.vmdir)
        hv.kill(fake.vmdir)
        # (with the marker: a SIGKILLed process may be a zombie for a moment)
        assert not base.process_alive(sup, UUID)
        assert not base.process_alive(vm, UUID)
        assert hv.power_state(fake.vmdir) == power_state.SHUTDOWN
        assert len(fake.runs()) == 2             # killed: not restarted
    execute.assert_not_called()    # no vmm instance -> no bhyvectl call


def test_backend_reports_crash(fake, tmp_path):
    bootrom = tmp_path / 'fw.fd'
    bootrom.write_bytes(b'\0')
    CONF.set_override('bhyve_bootrom', str(bootrom), group='bhyve')
    CONF.set_override('bhyve_path', fake.bin, group='bhyve')
    hv = bhyve.BhyveHypervisor()
    fake.script('3 0.5')
    with mock.patch.object(hv, 'vmm_exists', return_value=False):
        hv.start(spec(disks=[raw('/d/root')]), fake.vmdir)
        fake.wait_status()
        assert hv.power_state(fake.vmdir) == power_state.CRASHED


def test_backend_start_without_firmware(fake):
    CONF.set_override('bhyve_bootrom', '/nonexistent/fw.fd', group='bhyve')
    with pytest.raises(base.HypervisorError, match='firmware'):
        bhyve.BhyveHypervisor().start(spec(disks=[raw('/d/r')]), fake.vmdir)
