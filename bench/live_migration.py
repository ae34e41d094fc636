#!/usr/bin/env python3
"""Live migration of a 1 GiB TCG guest dirtying memory: this driver's
convergence policy against QEMU's defaults and libvirt's downtime stepping.

    bench/live_migration.py [--runs 1] [--rates 0,16,64] [--cap-mibps 32]
        [--wall-cap 120] [--guest-dir DIR]
        [--controllers policy,qemu,libvirt]   (also: policy-postcopy)

Drives the migration at the hypervisor layer
(nova_bhyve.hypervisor.qemu.backend.QemuHypervisor): the source is started
from a VMSpec like the driver builds
(1 vCPU, 1024 MiB, direct kernel boot of the test guest, a qcow2 overlay as
root disk); the destination is prepare_incoming() on the same host over
loopback with the same disk path (shared storage, no block migration); the
loop is the one of nova_bhyve.migration.live.Migration._migrate (sleep
runner.poll_interval between polls: POLL, FAST_POLL near the end;
runner._progress -> controller.decide -> handle.apply; on
'completed' handle.finish() then handle.resume_destination(), which has the
destination run the guest as the driver does before Nova's post step; then
finish_incoming), with one of three controllers:

* ``policy``: nova_bhyve.migration.policy.ConvergencePolicy.from_conf with the
  defaults of [bhyve] (300..500 ms in 5 steps, fallback auto-converge,
  completion timeout 800 s/GiB);
* ``policy-postcopy``: the same with live_migration_fallback = post-copy; at
  postcopy-active the loop does what the driver does (handle.switchover():
  the destination runs the guest while the rest of memory follows on
  demand);
* ``qemu``: QEMU's defaults: downtime-limit 300 ms, no auto-converge, nothing
  changes during the migration;
* ``libvirt``: Nova's libvirt driver's stepping, from the installed nova's own
  nova.virt.libvirt.migration.downtime_steps with its defaults
  (live_migration_downtime 500 ms, 10 steps, delay 75 s x data GiB), applied
  when the elapsed time passes each step's delay as the libvirt driver's
  monitor loop does; no auto-converge, no post-copy (libvirt's defaults).

All three get the same bandwidth cap (max-bandwidth) and a wall-clock cap
after which the case is recorded as 'did not finish' and cancelled.

In the guest ``nbmem RATE 512 10`` (tools/guest/nbmem.c) dirties RATE MiB/s of
a 512 MiB buffer and prints ``NBMEM <seq> <ns>`` every 10 ms; RATE 0 = idle
(ticks only, the buffer still touched once). A thread polls both console logs
every millisecond and timestamps each tick line as it arrives; the
guest-visible downtime is the largest gap between consecutive tick lines
(source then destination) minus the 10 ms tick interval. The largest gap in
the 5 s before the migration is recorded too (TCG scheduling noise).

Fresh guest per case (boot, start nbmem, settle, migrate, kill both QEMU by
PID, remove the temp dir). JSON on stdout (bench/common.bench_main).
"""
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import unittest
import uuid as uuidlib

import common

TICK_MS = 10
WORKING_SET_MIB = 512
MEMORY_MB = 1024
SETTLE_S = 5.0
TICK_RE = re.compile(rb'NBMEM (\d+) (\d+)\r?\n')

RESULT = {'cases': []}


def guest_dir():
    if common.ARGS and common.ARGS.guest_dir:
        return common.ARGS.guest_dir
    return os.path.join(os.environ.get('NOVA_BHYVE_CACHE',
                                       '/var/cache/nova-bhyve'), 'test-guest')


def add_arguments(ap):
    ap.add_argument('--rates', default='0,16,64',
                    help='MiB/s nbmem dirties (0 = idle), comma-separated')
    ap.add_argument('--cap-mibps', type=int, default=32)
    ap.add_argument('--wall-cap', type=float, default=120.0)
    ap.add_argument('--controllers', default='policy,qemu,libvirt')
    ap.add_argument('--guest-dir', default=None)


# -- controllers --------------------------------------------------------

class QemuDefaults:
    """QEMU's defaults: 300 ms downtime limit, no auto-converge, no
    post-copy, nothing changes while it runs."""
    initial_downtime_ms = 300
    wants_postcopy = False
    wants_auto_converge = False
    throttle = 0

    def decide(self, progress):
        return []


class LibvirtStepping:
    """The libvirt driver's downtime stepping (its _live_migration_monitor:
    each (delay, downtime) of downtime_steps(data_gb) is applied once the
    elapsed time exceeds its delay), from the installed nova's own code."""
    wants_postcopy = False
    wants_auto_converge = False
    throttle = 0

    def __init__(self, data_bytes):
        from nova.virt.libvirt import migration as lv_migration
        self.data_gb = data_bytes / (1024 ** 3)
        self.steps = list(lv_migration.downtime_steps(self.data_gb))
        self.initial_downtime_ms = self.steps[0][1]
        self.current = self.steps[0][1]
        self._next = 1

    def decide(self, progress):
        from nova_bhyve.migration import policy as migration_policy
        out = []
        while (self._next < len(self.steps)
               and progress.elapsed > self.steps[self._next][0]):
            delay, ms = self.steps[self._next]
            self._next += 1
            self.current = ms
            out.append(migration_policy.Step(
                'downtime', ms, 'libvirt step at %d s: %d ms' % (delay, ms)))
        return out


def make_controller(name, data_bytes, cap_mibps):
    from nova_bhyve import conf
    from nova_bhyve.migration import policy as migration_policy
    if name == 'policy':
        return migration_policy.ConvergencePolicy.from_conf(
            conf.CONF.bhyve, data_bytes, cap_mibps)
    if name == 'policy-postcopy':
        conf.CONF.set_override('live_migration_fallback', 'post-copy',
                               group='bhyve')
        try:
            return migration_policy.ConvergencePolicy.from_conf(
                conf.CONF.bhyve, data_bytes, cap_mibps)
        finally:
            conf.CONF.clear_override('live_migration_fallback',
                                     group='bhyve')
    if name == 'qemu':
        return QemuDefaults()
    if name == 'libvirt':
        return LibvirtStepping(data_bytes)
    raise ValueError('unknown controller %r' % name)


# -- console tick watcher -----------------------------------------------

class TickWatcher(threading.Thread):
    """Polls console logs every ms; records (host monotonic, seq, guest ns,
    which log) for each NBMEM tick line as it arrives."""

    def __init__(self):
        super().__init__(daemon=True)
        self.paths = []
        self.ticks = []
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def add(self, path):
        with self._lock:
            self.paths.append([path, 0, b''])

    def run(self):
        while not self.stop.is_set():
            now = time.monotonic()
            with self._lock:
                entries = list(self.paths)
            for n, entry in enumerate(entries):
                path, pos, buf = entry
                try:
                    with open(path, 'rb') as f:
                        f.seek(pos)
                        chunk = f.read()
                except FileNotFoundError:
                    continue
                if not chunk:
                    continue
                entry[1] = pos + len(chunk)
                buf += chunk
                end = 0
                for m in TICK_RE.finditer(buf):
                    self.ticks.append((now, int(m.group(1)),
                                       int(m.group(2)), n))
                    end = m.end()
                nl = buf.rfind(b'\n')
                entry[2] = buf[max(end, nl + 1):]
            time.sleep(0.001)

    def max_gap(self, t_from, t_to):
        """(gap s, guest-clock gap s, seq before, seq after, log before,
        log after) of the largest arrival gap between consecutive ticks
        arriving in [t_from, t_to]."""
        ts = [t for t in self.ticks if t_from <= t[0] <= t_to]
        best = None
        for a, b in zip(ts, ts[1:]):
            gap = b[0] - a[0]
            if best is None or gap > best[0]:
                best = (gap, (b[2] - a[2]) / 1e9, a[1], b[1], a[3], b[3])
        return best


# -- guest ----------------------------------------------------------------

def wait_in_file(path, pattern, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, 'rb') as f:
                if pattern in f.read():
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    raise AssertionError('%r not in %s within %ss' % (pattern, path,
                                                       timeout))


def type_in(vmdir, line):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(vmdir.serial)
        s.sendall(b'\n' + line.encode() + b'\n')
        time.sleep(0.3)


class LiveMigrationBench(unittest.TestCase):

    def setUp(self):
        from nova_bhyve import conf
        conf.CONF([], project='nova')
        conf.CONF.set_override('qemu_accel', 'tcg', group='bhyve')
        self.guest = guest_dir()
        self.assertTrue(os.path.exists(os.path.join(self.guest,
                                                    'manifest.json')))

    def spec(self, tmp, vm_uuid):
        from nova_bhyve import guest
        disk = os.path.join(tmp, 'disk.qcow2')
        subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b',
                        os.path.join(self.guest, 'root.qcow2'), '-F',
                        'qcow2', disk], check=True)
        return guest.VMSpec(
            uuid=vm_uuid, name='instance-migbench', vcpus=1,
            memory_mb=MEMORY_MB,
            disks=[guest.Disk(path=disk, format='qcow2')],
            boot=guest.Boot(kernel=os.path.join(self.guest, 'vmlinuz'),
                            ramdisk=os.path.join(self.guest, 'initrd.img'),
                            cmdline='console=ttyS0'))

    def test_matrix(self):
        args = common.ARGS
        rates = [int(r) for r in args.rates.split(',')]
        controllers = args.controllers.split(',')
        RESULT['conditions'] = {
            'memory_mb': MEMORY_MB, 'vcpus': 1, 'accel': 'tcg',
            'working_set_mib': WORKING_SET_MIB, 'tick_ms': TICK_MS,
            'bandwidth_cap_mibps': args.cap_mibps,
            'wall_cap_s': args.wall_cap, 'storage': 'shared (same qcow2 '
            'overlay, no block migration)', 'transport': 'tcp over '
            'loopback', 'guest_dir': self.guest}
        for run in range(args.runs):
            for rate in rates:
                for name in controllers:
                    case = self.one_case(name, rate, args.cap_mibps,
                                         args.wall_cap)
                    case['run'] = run
                    RESULT['cases'].append(case)
                    common.say('%s', case)

    def one_case(self, name, rate, cap_mibps, wall_cap):
        from nova_bhyve.hypervisor import base
        from nova_bhyve.hypervisor.qemu import backend as qemu
        from nova_bhyve.migration import runner
        hyp = qemu.QemuHypervisor()
        tmp = tempfile.mkdtemp(prefix='migbench-')
        vm_uuid = str(uuidlib.uuid4())
        src = base.VMDir(os.path.join(tmp, 'src', vm_uuid))
        dst = base.VMDir(os.path.join(tmp, 'dst', vm_uuid))
        os.makedirs(src.path)
        os.makedirs(dst.path)
        watcher = TickWatcher()
        case = {'controller': name, 'rate_mibps': rate,
                'loadavg_start': common.loadavg()}
        handle = None
        try:
            spec = self.spec(tmp, vm_uuid)
            hyp.start(spec, src)
            case['poll_s'] = runner.POLL
            case['fast_poll_s'] = runner.FAST_POLL
            wait_in_file(src.console_log, b'NOVA-BHYVE-SHELL-READY', 300)
            type_in(src, 'nbmem %d %d %d &' % (rate, WORKING_SET_MIB,
                                               TICK_MS))
            wait_in_file(src.console_log, b'NBMEM 0 ', 120)
            watcher.add(src.console_log)
            watcher.start()
            time.sleep(SETTLE_S)
            t_pre = time.monotonic()
            data_bytes = MEMORY_MB * 1024 * 1024 + runner.allocated_bytes(
                spec.disks[0].path)
            ctl = make_controller(name, data_bytes, cap_mibps)
            endpoint = hyp.prepare_incoming(spec, dst, '127.0.0.1', False,
                                            ctl)
            watcher.add(dst.console_log)
            handle = hyp.migrate_to(src, spec, endpoint,
                                    cap_mibps * 1024 * 1024, ctl)
            t0 = time.monotonic()
            pre = watcher.max_gap(t_pre - SETTLE_S, t0)
            handle.start_mirror()
            handle.start_memory()
            max_limit = ctl.initial_downtime_ms
            max_throttle = 0
            dirty_rates = []
            outcome = None
            fast_spent = 0.0
            t_switch = None
            switching = False
            while True:
                snap = handle.poll()
                elapsed = time.monotonic() - t0
                if snap.cpu_throttle:
                    max_throttle = max(max_throttle, snap.cpu_throttle)
                if snap.dirty_rate:
                    dirty_rates.append(snap.dirty_rate / 1048576)
                if snap.status == 'completed':
                    outcome = 'completed'
                    break
                if snap.status in ('failed', 'cancelled'):
                    outcome = 'failed: %s' % snap.error
                    break
                if snap.status in runner.POSTCOPY_BROKEN:
                    outcome = 'post-copy broke: %s' % snap.status
                    break
                if snap.status == 'postcopy-active' and t_switch is None:
                    # as the driver's Migration._switchover
                    t_switch = time.monotonic()
                    case['postcopy_switch_s'] = round(t_switch - t0, 2)
                    case['postcopy_resume_failure'] = handle.switchover()
                    case['postcopy_resumed_after_switch_ms'] = round(
                        (time.monotonic() - t_switch) * 1000, 1)
                    continue
                if t_switch is not None:
                    time.sleep(runner.POLL)
                    continue           # post-copy: nothing left to decide
                if elapsed > wall_cap:
                    outcome = 'did not finish'
                    break
                aborted = False
                for step in ctl.decide(runner._progress(elapsed,
                                                                snap)):
                    if step.kind == 'abort':
                        aborted = step.reason
                        break
                    if step.kind == 'downtime':
                        max_limit = max(max_limit, step.value)
                    handle.apply(step)
                    if step.kind == 'postcopy':
                        switching = True
                if aborted:
                    outcome = 'aborted by policy: %s' % aborted
                    break
                interval = runner.poll_interval(
                    snap, fast_spent, switching=switching)
                if interval < runner.POLL:
                    fast_spent += interval
                time.sleep(interval)
            t_end = time.monotonic()
            case.update({
                'outcome': outcome, 'total_s': round(t_end - t0, 2),
                'rounds': snap.rounds,
                'qemu_downtime_ms': snap.downtime_ms,
                'max_downtime_limit_ms': max_limit,
                'max_throttle_pct': max_throttle,
                'dirty_rate_mibps_median': round(sorted(dirty_rates)[
                    len(dirty_rates) // 2], 1) if dirty_rates else 0.0,
                'dirty_rate_mibps_max': round(max(dirty_rates), 1)
                if dirty_rates else 0.0,
                'bandwidth_mibps_last': round(snap.bandwidth / 1048576, 1),
                'pre_migration_max_tick_gap_ms': round(
                    pre[0] * 1000, 1) if pre else None})
            if outcome == 'completed':
                from nova_bhyve.hypervisor.qemu import qmp
                if t_switch is None:
                    # as the driver: disks, then the destination runs the
                    # guest
                    handle.finish()
                    case['resume_failure'] = handle.resume_destination()
                else:
                    case['postcopy_s'] = round(t_end - t_switch, 2)
                t_resume = time.monotonic()
                info = qmp.execute(src.control, 'query-migrate')
                case['qemu_total_time_ms'] = info.get('total-time')
                case['qemu_setup_time_ms'] = info.get('setup-time')
                hyp.finish_incoming(dst)
                t_cont = time.monotonic()
                deadline = t_cont + 30
                while (not any(t[3] == 1 for t in watcher.ticks)
                       and time.monotonic() < deadline):
                    time.sleep(0.05)
                time.sleep(2.0)
                src_ticks = [t for t in watcher.ticks if t[3] == 0]
                dst_ticks = [t for t in watcher.ticks if t[3] == 1]
                if src_ticks and dst_ticks:
                    last, first = src_ticks[-1], dst_ticks[0]
                    # last tick on the source -> first on the destination:
                    # QEMU's downtime plus the loop's poll delay, finish()
                    # and resume_destination()'s 'cont' (finish_incoming's
                    # if the resume failed)
                    case['switchover_gap_ms'] = round(
                        (first[0] - last[0]) * 1000 - TICK_MS, 1)
                    case['switchover_guest_clock_ms'] = round(
                        (first[2] - last[2]) / 1e6, 1)
                    case['completed_seen_after_last_src_tick_ms'] = round(
                        (t_end - last[0]) * 1000, 1)
                    case['resumed_after_last_src_tick_ms'] = round(
                        (t_resume - last[0]) * 1000, 1)
                    case['cont_done_after_last_src_tick_ms'] = round(
                        (t_cont - last[0]) * 1000, 1)
                gap = watcher.max_gap(t0, time.monotonic())
                case['guest_gap_ms'] = round(gap[0] * 1000 - TICK_MS, 1)
                case['guest_gap_guest_clock_ms'] = round(gap[1] * 1000, 1)
                case['guest_gap_where'] = '%s seq %d -> %s seq %d' % (
                    ('src', 'dst')[gap[4]], gap[2], ('src', 'dst')[gap[5]],
                    gap[3])
                case['resumed_on_destination'] = bool(dst_ticks)
                if t_switch is not None and len(dst_ticks) > 1:
                    # post-copy: the guest stalls on pages still on the
                    # source while it runs on the destination
                    gaps = [(b[0] - a[0]) * 1000 - TICK_MS
                            for a, b in zip(dst_ticks, dst_ticks[1:])
                            if b[0] <= t_end + 0.5]
                    case['postcopy_dst_max_tick_gap_ms'] = round(
                        max(gaps, default=0.0), 1)
                if not dst_ticks:
                    case['destination_status'] = qmp.execute(
                        dst.control, 'query-status')['status']
                    with open(dst.console_log, 'rb') as f:
                        case['destination_console_tail'] = f.read()[
                            -2500:].decode(errors='replace')
            else:
                handle.cancel()
            if hasattr(ctl, 'decisions'):
                case['policy_steps'] = [d for d in ctl.decisions
                                        if '->' in d or 'abort' in d]
        finally:
            watcher.stop.set()
            case['loadavg_end'] = common.loadavg()
            for d in (dst, src):
                try:
                    if hyp.pid(d) is not None:
                        hyp.kill(d)
                except Exception as e:     # noqa: BLE001 - cleanup
                    common.say('kill %s: %s', d.path, e)
            if os.environ.get('MIGBENCH_KEEP'):
                common.say('kept %s', tmp)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        return case


if __name__ == '__main__':
    common.bench_main(LiveMigrationBench, RESULT, __doc__, add_arguments)
