"""Cinder volumes attached to, extended on and detached from real guests.

Cinder cannot run here, so Nova's CinderFixture stands in for it; the one
thing changed is the connection_info it hands out for the test's volume
(a boundary injection): driver_volume_type 'local' with data.device_path =
a raw file this test made, which is what a Cinder backend exporting a local
file or block device returns. Everything after that is real: Nova's compute
manager, the driver, os-brick's LocalConnector, QEMU hot-plug over QMP and
the guest kernel, which the test asks through its serial shell.
"""
import os
import re
import shutil
import tempfile
import time

from nova.tests.functional.api import client
from oslo_utils.fixture import uuidsentinel as uuids

import nethelpers
import nova_harness

SHELL = 'NOVA-BHYVE-SHELL-READY'
MiB = 1024 * 1024
GUEST_TIMEOUT = 180


class GuestShell(nethelpers.GuestShell):

    def disks(self):
        """{name: (serial, size in 512-byte sectors)} of the guest's
        virtio disks."""
        out = self.check('for d in /sys/block/vd*; do echo "DISK ${d##*/} '
                         '$(cat $d/serial 2>/dev/null)_ $(cat $d/size)"; '
                         'done')
        found = {}
        for m in re.finditer(r'(?m)^DISK (vd[a-z]+) (\S*)_ (\d+)\r?$', out):
            found[m.group(1)] = (m.group(2), int(m.group(3)))
        return found


class TestVolumes(nova_harness.BhyveFunctionalTestBase):

    def setUp(self):
        super().setUp()
        self.voldir = tempfile.mkdtemp(prefix='nbvol-')
        self.addCleanup(shutil.rmtree, self.voldir, ignore_errors=True)

    def _local_volume(self, volume_id, size):
        """A raw file standing for a Cinder volume, and the fixture's
        connection_info pointing at it."""
        path = os.path.join(self.voldir, volume_id)
        with open(path, 'wb') as f:
            f.truncate(size)
        self.cinder.VOLUME_CONNECTION_INFO = dict(
            self.cinder.VOLUME_CONNECTION_INFO,
            **{volume_id: {'driver_volume_type': 'local',
                           'data': {'device_path': path}}})
        return path

    def _shell(self, server):
        shell = GuestShell(nova_harness.vm_socket(self.vmdir(server),
                                                  'serial'))
        self.addCleanup(shell.close)
        return shell

    def _wait_for_disks(self, shell, predicate, what):
        deadline = time.monotonic() + GUEST_TIMEOUT
        while True:
            disks = shell.disks()
            if predicate(disks):
                return disks
            if time.monotonic() > deadline:
                self.fail('guest disks never %s: %s' % (what, disks))
            time.sleep(1)

    def test_attach_extend_reboot_detach(self):
        image = self.direct_boot_image('qcow2')
        server = self._create_server(image_uuid=image['id'],
                                     flavor_id=self.flavor_id,
                                     networks='none')
        self.wait_for_console(server, SHELL)
        shell = self._shell(server)
        before = shell.disks()
        self.assertEqual(['vda'], sorted(before))

        vol = uuids.nb_volume
        path = self._local_volume(vol, 512 * MiB)
        self.api.post_server_volume(
            server['id'], {'volumeAttachment': {'volumeId': vol}})
        self.notifier.wait_for_versioned_notifications(
            'instance.volume_attach.end', timeout=120)
        serial = vol[:20]          # virtio-blk ids are 20 bytes
        disks = self._wait_for_disks(
            shell, lambda d: any(s == serial for s, _ in d.values()),
            'showed the volume')
        name = [n for n, (s, _) in disks.items() if s == serial][0]
        self.assertEqual(512 * MiB // 512, disks[name][1])

        # the guest writes to the volume, the host reads it back
        shell.check('echo nb-volume-data > /dev/%s; sync' % name)
        with open(path, 'rb') as f:
            self.assertEqual(b'nb-volume-data\n', f.read(15))

        # "Cinder" grows the volume to its new size (1 GiB: the fixture's
        # volume size) and tells Nova; the guest sees the new size
        with open(path, 'r+b') as f:
            f.truncate(1024 * MiB)
        self.api.create_server_external_events(
            [{'name': 'volume-extended', 'server_uuid': server['id'],
              'tag': vol}])
        self._wait_for_disks(
            shell, lambda d: d.get(name, (0, 0))[1] == 1024 * MiB // 512,
            'showed the extended size')

        # a hard reboot keeps the volume (it is in the VM spec)
        shell.close()
        self._reboot_server(server, hard=True)
        self.wait_for_console(server, SHELL, count=2)
        shell = self._shell(server)
        disks = shell.disks()
        self.assertIn((serial, 1024 * MiB // 512), disks.values())

        # detach from the running guest (hot-unplug): the disk goes away,
        # the data stays in the volume
        self.api.delete_server_volume(server['id'], vol)
        self.notifier.wait_for_versioned_notifications(
            'instance.volume_detach.end', timeout=180)
        self._wait_for_disks(
            shell, lambda d: serial not in [s for s, _ in d.values()],
            'lost the volume')
        self.assertEqual(['vda'], sorted(shell.disks()))
        self.assertEqual([], self.api.get_server_volumes(server['id']))
        with open(path, 'rb') as f:
            self.assertEqual(b'nb-volume-data\n', f.read(15))
        self._delete_server(server)

    def test_unsupported_connection_type_fails_cleanly(self):
        image = self.direct_boot_image('qcow2')
        server = self._create_server(image_uuid=image['id'],
                                     flavor_id=self.flavor_id,
                                     networks='none')
        # the fixture's default connection_info: driver_volume_type 'fake'
        exc = self.assertRaises(
            client.OpenStackApiException, self.api.post_server_volume,
            server['id'], {'volumeAttachment': {'volumeId': uuids.other}})
        self.assertEqual(400, exc.response.status_code)
        self.assertIn('driver_volume_type fake is not supported',
                      exc.response.text)
        self.assertEqual([], self.api.get_server_volumes(server['id']))
        self.assertEqual('ACTIVE', self._show_server(server)['status'])
        self._delete_server(server)
