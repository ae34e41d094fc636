#!/usr/bin/env python3
"""Guest-visible pause of a live snapshot, and its total time vs qemu-img.

    bench/snapshot_pause.py [--runs 3] [--fill-mb 32]

One TCG test guest (256 MiB, private copy of the root image). The guest
writes --fill-mb of random data to its root disk, then runs a tight loop
printing /proc/uptime on its serial console. The host timestamps every line
as it arrives on the serial socket. Each run takes a snapshot the way the
driver does (nova_bhyve.storage.snapshot: freeze = blockdev-snapshot-sync onto
an overlay, export of the frozen chain with libvdsk to a standalone qcow2,
thaw = block-commit + block-job-complete) and reports:

* pause_host_s: the longest gap between two console lines while the
  freeze / thaw QMP commands ran (compared with the longest gap in a
  baseline window of the same length before the snapshot);
* pause_guest_s: the longest step of the guest's own clock between two
  consecutive loop iterations in the same window;
* freeze_s, export_s, thaw_s, total_s.

Afterwards the VM is stopped and the same disk chain is converted with
``qemu-img convert -O qcow2`` and with the driver's export, cold, for the
comparison. Prints one JSON object on stdout.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import lifecycle_vm as lv

from nova_bhyve.storage import snapshot


def gaps(lines, t0, t1):
    """(max host gap, max guest-clock gap) among the uptime lines that
    arrived in [t0, t1] (plus the line just before t0)."""
    sel = [(t, float(line.split()[0])) for t, line in lines
           if _is_uptime(line)]
    before = [x for x in sel if x[0] < t0][-1:]
    win = before + [x for x in sel if t0 <= x[0] <= t1]
    after = [x for x in sel if x[0] > t1][:1]
    win += after
    if len(win) < 2:
        return None, None
    host = max(b[0] - a[0] for a, b in zip(win, win[1:]))
    guest = max(b[1] - a[1] for a, b in zip(win, win[1:]))
    return round(host, 3), round(guest, 3)


def _is_uptime(line):
    parts = line.split()
    if len(parts) != 2:
        return False
    try:
        float(parts[0]), float(parts[1])
    except ValueError:
        return False
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--runs', type=int, default=3)
    ap.add_argument('--fill-mb', type=int, default=32)
    args = ap.parse_args()
    vm = lv.BenchVM(memory_mb=256, cmdline='console=ttyS0')
    runs = []
    try:
        vm.start()
        vm.shell('dd if=/dev/urandom of=/mnt/root/fill bs=1M count=%d '
                 '2>/dev/null; sync; echo FILLED-$((1+1))' % args.fill_mb,
                 'FILLED-2')
        vm.serial.send('while :; do cat /proc/uptime; done\n')
        time.sleep(5)
        for i in range(args.runs):
            out = os.path.join(vm.tmp, 'snap-%d.qcow2' % i)
            overlay = os.path.join(vm.vmdir.path, 'snapshot-overlay-0.qcow2')
            base_t0 = time.monotonic() - 3
            t0 = time.monotonic()
            vm.hv.freeze_disk(vm.vmdir, 0, overlay)
            t1 = time.monotonic()
            written = snapshot.export(vm.vmdir.disk(), 'qcow2', out, 'qcow2')
            t2 = time.monotonic()
            vm.hv.thaw_disk(vm.vmdir, 0, overlay)
            t3 = time.monotonic()
            time.sleep(1.0)
            lines = list(vm.serial.lines)
            fh, fg = gaps(lines, t0, t1)
            th, tg = gaps(lines, t2, t3)
            bh, bg = gaps(lines, base_t0, base_t0 + 1.0)
            run = {'freeze_s': round(t1 - t0, 3),
                   'export_s': round(t2 - t1, 3),
                   'thaw_s': round(t3 - t2, 3),
                   'total_s': round(t3 - t0, 3),
                   'pause_host_s': max(fh or 0, th or 0),
                   'pause_guest_s': max(fg or 0, tg or 0),
                   'freeze_gap_host_s': fh, 'thaw_gap_host_s': th,
                   'baseline_max_gap_host_s': bh,
                   'baseline_max_gap_guest_s': bg,
                   'image_bytes': os.path.getsize(out),
                   'data_bytes': written}
            lv.say('run %d: %s', i, json.dumps(run))
            runs.append(run)
            os.unlink(out)
            time.sleep(3)
        ticks_ok = vm.hv.is_running(vm.vmdir)
        vm.serial.close()
        vm.hv.kill(vm.vmdir)
        # cold: the same chain, qemu-img vs the driver's export
        disk = vm.vmdir.disk()
        t = time.monotonic()
        subprocess.run(['qemu-img', 'convert', '-O', 'qcow2', disk,
                        os.path.join(vm.tmp, 'qi.qcow2')], check=True)
        qemu_img_s = time.monotonic() - t
        t = time.monotonic()
        snapshot.export(disk, 'qcow2', os.path.join(vm.tmp, 'ex.qcow2'),
                        'qcow2')
        export_cold_s = time.monotonic() - t
        subprocess.run(['qemu-img', 'compare', os.path.join(vm.tmp,
                                                            'qi.qcow2'),
                        os.path.join(vm.tmp, 'ex.qcow2')], check=True,
                       stdout=subprocess.DEVNULL)
        result = {
            'guest': {'memory_mb': 256, 'disk_virtual_gib': 1,
                      'fill_mb': args.fill_mb, 'accel': 'tcg'},
            'runs': runs,
            'vm_running_after': ticks_ok,
            'cold_qemu_img_convert_s': round(qemu_img_s, 3),
            'cold_driver_export_s': round(export_cold_s, 3),
            'cold_outputs_identical': True,
            'loadavg': open('/proc/loadavg').read().split()[:3],
        }
        print(json.dumps(result, indent=1))
    finally:
        vm.stop()


if __name__ == '__main__':
    sys.exit(main())
