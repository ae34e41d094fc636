"""The basic instance lifecycle through Nova, on real QEMU guests.

Every check looks at the real thing: the guest's serial console as Nova's API
returns it, the VM process on the host, the files in the instances path and
the allocations in the real placement service.
"""
import os
import signal
import time

from nova.tests.functional import integrated_helpers  # noqa: F401

import nova_harness

INIT = 'NOVA-BHYVE-GUEST-INIT'
ROOT = 'NOVA-BHYVE-ROOT-MOUNTED'
ACPID = 'NOVA-BHYVE-ACPID-STARTED'
POWERDOWN = 'NOVA-BHYVE-POWERDOWN'


class TestLifecycle(nova_harness.BhyveFunctionalTestBase):

    ratios = {'VCPU': 4.0}
    reserved_mb = 321

    def setUp(self):
        self.flags(cpu_allocation_ratio=self.ratios['VCPU'],
                   reserved_host_memory_mb=self.reserved_mb,
                   reserved_host_disk_mb=2048)
        super().setUp()

    def test_boot_reboot_stop_start_restart_delete(self):
        image = self.direct_boot_image('qcow2')
        server = self._create_server(image_uuid=image['id'],
                                     flavor_id=self.flavor_id,
                                     networks='none')
        self.assertEqual('ACTIVE', server['status'])
        self.assertEqual('compute', server['OS-EXT-SRV-ATTR:host'])
        out = self.wait_for_console(server, ROOT)
        self.assertIn(INIT, out)
        pid = self.vm_pid(server)
        self.assertIsNotNone(pid)

        # placement holds the flavor's resources against this compute
        allocs = self._get_allocations_by_server_uuid(server['id'])
        rp = self._get_provider_uuid_by_host('compute')
        self.assertEqual({'VCPU': 1, 'MEMORY_MB': 256, 'DISK_GB': 1},
                         allocs[rp]['resources'])

        # inventory: this host's CPUs, memory and disk, with Nova's
        # allocation ratios and reserved values
        inv = self._get_provider_inventory(rp)
        self.assertEqual(os.cpu_count(), inv['VCPU']['total'])
        self.assertEqual(self.ratios['VCPU'], inv['VCPU']['allocation_ratio'])
        self.assertEqual(self.reserved_mb, inv['MEMORY_MB']['reserved'])
        with open('/proc/meminfo') as f:
            mem_kib = int(f.readline().split()[1])
        self.assertEqual(mem_kib // 1024, inv['MEMORY_MB']['total'])
        st = os.statvfs(self.instances_path)
        self.assertEqual(st.f_blocks * st.f_frsize // 1024 ** 3,
                         inv['DISK_GB']['total'])
        self.assertEqual(2, inv['DISK_GB']['reserved'])  # 2048 MiB

        # root disk: a qcow2 overlay on the cached image, flavor-sized
        disk = os.path.join(self.vmdir(server), 'disk')
        import nova_bhyve.storage.vdsk as vdsk
        info = vdsk.info(disk)
        self.assertEqual('qcow2', info['format'])
        self.assertEqual(1024 ** 3, info['virtual_size'])
        self.assertIn('_base', info['backing_file'])

        # SOFT reboot: the guest sees the ACPI power button, powers off and
        # boots again (a new init marker after the power-down marker)
        self.wait_for_console(server, ACPID)
        self._reboot_server(server, hard=False)
        out = self.wait_for_console(server, ROOT, count=2)
        self.assertIn(POWERDOWN, out.split(INIT)[1])

        # HARD reboot: no guest co-operation, a third boot
        self._reboot_server(server, hard=True)
        self.wait_for_console(server, ROOT, count=3)
        self.assertIsNotNone(self.vm_pid(server))

        # stop -> SHUTOFF, no process; start -> a fourth boot
        self.wait_for_console(server, ACPID, count=3)
        server = self._stop_server(server)
        self.assertEqual(4, server['OS-EXT-STS:power_state'])  # SHUTDOWN
        self.assertIsNone(self.vm_pid(server))
        self.assertTrue(os.path.exists(disk))
        server = self._start_server(server)
        self.wait_for_console(server, ROOT, count=4)

        # nova-compute restarts with a fresh driver: the VM is adopted, not
        # rebooted (same process, no new boot, still ACTIVE/RUNNING)
        pid = self.vm_pid(server)
        self.compute = self.restart_compute_service(
            self.compute, keep_hypervisor_state=False)
        self.computes['compute'] = self.compute
        self.assertEqual(pid, self.vm_pid(server))
        server = self._show_server(server)
        self.assertEqual('ACTIVE', server['status'])
        self.assertEqual(1, server['OS-EXT-STS:power_state'])  # RUNNING
        self.assertEqual(4, self.console(server).count(INIT))
        self.assertEqual([server['id']],
                         self.compute.manager.driver.list_instance_uuids())

        # delete: process gone, instance directory gone, allocation gone
        self._delete_server(server)
        self.assertFalse(os.path.exists(self.vmdir(server)))
        self.assertIsNone(pid_alive(pid))
        self.assertEqual({}, self._get_allocations_by_server_uuid(
            server['id']))


class TestPowerStateEvents(nova_harness.BhyveFunctionalTestBase):

    def test_vm_killed_from_outside_becomes_shutoff_at_once(self):
        # the periodic power state sync must not be what notices it
        self.flags(sync_power_state_interval=-1)
        image = self.direct_boot_image('qcow2')
        server = self._create_server(image_uuid=image['id'],
                                     flavor_id=self.flavor_id,
                                     networks='none')
        self.wait_for_console(server, ROOT)
        pid = self.vm_pid(server)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)      # fault injection: QEMU dies
        server = self._wait_for_state_change(server, 'SHUTOFF',
                                             max_retries=40)
        elapsed = time.monotonic() - killed
        self.assertLess(elapsed, 20)
        self.assertEqual(4, server['OS-EXT-STS:power_state'])
        # the disk is intact: the instance starts again and boots
        self.assertTrue(os.path.exists(os.path.join(self.vmdir(server),
                                                    'disk')))
        self._start_server(server)
        self.wait_for_console(server, ROOT, count=2)
        self._delete_server(server)


def pid_alive(pid):
    """``pid`` if that process exists and is not a zombie, else None.
    (The VM was re-parented to init, which reaps it a moment later.)"""
    try:
        with open('/proc/%d/stat' % pid) as f:
            state = f.read().rsplit(')', 1)[1].split()[0]
    except OSError:
        return None
    return None if state == 'Z' else pid
