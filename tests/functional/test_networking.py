"""Neutron ports become working guest NICs, through Nova, on real guests.

Ports come from Nova's NeutronFixture (with bindings and MTUs the tests set);
the driver plugs them into real Linux bridges and a real Open vSwitch
(userspace datapath, private run dir) that the tests make; the guests
configure the port's fixed IP from the config drive's network_data.json
(static: the subnets have DHCP off, there is no DHCP agent) and ping for
real. Only a hot-plugged NIC, which the config drive does not describe, is
configured over the serial shell.
"""
import os
import time

import fixtures
import os_vif

from nova_bhyve.net import vif as network

import nethelpers
import nova_harness

SHELL = 'NOVA-BHYVE-SHELL-READY'


class NetworkingTestBase(nova_harness.BhyveFunctionalTestBase):

    def setUp(self):
        super().setUp()
        self.image = self.direct_boot_image('qcow2')
        self.host = nethelpers.HostNet(self)
        # network_data.json for the guest's static addressing
        self.flags(force_config_drive=True)
        nethelpers.filter_subnets_by_id(self, self.neutron)
        self.links_before = nethelpers.links()
        self.neutron.nbt_port_ids = []
        # after the harness has killed leftover VMs (cleanups run LIFO)
        self.addCleanup(nethelpers.remove_port_devices,
                        self.neutron.nbt_port_ids)

    def boot(self, *ports):
        server = self._create_server(
            image_uuid=self.image['id'], flavor_id=self.flavor_id,
            networks=[{'port': p['id']} for p in ports])
        self.assertEqual('ACTIVE', server['status'])
        self.wait_for_console(server, SHELL)
        shell = nethelpers.GuestShell(
            nova_harness.vm_socket(self.vmdir(server), 'serial'))
        self.addCleanup(shell.close)
        return server, shell

    def assert_configured(self, server, shell, port, dev='eth0', prefix=24):
        """The guest applied the port's address from network_data.json."""
        ip = port['fixed_ips'][0]['ip_address']
        self.assertIn('NOVA-BHYVE-NET-CONFIGURED dev=%s mac=%s addr=%s/%d' % (
            dev, port['mac_address'], ip, prefix), self.console(server))
        self.assertIn('inet %s/%d' % (ip, prefix), shell.check(
            'ip -o -4 addr show dev %s' % dev))

    @staticmethod
    def configure_by_hand(shell, port, dev, prefix=24):
        ip = port['fixed_ips'][0]['ip_address']
        shell.check('ip addr add %s/%d dev %s && ip link set %s up' % (
            ip, prefix, dev, dev))

    @staticmethod
    def ping(shell, ip, count=2):
        status, out = shell.run('ping -c %d -W 2 %s' % (count, ip),
                                timeout=60)
        return status == 0, out

    def assert_pings(self, shell, ip):
        # the first packets may go while the bridge learns / the guest's
        # link comes up: a few tries
        for _ in range(5):
            ok, out = self.ping(shell, ip)
            if ok:
                return
        self.fail('guest cannot ping %s:\n%s' % (ip, out))

    def assert_no_leftovers(self):
        left = {n for n in nethelpers.links() - self.links_before
                if n.startswith(('tap', 'qbr', 'qvb', 'qvo'))}
        self.assertEqual(set(), left)


class TestTapBindingOnLinuxBridges(NetworkingTestBase):
    """binding:vif_type 'tap': the driver makes the tap (name, MAC, MTU) and
    the network backend wires it - here the test plays that agent and
    puts each tap on a Linux bridge it made. (vif_type 'bridge' itself is
    refused by this Nova release before the driver is called: Nova dropped
    Linux bridge support; see TestBridgeBindingPlugger.)"""

    def _net(self, prefix, mtu):
        bridge = self.host.bridge()
        ns = self.host.namespace_on(bridge, prefix + '.254/24')
        net, sub = nethelpers.add_network(self.neutron, prefix, mtu=mtu)
        return bridge, ns, net, sub

    def _port(self, net, sub, ip, bridge):
        port = nethelpers.add_port(self.neutron, net, sub, ip, 'tap')
        self.wiring[port['id']] = bridge
        return port

    def setUp(self):
        super().setUp()
        self.wiring = {}

    def boot(self, *ports):
        server, shell = super().boot(*ports)
        for port in ports:
            self.wire(port)
        return server, shell

    def wire(self, port):
        """What the backend's agent does with a tap-bound port."""
        tap = 'tap' + port['id'][:11]
        self.assertNotIn(' master ', nethelpers.sh(
            'ip', '-o', 'link', 'show', 'dev', tap))
        nethelpers.sh('ip', 'link', 'set', tap, 'master',
                      self.wiring[port['id']])

    def test_two_guests_one_network_then_isolation(self):
        bridge, ns, net, sub = self._net('10.251.1', 1400)
        p1 = self._port(net, sub, '10.251.1.11', bridge)
        p2 = self._port(net, sub, '10.251.1.12', bridge)
        s1, sh1 = self.boot(p1)
        s2, sh2 = self.boot(p2)

        # the guest sees the port: MAC and MTU
        for server, sh, port in ((s1, sh1, p1), (s2, sh2, p2)):
            self.assertEqual(port['mac_address'],
                             sh.check('cat /sys/class/net/eth0/address'))
            self.assertEqual('1400', sh.check('cat /sys/class/net/eth0/mtu'))
            self.assert_configured(server, sh, port)
        # host side: taps named as Neutron's agents expect, on the bridge
        tap1 = 'tap' + p1['id'][:11]
        tap2 = 'tap' + p2['id'][:11]
        self.assertIn(tap1, self.host.bridge_ports(bridge))
        self.assertIn(tap2, self.host.bridge_ports(bridge))
        self.assertEqual('1400', nethelpers.link_mtu(tap1))

        self.assert_pings(sh1, '10.251.1.12')
        self.assert_pings(sh2, '10.251.1.11')
        self.assert_pings(sh1, '10.251.1.254')
        out = nethelpers.sh('ip', 'netns', 'exec', ns, 'busybox', 'ping',
                            '-c', '2', '-W', '2', '10.251.1.12')
        self.assertIn('2 packets received', out)

        # a second network on another bridge: no path between them
        bridge_b, ns_b, net_b, sub_b = self._net('10.251.1', 1500)
        p3 = self._port(net_b, sub_b, '10.251.1.13', bridge_b)
        s3, sh3 = self.boot(p3)
        self.assert_configured(s3, sh3, p3)
        self.assert_pings(sh3, '10.251.1.254')      # its own namespace
        ok, out = self.ping(sh3, '10.251.1.11', count=3)
        self.assertFalse(ok, out)
        ok, out = self.ping(sh1, '10.251.1.13', count=3)
        self.assertFalse(ok, out)

        for s in (s1, s2, s3):
            self._delete_server(s)
        self.assertEqual([], [p for p in self.host.bridge_ports(bridge)
                              if p.startswith('tap')])
        self.assertEqual([], [p for p in self.host.bridge_ports(bridge_b)
                              if p.startswith('tap')])
        self.assert_no_leftovers()

    def test_attach_detach_interface(self):
        bridge, ns, net, sub = self._net('10.251.2', 1450)
        p1 = self._port(net, sub, '10.251.2.11', bridge)
        server, sh = self.boot(p1)
        self.assertEqual('eth0', sh.check('ls /sys/class/net | grep eth'))
        self.assert_configured(server, sh, p1)
        self.assert_pings(sh, '10.251.2.254')

        bridge_b, ns_b, net_b, sub_b = self._net('10.251.3', 1450)
        p2 = self._port(net_b, sub_b, '10.251.3.11', bridge_b)
        self._attach_interface(server, p2['id'])
        tap2 = 'tap' + p2['id'][:11]
        self.wire(p2)
        self.assertIn(tap2, self.host.bridge_ports(bridge_b))
        deadline = time.monotonic() + 60
        while 'eth1' not in sh.check('ls /sys/class/net'):
            self.assertLess(time.monotonic(), deadline, 'no eth1 in guest')
            time.sleep(1)
        self.assertEqual(p2['mac_address'],
                         sh.check('cat /sys/class/net/eth1/address'))
        self.configure_by_hand(sh, p2, dev='eth1')
        self.assert_pings(sh, '10.251.3.254')

        self._detach_interface(server, p2['id'])
        self.assertNotIn(tap2, nethelpers.links())
        self.assertNotIn('eth1', sh.check('ls /sys/class/net'))
        self.assert_pings(sh, '10.251.2.254')      # the first NIC still works
        self._delete_server(server)
        self.assert_no_leftovers()

    def test_spawn_delete_cycles_leave_nothing(self):
        cycles = int(os.environ.get('NOVA_BHYVE_NET_CYCLES', '10'))
        bridge, ns, net, sub = self._net('10.251.4', 1450)
        for i in range(cycles):
            port = self._port(net, sub, '10.251.4.%d' % (20 + i), bridge)
            server = self._create_server(
                image_uuid=self.image['id'], flavor_id=self.flavor_id,
                networks=[{'port': port['id']}])
            self.wire(port)
            self.assertIn('tap' + port['id'][:11],
                          self.host.bridge_ports(bridge))
            self._delete_server(server)
            self.assertEqual([], [p for p in self.host.bridge_ports(bridge)
                                  if p.startswith('tap')])
        self.assert_no_leftovers()

    def test_unpluggable_binding_fails_spawn_cleanly(self):
        bridge, ns, net, sub = self._net('10.251.5', 1450)
        for vif_type in ('vhostuser', 'hw_veb'):
            port = nethelpers.add_port(self.neutron, net, sub, '10.251.5.11',
                                       vif_type)
            server = self._create_server(
                image_uuid=self.image['id'], flavor_id=self.flavor_id,
                networks=[{'port': port['id']}], expected_state='ERROR')
            fault = server['fault']['message']
            self.assertIn(vif_type, fault)
            self.assertIn('nova-bhyve can plug', fault)
            self.assertFalse(os.path.exists(self.vmdir(server)))
            self._delete_server(server)
        self.assert_no_leftovers()


class TestTapBinding(NetworkingTestBase):

    def test_tap_is_made_and_left_for_the_backend(self):
        net, sub = nethelpers.add_network(self.neutron, '10.251.6', mtu=1300)
        port = nethelpers.add_port(self.neutron, net, sub, '10.251.6.11',
                                   'tap')
        server, sh = self.boot(port)
        tap = 'tap' + port['id'][:11]
        self.assertIn(tap, nethelpers.links())
        self.assertNotIn(' master ', nethelpers.sh('ip', '-o', 'link', 'show',
                                                   'dev', tap))
        self.assertEqual('1300', sh.check('cat /sys/class/net/eth0/mtu'))
        # the "backend" wires it: here, the test puts it on a bridge
        bridge = self.host.bridge()
        ns = self.host.namespace_on(bridge, '10.251.6.254/24')
        nethelpers.sh('ip', 'link', 'set', tap, 'master', bridge)
        self.assert_configured(server, sh, port)
        self.assert_pings(sh, '10.251.6.254')
        del ns
        self._delete_server(server)
        self.assertNotIn(tap, nethelpers.links())
        self.assert_no_leftovers()


class TestBridgeBindingPlugger(NetworkingTestBase):
    """vif_type 'bridge' through the driver's plugger on real devices (Nova
    itself no longer hands such ports to drivers)."""

    def test_plug_unplug_bridge_binding(self):
        from nova.network import model

        from nova_bhyve.net import vif as network
        bridge = 'nbtb' + nethelpers.suffix()
        self.host.bridges.append(bridge)       # removed at cleanup
        vif = model.VIF(
            id='c0ffee00-1234-4321-8888-000000000001',
            address='fa:16:3e:00:00:42', type='bridge',
            details={'bridge_name': bridge},
            network=model.Network(id='n', bridge=bridge,
                                  meta={'mtu': 1400}),
            devname='tapc0ffee00-12')

        class Inst:
            uuid = 'c0ffee00-0000-0000-0000-000000000000'
        nic = network.VifPlugger().plug(Inst(), vif)
        self.assertEqual('tapc0ffee00-12', nic.ifname)
        self.assertEqual(1400, nic.mtu)
        self.assertEqual(['tapc0ffee00-12'], self.host.bridge_ports(bridge))
        self.assertEqual('1400', nethelpers.link_mtu('tapc0ffee00-12'))
        network.VifPlugger().unplug(Inst(), vif)
        self.assertEqual([], self.host.bridge_ports(bridge))
        self.assert_no_leftovers()


class TestOVSBinding(NetworkingTestBase):

    def setUp(self):
        super().setUp()
        self.ovs = nethelpers.OVS.shared(self)
        network._init_osvif()                  # registers [os_vif_ovs]
        self.flags(ovsdb_connection=self.ovs.db, group='os_vif_ovs')
        os_vif.initialize(reset=True)          # plugin sees that db
        # os-vif's privsep context runs in-process here (we are root), as
        # nova's own PrivsepFixture does for nova's contexts
        from vif_plug_ovs import privsep as ovs_privsep
        self.useFixture(fixtures.MockPatchObject(
            ovs_privsep.vif_plug, 'client_mode', False))

    def _ovs_net(self, prefix):
        bridge = self.ovs.add_bridge()
        net, sub = nethelpers.add_network(self.neutron, prefix, mtu=1450)
        return bridge, net, sub

    def _port(self, net, sub, ip, bridge, hybrid=False):
        return nethelpers.add_port(
            self.neutron, net, sub, ip, 'ovs',
            {'bridge_name': bridge, 'datapath_type': 'netdev',
             'ovs_hybrid_plug': hybrid, 'port_filter': True})

    def _two_guests(self, hybrid):
        bridge, net, sub = self._ovs_net('10.251.7')
        p1 = self._port(net, sub, '10.251.7.11', bridge, hybrid)
        p2 = self._port(net, sub, '10.251.7.12', bridge, hybrid)
        s1, sh1 = self.boot(p1)
        s2, sh2 = self.boot(p2)
        for sh, port, server in ((sh1, p1, s1), (sh2, p2, s2)):
            self.assertEqual(port['mac_address'],
                             sh.check('cat /sys/class/net/eth0/address'))
            self.assertEqual('1450', sh.check('cat /sys/class/net/eth0/mtu'))
            self.assert_configured(server, sh, port)
            name = ('qvo' if hybrid else 'tap') + port['id'][:11]
            self.assertIn(name, self.ovs.ports(bridge))
            ids = self.ovs.iface_external_ids(name)
            self.assertEqual(port['id'], ids['iface-id'])
            self.assertEqual(port['mac_address'], ids['attached-mac'])
            self.assertEqual('active', ids['iface-status'])
            self.assertEqual(server['id'], ids['vm-uuid'])
            if hybrid:
                qbr = 'qbr' + port['id'][:11]
                self.assertIn('tap' + port['id'][:11],
                              self.host.bridge_ports(qbr))
        self.assert_pings(sh1, '10.251.7.12')
        self.assert_pings(sh2, '10.251.7.11')
        self._delete_server(s1)
        self._delete_server(s2)
        self.assertEqual([], self.ovs.ports(bridge))
        self.assert_no_leftovers()

    def test_two_guests_on_ovs(self):
        self._two_guests(hybrid=False)

    def test_two_guests_on_ovs_hybrid_plug(self):
        self._two_guests(hybrid=True)

    def test_spawn_delete_cycles_leave_no_ovs_port(self):
        cycles = int(os.environ.get('NOVA_BHYVE_NET_CYCLES', '10'))
        bridge, net, sub = self._ovs_net('10.251.8')
        for i in range(cycles):
            hybrid = bool(i % 2)
            port = self._port(net, sub, '10.251.8.%d' % (20 + i), bridge,
                              hybrid)
            server = self._create_server(
                image_uuid=self.image['id'], flavor_id=self.flavor_id,
                networks=[{'port': port['id']}])
            name = ('qvo' if hybrid else 'tap') + port['id'][:11]
            self.assertEqual([name], self.ovs.ports(bridge))
            self._delete_server(server)
            self.assertEqual([], self.ovs.ports(bridge))
            self.assertIsNone(self.ovs.iface_external_ids(name))
        self.assert_no_leftovers()
