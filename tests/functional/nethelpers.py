"""Host-side networking for the networking tests: bridges, namespaces, a
private Open vSwitch, the guest's serial shell, and Neutron fixture ports.

Everything made here is named with a random suffix, tracked, and removed
(daemons stopped by pid) by the test's cleanups, even when the test fails.
Traffic stays inside bridges and namespaces the tests make.
"""
import atexit
import copy
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid


def sh(*cmd, check=True, env=None):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=120)
    if check and proc.returncode:
        raise RuntimeError('%s failed (%d): %s' % (
            ' '.join(cmd), proc.returncode, proc.stderr.strip()))
    return proc.stdout


def _names(out):
    return [line.split()[0].split('@')[0] for line in out.splitlines()
            if line.strip()]


def links():
    # not /sys: Nova's test base poisons reads of /sys
    return set(_names(sh('ip', '-br', 'link', 'show')))


def link_mtu(dev):
    out = sh('ip', '-o', 'link', 'show', 'dev', dev)
    return out.split(' mtu ')[1].split()[0]


def ifindex(dev):
    """The kernel's index of ``dev``: a new one means the device was
    deleted and made again."""
    return int(sh('ip', '-o', 'link', 'show', 'dev', dev).split(':')[0])


def taps_held_by(pid):
    """Names of the tap devices process ``pid`` has open (the tun driver
    shows each attached device as ``iff:`` in the fd's fdinfo)."""
    names = []
    fd_dir = '/proc/%d/fdinfo' % pid
    for fd in os.listdir(fd_dir):
        try:
            with open(os.path.join(fd_dir, fd)) as f:
                for line in f:
                    if line.startswith('iff:'):
                        names.append(line.split()[1])
        except OSError:
            continue
    return sorted(names)


def suffix():
    return '%06x' % random.getrandbits(24)


class HostNet:
    """Linux bridges and network namespaces made by one test."""

    def __init__(self, test):
        self.bridges, self.netns, self.links = [], [], []
        test.addCleanup(self.cleanup)

    def bridge(self):
        name = 'nbtb' + suffix()
        sh('ip', 'link', 'add', name, 'type', 'bridge')
        self.bridges.append(name)
        sh('ip', 'link', 'set', name, 'up')
        return name

    def _namespace(self, cidr, attach):
        """A network namespace with ``cidr`` on a veth; ``attach(outer)``
        puts the veth's host end where it belongs. Returns (ns, outer)."""
        s = suffix()
        ns, outer, inner = 'nbtn' + s, 'nbtv' + s, 'nbtp' + s
        sh('ip', 'netns', 'add', ns)
        self.netns.append(ns)
        sh('ip', 'link', 'add', outer, 'type', 'veth', 'peer', 'name', inner)
        self.links.append(outer)
        sh('ip', 'link', 'set', inner, 'netns', ns)
        attach(outer)
        sh('ip', 'netns', 'exec', ns, 'ip', 'addr', 'add', cidr, 'dev', inner)
        sh('ip', 'netns', 'exec', ns, 'ip', 'link', 'set', inner, 'up')
        sh('ip', 'netns', 'exec', ns, 'ip', 'link', 'set', 'lo', 'up')
        return ns, outer

    def namespace_on(self, bridge, cidr):
        """A network namespace with ``cidr`` on a veth whose peer is on
        ``bridge``: the 'host-side' address the guests ping."""
        return self._namespace(cidr, lambda outer: sh(
            'ip', 'link', 'set', outer, 'master', bridge, 'up'))[0]

    def namespace_on_ovs(self, ovs, bridge, cidr):
        """A network namespace with ``cidr`` on a veth whose peer is a port
        of the OVS ``bridge`` (a system port: the userspace datapath reads
        it with a packet socket)."""
        def attach(outer):
            sh('ip', 'link', 'set', outer, 'up')
            ovs.vsctl('add-port', bridge, outer)
        return self._namespace(cidr, attach)

    def bridge_ports(self, bridge):
        return sorted(_names(sh('ip', '-br', 'link', 'show', 'master',
                                 bridge, check=False)))

    def cleanup(self):
        for name in self.links + self.bridges:
            sh('ip', 'link', 'del', name, check=False)
        for ns in self.netns:
            sh('ip', 'netns', 'del', ns, check=False)


class OVS:
    """A private Open vSwitch (userspace datapath) in a temp run dir.

    One per test process (``OVS.shared``): ovsdbapp keeps one native OVSDB
    connection per process (class attribute), so the database must outlive
    a single test. Its daemons are stopped by pid at process exit; every
    test deletes the bridges it made."""

    _shared = None

    @classmethod
    def shared(cls, test):
        if cls._shared is None or not cls._shared.alive():
            cls._shared = cls()
            atexit.register(cls._shared.stop)
        ovs = cls._shared
        test.addCleanup(ovs.del_bridges)
        return ovs

    def alive(self):
        try:
            for pid in self.pids:
                os.kill(pid, 0)
        except OSError:
            return False
        return True

    def del_bridges(self):
        for br in self.bridges:
            try:
                self.vsctl('--if-exists', 'del-br', br)
            except Exception:
                pass
        self.bridges = []

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix='nbovs-', dir='/tmp')
        self.db = 'unix:%s/db.sock' % self.dir
        self.env = dict(os.environ, OVS_RUNDIR=self.dir, OVS_LOGDIR=self.dir,
                        OVS_DBDIR=self.dir)
        self.pids = []
        self.bridges = []
        sh('ovsdb-tool', 'create', self.dir + '/conf.db',
           '/usr/share/openvswitch/vswitch.ovsschema', env=self.env)
        sh('ovsdb-server', self.dir + '/conf.db',
           '--remote=punix:%s/db.sock' % self.dir,
           '--pidfile=%s/ovsdb-server.pid' % self.dir, '--detach',
           '--log-file=%s/ovsdb-server.log' % self.dir, env=self.env)
        self._pid('ovsdb-server')
        self.vsctl('--no-wait', 'init')
        sh('ovs-vswitchd', self.db,
           '--pidfile=%s/ovs-vswitchd.pid' % self.dir, '--detach',
           '--log-file=%s/ovs-vswitchd.log' % self.dir, env=self.env)
        self._pid('ovs-vswitchd')

    def _pid(self, name):
        with open('%s/%s.pid' % (self.dir, name)) as f:
            self.pids.append(int(f.read().strip()))

    def vsctl(self, *args):
        return sh('ovs-vsctl', '--db=' + self.db, '--timeout=60', *args,
                  env=self.env)

    def add_bridge(self):
        name = 'nbto' + suffix()
        self.vsctl('add-br', name, '--', 'set', 'Bridge', name,
                   'datapath_type=netdev')
        self.bridges.append(name)
        sh('ip', 'link', 'set', name, 'up', check=False)
        return name

    def ports(self, bridge):
        return self.vsctl('list-ports', bridge).split()

    def iface_external_ids(self, iface):
        out = self.vsctl('--format=json', '--columns=external_ids', 'find',
                         'Interface', 'name=%s' % iface)
        import json
        data = json.loads(out)['data']
        if not data:
            return None
        return dict(data[0][0][1])

    def stop(self):
        self.del_bridges()
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                continue
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        shutil.rmtree(self.dir, ignore_errors=True)


class GuestShell:
    """The guest's root shell on the serial console (serial.sock)."""

    PROMPT = b'nbguest# '

    def __init__(self, sock_path, timeout=120):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(sock_path)
        self.timeout = timeout
        # no echo; and no kernel messages on the console: they are written
        # straight to the serial port and garble a command's output
        self.run('stty -echo 2>/dev/null; dmesg -n 1; true')

    def run(self, cmd, timeout=None):
        """Run ``cmd``; return (exit status, output)."""
        tag = uuid.uuid4().hex[:8]
        self.sock.sendall(('%s; echo "@@$?@%s@@"\n' % (cmd, tag)).encode())
        buf = b''
        deadline = time.monotonic() + (timeout or self.timeout)
        pattern = re.compile(r'@@(\d+)@%s@@' % tag)
        while True:
            text = buf.decode(errors='replace')
            m = pattern.search(text)
            if m:
                out = text[:m.start()]
                # drop an echoed command line (it holds '@%s@@"')
                out = out.split('@%s@@"' % tag, 1)[-1]
                out = out.replace(self.PROMPT.decode(), '')
                lines = [re.sub(r'^(nbguest)?# ', '', ln.strip('\r'))
                         for ln in out.split('\n')]
                return int(m.group(1)), '\n'.join(lines).strip()
            if time.monotonic() > deadline:
                raise TimeoutError('no answer to %r: %r' % (cmd, text[-500:]))
            try:
                chunk = self.sock.recv(4096)
            except socket.timeout:
                continue
            if not chunk:
                raise EOFError('serial console closed')
            buf += chunk

    def check(self, cmd, timeout=None):
        status, out = self.run(cmd, timeout)
        if status:
            raise AssertionError('guest: %r exited %d: %s' % (cmd, status,
                                                              out))
        return out

    def close(self):
        self.sock.close()


def filter_subnets_by_id(test, neutron):
    """Make the NeutronFixture's list_subnets honour ``id=[...]`` as
    Neutron does (the fixture returns every subnet, so Nova would describe
    another subnet, without the port's address, in network_data.json)."""
    real = neutron.list_subnets

    def list_subnets(retrieve_all=True, **params):
        subnets = real(retrieve_all)['subnets']
        wanted = params.get('id')
        if wanted is not None:
            wanted = [wanted] if isinstance(wanted, str) else wanted
            subnets = [s for s in subnets if s['id'] in wanted]
        return {'subnets': subnets}
    neutron.list_subnets = list_subnets
    test.addCleanup(setattr, neutron, 'list_subnets', real)


def add_network(neutron, cidr_prefix, mtu=1450):
    """A network + IPv4 subnet in Nova's NeutronFixture; returns both."""
    net = copy.deepcopy(neutron.network_1)
    net.update(id=str(uuid.uuid4()), name='nbt-' + suffix(), mtu=mtu)
    sub = copy.deepcopy(neutron.subnet_1)
    sub.update(id=str(uuid.uuid4()), network_id=net['id'],
               cidr=cidr_prefix + '.0/24', gateway_ip=None,
               # static addresses in network_data.json (no DHCP agent)
               enable_dhcp=False,
               allocation_pools=[{'start': cidr_prefix + '.10',
                                  'end': cidr_prefix + '.200'}])
    net['subnets'] = [sub['id']]
    neutron._networks[net['id']] = net
    neutron._subnets[sub['id']] = sub
    return net, sub


def add_port(neutron, net, sub, ip, vif_type, details=None):
    port = copy.deepcopy(neutron.port_1)
    port.update({
        'id': str(uuid.uuid4()),
        'network_id': net['id'],
        'mac_address': 'fa:16:3e:%02x:%02x:%02x' % tuple(
            random.getrandbits(8) for _ in range(3)),
        'fixed_ips': [{'ip_address': ip, 'subnet_id': sub['id']}],
        'binding:vif_type': vif_type,
        'binding:vif_details': dict(details or {}),
    })
    neutron._ports[port['id']] = port
    made = getattr(neutron, 'nbt_port_ids', None)
    if made is not None:
        made.append(port['id'])
    return port


def remove_port_devices(port_ids):
    """Test cleanup: the host devices the driver would have made for these
    ports (a failed test may never delete its servers). Only names derived
    from the test's own port ids are touched."""
    present = links()
    for pid in port_ids:
        for prefix in ('tap', 'qvb', 'qbr'):
            name = prefix + pid[:11]
            if name in present:
                sh('ip', 'link', 'del', name, check=False)
