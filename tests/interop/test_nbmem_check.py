"""The test guest's memory dirtier in check mode (tools/guest/nbmem.c,
``nbmem RATE SIZE TICK check``): the oracle the live-migration tests use for
"memory the guest wrote during the migration arrived intact".

nbmem is plain Linux C, so it runs here on the host, built with the guest
build's own flags; the corruption a lossy migration would leave (a page with
an older value) is made for real by writing into the running process's
buffer through /proc/PID/mem. Nothing is mocked.
"""
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

SOURCE = os.path.join(os.path.dirname(__file__), '..', '..', 'tools',
                      'guest', 'nbmem.c')
START_RE = re.compile(rb'NBMEM-START .* check=1 buf=0x([0-9a-f]+)\n')
STOP_RE = re.compile(rb'NBMEM-STOP seq=(\d+) dirtied_mib=(\d+) '
                     rb'elapsed_ms=(\d+) checked=(\d+) corrupt=(\d+)\n')
PAGE = 4096

pytestmark = pytest.mark.skipif(shutil.which('gcc') is None,
                                reason='needs gcc')


@pytest.fixture(scope='module')
def nbmem(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('nbmem') / 'nbmem')
    # the flags of tools/build-test-guest
    subprocess.run(['gcc', '-static', '-O2', '-Wall', '-Wextra', '-Werror',
                    '-o', out, SOURCE], check=True)
    return out


def _start(nbmem, *args):
    proc = subprocess.Popen([nbmem] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline()
    m = START_RE.match(line)
    if m is None:
        proc.kill()
        proc.wait()
        pytest.fail('no check-mode start line: %r' % line)
    return proc, int(m.group(1), 16)


def _stop(proc, timeout=30):
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=timeout)
    return out, err


def test_a_clean_run_checks_every_pass(nbmem):
    """64 MiB/s over 1 MiB: the buffer is rewritten every ~16 ms, and each
    full pass is compared with the shadow copy."""
    proc, _ = _start(nbmem, 64, 1, 5, 'check')
    time.sleep(1.0)
    out, err = _stop(proc)
    assert proc.returncode == 0, (out[-500:], err)
    m = STOP_RE.search(out)
    assert m, out[-500:]
    checked, corrupt = int(m.group(4)), int(m.group(5))
    assert corrupt == 0 and b'NBMEM-CORRUPT' not in out
    # 256 pages per pass; well over one pass plus the final check
    assert checked >= 256 * 10 and checked % 256 == 0


def test_a_stale_page_is_reported_and_fails_the_run(nbmem):
    """RATE 0: nothing rewrites the buffer, so the value written into page 5
    from outside is still there at the final check."""
    proc, buf = _start(nbmem, 0, 1, 5, 'check')
    try:
        with open('/proc/%d/mem' % proc.pid, 'r+b', buffering=0) as mem:
            mem.seek(buf + 5 * PAGE)
            mem.write((424242).to_bytes(8, 'little'))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    out, err = _stop(proc)
    assert proc.returncode == 3, (out[-500:], err)
    assert b'NBMEM-CORRUPT page=5 want=1 got=424242\n' in out
    m = STOP_RE.search(out)
    assert m and int(m.group(5)) == 1 and int(m.group(4)) == 256


def test_without_check_nothing_changes(nbmem):
    proc = subprocess.Popen([nbmem, '0', '1', '5'], stdout=subprocess.PIPE)
    line = proc.stdout.readline()
    assert re.match(rb'NBMEM-START rate_mib_s=0 size_mib=1 tick_ms=5 '
                    rb'pid=\d+\n$', line), line
    out, _ = _stop(proc)
    assert proc.returncode == 0
    assert re.search(rb'NBMEM-STOP seq=\d+ dirtied_mib=0 elapsed_ms=\d+\n$',
                     out), out[-200:]


@pytest.mark.parametrize('args', [['1', '1', 'check'],
                                  ['1', '1', '5', 'verify'],
                                  ['1', '1', '5', 'check', 'x']])
def test_bad_arguments_are_refused(nbmem, args):
    r = subprocess.run([nbmem] + args, capture_output=True, timeout=30)
    assert r.returncode == 2
    assert b'usage: nbmem RATE_MIB_S SIZE_MIB [TICK_MS [check]]' in r.stderr
