"""The FreeBSD side of the VM sandbox at its boundary (docs/bhyve.md,
"Sandbox"). NONE OF IT HAS RUN ON FREEBSD.

* The Capsicum check of the bhyve binary reads real ELF files, built here
  with the C compiler: a shared object importing cap_enter (as bhyve does
  through capsicum_helpers.h's inline caph_enter), the same stripped, one
  without it, this host's /bin/true, a file that is not ELF.
* sysctl(8), mount(8), devfs(8), jail(8), jexec(8) and bhyvectl(8) cannot
  run here: processutils.execute is mocked (fake_execute.py) and every
  command is pinned argv by argv, in order. os.path.ismount is mocked
  where the teardown must see the jail's mounts (none exist here).
* supervisor.spawn is mocked for the jailed start (it would run jexec);
  the supervisor itself is tested for real in test_bhyve_backend.py.
* the files bhyve opens are really chowned to the VM's uid (the tests run
  as root here, as nova-compute does).
"""
import json
import logging
import os
import subprocess
from unittest import mock

import pytest

from nova_bhyve import conf
from nova_bhyve import guest
from nova_bhyve.hypervisor import base
from nova_bhyve.hypervisor.bhyve import backend as bhyve
from nova_bhyve.hypervisor.bhyve import capsicum
from nova_bhyve.hypervisor.bhyve import config as bhyve_config
from nova_bhyve.hypervisor.bhyve import jail as bhyve_jail
from nova_bhyve.hypervisor.bhyve import supervisor

import fake_execute

CONF = conf.CONF
UUID = '6d5ba3a0-55a1-4c7c-9a43-3d1b0f6a2b11'
NAME = 'instance-0000002a'
UID = 64000
BHYVECTL = '/usr/sbin/bhyvectl'
SYSCTL_OK = {'kern.features.security_capability_mode': '1\n',
             'kern.features.security_capabilities': '1\n',
             'security.jail.param.allow.vmm': '0\n'}


@pytest.fixture(autouse=True)
def _conf():
    yield
    for opt in ('bhyve_bootrom', 'bhyve_path', 'sandbox', 'sandbox_jail',
                'sandbox_uid_range'):
        CONF.clear_override(opt, group='bhyve')


# -- Capsicum: the binary ---------------------------------------------------

def _cc(tmp_path, name, source, strip=False):
    src = tmp_path / (name + '.c')
    src.write_text(source)
    out = tmp_path / (name + '.so')
    subprocess.run(['cc', '-shared', '-fPIC', '-o', str(out), str(src)],
                   check=True)
    if strip:
        subprocess.run(['strip', '--strip-all', str(out)], check=True)
    return str(out)


USES_CAP_ENTER = ('extern int cap_enter(void);\n'
                  'int enter_sandbox(void) { return cap_enter(); }\n')
NO_CAPSICUM = 'int enter_sandbox(void) { return 0; }\n'


def test_elf_import_of_cap_enter_is_found(tmp_path):
    lib = _cc(tmp_path, 'uses', USES_CAP_ENTER)
    assert 'cap_enter' in capsicum.elf_symbols(lib)
    assert capsicum.binary_problem(lib) is None


def test_stripped_binary_keeps_its_imports(tmp_path):
    lib = _cc(tmp_path, 'stripped', USES_CAP_ENTER, strip=True)
    assert 'enter_sandbox' in capsicum.elf_symbols(lib)   # .dynsym left
    assert capsicum.binary_problem(lib) is None


def test_binary_without_capsicum_is_refused(tmp_path):
    lib = _cc(tmp_path, 'none', NO_CAPSICUM)
    assert 'enter_sandbox' in capsicum.elf_symbols(lib)
    assert 'WITHOUT_CAPSICUM' in capsicum.binary_problem(lib)
    # a real program of this host: symbols, none of them cap_enter
    assert capsicum.elf_symbols('/bin/true')
    assert 'references no cap_enter' in capsicum.binary_problem('/bin/true')


def test_not_elf_or_missing_is_refused(tmp_path):
    script = tmp_path / 'bhyve'
    script.write_text('#!/bin/sh\nexit 0\n')
    assert 'is not an ELF file' in capsicum.binary_problem(str(script))
    assert 'cannot read' in capsicum.binary_problem(str(tmp_path / 'no'))


# -- Capsicum: the kernel -----------------------------------------------------

def _sysctl(values):
    def behaviour(argv):
        if argv[:2] == [capsicum.SYSCTL, '-n'] and argv[2] in values:
            return 0, values[argv[2]], ''
        if argv[:2] == ['/usr/sbin/bhyvectl', '--help']:
            return 1, '', 'Usage: bhyvectl --vm=<vmname> [--destroy]\n'
        return 1, '', "sysctl: unknown oid '%s'" % argv[-1]
    return behaviour


def test_kernel_with_capability_mode_passes():
    with fake_execute.patch(_sysctl(SYSCTL_OK)) as execute:
        assert capsicum.kernel_problems() == []
    assert fake_execute.argvs(execute) == [
        ['/sbin/sysctl', '-n', 'kern.features.security_capability_mode'],
        ['/sbin/sysctl', '-n', 'kern.features.security_capabilities']]


def test_kernel_without_capability_mode_is_named():
    with fake_execute.patch(_sysctl({})):
        problems = capsicum.kernel_problems()
    assert len(problems) == 2
    assert 'security_capability_mode' in problems[0]
    assert 'options CAPABILITY_MODE' in problems[0]
    assert 'options CAPABILITIES' in problems[1]


# -- the jail: commands -----------------------------------------------------

def _vmdir(tmp_path):
    d = base.VMDir(str(tmp_path / 'instances' / UUID))
    os.makedirs(d.path)
    return d


def _spec(vmdir, vnc=False):
    s = guest.VMSpec(
        uuid=UUID, name=NAME, vcpus=1, memory_mb=256,
        disks=[guest.Disk(path=vmdir.disk('disk'), format='raw'),
               guest.Disk(path='/dev/zvol/tank/volume-1', format='raw',
                          serial='v1'),
               guest.Disk(path=vmdir.disk('disk.config'), format='raw',
                          bus='sata', device='cdrom')],
        nics=[guest.Nic(mac='fa:16:3e:00:00:01', ifname='tap7')],
        boot=guest.Boot())
    if vnc:
        s.consoles = guest.Consoles(vnc_host='0.0.0.0', vnc_port=5901)
    return s


def _tree(tmp_path, vmdir, vnc=False):
    bootrom = tmp_path / 'BHYVE_UEFI.fd'
    bootrom.write_bytes(b'firmware')
    CONF.set_override('bhyve_bootrom', str(bootrom), group='bhyve')
    return bhyve_config.render_config(_spec(vmdir, vnc), vmdir)


def _rules(vmdir):
    rule = ['/sbin/devfs', 'rule', '-s', '64000', 'add']
    own = ['user', '64000', 'group', '64000', 'mode', '600']
    return [
        rule + ['hide'],
        rule + ['path', 'vmm', 'unhide'],
        rule + ['path', 'vmm/' + NAME, 'unhide'] + own,
        rule + ['path', 'vmm.io', 'unhide'],
        rule + ['path', 'vmm.io/%s.bootrom' % NAME, 'unhide'] + own,
        rule + ['path', 'nmdm%sA' % UUID, 'unhide'] + own,
        rule + ['path', 'zvol', 'unhide'],
        rule + ['path', 'zvol/tank', 'unhide'],
        rule + ['path', 'zvol/tank/volume-1', 'unhide'] + own,
        rule + ['path', 'tap7', 'unhide'] + own,
    ]


def _setup_commands(vmdir, network=False):
    root = os.path.join(vmdir.runtime, 'root')
    ip = 'inherit' if network else 'disable'
    return [
        ['/sbin/mount', '-t', 'nullfs', '-o', 'ro', '/', root],
        ['/sbin/mount', '-t', 'nullfs', vmdir.path, root + '/mnt'],
    ] + _rules(vmdir) + [
        ['/sbin/mount', '-t', 'devfs', 'devfs', root + '/dev'],
        ['/sbin/devfs', '-m', root + '/dev', 'ruleset', '64000'],
        ['/sbin/devfs', '-m', root + '/dev', 'rule', 'applyset'],
        ['/usr/sbin/jail', '-c', 'name=nova-' + NAME, 'path=' + root,
         'host.hostname=' + NAME, 'persist', 'allow.vmm',
         'devfs_ruleset=64000', 'enforce_statfs=2', 'children.max=0',
         'ip4=' + ip, 'ip6=' + ip],
        ['/usr/sbin/jexec', 'nova-' + NAME, BHYVECTL, '--vm=' + NAME,
         '--create'],
    ]


def _teardown_commands(vmdir, mounted=True):
    root = os.path.join(vmdir.runtime, 'root')
    umounts = [['/sbin/umount', root + '/dev'],
               ['/sbin/umount', root + '/mnt'],
               ['/sbin/umount', root]] if mounted else []
    return ([['/usr/sbin/jail', '-r', 'nova-' + NAME]] + umounts +
            [['/sbin/devfs', 'rule', '-s', '64000', 'delset']])


def test_jail_of_a_vm_exact_commands(tmp_path):
    vmdir = _vmdir(tmp_path)
    j = bhyve_jail.VMJail.for_tree(_tree(tmp_path, vmdir), vmdir, UID)
    assert j.name == 'nova-' + NAME
    assert j.setup_commands(BHYVECTL) == _setup_commands(vmdir)
    assert j.bhyve_argv('/usr/sbin/bhyve', vmdir.path + '/bhyve.conf') == [
        '/usr/sbin/jexec', 'nova-' + NAME, '/usr/sbin/chroot',
        '-u', '64000', '-g', '64000', '-G', '64000', '/',
        '/usr/sbin/bhyve', '-k', '/mnt/bhyve.conf']


def test_a_vnc_server_gives_the_jail_the_host_addresses(tmp_path):
    vmdir = _vmdir(tmp_path)
    j = bhyve_jail.VMJail.for_tree(_tree(tmp_path, vmdir, vnc=True), vmdir,
                                   UID)
    assert j.jail_argv()[-2:] == ['ip4=inherit', 'ip6=inherit']


def test_config_tree_seen_from_the_jail(tmp_path):
    vmdir = _vmdir(tmp_path)
    tree = _tree(tmp_path, vmdir)
    inside = bhyve_jail.jail_tree(tree, vmdir.path)
    changed = {k: (tree[k], v) for k, v in inside.items() if tree[k] != v}
    assert changed == {
        'pci.0.2.0.path': (vmdir.disk('disk'), '/mnt/disk'),
        'pci.0.4.0.port.0.path': (vmdir.disk('disk.config'),
                                  '/mnt/disk.config')}
    assert inside['pci.0.3.0.path'] == '/dev/zvol/tank/volume-1'
    assert list(inside) == list(tree)


def test_a_disk_outside_the_instance_directory_is_refused(tmp_path):
    vmdir = _vmdir(tmp_path)
    tree = _tree(tmp_path, vmdir)
    tree['pci.0.2.0.path'] = '/srv/nfs/volume-2'
    with pytest.raises(base.HypervisorError,
                       match='/srv/nfs/volume-2 is outside'):
        bhyve_jail.jail_tree(tree, vmdir.path)


def _fail_at(program, word):
    def behaviour(argv):
        if argv[0] == program and word in argv:
            return 1, '', '%s: it failed' % program
        return 0, '', ''
    return behaviour


def test_failed_setup_undoes_itself_and_names_the_command(tmp_path):
    vmdir = _vmdir(tmp_path)
    j = bhyve_jail.VMJail.for_tree(_tree(tmp_path, vmdir), vmdir, UID)
    with fake_execute.patch(_fail_at('/usr/sbin/jail', '-c')) as execute, \
            mock.patch('os.path.ismount', return_value=True):
        with pytest.raises(base.HypervisorError,
                           match=r'/usr/sbin/jail -c name=nova-instance-'
                                 r'0000002a .* failed \(1\): .*it failed'):
            bhyve_jail.setup(j, BHYVECTL)
    setup = _setup_commands(vmdir)
    assert fake_execute.argvs(execute) == (
        setup[:setup.index(j.jail_argv()) + 1] + _teardown_commands(vmdir))
    assert not os.path.exists(j.root)
    assert not os.path.exists(os.path.join(vmdir.path, 'jail.json'))


# -- the backend: jailed start, kill, refusals ---------------------------

@pytest.fixture
def jailed(tmp_path):
    vmdir = _vmdir(tmp_path)
    for name in ('disk', 'disk.config'):
        with open(vmdir.disk(name), 'w') as f:
            f.write('data')
    _tree(tmp_path, vmdir)                     # bootrom + option
    hv = bhyve.BhyveHypervisor()
    hv.vmm_exists = lambda name: False
    return hv, vmdir


def test_jailed_start_then_kill(jailed):
    hv, vmdir = jailed
    with fake_execute.patch() as execute, \
            mock.patch.object(supervisor, 'spawn') as spawn:
        hv.start(_spec(vmdir), vmdir)
    assert fake_execute.argvs(execute) == _setup_commands(vmdir)
    argv = spawn.call_args.args[1]
    assert argv == ['/usr/sbin/jexec', 'nova-' + NAME, '/usr/sbin/chroot',
                    '-u', '64000', '-g', '64000', '-G', '64000', '/',
                    CONF.bhyve.bhyve_path, '-k', '/mnt/bhyve.conf']
    assert spawn.call_args.args[0] == vmdir.path
    with open(hv.config_path(vmdir)) as f:
        tree = bhyve_config.parse_config(f.read())
    assert tree['pci.0.2.0.path'] == '/mnt/disk'
    assert hv.vm_name(vmdir) == NAME
    for name in ('disk', 'disk.config', 'bhyve.conf'):
        st = os.stat(os.path.join(vmdir.path, name))
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (
            UID, UID, 0o600)
    with open(os.path.join(vmdir.path, 'jail.json')) as f:
        assert json.load(f)['uid'] == UID
    assert hv.uids().lookup(hv.sandbox_name(vmdir)) == UID

    with fake_execute.patch() as execute, \
            mock.patch('os.path.ismount', return_value=True):
        hv.kill(vmdir)
    assert fake_execute.argvs(execute) == _teardown_commands(vmdir)
    assert not os.path.exists(os.path.join(vmdir.path, 'jail.json'))
    assert not os.path.exists(os.path.join(vmdir.runtime, 'root'))
    assert hv.uids().lookup(hv.sandbox_name(vmdir)) is None


def test_jailed_start_failing_leaves_nothing(jailed):
    hv, vmdir = jailed
    with fake_execute.patch(_fail_at('/usr/sbin/jexec',
                                     '--create')) as execute, \
            mock.patch.object(supervisor, 'spawn') as spawn:
        with pytest.raises(base.HypervisorError, match='--create failed'):
            hv.start(_spec(vmdir), vmdir)
    spawn.assert_not_called()
    # nothing mounted here: the teardown unmounts nothing
    assert fake_execute.argvs(execute) == (
        _setup_commands(vmdir) + _teardown_commands(vmdir, mounted=False))
    assert not os.path.exists(os.path.join(vmdir.path, 'jail.json'))
    assert hv.uids().allocated() == {}


def test_jailed_start_supervisor_failure_leaves_nothing(jailed):
    hv, vmdir = jailed
    with fake_execute.patch() as execute, \
            mock.patch.object(supervisor, 'spawn',
                              side_effect=RuntimeError('no supervisor')):
        with pytest.raises(base.HypervisorError, match='no supervisor'):
            hv.start(_spec(vmdir), vmdir)
    assert fake_execute.argvs(execute) == (
        _setup_commands(vmdir) + _teardown_commands(vmdir, mounted=False))
    assert hv.uids().allocated() == {}


def test_leftover_jail_is_removed_before_a_start(jailed):
    hv, vmdir = jailed
    with fake_execute.patch(), mock.patch.object(supervisor, 'spawn'):
        hv.start(_spec(vmdir), vmdir)       # a crash of nova-compute later
    with fake_execute.patch() as execute, \
            mock.patch.object(supervisor, 'spawn'):
        hv.start(_spec(vmdir), vmdir)
    assert fake_execute.argvs(execute) == (
        _teardown_commands(vmdir, mounted=False) + _setup_commands(vmdir))


def test_unjailed_sandbox_starts_bhyve_as_it_is(jailed):
    hv, vmdir = jailed
    CONF.set_override('sandbox_jail', False, group='bhyve')
    with fake_execute.patch() as execute, \
            mock.patch.object(supervisor, 'spawn') as spawn:
        hv.start(_spec(vmdir), vmdir)
    execute.assert_not_called()
    assert spawn.call_args.args[1] == [CONF.bhyve.bhyve_path, '-k',
                                       hv.config_path(vmdir)]


def test_suspend_and_live_migration_are_refused_in_the_jail(jailed):
    hv, vmdir = jailed
    hv._snapshot_support = True
    assert not hv.can_save()
    with pytest.raises(NotImplementedError, match='jailed bhyve'):
        hv.save(vmdir)
    assert not hv.supports_live_migration
    with pytest.raises(NotImplementedError, match='jailed bhyve'):
        hv.check_live_migration(vmdir, False, 0)


# -- check_host ---------------------------------------------------------

@pytest.fixture
def host(tmp_path):
    lib = _cc(tmp_path, 'bhyve', USES_CAP_ENTER)
    bootrom = tmp_path / 'BHYVE_UEFI.fd'
    bootrom.write_bytes(b'fw')
    CONF.set_override('bhyve_path', lib, group='bhyve')
    CONF.set_override('bhyve_bootrom', str(bootrom), group='bhyve')
    with mock.patch.object(bhyve_jail, 'ROOT', str(tmp_path)):
        yield bhyve.BhyveHypervisor()


def test_check_host_passes_on_a_capable_host(host):
    with fake_execute.patch(_sysctl(SYSCTL_OK)) as execute:
        host.check_host()
    assert fake_execute.argvs(execute) == [
        ['/sbin/sysctl', '-n', 'kern.features.security_capability_mode'],
        ['/sbin/sysctl', '-n', 'kern.features.security_capabilities'],
        ['/sbin/sysctl', '-n', 'security.jail.param.allow.vmm'],
        ['/usr/sbin/bhyvectl', '--help']]


def test_check_host_names_every_problem(host, tmp_path):
    CONF.set_override('bhyve_path', _cc(tmp_path, 'plain', NO_CAPSICUM),
                      group='bhyve')
    CONF.set_override('sandbox_uid_range', '64000-70000', group='bhyve')
    host = bhyve.BhyveHypervisor()
    with fake_execute.patch(_sysctl({})):
        with pytest.raises(base.HypervisorError) as e:
            host.check_host()
    msg = str(e.value)
    for what in ('security_capability_mode', 'security_capabilities',
                 'WITHOUT_CAPSICUM', 'goes past 65535', 'allow.vmm',
                 '[bhyve] sandbox = false'):
        assert what in msg


def test_check_host_refuses_files_outside_the_root_view(host):
    CONF.set_override('bhyve_bootrom', '/proc/version', group='bhyve')
    with fake_execute.patch(_sysctl(SYSCTL_OK)):
        with pytest.raises(base.HypervisorError,
                           match='/proc/version is not on the root file '
                                 'system'):
            host.check_host()


def test_check_host_refuses_a_snapshot_build_in_the_jail(host):
    def behaviour(argv):
        if argv[1] == '--help':
            return 1, '', 'Usage: bhyvectl [--suspend=<filename>]\n'
        return _sysctl(SYSCTL_OK)(argv)
    with fake_execute.patch(behaviour):
        with pytest.raises(base.HypervisorError, match='BHYVE_SNAPSHOT'):
            host.check_host()


def test_sandbox_off_is_a_warning_and_checks_nothing(host, caplog):
    CONF.set_override('sandbox', False, group='bhyve')
    with fake_execute.patch() as execute, \
            caplog.at_level(logging.WARNING):
        host.check_host()
    execute.assert_not_called()
    assert '[bhyve] sandbox is off' in caplog.text


def test_capsicum_alone_without_the_jail_is_a_warning(host, caplog):
    CONF.set_override('sandbox_jail', False, group='bhyve')
    with fake_execute.patch(_sysctl(SYSCTL_OK)) as execute, \
            caplog.at_level(logging.WARNING):
        host.check_host()
    assert len(fake_execute.argvs(execute)) == 2      # the kernel only
    assert 'Capsicum capability mode is its only sandbox' in caplog.text
