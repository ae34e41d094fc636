#!/usr/bin/env python3
"""VIF plug/unplug latency per binding, and spawn-to-ping through Nova.

Part 1 (no Nova, no guest): nova_bhyve.net.vif.VifPlugger.plug + unplug of
one port, N times per binding type, on real devices: 'tap'; 'bridge' (a
Linux bridge made here); 'ovs' and 'ovs' hybrid plug (qbr + qvb/qvo) through
os-vif on a private Open vSwitch (userspace datapath, own run dir, stopped
by pid at the end).

Part 2 (Nova's functional harness, real TCG guests): POST /servers until
the guest answers a ping from a network namespace on the same Linux bridge
(tap binding, wired as the backend's agent would; the guest's IP is typed
into its serial shell right after NOVA-BHYVE-SHELL-READY), against the same
instance without networking (POST -> SHELL-READY). Runs are interleaved.

    PYTHONPATH=. bench/net_plug.py [--plugs 20] [--runs 3]

Prints one JSON object on stdout.
"""
import argparse
import json
import os
import sys
import time
import uuid

import common  # noqa: F401  (sys.path)
from common import say
from common import summary
import nethelpers  # noqa: E402


def _vif(binding, bridge=None, hybrid=False):
    from nova.network import model
    pid = str(uuid.uuid4())
    details = {}
    if binding == 'ovs':
        details = {'datapath_type': 'netdev', 'ovs_hybrid_plug': hybrid,
                   'port_filter': True, 'bridge_name': bridge}
    elif binding == 'bridge':
        details = {'bridge_name': bridge}
    return model.VIF(
        id=pid, address='fa:16:3e:%s' % ':'.join(
            '%02x' % b for b in os.urandom(3)),
        type=binding, details=details, vnic_type='normal',
        ovs_interfaceid=pid if binding == 'ovs' else None,
        network=model.Network(id=str(uuid.uuid4()), bridge=bridge,
                              label='bench', subnets=[],
                              meta={'mtu': 1450}),
        devname=('tap' + pid)[:14])


def plug_latency(n):
    import os_vif
    from oslo_config import cfg
    from vif_plug_ovs import privsep as ovs_privsep

    from nova_bhyve.net import vif as network

    class Cleanups:
        def __init__(self):
            self.fns = []

        def addCleanup(self, fn, *a):
            self.fns.append((fn, a))

        def run(self):
            for fn, a in reversed(self.fns):
                fn(*a)

    c = Cleanups()
    host = nethelpers.HostNet(c)
    ovs = nethelpers.OVS.shared(c)
    try:
        network._init_osvif()
        cfg.CONF.set_override('ovsdb_connection', ovs.db, 'os_vif_ovs')
        os_vif.initialize(reset=True)
        ovs_privsep.vif_plug.client_mode = False    # we are root
        lbr = host.bridge()
        obr = ovs.add_bridge()
        from nova import objects
        objects.register_all()
        inst = objects.Instance(uuid=str(uuid.uuid4()), id=1,
                                project_id='bench')
        plugger = network.VifPlugger()
        cases = [('tap', {}), ('bridge', {'bridge': lbr}),
                 ('ovs', {'bridge': obr}),
                 ('ovs-hybrid', {'bridge': obr, 'hybrid': True})]
        out = {}
        before = nethelpers.links()
        for label, kw in cases:
            plug, unplug = [], []
            for _ in range(n):
                vif = _vif(label.split('-')[0], **kw)
                t = time.monotonic()
                plugger.plug(inst, vif)
                plug.append(time.monotonic() - t)
                t = time.monotonic()
                plugger.unplug(inst, vif)
                unplug.append(time.monotonic() - t)
            out[label] = {'plug': summary(plug), 'unplug': summary(unplug)}
            say('%s: plug %.4f s unplug %.4f s (median of %d)', label,
                out[label]['plug']['median'],
                out[label]['unplug']['median'], n)
        leftover = sorted(n for n in nethelpers.links() - before
                          if n.startswith(('tap', 'qbr', 'qvb', 'qvo')))
        out['leftover_devices'] = leftover
        out['leftover_ovs_ports'] = ovs.ports(obr)
        return out
    finally:
        c.run()
        ovs.stop()


def spawn_to_ping(runs):
    from common import run_case
    import nova_harness
    results = {}

    class Case(nova_harness.BhyveFunctionalTestBase):
        def test_spawn_to_ping(self):
            image = self.direct_boot_image('qcow2')
            host = nethelpers.HostNet(self)
            bridge = host.bridge()
            ns = host.namespace_on(bridge, '10.251.9.254/24')
            net, sub = nethelpers.add_network(self.neutron, '10.251.9', 1450)
            with_net, without, net_shell, shell_to_ping = [], [], [], []
            for i in range(runs + 1):          # the first warms the cache
                port = nethelpers.add_port(self.neutron, net, sub,
                                           '10.251.9.%d' % (20 + i), 'tap')
                t0 = time.monotonic()
                server = self._create_server(
                    image_uuid=image['id'], flavor_id=self.flavor_id,
                    networks=[{'port': port['id']}])
                nethelpers.sh('ip', 'link', 'set', 'tap' + port['id'][:11],
                              'master', bridge)
                self.wait_for_console(server, 'NOVA-BHYVE-SHELL-READY')
                t_net_shell = time.monotonic() - t0
                sh = nethelpers.GuestShell(
                    nova_harness.vm_socket(self.vmdir(server), 'serial'))
                sh.check('ip addr add %s/24 dev eth0 && ip link set eth0 up'
                         % port['fixed_ips'][0]['ip_address'])
                while True:
                    r = nethelpers.sh('ip', 'netns', 'exec', ns, 'busybox',
                                      'ping', '-c', '1', '-W', '1',
                                      port['fixed_ips'][0]['ip_address'],
                                      check=False)
                    if '1 packets received' in r:
                        break
                    self.assertLess(time.monotonic() - t0, 300)
                t_ping = time.monotonic() - t0
                sh.close()
                self._delete_server(server)

                t0 = time.monotonic()
                server = self._create_server(
                    image_uuid=image['id'], flavor_id=self.flavor_id,
                    networks='none')
                self.wait_for_console(server, 'NOVA-BHYVE-SHELL-READY')
                t_shell = time.monotonic() - t0
                self._delete_server(server)
                if i:
                    with_net.append(t_ping)
                    without.append(t_shell)
                    net_shell.append(t_net_shell)
                    shell_to_ping.append(t_ping - t_net_shell)
                say('run %d: POST->shell %.2f s ->ping %.2f s; no network '
                    'POST->shell %.2f s', i, t_net_shell, t_ping, t_shell)
            results['post_to_ping_with_port'] = summary(with_net)
            results['post_to_shell_ready_without_network'] = summary(without)
            results['post_to_shell_ready_with_port'] = summary(net_shell)
            results['shell_ready_to_ping_with_port'] = summary(shell_to_ping)

    run_case(Case)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--plugs', type=int, default=20)
    ap.add_argument('--runs', type=int, default=3)
    ap.add_argument('--skip-spawn', action='store_true')
    args = ap.parse_args()
    out = common.claim_stdout()
    res = {'host': common.host_facts(), 'loadavg_start': common.loadavg(),
           'plug_unplug_seconds': plug_latency(args.plugs)}
    if not args.skip_spawn:
        res['spawn'] = spawn_to_ping(args.runs)
    res['loadavg_end'] = common.loadavg()
    json.dump(res, out, indent=1, sort_keys=True)
    out.write('\n')
    out.flush()


if __name__ == '__main__':
    sys.exit(main())
