"""pause/unpause and suspend/resume through Nova on real QEMU guests.

The guest prints ``tick N`` once a second on its serial console: paused or
suspended, the ticks stop; afterwards they continue from where they were
(a restart would print ``tick 0`` and a new init marker).
"""
import os
import threading
import time

from nova.compute import power_state
from nova.tests.functional.api import client
from nova.virt import event as virtevent

from nova_bhyve.hypervisor.qemu import state as qemu_state

import lifecycle_helpers as lh
import nova_harness

RETRIES = 240     # x 0.5 s


class TestPauseSuspend(nova_harness.BhyveFunctionalTestBase):

    def setUp(self):
        # TCG without the KVM calibration run: that run is not what these
        # tests are about, and under load its timeout path is flaky
        self.flags(qemu_accel='tcg', group='bhyve')
        super().setUp()

    def _boot(self):
        image = lh.ticking_image(self)
        server = self._create_server(image_uuid=image['id'],
                                     flavor_id=self.flavor_id,
                                     networks='none')
        lh.wait_for_tick(self, server, 3)
        return server

    def _pause_server(self, server):
        self.api.post_server_action(server['id'], {'pause': {}})
        return self._wait_for_state_change(server, 'PAUSED',
                                           max_retries=RETRIES)

    def _unpause_server(self, server):
        self.api.post_server_action(server['id'], {'unpause': {}})
        return self._wait_for_state_change(server, 'ACTIVE',
                                           max_retries=RETRIES)

    def _state_file(self, server):
        return os.path.join(self.vmdir(server), 'suspended.state')

    def _assert_no_ticks_for(self, server, seconds):
        last = lh.ticks(lh.console_log(self, server))[-1]
        time.sleep(seconds)
        self.assertEqual(last, lh.ticks(lh.console_log(self, server))[-1])
        return last

    def _assert_continues(self, server, last):
        t = lh.wait_for_tick(self, server, last + 2)
        after = t[t.index(last) + 1:]
        self.assertEqual(last + 1, after[0], 'ticks after: %s' % after[:5])
        self.assertNotIn(0, after)
        self.assertEqual(1, lh.console_log(self, server).count(lh.INIT))

    def test_pause_unpause_suspend_resume(self):
        server = self._boot()
        events = lh.EventRecorder(self.compute.manager.driver)
        pid = self.vm_pid(server)

        # pause: vCPUs stop, the ticks stop, the process stays
        server = self._pause_server(server)
        self.assertEqual(power_state.PAUSED,
                         server['OS-EXT-STS:power_state'])
        events.wait_for(virtevent.EVENT_LIFECYCLE_PAUSED)
        last = self._assert_no_ticks_for(server, 4)
        self.assertEqual(pid, self.vm_pid(server))

        server = self._unpause_server(server)
        self.assertEqual(power_state.RUNNING,
                         server['OS-EXT-STS:power_state'])
        events.wait_for(virtevent.EVENT_LIFECYCLE_RESUMED)
        self._assert_continues(server, last)

        # suspend: state in a file, no process, SUSPENDED
        server = self._suspend_server(server)
        self.assertEqual(power_state.SUSPENDED,
                         server['OS-EXT-STS:power_state'])
        self.assertIsNone(self.vm_pid(server))
        self.assertTrue(os.path.getsize(self._state_file(server)) > 1 << 20)
        events.wait_for(virtevent.EVENT_LIFECYCLE_SUSPENDED)
        last = self._assert_no_ticks_for(server, 3)
        drv = self.compute.manager.driver
        inst = self._get_instance(server)
        self.assertEqual(power_state.SUSPENDED, drv.get_info(inst).state)

        # nova-compute restarts while the instance is suspended: it stays so
        self.compute = self.restart_compute_service(
            self.compute, keep_hypervisor_state=False)
        self.computes['compute'] = self.compute
        server = self._show_server(server)
        self.assertEqual('SUSPENDED', server['status'])
        self.assertIsNone(self.vm_pid(server))

        # resume: the same guest continues; the state file is gone
        server = self._resume_server(server)
        self.assertEqual(power_state.RUNNING,
                         server['OS-EXT-STS:power_state'])
        self.assertIsNotNone(self.vm_pid(server))
        self.assertFalse(os.path.exists(self._state_file(server)))
        self._assert_continues(server, last)
        self._delete_server(server)

    def _get_instance(self, server):
        from nova import context as nova_context
        from nova import objects
        return objects.Instance.get_by_uuid(
            nova_context.get_admin_context(), server['id'])

    def _fail_resume(self, server, fault_text):
        try:
            self.api.post_server_action(server['id'], {'resume': {}})
        except client.OpenStackApiException as e:   # see below
            self.assertIn('InstanceResumeFailure', str(e))
        server = self._wait_for_state_change(server, 'ERROR',
                                             max_retries=RETRIES)
        self.assertIn('Failed to resume instance', server['fault']['message'])
        self.assertIn(fault_text, server['fault']['message'])
        self.assertIsNone(self.vm_pid(server))
        return server

    def _recover(self, server, boots):
        """Hard reboot boots the disk fresh and discards any state."""
        server = self._reboot_server(server, hard=True)
        self.wait_for_console(server, lh.INIT, count=boots)
        self.assertFalse(os.path.exists(self._state_file(server)))
        return server

    def test_resume_with_missing_or_corrupt_state_file(self):
        server = self._boot()
        # missing: removed behind Nova's back
        server = self._suspend_server(server)
        os.unlink(self._state_file(server))
        server = self._fail_resume(server, 'does not exist')
        server = self._recover(server, boots=2)
        lh.wait_for_tick(self, server, 2)

        # corrupt: a right header, then garbage where the RAM pages were
        server = self._suspend_server(server)
        path = self._state_file(server)
        with open(path, 'r+b') as f:
            f.seek(4096)
            f.write(os.urandom(1 << 20))
            f.truncate(3 << 20)
        server = self._fail_resume(server, 'corrupt or incompatible')
        self.assertTrue(os.path.exists(path))      # kept until recovery
        server = self._recover(server, boots=3)
        lh.wait_for_tick(self, server, 2)
        self._delete_server(server)
        self.assertEqual([], nova_harness.leftovers(server['id'],
                                                    [self.instances_path]))

    def test_vm_dies_while_its_state_is_saved(self):
        server = self._boot()
        # Fault injection: a 1 MiB/s migration cap makes the save take
        # long enough to SIGKILL QEMU while it writes the state file.
        self.stub_out('nova_bhyve.hypervisor.qemu.state.SAVE_BANDWIDTH',
                      1 << 20)
        pid = self.vm_pid(server)
        partial = qemu_state.partial_path(self._state_file(server))
        killed = threading.Event()

        def killer():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if os.path.exists(partial) and os.path.getsize(partial):
                    os.kill(pid, 9)
                    killed.set()
                    return
                time.sleep(0.05)
        t = threading.Thread(target=killer, daemon=True)
        t.start()
        try:
            self.api.post_server_action(server['id'], {'suspend': {}})
        except client.OpenStackApiException as e:
            # the harness runs this RPC cast synchronously: the compute
            # error reaches the API call
            self.assertIn('InstanceSuspendFailure', str(e))
        server = self._wait_for_state_change(server, 'ERROR',
                                             max_retries=RETRIES)
        t.join()
        self.assertTrue(killed.is_set())
        self.assertIn('Failed to suspend instance',
                      server['fault']['message'])
        self.assertIn('QEMU exited', server['fault']['message'])
        self.assertFalse(os.path.exists(partial))
        self.assertFalse(os.path.exists(self._state_file(server)))
        self.assertEqual(power_state.SHUTDOWN,
                         self.compute.manager.driver.get_info(
                             self._get_instance(server)).state)
        server = self._recover(server, boots=2)
        self._delete_server(server)
        self.assertEqual([], nova_harness.leftovers(server['id'],
                                                    [self.instances_path]))
