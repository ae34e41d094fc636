#!/usr/bin/env python3
"""Driver overhead: POST /servers -> ACTIVE with nova-bhyve minus the same
with Nova's fake driver, in the same Nova (same process, same run).

Three variants, interleaved (order rotating): this driver with its VM
sandbox on (the default: QEMU under nova-bhyve-launcher) and off, and Nova's
fake driver. Nova's functional harness (tests/functional/nova_harness.py)
runs two compute
services: ``compute`` with this driver (real QEMU guests) and ``fake`` with
nova.virt.fake.SmallFakeDriver (2 vCPU, 8 GiB, 1028 GiB: it fits the flavor
256 MiB / 1 vCPU / 1 GiB). Each server is sent to one of them with the
``host`` field (microversion >= 2.74). The image cache is warmed first (one
boot from the image on each host, deleted), then the two hosts are measured
interleaved (order alternating), each server deleted - its QEMU stopped -
before the next measurement. POST -> ACTIVE is the wall time from sending
the POST to the first GET that shows ACTIVE, GET polled every 10 ms (under
CastAsCall the build runs inside the POST, so the first GET is ACTIVE).

    PYTHONPATH=. bench/driver_overhead.py [--runs 5]

Prints one JSON object on stdout.
"""
import statistics
import sys

import common  # noqa: F401  (sys.path)
import nova_harness  # noqa: E402

RESULT = {}


class DriverOverhead(nova_harness.BhyveFunctionalTestBase):

    def setUp(self):
        common.give_calibration_time(self)
        super().setUp()

    def test_overhead(self):
        self.flags(compute_driver='fake.SmallFakeDriver')
        self._start_compute('fake')
        self.flags(compute_driver='bhyve.BhyveDriver')
        timings = common.Timings(self)
        image = self.direct_boot_image('qcow2')
        # this driver with its VM sandbox on (the default) and off, and
        # Nova's fake driver, interleaved in the same run
        variants = ('sandbox', 'plain', 'fake')

        def one(variant):
            host = 'fake' if variant == 'fake' else 'compute'
            if host == 'compute':
                self.flags(sandbox=variant == 'sandbox', group='bhyve')
            server, posted, active = common.post_until_active(
                self, image['id'], self.flavor_id, host=host)
            self.assertEqual(host, server['OS-EXT-SRV-ATTR:host'])
            steps = timings.take() if host == 'compute' else {}
            common.delete_and_wait(self, server)
            timings.take()
            return {'post_returned': round(posted, 4),
                    'active': round(active, 4), 'steps': steps}

        warm = {v: one(v) for v in variants}     # warms the image cache
        samples = {v: [] for v in variants}
        for i in range(common.ARGS.runs):
            order = variants[i % 3:] + variants[:i % 3]
            for v in order:
                samples[v].append(one(v))
                common.say('run %d %s: %s', i + 1, v, samples[v][-1])
        med = {v: statistics.median(s['active'] for s in samples[v])
               for v in variants}

        def over(v):
            return [b['active'] - f['active']
                    for b, f in zip(samples[v], samples['fake'])]
        driver = self.compute.manager.driver
        RESULT.update({
            'benchmark': 'driver_overhead',
            'unit': 'seconds, POST /servers sent -> first GET showing ACTIVE',
            'runs': common.ARGS.runs,
            'flavor': {'vcpus': 1, 'memory_mb': 256, 'root_gb': 1},
            'image': 'test guest root.qcow2 + kernel_id/ramdisk_id '
                     '(direct kernel boot)',
            'accelerator': driver.hypervisor.accelerator,
            'fake_driver': 'nova.virt.fake.SmallFakeDriver',
            'bhyve_sandbox': common.summary(
                s['active'] for s in samples['sandbox']),
            'bhyve_plain': common.summary(
                s['active'] for s in samples['plain']),
            'fake': common.summary(s['active'] for s in samples['fake']),
            'overhead_median': round(med['sandbox'] - med['fake'], 3),
            'overhead_median_plain': round(med['plain'] - med['fake'], 3),
            'sandbox_cost_median': round(med['sandbox'] - med['plain'], 3),
            'overhead_per_pair': common.summary(over('sandbox')),
            'overhead_per_pair_plain': common.summary(over('plain')),
            'target': 'overhead_median (sandbox on) < 0.25 s',
            'target_met': med['sandbox'] - med['fake'] < 0.25,
            'bhyve_driver_steps_median': {
                v: {k: round(statistics.median(s['steps'].get(k, 0)
                                               for s in samples[v]), 4)
                    for k in samples[v][0]['steps']}
                for v in ('sandbox', 'plain')},
            'warmup': warm,
            'samples': samples,
        })


def main():
    common.bench_main(DriverOverhead, RESULT, __doc__)


if __name__ == '__main__':
    sys.exit(main())
