"""Warm migration ([bhyve] warm_migration = True) through Nova on real QEMU
guests: cold migrate and resize suspend the guest on the source and resume
it on the destination, so it does not reboot.

Two nova-compute services run in this process, each with its own instances
path (see test_resize_migrate.py). The guest prints ``tick N`` once a second
and its boot id at init (NOVA-BHYVE-GUEST-INIT boot_id=...): a guest that
was not rebooted has the same boot id (read again from its shell), printed
its init marker once, and its ticks go on from where they stopped. The
console log moves with the guest in a warm migration, so it is checked
whole on the destination.

The only fault injected (test_restore_failure_boots_and_revert_resumes) is
a state file damaged on the destination right before the real restore.
"""
import os
import re
import time
from unittest import mock

from nova_bhyve.migration import cold as cold_migration
from nova_bhyve.migration import warm as warm_migration
from nova_bhyve.storage import vdsk

import lifecycle_helpers as lh
import nova_harness

GiB = 1024 ** 3
BOOT_ID = re.compile(r'NOVA-BHYVE-GUEST-INIT boot_id=([0-9a-f-]{36})')
COUNT = 'NOVA-BHYVE-BOOT-COUNT %d'
STATE = 'suspended.state'


class TestWarmMigration(nova_harness.MultiComputeMixin,
                        nova_harness.BhyveFunctionalTestBase):

    def setUp(self):
        super().setUp()
        self.flags(warm_migration=True, group='bhyve')
        self.compute2 = self.start_compute_with_own_path('compute2')
        self.bigdisk_id = self._create_flavor(memory_mb=256, vcpu=1, disk=2,
                                              ephemeral=0, name='nb.disk2')
        self.moreram_id = self._create_flavor(memory_mb=320, vcpu=1, disk=1,
                                              ephemeral=0, name='nb.ram320')

    # -- the guest seen from the host -------------------------------------

    def log_of(self, vmdir):
        with open(os.path.join(vmdir, 'console.log'),
                  errors='replace') as f:
            return f.read()

    def wait_log(self, vmdir, predicate, what,
                 timeout=nova_harness.BOOT_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            try:
                out = self.log_of(vmdir)
            except FileNotFoundError:
                out = ''
            if predicate(out):
                return out
            if time.monotonic() > deadline:
                self.fail('no %s on %s within %ds; console tail:\n%s' % (
                    what, vmdir, timeout, out[-2000:]))
            time.sleep(0.3)

    def wait_tick(self, vmdir, at_least):
        return self.wait_log(
            vmdir, lambda out: (lh.ticks(out) or [-1])[-1] >= at_least,
            'tick >= %d' % at_least)

    def shell(self, vmdir, command, expect):
        before = self.log_of(vmdir).count(expect)
        nova_harness.guest_shell(vmdir, command)
        return self.wait_log(vmdir, lambda out: out.count(expect) > before,
                             repr(expect), timeout=120)

    def boot(self):
        image = lh.ticking_image(self)
        server = self._create_server(image_uuid=image['id'],
                                     flavor_id=self.flavor_id,
                                     networks='none', host='compute')
        src = self.host_vmdir('compute', server)
        out = self.wait_log(src, lambda o: lh.SHELL_READY in o, 'shell')
        self.wait_tick(src, 3)
        return server, BOOT_ID.search(out).group(1)

    def assert_same_guest(self, vmdir, boot_id, last_tick):
        """The guest in ``vmdir`` was not rebooted since it printed
        ``last_tick``: its ticks go on, it booted once, same boot id."""
        out = self.wait_tick(vmdir, last_tick + 2)
        t = lh.ticks(out)
        after = t[t.index(last_tick) + 1:]
        # a kernel message (the disk's new size) printed in the middle of
        # a tick line can hide that one tick from the pattern: allow that
        self.assertIn(after[0] - last_tick, (1, 2), 'ticks: %s' % t[-20:])
        self.assertEqual(sorted(set(after)), after)
        self.assertNotIn(0, after)
        self.assertEqual(1, out.count(lh.INIT))
        self.assertEqual([boot_id], BOOT_ID.findall(out))
        self.shell(vmdir, 'echo BOOT-ID-NOW=$(cat '
                   '/proc/sys/kernel/random/boot_id)',
                   'BOOT-ID-NOW=%s' % boot_id)

    def last_tick_at_save(self, server):
        kept = self.host_vmdir('compute', server,
                               cold_migration.RESIZE_SUFFIX)
        self.assertTrue(os.path.exists(os.path.join(kept, STATE)))
        return lh.ticks(self.log_of(kept))[-1]

    def events(self, server, action):
        for a in self.api.get_instance_actions(server['id']):
            if a['action'] == action:
                return {e['event']: e for e in
                        self.api.get_instance_action_details(
                            server['id'], a['request_id'])['events']}
        self.fail('no %s action' % action)

    # -- tests --------------------------------------------------------------

    def test_warm_migrate_then_confirm(self):
        server, boot_id = self.boot()
        server = self._migrate_server(server)
        self.assertEqual('compute2', server['OS-EXT-SRV-ATTR:host'])
        dst = self.host_vmdir('compute2', server)
        self.assertIsNotNone(self.pid_in(dst, server))
        # resumed: the state file was consumed; the source keeps its own
        self.assertFalse(os.path.exists(os.path.join(dst, STATE)))
        last = self.last_tick_at_save(server)
        self.assert_same_guest(dst, boot_id, last)
        self.assertNotIn(COUNT % 2, self.log_of(dst))
        events = self.events(server, 'migrate')
        for name in (warm_migration.EVENT_SAVE,
                     warm_migration.EVENT_RESTORE):
            self.assertEqual('Success', events[name]['result'], events)
        self.assertIn('warm migration, the guest is suspended here',
                      self.stdlog.logger.output)
        self.assertIn('warm: resumed from its saved state',
                      self.stdlog.logger.output)

        server = self._confirm_resize(server)
        for suffix in ('', cold_migration.RESIZE_SUFFIX):
            self.assertFalse(os.path.exists(
                self.host_vmdir('compute', server, suffix)))
        now = lh.ticks(self.log_of(dst))[-1]
        self.wait_tick(dst, now + 1)
        self._delete_server(server)

    def test_warm_resize_bigger_disk_then_revert(self):
        server, boot_id = self.boot()
        self.api.post_server_action(
            server['id'], {'resize': {'flavorRef': self.bigdisk_id}})
        server = self._wait_for_state_change(server, 'VERIFY_RESIZE')
        dst = self.host_vmdir('compute2', server)
        last = self.last_tick_at_save(server)
        self.assert_same_guest(dst, boot_id, last)
        # the disk grew under the saved state; the resumed guest was told
        self.assertEqual(2 * GiB, vdsk.info(os.path.join(dst, 'disk'))[
            'virtual_size'])
        self.shell(dst, 'echo VDA-SECTORS=$(cat /sys/block/vda/size)',
                   'VDA-SECTORS=%d' % (2 * GiB // 512))

        # revert: the source resumes its own state, saved before the move
        server = self._revert_resize(server)
        self.assertEqual('compute', server['OS-EXT-SRV-ATTR:host'])
        src = self.host_vmdir('compute', server)
        self.assertIsNotNone(self.pid_in(src, server))
        self.assertFalse(os.path.exists(os.path.join(src, STATE)))
        self.assert_same_guest(src, boot_id, last)
        self.shell(src, 'echo VDA-SECTORS=$(cat /sys/block/vda/size)',
                   'VDA-SECTORS=%d' % (1 * GiB // 512))
        self.assertEqual('Success', self.events(server, 'revertResize')[
            warm_migration.EVENT_RESTORE]['result'])
        self.assertFalse(os.path.exists(self.host_vmdir('compute2', server)))
        self._delete_server(server)

    def test_resize_changing_memory_is_cold(self):
        server, boot_id = self.boot()
        self.api.post_server_action(
            server['id'], {'resize': {'flavorRef': self.moreram_id}})
        server = self._wait_for_state_change(server, 'VERIFY_RESIZE')
        self.assertIn('cold migration, the new flavor changes vCPUs/memory '
                      '(1/256 MiB -> 1/320 MiB)', self.stdlog.logger.output)
        dst = self.host_vmdir('compute2', server)
        # booted again from the moved disk: a new boot, a new boot id
        out = self.wait_log(dst, lambda o: COUNT % 2 in o, 'second boot')
        self.assertNotIn(boot_id, out)
        kept = self.host_vmdir('compute', server,
                               cold_migration.RESIZE_SUFFIX)
        self.assertFalse(os.path.exists(os.path.join(kept, STATE)))
        self.assertNotIn(warm_migration.EVENT_SAVE,
                         self.events(server, 'resize'))
        self._delete_server(server)

    def test_restore_failure_boots_and_revert_resumes(self):
        server, boot_id = self.boot()
        hv = self.computes['compute2'].manager.driver.hypervisor
        real_restore = hv.restore

        def damaged_restore(spec, vmdir):
            # fault: the state's RAM pages are overwritten, header intact
            with open(vmdir.saved_state, 'r+b') as f:
                f.seek(4096)
                f.write(b'\xa5' * (1 << 20))
            return real_restore(spec, vmdir)

        with mock.patch.object(hv, 'restore', damaged_restore):
            server = self._migrate_server(server)
        dst = self.host_vmdir('compute2', server)
        # the guest booted from its moved disk instead: a second boot
        self.wait_log(dst, lambda o: COUNT % 2 in o, 'second boot')
        self.assertIsNotNone(self.pid_in(dst, server))
        self.assertFalse(os.path.exists(os.path.join(dst, STATE)))
        event = self.events(server, 'migrate')[warm_migration.EVENT_RESTORE]
        self.assertEqual('Error', event['result'])
        self.assertIn('cannot resume instance', event['details'])
        self.assertIn('corrupt or incompatible saved state', event['details'])
        # nothing lost: revert resumes the original guest on the source
        last = self.last_tick_at_save(server)
        server = self._revert_resize(server)
        self.assert_same_guest(self.host_vmdir('compute', server), boot_id,
                               last)
        self._delete_server(server)
