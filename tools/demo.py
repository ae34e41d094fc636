"""Boot one real instance through Nova with nova-bhyve, show it, delete it.

Runs Nova's services in-process the way Nova's own functional tests do
(tests/functional/nova_harness.py), so it needs no database server, message
broker, Keystone or Glance: everything else is real - the API requests, the
scheduler and placement, the compute manager, this driver and QEMU.
"""
import os
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, '..', 'tests'),
                os.path.join(HERE, '..', 'tests', 'functional')]

import nova_harness  # noqa: E402

OUT = sys.__stdout__


def say(fmt, *args):
    OUT.write((fmt % args if args else fmt) + '\n')
    OUT.flush()


class Demo(nova_harness.BhyveFunctionalTestBase):

    def test_demo(self):
        start = time.monotonic()
        image = self.direct_boot_image('qcow2')
        say('Glance image %s (test guest, qcow2, kernel %s)', image['id'],
            self.manifest['kernel']['version'])
        say('POST /servers (flavor nb.tiny: 1 vCPU, 256 MiB, 1 GiB) ...')
        server = self._create_server(name='nova-bhyve-demo',
                                     image_uuid=image['id'],
                                     flavor_id=self.flavor_id,
                                     networks='none')
        say('server %s: status %s on host %s, power state %s, %.1f s',
            server['id'], server['status'], server['OS-EXT-SRV-ATTR:host'],
            server['OS-EXT-STS:power_state'], time.monotonic() - start)
        allocs = self._get_allocations_by_server_uuid(server['id'])
        for rp, alloc in allocs.items():
            say('placement allocation on %s: %s', rp, alloc['resources'])
        say('waiting for the guest to boot ...')
        console = self.wait_for_console(server, 'NOVA-BHYVE-SHELL-READY')
        say('guest console (GET os-getConsoleOutput), %.1f s after POST:',
            time.monotonic() - start)
        say('-' * 72)
        say('\n'.join(console.rstrip().splitlines()[-25:]))
        say('-' * 72)
        self._delete_server(server)
        left = os.path.exists(self.vmdir(server))
        say('server deleted; instance directory %s',
            'STILL PRESENT' if left else 'removed')
        self.assertFalse(left)


if __name__ == '__main__':
    result = unittest.TextTestRunner(stream=sys.stderr, verbosity=1).run(
        unittest.defaultTestLoader.loadTestsFromTestCase(Demo))
    sys.exit(0 if result.wasSuccessful() else 1)
