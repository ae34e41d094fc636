"""tap(4), if_bridge(4) and OVS ports on FreeBSD with ifconfig(8) and
ovs-vsctl(8): run as root, by the privileged helper (nova_bhyve.privsep.net).
"""
from oslo_concurrency import processutils

execute = processutils.execute


class FreeBSDLinks:
    """tap(4), if_bridge(4) and OVS through ifconfig(8)/ovs-vsctl(8).

    Run as root (the privileged helper). Not run on a FreeBSD host yet:
    pinned by unit tests only."""
    name = 'freebsd'

    @staticmethod
    def exists(dev):
        try:
            execute('ifconfig', dev)
        except processutils.ProcessExecutionError:
            return False
        return True

    def create_tap(self, dev, mac, mtu, owner=None):
        # tap(4) nodes are opened by bhyve through /dev/tapN: devfs rules
        # give the nova user access (docs/networking.md), not an owner here
        if not self.exists(dev):
            out, _ = execute('ifconfig', 'tap', 'create')
            execute('ifconfig', out.strip(), 'name', dev)
        cmd = ['ifconfig', dev]
        if mtu:
            cmd += ['mtu', str(mtu)]
        execute(*cmd + ['up'])

    @staticmethod
    def in_use(dev):
        """Never asked on FreeBSD: a tap(4) has one opener, so two VMs of
        one machine never share it."""
        return False

    def delete(self, dev):
        if self.exists(dev):
            execute('ifconfig', dev, 'destroy')

    def ensure_bridge(self, bridge):
        if not self.exists(bridge):
            out, _ = execute('ifconfig', 'bridge', 'create')
            execute('ifconfig', out.strip(), 'name', bridge)
        execute('ifconfig', bridge, 'up')

    def add_to_bridge(self, bridge, dev):
        execute('ifconfig', bridge, 'addm', dev)

    def add_ovs_port(self, bridge, dev, iface_id, mac, vm_uuid, mtu):
        execute('ovs-vsctl', '--timeout=120', '--', '--may-exist',
                'add-port', bridge, dev, '--',
                'set', 'Interface', dev,
                'external-ids:iface-id=%s' % iface_id,
                'external-ids:iface-status=active',
                'external-ids:attached-mac=%s' % mac,
                'external-ids:vm-uuid=%s' % vm_uuid,
                *(['mtu_request=%d' % mtu] if mtu else []))

    def del_ovs_port(self, bridge, dev):
        execute('ovs-vsctl', '--timeout=120', '--', '--if-exists',
                'del-port', bridge, dev)
