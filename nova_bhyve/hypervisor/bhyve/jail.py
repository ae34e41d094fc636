"""Each bhyve in a jail(8) of its own, as a uid of its own (docs/bhyve.md,
"Sandbox").

NEVER RUN ON FREEBSD. The commands are pinned by
tests/unit/test_bhyve_sandbox.py with processutils.execute mocked; the
parameter names and device paths were read in FreeBSD's sources:
sys/dev/vmm/vmm_dev.c (``allow.vmm``, ``/dev/vmm/NAME`` created 0600
root, ``/dev/vmm.io/NAME.SEGMENT``), lib/libvmmapi/vmmapi.c
(``vm_create_devmem`` opens ``/dev/vmm.io/NAME.bootrom``),
usr.sbin/chroot/chroot.c (numeric ``-u``/``-g``/``-G``), devfs(8),
jail(8), share/man/man4/vmm.4 (ACCESS CONTROL).

What one VM gets, all made by nova-compute (root) before bhyve starts:

* a root directory of its own: ``<VM runtime dir>/root``, a read-only
  nullfs view of ``/`` (bhyve, its libraries and the firmware), the VM's
  directory mounted read-write on ``/mnt`` inside it, and a devfs of its
  own on ``/dev`` with ruleset N (N = the VM's uid): everything hidden but
  ``vmm/NAME``, ``vmm.io/NAME.bootrom``, its nmdm(4) A side, its taps and
  its volume devices, each owned by the VM's uid, mode 0600;
* a persistent jail ``nova-NAME`` on that root: ``allow.vmm``, no child
  jails, no view of other mounts (``enforce_statfs=2``), IPv4/IPv6 only
  when the VM has a VNC server (bhyve binds it), else none;
* its vmm(4) instance, created inside the jail by jailed root (``jexec ...
  bhyvectl --create``: a non-root user cannot create one before FreeBSD
  15's /dev/vmmctl, and on kernels that tie /dev/vmm/NAME to its
  creator's credential the node must be the jail's to be seen in it);
* bhyve itself started by the supervisor as ``jexec nova-NAME chroot -u U
  -g U -G U / bhyve -k /mnt/bhyve.conf``: chroot(8) is there only for its
  numeric uid/gid change (jexec -u wants a user name; these uids have
  none), its new root is the jail's own.

Torn down at kill (and before a start, from ``jail.json`` in the VM
directory): ``jail -r``, the three mounts, the ruleset.
"""
import json
import os

from oslo_concurrency import processutils
from oslo_log import log as logging

from nova_bhyve.hypervisor import base

LOG = logging.getLogger(__name__)

JAIL = '/usr/sbin/jail'
JEXEC = '/usr/sbin/jexec'
CHROOT = '/usr/sbin/chroot'
DEVFS = '/sbin/devfs'
MOUNT = '/sbin/mount'
UMOUNT = '/sbin/umount'
SYSCTL = '/sbin/sysctl'

#: where the VM directory appears inside the jail
INSIDE = '/mnt'
STATE_FILE = 'jail.json'
#: devfs ruleset numbers are 16 bits (devfs_rsnum); 0 means none
MAX_RULESET = 65535
#: what the jail's read-only view shows (a parameter for the tests)
ROOT = '/'


class VMJail(object):
    """What one VM's jail is made of (all derived, nothing run)."""

    def __init__(self, vm_name, uid, root, vmdir, nodes, network):
        self.vm_name = vm_name
        self.name = 'nova-' + vm_name.replace('.', '_')
        self.uid = uid
        self.root = root
        self.vmdir = vmdir
        self.nodes = list(nodes)        # /dev-relative, in rule order
        self.network = network

    @classmethod
    def for_tree(cls, tree, vmdir, uid):
        """The jail of the VM whose host-side config tree is ``tree``."""
        name = tree['name']
        nodes = ['vmm/' + name, 'vmm.io/%s.bootrom' % name]
        for key, value in tree.items():
            if value.startswith('/dev/') and (
                    key == 'lpc.com1.path' or key.endswith('.path')):
                nodes.append(value[len('/dev/'):])
            elif key.endswith('.backend'):
                nodes.append(value)              # tapN / vmnetN
        network = any(k.startswith('pci.') and k.endswith('.tcp')
                      for k in tree)
        return cls(name, uid, os.path.join(vmdir.runtime, 'root'),
                   vmdir.path, nodes, network)

    @classmethod
    def from_state(cls, vmdir):
        """The jail recorded in ``vmdir`` (None when there is none)."""
        try:
            with open(os.path.join(vmdir.path, STATE_FILE)) as f:
                d = json.load(f)
        except (OSError, ValueError):
            return None
        return cls(d['vm_name'], d['uid'], d['root'], d['vmdir'],
                   d['nodes'], d['network'])

    def save(self):
        state = {'vm_name': self.vm_name, 'uid': self.uid,
                 'root': self.root, 'vmdir': self.vmdir,
                 'nodes': self.nodes, 'network': self.network}
        path = os.path.join(self.vmdir, STATE_FILE)
        with open(path + '.tmp', 'w') as f:
            json.dump(state, f, sort_keys=True)
        os.replace(path + '.tmp', path)

    @property
    def ruleset(self):
        return str(self.uid)

    @property
    def mounts(self):
        """(argv, mount point) in mount order."""
        return [
            ([MOUNT, '-t', 'nullfs', '-o', 'ro', '/', self.root],
             self.root),
            ([MOUNT, '-t', 'nullfs', self.vmdir, self.root + INSIDE],
             self.root + INSIDE),
            ([MOUNT, '-t', 'devfs', 'devfs', self.root + '/dev'],
             self.root + '/dev'),
        ]

    def devfs_rules(self):
        """The ruleset: hide everything, then unhide each node (and each
        directory on its way) for the VM's uid alone."""
        rule = [DEVFS, 'rule', '-s', self.ruleset, 'add']
        out = [rule + ['hide']]
        dirs = []
        own = ['user', str(self.uid), 'group', str(self.uid), 'mode', '600']
        for node in self.nodes:
            parts = node.split('/')
            for i in range(1, len(parts)):
                d = '/'.join(parts[:i])
                if d not in dirs:
                    dirs.append(d)
                    out.append(rule + ['path', d, 'unhide'])
            out.append(rule + ['path', node, 'unhide'] + own)
        return out

    def jail_argv(self):
        ip = 'inherit' if self.network else 'disable'
        return [JAIL, '-c', 'name=' + self.name, 'path=' + self.root,
                'host.hostname=' + self.vm_name, 'persist', 'allow.vmm',
                'devfs_ruleset=' + self.ruleset, 'enforce_statfs=2',
                'children.max=0', 'ip4=' + ip, 'ip6=' + ip]

    def setup_commands(self, bhyvectl):
        """Every command that makes the jail, in order."""
        mounts = [argv for argv, _ in self.mounts]
        dev = self.root + '/dev'
        return (mounts[:2] + self.devfs_rules() + [mounts[2]] + [
            [DEVFS, '-m', dev, 'ruleset', self.ruleset],
            [DEVFS, '-m', dev, 'rule', 'applyset'],
            self.jail_argv(),
            [JEXEC, self.name, bhyvectl, '--vm=' + self.vm_name, '--create'],
        ])

    def bhyve_argv(self, bhyve, config_file):
        """What the supervisor runs: bhyve in the jail as the VM's uid."""
        u = str(self.uid)
        return [JEXEC, self.name, CHROOT, '-u', u, '-g', u, '-G', u, '/',
                bhyve, '-k', inside(config_file, self.vmdir)]


def inside(path, vmdir):
    """``path`` (in the VM directory) as the jailed bhyve sees it."""
    return INSIDE + path[len(vmdir):]


def jail_tree(tree, vmdir):
    """The config tree as the jailed bhyve must read it: files of the VM
    directory under /mnt. A disk anywhere else but /dev is refused: the
    jail sees no other writable file."""
    out = type(tree)()
    for key, value in tree.items():
        if key.endswith('.path') and key.startswith('pci.'):
            if value.startswith(vmdir + '/'):
                value = inside(value, vmdir)
            elif not value.startswith('/dev/'):
                raise base.HypervisorError(
                    'disk %s is outside the instance directory %s: a '
                    'sandboxed bhyve sees only that directory and the '
                    'device nodes of its own devfs ([bhyve] sandbox)'
                    % (value, vmdir))
        out[key] = value
    return out


def _run(argv):
    try:
        processutils.execute(*argv)
    except processutils.ProcessExecutionError as e:
        raise base.HypervisorError('%s failed (%s): %s' % (
            ' '.join(argv), e.exit_code, (e.stderr or '').strip()))


def setup(j, bhyvectl):
    """Make the jail of ``j``; on a failure, undo what was done and raise
    HypervisorError naming the command that failed."""
    os.makedirs(j.root, mode=0o755, exist_ok=True)
    j.save()
    try:
        for argv in j.setup_commands(bhyvectl):
            _run(argv)
    except base.HypervisorError:
        teardown(j)
        raise


def teardown(j, ismount=None):
    """Remove the jail of ``j``, its mounts and its ruleset; idempotent
    (what is not there is skipped), never raises for a step that fails
    (logged: the next start tries again)."""
    ismount = ismount or os.path.ismount
    steps = [[JAIL, '-r', j.name]]
    steps += [[UMOUNT, point] for _, point in reversed(j.mounts)
              if ismount(point)]
    steps.append([DEVFS, 'rule', '-s', j.ruleset, 'delset'])
    for argv in steps:
        try:
            processutils.execute(*argv)
        except processutils.ProcessExecutionError as e:
            if argv[1] != '-r':          # no such jail: nothing to remove
                LOG.warning('sandbox of %s: %s failed: %s', j.vm_name,
                            ' '.join(argv), (e.stderr or '').strip())
    for path in (j.root, os.path.join(j.vmdir, STATE_FILE)):
        try:
            (os.rmdir if path == j.root else os.unlink)(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            LOG.warning('sandbox of %s: cannot remove %s: %s', j.vm_name,
                        path, e)


def host_problems(uid_range, on_root_fs, root=None):
    """What keeps this host from jailing bhyve, as messages: the uid
    range must fit devfs ruleset numbers, vmm.ko must offer jails its
    ``allow.vmm``, and the files bhyve opens before it is jailed must be
    on the file system the read-only view of ``root`` shows."""
    problems = []
    if uid_range[1] > MAX_RULESET:
        problems.append(
            '[bhyve] sandbox_uid_range %d-%d goes past %d: each VM\'s uid '
            'is also its devfs ruleset number, which has 16 bits'
            % (uid_range[0], uid_range[1], MAX_RULESET))
    try:
        processutils.execute(SYSCTL, '-n', 'security.jail.param.allow.vmm')
    except processutils.ProcessExecutionError:
        problems.append('jail parameter allow.vmm (security.jail.param.'
                        'allow.vmm is missing: load vmm.ko, FreeBSD 12 or '
                        'later)')
    root = root or ROOT
    dev = os.stat(root).st_dev
    for path in on_root_fs:
        try:
            if os.stat(path).st_dev != dev:
                problems.append(
                    '%s is not on the root file system: a jailed bhyve sees '
                    '%s through a read-only nullfs mount, which shows no '
                    'other file system' % (path, root))
        except OSError as e:
            problems.append('%s: %s' % (path, e.strerror))
    return problems
