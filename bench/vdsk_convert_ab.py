#!/usr/bin/env python3
"""raw -> qcow2 convert: two vdsktool builds against qemu-img, alternating.

    python bench/vdsk_convert_ab.py OLD_VDSKTOOL NEW_VDSKTOOL SRC.raw OUTDIR
        REPS JSON

Each rep runs qemu-img convert, old and new `vdsktool convert -t unsafe`,
old and new `vdsktool convert` (fsync); every run starts after removing
the output and a sync; wall is the command, synced adds a sync after it,
cpu is the child's user+sys.  The C tool has no Python start-up, so this
isolates the library.  Prints min and median; writes every run to JSON.
"""
import json
import os
import subprocess
import sys
import time


def main():
    old, new, src, outdir, reps, dst_json = sys.argv[1:7]
    out = os.path.join(outdir, 'ab.out')
    conv = ['convert', '-f', 'raw', '-O', 'qcow2']
    tools = {'qemu': ['qemu-img'] + conv + [src, out],
             'old_unsafe': [old, 'convert', '-t', 'unsafe'] + conv[1:] +
             [src, out],
             'new_unsafe': [new, 'convert', '-t', 'unsafe'] + conv[1:] +
             [src, out],
             'old_fsync': [old] + conv + [src, out],
             'new_fsync': [new] + conv + [src, out]}
    res = {k: [] for k in tools}
    la0 = os.getloadavg()
    for _ in range(int(reps)):
        for k, argv in tools.items():
            if os.path.exists(out):
                os.unlink(out)
            os.sync()
            c0, t0 = os.times(), time.monotonic()
            subprocess.run(argv, check=True)
            t1 = time.monotonic()
            os.sync()
            t2, c1 = time.monotonic(), os.times()
            res[k].append({'wall': t1 - t0, 'synced': t2 - t0,
                           'cpu': c1.children_user + c1.children_system -
                           c0.children_user - c0.children_system})
    os.unlink(out)
    la1 = os.getloadavg()
    with open(dst_json, 'w') as f:
        json.dump({'load_before': la0, 'load_after': la1, 'runs': res}, f,
                  indent=1)
    print('load average before %.2f, after %.2f' % (la0[0], la1[0]))
    for k, v in res.items():
        for m in ('wall', 'synced', 'cpu'):
            xs = sorted(r[m] for r in v)
            print('%-11s %-6s min %.2f median %.2f' % (k, m, xs[0],
                                                      xs[len(xs) // 2]))


if __name__ == '__main__':
    main()
