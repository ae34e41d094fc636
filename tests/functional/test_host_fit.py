"""A flavor larger than the host, and a resize that cannot fit: a clean
Nova fault and nothing left on the host.

Placement refuses such a flavor first (the driver reports its inventory
with max_unit = the host's total), so Nova answers NoValidHost and the
driver never sees the request. The driver refuses it again by itself when
the inventory placement used was wrong: the test injects that fault by
inflating the inventory the driver reports (a wrapper on
update_provider_tree; the driver's own check reads the real host).
Everything else is real: Nova's services, placement, the QEMU guest of the
resize test.
"""
import copy
import os
import time

from nova import context as nova_context
import os_resource_classes as orc

from nova_bhyve import host

import nova_harness

COUNT = 'NOVA-BHYVE-BOOT-COUNT %d'
ACPID = 'NOVA-BHYVE-ACPID-STARTED'


class _HostFit(nova_harness.BhyveFunctionalTestBase):

    def setUp(self):
        super().setUp()
        self.host_vcpus = host.vcpus()
        self.host_memory_mb = host.memory_mb()[0]
        self.too_many_vcpus = self._create_flavor(
            memory_mb=256, vcpu=self.host_vcpus + 1, disk=1, ephemeral=0,
            name='nb.cpus')
        self.too_much_memory = self._create_flavor(
            memory_mb=self.host_memory_mb + 1024, vcpu=1, disk=1,
            ephemeral=0, name='nb.mem')
        driver = self.compute.manager.driver
        self.spawned = []
        real_spawn = driver.spawn

        def spawn(context, instance, *args, **kwargs):   # observes only
            self.spawned.append(instance.uuid)
            return real_spawn(context, instance, *args, **kwargs)

        driver.spawn = spawn
        self.addCleanup(delattr, driver, 'spawn')

    def assert_nothing_left(self, server, paths=None):
        self.assertEqual([], nova_harness.leftovers(
            server['id'], paths or [self.instances_path]))

    def create_refused(self, flavor_id, **kwargs):
        return self._create_server(
            image_uuid=self.direct_boot_image('qcow2')['id'],
            flavor_id=flavor_id, networks='none', expected_state='ERROR',
            **kwargs)


class TestFlavorLargerThanHost(_HostFit):

    def test_placement_refuses_it_the_driver_never_sees_it(self):
        for flavor_id in (self.too_many_vcpus, self.too_much_memory):
            # also with the host named in the request (microversion 2.74):
            # it goes through placement all the same
            for kwargs in ({}, {'host': 'compute'}):
                server = self.create_refused(flavor_id, **kwargs)
                self.assertIn('No valid host', server['fault']['message'])
                self.assert_nothing_left(server)
                self._delete_server(server)
        self.assertEqual([], self.spawned)

    def test_driver_refuses_it_when_the_inventory_was_wrong(self):
        driver = self.compute.manager.driver
        real_update = driver.update_provider_tree

        def inflated(provider_tree, nodename, allocations=None):
            # fault injection: the inventory claims 64x the host
            real_update(provider_tree, nodename, allocations=allocations)
            inventory = copy.deepcopy(
                provider_tree.data(nodename).inventory)
            for rc in (orc.VCPU, orc.MEMORY_MB):
                inventory[rc]['total'] *= 64
                inventory[rc]['max_unit'] *= 64
            provider_tree.update_inventory(nodename, inventory)

        driver.update_provider_tree = inflated
        self.addCleanup(delattr, driver, 'update_provider_tree')
        self.compute.manager.update_available_resource(
            nova_context.get_admin_context())
        rp = self._get_provider_uuid_by_host('compute')
        inventory = self._get_provider_inventory(rp)
        self.assertEqual(self.host_vcpus * 64, inventory['VCPU']['total'])

        cases = ((self.too_many_vcpus,
                  'flavor nb.cpus: %d vCPUs, but this host has only %d '
                  'CPUs' % (self.host_vcpus + 1, self.host_vcpus)),
                 (self.too_much_memory,
                  'flavor nb.mem: %d MiB of memory, but this host has only '
                  '%d MiB' % (self.host_memory_mb + 1024,
                              self.host_memory_mb)))
        for flavor_id, fault in cases:
            server = self.create_refused(flavor_id)
            self.assertIn(server['id'], self.spawned)
            # the build is aborted with the driver's reason, not
            # rescheduled ("Exceeded maximum number of retries")
            self.assertIn(fault, server['fault']['message'])
            self.assert_nothing_left(server)
            self._delete_server(server)
        # the allocations went with the deleted servers
        self.assertRequestMatchesUsage(
            {'VCPU': 0, 'MEMORY_MB': 0, 'DISK_GB': 0}, rp)


class TestResizeCannotFit(nova_harness.MultiComputeMixin, _HostFit):
    """A resize to a flavor no host can take: refused, the instance keeps
    running where it was, untouched."""

    # real (asynchronous) casts, as in a deployment: the API answers 202
    # and the failure shows in the instance's actions
    CAST_AS_CALL = False

    def _failed_resizes(self, server, count, timeout=60):
        """The failed conductor events of the server's resize actions, once
        there are ``count``."""
        deadline = time.monotonic() + timeout
        while True:
            failed = []
            for action in self.api.get_instance_actions(server['id']):
                if action['action'] != 'resize':
                    continue
                failed += [e for e in self.api.get_instance_action_details(
                    server['id'], action['request_id'])['events']
                    if e['event'] == 'conductor_migrate_server'
                    and e['result'] == 'Error']
            if len(failed) >= count:
                return failed
            self.assertLess(time.monotonic(), deadline,
                            'no failed resize #%d' % count)
            time.sleep(0.5)

    def test_resize_to_flavor_larger_than_any_host(self):
        self.start_compute_with_own_path('compute2')
        tiny = self.api.get_flavor(self.flavor_id)
        image = self.direct_boot_image('qcow2')
        server = self._create_server(image_uuid=image['id'],
                                     flavor_id=self.flavor_id,
                                     networks='none', host='compute')
        self.wait_for_console(server, COUNT % 1)
        self.wait_for_console(server, ACPID)
        vmdir = self.vmdir(server)
        pid = self.pid_in(vmdir, server)
        self.assertIsNotNone(pid)
        for n, flavor_id in enumerate((self.too_many_vcpus,
                                       self.too_much_memory), 1):
            # 202: the API casts to the conductor, which finds no host
            self.api.post_server_action(
                server['id'], {'resize': {'flavorRef': flavor_id}})
            events = self._failed_resizes(server, n)
            self.assertIn('NoValidHost', events[-1].get('traceback') or '')
            self._wait_for_migration_status(server, ['error'])
            server = self._show_server(server)
            self.assertEqual('ACTIVE', server['status'])
            self.assertEqual('compute', server['OS-EXT-SRV-ATTR:host'])
            self.assertEqual('nb.tiny', server['flavor']['original_name'])
            # the one VM process is the one that ran before
            self.assertEqual(pid, self.pid_in(vmdir, server))
            self.assertEqual([pid], nova_harness.vm_processes(server['id']))
            self.assertEqual([], nova_harness.leftovers(
                server['id'], [self.compute_path('compute2')],
                processes=False))
            self.assertFalse(os.path.exists(vmdir + '_resize'))
        self.assertFlavorMatchesUsage(
            self._get_provider_uuid_by_host('compute'), tiny)
        # the guest never rebooted
        self.assertNotIn(COUNT % 2, self.console(server))
        self._delete_server(server)
        self.assertEqual([], nova_harness.leftovers(
            server['id'], [self.compute_path('compute'),
                           self.compute_path('compute2')]))
