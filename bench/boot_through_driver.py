#!/usr/bin/env python3
"""Guest boot through the driver vs bare QEMU: POST /servers -> the test
guest's init marker on its serial console, against a bare qemu-system run of
the same guest with the same accelerator (bench/boot_bare.py's method),
same run, interleaved.

Through the driver: Nova's functional harness (tests/functional/
nova_harness.py) with this driver; direct kernel boot of the test guest
(root.qcow2 + kernel_id/ramdisk_id), flavor 1 vCPU / 256 MiB / 1 GiB. The
clock starts when the POST is sent; the marker is found by polling the
instance's console.log (QEMU's chardev logfile) every 5 ms, not the API. The
driver's steps are timed as they run (observed, not changed), so the result
also splits the time into "POST -> QEMU started" and "QEMU started -> init".
As a measure that host load distorts less than wall time, the CPU seconds
the guest's QEMU process has used when the root-mounted marker appears are
recorded for every variant (bare: sampled every 5 ms from /proc).

Bare: bench/boot_bare.py's one_run() (qemu-system-x86_64 -accel tcg -M q35
-m 256, -kernel/-initrd, a fresh qcow2 overlay on root.qcow2; the clock
starts at exec, the marker is read from QEMU's stdout).

Through the driver twice: with its VM sandbox on (the default: QEMU under
nova-bhyve-launcher, docs/sandbox.md) and off. (Earlier versions replayed
the driver's exact argv without Nova; that argv now names descriptors the
driver opened, so it cannot be replayed on its own.)

The image cache is warmed by one boot first; each guest is stopped (server
deleted / QEMU powered off) before the next run, so no two guests overlap.

    PYTHONPATH=. bench/boot_through_driver.py [--runs 5]

Prints one JSON object on stdout.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import boot_bare  # noqa: E402

import common  # noqa: F401  (sys.path)
import nova_harness  # noqa: E402

RESULT = {}
POLL = 0.005


_TICK = os.sysconf('SC_CLK_TCK')


def _proc_cpu(pid):
    """CPU seconds (user + system) used so far by process ``pid``."""
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class _BareCpu:
    """Observes boot_bare.one_run(): records when it starts QEMU and
    samples that QEMU's CPU time every 5 ms (observation only: the real
    subprocess.Popen runs), so the QEMU CPU seconds at the init marker can
    be read off afterwards."""

    def __init__(self):
        self.samples = []
        self.t_popen = None

    def __enter__(self):
        real_popen = subprocess.Popen
        outer = self

        class Shim:
            def __getattr__(self, name):
                return getattr(subprocess, name)

            @staticmethod
            def Popen(*args, **kwargs):
                outer.t_popen = time.monotonic()
                proc = real_popen(*args, **kwargs)
                threading.Thread(target=outer._sample, args=(proc.pid,),
                                 daemon=True).start()
                return proc

        boot_bare.subprocess = Shim()
        return self

    def __exit__(self, *exc):
        boot_bare.subprocess = subprocess

    def _sample(self, pid):
        while True:
            try:
                cpu = _proc_cpu(pid)
            except (OSError, IndexError, ValueError):
                return
            self.samples.append((time.monotonic(), cpu))
            time.sleep(POLL)

    def cpu_at(self, seconds_after_start):
        t = self.t_popen + seconds_after_start
        before = [c for ts, c in self.samples if ts <= t]
        return before[-1] if before else None


def _cpu():
    """CPU seconds (user + system) used so far by this process, all
    threads: Nova's in-process services, the harness and the poll loop."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class BootThroughDriver(nova_harness.BhyveFunctionalTestBase):

    def setUp(self):
        common.give_calibration_time(self)
        super().setUp()

    def _driver_run(self, image, timings):
        m = self.manifest['markers']
        t0 = time.monotonic()
        server = self.api.post_server({'server': self._build_server(
            image_uuid=image['id'], flavor_id=self.flavor_id,
            networks='none')})
        cpu0 = _cpu()
        t_posted = time.monotonic() - t0
        log = os.path.join(self.vmdir(server), 'console.log')
        found = common.wait_console_markers(
            log, [('init', m['init']), ('root_mounted', m['root_mounted'])],
            t0, timeout=common.ARGS.timeout, poll=POLL)
        cpu = _cpu() - cpu0
        qemu_cpu = _proc_cpu(self.vm_pid(server))
        start, started = timings.marks['hypervisor.start'][-1]
        steps = timings.take()
        argv = None
        pid = self.vm_pid(server)
        if pid:
            with open('/proc/%d/cmdline' % pid, 'rb') as f:
                argv = [a.decode() for a in f.read().split(b'\0') if a]
        self.root_backing = json.loads(subprocess.run(
            ['qemu-img', 'info', '-U', '--output=json',
             os.path.join(self.vmdir(server), 'disk')], check=True,
            capture_output=True, text=True).stdout)['backing-filename']
        common.delete_and_wait(self, server)
        timings.take()
        r = {k: round(v, 3) for k, v in found.items()}
        r.update({
            'post_returned': round(t_posted, 3),
            'post_to_qemu_exec': round(start - t0, 3),
            'post_to_qemu_daemonized': round(started - t0, 3),
            'qemu_exec_to_init': round(t0 + found['init'] - start, 3),
            'nova_process_cpu_post_to_root_mounted': round(cpu, 3),
            'qemu_cpu_at_root_mounted': qemu_cpu,
            'steps': steps,
        })
        return r, argv

    def test_boot(self):
        timings = common.Timings(self)
        image = self.direct_boot_image('qcow2')
        hv = self.compute.manager.driver.hypervisor
        self.flags(sandbox=True, group='bhyve')
        warm, argv = self._driver_run(image, timings)
        common.say('warm-up (driver): %s', warm)
        # the driver with its VM sandbox on (the default) and off, and bare
        # QEMU, interleaved (order rotating)
        samples = {'driver': [], 'bare': [], 'driver_no_sandbox': []}
        kinds = list(samples)
        for i in range(common.ARGS.runs):
            order = kinds[i % 3:] + kinds[:i % 3]
            for kind in order:
                if kind.startswith('driver'):
                    self.flags(sandbox=kind == 'driver', group='bhyve')
                    r, _ = self._driver_run(image, timings)
                else:
                    with _BareCpu() as obs:
                        r = boot_bare.one_run(self.manifest, 'kernel',
                                              common.ARGS.timeout)
                    r['qemu_cpu_at_root_mounted'] = obs.cpu_at(
                        r['root_mounted'])
                samples[kind].append(r)
                common.say('run %d %s: %s', i + 1, kind, r)
        med = {k: statistics.median(s['init'] for s in samples[k])
               for k in samples}
        keys_d = ('init', 'root_mounted', 'post_returned',
                  'post_to_qemu_exec', 'post_to_qemu_daemonized',
                  'qemu_exec_to_init', 'qemu_cpu_at_root_mounted',
                  'nova_process_cpu_post_to_root_mounted')
        RESULT.update({
            'benchmark': 'boot_through_driver',
            'unit': 'seconds; driver: from POST /servers sent; bare: from '
                    'qemu exec',
            'runs': common.ARGS.runs,
            'accelerator': {'driver': hv.accelerator,
                            'bare': 'tcg (boot_bare.py)'},
            'driver': {k: common.summary(s[k] for s in samples['driver'])
                       for k in keys_d},
            'bare': {k: common.summary(s[k] for s in samples['bare'])
                     for k in ('init', 'root_mounted',
                               'qemu_cpu_at_root_mounted')},
            'driver_no_sandbox': {
                k: common.summary(s[k] for s in samples['driver_no_sandbox'])
                for k in keys_d},
            'ratio_init_min': round(
                min(s['init'] for s in samples['driver']) /
                min(s['init'] for s in samples['bare']), 3),
            'ratio_qemu_cpu_at_root_mounted_median': round(
                statistics.median(s['qemu_cpu_at_root_mounted']
                                  for s in samples['driver']) /
                statistics.median(s['qemu_cpu_at_root_mounted']
                                  for s in samples['bare']), 3),
            'ratio_init_median': round(med['driver'] / med['bare'], 3),
            'ratio_qemu_exec_to_init_median': round(statistics.median(
                s['qemu_exec_to_init'] for s in samples['driver']) /
                med['bare'], 3),
            'ratio_init_median_no_sandbox': round(
                med['driver_no_sandbox'] / med['bare'], 3),
            'target': 'ratio_init_median (sandbox on) <= 1.1',
            'target_met': med['driver'] / med['bare'] <= 1.1,
            'driver_qemu_argv': argv,
            'warmup': warm,
            'samples': samples,
        })


def _arguments(ap):
    ap.add_argument('--timeout', type=float, default=180)


def main():
    common.bench_main(BootThroughDriver, RESULT, __doc__, _arguments)


if __name__ == '__main__':
    sys.exit(main())
