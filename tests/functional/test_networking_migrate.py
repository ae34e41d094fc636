"""A Neutron port follows its instance through a cold migration (resize),
a revert and a confirm, on real guests, a real Open vSwitch (userspace
datapath, private run dir) and a network namespace the test makes.

Both computes run on this one machine, so they share one set of network
devices and one OVS: the tap of a port has the same name whichever compute
plugged it. The test is therefore precise about who did what:

- each compute's VIF plugger is observed (a recording wrapper around the
  real calls, nothing replaced): the source unplugs, the destination plugs,
  and on revert the other way round - and nothing else;
- the tap is made again by the plug (its kernel ifindex changes), and the
  VM process of the compute that runs the instance is the one holding it
  open (the tun driver's fdinfo);
- the bridge has exactly one port for it (no duplicate), whose external-ids
  name the port, its MAC and the instance (vm-uuid);
- the guest's NIC works after each move: it pings the namespace and the
  namespace pings it;
- after the delete: no tap, no OVS port or Interface row, nothing on disk.
"""
import json
import os

import fixtures
import os_vif
import test_networking

from nova_bhyve.net import vif as network

import nethelpers
import nova_harness

SHELL = 'NOVA-BHYVE-SHELL-READY'
INIT = 'NOVA-BHYVE-GUEST-INIT'
NET = '10.251.9'


class TestPortFollowsColdMigration(nova_harness.MultiComputeMixin,
                                   test_networking.NetworkingTestBase):

    def setUp(self):
        super().setUp()
        self.ovs = nethelpers.OVS.shared(self)
        network._init_osvif()                  # registers [os_vif_ovs]
        self.flags(ovsdb_connection=self.ovs.db, group='os_vif_ovs')
        os_vif.initialize(reset=True)
        # os-vif's privsep context in-process (we are root), as in
        # test_networking.TestOVSBinding
        from vif_plug_ovs import privsep as ovs_privsep
        self.useFixture(fixtures.MockPatchObject(
            ovs_privsep.vif_plug, 'client_mode', False))
        self.start_compute_with_own_path('compute2')
        self.big_id = self._create_flavor(memory_mb=256, vcpu=1, disk=2,
                                          ephemeral=0, name='nb.big')
        self.calls = []

    # -- observation ------------------------------------------------------

    def record_vif_calls(self):
        """Record (compute, 'plug'|'unplug', port ids) for each call of a
        compute's VIF plugger; the real calls run unchanged."""
        for host, compute in self.computes.items():
            vifs = compute.manager.driver.vifs
            for op in ('plug_all', 'unplug_all'):
                real = getattr(vifs, op)

                def wrapper(instance, network_info, *args, _real=real,
                            _host=host, _op=op, **kwargs):
                    self.calls.append((_host, _op[:-4],
                                       [v['id'] for v in network_info or []]))
                    return _real(instance, network_info, *args, **kwargs)

                setattr(vifs, op, wrapper)
                self.addCleanup(delattr, vifs, op)

    def take_calls(self):
        calls, self.calls = self.calls, []
        return calls

    def ovs_rows_for(self, port):
        out = self.ovs.vsctl('--format=json', '--columns=name',
                             'find', 'Interface',
                             'external_ids:iface-id=%s' % port['id'])
        return [row[0] for row in json.loads(out)['data']]

    def running_on(self, host, server):
        pid = self.pid_in(self.host_vmdir(host, server), server)
        self.assertIsNotNone(pid, 'no VM of %s on %s' % (server['id'], host))
        return pid

    def assert_port_wired(self, server, port, bridge, host, old_ifindex):
        """The port's tap on ``bridge``, made again (new ifindex), held by
        the VM on ``host``, with one OVS port carrying the right ids;
        returns the tap's ifindex."""
        tap = 'tap' + port['id'][:11]
        index = nethelpers.ifindex(tap)
        self.assertNotEqual(old_ifindex, index,
                            'the tap was not made again by the plug')
        self.assertEqual([tap], [p for p in self.ovs.ports(bridge)
                                 if p.startswith('tap')])
        self.assertEqual([tap], self.ovs_rows_for(port))
        ids = self.ovs.iface_external_ids(tap)
        self.assertEqual(port['id'], ids['iface-id'])
        self.assertEqual(port['mac_address'], ids['attached-mac'])
        self.assertEqual(server['id'], ids['vm-uuid'])
        self.assertEqual([tap], nethelpers.taps_held_by(
            self.running_on(host, server)))
        return index

    def guest_works(self, server, host, port, ns, boots):
        """The guest's NIC on ``host`` (after its ``boots``-th boot): it has
        the port's MAC, pings the namespace, and the namespace pings it."""
        self.wait_for_console(server, SHELL, count=boots)
        shell = nethelpers.GuestShell(nova_harness.vm_socket(
            self.host_vmdir(host, server), 'serial'))
        try:
            self.assertEqual(port['mac_address'],
                             shell.check('cat /sys/class/net/eth0/address'))
            # the address comes from the config drive's network_data.json
            self.assert_configured(server, shell, port)
            self.assert_pings(shell, NET + '.254')
        finally:
            shell.close()
        out = nethelpers.sh('ip', 'netns', 'exec', ns, 'busybox', 'ping',
                            '-c', '2', '-W', '2',
                            port['fixed_ips'][0]['ip_address'])
        self.assertIn('2 packets received', out)

    # -- the test ---------------------------------------------------------

    def test_port_follows_resize_revert_and_confirm(self):
        bridge = self.ovs.add_bridge()
        ns, ns_port = self.host.namespace_on_ovs(self.ovs, bridge,
                                                 NET + '.254/24')
        net, sub = nethelpers.add_network(self.neutron, NET, mtu=1450)
        port = nethelpers.add_port(
            self.neutron, net, sub, NET + '.11', 'ovs',
            {'bridge_name': bridge, 'datapath_type': 'netdev',
             'ovs_hybrid_plug': False, 'port_filter': True})
        tap = 'tap' + port['id'][:11]
        server = self._create_server(
            image_uuid=self.image['id'], flavor_id=self.flavor_id,
            networks=[{'port': port['id']}], host='compute')
        index = self.assert_port_wired(server, port, bridge, 'compute', None)
        self.assertEqual(sorted([tap, ns_port]), self.ovs.ports(bridge))
        self.guest_works(server, 'compute', port, ns, boots=1)
        self.record_vif_calls()

        # resize to compute2: the source unplugs, the destination plugs
        server = self._resize_server(server, self.big_id)
        self.assertEqual('compute2', server['OS-EXT-SRV-ATTR:host'])
        self.assertEqual([('compute', 'unplug', [port['id']]),
                          ('compute2', 'plug', [port['id']])],
                         self.take_calls())
        self.assertIsNone(self.pid_in(self.host_vmdir('compute', server),
                                      server))
        index = self.assert_port_wired(server, port, bridge, 'compute2',
                                       index)
        self.assertEqual(sorted([tap, ns_port]), self.ovs.ports(bridge))
        # a new directory on compute2, with a new console log: its 1st boot
        self.guest_works(server, 'compute2', port, ns, boots=1)

        # revert: the destination unplugs (its destroy), the source plugs
        server = self._revert_resize(server)
        self.assertEqual('compute', server['OS-EXT-SRV-ATTR:host'])
        self.assertEqual([('compute2', 'unplug', [port['id']]),
                          ('compute', 'plug', [port['id']])],
                         self.take_calls())
        self.assertFalse(os.path.exists(self.host_vmdir('compute2', server)))
        index = self.assert_port_wired(server, port, bridge, 'compute',
                                       index)
        self.assertEqual(sorted([tap, ns_port]), self.ovs.ports(bridge))
        # the source's own console log goes on: its second boot
        self.guest_works(server, 'compute', port, ns, boots=2)

        # resize again, then confirm: the confirm (the source dropping its
        # kept copy) must not touch the port the destination now uses
        server = self._resize_server(server, self.big_id)
        self.assertEqual('compute2', server['OS-EXT-SRV-ATTR:host'])
        self.assertEqual([('compute', 'unplug', [port['id']]),
                          ('compute2', 'plug', [port['id']])],
                         self.take_calls())
        index = self.assert_port_wired(server, port, bridge, 'compute2',
                                       index)
        server = self._confirm_resize(server)
        self.assertEqual([], self.take_calls())
        self.assertEqual(index, nethelpers.ifindex(tap))
        self.assertEqual([tap], nethelpers.taps_held_by(
            self.running_on('compute2', server)))
        self.assertEqual([tap], self.ovs_rows_for(port))
        self.guest_works(server, 'compute2', port, ns, boots=1)

        self._delete_server(server)
        self.assertEqual([('compute2', 'unplug', [port['id']])],
                         self.take_calls())
        self.assertEqual([ns_port], self.ovs.ports(bridge))
        self.assertEqual([], self.ovs_rows_for(port))
        self.assertIsNone(self.ovs.iface_external_ids(tap))
        self.assertEqual([], nova_harness.leftovers(
            server['id'], [self.compute_path('compute'),
                           self.compute_path('compute2')],
            port_ids=[port['id']]))
        self.assert_no_leftovers()
