"""Rebuild, evacuate and resume-on-host-boot through Nova, on real QEMU
guests.

* rebuild: the driver has no rebuild of its own; Nova's default (destroy,
  then spawn from the new image) runs unchanged and the guest boots from the
  new image;
* evacuate: the source compute is stopped and forced down, the instance is
  rebuilt on the other compute from its image (storage is not shared); when
  the source compute comes back, Nova destroys the leftover there;
* resume_guests_state_on_host_boot: a VM that is gone when nova-compute
  starts (host reboot) is started again.
"""
import json
import os
import signal
import time

import nova_harness

ROOT = 'NOVA-BHYVE-ROOT-MOUNTED'
ACPID = 'NOVA-BHYVE-ACPID-STARTED'
COUNT = 'NOVA-BHYVE-BOOT-COUNT %d'


class TestRebuild(nova_harness.MultiComputeMixin,
                  nova_harness.BhyveFunctionalTestBase):

    def test_rebuild_boots_the_new_image(self):
        image = self.direct_boot_image('qcow2')
        server = self._create_server(image_uuid=image['id'],
                                     flavor_id=self.flavor_id,
                                     networks='none')
        self.wait_for_console(server, COUNT % 1)
        self.wait_for_console(server, ACPID)
        old_pid = self.vm_pid(server)

        new = self.whole_disk_image('qcow2')       # firmware boot
        server = self._rebuild_server(server, new['id'])
        self.assertEqual(new['id'], server['image']['id'])
        # a new VM on a new disk from the new image: the root partition of
        # the whole disk, the counter of a fresh disk
        out = self.wait_for_console(server, ROOT)
        self.assertIn('dev=/dev/vda2', out)
        self.wait_for_console(server, COUNT % 1)
        self.assertNotEqual(old_pid, self.vm_pid(server))
        with open(os.path.join(self.vmdir(server), 'spec.json')) as f:
            spec = json.load(f)
        self.assertIsNone(spec['boot']['kernel'])
        self._delete_server(server)


class TestEvacuate(nova_harness.MultiComputeMixin,
                   nova_harness.BhyveFunctionalTestBase):

    def setUp(self):
        super().setUp()
        self.start_compute_with_own_path('compute2')

    def test_evacuate_then_source_comes_back(self):
        flavor = self.api.get_flavor(self.flavor_id)
        image = self.direct_boot_image('qcow2')
        server = self._create_server(image_uuid=image['id'],
                                     flavor_id=self.flavor_id,
                                     networks='none', host='compute')
        self.wait_for_console(server, COUNT % 1)
        src = self.host_vmdir('compute', server)
        src_pid = self.pid_in(src, server)
        self.assertIsNotNone(src_pid)
        src_rp = self._get_provider_uuid_by_host('compute')
        dst_rp = self._get_provider_uuid_by_host('compute2')

        # the source host "fails": its nova-compute stops and is forced
        # down (its VM process keeps running, as on a partitioned host)
        self.computes['compute'].stop()
        service_id = self.api.get_services(
            host='compute', binary='nova-compute')[0]['id']
        self.api.put_service_force_down(service_id, True)

        # since microversion 2.95 an evacuated instance is left SHUTOFF
        server = self._evacuate_server(server, expected_host='compute2',
                                       expected_state='SHUTOFF')
        dst = self.host_vmdir('compute2', server)
        self.assertTrue(os.path.exists(os.path.join(dst, 'disk')))
        server = self._start_server(server)
        # rebuilt from the image on compute2: a fresh disk, first boot
        self.wait_for_console(server, COUNT % 1)
        self.assertIsNotNone(self.pid_in(dst, server))
        self._check_allocation_during_evacuate(flavor, server['id'],
                                               src_rp, dst_rp)

        # the source comes back: Nova destroys the evacuated instance there
        self.restart_compute_with_own_path('compute')
        self.api.put_service_force_down(service_id, False)
        self.assertFalse(os.path.exists(src))
        self.assertIsNone(self.pid_in(src, server))
        self.assertEqual([], self.computes['compute'].manager.driver
                         .list_instance_uuids())
        self.assertFlavorMatchesUsage(dst_rp, flavor)
        self.assertRequestMatchesUsage(
            {'VCPU': 0, 'MEMORY_MB': 0, 'DISK_GB': 0}, src_rp)
        # the instance runs on, untouched, on compute2
        self.assertIsNotNone(self.pid_in(dst, server))
        self._delete_server(server)
        self.assertFalse(os.path.exists(dst))


class TestResumeOnHostBoot(nova_harness.MultiComputeMixin,
                           nova_harness.BhyveFunctionalTestBase):

    def test_vm_gone_at_compute_start_is_started_again(self):
        self.flags(resume_guests_state_on_host_boot=True)
        image = self.direct_boot_image('qcow2')
        server = self._create_server(image_uuid=image['id'],
                                     flavor_id=self.flavor_id,
                                     networks='none')
        self.wait_for_console(server, COUNT % 1)
        pid = self.vm_pid(server)

        # "host reboot": nova-compute stops, then the VM process dies
        self.compute.stop()
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if self.vm_pid(server) is None:
                break
            time.sleep(0.1)
        self.assertIsNone(self.vm_pid(server))

        self.restart_compute_with_own_path('compute')
        self.wait_for_console(server, COUNT % 2)
        new_pid = self.vm_pid(server)
        self.assertIsNotNone(new_pid)
        self.assertNotEqual(pid, new_pid)
        server = self._show_server(server)
        self.assertEqual('ACTIVE', server['status'])
        self.assertEqual(1, server['OS-EXT-STS:power_state'])
        self._delete_server(server)
