"""Rescue and unrescue through Nova, on real QEMU guests.

The rescue guest boots from a fresh disk made from the rescue image and sees
the instance's own root disk as its second virtio disk (vdb): the test types
into the rescue guest's shell on the serial console and reads, from vdb, the
boot ids the instance's first boot wrote there. Unrescue brings the original
spec back byte for byte and the instance boots from its own disk again (its
boot counter goes on from where it was).
"""
import os
import re

from nova_bhyve.storage import vdsk

import nova_harness

INIT = 'NOVA-BHYVE-GUEST-INIT boot_id='
ROOT = 'NOVA-BHYVE-ROOT-MOUNTED'
ACPID = 'NOVA-BHYVE-ACPID-STARTED'
SHELL = 'NOVA-BHYVE-SHELL-READY'
COUNT = 'NOVA-BHYVE-BOOT-COUNT %d'
UUID_RE = r'^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'


class TestRescue(nova_harness.MultiComputeMixin,
                 nova_harness.BhyveFunctionalTestBase):

    def setUp(self):
        # four boots: keep them all in the console output the test counts in
        self.flags(console_log_max_bytes=4 * 1024 * 1024, group='bhyve')
        super().setUp()

    def _read_vdb(self, server, nth_shell, tag):
        """The boot ids on the rescue guest's vdb (the instance's own root
        disk), read in the rescue guest's shell.

        The kernel writes its messages straight to the UART, and a message
        printed while the shell's output is still draining garbles that
        output (the umount message once cut a boot id in half, so the line
        did not parse and the previous read's line was taken instead).
        Hence: kernel messages off the console (dmesg -n 1), unmount before
        printing, a tag per read, and a line that must parse completely -
        never an older read's line.
        """
        self.wait_for_console(server, SHELL, count=nth_shell)
        # the split literals keep the echo of the typed line from matching
        nova_harness.guest_shell(
            self.vmdir(server),
            'dmesg -n 1; mkdir -p /tmp/o && mount -o ro /dev/vdb /tmp/o && '
            'ids=$(tr "\\n" " " < /tmp/o/boot-ids); umount /tmp/o && '
            'echo "VDB""-IDS-%s $ids E""ND-%s"' % (tag, tag))
        out = self.wait_for_console(server, 'END-' + tag)
        found = re.findall(r'VDB-IDS-%s ([^\r\n]*) END-%s' % (tag, tag), out)
        self.assertEqual(1, len(found), out[-3000:])
        ids = found[0].split()
        for boot_id in ids:
            self.assertRegex(boot_id, UUID_RE, out[-3000:])
        return ids

    def test_rescue_own_image_then_unrescue(self):
        image = self.direct_boot_image('qcow2')
        server = self._create_server(image_uuid=image['id'],
                                     flavor_id=self.flavor_id,
                                     networks='none')
        out = self.wait_for_console(server, COUNT % 1)
        # the id is a UUID: a kernel message printed right after it on the
        # UART (no newline between them) once added its '[' to \S+
        first_boot = re.search(INIT + r'([0-9a-f-]{36})', out).group(1)
        # the boot is complete (the test counts SHELL-READY lines later)
        self.wait_for_console(server, SHELL)
        vmdir = self.vmdir(server)
        spec_sha = nova_harness.spec_digest(vmdir)
        pid = self.vm_pid(server)

        server = self._rescue_server(server)
        self.assertEqual('RESCUE', server['status'])
        self.assertNotEqual(pid, self.vm_pid(server))
        self.assertTrue(os.path.exists(os.path.join(vmdir,
                                                    'spec.rescue.json')))
        self.assertTrue(os.path.exists(os.path.join(vmdir, 'disk.rescue')))
        # a new boot, from the rescue disk (its own counter starts at 1),
        # mounted as the first disk
        # (up to its boot counter, which the guest prints after mounting
        # root: waiting for the mount alone raced with that line in CI)
        out = self.wait_for_console(server, COUNT % 1, count=2)
        rescue_boot = out.split(INIT)[2]
        self.assertIn('dev=/dev/vda', rescue_boot)
        self.assertIn(COUNT % 1, rescue_boot)
        # the instance's disk is the second disk: its boot ids are there
        self.assertEqual([first_boot], self._read_vdb(server, 2, 'first'))

        server = self._unrescue_server(server)
        self.assertFalse(os.path.exists(os.path.join(vmdir,
                                                     'spec.rescue.json')))
        self.assertFalse(os.path.exists(os.path.join(vmdir, 'disk.rescue')))
        self.assertEqual(spec_sha, nova_harness.spec_digest(vmdir))
        # the original guest boots from its own disk: its second boot
        out = self.wait_for_console(server, ROOT, count=3)
        self.wait_for_console(server, COUNT % 2)
        self.assertIn('dev=/dev/vda', out.split(INIT)[3])

        # rescue with another image named in the API (raw, with its own
        # kernel_id/ramdisk_id): the instance's disk is vdb again
        # after SHELL-READY the boot id of this boot is on the disk (synced)
        self.wait_for_console(server, SHELL, count=3)
        other = self.direct_boot_image('raw')
        self.api.post_server_action(
            server['id'], {'rescue': {'rescue_image_ref': other['id']}})
        server = self._wait_for_state_change(server, 'RESCUE')
        out = self.wait_for_console(server, ROOT, count=4)
        self.assertIn('dev=/dev/vda', out.split(INIT)[4])
        # the rescue disk is an overlay on the raw rescue image
        self.assertEqual('raw', vdsk.info(os.path.join(
            vmdir, 'disk.rescue'))['backing_format'])
        # vdb holds exactly the instance's own boots (the first and the one
        # after unrescue), in order; the rescue guests' boot ids went to
        # their rescue disks
        boots = re.findall(INIT + r'(\S+)', out)
        self.assertEqual(4, len(boots))
        self.assertEqual([boots[0], boots[2]],
                         self._read_vdb(server, 4, 'second'))
        server = self._unrescue_server(server)
        self.wait_for_console(server, COUNT % 3)
        self.assertEqual(spec_sha, nova_harness.spec_digest(vmdir))
        self._delete_server(server)
        self.assertFalse(os.path.exists(vmdir))
