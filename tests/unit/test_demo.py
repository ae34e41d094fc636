"""tools/demo and tools/demo.py without booting anything: what the demo
prints of a guest's console, its one-line errors, its progress line, and how
it runs the harness's test case (a result that prints nothing, errors
collected, cleanups run even on an interrupt)."""
import importlib.util
import io
import os
import subprocess
import sys

import pytest
import testtools

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
DEMO_PY = os.path.join(REPO, 'tools', 'demo.py')


def _load():
    spec = importlib.util.spec_from_file_location('nova_bhyve_demo', DEMO_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _load()


def test_clean_console_drops_escape_sequences_whole_or_without_esc():
    # Nova's API drops the ESC of the shell's cursor position query
    raw = ('nbguest# \x1b[6n\r\nnbguest# [6n\n\x1b[1mbold\x1b[0m [?25h\x07'
           '[2J\n')
    assert demo.clean_console(raw) == 'nbguest# \nnbguest# \nbold \n'


@pytest.mark.parametrize('line', [
    '[    4.144039] ata2: SATA max UDMA/133 abar m4096@0xfea16000',
    'virtio_blk virtio0: [vda] 2097152 512-byte logical blocks',
    'found SMP MP-table at [mem 0x000f5b80-0x000f5b8f]',
    'Fallback order [0x1] [n] [K]',
])
def test_clean_console_keeps_ordinary_text(line):
    assert demo.clean_console(line + '\n') == line + '\n'


def _kernel(t, text):
    return '[%12.6f] %s' % (t, text)


def test_console_excerpt_head_then_init_on_with_kernel_runs_elided():
    lines = ([_kernel(0, 'Linux version 6.1'), _kernel(0, 'Command line: x')]
             + [_kernel(0.1 * i, 'noise %d' % i) for i in range(100)]
             + [_kernel(2.2, 'Run /init as init process'),
                'NOVA-BHYVE-GUEST-INIT boot_id=x',
                _kernel(2.3, 'virtio_blk: [vda]'),
                'NOVA-BHYVE-ROOT-MOUNTED']
             + [_kernel(3 + i, 'ata%d: link down' % i) for i in range(6)]
             + ['NOVA-BHYVE-SHELL-READY', '', 'nbguest# \x1b[6n'])
    assert demo.console_excerpt('\r\n'.join(lines) + '\r\n') == [
        lines[0], lines[1],
        '  [... 100 lines ...]',
        _kernel(2.2, 'Run /init as init process'),
        'NOVA-BHYVE-GUEST-INIT boot_id=x',
        _kernel(2.3, 'virtio_blk: [vda]'),
        'NOVA-BHYVE-ROOT-MOUNTED',
        '  [... 6 kernel messages ...]',
        'NOVA-BHYVE-SHELL-READY', '', 'nbguest#']


def test_console_excerpt_without_init_shows_the_tail():
    lines = ['line %d' % i for i in range(60)]
    out = demo.console_excerpt('\n'.join(lines), head=2, tail=25)
    assert out == lines[:2] + ['  [... 33 lines ...]'] + lines[35:]
    assert demo.console_excerpt('a\nb\n') == ['a', 'b']


def test_one_line_errors():
    assert demo.one_line(demo.DemoError('server x went to ERROR: boom')) == \
        'server x went to ERROR: boom'
    assert demo.one_line(ValueError('bad\nsecond line')) == 'ValueError: bad'
    assert len(demo.one_line(RuntimeError('x' * 1000))) == 300
    assert demo.one_line(KeyError()) == 'KeyError'


def test_version_string():
    assert demo.version_string(7002022) == '7.2.22'
    assert demo.version_string(None) == 'None'


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty

    def fileno(self):
        raise io.UnsupportedOperation


def test_progress_line_only_on_a_terminal_and_ended_by_the_next_line():
    out, err = _Stream(True), _Stream(False)
    term = demo.Terminal(out, err)
    term.progress('Booting the guest: 3 s  ' + 'x' * 200)
    term.progress('Booting the guest: 4 s')
    term.say('Guest booted')
    term.error('it broke')
    assert out.getvalue() == (
        '\r\x1b[K' + ('Booting the guest: 3 s  ' + 'x' * 200)[:79]
        + '\r\x1b[KBooting the guest: 4 s\r\x1b[KGuest booted\n')
    assert err.getvalue() == 'error: it broke\n'

    out = _Stream(False)
    term = demo.Terminal(out, _Stream(False))
    term.progress('Booting the guest: 3 s')
    term.say('Guest booted')
    assert out.getvalue() == 'Guest booted\n'


class _Case(testtools.TestCase):
    log = []

    def setUp(self):
        super().setUp()
        self.addCleanup(self.log.append, 'cleanup')
        self.addCleanup(self._fail_in_cleanup)

    def _fail_in_cleanup(self):
        raise OSError('cleanup failed too')

    def fails(self):
        raise demo.DemoError('the guest did not boot')

    def interrupted(self):
        raise KeyboardInterrupt

    def passes(self):
        self.log.append('ran')


def test_run_case_collects_errors_in_order_and_prints_nothing(capsys):
    _Case.log = []
    errors = demo.run_case(_Case('fails'))
    assert [type(e[1]) for e in errors] == [demo.DemoError, OSError]
    assert _Case.log == ['cleanup']
    assert capsys.readouterr() == ('', '')


def test_run_case_interrupted_runs_the_cleanups_then_propagates(capsys):
    _Case.log = []
    with pytest.raises(KeyboardInterrupt):
        demo.run_case(_Case('interrupted'))
    assert _Case.log == ['cleanup']
    assert capsys.readouterr() == ('', '')


def test_run_case_success_reports_only_the_cleanup_error():
    _Case.log = []
    errors = demo.run_case(_Case('passes'))
    assert _Case.log == ['ran', 'cleanup']
    assert [str(e[1]) for e in errors] == ['cleanup failed too']


def test_help_and_a_bad_log_path_need_no_nova(tmp_path):
    # demo.py imports Nova (and is monkey-patched by eventlet) only once
    # its output is redirected: --help and argument errors stay quick
    code = ('import runpy, sys; sys.argv = %r; '
            'import importlib.util as u; '
            's = u.spec_from_file_location("d", %r); '
            'm = u.module_from_spec(s); '
            's.loader.exec_module(m); '
            'rc = m.main(sys.argv[1:]); '
            'assert not [n for n in sys.modules '
            '            if n.split(".")[0] == "nova"]; '
            'sys.exit(rc)')
    bad = str(tmp_path / 'missing' / 'demo.log')
    proc = subprocess.run(
        [sys.executable, '-c', code % (['demo', '--log', bad], DEMO_PY)],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout == ''
    assert proc.stderr == ('error: cannot write the log file %s: No such file '
                           'or directory\n' % bad)
    proc = subprocess.run([sys.executable, DEMO_PY, '--help'],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert '--verbose' in proc.stdout


def test_tools_demo_is_valid_bash():
    subprocess.run(['bash', '-n', os.path.join(REPO, 'tools', 'demo')],
                   check=True)
