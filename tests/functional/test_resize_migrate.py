"""Resize and cold migration between two computes, through Nova, on real
QEMU guests.

Two nova-compute services run in this process, 'compute' and 'compute2',
each with its own instances path (its own disks and image cache), on this
one machine: the disks move by the driver's local copy. The remote (ssh)
copy path cannot be exercised here.

The test guest counts its boots on its root disk (NOVA-BHYVE-BOOT-COUNT),
so a boot on the destination that continues the count shows the disk really
moved, and a count that does not include the destination's boot after a
revert shows the source's original disk came back.
"""
import errno
import os
import signal
from unittest import mock

from nova.tests.functional.api import client

from nova_bhyve.migration import cold as cold_migration
from nova_bhyve.storage import vdsk

import nova_harness

ROOT = 'NOVA-BHYVE-ROOT-MOUNTED'
ACPID = 'NOVA-BHYVE-ACPID-STARTED'
SHELL = 'NOVA-BHYVE-SHELL-READY'
COUNT = 'NOVA-BHYVE-BOOT-COUNT %d'
GiB = 1024 ** 3


class _TwoComputes(nova_harness.MultiComputeMixin,
                   nova_harness.BhyveFunctionalTestBase):

    def setUp(self):
        super().setUp()
        self.compute2 = self.start_compute_with_own_path('compute2')
        self.big_id = self._create_flavor(memory_mb=256, vcpu=1, disk=2,
                                          ephemeral=0, name='nb.big')
        self.tiny = self.api.get_flavor(self.flavor_id)
        self.big = self.api.get_flavor(self.big_id)
        self.rp = {h: self._get_provider_uuid_by_host(h)
                   for h in ('compute', 'compute2')}

    def boot(self, flavor_id=None, host='compute'):
        image = self.direct_boot_image('qcow2')
        server = self._create_server(image_uuid=image['id'],
                                     flavor_id=flavor_id or self.flavor_id,
                                     networks='none', host=host)
        self.assertEqual(host, server['OS-EXT-SRV-ATTR:host'])
        self.wait_for_console(server, COUNT % 1)
        self.wait_for_console(server, ACPID)
        return server

    def patch(self, obj, name, value):
        patcher = mock.patch.object(obj, name, value)
        patcher.start()
        self.addCleanup(patcher.stop)

    def assert_nothing_left(self, server):
        """After the server's delete: nothing on either compute."""
        self.assertEqual([], nova_harness.leftovers(
            server['id'], [self.compute_path('compute'),
                           self.compute_path('compute2')]))

    def assert_nothing_on(self, host, server):
        for suffix in ('', cold_migration.RESIZE_SUFFIX):
            self.assertFalse(os.path.exists(
                self.host_vmdir(host, server, suffix)),
                '%s still has %s%s' % (host, server['id'], suffix))
        self.assertNotIn(server['id'], self.computes[host].manager.driver
                         .list_instance_uuids())
        # nor a partial copy, cache download or held lock (the instance
        # may run on the other compute: no process check here)
        self.assertEqual([], nova_harness.leftovers(
            server['id'], [self.compute_path(host)], processes=False))


class TestResizeMigrate(_TwoComputes):

    def test_resize_to_other_host_then_confirm(self):
        server = self.boot()
        src = self.host_vmdir('compute', server)
        src_pid = self.pid_in(src, server)
        self.assertIsNotNone(src_pid)

        self._resize_and_check_allocations(server, self.tiny, self.big,
                                           self.rp['compute'],
                                           self.rp['compute2'])
        server = self._show_server(server)
        self.assertEqual('VERIFY_RESIZE', server['status'])
        self.assertEqual('compute2', server['OS-EXT-SRV-ATTR:host'])
        self.assertEqual('nb.big', server['flavor']['original_name'])

        # the guest boots on the destination from the moved disk
        dst = self.host_vmdir('compute2', server)
        self.wait_for_console(server, COUNT % 2)
        self.assertIsNotNone(self.pid_in(dst, server))
        self.assertIsNone(nova_harness_pid_alive(src_pid))
        # the disk: grown to the new flavor, backed by compute2's cache
        info = vdsk.info(os.path.join(dst, 'disk'))
        self.assertEqual(2 * GiB, info['virtual_size'])
        self.assertTrue(info['backing_file'].startswith(
            self.compute_path('compute2') + '/_base/'))
        # and the guest sees 2 GiB (sectors of 512 bytes)
        self.wait_for_console(server, SHELL)
        nova_harness.guest_shell(
            dst, 'echo VDA-SECTORS=$(cat /sys/block/vda/size)')
        self.wait_for_console(server, 'VDA-SECTORS=%d' % (2 * GiB // 512))
        # the source keeps its copy, renamed, until confirm
        self.assertFalse(os.path.exists(src))
        kept = self.host_vmdir('compute', server,
                               cold_migration.RESIZE_SUFFIX)
        self.assertTrue(os.path.exists(os.path.join(kept, 'disk')))

        server = self._confirm_resize(server)
        self.assert_nothing_on('compute', server)
        self.assertFlavorMatchesUsage(self.rp['compute2'], self.big)
        self.assertRequestMatchesUsage(
            {'VCPU': 0, 'MEMORY_MB': 0, 'DISK_GB': 0}, self.rp['compute'])
        self.assertEqual('ACTIVE', server['status'])
        self.assertIsNotNone(self.pid_in(dst, server))
        self._delete_server(server)
        self.assert_nothing_on('compute2', server)

    def test_resize_revert_restores_the_original_disk(self):
        server = self.boot()
        src = self.host_vmdir('compute', server)
        spec = nova_harness.spec_digest(src)

        # the disk the source VM is started with, read at the moment of
        # the start (the guest writes to it as soon as it boots)
        started_with = []
        hv = self.compute.manager.driver.hypervisor
        real_start = hv.start

        def start(spec, vmdir):
            started_with.append(nova_harness.sha256_file(spec.disks[0].path))
            return real_start(spec, vmdir)

        self.patch(hv, 'start', start)

        self._resize_and_check_allocations(server, self.tiny, self.big,
                                           self.rp['compute'],
                                           self.rp['compute2'])
        self.wait_for_console(server, COUNT % 2)        # on compute2
        kept = self.host_vmdir('compute', server,
                               cold_migration.RESIZE_SUFFIX)
        kept_sha = nova_harness.sha256_file(os.path.join(kept, 'disk'))
        self.assertEqual(1 * GiB,
                         vdsk.info(os.path.join(kept, 'disk'))['virtual_size'])

        server = self._revert_resize(server)
        self.assertEqual('compute', server['OS-EXT-SRV-ATTR:host'])
        self.assertEqual('nb.tiny', server['flavor']['original_name'])
        self.assertEqual([kept_sha], started_with)
        self.assertEqual(spec, nova_harness.spec_digest(src))
        self.assertEqual(1 * GiB,
                         vdsk.info(os.path.join(src, 'disk'))['virtual_size'])
        # the source disk's second boot: compute2's boot is not on it
        out = self.wait_for_console(server, COUNT % 2)
        self.assertNotIn(COUNT % 3, out)
        self.assertIsNotNone(self.pid_in(src, server))
        self.assert_nothing_on('compute2', server)
        self.assertFalse(os.path.exists(kept))
        self.assertFlavorMatchesUsage(self.rp['compute'], self.tiny)
        self.assertRequestMatchesUsage(
            {'VCPU': 0, 'MEMORY_MB': 0, 'DISK_GB': 0}, self.rp['compute2'])
        self._delete_server(server)
        self.assert_nothing_on('compute', server)

    def test_cold_migrate_vm_dies_during_power_off(self):
        server = self.boot()
        src = self.host_vmdir('compute', server)
        pid = self.pid_in(src, server)
        hv = self.compute.manager.driver.hypervisor

        def die(vmdir):       # fault: the VM process dies instead
            os.kill(pid, signal.SIGKILL)

        self.patch(hv, 'request_shutdown', die)
        self._migrate_and_check_allocations(server, self.tiny,
                                            self.rp['compute'],
                                            self.rp['compute2'])
        self.wait_for_console(server, COUNT % 2)
        self.assertEqual(1 * GiB, vdsk.info(os.path.join(
            self.host_vmdir('compute2', server), 'disk'))['virtual_size'])
        server = self._confirm_resize(server)
        self.assert_nothing_on('compute', server)
        self._delete_server(server)
        self.assert_nothing_left(server)


class TestResizeFaults(_TwoComputes):
    # Real (asynchronous) casts: with casts run as calls, the compute's
    # InstanceFaultRollback would also reach the conductor, which then
    # sets the instance to ERROR - what a real deployment never sees.
    CAST_AS_CALL = False

    def _wait_for_failed_migration(self, server):
        self._wait_for_migration_status(server, ['error'])
        server = self._wait_for_state_change(server, 'ACTIVE')
        return server

    def test_copy_fails_instance_back_on_source(self):
        server = self.boot()
        src = self.host_vmdir('compute', server)

        def no_space(self_, src_path, dst_path):
            with open(dst_path, 'wb') as f:      # a partial copy
                f.write(b'x' * 65536)
            raise OSError(errno.ENOSPC, 'No space left on device', dst_path)

        with mock.patch.object(cold_migration.LocalCopier, 'copy',
                               no_space):
            try:
                self.api.post_server_action(
                    server['id'], {'resize': {'flavorRef': self.big_id}})
            except client.OpenStackApiException as e:
                # in-process RPC casts are calls: the compute's error
                # reaches the API (a real API has returned 202 already)
                self.assertIn('ResizeError', str(e))
            server = self._wait_for_failed_migration(server)
        self.assertEqual('compute', server['OS-EXT-SRV-ATTR:host'])
        self.assertEqual('nb.tiny', server['flavor']['original_name'])
        # the instance runs again on the source, from its own disk
        self.wait_for_console(server, COUNT % 2)
        self.assertIsNotNone(self.pid_in(src, server))
        self.assert_nothing_on('compute2', server)
        self.assertFalse(os.path.exists(
            self.host_vmdir('compute', server, cold_migration.RESIZE_SUFFIX)))
        self.assertFlavorMatchesUsage(self.rp['compute'], self.tiny)
        self.assertRequestMatchesUsage(
            {'VCPU': 0, 'MEMORY_MB': 0, 'DISK_GB': 0}, self.rp['compute2'])
        self._delete_server(server)
        self.assert_nothing_left(server)

    def test_resize_to_smaller_disk_refused(self):
        # Nova's API refuses it (the instance's image_min_disk is its
        # flavor's root_gb); the driver would refuse it too before
        # stopping anything (unit-tested: migrate_disk_and_power_off)
        server = self.boot(flavor_id=self.big_id)
        pid = self.pid_in(self.host_vmdir('compute', server), server)
        ex = self.assertRaises(
            client.OpenStackApiException, self.api.post_server_action,
            server['id'], {'resize': {'flavorRef': self.flavor_id}})
        self.assertEqual(400, ex.response.status_code)
        self.assertIn("disk is smaller", str(ex))
        server = self._show_server(server)
        self.assertEqual('ACTIVE', server['status'])
        self.assertEqual('compute', server['OS-EXT-SRV-ATTR:host'])
        self.assertEqual('nb.big', server['flavor']['original_name'])
        self.assertEqual(pid, self.pid_in(
            self.host_vmdir('compute', server), server))
        self.assert_nothing_on('compute2', server)
        self.assertFlavorMatchesUsage(self.rp['compute'], self.big)
        self._delete_server(server)
        self.assert_nothing_left(server)


class TestResizeSameHost(nova_harness.MultiComputeMixin,
                         nova_harness.BhyveFunctionalTestBase):
    """One compute: resize and migrate to the same host
    (supports_migrate_to_same_host)."""

    def test_resize_same_host_confirm_and_revert(self):
        self.flags(allow_resize_to_same_host=True)
        big_id = self._create_flavor(memory_mb=256, vcpu=1, disk=2,
                                     ephemeral=0, name='nb.big')
        tiny = self.api.get_flavor(self.flavor_id)
        big = self.api.get_flavor(big_id)
        rp = self._get_provider_uuid_by_host('compute')
        image = self.direct_boot_image('qcow2')
        server = self._create_server(image_uuid=image['id'],
                                     flavor_id=self.flavor_id,
                                     networks='none')
        self.wait_for_console(server, COUNT % 1)
        self.wait_for_console(server, ACPID)
        src = self.host_vmdir('compute', server)
        kept = src + cold_migration.RESIZE_SUFFIX

        self._resize_to_same_host_and_check_allocations(server, tiny, big,
                                                        rp)
        # a new console log comes with the new directory (only the disks
        # are copied): the disk's second boot
        self.wait_for_console(server, COUNT % 2)
        self.assertEqual(2 * GiB, vdsk.info(os.path.join(src, 'disk'))[
            'virtual_size'])
        self.assertTrue(os.path.isdir(kept))
        self.assertEqual([server['id']],
                         self.compute.manager.driver.list_instance_uuids())
        kept_sha = nova_harness.sha256_file(os.path.join(kept, 'disk'))
        self.wait_for_console(server, ACPID)
        hv = self.compute.manager.driver.hypervisor
        real_start = hv.start
        started_with = []

        def start(spec, vmdir):
            started_with.append(nova_harness.sha256_file(spec.disks[0].path))
            return real_start(spec, vmdir)

        with mock.patch.object(hv, 'start', start):
            server = self._revert_resize(server)
        self.assertEqual([kept_sha], started_with)
        self.assertEqual(1 * GiB, vdsk.info(os.path.join(src, 'disk'))[
            'virtual_size'])
        self.assertFalse(os.path.exists(kept))
        # the original directory and console log are back: the original
        # disk's second boot, not a third
        out = self.wait_for_console(server, COUNT % 2)
        self.assertNotIn(COUNT % 3, out)
        self.assertFlavorMatchesUsage(rp, tiny)

        # again, and confirm this time
        self.wait_for_console(server, ACPID, count=2)
        self._resize_server(server, big_id)
        self.wait_for_console(server, COUNT % 3)
        server = self._confirm_resize(server)
        self.assertFalse(os.path.exists(kept))
        self.assertEqual(2 * GiB, vdsk.info(os.path.join(src, 'disk'))[
            'virtual_size'])
        self.assertFlavorMatchesUsage(rp, big)
        self._delete_server(server)
        self.assertFalse(os.path.exists(src))


def nova_harness_pid_alive(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            state = f.read().rsplit(')', 1)[1].split()[0]
    except OSError:
        return None
    return None if state == 'Z' else pid
