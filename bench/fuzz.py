#!/usr/bin/env python3
"""Longer libFuzzer runs of the libvdsk fuzz targets (native/fuzz).

    python3 bench/fuzz.py [--minutes 5] [--workdir DIR] [--record] [TARGET...]

Each target runs alone (one process, -jobs=1) for --minutes, with the
qemu-img seed corpus and the corpus grown by earlier runs of the same
--workdir (default /var/tmp/vdsk-fuzz, never in the repository).  Prints
a markdown section with executions/s, coverage (libFuzzer's cov: edges,
ft: features; at the seeds and at the end) and findings; --record
replaces the "## Fuzzing" section of bench/RESULTS-vdsk.md with it.
Exits 1 if anything was found (reproducers stay in DIR/artifacts).
"""
import argparse
import datetime
import os
import pathlib
import re
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'native' / 'fuzz'))
import fuzzrun  # noqa: E402

RESULTS = REPO / 'bench' / 'RESULTS-vdsk.md'


def _clang_version():
    p = subprocess.run(['clang', '--version'], capture_output=True,
                       text=True)
    return p.stdout.splitlines()[0] if p.returncode == 0 else '?'


def section(results, minutes, timeout, load_before, load_after, cmdline):
    lines = [
        '## Fuzzing',
        '',
        textwrap.fill(
            'Produced by `%s` on %s (%s; ASan+UBSan, `-O1`).  Targets run '
            'one after the other, one process each; per-input timeout %d s, '
            'RSS limit 2 GiB.  Load average %s before, %s after: the 2-CPU '
            'VM is shared, so exec/s is only indicative.  cov = edges '
            'covered, ft = libFuzzer features; "seeds" is at the end of '
            'loading the qemu-img seed corpus (`native/fuzz/make-corpus.sh`) '
            'and the corpus grown by earlier runs of the same work '
            'directory.' % (
                cmdline, datetime.date.today().isoformat(),
                _clang_version(), timeout, load_before, load_after),
            width=76),
        '',
        '| target | minutes | runs | exec/s | cov (seeds -> end) | '
        'ft (seeds -> end) | corpus units | peak RSS MiB | findings |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for r in results:
        lines.append('| fuzz_%s | %g | %d | %d | %d -> %d | %d -> %d | %d '
                     '| %d | %s |' % (
                         r.target, minutes, r.runs, r.exec_per_sec,
                         r.seed_cov, r.cov, r.seed_ft, r.ft,
                         r.corpus_units, r.rss_mb,
                         ', '.join(os.path.basename(str(f.reproducer))
                                   for f in r.findings) or 'none'))
    lines.append('')
    return '\n'.join(lines)


def record(text):
    old = RESULTS.read_text()
    m = re.search(r'^## Fuzzing\n.*?(?=^## |\Z)', old, re.M | re.S)
    if m:
        # keep hand-written notes that follow the generated table
        new = old[:m.start()] + text + _notes(m.group(0)) + old[m.end():]
    else:
        new = old.rstrip('\n') + '\n\n' + text
    RESULTS.write_text(new)


def _notes(old_section):
    """Text after the generated table (a '### ' subsection) is kept."""
    i = old_section.find('\n### ')
    return '' if i < 0 else old_section[i:].rstrip('\n') + '\n'


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--minutes', type=float, default=5)
    ap.add_argument('--timeout', type=int, default=10,
                    help='seconds per input before it is a finding')
    ap.add_argument('--workdir', default='/var/tmp/vdsk-fuzz')
    ap.add_argument('--record', action='store_true',
                    help='write the section into bench/RESULTS-vdsk.md')
    ap.add_argument('targets', nargs='*', default=list(fuzzrun.TARGETS))
    a = ap.parse_args()
    load_before = '%.1f' % os.getloadavg()[0]
    results = fuzzrun.run_all(
        a.workdir, int(a.minutes * 60), a.targets, timeout=a.timeout,
        log=lambda s: print(s, file=sys.stderr, flush=True))
    load_after = '%.1f' % os.getloadavg()[0]
    cmd = 'python3 bench/fuzz.py --minutes %g' % a.minutes + (
        ' ' + ' '.join(a.targets) if a.targets != list(fuzzrun.TARGETS)
        else '')
    text = section(results, a.minutes, a.timeout, load_before, load_after, cmd)
    print(text)
    findings = [f for r in results for f in r.findings]
    for f in findings:
        print('\n' + str(f), file=sys.stderr)
    if a.record:
        record(text)
    return 1 if findings else 0


if __name__ == '__main__':
    sys.exit(main())
