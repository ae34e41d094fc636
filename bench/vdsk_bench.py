#!/usr/bin/env python3
"""libvdsk vs qemu-img on the same files in the same run.

    python bench/vdsk_bench.py [--dir /tmp/vdsk-bench] [--quick]
        [--only io|convert|memory] [--reps N] [--size-gib N]
        [--installed] [--json FILE]

1. 4 KiB I/O on a 1 GiB fully allocated qcow2, 1 and 4 threads:
   `vdsk bench` vs `qemu-img bench`.  qemu-img bench has no random
   pattern, so both run the same pseudo-random offsets: sequential with a
   large prime stride (-S 7919 * 4 KiB, wrapping at the end of the image
   like qemu-img does).  libvdsk has no O_DIRECT, so both go through the
   page cache: qemu-img bench -t writeback -i threads; its -d (queue
   depth) is vdsk's thread count.  `vdsk bench --pattern rand` (true
   random) is listed too.
2. convert of a 4 GiB (--size-gib) half-allocated image (1 MiB data /
   1 MiB hole),
   qcow2 -> raw and raw -> qcow2: `qemu-img convert` (default: output
   cache mode "unsafe", no flush) vs `vdsk convert -t unsafe` (no flush
   either), and both counting a sync afterwards (`vdsk convert` with its
   default fsync).  Median and spread of N runs, tools alternating.
3. memory: peak RSS of the C stress driver (libvdsk only) with a 1 TiB
   sparse qcow2 open whose 2048 L2 tables are all read, at the default
   L2 cache (4 MiB) and at 1 MiB.
Prints a markdown report on stdout; --json also writes every run's raw
numbers (wall, user+sys, wall until synced), the load averages and the
qemu-img version to FILE.  --installed runs the nova_bhyve installed in
this interpreter's environment instead of the source tree's (whose cffi
module is only there after an in-place build).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10
STRIDE = 7919 * 4096
VDSK = [sys.executable, '-m', 'nova_bhyve.cmd.vdsk']
ENV = dict(os.environ, PYTHONPATH=REPO)
CWD = None        # --installed: run from elsewhere than the source tree
RAW = {}          # --json: raw numbers


CPU = []          # user+sys seconds of each run() child, in order


def run(args):
    t0 = time.monotonic()
    c0 = os.times()
    p = subprocess.run([str(a) for a in args], capture_output=True,
                       text=True, env=ENV, cwd=CWD)
    dt = time.monotonic() - t0
    c1 = os.times()
    CPU.append(c1.children_user + c1.children_system -
               c0.children_user - c0.children_system)
    if p.returncode != 0:
        sys.exit('%s failed: %s%s' % (' '.join(map(str, args)), p.stdout,
                                      p.stderr))
    return p.stdout, dt


def qemu_bench(path, write, threads, count):
    out, _ = run(['qemu-img', 'bench', '-f', 'qcow2', '-t', 'writeback',
                  '-i', 'threads', '-d', threads, '-c', count, '-s', 4096,
                  '-S', STRIDE, '--pattern=165'] + (['-w'] if write else [])
                 + [path])
    secs = float(re.search(r'Run completed in ([\d.]+) seconds', out)
                 .group(1))
    return count / secs


def vdsk_bench(path, write, threads, count, pattern='seq'):
    args = VDSK + ['bench', '--json', '-f', 'qcow2', '-t', threads, '-c',
                   count, '-s', 4096, '--pattern', pattern]
    if pattern == 'seq':
        args += ['-S', STRIDE]
    out, _ = run(args + (['-w'] if write else ['--read']) + [path])
    return json.loads(out.splitlines()[-1])['iops']


def best(fn, n):
    return max(fn() for _ in range(n))


def io_section(d, count, reps):
    img = os.path.join(d, 'io.qcow2')
    run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-o',
         'preallocation=full', img, '1G'])
    rows = []
    for write in (False, True):
        for threads in (1, 4):
            q = best(lambda: qemu_bench(img, write, threads, count), reps)
            v = best(lambda: vdsk_bench(img, write, threads, count), reps)
            r = best(lambda: vdsk_bench(img, write, threads, count,
                                        'rand'), reps)
            rows.append('| 4 KiB %s, %d thread%s | %.0f | %.0f | %.2fx | '
                        '%.0f |' % ('write' if write else 'read', threads,
                                    's' if threads > 1 else '', q, v, v / q,
                                    r))
    run(['qemu-img', 'check', '-q', img])
    os.unlink(img)
    return ['| workload | qemu-img bench IOPS | vdsk bench IOPS | ratio | '
            'vdsk --pattern rand IOPS |', '|---|---|---|---|---|'] + rows


def make_half_allocated(d, size):
    raw = os.path.join(d, 'half.raw')
    chunk = bytes(range(256)) * (MiB // 256)
    with open(raw, 'wb') as f:
        f.truncate(size)
        for off in range(0, size, 2 * MiB):
            f.seek(off)
            f.write(chunk)
    q = os.path.join(d, 'half.qcow2')
    run(['qemu-img', 'convert', '-O', 'qcow2', raw, q])
    return raw, q


def _med(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2.0


def _cell(xs):
    """median (min-max) of wall times."""
    return '%.2f s (%.2f-%.2f)' % (_med(xs), min(xs), max(xs))


def convert_section(d, size, reps):
    """Each rep runs, in turn: qemu-img convert (its default cache mode
    for the output, "unsafe": no flush), vdsk convert -t unsafe (no flush
    either), vdsk convert (default: write-back started during the copy,
    fsync at the end).  Every run is followed by a sync, timed as part of
    the "+ sync" figure: the time until the data is on the disk."""
    raw, q = make_half_allocated(d, size)
    out = os.path.join(d, 'out')
    rows = []
    tools = (
        ('qemu', lambda sf, df, src: ['qemu-img', 'convert', '-f', sf,
                                      '-O', df, src, out]),
        ('vdsk-unsafe', lambda sf, df, src: VDSK + [
            'convert', '-t', 'unsafe', '-f', sf, '-O', df, src, out]),
        ('vdsk', lambda sf, df, src: VDSK + ['convert', '-f', sf, '-O', df,
                                             src, out]))
    for name, src, sf, df in (('qcow2 -> raw', q, 'qcow2', 'raw'),
                              ('raw -> qcow2', raw, 'raw', 'qcow2')):
        wall = {t: [] for t, _ in tools}
        cpu = {t: [] for t, _ in tools}
        synced = {t: [] for t, _ in tools}
        for _ in range(reps):
            for tool, argv in tools:
                if os.path.exists(out):
                    os.unlink(out)
                os.sync()                       # start clean
                _, dt = run(argv(sf, df, src))
                t0 = time.monotonic()
                os.sync()
                wall[tool].append(dt)
                cpu[tool].append(CPU[-1])
                synced[tool].append(dt + time.monotonic() - t0)
                if tool == 'vdsk':
                    c = subprocess.run(['qemu-img', 'compare', '-f', sf,
                                        '-F', df, src, out],
                                       capture_output=True)
                    assert c.returncode == 0, c.stdout
        alloc = os.stat(out).st_blocks * 512
        wq, wu = _med(wall['qemu']), _med(wall['vdsk-unsafe'])
        sq, sv = _med(synced['qemu']), _med(synced['vdsk'])
        rows.append('| %s | %s, cpu %.2f s | %s, cpu %.2f s | %.2fx | '
                    '%s | %s | %.2fx | %d MiB |' % (
                        name, _cell(wall['qemu']), _med(cpu['qemu']),
                        _cell(wall['vdsk-unsafe']),
                        _med(cpu['vdsk-unsafe']), wq / wu,
                        _cell(synced['qemu']), _cell(synced['vdsk']),
                        sq / sv, alloc // MiB))
        RAW.setdefault('convert', {})[name] = {
            t: {'wall_s': wall[t], 'cpu_s': cpu[t], 'synced_s': synced[t]}
            for t in wall}
        RAW['convert'][name]['vdsk_output_allocated_bytes'] = alloc
        os.unlink(out)
    os.unlink(raw)
    os.unlink(q)
    return ['| convert (%d GiB, half allocated) | qemu-img (no flush) | '
            'vdsk -t unsafe (no flush) | speed-up | qemu-img + sync | '
            'vdsk (fsync) + sync | speed-up | vdsk output allocated |'
            % (size // GiB),
            '|---|---|---|---|---|---|---|---|'] + rows


def memory_section(d):
    sys.path.insert(0, REPO)
    from nova_bhyve.storage import vdsk
    path = os.path.join(d, 'big.qcow2')
    vdsk.create(path, 'qcow2', 1 << 40)
    with vdsk.open(path) as img:            # one cluster per L2 table
        for i in range(2048):
            img.write(i * 512 * MiB, b'\x01' * 4096)
    subprocess.run(['make', '-s', '-C', os.path.join(REPO, 'native'),
                    '_build/stress'], check=True)
    exe = os.path.join(REPO, 'native', '_build', 'stress')
    rows = []
    for cache in (0, MiB):
        out, _ = run([exe, '--rss', path, cache, 4096])
        r = json.loads(out)
        rows.append('| %s | %.1f MiB | %.1f MiB |' % (
            'default (4 MiB)' if cache == 0 else '%d MiB' % (cache // MiB),
            r['hwm_kib'] / 1024.0, (r['rss_kib'] - r['rss_before_kib'])
            / 1024.0))
    os.unlink(path)
    return ['| L2 cache | peak RSS of the process | RSS growth from open |',
            '|---|---|---|'] + rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--dir', default='/tmp/vdsk-bench')
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--only', choices=['io', 'convert', 'memory'],
                    action='append', help='run only these sections')
    ap.add_argument('--size-gib', type=int, help='convert source size '
                    '(half of it data; default 4, --quick 1)')
    ap.add_argument('--installed', action='store_true')
    ap.add_argument('--json', metavar='FILE')
    a = ap.parse_args()
    global ENV, CWD
    if a.installed:
        ENV = dict(os.environ)
        ENV.pop('PYTHONPATH', None)
        CWD = a.dir
    RAW.update(argv=sys.argv, python=sys.executable,
               uname=' '.join(os.uname()),
               qemu_img=subprocess.run(['qemu-img', '--version'],
                                       capture_output=True, text=True)
               .stdout.splitlines()[0],
               started=time.strftime('%Y-%m-%dT%H:%M:%S%z'))
    os.makedirs(a.dir, exist_ok=True)
    reps = 1 if a.quick else a.reps
    only = a.only or ['io', 'convert', 'memory']
    if 'io' in only:
        print('## 4 KiB I/O on a 1 GiB qcow2 (IOPS, best of %d)\n' % reps)
        print('\n'.join(io_section(a.dir, 20000 if a.quick else 200000,
                                   reps)))
    if 'convert' in only:
        print('\n## convert (median (min-max) of %d runs, tools '
              'alternating; cpu = median user+sys)\n' % reps)
        RAW['load_before'] = os.getloadavg()
        print('load average before: %.2f %.2f %.2f\n' % RAW['load_before'])
        size = (a.size_gib or (1 if a.quick else 4)) * GiB
        RAW['convert_size_bytes'] = size
        print('\n'.join(convert_section(a.dir, size, reps)))
        RAW['load_after'] = os.getloadavg()
        print('\nload average after: %.2f %.2f %.2f' % RAW['load_after'])
    if 'memory' in only:
        print('\n## memory: 1 TiB sparse qcow2, 2048 L2 tables read\n')
        print('\n'.join(memory_section(a.dir)))
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(RAW, f, indent=1)
            f.write('\n')


if __name__ == '__main__':
    main()
