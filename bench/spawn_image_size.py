#!/usr/bin/env python3
"""Spawn cost does not grow with image size: POST /servers -> ACTIVE for a
~100 MiB and a ~2 GiB base image, warm image cache, through Nova's harness.

Both images are qcow2, made here with qemu-img/qemu-io from the test guest's
root.qcow2 (its ext4 root file system in the first 64 MiB, ~1 MiB of it
allocated) plus filler data written with qemu-io after it, so the allocated
size is really ~100 MiB and ~2 GiB (not sparse). They boot with the guest's
kernel/initrd (kernel_id / ramdisk_id), flavor 1 vCPU / 256 MiB / 3 GiB root
disk. Each image is booted once first (cold: download into the image cache,
checksum, format inspection; the guest is checked to mount its root from
it), then the two are measured interleaved, each server deleted before the
next.

    PYTHONPATH=. bench/spawn_image_size.py [--runs 5] [--workdir DIR]

Prints one JSON object on stdout. The images are removed at the end.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import common  # noqa: F401  (sys.path)
import nova_harness  # noqa: E402

RESULT = {}
MiB = 1024 * 1024
ROOT_FS = 64 * MiB          # the test guest's root.qcow2 virtual size
SIZES = {'100MiB': 100 * MiB, '2GiB': 2048 * MiB}


def _info(path):
    out = subprocess.run(['qemu-img', 'info', '--output=json', path],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def make_image(src, path, total):
    """qcow2 at ``path``: ``src``'s data, then filler up to ``total``
    bytes of allocated data."""
    subprocess.run(['qemu-img', 'convert', '-O', 'qcow2', src, path],
                   check=True)
    filler = total - _info(path)['actual-size']
    subprocess.run(['qemu-img', 'resize', '-q', path, str(ROOT_FS + filler)],
                   check=True)
    subprocess.run(['qemu-io', '-f', 'qcow2', '-c',
                    'write -q -P 0x5a %d %d' % (ROOT_FS, filler), path],
                   check=True)
    info = _info(path)
    return {'virtual_size': info['virtual-size'],
            'allocated': info['actual-size'],
            'file_size': os.path.getsize(path)}


class SpawnImageSize(nova_harness.BhyveFunctionalTestBase):

    def setUp(self):
        common.give_calibration_time(self)
        super().setUp()

    def test_image_size(self):
        m = self.manifest
        work = tempfile.mkdtemp(prefix='nb-imgsize-', dir=common.ARGS.workdir)
        self.addCleanup(shutil.rmtree, work, ignore_errors=True)
        flavor = self._create_flavor(memory_mb=256, vcpu=1, disk=3,
                                     ephemeral=0, name='nb.3g')
        kernel = nova_harness.glance_image(self.glance, 'k', m['vmlinuz'],
                                           'aki', container='aki')
        ramdisk = nova_harness.glance_image(self.glance, 'r', m['initrd'],
                                            'ari', container='ari')
        timings = common.Timings(self)
        images, made = {}, {}
        for name, size in SIZES.items():
            path = os.path.join(work, name + '.qcow2')
            t = time.monotonic()
            made[name] = make_image(m['root_qcow2'], path, size)
            made[name]['make_seconds'] = round(time.monotonic() - t, 2)
            t = time.monotonic()
            images[name] = nova_harness.glance_image(
                self.glance, 'nb-' + name, path, 'qcow2',
                properties={'kernel_id': kernel['id'],
                            'ramdisk_id': ramdisk['id'],
                            'os_command_line': m['cmdline']})
            made[name]['glance_register_seconds'] = round(
                time.monotonic() - t, 2)
            os.unlink(path)          # Glance's fixture holds the data now
            common.say('image %s: %s', name, made[name])

        def one(name, check_boot=False):
            timings.take()
            server, posted, active = common.post_until_active(
                self, images[name]['id'], flavor, timeout=600)
            steps = timings.take()
            r = {'active': round(active, 4), 'steps': steps}
            if check_boot:
                t0 = time.monotonic()
                common.wait_console_marker(
                    os.path.join(self.vmdir(server), 'console.log'),
                    m['markers']['root_mounted'], t0)
                r['root_mounted_checked'] = True
            common.delete_and_wait(self, server)
            return r

        cold = {name: one(name, check_boot=True) for name in SIZES}
        samples = {name: [] for name in SIZES}
        names = list(SIZES)
        for i in range(common.ARGS.runs):
            for name in (names if i % 2 == 0 else names[::-1]):
                samples[name].append(one(name))
                common.say('run %d %s: %s', i + 1, name, samples[name][-1])
        med = {n: statistics.median(s['active'] for s in samples[n])
               for n in names}
        RESULT.update({
            'benchmark': 'spawn_image_size',
            'unit': 'seconds, POST /servers sent -> first GET showing ACTIVE '
                    '(warm image cache)',
            'runs': common.ARGS.runs,
            'flavor': {'vcpus': 1, 'memory_mb': 256, 'root_gb': 3},
            'accelerator': self.compute.manager.driver.hypervisor.accelerator,
            'images': made,
            'warm': {n: common.summary(s['active'] for s in samples[n])
                     for n in names},
            'warm_driver_spawn': {
                n: common.summary(s['steps']['driver.spawn']
                                  for s in samples[n]) for n in names},
            'ratio_2GiB_to_100MiB_median': round(
                med['2GiB'] / med['100MiB'], 3),
            'difference_median': round(med['2GiB'] - med['100MiB'], 3),
            'cold_first_boot': cold,
            'samples': samples,
        })


def _arguments(ap):
    ap.add_argument('--workdir', default='/var/tmp',
                    help='where the test images are made (needs ~2.2 GiB)')


def main():
    common.bench_main(SpawnImageSize, RESULT, __doc__, _arguments)


if __name__ == '__main__':
    sys.exit(main())
