"""The `vdsk` console script: qemu-img-like commands over libvdsk.

    vdsk info [--json] [-f FMT] FILE
    vdsk create -f FMT [-b BACKING [-F BACKING_FMT]] [-o cluster_size=N]
                FILE [SIZE]
    vdsk convert [-f FMT] [-O FMT] [-c] [-m WORKERS] [-t CACHE] [--copy-range]
                 SRC DST
    vdsk check [-r leaks|all] [-f FMT] FILE     (-r all: leaks only)
    vdsk snapshot (-c|-l|-a|-d) [NAME] FILE
    vdsk resize FILE [+|-]SIZE
    vdsk commit [-f FMT] FILE
    vdsk rebase [-u] -b BACKING [-F FMT] [-f FMT] FILE
    vdsk bench [--read|-w|--write] [--pattern seq|rand] [-s|--block-size N]
               [-t|--threads|-d N] [-c|--count N] [-o OFFSET] [-S STEP] FILE

Exit status: 0 success, 1 error; check: 2 corruptions found, 3 leaks
only (like qemu-img).
"""
import argparse
import json
import sys
import time

from nova_bhyve.storage import vdsk

_SUFFIX = {'': 0, 'b': 0, 'k': 10, 'm': 20, 'g': 30, 't': 40, 'p': 50,
           'e': 60}


def parse_size(text):
    """'10G', '512', '64k' -> bytes (powers of 1024, like qemu-img)."""
    s = text.strip().lower()
    num = s.rstrip('bkmgtpe')
    unit = s[len(num):]
    if unit.endswith('ib'):
        unit = unit[:-2]
    if not num or unit not in _SUFFIX:
        raise argparse.ArgumentTypeError('invalid size: %r' % text)
    try:
        value = float(num) if '.' in num else int(num)
    except ValueError:
        raise argparse.ArgumentTypeError('invalid size: %r' % text)
    return int(value * (1 << _SUFFIX[unit]))


def _human(n):
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'):
        if n < 1024 or unit == 'PiB':
            return ('%d %s' % (n, unit)) if unit == 'B' else \
                ('%.3g %s' % (n, unit))
        n /= 1024.0


def cmd_info(a):
    i = vdsk.info(a.file, fmt=a.f)
    if a.json:
        out = {'filename': a.file, 'format': i['format'],
               'virtual-size': i['virtual_size'],
               'actual-size': i['actual_size'],
               'dirty-flag': i['dirty']}
        if i['cluster_size']:
            out['cluster-size'] = i['cluster_size']
        if i['backing_file']:
            out['backing-filename'] = i['backing_file']
        if i['backing_format']:
            out['backing-filename-format'] = i['backing_format']
        print(json.dumps(out, indent=4))
        return 0
    print('image: %s' % a.file)
    print('file format: %s' % i['format'])
    print('virtual size: %s (%d bytes)' % (_human(i['virtual_size']),
                                          i['virtual_size']))
    print('disk size: %s' % _human(i['actual_size']))
    if i['cluster_size']:
        print('cluster_size: %d' % i['cluster_size'])
    if i['backing_file']:
        print('backing file: %s' % i['backing_file'])
    if i['backing_format']:
        print('backing file format: %s' % i['backing_format'])
    return 0


def _options(opts):
    out = {}
    for group in opts or []:
        for kv in group.split(','):
            k, _, v = kv.partition('=')
            out[k.strip().replace('-', '_')] = v.strip()
    unknown = set(out) - {'cluster_size', 'backing_file', 'backing_fmt'}
    if unknown:
        raise vdsk.VdskError(22, 'unknown option(s): %s' %
                             ', '.join(sorted(unknown)))
    return out


def cmd_create(a):
    o = _options(a.o)
    backing = a.b or o.get('backing_file')
    if a.size is None and not backing:
        raise vdsk.VdskError(22, 'image size required without a backing '
                             'file')
    cs = parse_size(o['cluster_size']) if 'cluster_size' in o else None
    vdsk.create(a.file, a.f, a.size or 0, backing=backing,
                backing_fmt=a.F or o.get('backing_fmt'), cluster_size=cs)
    return 0


def cmd_convert(a):
    if a.c and a.O != 'qcow2':
        raise vdsk.VdskError(22, 'compression needs -O qcow2')
    vdsk.convert(a.src, a.dst, src_fmt=a.f, dst_fmt=a.O, compress=a.c,
                 workers=a.m, flush=a.t != 'unsafe',
                 copy_range=a.copy_range)
    return 0


def cmd_check(a):
    res = vdsk.check(a.file, repair=bool(a.r), fmt=a.f)
    if a.r == 'all':
        print('vdsk: -r all repairs leaked clusters only', file=sys.stderr)
    fixed_l, fixed_c = res['leaks_fixed'], res['corruptions_fixed']
    if fixed_l or fixed_c:
        print('The following inconsistencies were found and repaired:\n')
        print('    %d leaked clusters' % fixed_l)
        print('    %d corruptions\n' % fixed_c)
    corrupt, leaks = res['corruptions'], res['leaks']
    if corrupt:
        print('%d errors were found on the image.' % corrupt)
        print('Data may be corrupted, or further writes to the image may '
              'corrupt it.')
    if leaks:
        print('%d leaked clusters were found on the image.' % leaks)
        print('This means waste of disk space, but no harm to data.')
    if not corrupt and not leaks:
        print('No errors were found on the image.')
    if res['total_clusters']:
        print('%d/%d = %.2f%% allocated clusters' % (
            res['allocated_clusters'], res['total_clusters'],
            100.0 * res['allocated_clusters'] / res['total_clusters']))
    return 2 if corrupt else 3 if leaks else 0


def _clock(ns):
    s = ns // 10 ** 9
    return '%04d:%02d:%02d.%03d' % (s // 3600, s // 60 % 60, s % 60,
                                     ns // 10 ** 6 % 1000)


def cmd_snapshot(a):
    if a.l:
        if a.name is not None:
            raise vdsk.VdskError(22, '-l takes no snapshot name')
        snaps = vdsk.snapshot_list(a.file)
        if snaps:
            print('Snapshot list:')
            print('%-10s%-17s%8s%20s%13s' % ('ID', 'TAG', 'VM SIZE',
                                            'DATE', 'VM CLOCK'))
        for s in snaps:
            date = time.strftime('%Y-%m-%d %H:%M:%S',
                                 time.localtime(s['date_sec']))
            print('%-10s%-17s%8s%20s%13s' % (
                s['id'], s['name'], _human(s['vm_state_size']), date,
                _clock(s['vm_clock_nsec'])))
        return 0
    if not a.name:
        raise vdsk.VdskError(22, 'snapshot name required')
    op = 'create' if a.c else 'apply' if a.a else 'delete'
    getattr(vdsk, 'snapshot_' + op)(a.file, a.name)
    return 0


def cmd_resize(a):
    text = a.size
    rel = text[0] if text[:1] in '+-' else ''
    size = parse_size(text.lstrip('+-'))
    with vdsk.open(a.file, fmt=a.f) as img:
        if rel:
            size = img.size + size if rel == '+' else img.size - size
        if size < 0:
            raise vdsk.VdskError(22, 'new size would be negative')
        img.resize(size)
    print('Image resized.')
    return 0


def cmd_commit(a):
    vdsk.commit(a.file, fmt=a.f)
    print('Image committed.')
    return 0


def cmd_rebase(a):
    vdsk.rebase(a.file, a.b or None, backing_fmt=a.F, unsafe=a.u, fmt=a.f)
    return 0


def cmd_bench(a):
    step = a.S
    if a.write is None:
        a.write = False
    print('Sending %d %s requests, %d bytes each, %d in parallel '
          '(%s, starting at offset %d, step size %d)' % (
              a.count, 'write' if a.write else 'read', a.block_size,
              a.threads, 'random' if a.pattern == 'rand' else 'sequential',
              a.o, step or a.block_size))
    r = vdsk.bench(a.file, write=a.write, pattern=a.pattern,
                   block_size=a.block_size, threads=a.threads,
                   count=a.count, offset=a.o, step=step, fmt=a.f,
                   flush_interval=a.flush_interval)
    if a.json:
        print(json.dumps(r))
    else:
        print('Run completed in %.3f seconds.' % r['seconds'])
        print('%.0f IOPS, %.2f MiB/s' % (r['iops'], r['mb_per_s']))
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog='vdsk', description='Virtual disk '
                                'image tool (libvdsk).')
    sub = p.add_subparsers(dest='cmd', metavar='COMMAND')
    sub.required = True

    s = sub.add_parser('info', help='describe an image')
    s.add_argument('--json', action='store_true')
    s.add_argument('--output', choices=['human', 'json'])
    s.add_argument('-f', metavar='FMT')
    s.add_argument('file')
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser('create', help='create an image')
    s.add_argument('-f', metavar='FMT', default='raw')
    s.add_argument('-b', metavar='BACKING')
    s.add_argument('-F', metavar='BACKING_FMT')
    s.add_argument('-o', action='append', metavar='OPTIONS')
    s.add_argument('file')
    s.add_argument('size', nargs='?', type=parse_size)
    s.set_defaults(fn=cmd_create)

    s = sub.add_parser('convert', help='copy an image, sparse')
    s.add_argument('-f', metavar='FMT')
    s.add_argument('-O', metavar='FMT', default='raw')
    s.add_argument('-c', action='store_true', help='compress (qcow2)')
    s.add_argument('-m', type=int, metavar='WORKERS', help='parallel '
                   'copy threads')
    s.add_argument('-t', choices=['writeback', 'unsafe'],
                   default='writeback', metavar='CACHE',
                   help='writeback (default): fsync the result before '
                   'returning; unsafe: leave it to the page cache, like '
                   "qemu-img convert's default")
    s.add_argument('--copy-range', action='store_true',
                   help='copy with copy_file_range (clones extents on '
                   'XFS/btrfs; slower on ext4)')
    s.add_argument('src')
    s.add_argument('dst')
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser('check', help='check an image for consistency')
    s.add_argument('-r', choices=['leaks', 'all'])
    s.add_argument('-f', metavar='FMT')
    s.add_argument('file')
    s.set_defaults(fn=cmd_check)

    s = sub.add_parser('snapshot', help='vdsk snapshot')
    g = s.add_mutually_exclusive_group(required=True)
    for flag in 'clad':
        g.add_argument('-' + flag, action='store_true')
    s.add_argument('name', nargs='?')
    s.add_argument('file')
    s.set_defaults(fn=cmd_snapshot)

    s = sub.add_parser('resize', help='change the virtual size')
    s.add_argument('-f', metavar='FMT')
    s.add_argument('file')
    s.add_argument('size')
    s.set_defaults(fn=cmd_resize)

    s = sub.add_parser('commit', help='write an overlay into its backing '
                       'file')
    s.add_argument('-f', metavar='FMT')
    s.add_argument('file')
    s.set_defaults(fn=cmd_commit)

    s = sub.add_parser('rebase', help='change the backing file')
    s.add_argument('-u', action='store_true', help='unsafe: header only')
    s.add_argument('-b', metavar='BACKING', required=True,
                   help='new backing file ("" for none)')
    s.add_argument('-F', metavar='FMT')
    s.add_argument('-f', metavar='FMT')
    s.add_argument('file')
    s.set_defaults(fn=cmd_rebase)

    s = sub.add_parser('bench', help='I/O benchmark (like qemu-img bench)')
    rw = s.add_mutually_exclusive_group()
    rw.add_argument('--read', dest='write', action='store_false',
                    default=None)
    rw.add_argument('-w', '--write', dest='write', action='store_true')
    s.add_argument('--pattern', choices=['seq', 'rand'], default='seq')
    s.add_argument('-s', '--block-size', type=parse_size, default=4096)
    s.add_argument('-t', '--threads', '-d', '--depth', dest='threads',
                   type=int, default=1)
    s.add_argument('-c', '--count', type=int, default=75000)
    s.add_argument('-o', '--offset', dest='o', type=parse_size, default=0)
    s.add_argument('-S', '--step-size', dest='S', type=parse_size)
    s.add_argument('--flush-interval', type=int, default=0)
    s.add_argument('--json', action='store_true')
    s.add_argument('-f', metavar='FMT')
    s.add_argument('file')
    s.set_defaults(fn=cmd_bench)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, 'output', None) == 'json':
        args.json = True
    try:
        return args.fn(args)
    except vdsk.VdskError as e:
        print('vdsk: %s' % (e.strerror or e), file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
