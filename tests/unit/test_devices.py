"""Config drive, consoles and volumes at their boundaries: the QEMU argv
and bhyve config keys they add, the QMP command sequences for volume
hot-plug (against a fake QMP server on a real unix socket), port choice,
and Nova's config drive builder writing real ISO 9660 / vfat images."""
import fcntl
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading

from nova import exception
from nova.console import serial as serial_ports
import pytest

from nova_bhyve import conf
from nova_bhyve import guest
from nova_bhyve import instance_store
from nova_bhyve.devices import configdrive
from nova_bhyve.devices import consoles
from nova_bhyve.devices import volumes
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.bhyve import backend as bhyve
from nova_bhyve.hypervisor.bhyve import config as bhyve_config
from nova_bhyve.hypervisor.qemu import backend as qemu
from nova_bhyve.hypervisor.qemu import qmp
from nova_bhyve.hypervisor.qemu import resources as qemu_resources
from nova_bhyve.storage import vdsk

import fake_qmp

CONF = conf.CONF
UUID = '6d5ba3a0-55a1-4c7c-9a43-3d1b0f6a2b11'
VOL = '3c1e2a4b-5d6f-4a1b-9c8d-7e6f5a4b3c2d'
VM = '/var/lib/nova/instances/' + UUID


@pytest.fixture(autouse=True)
def _clear_overrides():
    yield
    for opt, group in (('enabled', 'serial_console'),
                       ('proxyclient_address', 'serial_console'),
                       ('port_range', 'serial_console'),
                       ('enabled', 'vnc'), ('server_listen', 'vnc'),
                       ('server_proxyclient_address', 'vnc'),
                       ('config_drive_format', None),
                       ('bhyve_bootrom', 'bhyve')):
        CONF.clear_override(opt, group=group)
    serial_ports.ALLOCATED_PORTS.clear()


def spec(disks=(), **kw):
    s = guest.VMSpec(uuid=UUID, name='instance-0000002a', vcpus=1,
                     memory_mb=256, disks=list(disks))
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def root():
    return guest.Disk(path=VM + '/disk', format='qcow2')


def volume(path='/srv/vol', serial=VOL, readonly=False):
    return guest.Disk(path=path, format='raw', serial=serial,
                      readonly=readonly)


def argv_of(s):
    return qemu.render_argv(s, base.VMDir(VM), 'qemu', 'tcg',
                            qemu_resources.numbered(s))


def after(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


# -- QEMU argv -------------------------------------------------------------

def test_serial_stays_on_the_unix_socket_without_a_port():
    # the unix socket the driver bound (fd 5), the console log through the
    # logger's pipe (the last fdset)
    chardevs = after(argv_of(spec([root()])), '-chardev')
    assert chardevs[0] == ('socket,id=serial0,fd=5,server=on,wait=off,'
                           'logfile=/dev/fdset/2,logappend=on')


def test_serial_on_tcp_keeps_the_console_log():
    # Nova's serial console: the TCP socket the driver bound (fd 5), so a
    # sandboxed QEMU binds nothing (tests/interop/test_qemu_sandbox.py)
    s = spec([root()])
    s.consoles.serial_host, s.consoles.serial_port = '192.0.2.5', 10007
    chardevs = after(argv_of(s), '-chardev')
    assert chardevs[0] == ('socket,id=serial0,fd=5,server=on,wait=off,'
                           'logfile=/dev/fdset/2,logappend=on')
    assert 'chardev:serial0' in after(argv_of(s), '-serial')


def test_vnc_renders_vga_and_a_display_range():
    s = spec([root()])
    assert '-vnc' not in argv_of(s)
    s.consoles.vnc_host, s.consoles.vnc_port = '127.0.0.1', 5907
    argv = argv_of(s)
    assert argv[-4:] == ['-device', 'VGA,id=video0',
                         '-vnc', '127.0.0.1:7,to=107']
    s.consoles.vnc_host = '::1'
    assert argv_of(s)[-1] == '[::1]:7,to=107'


def test_config_drive_is_a_read_only_cdrom_on_ahci():
    cd = configdrive.disk(VM + '/disk.config', fmt='iso9660')
    argv = argv_of(spec([root(), cd]))
    devices = after(argv, '-device')
    assert 'ich9-ahci,id=ahci0' in devices
    assert 'ide-cd,drive=disk1,bus=ahci0.0' in devices
    assert ('driver=raw,node-name=disk1,read-only=on,discard=unmap,'
            'file.driver=file,file.filename=/dev/fdset/2'
            in after(argv, '-blockdev'))
    # opened read-only by the driver: one descriptor in its fdset
    assert after(argv, '-add-fd')[1:2] == [
        'fd=7,set=2,opaque=%s/disk.config' % VM]
    vfat = configdrive.disk(VM + '/disk.config', fmt='vfat')
    assert (vfat.bus, vfat.device, vfat.readonly) == ('virtio', 'disk', True)


def test_volumes_sit_on_hotplug_root_ports_with_their_serial():
    s = spec([root(), volume('/dev/sdx'), volume('/srv/v2', serial=UUID,
                                                 readonly=True)],
             hotplug_ports=3)
    argv = argv_of(s)
    devices = after(argv, '-device')
    assert devices[:3] == ['pcie-root-port,id=hp0,chassis=1',
                           'pcie-root-port,id=hp1,chassis=2',
                           'pcie-root-port,id=hp2,chassis=3']
    node, devid = qemu.volume_names(VOL)
    assert node == 'vol3c1e2a4b5d6f4a1b9c8d7e6f' and len(node) <= 31
    assert devid == 'vol-' + VOL
    assert ('virtio-blk-pci,id=vol-%s,drive=%s,serial=%s,bus=hp0'
            % (VOL, node, VOL)) in devices
    assert ('driver=raw,node-name=%s,read-only=off,file.driver=host_device,'
            'file.filename=/dev/fdset/2' % node) in after(argv, '-blockdev')
    node2, _ = qemu.volume_names(UUID)
    assert ('driver=raw,node-name=%s,read-only=on,file.driver=file,'
            'file.filename=/dev/fdset/3' % node2) in after(argv, '-blockdev')
    assert [a.split(',')[1:] for a in after(argv, '-add-fd')][1:4] == [
        ['set=2', 'opaque=/dev/sdx'], ['set=3', 'opaque=/srv/v2'],
        ['set=4', 'opaque=console']]
    assert devices[-1].endswith(',bus=hp1')


def test_more_volumes_than_ports_is_an_error():
    with pytest.raises(base.HypervisorError, match='hot-plug ports'):
        argv_of(spec([root(), volume()], hotplug_ports=0))


# -- bhyve config tree -------------------------------------------------------

def _tree(s):
    CONF.set_override('bhyve_bootrom', '/fw/BHYVE_UEFI.fd', group='bhyve')
    return bhyve_config.render_config(s, base.VMDir(VM))


def _raw_root():
    return guest.Disk(path=VM + '/disk', format='raw')


def test_bhyve_vnc_is_fbuf_with_a_tablet():
    s = spec([_raw_root()])
    assert 'fbuf' not in _tree(s).values()
    s.consoles.vnc_host, s.consoles.vnc_port = '127.0.0.1', 5901
    tree = _tree(s)
    assert tree['pci.0.3.0.device'] == 'fbuf'
    assert tree['pci.0.3.0.tcp'] == '127.0.0.1:5901'
    assert tree['pci.0.3.0.w'] == '1024'
    assert tree['pci.0.3.0.h'] == '768'
    assert tree['pci.0.4.0.device'] == 'xhci'
    assert tree['pci.0.4.0.slot.1.device'] == 'tablet'
    s.consoles.vnc_host = '::1'
    assert _tree(s)['pci.0.3.0.tcp'] == '[::1]:5901'


def test_bhyve_config_drive_and_volume_keys():
    cd = configdrive.disk(VM + '/disk.config', fmt='iso9660')
    tree = _tree(spec([_raw_root(), cd, volume()]))
    assert tree['pci.0.3.0.device'] == 'ahci'
    assert tree['pci.0.3.0.port.0.type'] == 'cd'
    assert tree['pci.0.3.0.port.0.path'] == VM + '/disk.config'
    assert tree['pci.0.3.0.port.0.ro'] == 'true'
    assert tree['pci.0.4.0.device'] == 'virtio-blk'
    assert tree['pci.0.4.0.path'] == '/srv/vol'
    assert tree['pci.0.4.0.ser'] == VOL


def test_bhyve_has_no_tcp_serial_and_no_hotplug():
    hv = bhyve.BhyveHypervisor()
    assert not hv.supports_serial_tcp and hv.supports_vnc
    assert hv.hotplug_ports == 0
    with pytest.raises(NotImplementedError, match='hot-plug'):
        hv.attach_disk(base.VMDir(VM), volume())
    with pytest.raises(NotImplementedError, match='hot-plug'):
        hv.detach_disk(base.VMDir(VM), volume())


# -- consoles.prepare ---------------------------------------------------------

class FakeHV:
    def __init__(self, serial=True, vnc=True):
        self.supports_serial_tcp = serial
        self.supports_vnc = vnc


def _free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_prepare_turns_everything_off_by_config():
    CONF.set_override('enabled', False, group='serial_console')
    CONF.set_override('enabled', False, group='vnc')
    s = spec()
    assert not consoles.prepare(s, FakeHV())
    assert s.consoles == guest.Consoles()
    with pytest.raises(exception.ConsoleTypeUnavailable):
        consoles.serial_console(s)
    with pytest.raises(exception.ConsoleTypeUnavailable):
        consoles.vnc_console(None)


def test_prepare_allocates_and_keeps_ports():
    port = _free_port()
    CONF.set_override('enabled', True, group='serial_console')
    CONF.set_override('proxyclient_address', '127.0.0.1',
                      group='serial_console')
    CONF.set_override('port_range', '%d:%d' % (port, port + 50),
                      group='serial_console')
    CONF.set_override('enabled', True, group='vnc')
    CONF.set_override('server_listen', '127.0.0.1', group='vnc')
    CONF.set_override('server_proxyclient_address', '192.0.2.9', group='vnc')
    s = spec()
    assert consoles.prepare(s, FakeHV())
    c = s.consoles
    assert c.serial_host == '127.0.0.1'
    assert port <= c.serial_port < port + 50
    assert ('127.0.0.1', c.serial_port) in serial_ports.ALLOCATED_PORTS
    assert c.vnc_host == '127.0.0.1' and 5900 <= c.vnc_port < 6900
    # a second start with the ports still free keeps them
    assert not consoles.prepare(s, FakeHV())
    con = consoles.serial_console(s)
    assert (con.host, con.port) == ('127.0.0.1', c.serial_port)
    vnc = consoles.vnc_console(c.vnc_port)
    assert (vnc.host, vnc.port) == ('192.0.2.9', c.vnc_port)
    # a taken VNC port moves the VM to another one
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(('127.0.0.1', c.vnc_port))
    taken.listen(1)
    try:
        old = c.vnc_port
        assert consoles.prepare(s, FakeHV())
        assert c.vnc_port != old
    finally:
        taken.close()
    # releasing gives the serial port back to Nova's allocator
    serial = c.serial_port
    consoles.release_serial(s)
    assert ('127.0.0.1', serial) not in serial_ports.ALLOCATED_PORTS
    assert c.serial_port is None


def test_prepare_without_tcp_serial_support_leaves_serial_off():
    CONF.set_override('enabled', True, group='serial_console')
    CONF.set_override('enabled', False, group='vnc')
    s = spec()
    consoles.prepare(s, FakeHV(serial=False))
    assert s.consoles.serial_port is None


# -- QMP sequences for volumes ------------------------------------------------

class FakeQEMU:
    """A QMP server on a real unix socket, any number of connections;
    ``handler(command, arguments)`` returns the messages to send back."""

    def __init__(self, path, handler):
        self.path, self.handler = path, handler
        self.commands = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(conn,),
                             daemon=True).start()

    def _conn(self, conn):
        with conn, conn.makefile('rwb') as f:
            f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            f.flush()
            for line in f:
                req = json.loads(line)
                cmd, args = req['execute'], req.get('arguments')
                if cmd == 'qmp_capabilities':
                    replies = [{'return': {}}]
                else:
                    self.commands.append((cmd, args))
                    replies = self.handler(cmd, args)
                for r in replies:
                    f.write(json.dumps(r).encode() + b'\n')
                f.flush()

    def close(self):
        self.srv.close()


@pytest.fixture
def vmdir():
    path = tempfile.mkdtemp(prefix='nbdev-')
    d = base.VMDir(path)
    base.make_runtime_dir(d)
    yield d
    shutil.rmtree(path)


PCI = [{'bus': 0, 'devices': [
    {'qdev_id': '', 'slot': 0},
    {'qdev_id': 'hp0', 'slot': 1,
     'pci_bridge': {'bus': {'number': 1}, 'devices': [{'qdev_id': 'x'}]}},
    {'qdev_id': 'hp1', 'slot': 2,
     'pci_bridge': {'bus': {'number': 2}, 'devices': []}}]}]


def _modes(fake):
    """{opaque: access mode} of the descriptors in the fake's fdsets."""
    return {opaque: fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
            for fdset in fake.fdsets.values() for fd, opaque in fdset}


def _pci_handler(extra=None):
    def handler(cmd, args):
        if cmd == 'query-pci':
            return PCI
        if extra:
            return extra(cmd, args)
        return {}
    return handler


def test_attach_hands_qemu_the_open_volume_then_device_add(vmdir, tmp_path):
    path = str(tmp_path / 'vol')
    with open(path, 'wb') as f:
        f.truncate(1 << 20)
    with fake_qmp.FakeQMP(vmdir.control, _pci_handler()) as fake:
        qemu.QemuHypervisor().attach_disk(vmdir, volume(path))
        held = fake.open_targets()
        opaques = {i: [o for _, o in fds] for i, fds in fake.fdsets.items()}
        modes = _modes(fake)
    node, devid = qemu.volume_names(VOL)
    assert [(c, a) for c, a, _ in fake.calls] == [
        ('query-pci', None),
        ('add-fd', {'opaque': path}),
        ('blockdev-add', {'driver': 'raw', 'node-name': node,
                          'read-only': False,
                          'file': {'driver': 'file',
                                   'filename': '/dev/fdset/0'}}),
        ('device_add', {'driver': 'virtio-blk-pci', 'id': devid,
                        'drive': node, 'serial': VOL, 'bus': 'hp1'})]
    # the descriptor travelled with add-fd, opened read-write
    assert fake.calls[1][2] == [path]
    assert held == [path]
    assert opaques == {0: [path]}
    assert modes == {path: os.O_RDWR}


def test_attach_of_a_read_only_chain_names_every_backing_node(vmdir,
                                                              tmp_path):
    base_img = str(tmp_path / 'base.qcow2')
    top = str(tmp_path / 'vol.qcow2')
    vdsk.create(base_img, 'qcow2', 1 << 20)
    vdsk.create(top, 'qcow2', 0, backing=base_img, backing_fmt='qcow2')
    with fake_qmp.FakeQMP(vmdir.control, _pci_handler()) as fake:
        disk = guest.Disk(path=top, format='qcow2', serial=VOL,
                          readonly=True)
        qemu.QemuHypervisor().attach_disk(vmdir, disk)
        modes = _modes(fake)
    node, _ = qemu.volume_names(VOL)
    assert [c for c in fake.commands()] == [
        'query-pci', 'add-fd', 'add-fd', 'blockdev-add', 'device_add']
    assert fake.calls[3][1] == {
        'driver': 'qcow2', 'node-name': node, 'read-only': True,
        'file': {'driver': 'file', 'filename': '/dev/fdset/0'},
        'backing': {'driver': 'qcow2', 'node-name': node + '-b1',
                    'read-only': True,
                    'file': {'driver': 'file',
                             'filename': '/dev/fdset/1'}}}
    assert modes == {top: os.O_RDONLY, base_img: os.O_RDONLY}


def test_attach_removes_the_node_and_fdset_when_device_add_fails(vmdir,
                                                                 tmp_path):
    path = str(tmp_path / 'vol')
    open(path, 'wb').close()

    def extra(cmd, args):
        if cmd == 'device_add':
            raise fake_qmp.Fail('no')
        if cmd == 'query-named-block-nodes':
            return []
        return {}
    with fake_qmp.FakeQMP(vmdir.control, _pci_handler(extra)) as fake:
        with pytest.raises(qmp.QMPError):
            qemu.QemuHypervisor().attach_disk(vmdir, volume(path))
        held = fake.open_targets()
    node, _ = qemu.volume_names(VOL)
    assert fake.commands() == [
        'query-pci', 'add-fd', 'blockdev-add', 'device_add', 'blockdev-del',
        'query-named-block-nodes', 'remove-fd']
    assert fake.calls[4][1] == {'node-name': node}
    assert fake.calls[6][1] == {'fdset-id': 0}
    assert held == []


def test_attach_of_a_missing_volume_hands_qemu_nothing(vmdir, tmp_path):
    with fake_qmp.FakeQMP(vmdir.control, _pci_handler()) as fake:
        with pytest.raises(base.HypervisorError, match='cannot open'):
            qemu.QemuHypervisor().attach_disk(
                vmdir, volume(str(tmp_path / 'none')))
    assert fake.commands() == ['query-pci']


def test_attach_without_a_free_port(vmdir):
    full = [{'bus': 0, 'devices': [PCI[0]['devices'][1]]}]
    with fake_qmp.FakeQMP(vmdir.control, lambda c, a: full) as fake:
        with pytest.raises(base.HypervisorError, match='hot-plug port'):
            qemu.QemuHypervisor().attach_disk(vmdir, volume())
    assert fake.commands() == ['query-pci']


def _detach_handler(devid, node, device_del=None):
    """QEMU with the volume's nodes on fdsets 3 (top) and 4 (backing),
    the root disk's on 1; blockdev-del removes the volume's."""
    nodes = [{'node-name': 'disk0', 'file': '/dev/fdset/1'},
             {'node-name': '#block1', 'file': '/dev/fdset/1'},
             {'node-name': node, 'file': 'json:{"backing": {"file": '
              '{"filename": "/dev/fdset/4"}}, "file": {"driver": "file", '
              '"filename": "/dev/fdset/3"}}'},
             {'node-name': '#block2', 'file': '/dev/fdset/3'},
             {'node-name': node + '-b1', 'file': '/dev/fdset/4'},
             {'node-name': '#block3', 'file': '/dev/fdset/4'}]

    def handler(cmd, args):
        if cmd == 'device_del':
            if device_del:
                return device_del()
            # the guest acknowledges later: an unrelated event first
            return fake_qmp.Messages([
                {'return': {}},
                {'event': 'DEVICE_DELETED', 'data': {'device': 'other'}},
                {'event': 'DEVICE_DELETED',
                 'data': {'device': devid, 'path': '/x'}}])
        if cmd == 'query-named-block-nodes':
            return nodes
        if cmd == 'blockdev-del':
            nodes[2:] = []
        return {}
    return handler


def _fill_fdsets(fake, tmp_path, *ids):
    for i in ids:
        fd = os.open(str(tmp_path), os.O_RDONLY)
        fake.fdsets[i] = [(fd, '/vol%d' % i)]


def test_detach_waits_for_device_deleted_then_removes_node_and_fdsets(
        vmdir, tmp_path):
    node, devid = qemu.volume_names(VOL)
    with fake_qmp.FakeQMP(vmdir.control,
                          _detach_handler(devid, node)) as fake:
        _fill_fdsets(fake, tmp_path, 1, 3, 4)
        qemu.QemuHypervisor().detach_disk(vmdir, volume(), timeout=10)
        left = sorted(fake.fdsets)
    assert [(c, a) for c, a, _ in fake.calls] == [
        ('device_del', {'id': devid}),
        ('query-named-block-nodes', None),
        ('query-fdsets', None),
        ('blockdev-del', {'node-name': node}),
        ('query-named-block-nodes', None),
        ('remove-fd', {'fdset-id': 3}),
        ('remove-fd', {'fdset-id': 4})]
    # the root disk's set stays
    assert left == [1]


def test_detach_times_out_when_the_guest_never_lets_go(vmdir):
    fake = FakeQEMU(vmdir.control, lambda c, a: [{'return': {}}])
    try:
        with pytest.raises(base.HypervisorError, match='DEVICE_DELETED'):
            qmp.execute_until_event(vmdir.control, 'device_del',
                                    {'id': 'd'}, 'DEVICE_DELETED',
                                    timeout=1.5, retry_interval=0.5)
    finally:
        fake.close()
    # device_del was sent again while waiting
    assert len(fake.commands) >= 2
    assert set(c for c, _ in fake.commands) == {'device_del'}


def test_detach_of_a_device_qemu_no_longer_has(vmdir, tmp_path):
    node, devid = qemu.volume_names(VOL)

    def gone():
        raise fake_qmp.Fail('gone', 'DeviceNotFound')
    with fake_qmp.FakeQMP(vmdir.control,
                          _detach_handler(devid, node, gone)) as fake:
        _fill_fdsets(fake, tmp_path, 1, 3, 4)
        qemu.QemuHypervisor().detach_disk(vmdir, volume(), timeout=5)
    assert fake.commands() == [
        'device_del', 'query-named-block-nodes', 'query-fdsets',
        'blockdev-del', 'query-named-block-nodes', 'remove-fd', 'remove-fd']


def test_resize_is_block_resize_of_the_volume_node(vmdir):
    fake = FakeQEMU(vmdir.control, lambda c, a: [{'return': {}}])
    try:
        qemu.QemuHypervisor().resize_disk(vmdir, volume(), 2 << 30)
    finally:
        fake.close()
    node, _ = qemu.volume_names(VOL)
    assert fake.commands == [('block_resize',
                              {'node-name': node, 'size': 2 << 30})]


# -- volumes (os-brick LocalConnector) ----------------------------------------

def test_local_volume_connects_to_its_path(tmp_path):
    path = tmp_path / 'vol'
    path.write_bytes(b'\0' * 4096)
    ci = {'driver_volume_type': 'local', 'serial': VOL,
          'data': {'device_path': str(path), 'access_mode': 'ro'}}
    disk = volumes.connect(ci)
    assert disk == guest.Disk(path=str(path), format='raw', bus='virtio',
                              device='disk', readonly=True, serial=VOL)
    assert volumes.size(str(path)) == 4096
    volumes.disconnect(ci)
    s = spec([root(), disk])
    assert volumes.find(s, VOL) is disk and volumes.find(s, UUID) is None


def test_other_volume_types_are_refused():
    for vtype in ('iscsi', 'rbd', 'fake'):
        with pytest.raises(exception.InvalidVolume, match=vtype):
            volumes.connect({'driver_volume_type': vtype, 'data': {}})


def test_missing_local_path_is_volume_not_found(tmp_path):
    with pytest.raises(exception.VolumeNotFound):
        volumes.connect({'driver_volume_type': 'local', 'serial': VOL,
                         'data': {'device_path': str(tmp_path / 'no')}})


def test_connector_properties():
    props = volumes.connector_properties()
    assert {'ip', 'host', 'platform', 'os_type', 'multipath'} <= set(props)
    assert props['ip'] == CONF.my_block_storage_ip
    assert ('initiator' in props) == os.path.exists(
        volumes.ISCSI_INITIATOR_FILE)


# -- config drive images (Nova's builder, real tools) -------------------------

MD = [('openstack/latest/meta_data.json', '{"uuid": "%s"}' % UUID),
      ('openstack/latest/user_data', b'line one\n')]


def _build(fmt, path):
    CONF.set_override('config_drive_format', fmt)
    with configdrive.Builder() as cdb:
        cdb.mdfiles = list(MD)
        cdb.make_drive(path)


@pytest.mark.skipif(not shutil.which('genisoimage'),
                    reason='genisoimage is not installed')
def test_iso9660_drive(tmp_path, monkeypatch):
    # the ISO publisher string reads Nova's release file through the
    # (here uninitialised) global config; it is only a label
    from nova import version
    monkeypatch.setattr(version, 'product_string', lambda: 'nova')
    monkeypatch.setattr(version, 'version_string_with_package',
                        lambda: 'test')
    path = str(tmp_path / 'disk.config')
    _build('iso9660', path)
    with open(path, 'rb') as f:
        f.seek(0x8000)
        pvd = f.read(72)
    assert pvd[1:6] == b'CD001' and pvd[40:72].strip() == b'config-2'
    if shutil.which('isoinfo'):
        out = subprocess.run(['isoinfo', '-R', '-i', path, '-x',
                              '/openstack/latest/user_data'],
                             capture_output=True, check=True).stdout
        assert out == b'line one\n'


@pytest.mark.skipif(not (shutil.which('mkfs.fat') and shutil.which('mcopy')),
                    reason='dosfstools/mtools are not installed')
def test_vfat_drive_without_root(tmp_path):
    path = str(tmp_path / 'disk.config')
    _build('vfat', path)
    env = dict(os.environ, MTOOLS_SKIP_CHECK='1')
    label = subprocess.run(['mlabel', '-s', '-i', path, '::'], env=env,
                           capture_output=True, text=True).stdout
    assert 'CONFIG-2' in label.upper()
    out = subprocess.run(['mtype', '-i', path,
                          '::/openstack/latest/meta_data.json'], env=env,
                         capture_output=True, check=True, text=True).stdout
    assert json.loads(out) == {'uuid': UUID}


# -- driver: console ports are persisted only into the instance's own spec ----

def test_console_ports_are_saved_only_into_spec_json(tmp_path):
    from nova_bhyve import driver as nb_driver
    CONF.set_override('enabled', False, group='serial_console')
    CONF.set_override('enabled', True, group='vnc')
    CONF.set_override('server_listen', '127.0.0.1', group='vnc')
    vmdir = base.VMDir(str(tmp_path / UUID))
    os.makedirs(vmdir.path)
    drv = nb_driver.BhyveDriver.__new__(nb_driver.BhyveDriver)
    drv.hypervisor = FakeHV()
    own = spec([root()])
    instance_store.write_spec(vmdir, own)
    drv.prepare_consoles(vmdir, own)
    with open(vmdir.spec) as f:
        saved = guest.VMSpec.from_json(f.read())
    assert saved.consoles.vnc_port == own.consoles.vnc_port is not None
    # a transient spec (rescue) gets ports but does not replace spec.json
    other = spec([guest.Disk(path=vmdir.path + '/disk.rescue')])
    drv.prepare_consoles(vmdir, other)
    assert other.consoles.vnc_port
    with open(vmdir.spec) as f:
        assert guest.VMSpec.from_json(f.read()) == saved
