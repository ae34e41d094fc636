"""native/conlog: nova-bhyve-conlog, the console logger of a QEMU VM
(hypervisor/qemu/resources.py starts one per VM).

Its ASan+UBSan build (make -C native conlog) copies a pipe into a log and
keeps the log at most KEEP_BYTES, its newest lines kept; argument and
descriptor checks; the installed build detaches and exits once the pipe's
writers are gone.
"""
import os
import pathlib
import re
import shutil
import subprocess
import time

import pytest

from nova_bhyve.hypervisor.qemu import resources as qemu_resources

NATIVE = pathlib.Path(__file__).resolve().parents[2] / 'native'
ASAN = NATIVE / '_build' / 'asan' / 'conlog'
SAN_MARKERS = ('AddressSanitizer', 'LeakSanitizer', 'runtime error:',
               'UndefinedBehaviorSanitizer', 'SUMMARY:')
ENV = dict(os.environ, ASAN_OPTIONS='detect_leaks=1:abort_on_error=1',
           UBSAN_OPTIONS='halt_on_error=1:print_stacktrace=1')


@pytest.fixture(scope='module')
def asan():
    if shutil.which('make') is None or shutil.which('gcc') is None:
        pytest.skip('needs make and gcc')
    p = subprocess.run(['make', '-C', str(NATIVE), 'conlog'],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return str(ASAN)


def _log(tmp_path, flags=os.O_RDWR | os.O_APPEND | os.O_CREAT):
    path = str(tmp_path / 'console.log')
    return path, os.open(path, flags, 0o600)


def _lines(first, count):
    return b''.join(b'line %06d of the console output\n' % n
                    for n in range(first, first + count))


def test_log_kept_bounded_with_its_tail(asan, tmp_path):
    keep = 8192
    path, logfd = _log(tmp_path)
    with open(path, 'wb') as f:
        f.write(b'older output\n')
    rfd, wfd = os.pipe()
    proc = subprocess.Popen([asan, '-f', str(keep)], stdin=rfd,
                            stdout=logfd, stderr=subprocess.PIPE, env=ENV)
    os.close(rfd)
    os.close(logfd)
    written = b''
    sizes = []
    for chunk in range(40):
        data = _lines(chunk * 50, 50)
        os.write(wfd, data)
        written += data
        time.sleep(0.01)
        sizes.append(os.path.getsize(path))
    # one write bigger than the whole log
    data = _lines(2000, 1000)
    os.write(wfd, data)
    written += data
    os.close(wfd)
    assert proc.wait(timeout=30) == 0
    err = proc.stderr.read().decode(errors='replace')
    for marker in SAN_MARKERS:
        assert marker not in err, err
    with open(path, 'rb') as f:
        text = f.read()
    assert len(written) > 10 * keep
    assert keep // 4 <= len(text) <= keep
    assert max(sizes) <= keep + 65536
    # the newest output, from a line start
    assert written.endswith(text)
    assert re.match(rb'line \d{6} ', text)
    assert b'older output' not in text


def test_small_output_is_appended_as_is(asan, tmp_path):
    path, logfd = _log(tmp_path)
    os.write(logfd, b'kept\n')
    proc = subprocess.run([asan, '-f', '4096'], input=b'hello\nworld',
                          stdout=logfd, stderr=subprocess.PIPE, env=ENV,
                          timeout=30)
    os.close(logfd)
    assert proc.returncode == 0, proc.stderr
    with open(path, 'rb') as f:
        assert f.read() == b'kept\nhello\nworld'


@pytest.mark.parametrize('args', [[], ['-f'], ['12x'], ['100'],
                                  ['-f', '4096', 'extra']])
def test_bad_arguments(asan, tmp_path, args):
    path, logfd = _log(tmp_path)
    rfd, wfd = os.pipe()
    proc = subprocess.run([asan] + args, stdin=rfd, stdout=logfd,
                          stderr=subprocess.PIPE, env=ENV, timeout=30)
    for fd in (rfd, wfd, logfd):
        os.close(fd)
    assert proc.returncode == 2
    assert b'nova-bhyve-conlog' in proc.stderr


def test_refuses_a_write_only_log_or_a_file_as_input(asan, tmp_path):
    path, logfd = _log(tmp_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    rfd, wfd = os.pipe()
    proc = subprocess.run([asan, '-f', '4096'], stdin=rfd, stdout=logfd,
                          stderr=subprocess.PIPE, env=ENV, timeout=30)
    assert proc.returncode == 2 and b'stdout' in proc.stderr
    os.close(logfd)
    path, logfd = _log(tmp_path)
    with open(path, 'rb') as notapipe:
        proc = subprocess.run([asan, '-f', '4096'], stdin=notapipe,
                              stdout=logfd, stderr=subprocess.PIPE, env=ENV,
                              timeout=30)
    assert proc.returncode == 2 and b'stdin' in proc.stderr
    for fd in (rfd, wfd, logfd):
        os.close(fd)


def test_installed_logger_detaches_and_exits_with_its_writers(tmp_path):
    """start_console_logger: returns at once with the pipe's write end;
    the detached logger writes what comes and exits when it is closed."""
    try:
        qemu_resources.conlog_binary()
    except Exception as e:
        pytest.skip(str(e))
    path = str(tmp_path / 'console.log')
    wfd = qemu_resources.start_console_logger(path, 4096)
    try:
        os.write(wfd, b'from the guest\n')
        deadline = time.monotonic() + 10
        while not os.path.exists(path) or os.path.getsize(path) < 15:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        holders = [p for p in os.listdir('/proc') if p.isdigit() and
                   _holds(p, path)]
        assert len(holders) == 1
        with open('/proc/%s/stat' % holders[0]) as f:
            stat = f.read().rsplit(')', 1)[1].split()
        # its own session, not a child of this process
        assert int(stat[1]) != os.getpid() and int(stat[3]) == int(
            holders[0])
    finally:
        os.close(wfd)
    deadline = time.monotonic() + 10
    while os.path.exists('/proc/%s' % holders[0]):
        assert time.monotonic() < deadline, 'the logger did not exit'
        time.sleep(0.05)
    with open(path, 'rb') as f:
        assert f.read() == b'from the guest\n'


def _holds(pid, path):
    try:
        return any(os.readlink('/proc/%s/fd/%s' % (pid, fd)) == path
                   for fd in os.listdir('/proc/%s/fd' % pid))
    except OSError:
        return False
