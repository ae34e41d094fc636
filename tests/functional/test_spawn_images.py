"""Spawning from each kind of image, and refusing the ones that cannot work.

Real guests for the images that boot; for the bad ones, the fault Nova shows
on the server and proof that nothing was left on the host.
"""
import os
import subprocess

import nova_harness

ROOT = 'NOVA-BHYVE-ROOT-MOUNTED'


class TestSpawnImages(nova_harness.BhyveFunctionalTestBase):

    def _base_files(self):
        cache = os.path.join(self.instances_path, '_base')
        if not os.path.isdir(cache):
            return []
        return sorted(f for f in os.listdir(cache)
                      if not f.startswith('lock-'))

    def test_firmware_boot_raw_and_qcow2_whole_disk_images(self):
        servers = []
        for fmt in ('raw', 'qcow2'):
            image = self.whole_disk_image(fmt)
            servers.append(self._create_server(
                image_uuid=image['id'], flavor_id=self.flavor_id,
                networks='none'))
        for server in servers:
            out = self.wait_for_console(server, ROOT)
            # SeaBIOS -> syslinux (its banner on the serial console) -> kernel
            self.assertIn('SYSLINUX', out)
        self.assertEqual(2, len(self._base_files()))
        for server in servers:
            self._delete_server(server)

    def test_boot_from_vmdk_vdi_and_vhd_images(self):
        """libvdsk reads each format into the cache; no conversion tool.
        (qemu-img only makes the test images, from the guest's raw disk.)"""
        servers = []
        for fmt, qemu_fmt, opts in (
                ('vmdk', 'vmdk', 'subformat=monolithicSparse'),
                ('vdi', 'vdi', 'static=off'),
                ('vhd', 'vpc', 'subformat=dynamic')):
            path = os.path.join(self.instances_path, 'guest.' + fmt)
            subprocess.run(['qemu-img', 'convert', '-f', 'raw', '-O',
                            qemu_fmt, '-o', opts, self.manifest['disk_raw'],
                            path], check=True)
            image = nova_harness.glance_image(self.glance, 'guest-' + fmt,
                                              path, fmt)
            servers.append(self._create_server(
                image_uuid=image['id'], flavor_id=self.flavor_id,
                networks='none'))
        for server in servers:
            self.wait_for_console(server, ROOT)
            self._delete_server(server)

    def test_image_fetched_once_and_shared(self):
        downloads = []
        real_download = self.glance.download

        def counting_download(context, image_id, *args, **kwargs):
            downloads.append(image_id)
            return real_download(context, image_id, *args, **kwargs)

        # observes the real download, changes nothing
        self.glance.download = counting_download
        image = self.whole_disk_image('qcow2')
        a = self._create_server(image_uuid=image['id'],
                                flavor_id=self.flavor_id, networks='none')
        b = self._create_server(image_uuid=image['id'],
                                flavor_id=self.flavor_id, networks='none')
        self.assertEqual([image['id']], downloads)
        self.assertEqual(1, len(self._base_files()))
        for server in (a, b):
            self.wait_for_console(server, ROOT)
            self._delete_server(server)
        # the cache outlives the instances (image cache manager's job)
        self.assertEqual(1, len(self._base_files()))

    # -- bad input: a clean fault, nothing left behind -------------------

    def _assert_refused(self, image=None, flavor_id=None, fault=''):
        server = self._create_server(
            image_uuid=(image or self.whole_disk_image())['id'],
            flavor_id=flavor_id or self.flavor_id, networks='none',
            expected_state='ERROR')
        self.assertIn(fault, server['fault']['message'])
        # no instance directory, VM process, partial download or held
        # image-cache lock
        self.assertEqual([], nova_harness.leftovers(server['id'],
                                                    [self.instances_path]))
        return server

    def test_corrupt_image_refused(self):
        path = os.path.join(self.instances_path, 'garbage')
        with open(path, 'wb') as f:
            f.write(os.urandom(1024 * 1024))
        image = nova_harness.glance_image(self.glance, 'garbage', path,
                                          'qcow2')
        self._assert_refused(
            image, fault='image data is raw but its disk_format is qcow2')
        self.assertEqual([], self._base_files())

    def test_checksum_mismatch_refused(self):
        image = nova_harness.glance_image(
            self.glance, 'bad-sum', self.manifest['disk_qcow2'], 'qcow2',
            checksum='0' * 32)
        self._assert_refused(image, fault='checksum')
        self.assertEqual([], self._base_files())

    def test_qcow2_with_backing_file_refused(self):
        path = os.path.join(self.instances_path, 'evil.qcow2')
        subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-F',
                        'raw', '-b', '/etc/passwd', path, '64M'], check=True)
        image = nova_harness.glance_image(self.glance, 'evil', path, 'qcow2')
        self._assert_refused(image, fault='safety check')

    def test_flavor_disk_smaller_than_image_refused(self):
        path = os.path.join(self.instances_path, 'big.qcow2')
        subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', path,
                        '3G'], check=True)
        image = nova_harness.glance_image(self.glance, 'big', path, 'qcow2')
        self._assert_refused(image, fault='Flavor disk is 1073741824 bytes, '
                                          'image is 3221225472 bytes')

    def test_unsupported_disk_bus_refused(self):
        image = nova_harness.glance_image(
            self.glance, 'scsi', self.manifest['disk_qcow2'], 'qcow2',
            properties={'hw_disk_bus': 'scsi'})
        self._assert_refused(image, fault='hw_disk_bus=scsi')

    def test_flavor_with_ephemeral_disk_refused(self):
        flavor = self._create_flavor(memory_mb=256, vcpu=1, disk=1,
                                     ephemeral=1, name='nb.eph')
        self._assert_refused(flavor_id=flavor, fault='ephemeral')
