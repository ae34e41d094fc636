"""The devstack plugin (devstack/): syntax, and what each phase does.

Each phase is a real bash run of devstack/settings and devstack/plugin.sh,
sourced the way stack.sh / unstack.sh / clean.sh source them (``source
plugin.sh stack post-config``), with devstack's functions (iniset,
is_service_enabled, pip_install, install_package, ...) and sudo replaced by
recorders; the test asserts on the recorded calls. The shell runs with
errexit, nounset and pipefail, stricter than devstack itself.
"""
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
DEVSTACK = os.path.join(REPO, 'devstack')
PLUGIN = os.path.join(DEVSTACK, 'plugin.sh')
SETTINGS = os.path.join(DEVSTACK, 'settings')
OVERRIDE = os.path.join(DEVSTACK, 'override-defaults')
BASH = shutil.which('bash')

pytestmark = pytest.mark.skipif(BASH is None, reason='bash is not installed')

STUBS = r'''
set -o errexit -o nounset -o pipefail
_rec() { printf '%s\n' "$*" >> "$CALLS"; }
iniset() { _rec iniset "$@"; }
is_service_enabled() {
    local s; for s in "$@"; do
        [[ ",$ENABLED_SERVICES," == *",$s,"* ]] && return 0
    done; return 1; }
enable_service() { _rec enable_service "$@"; ENABLED_SERVICES+=",$*"; }
pip_install() { _rec pip_install "$@"; }
pip_uninstall() { _rec pip_uninstall "$@"; }
install_package() { _rec install_package "$@"; }
echo_summary() { :; }
is_ubuntu() { return 0; }
is_fedora() { return 1; }
die() { _rec die "$@"; exit 1; }
kldstat() { _rec kldstat "$@"; return 1; }
sudo() {
    _rec sudo "$@"
    # run file installs (into the fake nova tree), never anything else
    if [[ "$1" == install ]]; then "$@"; fi
}
# the python nova-compute would use: knows where nova.virt is and whether
# nova.virt.bhyve imports (the shim file exists in the fake nova tree)
fake_python() {
    _rec python "$@"
    case "$2" in
        *'import nova.virt.bhyve'*)
            [[ -f "$FAKE_NOVA_VIRT/bhyve/__init__.py" ]] ;;
        *'nova.virt.__file__'*) echo "$FAKE_NOVA_VIRT" ;;
        *) return 2 ;;
    esac
}
NOVA_BHYVE_PYTHON=fake_python
'''


def _run(tmp_path, phase, env=None, settings=True, pre=''):
    """Source settings (as devstack does) and plugin.sh with ``phase``;
    returns (recorded calls as lists of words, stdout)."""
    calls = tmp_path / 'calls'
    calls.write_text('')
    fake_virt = tmp_path / 'nova' / 'virt'
    fake_virt.mkdir(parents=True, exist_ok=True)
    base = {
        'PATH': os.environ.get('PATH', '/usr/bin:/bin'),
        'CALLS': str(calls),
        'FAKE_NOVA_VIRT': str(fake_virt),
        'NOVA_CONF': '/etc/nova/nova.conf',
        'VIRT_DRIVER': 'bhyve',
        'ENABLED_SERVICES': 'key,n-api,n-cpu,placement-api',
        'NOVA_BHYVE_OS': 'Linux',
    }
    base.update(env or {})
    base = {k: v for k, v in base.items() if v is not None}
    script = STUBS + pre
    if settings:
        script += 'source %s\n' % shlex.quote(SETTINGS)
    script += 'source %s %s\n' % (shlex.quote(PLUGIN), phase)
    proc = subprocess.run([BASH, '-c', script], env=base, cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=60)
    assert proc.returncode == 0, 'bash failed (%d):\n%s\n%s' % (
        proc.returncode, proc.stdout, proc.stderr)
    recorded = [line.split() for line in calls.read_text().splitlines()]
    return recorded, proc.stdout


def _named(calls, name):
    return [c[1:] for c in calls if c[0] == name]


@pytest.mark.parametrize('path', [PLUGIN, SETTINGS, OVERRIDE])
def test_bash_syntax(path):
    proc = subprocess.run([BASH, '-n', path], stderr=subprocess.PIPE,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def test_post_config_sets_compute_driver_and_bhyve_options(tmp_path):
    calls, _ = _run(tmp_path, 'stack post-config')
    inisets = _named(calls, 'iniset')
    assert ['/etc/nova/nova.conf', 'DEFAULT', 'compute_driver',
            'bhyve.BhyveDriver'] in inisets
    # settings' defaults
    assert ['/etc/nova/nova.conf', 'bhyve', 'hypervisor', 'auto'] in inisets
    assert ['/etc/nova/nova.conf', 'bhyve', 'qemu_accel', 'auto'] in inisets
    assert not [i for i in inisets if i[2] in ('qemu_binary',
                                               'bhyve_bootrom')]
    # configuring installs nothing
    assert not _named(calls, 'pip_install')
    assert not _named(calls, 'install_package')


def test_post_config_passes_devstack_variables(tmp_path):
    calls, _ = _run(tmp_path, 'stack post-config', env={
        'NOVA_CONF': '/etc/nova/other.conf',
        'BHYVE_HYPERVISOR': 'qemu', 'BHYVE_QEMU_ACCEL': 'tcg',
        'BHYVE_QEMU_BINARY': '/usr/local/bin/qemu-system-x86_64',
        'BHYVE_BOOTROM': '/fw/BHYVE.fd',
        'BHYVE_COLD_MIGRATE_TO_SAME_HOST': 'True'})
    assert sorted(_named(calls, 'iniset')) == sorted([
        ['/etc/nova/other.conf', 'bhyve', 'cold_migrate_to_same_host',
         'True'],
        ['/etc/nova/other.conf', 'DEFAULT', 'compute_driver',
         'bhyve.BhyveDriver'],
        ['/etc/nova/other.conf', 'bhyve', 'hypervisor', 'qemu'],
        ['/etc/nova/other.conf', 'bhyve', 'qemu_accel', 'tcg'],
        ['/etc/nova/other.conf', 'bhyve', 'qemu_binary',
         '/usr/local/bin/qemu-system-x86_64'],
        ['/etc/nova/other.conf', 'bhyve', 'bhyve_bootrom', '/fw/BHYVE.fd'],
    ])


def test_install_pip_installs_repo_and_qemu_and_places_shim(tmp_path):
    calls, _ = _run(tmp_path, 'stack install')
    assert _named(calls, 'pip_install') == [[REPO]]
    packages = [p for c in _named(calls, 'install_package') for p in c]
    assert 'qemu-system-x86' in packages and 'qemu-utils' in packages
    assert not _named(calls, 'iniset')
    # nova.virt.bhyve did not import (Nova is an editable checkout): the shim
    # is copied into the nova tree the python imports, and then imports
    shim = tmp_path / 'nova' / 'virt' / 'bhyve' / '__init__.py'
    with open(os.path.join(REPO, 'nova', 'virt', 'bhyve', '__init__.py')) as f:
        assert shim.read_text() == f.read()
    assert not _named(calls, 'die')


def test_install_leaves_an_installed_shim_alone(tmp_path):
    shim = tmp_path / 'nova' / 'virt' / 'bhyve' / '__init__.py'
    shim.parent.mkdir(parents=True)
    shim.write_text('# installed by pip\n')
    calls, _ = _run(tmp_path, 'stack install')
    assert _named(calls, 'pip_install') == [[REPO]]
    assert not _named(calls, 'sudo')
    assert shim.read_text() == '# installed by pip\n'


@pytest.mark.parametrize('env', [
    {'VIRT_DRIVER': 'libvirt'},
    {'ENABLED_SERVICES': 'key,n-api,placement-api'},
])
@pytest.mark.parametrize('phase', ['stack install', 'stack post-config',
                                   'unstack', 'clean'])
def test_does_nothing_unless_bhyve_compute_node(tmp_path, env, phase):
    calls, _ = _run(tmp_path, phase, env=env, settings=False)
    assert calls == []


def test_other_phases_do_nothing(tmp_path):
    for phase in ('stack pre-install', 'stack extra', 'stack test-config',
                  'unstack'):
        calls, _ = _run(tmp_path, phase)
        assert [c for c in calls if c[0] != 'enable_service'] == [], phase


def test_settings_enable_n_cpu_only_for_virt_driver_bhyve(tmp_path):
    calls, _ = _run(tmp_path, 'unstack',
                    env={'ENABLED_SERVICES': 'key,n-api'})
    assert _named(calls, 'enable_service') == [['n-cpu']]
    calls, _ = _run(tmp_path, 'unstack',
                    env={'ENABLED_SERVICES': 'key,n-api',
                         'VIRT_DRIVER': 'libvirt'})
    assert calls == []


@pytest.mark.parametrize('given,expected', [(None, 'bhyve'),
                                            ('libvirt', 'libvirt')])
def test_override_defaults_makes_bhyve_the_default(given, expected):
    env = {'PATH': os.environ.get('PATH', '/usr/bin:/bin')}
    if given:
        env['VIRT_DRIVER'] = given
    out = subprocess.run(
        [BASH, '-c', 'set -u; source %s; echo "$VIRT_DRIVER"'
         % shlex.quote(OVERRIDE)],
        env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    assert out.strip() == expected


def test_clean_stops_only_this_instances_vms_and_uninstalls(tmp_path):
    instances = tmp_path / 'instances'
    mine = instances / 'aaaa-vm'
    other = instances / 'bbbb-vm'
    mine.mkdir(parents=True)
    other.mkdir()
    # a process whose command line names its instance directory, as VM
    # processes do, and a pid file pointing at an unrelated process
    vm = subprocess.Popen([sys.executable, '-c',
                           'import time; time.sleep(60)', str(mine)])
    try:
        (mine / 'vm.pid').write_text('%d\n' % vm.pid)
        (other / 'vm.pid').write_text('%d\n' % os.getpid())
        shim = tmp_path / 'nova' / 'virt' / 'bhyve' / '__init__.py'
        shim.parent.mkdir(parents=True)
        shim.write_text('')
        time.sleep(0.1)
        calls, _ = _run(tmp_path, 'clean',
                        env={'NOVA_INSTANCES_PATH': str(instances)})
    finally:
        vm.kill()
        vm.wait()
    sudo = _named(calls, 'sudo')
    assert ['kill', '-TERM', str(vm.pid)] in sudo
    assert ['kill', '-TERM', str(os.getpid())] not in sudo
    assert _named(calls, 'pip_uninstall') == [['nova-bhyve']]
    assert ['rm', '-rf', str(tmp_path / 'nova' / 'virt' / 'bhyve')] in sudo


def test_freebsd_reports_vmm_and_firmware_instead_of_installing(tmp_path):
    calls, out = _run(tmp_path, 'stack install', env={
        'NOVA_BHYVE_OS': 'FreeBSD',
        'BHYVE_BOOTROM': str(tmp_path / 'missing.fd')})
    assert not _named(calls, 'install_package')
    assert 'kernel module vmm is not loaded' in out
    assert 'kldload vmm' in out
    assert 'pkg install bhyve-firmware' in out
    assert _named(calls, 'pip_install') == [[REPO]]


def test_post_config_writes_what_tools_cloud_gives_nova_compute(tmp_path):
    """devstack and tools/cloud configure nova-compute for this driver the
    same way: the options the plugin writes on its defaults are exactly
    the driver options of the cloud's nova-computes."""
    sys.path.insert(0, os.path.join(REPO, 'tools'))
    try:
        from allinone import configs
    finally:
        sys.path.remove(os.path.join(REPO, 'tools'))
    calls, _ = _run(tmp_path, 'stack post-config')
    written = {(section, key): value
               for _, section, key, value in _named(calls, 'iniset')}
    assert written == configs.DRIVER_OPTIONS
    for host in ('compute1', 'compute2'):
        options = configs.compute_options(host)
        for (section, key), value in written.items():
            assert options[section][key] == value
        # and nothing else of the driver's own section but the cloud's
        # runtime directory (apart from the test suite's)
        assert set(options['bhyve']) == {
            k for s, k in written if s == 'bhyve'} | {'runtime_path'}
