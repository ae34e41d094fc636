"""Where the all-in-one cloud keeps everything, and where it listens.

One base directory holds the cloud's state, configuration, logs and pid
files (``$NOVA_BHYVE_CLOUD_DIR``, default /var/lib/nova-bhyve-cloud);
``down`` removes it. The virtualenv the services run from is kept apart
(``$NOVA_BHYVE_CLOUD_VENV``, default .cloud-venv in the repository), like
tools/setup-host's .venv, so a second ``up`` does not reinstall.
Everything listens on 127.0.0.1 only.
"""
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
BASE = os.environ.get('NOVA_BHYVE_CLOUD_DIR', '/var/lib/nova-bhyve-cloud')
VENV = os.environ.get('NOVA_BHYVE_CLOUD_VENV',
                      os.path.join(REPO, '.cloud-venv'))
GUEST = os.path.join(os.environ.get('NOVA_BHYVE_CACHE',
                                    '/var/cache/nova-bhyve'), 'test-guest')

HOST = '127.0.0.1'
# the cloud's one password: a test cloud on loopback (written to openrc)
PASSWORD = 'nova-bhyve-cloud'
REGION = 'RegionOne'

API_PORTS = {
    'keystone': 5000,
    'glance': 9292,
    'placement': 8778,
    'neutron': 9696,
    'nova': 8774,
}
MYSQL_PORT = 3306
RABBIT_PORT = 5672
RABBIT_DIST_PORT = 25672

# the computes' [bhyve] runtime_path (VM runtime dirs, sandbox uids, the
# computes' records): the cloud's own, apart from the test suite's default
RUNTIME = '/run/nova-bhyve-cloud'
# two nova-computes: each its own host name and instances path
COMPUTES = ('compute1', 'compute2')
BRIDGE = 'br-int'


def path(*parts):
    return os.path.join(BASE, *parts)


def venv_bin(name):
    return os.path.join(VENV, 'bin', name)


def etc(service, *parts):
    return path('etc', service, *parts)


def log(name):
    return path('log', name + '.log')


def run(name):
    return path('run', name)


def url(service):
    """An API's endpoint as the catalog lists it."""
    port = API_PORTS[service]
    suffix = {'keystone': '/v3', 'nova': '/v2.1'}.get(service, '')
    return 'http://%s:%d%s' % (HOST, port, suffix)


def ovsdb():
    return 'unix:' + run('ovs/db.sock')
