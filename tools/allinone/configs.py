"""The services' configuration files, written from the layout.

Every file is generated whole on each ``up`` (no hand edits survive): the
cloud is a fixture, and its settings live here, in one place.
"""
import configparser
import os
import shutil

from allinone import infra
from allinone import layout

# what nova-compute is told about this driver; devstack/plugin.sh writes the
# same (tests/unit/test_cloud_config.py compares them)
DRIVER_OPTIONS = {
    ('DEFAULT', 'compute_driver'): 'bhyve.BhyveDriver',
    ('bhyve', 'hypervisor'): 'auto',
    ('bhyve', 'qemu_accel'): 'auto',
    # two computes and tempest: a cold migration must move
    ('bhyve', 'cold_migrate_to_same_host'): 'False',
}

FLAT_NETWORK = 'physnet1'
# Nova's default filters plus those tempest's scheduler hint tests use (as
# devstack enables them)
SCHEDULER_FILTERS = ('ComputeFilter,ComputeCapabilitiesFilter,'
                     'ImagePropertiesFilter,ServerGroupAntiAffinityFilter,'
                     'ServerGroupAffinityFilter,SameHostFilter,'
                     'DifferentHostFilter')
PRIVSEP_CONTEXTS = ('privsep', 'vif_plug_ovs_privileged',
                    'vif_plug_linux_bridge_privileged',
                    'nova_bhyve_privileged')
MECHANISM_DRIVER = 'bhyve_ovs'


def write_ini(path, sections):
    parser = configparser.RawConfigParser()
    parser.optionxform = str
    for section, options in sections.items():
        if section != 'DEFAULT':
            parser.add_section(section)
        for key, value in options.items():
            if isinstance(value, bool):
                value = 'true' if value else 'false'
            parser.set(section, key, str(value))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        parser.write(f)
    os.replace(path + '.tmp', path)


def service_auth(user):
    """keystoneauth password options for a service user (project
    'service')."""
    return {
        'auth_type': 'password',
        'auth_url': layout.url('keystone'),
        'username': user,
        'password': layout.PASSWORD,
        'project_name': 'service',
        'user_domain_name': 'Default',
        'project_domain_name': 'Default',
        'region_name': layout.REGION,
    }


def authtoken(user):
    opts = service_auth(user)
    opts.update({'www_authenticate_uri': layout.url('keystone'),
                 'service_token_roles_required': True})
    return opts


def _paste(service, name):
    """A copy of the paste file the service's wheel installed."""
    src = os.path.join(layout.VENV, 'etc', service, name)
    dst = layout.etc(service, name)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def keystone():
    write_ini(layout.etc('keystone', 'keystone.conf'), {
        'DEFAULT': {'debug': False},
        'database': {'connection': infra.db_url('keystone')},
        'token': {'provider': 'fernet'},
        'fernet_tokens': {'key_repository':
                          layout.etc('keystone', 'fernet-keys')},
        'credential': {'key_repository':
                       layout.etc('keystone', 'credential-keys')},
        'cache': {'enabled': False},
    })


def glance():
    _paste('glance', 'glance-api-paste.ini')
    write_ini(layout.etc('glance', 'glance-api.conf'), {
        'DEFAULT': {'enabled_backends': 'local:file',
                    'worker_self_reference_url': layout.url('glance'),
                    'public_endpoint': layout.url('glance')},
        'glance_store': {'default_backend': 'local'},
        'local': {'filesystem_store_datadir': layout.path('glance',
                                                          'images')},
        'os_glance_staging_store': {
            'filesystem_store_datadir': layout.path('glance', 'staging')},
        'os_glance_tasks_store': {
            'filesystem_store_datadir': layout.path('glance', 'tasks')},
        'database': {'connection': infra.db_url('glance')},
        'keystone_authtoken': authtoken('glance'),
        'paste_deploy': {'flavor': 'keystone', 'config_file':
                         layout.etc('glance', 'glance-api-paste.ini')},
        'oslo_concurrency': {'lock_path': layout.path('lock', 'glance')},
    })


def placement():
    write_ini(layout.etc('placement', 'placement.conf'), {
        'api': {'auth_strategy': 'keystone'},
        'placement_database': {'connection': infra.db_url('placement')},
        'keystone_authtoken': authtoken('placement'),
    })


def neutron():
    write_ini(layout.etc('neutron', 'neutron.conf'), {
        'DEFAULT': {
            'core_plugin': 'ml2', 'service_plugins': '',
            'auth_strategy': 'keystone',
            'transport_url': infra.transport_url(),
            'api_paste_config': _paste('neutron', 'api-paste.ini'),
            'notify_nova_on_port_status_changes': True,
            'notify_nova_on_port_data_changes': True,
            'api_workers': 2, 'rpc_workers': 1, 'rpc_state_report_workers': 0,
            'state_path': layout.path('neutron'),
        },
        'database': {'connection': infra.db_url('neutron')},
        'keystone_authtoken': authtoken('neutron'),
        'nova': service_auth('nova'),
        'oslo_concurrency': {'lock_path': layout.path('lock', 'neutron')},
    })
    write_ini(layout.etc('neutron', 'ml2_conf.ini'), {
        'ml2': {'type_drivers': 'flat,vxlan',
                'tenant_network_types': 'vxlan',
                'mechanism_drivers': MECHANISM_DRIVER,
                'extension_drivers': 'port_security'},
        'ml2_type_flat': {'flat_networks': FLAT_NETWORK},
        'ml2_type_vxlan': {'vni_ranges': '1:1000'},
        'ovs_binder': {'ovsdb_connection': layout.ovsdb(),
                       'bridge_name': layout.BRIDGE},
    })


def nova(compute_driver=None):
    _paste('nova', 'api-paste.ini')
    common = {
        'DEFAULT': {
            'transport_url': infra.transport_url(),
            'my_ip': layout.HOST,
            'state_path': layout.path('nova'),
            'use_rootwrap_daemon': False,
        },
        'api': {'auth_strategy': 'keystone'},
        'api_database': {'connection': infra.db_url('nova_api')},
        'database': {'connection': infra.db_url('nova')},
        'keystone_authtoken': authtoken('nova'),
        'service_user': dict(service_auth('nova'),
                             send_service_user_token=True),
        'placement': service_auth('placement'),
        'neutron': service_auth('neutron'),
        'glance': {'region_name': layout.REGION},
        'scheduler': {'discover_hosts_in_cells_interval': 5,
                      'workers': 1},
        'filter_scheduler': {'enabled_filters': SCHEDULER_FILTERS},
        'conductor': {'workers': 1},
        'wsgi': {'api_paste_config': layout.etc('nova', 'api-paste.ini')},
        'oslo_concurrency': {'lock_path': layout.path('lock', 'nova')},
        'vnc': {'enabled': False},
        'os_vif_ovs': {'ovsdb_connection': layout.ovsdb()},
        'compute': {'vif_plugging_is_fatal': True},
    }
    common['DEFAULT']['vif_plugging_timeout'] = 120
    write_ini(layout.etc('nova', 'nova.conf'), common)
    # nova-compute reads only its own file (as devstack's nova-cpu.conf):
    # no database connections, its host name, paths and this driver
    compute = {k: dict(v) for k, v in common.items()
               if k not in ('database', 'api_database', 'keystone_authtoken',
                            'api', 'wsgi', 'scheduler', 'conductor',
                            'filter_scheduler')}
    for host in layout.COMPUTES:
        sections = {k: dict(v) for k, v in compute.items()}
        for section, options in compute_options(host,
                                                compute_driver).items():
            sections.setdefault(section, {}).update(options)
        # nova-compute runs as root here: its privsep daemons are started
        # directly, not through sudo and rootwrap
        helper = '%s --config-file %s' % (layout.venv_bin('privsep-helper'),
                                          compute_conf(host))
        for context in PRIVSEP_CONTEXTS:
            sections[context] = {'helper_command': helper}
        write_ini(compute_conf(host), sections)


def compute_conf(host):
    return layout.etc('nova', '%s.conf' % host)


def compute_options(host, compute_driver=None):
    """What one nova-compute adds to nova.conf: its host name, instances
    path, and this driver (or ``compute_driver``: Nova's fake driver for
    docs/tempest.md's comparison)."""
    # its own state_path: nova keeps the node's identity (compute_id) there
    sections = {'DEFAULT': {'host': host,
                            'state_path': layout.path(host, 'state'),
                            'instances_path': instances_path(host)}}
    for (section, key), value in DRIVER_OPTIONS.items():
        sections.setdefault(section, {})[key] = value
    sections['bhyve']['runtime_path'] = layout.RUNTIME
    if compute_driver:
        sections['DEFAULT']['compute_driver'] = compute_driver
    return sections


def compute_driver():
    """The compute driver the running cloud's computes were given."""
    conf = configparser.RawConfigParser()
    conf.read(compute_conf(layout.COMPUTES[0]))
    return conf.get('DEFAULT', 'compute_driver', fallback=None)


def instances_path(host):
    return layout.path(host, 'instances')


def write_all(compute_driver=None):
    keystone()
    glance()
    placement()
    neutron()
    nova(compute_driver)
