"""The VM sandbox through Nova: instances booted through the API run as
QEMUs with a uid of their own each, no capabilities, no_new_privs and
seccomp, which refuse, through their own monitor, to open what they were
not handed; a launch that fails is a clean fault that leaves nothing
behind. Everything is real ([bhyve] sandbox is on by default); the only
setting changed is a uid range of one uid, to make the second launch fail.
"""
import os
import shutil
import tempfile

from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.qemu import qmp
from nova_bhyve.hypervisor.qemu import sandboxed
from nova_bhyve.sandbox import cgroups

import nova_harness
import procfs

ROOT = 'NOVA-BHYVE-ROOT-MOUNTED'



class _Sandboxes:
    """setUp and checks shared by the test classes below."""

    def setUp(self):
        self.runtime = tempfile.mkdtemp(prefix='nbf-rt-')
        self.addCleanup(shutil.rmtree, self.runtime, True)
        self.flags(runtime_path=os.path.join(self.runtime, 'r'),
                   group='bhyve')
        super().setUp()

    def _vmdir(self, server):
        return base.VMDir(self.vmdir(server))

    def _leftovers(self, vmdir):
        name = sandboxed.Sandbox.name(vmdir)
        left = []
        if cgroups.detect().exists(name):
            left.append('cgroup')
        uid_dir = os.path.join(self.runtime, 'r', 'uids')
        if os.path.isdir(uid_dir):
            for f in os.listdir(uid_dir):
                with open(os.path.join(uid_dir, f)) as fh:
                    if fh.read().strip() == name:
                        left.append('uid %s' % f)
        if os.path.exists(vmdir.path):
            left.append('instance directory')
        if os.path.exists(vmdir.runtime):
            left.append('runtime directory')
        return left


class TestSandbox(_Sandboxes, nova_harness.BhyveFunctionalTestBase):

    def test_each_instance_its_own_sandbox_and_nothing_left_after(self):
        image = self.direct_boot_image('qcow2')
        servers = [self._create_server(image_uuid=image['id'],
                                       flavor_id=self.flavor_id,
                                       networks='none') for _ in range(2)]
        uids = []
        for server in servers:
            self.wait_for_console(server, ROOT)
            st = procfs.status(self.vm_pid(server))
            self.assertEqual(1, len(set(st['Uid'])), st['Uid'])
            self.assertNotEqual('0', st['Uid'][0])
            self.assertEqual(st['Uid'], st['Gid'])
            for cap in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb'):
                self.assertEqual(0, int(st[cap][0], 16), cap)
            self.assertEqual(['1'], st['NoNewPrivs'])
            self.assertEqual(['2'], st['Seccomp'])
            uids.append(st['Uid'][0])
        self.assertNotEqual(uids[0], uids[1])

        # ask the first instance's QEMU, through its own monitor, to open
        # the second's disk and the host's password file
        mine, other = (self._vmdir(s) for s in servers)
        for n, path in enumerate((other.disk(), '/etc/passwd')):
            e = self.assertRaises(
                qmp.QMPError, qmp.execute, mine.control, 'blockdev-add',
                {'driver': 'file', 'filename': path, 'read-only': True,
                 'node-name': 'probe%d' % n})
            self.assertIn('Permission denied', str(e))
        self.assertEqual('running', qmp.execute(
            mine.control, 'query-status')['status'])

        for server in servers:
            self._delete_server(server)
        for vmdir in (mine, other):
            self.assertEqual([], self._leftovers(vmdir))



class TestSandboxUidsUsedUp(_Sandboxes,
                            nova_harness.BhyveFunctionalTestBase):
    """A uid range of one uid: the second instance cannot get one."""

    def setUp(self):
        self.flags(sandbox_uid_range='64990-64990', group='bhyve')
        super().setUp()

    def test_a_launch_that_fails_is_a_fault_and_leaves_nothing(self):
        image = self.direct_boot_image('qcow2')
        first = self._create_server(image_uuid=image['id'],
                                    flavor_id=self.flavor_id,
                                    networks='none')
        second = self._create_server(image_uuid=image['id'],
                                     flavor_id=self.flavor_id,
                                     networks='none', expected_state='ERROR')
        # rescheduled (another host may have uids left), then Nova's
        # "no valid host"; the reason is in nova-compute's log
        self.assertIn('Exceeded maximum number of retries',
                      second['fault']['message'])
        self.assertIn('in its sandbox: no free uid left in [bhyve] '
                      'sandbox_uid_range 64990-64990',
                      self.stdlog.logger.output)
        self.assertEqual([], self._leftovers(self._vmdir(second)))
        self.assertIsNotNone(self.vm_pid(first))
