"""The OpenStack services: database schemas, the APIs under uwsgi, and the
other daemons, started in dependency order."""
import os
import urllib.error
import urllib.request

from allinone import configs
from allinone import infra
from allinone import layout
from allinone import procs

# name -> (WSGI module, environment telling it where its configuration is)
APIS = {
    'keystone': ('keystone.wsgi.api',
                 {'OS_KEYSTONE_CONFIG_DIR': layout.etc('keystone')}),
    'glance': ('glance.wsgi.api',
               {'OS_GLANCE_CONFIG_DIR': layout.etc('glance')}),
    'placement': ('placement.wsgi.api',
                  {'OS_PLACEMENT_CONFIG_DIR': layout.etc('placement')}),
    'neutron': ('neutron.wsgi.api',
                {'OS_NEUTRON_CONFIG_DIR': layout.etc('neutron'),
                 'OS_NEUTRON_CONFIG_FILES': 'neutron.conf;ml2_conf.ini'}),
    'nova': ('nova.wsgi.osapi_compute',
             {'OS_NOVA_CONFIG_DIR': layout.etc('nova'),
              'OS_NOVA_CONFIG_FILES': 'api-paste.ini;nova.conf'}),
}


def _manage(tool, *args, what=None):
    return procs.run([layout.venv_bin(tool)] + list(args),
                     what or '%s %s' % (tool, ' '.join(args[-2:])))


def sync_databases():
    _manage('keystone-manage', '--config-file',
            layout.etc('keystone', 'keystone.conf'), 'db_sync')
    for repo, command in (('fernet-keys', 'fernet_setup'),
                          ('credential-keys', 'credential_setup')):
        if not os.path.exists(layout.etc('keystone', repo, '0')):
            _manage('keystone-manage', '--config-file',
                    layout.etc('keystone', 'keystone.conf'), command,
                    '--keystone-user', 'root', '--keystone-group', 'root')
    _manage('glance-manage', '--config-file',
            layout.etc('glance', 'glance-api.conf'), 'db_sync')
    _manage('placement-manage', '--config-file',
            layout.etc('placement', 'placement.conf'), 'db', 'sync')
    _manage('neutron-db-manage', '--config-file',
            layout.etc('neutron', 'neutron.conf'), '--config-file',
            layout.etc('neutron', 'ml2_conf.ini'), 'upgrade', 'heads')
    nova_conf = ['--config-file', layout.etc('nova', 'nova.conf')]
    _manage('nova-manage', *nova_conf, 'api_db', 'sync')
    _manage('nova-manage', *nova_conf, 'cell_v2', 'map_cell0',
            '--database_connection', infra.db_url('nova_cell0'))
    cells = _manage('nova-manage', *nova_conf, 'cell_v2', 'list_cells')
    if ' cell1 ' not in cells:
        _manage('nova-manage', *nova_conf, 'cell_v2', 'create_cell',
                '--name', 'cell1', '--database_connection',
                infra.db_url('nova'), '--transport-url',
                infra.transport_url())
    _manage('nova-manage', *nova_conf, 'db', 'sync')


def api_up(service):
    try:
        with urllib.request.urlopen('http://%s:%d/' % (
                layout.HOST, layout.API_PORTS[service]), timeout=5):
            return True
    except urllib.error.HTTPError as e:
        return e.code < 500     # 300 (versions) and 401 are answers
    except OSError:
        return False


def start_api(service):
    module, env = APIS[service]
    argv = [
        layout.venv_bin('uwsgi'),
        '--http-socket', '%s:%d' % (layout.HOST, layout.API_PORTS[service]),
        '--module', module, '--callable', 'application',
        '--home', layout.VENV, '--master', '--processes', '2',
        '--threads', '1', '--lazy-apps', '--die-on-term', '--need-app',
        '--enable-threads', '--thunder-lock', '--buffer-size', '65535',
        # without it connections between services get reset
        '--add-header', 'Connection: close',
        '--hook-master-start', 'unix_signal:15 gracefully_kill_them_all',
        '--procname-prefix', 'nbcloud-%s-' % service,
    ]
    if service == 'glance':
        # image uploads come chunked; a large one takes time
        argv += ['--chunked-input-limit', str(64 * 1024 * 1024),
                 '--http-raw-body', '--socket-timeout', '600',
                 '--http-timeout', '600']
    for key, value in env.items():
        argv += ['--env', '%s=%s' % (key, value)]
    procs.start('%s-api' % service, argv)
    procs.wait_for('%s-api' % service, lambda: api_up(service),
                   '%s API on port %d' % (service,
                                          layout.API_PORTS[service]),
                   timeout=180)


def _nova_daemon(name, binary, conf=None):
    os.makedirs(layout.path('nova'), exist_ok=True)
    procs.start(name, [layout.venv_bin(binary), '--config-file',
                       conf or layout.etc('nova', 'nova.conf')])


def start_neutron_workers():
    conf = ['--config-file', layout.etc('neutron', 'neutron.conf'),
            '--config-file', layout.etc('neutron', 'ml2_conf.ini')]
    procs.start('neutron-rpc-server',
                [layout.venv_bin('neutron-rpc-server')] + conf)
    procs.start('neutron-periodic-workers',
                [layout.venv_bin('neutron-periodic-workers')] + conf)


def start_nova():
    _nova_daemon('nova-conductor', 'nova-conductor')
    _nova_daemon('nova-scheduler', 'nova-scheduler')
    for host in layout.COMPUTES:
        os.makedirs(configs.instances_path(host), exist_ok=True)
        os.makedirs(layout.path(host, 'state'), exist_ok=True)
        _nova_daemon('nova-compute-%s' % host, 'nova-compute',
                     configs.compute_conf(host))


def discover_hosts():
    return _manage('nova-manage', '--config-file',
                   layout.etc('nova', 'nova.conf'), 'cell_v2',
                   'discover_hosts', '--verbose')
