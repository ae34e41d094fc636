"""Tempest against the cloud: a tempest.conf that says what this driver
does (docs/support-matrix.md), then a named set of tests.

Sets: ``smoke`` - the compute API tests tagged smoke (CI runs it);
``broad`` - tempest.api.compute as a whole (docs/tempest.md); anything else
is taken as tempest regexes.
"""
import os
import re
import subprocess
import sys
import time

from allinone import bootstrap
from allinone import configs
from allinone import layout
from allinone import procs
from allinone import results

SETS = {
    'smoke': [r'^tempest\.api\.compute\..*\[.*\bsmoke\b.*\]'],
    'broad': [r'^tempest\.api\.compute\.'],
}
# Tests excluded for a reason the run cannot change, each named in
# docs/tempest.md.
EXCLUDE = [
    # Diagnostics.driver: Nova's enum names in-tree drivers only; this
    # driver leaves it unset (nova_bhyve/diagnostics.py) and tempest's
    # schema rejects null
    r'ServerDiagnosticsV248Test',
]

# Why tests may be skipped, each following from this tempest.conf; in the
# smoke set any other skip fails the run (a feature switched off by mistake
# must not pass as a skip).
EXPECTED_SKIPS = [
    r'Volume service not enabled|Cinder is not available',   # no Cinder
    r'[Ss]wift|[Oo]bject storage',                            # no Swift
    r'DiskConfig extension not enabled',    # disk_config: no partition growth
    r'[Vv]alidation',      # run_validation off: the test guest has no sshd
]

# [compute-feature-enabled]: True only where docs/support-matrix.md says
# "tested" for QEMU/Linux
FEATURES = {
    'resize': True,
    'cold_migration': True,
    'live_migration': True,
    'block_migration_for_live_migration': True,
    'live_migrate_back_and_forth': True,
    'can_migrate_between_any_hosts': True,
    'pause': True,
    'suspend': True,
    'shelve': True,
    'shelve_migrate': True,
    'snapshot': True,
    'rescue': True,
    'stable_rescue': False,
    'console_output': True,
    'interface_attach': True,
    'config_drive': True,
    'serial_console': False,      # Nova's serial proxy is not run here
    'vnc_console': False,         # no noVNC proxy in this cloud
    'spice_console': False,
    'rdp_console': False,
    'change_password': False,     # no guest agent
    'personality': False,
    'metadata_service': False,
    'attach_encrypted_volume': False,
    'swap_volume': False,
    'volume_multiattach': False,
    'volume_backed_live_migration': False,
    'hostname_fqdn_sanitization': True,
    'disk_config': False,
}


def workspace():
    return layout.path('tempest')


def write_conf(conn):
    images = {i.name: i.id for i in conn.image.images()}
    flavors = bootstrap.FLAVORS
    sections = {
        'DEFAULT': {'log_file': os.path.join(workspace(), 'tempest.log'),
                    'debug': True},
        'auth': {
            'use_dynamic_credentials': True,
            'create_isolated_networks': False,
            'admin_username': 'admin', 'admin_password': layout.PASSWORD,
            'admin_project_name': 'admin', 'admin_domain_name': 'Default',
        },
        'identity': {'uri_v3': layout.url('keystone'),
                     'auth_version': 'v3', 'region': layout.REGION},
        'identity-feature-enabled': {'api_v2': False},
        'compute': {
            'image_ref': images['nb-guest'],
            'image_ref_alt': images['nb-guest-raw'],
            'flavor_ref': flavors['nb.tiny'][0],
            'flavor_ref_alt': flavors['nb.small'][0],
            'fixed_network_name': bootstrap.NETWORK,
            'min_compute_nodes': len(layout.COMPUTES),
            'build_timeout': 300, 'region': layout.REGION,
            'min_microversion': '2.1', 'max_microversion': 'latest',
        },
        'compute-feature-enabled': dict(
            FEATURES, scheduler_enabled_filters=configs.SCHEDULER_FILTERS),
        'enforce_scope': {'nova': True},
        'network': {'project_network_cidr': '10.100.0.0/16',
                    'shared_physical_network': True},
        'network-feature-enabled': {'floating_ips': False},
        'image': {'region': layout.REGION},
        'validation': {'run_validation': False},
        'service_available': {'cinder': False, 'swift': False,
                              'neutron': True, 'glance': True,
                              'nova': True, 'heat': False,
                              'horizon': False},
        'oslo_concurrency': {'lock_path': os.path.join(workspace(),
                                                       'locks')},
    }
    configs.write_ini(os.path.join(workspace(), 'etc', 'tempest.conf'),
                      sections)


def init_workspace():
    """What `tempest init` makes, without its registry of workspaces in
    ~/.tempest (which outlives the cloud's directory)."""
    package = procs.run([layout.venv_bin('python'), '-c',
                         'import os, tempest; '
                         'print(os.path.dirname(tempest.__file__))'],
                        'locating tempest').strip()
    os.makedirs(os.path.join(workspace(), 'etc'), exist_ok=True)
    with open(os.path.join(workspace(), '.stestr.conf'), 'w') as f:
        f.write('[DEFAULT]\ntest_path=%s\ntop_dir=%s\n'
                'group_regex=([^\\.]*\\.)*\n' % (
                    os.path.join(package, 'test_discover'), package))


def run(args):
    init_workspace()
    write_conf(bootstrap.admin())
    regexes = []
    for name in args.tests:
        regexes += SETS.get(name, [name])
    argv = [layout.venv_bin('tempest'), 'run', '--config-file',
            os.path.join(workspace(), 'etc', 'tempest.conf'), '--concurrency',
            str(getattr(args, 'concurrency', 2) or 2),
            '--regex', '|'.join('(%s)' % r for r in regexes),
            '--exclude-regex', '|'.join(EXCLUDE)]
    print('tempest: %s (workspace %s)' % (' '.join(argv[2:]), workspace()),
          flush=True)
    name = '-'.join(args.tests) if args.tests in (['smoke'], ['broad']) \
        else 'run'
    stamp = time.strftime('%Y%m%d-%H%M%S')
    out_path = os.path.join(workspace(), '%s-%s.log' % (name, stamp))
    start = time.monotonic()
    lines = []
    with open(out_path, 'w') as out:
        proc = subprocess.Popen(argv, cwd=workspace(), text=True,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        for line in proc.stdout:
            sys.stdout.write(line)
            out.write(line)
            lines.append(line)
        rc = proc.wait()
    tests = results.parse(lines)
    json_path = out_path[:-len('.log')] + '.json'
    results.save(json_path, tests, set=args.tests,
                 compute_driver=configs.compute_driver(),
        seconds=round(time.monotonic() - start), returncode=rc)
    print('tempest: %(ran)d ran, %(passed)d passed, %(failed)d failed, '
          '%(skipped)d skipped; %%s' % results.summary(tests) % json_path)
    if args.tests == ['smoke']:
        unexpected = unexpected_skips(tests)
        for test, reason in unexpected:
            print('tempest: skipped for a reason this config does not give: '
                  '%s: %s' % (test, reason))
        if unexpected:
            return rc or 1
    return rc


def unexpected_skips(tests):
    allowed = re.compile('|'.join(EXPECTED_SKIPS))
    return [(t, r['reason']) for t, r in sorted(tests.items())
            if r['status'] == 'skipped' and not allowed.search(r['reason'])]
