#!/usr/bin/env python3
"""Markdown tables from bench/live_migration.py's JSON results.

    bench/migration_table.py results-migration/FILE.json [...]

One row per case (rate, controller, run), and per rate a summary line: each
controller's median total time and whether the policy's is no worse than
the best baseline's.
"""
import json
import statistics
import sys

BASELINES = ('qemu', 'libvirt')
COLUMNS = ('rate MiB/s (measured median)', 'controller', 'run', 'outcome',
           'total s', 'passes', 'QEMU downtime ms',
           'switchover gap ms (guest clock)', 'largest gap in migration ms',
           'pre-migration largest gap ms', 'max downtime limit ms',
           'max throttle %', 'post-copy: switch at s / phase s / largest '
           'destination gap ms')


def _cell(value, fmt='%s'):
    return '-' if value is None else fmt % value


def row(c):
    done = c.get('outcome') == 'completed'
    gap = (_cell(c.get('switchover_gap_ms')) + ' (' +
           _cell(c.get('switchover_guest_clock_ms')) + ')') if done else '-'
    post = '-'
    if c.get('postcopy_switch_s') is not None:
        post = '%s / %s / %s' % (c['postcopy_switch_s'],
                                 _cell(c.get('postcopy_s')),
                                 _cell(c.get('postcopy_dst_max_tick_gap_ms')))
    outcome = c.get('outcome') or '-'
    if done and not c.get('resumed_on_destination', True):
        outcome += ', guest did not run on the destination'
    return [
        '%d (%s)' % (c['rate_mibps'], c.get('dirty_rate_mibps_median')),
        c['controller'], str(c.get('run', 0)), outcome,
        _cell(c.get('total_s')), _cell(c.get('rounds')),
        _cell(c.get('qemu_downtime_ms')) if done else '-', gap,
        _cell(c.get('guest_gap_ms')) if done else '-',
        _cell(c.get('pre_migration_max_tick_gap_ms')),
        _cell(c.get('max_downtime_limit_ms')),
        _cell(c.get('max_throttle_pct')), post]


def summary(cases):
    lines = []
    for rate in sorted({c['rate_mibps'] for c in cases}):
        times = {}
        for c in cases:
            if c['rate_mibps'] != rate:
                continue
            t = c['total_s'] if c.get('outcome') == 'completed' else None
            times.setdefault(c['controller'], []).append(t)
        parts = []
        medians = {}
        for name, ts in sorted(times.items()):
            done = [t for t in ts if t is not None]
            if len(done) == len(ts):
                medians[name] = statistics.median(done)
                parts.append('%s %.2f s' % (name, medians[name]))
            else:
                parts.append('%s: %d of %d finished' % (name, len(done),
                                                        len(ts)))
        best = [medians[b] for b in BASELINES if b in medians]
        verdict = ''
        for ours in ('policy', 'policy-postcopy'):
            if ours not in medians:
                continue
            if not best:
                verdict += '; %s finishes where no baseline does' % ours
            else:
                verdict += '; %s %+.2f s against the best baseline' % (
                    ours, medians[ours] - min(best))
        lines.append('* %d MiB/s: %s%s' % (rate, ', '.join(parts), verdict))
    return lines


def main(paths):
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        cases = result['cases']
        print('`%s`: load before %s, after %s\n' % (
            path, result.get('loadavg_before', '?'),
            result.get('loadavg_after', '?')))
        print('| ' + ' | '.join(COLUMNS) + ' |')
        print('|' + '---|' * len(COLUMNS))
        for c in cases:
            print('| ' + ' | '.join(row(c)) + ' |')
        print()
        print('\n'.join(summary(cases)))
        print()


if __name__ == '__main__':
    main(sys.argv[1:])
