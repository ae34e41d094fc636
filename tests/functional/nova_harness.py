"""Nova's own functional harness, running this driver against real guests.

The services are Nova's (API, conductor, scheduler, compute) with the real
placement service in-process, from nova.tests.functional (shipped in the nova
wheel). Glance and Neutron are Nova's fixtures: image data is the real test
guest, served from memory. The hypervisor is real: QEMU runs each instance.
"""
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from unittest import mock

import fixtures
from nova.tests.functional import integrated_helpers
from oslo_utils.fixture import uuidsentinel as uuids

import nova_bhyve.conf  # noqa: F401  (registers the [bhyve] options)
from nova_bhyve.hypervisor import base as hyp_base
from nova_bhyve.hypervisor.qemu import backend as qemu_backend

import conftest

CONF = nova_bhyve.conf.CONF
BOOT_TIMEOUT = float(os.environ.get('NOVA_BHYVE_BOOT_TIMEOUT', '240'))


def glance_image(glance, name, path, disk_format, container='bare',
                 properties=None, checksum=None):
    """Register the file at ``path`` in Nova's Glance fixture."""
    with open(path, 'rb') as f:
        data = f.read()
    meta = {
        'name': name,
        'status': 'active',
        'visibility': 'public',
        'container_format': container,
        'disk_format': disk_format,
        'size': len(data),
        'min_ram': 0,
        'min_disk': 0,
        'checksum': checksum or hashlib.md5(data).hexdigest(),
        'os_hash_algo': 'sha512',
        'os_hash_value': hashlib.sha512(data).hexdigest(),
        'properties': dict(properties or {}),
    }
    if checksum:
        meta['os_hash_algo'] = meta['os_hash_value'] = None
    return glance.create(None, meta, data=io.BytesIO(data))



def vm_socket(vmdir, name):
    """Path of the VM socket ``name`` ('serial', 'control', 'events') of
    the instance directory ``vmdir``: in the VM's runtime directory under
    [bhyve] runtime_path (hypervisor.base.VMDir), not in ``vmdir``."""
    return getattr(hyp_base.VMDir(vmdir), name)

def _kill_leftovers(instances_path):
    """Stop, by pid, any VM a failed test left (its sandbox's uid and
    cgroup released), and remove the files."""
    for uuid in os.listdir(instances_path):
        pidfile = os.path.join(instances_path, uuid, 'vm.pid')
        try:
            with open(pidfile) as f:
                os.kill(int(f.read().strip()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        try:
            qemu_backend.QemuHypervisor().kill(
                hyp_base.VMDir(os.path.join(instances_path, uuid)))
        except Exception:       # best effort: the test failed already
            pass
    shutil.rmtree(instances_path, ignore_errors=True)
    top = os.path.dirname(instances_path)
    if os.path.basename(top).startswith('nbf-'):       # a long path's top
        shutil.rmtree(top, ignore_errors=True)


def _forget_computes(instances_path):
    """Remove the machine-wide records (migration/cold.py) of this test's
    computes: those naming a path inside ``instances_path``."""
    registry = os.path.join(CONF.bhyve.runtime_path, 'computes')
    for name in os.listdir(registry) if os.path.isdir(registry) else ():
        path = os.path.join(registry, name)
        try:
            with open(path) as f:
                mine = f.read().startswith(instances_path)
            if mine:
                os.unlink(path)
        except OSError:
            pass


def new_instances_path(long=False):
    """A fresh instances path; ``long``: 200 characters (the top temporary
    directory is removed with it: _kill_leftovers)."""
    path = tempfile.mkdtemp(prefix='nbf-')
    if long:
        path = os.path.join(path, 'p' * (200 - len(path) - 1))
        os.mkdir(path)
    return path


class BhyveFunctionalTestBase(integrated_helpers._IntegratedTestBase):
    api_major_version = 'v2.1'
    microversion = 'latest'
    ADMIN_API = True
    #: instances paths of 200 characters
    LONG_INSTANCES_PATH = False

    def setUp(self):
        # The VM sockets are under [bhyve] runtime_path, whatever the
        # length of instances_path (LONG_INSTANCES_PATH: 200 characters).
        self.instances_path = new_instances_path(self.LONG_INSTANCES_PATH)
        self.addCleanup(_kill_leftovers, self.instances_path)
        self.addCleanup(_forget_computes, self.instances_path)
        self.flags(compute_driver='bhyve.BhyveDriver',
                   instances_path=self.instances_path)
        self.flags(api_paste_config=os.path.join(
            sys.prefix, 'etc', 'nova', 'api-paste.ini'), group='wsgi')
        self.flags(wait_soft_reboot_seconds=90, group='bhyve')
        self.manifest = conftest.guest_manifest()
        # Nova's tests poison open/listdir/isdir on /sys: its drivers must
        # not look at the test node. This driver runs for real on this
        # host: its VM sandboxes live in /sys/fs/cgroup.
        self.useFixture(fixtures.MonkeyPatch(
            'nova.tests.fixtures.SysFsPoisonFixture', fixtures.Fixture))
        super().setUp()
        self.flavor_id = self._create_flavor(memory_mb=256, vcpu=1, disk=1,
                                             ephemeral=0, name='nb.tiny')

    def _clear_attrs(self):
        # nova.test clears instance attributes at cleanup; pytest's unittest
        # support then deletes the test method attribute it set itself.
        name = self._testMethodName
        method = self.__dict__.get(name)
        super()._clear_attrs()
        if method is not None:
            self.__dict__[name] = method

    # -- images -----------------------------------------------------------

    def direct_boot_image(self, fmt='qcow2'):
        """root disk + kernel_id/ramdisk_id: Nova's direct kernel boot."""
        m = self.manifest
        kernel = glance_image(self.glance, 'nb-kernel', m['vmlinuz'], 'aki',
                              container='aki')
        ramdisk = glance_image(self.glance, 'nb-initrd', m['initrd'], 'ari',
                               container='ari')
        root = m['root_qcow2'] if fmt == 'qcow2' else m['root_raw']
        return glance_image(self.glance, 'nb-root-' + fmt, root, fmt,
                            properties={'kernel_id': kernel['id'],
                                        'ramdisk_id': ramdisk['id'],
                                        'os_command_line': m['cmdline']})

    def whole_disk_image(self, fmt='qcow2'):
        m = self.manifest
        path = m['disk_qcow2'] if fmt == 'qcow2' else m['disk_raw']
        return glance_image(self.glance, 'nb-disk-' + fmt, path, fmt)

    # -- the instance seen from the host ----------------------------------

    def vmdir(self, server):
        return os.path.join(self.instances_path, server['id'])

    def vm_pid(self, server):
        """pid of the live VM process of ``server``, or None."""
        try:
            with open(os.path.join(self.vmdir(server), 'vm.pid')) as f:
                pid = int(f.read().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            if server['id'].encode() not in f.read():
                return None
        return pid

    def console(self, server):
        return self.api.post_server_action(
            server['id'], {'os-getConsoleOutput': {}})['output']

    def wait_for_console(self, server, text, count=1,
                         timeout=BOOT_TIMEOUT):
        """Wait until ``text`` appears ``count`` times in the console
        output that Nova's API returns; return that output."""
        deadline = time.monotonic() + timeout
        while True:
            output = self.console(server)
            if output.count(text) >= count:
                return output
            if time.monotonic() > deadline:
                self.fail('%r did not appear %d times on the console of %s '
                          'within %ds; console tail:\n%s' % (
                              text, count, server['id'], timeout,
                              output[-3000:]))
            time.sleep(0.5)


class MultiComputeMixin:
    """Several computes in one process, each with its own instances path
    (the driver reads instances_path once, when it is constructed)."""

    def setUp(self):
        # No KVM calibration run per driver: KVM is unusable here (see
        # DESIGN.md) and on a loaded machine the run may time out.
        self.flags(qemu_accel='tcg', group='bhyve')
        # tests count markers over several boots: return the whole log
        self.flags(console_log_max_bytes=1024 * 1024, group='bhyve')
        super().setUp()

    def compute_path(self, host):
        paths = self.__dict__.setdefault('_compute_paths',
                                         {'compute': self.instances_path})
        return paths[host]

    def start_compute_with_own_path(self, host):
        path = new_instances_path(self.LONG_INSTANCES_PATH)
        self.addCleanup(_kill_leftovers, path)
        self.compute_path('compute')            # records the first one
        self._compute_paths[host] = path
        self.flags(instances_path=path)
        with self._node_uuid_of(host):
            return self._start_compute(host)

    @staticmethod
    def _node_uuid_of(host):
        # Nova's node uuid is process-wide: each further compute gets its
        # own (the driver reads it once), like Nova's libvirt tests do.
        return mock.patch('nova.virt.node.get_local_node_uuid',
                          return_value=str(getattr(uuids, 'node_' + host)))

    def restart_compute_with_own_path(self, host):
        """A fresh driver on ``host`` reading its own instances path."""
        self.flags(instances_path=self.compute_path(host))
        if host == 'compute':
            compute = self.restart_compute_service(
                self.computes[host], keep_hypervisor_state=False)
        else:
            with self._node_uuid_of(host):
                compute = self.restart_compute_service(
                    self.computes[host], keep_hypervisor_state=False)
        self.computes[host] = compute
        if host == 'compute':
            self.compute = compute
        return compute

    def host_vmdir(self, host, server, suffix=''):
        return os.path.join(self.compute_path(host), server['id'] + suffix)

    def pid_in(self, vmdir, server):
        """pid of the live VM process of ``server`` whose pid file is in
        ``vmdir``, or None."""
        try:
            with open(os.path.join(vmdir, 'vm.pid')) as f:
                pid = int(f.read().strip())
            with open('/proc/%d/stat' % pid) as f:
                if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
                    return None
            with open('/proc/%d/cmdline' % pid, 'rb') as f:
                if server['id'].encode() not in f.read():
                    return None
        except (OSError, ValueError):
            return None
        return pid


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def guest_shell(vmdir, command, timeout=60):
    """Type ``command`` into the guest's root shell on its serial console
    (the QEMU serial socket in the instance directory), once the shell
    answers a newline with its prompt (input typed while the shell is still
    starting is lost). Its output shows on the console log."""
    import socket
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(vm_socket(vmdir, 'serial'))
            break
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        s.settimeout(1.0)
        seen = b''
        while b'nbguest# ' not in seen:
            if time.monotonic() > deadline:
                raise AssertionError('no shell prompt on %s: %r' % (
                    vmdir, seen[-300:]))
            s.sendall(b'\n')
            try:
                while True:
                    data = s.recv(4096)
                    if not data:
                        break
                    seen += data
            except socket.timeout:
                pass
        s.sendall(command.encode() + b'\n')
        time.sleep(1.0)
    finally:
        s.close()


# -- what an instance may leave on the host --------------------------------

def vm_processes(instance_uuid):
    """pids of live (not zombie) processes whose command line names
    ``instance_uuid`` (QEMU's -uuid/-name, bhyve's VM name)."""
    pids = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open('/proc/%s/cmdline' % entry, 'rb') as f:
                if instance_uuid.encode() not in f.read():
                    continue
            with open('/proc/%s/stat' % entry) as f:
                if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
                    continue
        except OSError:
            continue
        pids.append(int(entry))
    return pids


def _held_inodes():
    """(major, minor, inode) of files with a POSIX/flock lock held
    (/proc/locks; read-only: taking a lock ourselves would, in this process
    that also runs the computes, release theirs on close)."""
    inodes = set()
    with open('/proc/locks') as f:
        for line in f:
            # "1: POSIX  ADVISORY  WRITE 1234 00:2d:5678 0 EOF"
            fields = line.split()
            dev_ino = [x for x in fields if x.count(':') == 2]
            if dev_ino:
                major, minor, ino = dev_ino[0].split(':')
                inodes.add((int(major, 16), int(minor, 16), int(ino)))
    return inodes


def spec_digest(vmdir):
    """The instance's spec.json without its console ports, which every
    start settles again (a VNC port taken meanwhile moves)."""
    with open(os.path.join(vmdir, 'spec.json')) as f:
        spec = json.load(f)
    spec.pop('consoles', None)
    return json.dumps(spec, sort_keys=True)


def leftovers(instance_uuid, instances_paths, port_ids=(), processes=True):
    """What an instance that is gone (or was never built) left on the
    host, as a list of descriptions (empty: nothing):

    - its directory or a resize's kept copy, in any instances path;
    - a live VM process naming it (unless ``processes`` is False: to
      look at one compute while the instance runs on another);
    - a partial image-cache download (.part/.convert) or an image-cache
      lock still held (lock files themselves stay, as lockutils leaves
      them: removing one under a waiter would let two downloads run);
    - a host device (tap/qbr/qvb/qvo) named for one of its ports.
    """
    found = []
    for path in instances_paths:
        for suffix in ('', '_resize'):
            d = os.path.join(path, instance_uuid + suffix)
            if os.path.exists(d):
                found.append('instance directory %s' % d)
        cache = os.path.join(path, '_base')
        if os.path.isdir(cache):
            held = _held_inodes()
            for name in os.listdir(cache):
                full = os.path.join(cache, name)
                if name.endswith(('.part', '.convert')):
                    found.append('partial cache file %s' % full)
                elif name.startswith('lock-'):
                    try:
                        st = os.stat(full)
                        if (os.major(st.st_dev), os.minor(st.st_dev),
                                st.st_ino) in held:
                            found.append('image cache lock held: %s' % full)
                    except FileNotFoundError:
                        pass
    for pid in (vm_processes(instance_uuid) if processes else ()):
        try:
            with open('/proc/%d/cmdline' % pid, 'rb') as f:
                cmd = f.read().replace(b'\0', b' ')[:120].decode(
                    errors='replace')
        except OSError:
            cmd = '?'
        found.append('VM process %d (%s)' % (pid, cmd))
    if port_ids:
        import nethelpers
        present = nethelpers.links()
        for port_id in port_ids:
            for prefix in ('tap', 'qbr', 'qvb', 'qvo'):
                if prefix + port_id[:11] in present:
                    found.append('device %s' % (prefix + port_id[:11]))
    return found
