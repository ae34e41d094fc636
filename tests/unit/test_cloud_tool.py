"""tools/cloud (tools/allinone): the configuration it writes and how it
starts and stops daemons. The cloud itself runs in tools/run-tests (tools/
cloud up, tempest's smoke set, tools/cloud down)."""
import configparser
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, 'tools'))
from allinone import configs  # noqa: E402
from allinone import layout  # noqa: E402
from allinone import procs  # noqa: E402
from allinone import results  # noqa: E402
from allinone import tempest  # noqa: E402

sys.path.remove(os.path.join(REPO, 'tools'))


@pytest.fixture
def cloud_dir(tmp_path, monkeypatch):
    """A cloud directory and a venv holding the paste files the services'
    wheels install (their content does not matter here)."""
    venv = tmp_path / 'venv'
    for service, name in (('nova', 'api-paste.ini'),
                          ('neutron', 'api-paste.ini'),
                          ('glance', 'glance-api-paste.ini')):
        (venv / 'etc' / service).mkdir(parents=True, exist_ok=True)
        (venv / 'etc' / service / name).write_text('[pipeline:x]\n')
    monkeypatch.setattr(layout, 'BASE', str(tmp_path / 'cloud'))
    monkeypatch.setattr(layout, 'VENV', str(venv))
    return tmp_path / 'cloud'


def _ini(path):
    parser = configparser.RawConfigParser()
    assert parser.read(path), path
    return parser


def test_each_compute_has_its_own_host_paths_and_no_database(cloud_dir):
    configs.write_all()
    seen = set()
    for host in layout.COMPUTES:
        conf = _ini(configs.compute_conf(host))
        assert conf.get('DEFAULT', 'host') == host
        own = (conf.get('DEFAULT', 'state_path'),
               conf.get('DEFAULT', 'instances_path'))
        assert not seen & set(own)
        seen |= set(own)
        # nova-compute reaches the databases through the conductor only
        assert not conf.has_section('database')
        assert not conf.has_section('api_database')
        assert conf.get('DEFAULT', 'compute_driver') == 'bhyve.BhyveDriver'
        assert conf.getboolean('compute', 'vif_plugging_is_fatal')
        # root already: privsep daemons started directly, never via sudo
        for context in configs.PRIVSEP_CONTEXTS:
            helper = conf.get(context, 'helper_command')
            assert helper.startswith(layout.venv_bin('privsep-helper'))
            assert configs.compute_conf(host) in helper


def test_services_share_one_bus_one_ovsdb_and_the_service_users(cloud_dir):
    configs.write_all()
    nova = _ini(layout.etc('nova', 'nova.conf'))
    neutron = _ini(layout.etc('neutron', 'neutron.conf'))
    ml2 = _ini(layout.etc('neutron', 'ml2_conf.ini'))
    compute = _ini(configs.compute_conf(layout.COMPUTES[0]))
    assert nova.get('DEFAULT', 'transport_url') == \
        neutron.get('DEFAULT', 'transport_url') == \
        compute.get('DEFAULT', 'transport_url')
    # the ports the computes plug are the ports the binder watches
    assert ml2.get('ovs_binder', 'ovsdb_connection') == \
        compute.get('os_vif_ovs', 'ovsdb_connection') == layout.ovsdb()
    assert ml2.get('ml2', 'mechanism_drivers') == configs.MECHANISM_DRIVER
    # neutron tells nova about port status; nova sends service tokens
    assert neutron.getboolean('DEFAULT',
                              'notify_nova_on_port_status_changes')
    assert neutron.get('nova', 'username') == 'nova'
    assert nova.getboolean('service_user', 'send_service_user_token')
    for conf in (nova, neutron):
        assert conf.get('keystone_authtoken', 'auth_url') == \
            layout.url('keystone')


def test_every_api_listens_on_loopback_only():
    for service in layout.API_PORTS:
        assert layout.url(service).startswith('http://127.0.0.1:')


# -- daemons ----------------------------------------------------------------

def test_a_daemon_is_stopped_by_pid_with_its_process_group(cloud_dir):
    os.makedirs(str(cloud_dir))
    pid = procs.start('sleeper', ['sh', '-c', 'sleep 300 & sleep 300'])
    assert procs.pid_of('sleeper') == pid
    assert procs.start('sleeper', ['false']) == pid     # already running
    time.sleep(0.3)
    group = subprocess.run(['pgrep', '-g', str(pid)], capture_output=True,
                           text=True).stdout.split()
    assert len(group) == 3                               # sh + two sleeps
    assert procs.names() == ['sleeper']
    assert procs.stop('sleeper', timeout=5)
    for member in group:
        assert not os.path.exists('/proc/%s' % member) or \
            open('/proc/%s/stat' % member).read().split(') ')[1][0] == 'Z'
    assert procs.pid_of('sleeper') is None
    assert procs.names() == []


def test_a_reused_pid_is_never_signalled(cloud_dir):
    """The pid file names a PID now held by another process (started
    later): pid_of says it is gone, stop leaves that process alone."""
    os.makedirs(str(cloud_dir / 'run'))
    other = subprocess.Popen(['sleep', '300'])
    try:
        with open(layout.run('ghost.pid'), 'w') as f:
            f.write('%d 1\n' % other.pid)         # a different start time
        assert procs.pid_of('ghost') is None
        assert not procs.stop('ghost')
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_daemon_that_exits_fails_the_wait_with_its_log(cloud_dir):
    os.makedirs(str(cloud_dir))
    procs.start('dies', ['sh', '-c', 'echo port 1 is taken; exit 3'])
    with pytest.raises(procs.CloudError) as e:
        procs.wait_for('dies', lambda: False, 'its port', timeout=30)
    assert 'port 1 is taken' in str(e.value)
    procs.stop('dies')


# -- tempest's results ------------------------------------------------------

CONSOLE = [
    '{1} setUpClass (tempest.api.compute.servers.test_create_server.'
    'ServersTestBootFromVolume) ... SKIPPED: Volume service not enabled.',
    '{1} tempest.api.compute.test_versions.TestVersions.'
    'test_list_api_versions [0.013565s] ... ok',
    '{0} tempest.api.compute.admin.test_servers.ServersAdminTestJSON.'
    'test_reset_state [3.5s] ... FAILED',
    'Captured traceback: ... ok',
    '{0} tempest.api.compute.servers.test_a.A.test_b [1.0s] ... ok',
]


def test_console_lines_become_a_summary_and_a_comparison():
    tests = results.parse(CONSOLE)
    assert results.summary(tests) == {'ran': 4, 'passed': 2, 'failed': 1,
                                      'skipped': 1}
    assert tests['tempest.api.compute.servers.test_create_server.'
                 'ServersTestBootFromVolume'] == {
        'status': 'skipped', 'reason': 'Volume service not enabled.'}
    fake = {t: {'status': 'passed', 'reason': ''} for t in tests}
    fake['tempest.api.compute.extra.X.test_y'] = {'status': 'passed',
                                                  'reason': ''}
    gaps = results.compare(tests, fake)
    assert sorted(gaps) == [
        'tempest.api.compute.admin.test_servers.ServersAdminTestJSON.'
        'test_reset_state',
        'tempest.api.compute.extra.X.test_y',
        'tempest.api.compute.servers.test_create_server.'
        'ServersTestBootFromVolume']
    assert gaps['tempest.api.compute.extra.X.test_y']['status'] == 'not run'


def test_only_skips_this_config_explains_pass_the_smoke_set():
    tests = results.parse(CONSOLE + [
        '{0} setUpClass (tempest.api.compute.servers.test_attach_interfaces.'
        'AttachInterfacesUnderV243Test) ... SKIPPED: Validation should be '
        'enabled to ensure guest OS is running and capable of processing '
        'ACPI events.',
        '{0} setUpClass (tempest.api.compute.servers.test_server_rescue.'
        'ServerRescueTestJSON) ... SKIPPED: Server rescue not available.',
    ])
    assert tempest.unexpected_skips(tests) == [(
        'tempest.api.compute.servers.test_server_rescue.ServerRescueTestJSON',
        'Server rescue not available.')]
