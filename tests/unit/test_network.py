"""nova_bhyve.net.vif: names, validation, and the plug/unplug commands.

Linux plugging runs for real in tests/functional/test_networking.py. What
cannot run here - FreeBSD's ifconfig(8) tap/if_bridge handling and
ovs-vsctl on FreeBSD - is pinned with ``execute`` mocked: these paths are
unverified on a real FreeBSD host.
"""
import os
import shutil
import tempfile
from unittest import mock

from nova import exception
from nova.network import model
from oslo_concurrency import processutils
import pytest

from nova_bhyve import guest
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import backend as qemu
from nova_bhyve.hypervisor.qemu import resources as qemu_resources
from nova_bhyve.net import freebsd
from nova_bhyve.net import linux
from nova_bhyve.net import vif as network

import fake_qmp

PORT = '5e1c1a83-8d4c-4a6b-9b5e-6f0f3b1c2d4e'


def vif(vif_type='ovs', mtu=1450, bridge='br-int', vnic='normal', **details):
    return model.VIF(id=PORT, address='fa:16:3e:11:22:33', type=vif_type,
                     vnic_type=vnic, details=details,
                     devname=('tap' + PORT)[:14],
                     network=model.Network(id='n', bridge=bridge,
                                           meta={'mtu': mtu}))


class Inst:
    uuid = 'a0a0a0a0-0000-0000-0000-000000000001'


def test_names_like_neutron_agents():
    v = vif()
    assert network.devname(v) == 'tap5e1c1a83-8d'
    assert network.devname({'id': PORT}) == 'tap5e1c1a83-8d'
    assert network.hybrid_names(v) == ('qbr5e1c1a83-8d', 'qvb5e1c1a83-8d',
                                       'qvo5e1c1a83-8d')
    assert network.mtu(v) == 1450
    assert linux.host_mac('fa:16:3e:11:22:33') == 'fe:16:3e:11:22:33'
    nic = network.nic_for(v)
    assert nic == guest.Nic(mac='fa:16:3e:11:22:33', ifname='tap5e1c1a83-8d',
                            model='virtio', mtu=1450)


@pytest.mark.parametrize('vif_type', ['vhostuser', 'hw_veb',
                                      'hostdev_physical', 'binding_failed',
                                      'unbound', 'vdpa'])
def test_unpluggable_bindings_are_refused_before_anything(vif_type):
    plugger = network.VifPlugger(impl=mock.Mock())
    with pytest.raises(exception.InvalidInput) as e:
        plugger.plug_all(Inst(), [vif(vif_type)])
    assert vif_type in str(e.value)
    assert plugger.impl.mock_calls == []


def test_direct_vnic_refused():
    with pytest.raises(exception.InvalidInput) as e:
        network.validate([vif('ovs', vnic='direct')])
    assert 'vnic_type' in str(e.value)


def test_failed_plug_unplugs_what_was_plugged():
    impl = mock.Mock()
    impl.in_use.return_value = False
    impl.create_tap.side_effect = [None, RuntimeError('boom')]
    plugger = network.VifPlugger(impl=impl)
    second = vif('tap')
    second['id'] = 'ffffffff-0000-0000-0000-000000000000'
    second['devname'] = 'tapffffffff-00'
    with pytest.raises(exception.VirtualInterfacePlugException):
        plugger.plug_all(Inst(), [vif('tap'), second])
    deleted = [c.args[0] for c in impl.delete.call_args_list]
    assert sorted(deleted) == ['tap5e1c1a83-8d', 'tapffffffff-00']


def test_a_tap_held_by_another_vm_of_this_machine_stays():
    """Two computes of one machine, one kernel: after a live migration
    between them the source's unplug finds the tap held by the destination's
    VM; deleting it (or its OVS port) would cut the migrated guest off."""
    impl = mock.Mock()
    impl.in_use.return_value = True
    plugger = network.VifPlugger(impl=impl)
    plugger.unplug_all(Inst(), [vif('tap'), vif('bridge')],
                       ignore_errors=False)
    impl.in_use.assert_called_with('tap5e1c1a83-8d')
    impl.delete.assert_not_called()
    impl.in_use.return_value = False           # the other VM went away
    plugger.unplug_all(Inst(), [vif('tap')], ignore_errors=False)
    impl.delete.assert_called_once_with('tap5e1c1a83-8d')


def test_linux_taps_are_multi_queue_and_in_use_means_attached(tmp_path):
    from nova_bhyve.net import linux
    calls = []
    links = linux.LinuxLinks()
    with mock.patch.object(linux, 'execute',
                           lambda *a, **k: calls.append(a)), \
            mock.patch.object(links, 'exists', return_value=False):
        links.create_tap('tapx', 'fa:16:3e:00:00:01', 1450, owner=64001)
    assert calls[0] == ('ip', 'tuntap', 'add', 'dev', 'tapx', 'mode', 'tap',
                        'multi_queue', 'user', '64001')
    assert not linux.LinuxLinks.in_use('no-such-device-here')


# -- FreeBSD: commands pinned (unverified on a FreeBSD host) ---------------

def _freebsd(existing=()):
    calls = []
    existing = set(existing)

    def fake(*cmd, **kw):
        calls.append(cmd)
        if cmd[:2] == ('ifconfig', 'tap') and cmd[2] == 'create':
            return 'tap0\n', ''
        if cmd[:2] == ('ifconfig', 'bridge') and cmd[2] == 'create':
            return 'bridge0\n', ''
        if len(cmd) == 2 and cmd[0] == 'ifconfig':
            if cmd[1] not in existing:
                raise processutils.ProcessExecutionError(exit_code=1)
        if cmd[-1] == 'name':
            existing.add(cmd[-1])
        return '', ''
    return calls, fake


def test_freebsd_bridge_binding():
    calls, fake = _freebsd()
    with mock.patch.object(freebsd, 'execute', fake):
        nic = network.VifPlugger(impl=freebsd.FreeBSDLinks()).plug(
            Inst(), vif('bridge', bridge='brq-n', mtu=1400))
    assert nic.ifname == 'tap5e1c1a83-8d'
    assert calls == [
        ('ifconfig', 'tap5e1c1a83-8d'),
        ('ifconfig', 'tap', 'create'),
        ('ifconfig', 'tap0', 'name', 'tap5e1c1a83-8d'),
        ('ifconfig', 'tap5e1c1a83-8d', 'mtu', '1400', 'up'),
        ('ifconfig', 'brq-n'),
        ('ifconfig', 'bridge', 'create'),
        ('ifconfig', 'bridge0', 'name', 'brq-n'),
        ('ifconfig', 'brq-n', 'up'),
        ('ifconfig', 'brq-n', 'addm', 'tap5e1c1a83-8d'),
    ]


def test_freebsd_ovs_binding_and_unplug():
    calls, fake = _freebsd(existing={'tap5e1c1a83-8d'})
    plugger = network.VifPlugger(impl=freebsd.FreeBSDLinks())
    with mock.patch.object(freebsd, 'execute', fake):
        plugger.plug(Inst(), vif('ovs'))
        add = calls[-1]
        del calls[:]
        plugger.unplug(Inst(), vif('ovs'))
    assert add[:6] == ('ovs-vsctl', '--timeout=120', '--', '--may-exist',
                       'add-port', 'br-int')
    assert 'external-ids:iface-id=%s' % PORT in add
    assert 'external-ids:attached-mac=fa:16:3e:11:22:33' in add
    assert 'external-ids:iface-status=active' in add
    assert 'external-ids:vm-uuid=%s' % Inst.uuid in add
    assert 'mtu_request=1450' in add
    assert calls == [
        ('ovs-vsctl', '--timeout=120', '--', '--if-exists', 'del-port',
         'br-int', 'tap5e1c1a83-8d'),
        ('ifconfig', 'tap5e1c1a83-8d'),
        ('ifconfig', 'tap5e1c1a83-8d', 'destroy'),
    ]


def test_freebsd_refuses_hybrid_plug():
    with mock.patch.object(network.sys, 'platform', 'freebsd14'):
        with pytest.raises(exception.InvalidInput) as e:
            network.validate([vif('ovs', ovs_hybrid_plug=True)])
    assert 'hybrid' in str(e.value)


# -- QEMU: hot-plug slots and QMP calls ------------------------------------

def test_qemu_renders_hotplug_root_ports():
    spec = guest.VMSpec(uuid='u', name='n', vcpus=1, memory_mb=64,
                        hotplug_ports=2)
    argv = qemu.render_argv(spec, base.VMDir('/i/u'), 'qemu', 'tcg',
                            qemu_resources.numbered(spec))
    assert argv.count('-device') == 2
    assert 'pcie-root-port,id=hp0,chassis=1' in argv
    assert 'pcie-root-port,id=hp1,chassis=2' in argv
    # old specs (no field) render as before
    old = guest.VMSpec.from_json(spec.to_json().replace(
        '"hotplug_ports": 2,', ''))
    assert old.hotplug_ports == 0


@pytest.fixture
def qmp_vmdir():
    path = tempfile.mkdtemp(prefix='nbnet-')      # short: a socket path
    d = base.VMDir(path)
    base.make_runtime_dir(d)
    yield d
    shutil.rmtree(path)


def _attach_nic(vmdir, handler=lambda c, a: {}):
    """attach_nic against a fake QEMU (fake_qmp: a real socket, the
    descriptors received); the tap is faked by /dev/null: opening a real
    one (resources.open_tap) needs root and is tested in
    tests/interop/test_qemu_runtime_fds.py. Returns the fake, what it
    still holds, and the error attach_nic raised (or None)."""
    nic = guest.Nic(mac='fa:16:3e:11:22:33', ifname='tapX', mtu=1450)
    opened = []

    def open_tap(ifname):
        assert ifname == 'tapX'
        opened.append(os.open('/dev/null', os.O_RDWR))
        return opened[-1]
    error = None
    with fake_qmp.FakeQMP(vmdir.control, handler) as fake:
        with mock.patch.object(qemu_resources, 'open_tap', open_tap):
            try:
                qemu.QemuHypervisor().attach_nic(vmdir, nic, 'hp1')
            except base.HypervisorError as e:
                error = e
        held = fake.open_targets()
    # the driver's copy is closed whatever happened
    with pytest.raises(OSError):
        os.fstat(opened[0])
    return fake, held, error


GETFD = ('getfd', {'fdname': 'hostnet-tapX'})
NETDEV_ADD = ('netdev_add', {'type': 'tap', 'id': 'hostnet-tapX',
                             'fd': 'hostnet-tapX'})


def test_qemu_attach_nic_hands_qemu_the_open_tap(qmp_vmdir):
    fake, held, error = _attach_nic(qmp_vmdir)
    assert error is None
    assert [(c, a) for c, a, _ in fake.calls] == [
        GETFD, NETDEV_ADD,
        ('device_add', {'driver': 'virtio-net-pci', 'id': 'nic-tapX',
                        'netdev': 'hostnet-tapX', 'mac': 'fa:16:3e:11:22:33',
                        'bus': 'hp1', 'host_mtu': 1450}),
    ]
    # the descriptor travelled with getfd (the fake's netdev_add does not
    # consume it as QEMU's does)
    assert fake.calls[0][2] == ['/dev/null']
    assert held == ['/dev/null']


def test_qemu_attach_nic_refused_takes_the_descriptor_back(qmp_vmdir):
    def handler(cmd, args):
        raise fake_qmp.Fail('tap: no')
    fake, held, error = _attach_nic(qmp_vmdir, handler)
    assert 'tap: no' in str(error)
    assert [(c, a) for c, a, _ in fake.calls] == [
        GETFD, NETDEV_ADD, ('closefd', {'fdname': 'hostnet-tapX'})]
    assert held == []


def test_qemu_attach_nic_device_add_refused_removes_the_netdev(qmp_vmdir):
    def handler(cmd, args):
        if cmd == 'device_add':
            raise fake_qmp.Fail('bus full')
        return {}
    fake, _, error = _attach_nic(qmp_vmdir, handler)
    assert 'bus full' in str(error)
    assert fake.commands() == ['getfd', 'netdev_add', 'device_add',
                               'netdev_del']
    assert fake.calls[-1][1] == {'id': 'hostnet-tapX'}


