"""What the services stand on: MariaDB, RabbitMQ and Open vSwitch, each a
private instance with its data under the cloud's directory."""
import os
import shutil
import socket

from allinone import layout
from allinone import procs

DATABASES = ('keystone', 'glance', 'placement', 'neutron', 'nova_api',
             'nova', 'nova_cell0')
DB_USER = 'openstack'
RABBIT_NODE = 'nbcloud@localhost'
RABBIT_USER = 'openstack'
OVS_SCHEMA = '/usr/share/openvswitch/vswitch.ovsschema'


def port_open(port, host=layout.HOST):
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def db_url(database):
    return 'mysql+pymysql://%s:%s@%s:%d/%s?charset=utf8' % (
        DB_USER, layout.PASSWORD, layout.HOST, layout.MYSQL_PORT, database)


def transport_url():
    return 'rabbit://%s:%s@%s:%d/' % (RABBIT_USER, layout.PASSWORD,
                                      layout.HOST, layout.RABBIT_PORT)


# -- MariaDB -----------------------------------------------------------------

def _mysql(sql):
    procs.run(['mariadb', '--no-defaults', '-S', layout.run('mysql.sock'),
               '-u', 'root', '-e', sql], 'mariadb: ' + sql.split()[0])


def start_mariadb():
    data = layout.path('mysql')
    if not os.path.isdir(os.path.join(data, 'mysql')):
        procs.run(['mariadb-install-db', '--no-defaults', '--datadir=' + data,
                   '--user=root', '--auth-root-authentication-method=socket',
                   '--skip-test-db'], 'mariadb-install-db')
    procs.start('mariadb', [
        'mariadbd', '--no-defaults', '--datadir=' + data, '--user=root',
        '--socket=' + layout.run('mysql.sock'),
        '--port=%d' % layout.MYSQL_PORT, '--bind-address=' + layout.HOST,
        '--skip-name-resolve', '--max-connections=1000',
        '--innodb-flush-log-at-trx-commit=2', '--log-error=' +
        layout.log('mariadb-server')])
    procs.wait_for('mariadb', lambda: port_open(layout.MYSQL_PORT),
                   'MariaDB on port %d' % layout.MYSQL_PORT)
    for db in DATABASES:
        _mysql('CREATE DATABASE IF NOT EXISTS %s CHARACTER SET utf8' % db)
    _mysql("CREATE USER IF NOT EXISTS '{u}'@'{h}' IDENTIFIED BY '{p}'; "
           "GRANT ALL PRIVILEGES ON *.* TO '{u}'@'{h}'".format(
               u=DB_USER, h=layout.HOST, p=layout.PASSWORD))


# -- RabbitMQ ----------------------------------------------------------------

def _rabbit_env():
    home = layout.path('rabbitmq')
    return {
        'HOME': home,
        'RABBITMQ_NODENAME': RABBIT_NODE,
        'RABBITMQ_NODE_IP_ADDRESS': layout.HOST,
        'RABBITMQ_NODE_PORT': str(layout.RABBIT_PORT),
        'RABBITMQ_DIST_PORT': str(layout.RABBIT_DIST_PORT),
        'RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS':
            '-kernel inet_dist_use_interface {127,0,0,1}',
        'RABBITMQ_MNESIA_BASE': os.path.join(home, 'mnesia'),
        'RABBITMQ_LOG_BASE': layout.path('log', 'rabbitmq'),
        'RABBITMQ_PID_FILE': os.path.join(home, 'rabbitmq.pid'),
        'RABBITMQ_CONFIG_FILE': os.path.join(home, 'rabbitmq'),
        'RABBITMQ_ENABLED_PLUGINS_FILE': os.path.join(home, 'plugins'),
        'ERL_EPMD_ADDRESS': layout.HOST,
    }


def _rabbitmqctl(*args):
    return procs.run(['/usr/lib/rabbitmq/bin/rabbitmqctl', '--node',
                      RABBIT_NODE, '-q'] + list(args),
                     'rabbitmqctl ' + args[0], env=_rabbit_env())


def start_rabbitmq():
    env = _rabbit_env()
    os.makedirs(env['HOME'], exist_ok=True)
    with open(env['RABBITMQ_ENABLED_PLUGINS_FILE'], 'w') as f:
        f.write('[].\n')
    with open(env['RABBITMQ_CONFIG_FILE'] + '.conf', 'w') as f:
        f.write('listeners.tcp.1 = %s:%d\n' % (layout.HOST,
                                               layout.RABBIT_PORT))
    # epmd first, as our own daemon: RabbitMQ would start one that
    # outlives it
    procs.start('epmd', ['epmd', '-address', layout.HOST], env=env)
    procs.wait_for('epmd', lambda: port_open(4369), 'epmd on port 4369')
    procs.start('rabbitmq', ['/usr/lib/rabbitmq/bin/rabbitmq-server'],
                env=env)
    procs.wait_for('rabbitmq', lambda: port_open(layout.RABBIT_PORT),
                   'RabbitMQ on port %d' % layout.RABBIT_PORT, timeout=120)
    _rabbitmqctl('await_startup', '--timeout', '120')
    users = _rabbitmqctl('list_users')
    if RABBIT_USER not in users.split():
        _rabbitmqctl('add_user', RABBIT_USER, layout.PASSWORD)
    _rabbitmqctl('set_permissions', RABBIT_USER, '.*', '.*', '.*')


# -- Open vSwitch (userspace datapath) ---------------------------------------

def _ovs_env():
    d = layout.run('ovs')
    return {'OVS_RUNDIR': d, 'OVS_LOGDIR': layout.path('log'),
            'OVS_DBDIR': d}


def vsctl(*args):
    return procs.run(['ovs-vsctl', '--db=' + layout.ovsdb(), '--timeout=60']
                     + list(args), 'ovs-vsctl ' + args[0], env=_ovs_env())


def start_ovs():
    d = layout.run('ovs')
    os.makedirs(d, exist_ok=True)
    db = os.path.join(d, 'conf.db')
    if not os.path.exists(db):
        procs.run(['ovsdb-tool', 'create', db, OVS_SCHEMA], 'ovsdb-tool',
                  env=_ovs_env())
    procs.start('ovsdb-server', [
        'ovsdb-server', db, '--remote=punix:' + os.path.join(d, 'db.sock'),
        '--pidfile=' + os.path.join(d, 'ovsdb-server.pid'),
        '--log-file=' + layout.log('ovsdb-server-file')], env=_ovs_env())
    procs.wait_for('ovsdb-server',
                   lambda: os.path.exists(os.path.join(d, 'db.sock')),
                   'the OVSDB socket')
    vsctl('--no-wait', 'init')
    procs.start('ovs-vswitchd', [
        'ovs-vswitchd', layout.ovsdb(),
        '--pidfile=' + os.path.join(d, 'ovs-vswitchd.pid'),
        '--log-file=' + layout.log('ovs-vswitchd-file')], env=_ovs_env())
    vsctl('--may-exist', 'add-br', layout.BRIDGE, '--', 'set', 'Bridge',
          layout.BRIDGE, 'datapath_type=netdev')
    procs.run(['ip', 'link', 'set', layout.BRIDGE, 'up'], 'ip link')


def ovs_ports():
    if not procs.pid_of('ovsdb-server'):
        return []
    return vsctl('list-ports', layout.BRIDGE).split()


def remove_data():
    for sub in ('mysql', 'rabbitmq'):
        shutil.rmtree(layout.path(sub), ignore_errors=True)
