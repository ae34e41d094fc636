"""Taps and bridges on Linux with ip(8): run as root, in the privileged
process (nova_bhyve.privsep.net), never in nova-compute."""
import os
import time

from oslo_concurrency import processutils

execute = processutils.execute


def host_mac(mac):
    """The tap's own MAC: the port's with an fe: first octet, as libvirt
    does, so a Linux bridge never takes the guest's MAC for a local one."""
    return 'fe' + mac[2:]


class LinuxLinks:
    """ip(8) on Linux; run as root (the privileged process)."""
    name = 'linux'

    @staticmethod
    def exists(dev):
        return os.path.exists('/sys/class/net/%s' % dev)

    @staticmethod
    def in_use(dev):
        """A process holds the tap open (the tun driver reports carrier
        while a queue is attached)."""
        try:
            with open('/sys/class/net/%s/carrier' % dev) as f:
                return f.read().strip() == '1'
        except OSError:
            return False

    def create_tap(self, dev, mac, mtu, owner=None):
        # Multi-queue, so that a second VM process can attach while the
        # first still runs: a live migration between two computes of one
        # machine (one kernel, one tap name for the port). Each QEMU takes
        # one queue; the kernel spreads the host->guest flows over them.
        if not self.exists(dev):
            execute('ip', 'tuntap', 'add', 'dev', dev, 'mode', 'tap',
                    'multi_queue', *(['user', str(owner)] if owner else []))
        # The host needs no address on the tap: no IPv6 DAD into the guest.
        try:
            with open('/proc/sys/net/ipv6/conf/%s/disable_ipv6' % dev,
                      'w') as f:
                f.write('1')
        except OSError:
            pass
        cmd = ['ip', 'link', 'set', 'dev', dev, 'address', host_mac(mac)]
        if mtu:
            cmd += ['mtu', str(mtu)]
        execute(*cmd)
        execute('ip', 'link', 'set', 'dev', dev, 'up')

    def delete(self, dev):
        # "ip link del" can fail while the kernel still tears down the
        # device of a VM that just exited: retry, and say so if it stays
        for _ in range(10):
            if not self.exists(dev):
                return
            execute('ip', 'link', 'del', 'dev', dev,
                    check_exit_code=[0, 1, 2])
            if not self.exists(dev):
                return
            time.sleep(0.2)
        raise processutils.ProcessExecutionError(
            description='%s still exists after ip link del' % dev)

    def ensure_bridge(self, bridge):
        if not self.exists(bridge):
            execute('ip', 'link', 'add', 'name', bridge, 'type', 'bridge',
                    check_exit_code=[0, 2])
        execute('ip', 'link', 'set', 'dev', bridge, 'up')

    def add_to_bridge(self, bridge, dev):
        execute('ip', 'link', 'set', 'dev', dev, 'master', bridge)
