"""Server diagnostics through Nova's API on a running QEMU guest: the 2.48+
format (GET /servers/{id}/diagnostics) and the legacy one (2.1)."""
import os

from nova.tests.functional.api import client

import lifecycle_helpers as lh
import nova_harness


class TestDiagnostics(nova_harness.BhyveFunctionalTestBase):

    def setUp(self):
        self.flags(qemu_accel='tcg', group='bhyve')   # see test_pause_suspend
        # Nova's 2.48 response schema lists only in-tree drivers in
        # "driver"; this driver leaves it null (see nova_bhyve/diagnostics)
        # and the API's response check must only warn about that.
        self.flags(response_validation='warn', group='api')
        super().setUp()

    def _diagnostics(self, server, microversion):
        self.api.microversion = microversion
        try:
            return self.api.api_get(
                '/servers/%s/diagnostics' % server['id']).body
        finally:
            self.api.microversion = 'latest'

    def test_diagnostics_of_a_running_guest(self):
        image = lh.ticking_image(self)
        server = self._create_server(image_uuid=image['id'],
                                     flavor_id=self.flavor_id,
                                     networks='none')
        lh.wait_for_tick(self, server, 3)
        pid = self.vm_pid(server)
        diags = self._diagnostics(server, '2.48')
        self.assertEqual('running', diags['state'])
        self.assertIsNone(diags['driver'])
        self.assertEqual('qemu', diags['hypervisor'])
        self.assertEqual('linux', diags['hypervisor_os'])
        self.assertFalse(diags['config_drive'])
        self.assertGreaterEqual(diags['uptime'], 1)
        self.assertEqual(1, diags['num_cpus'])
        cpu = diags['cpu_details'][0]
        self.assertEqual(0, cpu['id'])
        self.assertGreater(cpu['time'], 0)
        self.assertEqual(256, diags['memory_details']['maximum'])
        self.assertGreater(diags['memory_details']['used'], 0)
        self.assertEqual(1, diags['num_disks'])
        disk = diags['disk_details'][0]
        # the guest read its root fs and wrote the boot counter
        self.assertGreater(disk['read_bytes'], 0)
        self.assertGreater(disk['read_requests'], 0)
        self.assertGreater(disk['write_requests'], 0)
        self.assertEqual(0, disk['errors_count'])
        self.assertEqual([], diags['nic_details'])
        self.assertEqual(0, diags['num_nics'])

        # vCPU time grows while the guest runs; the process is the same
        lh.wait_for_tick(self, server, lh.ticks(
            lh.console_log(self, server))[-1] + 2)
        later = self._diagnostics(server, '2.48')
        self.assertGreater(later['cpu_details'][0]['time'], cpu['time'])
        self.assertEqual(pid, self.vm_pid(server))

        legacy = self._diagnostics(server, '2.1')
        self.assertGreater(legacy['cpu0_time'], 0)
        self.assertEqual(256 * 1024, legacy['memory'])
        for key in ('vda_read', 'vda_read_req', 'vda_write',
                    'vda_write_req', 'vda_errors'):
            self.assertIn(key, legacy)
        self.assertGreater(legacy['vda_read'], 0)

        # Nova itself answers diagnostics only for running instances
        self.api.post_server_action(server['id'], {'pause': {}})
        server = self._wait_for_state_change(server, 'PAUSED',
                                             max_retries=120)
        e = self.assertRaises(client.OpenStackApiException,
                              self._diagnostics, server, '2.48')
        self.assertEqual(409, e.response.status_code)
        self._delete_server(server)
        self.assertFalse(os.path.exists(self.vmdir(server)))
