#!/usr/bin/env python3
"""Driver overhead: POST /servers -> ACTIVE with nova-bhyve minus the same
with Nova's fake driver, in the same Nova (same process, same run).

Nova's functional harness (tests/functional/nova_harness.py) runs two compute
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
        hosts = ('compute', 'fake')

        def one(host):
            server, posted, active = common.post_until_active(
                self, image['id'], self.flavor_id, host=host)
            self.assertEqual(host, server['OS-EXT-SRV-ATTR:host'])
            steps = timings.take() if host == 'compute' else {}
            common.delete_and_wait(self, server)
            timings.take()
            return {'post_returned': round(posted, 4),
                    'active': round(active, 4), 'steps': steps}

        warm = {h: one(h) for h in hosts}        # warms the image cache
        samples = {h: [] for h in hosts}
        for i in range(common.ARGS.runs):
            order = hosts if i % 2 == 0 else hosts[::-1]
            for h in order:
                samples[h].append(one(h))
                common.say('run %d %s: %s', i + 1, h, samples[h][-1])
        med = {h: statistics.median(s['active'] for s in samples[h])
               for h in hosts}
        per_pair = [b['active'] - f['active']
                    for b, f in zip(samples['compute'], samples['fake'])]
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
            'bhyve': common.summary(s['active'] for s in samples['compute']),
            'fake': common.summary(s['active'] for s in samples['fake']),
            'overhead_median': round(med['compute'] - med['fake'], 3),
            'overhead_per_pair': common.summary(per_pair),
            'target': 'overhead_median < 0.5 s',
            'target_met': med['compute'] - med['fake'] < 0.5,
            'bhyve_driver_steps_median': {
                k: round(statistics.median(s['steps'].get(k, 0)
                                           for s in samples['compute']), 4)
                for k in samples['compute'][0]['steps']},
            'warmup': warm,
            'samples': samples,
        })


def main():
    common.bench_main(DriverOverhead, RESULT, __doc__)


if __name__ == '__main__':
    sys.exit(main())
