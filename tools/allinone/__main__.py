"""tools/cloud: an all-in-one OpenStack around nova-bhyve on this host.

    up        start (or complete) the cloud; prints endpoints and an openrc
    down      delete its servers, stop every daemon it started (by PID),
              remove its directory
    status    what runs, what answers
    tempest [smoke | broad | REGEX...]
              write tempest.conf for this cloud and run tempest
    compare OURS.json FAKE.json
              two runs' results (tempest's JSON summaries) side by side
"""
import argparse
import json
import sys
import time

from allinone import bootstrap
from allinone import configs
from allinone import infra
from allinone import layout
from allinone import procs
from allinone import results
from allinone import services
from allinone import teardown
from allinone import tempest

INFRA = ('mariadb', 'epmd', 'rabbitmq', 'ovsdb-server', 'ovs-vswitchd')


def step(text):
    print('%s %s' % (time.strftime('%H:%M:%S'), text), flush=True)


def wait_for_computes(timeout=180):
    """Both nova-computes up, mapped to the cell and reporting a node."""
    deadline = time.monotonic() + timeout
    conn = bootstrap.admin()
    while True:
        services.discover_hosts()
        up = {s.host for s in conn.compute.services(binary='nova-compute')
              if s.state == 'up'}
        nodes = len(list(conn.compute.hypervisors()))
        if set(layout.COMPUTES) <= up and nodes >= len(layout.COMPUTES):
            return up
        for host in layout.COMPUTES:
            name = 'nova-compute-%s' % host
            if not procs.pid_of(name):
                raise procs.CloudError('%s exited; %s ends with:\n%s' % (
                    name, layout.log(name), procs.log_tail(name)))
        if time.monotonic() > deadline:
            raise procs.CloudError(
                'computes up after %d s: %s (%d nodes); see %s' % (
                    timeout, sorted(up), nodes, layout.path('log')))
        time.sleep(3)


def up(args):
    start = time.monotonic()
    step('configuration in %s' % layout.path('etc'))
    configs.write_all(args.compute_driver)
    step('MariaDB, RabbitMQ, Open vSwitch (userspace datapath)')
    infra.start_mariadb()
    infra.start_rabbitmq()
    infra.start_ovs()
    step('database schemas')
    services.sync_databases()
    step('keystone')
    services.start_api('keystone')
    bootstrap.keystone_bootstrap()
    conn = bootstrap.admin()
    bootstrap.catalog_and_users(conn)
    for service in ('glance', 'placement', 'neutron'):
        step(service)
        services.start_api(service)
    services.start_neutron_workers()
    step('nova (api, conductor, scheduler, computes %s)' %
         ', '.join(layout.COMPUTES))
    services.start_api('nova')
    services.start_nova()
    hosts = wait_for_computes()
    step('images, flavors, network')
    conn = bootstrap.admin()        # a catalog with every service now
    image_ids = bootstrap.images(conn)
    bootstrap.flavors(conn)
    bootstrap.network(conn)
    rc = bootstrap.openrc()
    print()
    for service in layout.API_PORTS:
        print('  %-10s %s' % (service, layout.url(service)))
    print('  computes   %s' % ', '.join(sorted(hosts)))
    print('  images     %s' % ', '.join('%s=%s' % kv
                                         for kv in image_ids.items()))
    print('  openrc     %s' % rc)
    print('  logs       %s' % layout.path('log'))
    step('cloud up in %d s' % (time.monotonic() - start))


def _stop(name):
    start = time.monotonic()
    procs.stop(name)
    took = time.monotonic() - start
    if took > 5:
        print('  %s took %.0f s to stop' % (name, took))


def down(args):
    step('deleting servers')
    left = teardown.delete_servers()
    if left:
        print('  not deleted through the API: %s' % ', '.join(left))
    for name in reversed(procs.names()):
        if name not in INFRA:
            _stop(name)
    killed = teardown.kill_leftover_vms()
    if killed:
        print('  VM processes left by the computes, killed: %s' %
              ', '.join(map(str, killed)))
    if procs.pid_of('ovsdb-server') and procs.pid_of('ovs-vswitchd'):
        infra.vsctl('--if-exists', 'del-br', layout.BRIDGE)
    for name in reversed(procs.names()):
        _stop(name)
    left = teardown.processes_left()
    vms = teardown.remove_runtime()
    if vms:
        left.append('VM runtime directories in %s: %s' % (
            layout.RUNTIME, ', '.join(vms)))
    teardown.remove_state()
    if left:
        raise procs.CloudError('still running after down:\n  ' +
                               '\n  '.join(left))
    step('cloud down')


def status(args):
    alive = True
    for name in procs.names():
        pid = procs.pid_of(name)
        alive = alive and bool(pid)
        print('  %-26s %s' % (name, pid or 'NOT RUNNING'))
    for service in layout.API_PORTS:
        ok = services.api_up(service)
        alive = alive and ok
        print('  %-26s %s' % (service + ' API', layout.url(service)
                              if ok else 'NOT ANSWERING'))
    return 0 if alive and procs.names() else 1


def compare(args):
    runs = []
    for path in (args.ours, args.fake):
        with open(path) as f:
            runs.append(json.load(f))
    print('| | %s | %s |' % tuple(r.get('compute_driver') for r in runs))
    print('|---|---|---|')
    for key in ('ran', 'passed', 'failed', 'skipped'):
        print('| %s | %d | %d |' % (key, runs[0]['summary'][key],
                                    runs[1]['summary'][key]))
    print()
    for test, result in results.compare(runs[0]['tests'],
                                        runs[1]['tests']).items():
        print('- `%s`: %s %s' % (test, result['status'],
                                 result['reason']).rstrip())
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog='tools/cloud',
                                     description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    u = sub.add_parser('up')
    u.add_argument('--compute-driver', default=None,
                   help='the computes\' driver instead of this one '
                        '(fake.FakeDriver: docs/tempest.md)')
    u.set_defaults(func=up)
    sub.add_parser('down').set_defaults(func=down)
    sub.add_parser('status').set_defaults(func=status)
    t = sub.add_parser('tempest')
    t.add_argument('tests', nargs='*', default=['smoke'])
    t.set_defaults(func=tempest.run)
    c = sub.add_parser('compare')
    c.add_argument('ours')
    c.add_argument('fake')
    c.set_defaults(func=compare)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except procs.CloudError as e:
        print('error: %s' % e, file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
