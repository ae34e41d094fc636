#!/usr/bin/env python3
"""Build the libvdsk fuzz targets, make the seed corpus and run each target
for a bounded time, one after the other (-jobs=1: the machine is shared).

Used by the CI test (tests/unit/test_vdsk_fuzz.py, seconds per target)
and by bench/fuzz.py (minutes per target, results recorded).  As a
script:  fuzzrun.py [--seconds N] [--workdir DIR] [TARGET...]
exits 1 and prints the reproducer and sanitizer output of every finding.
"""
import argparse
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

FUZZ_DIR = pathlib.Path(__file__).resolve().parent
NATIVE = FUZZ_DIR.parent
BUILD = NATIVE / '_build' / 'fuzz'
TARGETS = ('qcow2', 'vmdk', 'vdi', 'vpc', 'probe')
# libFuzzer's artifact kinds that are findings (slow-unit-* is not)
FINDING_KINDS = ('crash', 'leak', 'timeout', 'oom')
DONE_RE = re.compile(
    r'^#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)'
    r'.*?exec/s: (\d+) rss: (\d+)Mb', re.M)
STAT_RE = re.compile(r'^stat::(\w+):\s+(\d+)', re.M)


class Finding(object):
    def __init__(self, target, reproducer, output):
        self.target = target
        self.reproducer = reproducer    # the input file, or None
        self.output = output            # the sanitizer/harness report

    def __str__(self):
        return 'fuzz_%s: reproducer %s\n%s' % (
            self.target, self.reproducer or '(none written)', self.output)


class Result(object):
    """One target's run: libFuzzer's closing numbers and the findings."""

    def __init__(self, target, seconds):
        self.target = target
        self.seconds = seconds
        self.runs = self.cov = self.ft = self.corpus_units = 0
        self.exec_per_sec = self.rss_mb = 0
        self.corpus_size = ''
        self.seed_cov = self.seed_ft = 0
        self.findings = []
        self.log = ''


def build(cc=None):
    """make -C native fuzz; returns the target binaries' directory."""
    cmd = ['make', '-C', str(NATIVE), '-j2', 'fuzz']
    if cc:
        cmd.append('FUZZ_CC=' + cc)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError('make fuzz failed:\n' + p.stdout + p.stderr)
    return BUILD


def make_corpus(outdir):
    """Seed corpus (qemu-img made) in outdir/<target>/."""
    outdir = pathlib.Path(outdir)
    if outdir.exists():
        shutil.rmtree(outdir)
    p = subprocess.run([str(FUZZ_DIR / 'make-corpus.sh'), str(outdir)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError('make-corpus.sh failed:\n' + p.stdout + p.stderr)
    return outdir


def _env(tmpdir):
    env = dict(os.environ)
    env['ASAN_OPTIONS'] = 'detect_leaks=1:allocator_may_return_null=0'
    env['UBSAN_OPTIONS'] = 'halt_on_error=1:print_stacktrace=1'
    env['VDSK_FUZZ_TMPDIR'] = str(tmpdir)
    for sym in ('/usr/lib/llvm-14/bin/llvm-symbolizer',
                shutil.which('llvm-symbolizer') or ''):
        if sym and os.access(sym, os.X_OK):
            env['ASAN_SYMBOLIZER_PATH'] = sym
            break
    return env


def _report(log):
    """The part of a libFuzzer log that says what went wrong."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if ('==ERROR:' in line or 'runtime error:' in line or
                'vdsk-fuzz: contract' in line or
                'libFuzzer: timeout' in line or
                'out-of-memory' in line or 'deadly signal' in line):
            return '\n'.join(lines[max(0, i - 2):i + 80])
    return '\n'.join(lines[-60:])


def run_target(target, seeds, workdir, seconds, timeout=20,
               rss_limit_mb=2048):
    """Fuzz one target for `seconds`; the evolving corpus stays in
    workdir/corpus/<target> (reused by later runs of the same workdir)."""
    workdir = pathlib.Path(workdir)
    corpus = workdir / 'corpus' / target
    artifacts = workdir / 'artifacts'
    tmpdir = workdir / 'tmp'
    for d in (corpus, artifacts, tmpdir):
        d.mkdir(parents=True, exist_ok=True)
    seed_dir = pathlib.Path(seeds) / target
    max_len = max([f.stat().st_size for f in seed_dir.iterdir()] + [4096])
    prefix = '%s/%s-' % (artifacts, target)
    before = set(os.listdir(artifacts))
    cmd = [str(BUILD / ('fuzz_' + target)),
           '-max_total_time=%d' % seconds,
           '-timeout=%d' % timeout,
           '-rss_limit_mb=%d' % rss_limit_mb,
           '-max_len=%d' % max_len,
           '-dict=%s' % (FUZZ_DIR / (target + '.dict')),
           '-artifact_prefix=' + prefix,
           '-print_final_stats=1',
           str(corpus), str(seed_dir)]
    res = Result(target, seconds)
    # Started from a small sh, not from this process: Linux carries a
    # process's peak RSS across execve, so a fuzzer exec'd straight from a
    # big pytest process would start "using" pytest's RSS and trip
    # -rss_limit_mb at once.  Its own session, killed as a group on timeout.
    proc = subprocess.Popen(['/bin/sh', '-c', '"$@" & wait $!', 'sh'] + cmd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors='replace', env=_env(tmpdir),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=seconds + timeout + 120)
        res.log, rc = err + out, proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        res.log = err or ''
        rc = -1
        res.findings.append(Finding(target, None, 'libFuzzer did not stop '
                                    'in time\n' + res.log[-4000:]))
    m = re.search(r'^#\d+\s+INITED\s+cov: (\d+) ft: (\d+)', res.log, re.M)
    if m:
        res.seed_cov, res.seed_ft = int(m.group(1)), int(m.group(2))
    done = DONE_RE.findall(res.log)
    if done:
        (runs, cov, ft, units, size, eps, rss) = done[-1]
        res.runs, res.cov, res.ft = int(runs), int(cov), int(ft)
        res.corpus_units, res.corpus_size = int(units), size
        res.exec_per_sec, res.rss_mb = int(eps), int(rss)
    stats = dict(STAT_RE.findall(res.log))
    if not res.runs and 'number_of_executed_units' in stats:
        res.runs = int(stats['number_of_executed_units'])
    new = sorted(set(os.listdir(artifacts)) - before)
    found = [a for a in new if a.split('-', 1)[1].startswith(FINDING_KINDS)]
    for a in found:
        res.findings.append(Finding(target, artifacts / a, _report(res.log)))
    if rc not in (0, -1) and not found:
        res.findings.append(Finding(target, None, 'exit status %d\n%s' % (
            rc, _report(res.log))))
    return res


def run_all(workdir, seconds, targets=TARGETS, timeout=20, cc=None,
            log=None):
    workdir = pathlib.Path(workdir)
    build(cc)
    seeds = make_corpus(workdir / 'seeds')
    results = []
    for t in targets:
        t0 = time.time()
        r = run_target(t, seeds, workdir, seconds, timeout=timeout)
        r.wall = time.time() - t0
        if log:
            log('fuzz_%s: %d runs, %d exec/s, cov %d ft %d (seeds: cov %d '
                'ft %d), corpus %d units, %d finding(s), %.0f s' % (
                    t, r.runs, r.exec_per_sec, r.cov, r.ft, r.seed_cov,
                    r.seed_ft, r.corpus_units, len(r.findings), r.wall))
        results.append(r)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--seconds', type=int, default=20,
                    help='fuzzing time per target')
    ap.add_argument('--timeout', type=int, default=20,
                    help='seconds per input before it is a finding')
    ap.add_argument('--workdir', default=None,
                    help='corpus/artifacts directory (default: a temp dir)')
    ap.add_argument('--cc', default=None, help='clang to build with')
    ap.add_argument('targets', nargs='*', default=list(TARGETS))
    a = ap.parse_args(argv)
    import tempfile
    workdir = a.workdir or tempfile.mkdtemp(prefix='vdsk-fuzz-')
    results = run_all(workdir, a.seconds, a.targets, a.timeout, a.cc,
                      log=lambda s: print(s, flush=True))
    findings = [f for r in results for f in r.findings]
    for f in findings:
        print('\n' + str(f))
    print('workdir: %s' % workdir)
    return 1 if findings else 0


if __name__ == '__main__':
    sys.exit(main())
