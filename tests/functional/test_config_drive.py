"""Config drives through Nova, read by a real guest.

The drive is built by Nova's ConfigDriveBuilder from Nova's InstanceMetadata
(genisoimage for iso9660; mkfs.fat + mtools for vfat), attached read-only
and mounted by the test guest's init, which prints the instance uuid from
openstack/latest/meta_data.json and the first line of the user data.
"""
import base64
import json
import os

import nova_harness

ROOT = 'NOVA-BHYVE-ROOT-MOUNTED'
SHELL = 'NOVA-BHYVE-SHELL-READY'
USER_DATA = 'nb-user-data-line-1 hello from POST /servers\nsecond line\n'


class TestConfigDrive(nova_harness.BhyveFunctionalTestBase):

    def _boot(self, **extra):
        image = self.direct_boot_image('qcow2')
        body = self._build_server(image_uuid=image['id'],
                                  flavor_id=self.flavor_id, networks='none')
        body.update(extra)
        server = self.api.post_server({'server': body})
        return self._wait_for_state_change(server, 'ACTIVE')

    def _spec(self, server):
        with open(os.path.join(self.vmdir(server), 'spec.json')) as f:
            return json.load(f)

    def test_iso9660_config_drive_with_user_data_survives_reboot_stop(self):
        server = self._boot(
            config_drive=True,
            user_data=base64.b64encode(USER_DATA.encode()).decode())
        marker = 'NOVA-BHYVE-CONFIG-DRIVE uuid=%s ' % server['id']
        out = self.wait_for_console(server, marker)
        self.assertIn('NOVA-BHYVE-USER-DATA nb-user-data-line-1 hello from '
                      'POST /servers', out)
        self.assertTrue(server['config_drive'] in (True, 'True'))

        # what Nova's builder made: an ISO 9660 image labelled config-2,
        # in the instance directory, attached as a read-only CD-ROM
        path = os.path.join(self.vmdir(server), 'disk.config')
        with open(path, 'rb') as f:
            f.seek(0x8000)
            pvd = f.read(72)
        self.assertEqual(b'CD001', pvd[1:6])
        self.assertEqual(b'config-2', pvd[40:72].strip())
        cd = [d for d in self._spec(server)['disks'] if d['path'] == path]
        self.assertEqual([('cdrom', True)],
                         [(d['device'], d['readonly']) for d in cd])

        # kept across a hard reboot and a stop/start
        self._reboot_server(server, hard=True)
        self.wait_for_console(server, marker, count=2)
        self.wait_for_console(server, SHELL, count=2)
        server = self._stop_server(server)
        self.assertTrue(os.path.exists(path))
        server = self._start_server(server)
        out = self.wait_for_console(server, marker, count=3)
        self.assertEqual(3, out.count('NOVA-BHYVE-USER-DATA nb-user-data'))
        self._delete_server(server)
        self.assertFalse(os.path.exists(path))

    def test_forced_vfat_config_drive(self):
        self.flags(force_config_drive=True, config_drive_format='vfat')
        server = self._boot()
        marker = 'NOVA-BHYVE-CONFIG-DRIVE uuid=%s ' % server['id']
        out = self.wait_for_console(server, marker)
        self.assertIn('dev=/dev/vd', out.split(marker)[1].split('\n')[0])
        self.assertNotIn('NOVA-BHYVE-USER-DATA', out)
        self.assertTrue(self._show_server(server)['config_drive'] in
                        (True, 'True'))
        self._delete_server(server)

    def test_no_config_drive_by_default(self):
        server = self._boot()
        out = self.wait_for_console(server, SHELL)
        self.assertNotIn('NOVA-BHYVE-CONFIG-DRIVE', out)
        self.assertFalse(os.path.exists(
            os.path.join(self.vmdir(server), 'disk.config')))
        self._delete_server(server)
