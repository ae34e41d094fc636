#!/usr/bin/env python3
"""Suspend + resume of a 1 GiB guest: the driver vs QEMU by hand.

    bench/suspend_resume.py [--runs 2] [--memory-mb 1024] [--fill-mb 256]

One TCG test guest with nbtick=1; --fill-mb of non-zero data is put in its
tmpfs first so the saved state is not just zero pages. Then, per run:

* driver: QemuHypervisor.save() (stop, migrate to exec:cat > FILE.partial
  uncapped, fsync, rename, quit) and .restore() (-S -incoming exec:cat FILE,
  wait, cont, remove FILE) - what BhyveDriver.suspend/resume call;
* by hand, QEMU's own save-to-file as an operator would type it over QMP:
  stop; migrate "exec:cat > FILE"; poll query-migrate; quit; then the same
  command line + -incoming "exec:cat FILE"; poll; cont. Once with QEMU's
  default migration bandwidth cap (32 MiB/s) and once with the cap lifted.

After every resume the guest's tick counter must continue (n+1, no restart).
Prints one JSON object on stdout; the VM is stopped by PID.
"""
import argparse
import json
import os
import sys
import time

import lifecycle_vm as lv

from nova_bhyve import conf
from nova_bhyve.hypervisor.qemu import backend as qemu
from nova_bhyve.hypervisor.qemu import qmp
from nova_bhyve.hypervisor.qemu import resources as qemu_resources
from nova_bhyve.hypervisor.qemu import state as qemu_state

CONF = conf.CONF


def wait_migrate(vm):
    while True:
        st = qmp.execute(vm.vmdir.control, 'query-migrate').get('status')
        if st == 'completed':
            return
        if st in ('failed', 'cancelled'):
            raise RuntimeError('migration ' + st)
        time.sleep(0.01)


def check_ticks(vm, last):
    deadline = time.monotonic() + 120
    while True:
        t = vm.ticks()
        after = t[t.index(last) + 1:] if last in t else []
        if after:
            if after[0] != last + 1:
                raise RuntimeError('tick %d after %d' % (after[0], last))
            return
        if time.monotonic() > deadline:
            raise RuntimeError('no tick after %d' % last)
        time.sleep(0.1)


def by_hand(vm, path, capped):
    c = vm.vmdir.control
    pid = vm.hv.pid(vm.vmdir)
    t0 = time.monotonic()
    qmp.execute(c, 'stop')
    if not capped:
        qmp.execute(c, 'migrate-set-parameters',
                    {'max-bandwidth': qemu_state.SAVE_BANDWIDTH})
    qmp.execute(c, 'migrate', {'uri': 'exec:cat > %s' % path})
    wait_migrate(vm)
    qmp.execute(c, 'quit')
    while vm.hv.pid(vm.vmdir):
        time.sleep(0.01)
    t1 = time.monotonic()
    last = vm.ticks()[-1]
    t2 = time.monotonic()
    res = qemu_resources.open_all(vm.spec, vm.vmdir,
                                  CONF.bhyve.console_log_keep_bytes)
    try:
        argv = qemu.render_argv(vm.spec, vm.vmdir, vm.hv.binary, 'tcg', res)
        qemu_state.launch(vm.hv, argv + ['-S', '-incoming',
                                         'exec:cat %s' % path],
                          vm.vmdir, vm.spec.uuid, res.fds)
    finally:
        res.close()
    wait_migrate(vm)
    qmp.execute(vm.vmdir.control, 'cont')
    t3 = time.monotonic()
    size = os.path.getsize(path)
    os.unlink(path)
    assert pid != vm.hv.pid(vm.vmdir)
    return t1 - t0, t3 - t2, size, last


def driver(vm):
    t0 = time.monotonic()
    vm.hv.save(vm.vmdir)
    t1 = time.monotonic()
    size = os.path.getsize(vm.vmdir.saved_state)
    last = vm.ticks()[-1]
    vm.hv.restore(vm.spec, vm.vmdir)
    t2 = time.monotonic()
    return t1 - t0, t2 - t1, size, last


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--runs', type=int, default=2)
    ap.add_argument('--memory-mb', type=int, default=1024)
    ap.add_argument('--fill-mb', type=int, default=256)
    args = ap.parse_args()
    vm = lv.BenchVM(memory_mb=args.memory_mb)
    results = {'driver': [], 'by_hand_uncapped': [], 'by_hand_default_cap':
               []}
    try:
        vm.start()
        vm.shell('yes nova-bhyve-fill | head -c $((%d*1048576)) > /tmp/fill; '
                 'ls -l /tmp/fill; echo FILLED-$((1+1))' % args.fill_mb,
                 'FILLED-2')
        vm.serial.close()
        vm.serial = None
        path = os.path.join(vm.vmdir.path, 'byhand.state')
        for i in range(args.runs):
            for name, fn in (
                    ('driver', lambda: driver(vm)),
                    ('by_hand_uncapped', lambda: by_hand(vm, path, False)),
                    ('by_hand_default_cap', lambda: by_hand(vm, path, True))):
                time.sleep(2)
                save_s, restore_s, size, last = fn()
                check_ticks(vm, last)
                r = {'suspend_s': round(save_s, 3),
                     'resume_s': round(restore_s, 3),
                     'total_s': round(save_s + restore_s, 3),
                     'state_bytes': size}
                lv.say('%s run %d: %s', name, i, json.dumps(r))
                results[name].append(r)
        print(json.dumps({
            'guest': {'memory_mb': args.memory_mb, 'fill_mb': args.fill_mb,
                      'accel': 'tcg'},
            'results': results, 'ticks_continued': True,
            'loadavg': open('/proc/loadavg').read().split()[:3]}, indent=1))
    finally:
        vm.stop()


if __name__ == '__main__':
    sys.exit(main())
