"""Remote consoles through Nova, on real QEMU guests.

Serial: with [serial_console] enabled, the guest's COM1 is a raw TCP server
on a port Nova's serial helpers allocated; the test connects to it directly
(loopback only; Nova's serial proxy is not needed), types a command into the
guest's root shell and reads the answer. VNC: QEMU's VNC server answers with
the RFB protocol banner. In both cases the host/port tested are the ones
Nova stored for the console token that the remote-consoles API returned.
"""
import json
import os
import re
import socket
import time
import urllib.parse

from nova import context as nova_context
from nova import objects
from nova.tests.functional.api import client

import nova_harness

SHELL = 'NOVA-BHYVE-SHELL-READY'
PROMPT = b'nbguest# '


def _read_until(sock, pattern, timeout):
    """Read from ``sock`` until ``pattern`` (bytes regex) matches."""
    deadline = time.monotonic() + timeout
    data = b''
    while not re.search(pattern, data):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError('%r not received within %ds; got %r' % (
                pattern, timeout, data[-2000:]))
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            continue
        if not chunk:
            raise AssertionError('connection closed; got %r' % data[-2000:])
        data += chunk
    return data


class TestConsoles(nova_harness.BhyveFunctionalTestBase):

    def setUp(self):
        super().setUp()
        self.flags(enabled=True, proxyclient_address='127.0.0.1',
                   port_range='10000:20000', group='serial_console')
        self.flags(enabled=True, server_listen='127.0.0.1',
                   server_proxyclient_address='127.0.0.1', group='vnc')

    def _remote_console(self, server, protocol, ctype):
        body = {'remote_console': {'protocol': protocol, 'type': ctype}}
        resp = self.api.api_post('/servers/%s/remote-consoles' % server['id'],
                                 body).body['remote_console']
        self.assertEqual(protocol, resp['protocol'])
        query = urllib.parse.parse_qs(urllib.parse.urlparse(resp['url']).query)
        if 'token' not in query:      # noVNC: ...vnc_lite.html?path=?token=
            query = urllib.parse.parse_qs(query['path'][0].lstrip('?'))
        token = query['token'][0]
        auth = objects.ConsoleAuthToken.validate(
            nova_context.get_admin_context(), token)
        self.assertEqual(server['id'], auth.instance_uuid)
        return resp['url'], auth.host, int(auth.port)

    def _serial_roundtrip(self, host, port):
        with socket.create_connection((host, port), timeout=30) as s:
            s.sendall(b'\r')
            _read_until(s, re.escape(PROMPT), 60)
            s.sendall(b'echo $((6*7))\r')
            _read_until(s, rb'(^|\n)42\r?\n', 60)

    def test_serial_and_vnc_consoles(self):
        image = self.direct_boot_image('qcow2')
        server = self._create_server(image_uuid=image['id'],
                                     flavor_id=self.flavor_id,
                                     networks='none')
        self.wait_for_console(server, SHELL)

        url, host, port = self._remote_console(server, 'serial', 'serial')
        self.assertTrue(url.startswith('ws://'), url)
        self.assertEqual('127.0.0.1', host)
        self.assertTrue(10000 <= port < 20000, port)
        self._serial_roundtrip(host, port)
        # the console log is still written while the serial port is on TCP
        self.assertRegex(self.console(server), r'(^|\n)42\r?\n')

        url, vhost, vport = self._remote_console(server, 'vnc', 'novnc')
        self.assertEqual('127.0.0.1', vhost)
        self.assertTrue(5900 <= vport < 6900, vport)
        with socket.create_connection((vhost, vport), timeout=30) as s:
            banner = _read_until(s, rb'RFB \d{3}\.\d{3}\n', 30)
        self.assertRegex(banner, rb'^RFB 003\.00[0-9]\n')

        # the ports are in the spec, so a restarted nova-compute adopting
        # the running VM finds the same consoles
        with open(os.path.join(self.vmdir(server), 'spec.json')) as f:
            consoles = json.load(f)['consoles']
        self.assertEqual((port, vport), (consoles['serial_port'],
                                          consoles['vnc_port']))
        self.compute = self.restart_compute_service(
            self.compute, keep_hypervisor_state=False)
        self.computes['compute'] = self.compute
        _, host2, port2 = self._remote_console(server, 'serial', 'serial')
        self.assertEqual((host, port), (host2, port2))
        self._serial_roundtrip(host2, port2)

        # stop/start: the VM comes back with its serial console on TCP
        server = self._stop_server(server)
        server = self._start_server(server)
        self.wait_for_console(server, SHELL, count=2)
        _, host3, port3 = self._remote_console(server, 'serial', 'serial')
        self._serial_roundtrip(host3, port3)
        self._delete_server(server)

    def test_serial_console_disabled(self):
        self.flags(enabled=False, group='serial_console')
        image = self.direct_boot_image('qcow2')
        server = self._create_server(image_uuid=image['id'],
                                     flavor_id=self.flavor_id,
                                     networks='none')
        body = {'remote_console': {'protocol': 'serial', 'type': 'serial'}}
        exc = self.assertRaises(
            client.OpenStackApiException, self.api.api_post,
            '/servers/%s/remote-consoles' % server['id'], body)
        self.assertEqual(400, exc.response.status_code)
        # COM1 stayed on the unix socket in the instance directory
        self.assertTrue(os.path.exists(
            nova_harness.vm_socket(self.vmdir(server), 'serial')))
        self._delete_server(server)
