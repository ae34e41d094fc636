"""Spawn waits for Neutron's network-vif-plugged before the guest runs.

A port Neutron reports DOWN (not yet wired by its agent) gives Nova a VIF
with active=False; the driver plugs it, then holds the guest until the
event arrives - sent here through Nova's own os-server-external-events API,
as Neutron would - or [DEFAULT] vif_plugging_timeout passes. Real guests,
real taps; the only stand-in is the test sending Neutron's event.
"""
import os
import time

from nova_bhyve.hypervisor import base

import nethelpers
import nova_harness


class TestVifPluggedEvents(nova_harness.BhyveFunctionalTestBase):

    def setUp(self):
        super().setUp()
        self.image = self.direct_boot_image('qcow2')
        self.neutron.nbt_port_ids = []
        self.addCleanup(nethelpers.remove_port_devices,
                        self.neutron.nbt_port_ids)
        self.net, self.sub = nethelpers.add_network(self.neutron, '10.251.9')

    def _down_port(self, ip):
        port = nethelpers.add_port(self.neutron, self.net, self.sub, ip,
                                   'tap')
        port['status'] = 'DOWN'
        return port

    def _post(self, port):
        body = self._build_server(image_uuid=self.image['id'],
                                  flavor_id=self.flavor_id,
                                  networks=[{'port': port['id']}])
        return self.api.post_server({'server': body})

    def _wait_for_tap(self, port, timeout=120):
        tap = 'tap' + port['id'][:11]
        deadline = time.monotonic() + timeout
        while tap not in nethelpers.links():
            self.assertLess(time.monotonic(), deadline, 'no tap %s' % tap)
            time.sleep(0.2)
        return tap

    def _event(self, server, port, status='completed'):
        self.api.create_server_external_events([{
            'name': 'network-vif-plugged', 'server_uuid': server['id'],
            'tag': port['id'], 'status': status}])

    def _assert_aborted_leaving_nothing(self, server, port):
        server = self._wait_for_state_change(server, 'ERROR')
        # Nova's own wording for VirtualInterfaceCreateException (as with
        # the libvirt driver): the build is aborted, not rescheduled
        self.assertIn('Failed to allocate the network(s), not rescheduling',
                      server['fault']['message'])
        self.assertEqual([], nova_harness.leftovers(
            server['id'], [self.instances_path], port_ids=[port['id']]))
        self._delete_server(server)

    def test_guest_starts_only_after_the_event(self):
        self.flags(vif_plugging_timeout=300)
        port = self._down_port('10.251.9.11')
        server = self._post(port)
        tap = self._wait_for_tap(port)
        # plugged, but held: no VM process while Neutron has not answered
        time.sleep(3)
        server = self.api.get_server(server['id'])
        self.assertEqual('BUILD', server['status'])
        vmdir = base.VMDir(self.vmdir(server))
        self.assertFalse(os.path.exists(vmdir.pidfile))
        self._event(server, port)
        server = self._wait_for_state_change(server, 'ACTIVE')
        self.wait_for_console(server, 'NOVA-BHYVE-SHELL-READY')
        self._delete_server(server)
        self.assertNotIn(tap, nethelpers.links())

    def test_timeout_is_fatal_and_leaves_nothing(self):
        self.flags(vif_plugging_timeout=2, vif_plugging_is_fatal=True)
        port = self._down_port('10.251.9.12')
        server = self._post(port)
        self._assert_aborted_leaving_nothing(server, port)

    def test_failed_event_aborts_the_build(self):
        self.flags(vif_plugging_timeout=300, vif_plugging_is_fatal=True)
        port = self._down_port('10.251.9.13')
        server = self._post(port)
        self._wait_for_tap(port)
        self._event(server, port, status='failed')
        self._assert_aborted_leaving_nothing(server, port)

    def test_timeout_not_fatal_boots_anyway(self):
        self.flags(vif_plugging_timeout=2, vif_plugging_is_fatal=False)
        port = self._down_port('10.251.9.14')
        server = self._post(port)
        server = self._wait_for_state_change(server, 'ACTIVE')
        self.wait_for_console(server, 'NOVA-BHYVE-SHELL-READY')
        self._delete_server(server)
