"""Live snapshots to Glance through Nova, on real QEMU guests.

A marker is written into the running guest's root file system through its
serial shell; createImage snapshots the disk while the guest runs; a new
server booted from the snapshot reads the marker back.
"""
import errno
import json
import os
import threading

from nova.compute import task_states

from nova_bhyve.hypervisor.qemu import qmp
from nova_bhyve.storage import vdsk

import lifecycle_helpers as lh
import nova_harness

RETRIES = 480     # x 0.5 s


class TestSnapshot(nova_harness.BhyveFunctionalTestBase):

    def setUp(self):
        self.flags(qemu_accel='tcg', group='bhyve')   # see test_pause_suspend
        super().setUp()
        lh.keep_uploaded_image_data(self.glance)

    def _boot(self, image_id):
        server = self._create_server(image_uuid=image_id,
                                     flavor_id=self.flavor_id,
                                     networks='none')
        self.wait_for_console(server, lh.SHELL_READY)
        return server

    def _snapshot(self, server, name):
        return self.api.post_server_action(
            server['id'], {'createImage': {'name': name}})['image_id']

    def _wait_idle(self, server):
        return self._wait_for_server_parameter(
            server, {'OS-EXT-STS:task_state': None}, max_retries=RETRIES)

    def _assert_layout_unchanged(self, server):
        vmdir = self.vmdir(server)
        self.assertEqual(
            [], [n for n in os.listdir(vmdir) if n.startswith('snapshot-')])
        sock = nova_harness.vm_socket(vmdir, 'control')
        top = qmp.execute(sock, 'query-block')[0]['inserted']
        self.assertEqual('disk0', top['node-name'])
        # QEMU has the disk on an fdset the driver filled (the file's path
        # is the fd's opaque), over its backing node (json: filename)
        name = top['image']['filename']
        self.assertTrue(name.startswith('json:'), name)
        fdset = json.loads(name[len('json:'):])['file']['filename']
        opaque = {'/dev/fdset/%d' % s['fdset-id']: [f.get('opaque') for f in
                                                    s['fds']]
                  for s in qmp.execute(sock, 'query-fdsets')}
        self.assertEqual([os.path.join(vmdir, 'disk')], opaque[fdset])
        self.assertIn('_base', vdsk.info(os.path.join(vmdir, 'disk'))[
            'backing_file'])

    def _record_task_states(self):
        drv = self.compute.manager.driver
        states = []
        orig = drv.snapshot

        def snapshot(context, instance, image_id, update_task_state):
            def update(task_state, expected_state=task_states.IMAGE_SNAPSHOT):
                states.append(task_state)
                return update_task_state(task_state=task_state,
                                         expected_state=expected_state)
            return orig(context, instance, image_id, update)
        drv.snapshot = snapshot
        return states

    def test_live_snapshot_boots_with_the_same_disk_content(self):
        image = lh.ticking_image(self)
        server = self._boot(image['id'])
        pid = self.vm_pid(server)
        lh.guest_shell(self, server,
                       'echo SNAPSHOT-MARK-$((6*7)) > /mnt/root/snapmark; '
                       'sync; echo WROTE-$((1+1))', 'WROTE-2')
        states = self._record_task_states()
        before = lh.ticks(lh.console_log(self, server))[-1]

        image_id = self._snapshot(server, 'snap-1')
        server = self._wait_idle(server)
        self.assertEqual([task_states.IMAGE_PENDING_UPLOAD,
                          task_states.IMAGE_UPLOADING], states)
        # the guest ran on: same process, ticks went on, same disk layout
        self.assertEqual('ACTIVE', server['status'])
        self.assertEqual(pid, self.vm_pid(server))
        lh.wait_for_tick(self, server, before + 2)
        self._assert_layout_unchanged(server)

        meta = self.glance.show(None, image_id)
        self.assertEqual('active', meta['status'])
        self.assertEqual('qcow2', meta['disk_format'])
        self.assertEqual(image['properties']['kernel_id'],
                         meta['properties']['kernel_id'])
        data = self.glance._imagedata[image_id]
        self.assertEqual(b'QFI\xfb', data[:4])

        # a new server from the snapshot has the marker on its root disk
        clone = self._boot(image_id)
        lh.guest_shell(self, clone, 'cat /mnt/root/snapmark',
                       'SNAPSHOT-MARK-42')
        out = lh.console_log(self, clone)
        self.assertIn('NOVA-BHYVE-BOOT-COUNT 2', out)  # 1 was the origin's
        self._delete_server(clone)
        self._delete_server(server)

    def test_disk_full_during_snapshot(self):
        """ENOSPC while writing the snapshot image (injected: the libvdsk
        write of the snapshot file fails with ENOSPC, after the guest wrote
        a marker while its disk was frozen)."""
        image = lh.ticking_image(self)
        server = self._boot(image['id'])
        pid = self.vm_pid(server)
        frozen = threading.Event()
        marker_written = threading.Event()
        orig_write = vdsk.Image.write

        def write(img, offset, data):
            if os.path.basename(img.path).startswith('snapshot-'):
                frozen.set()
                marker_written.wait(300)
                raise vdsk.VdskError(errno.ENOSPC, 'No space left on device',
                                     img.path)
            return orig_write(img, offset, data)
        self.stub_out('nova_bhyve.storage.vdsk.Image.write', write)

        image_id = self._snapshot(server, 'snap-full')
        self.assertTrue(frozen.wait(300))
        # the guest writes while its disk is frozen: into the overlay
        lh.guest_shell(self, server,
                       'echo FROZEN-WRITE-$((6*7)) > /mnt/root/frozen; '
                       'sync; echo WROTE-$((2+1))', 'WROTE-3')
        marker_written.set()
        server = self._wait_idle(server)

        self.assertEqual('ACTIVE', server['status'])
        self.assertEqual(pid, self.vm_pid(server))
        self._assert_layout_unchanged(server)
        self.assertNotIn(image_id, self.glance.images)
        actions = self.api.get_instance_actions(server['id'])
        snap_action = [a for a in actions if a['action'] == 'createImage']
        self.assertTrue(snap_action)
        # the write made on the overlay was merged into the disk
        before = lh.ticks(lh.console_log(self, server))[-1]
        lh.wait_for_tick(self, server, before + 2)
        server = self._reboot_server(server, hard=True)
        self.wait_for_console(server, lh.INIT, count=2)
        lh.guest_shell(self, server, 'cat /mnt/root/frozen',
                       'FROZEN-WRITE-42', boots=2)
        self._delete_server(server)
        self.assertEqual([], nova_harness.leftovers(server['id'],
                                                    [self.instances_path]))
