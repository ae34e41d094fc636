"""Boot one real instance through Nova with nova-bhyve, show it, delete it.

Runs Nova's services in-process the way Nova's own functional tests do
(tests/functional/nova_harness.py), so it needs no database server, message
broker, Keystone or Glance: everything else is real - the API requests, the
scheduler and placement, the compute manager, this driver and QEMU.

The harness is a unittest TestCase; it is run here with a result object that
prints nothing, and the demo reports its own steps and errors. Everything
else the process writes (the services' logs, warnings, anything on file
descriptors 1 and 2) goes to a log file, and with --verbose the logs also
to the terminal.
"""
import argparse
import json
import logging
import os
import re
import signal
import sys
import time
import traceback
import unittest
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(HERE, '..', 'tests')

MARKER = 'NOVA-BHYVE-SHELL-READY'   # the test guest's shell is up
ACTIVE_TIMEOUT = 180                # POST -> ACTIVE
DELETE_TIMEOUT = 120
POWER_STATES = {0: 'NOSTATE', 1: 'RUNNING', 3: 'PAUSED', 4: 'SHUTDOWN',
                6: 'CRASHED', 7: 'SUSPENDED'}
LOG = logging.getLogger('nova-bhyve-demo')


class DemoError(Exception):
    """A failure the demo explains in one line."""


def default_log_path():
    return os.environ.get('NOVA_BHYVE_DEMO_LOG') or (
        '/tmp/nova-bhyve-demo-%s.log' % time.strftime('%Y%m%d-%H%M%S'))


# -- terminal output ---------------------------------------------------------

# Terminal escape sequences: whole, or what is left of the common ones once
# Nova's API has dropped the ESC (it removes control characters): the
# guest's shell asks the terminal for the cursor position, ESC [ 6 n.
_ESCAPES = re.compile(r'\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]'
                      r'|\[(\?[0-9;]*|[0-9][0-9;]*)[A-DHJKhlmn](?![0-9A-Za-z])')
_CONTROLS = re.compile(r'[\x00-\x08\x0b-\x1f\x7f]')


def clean_console(text):
    """Console output as plain text for the terminal: terminal escape
    sequences (which a real terminal would act on, and answer a query into
    our input) and other control characters removed, CR LF as LF."""
    text = text.replace('\r\n', '\n')
    text = _ESCAPES.sub('', text)
    return _CONTROLS.sub('', text)


_KERNEL_LINE = re.compile(r'\[\s*\d+\.\d+\]')


def console_excerpt(text, head=2, run=4, tail=25):
    """The console as lines for the terminal: the kernel's first ``head``
    lines, then from the kernel starting init (or the last ``tail`` lines)
    on, with runs of more than ``run`` kernel messages elided."""
    lines = clean_console(text).rstrip().splitlines()
    start = next((i for i, ln in enumerate(lines)
                  if 'Run /init as init process' in ln), None)
    if start is None or start < head:
        start = max(len(lines) - tail, head)
    out = lines[:head]
    if start > head:
        out.append('  [... %d lines ...]' % (start - head))
    pending = []
    for ln in lines[start:] + [None]:
        if ln is not None and _KERNEL_LINE.match(ln):
            pending.append(ln)
            continue
        if len(pending) > run:
            out.append('  [... %d kernel messages ...]' % len(pending))
        else:
            out.extend(pending)
        pending = []
        if ln is not None:
            out.append(ln)
    return out


def one_line(exc):
    """The one-line form of an exception for the terminal."""
    if isinstance(exc, DemoError):
        text = str(exc)
    else:
        text = traceback.format_exception_only(type(exc), exc)[-1].strip()
    text = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + '...'


def version_string(number):
    """Nova's integer hypervisor version (major * 10**6 + minor * 10**3 +
    micro) as text."""
    try:
        n = int(number)
    except (TypeError, ValueError):
        return str(number)
    return '%d.%d.%d' % (n // 1000000, n // 1000 % 1000, n % 1000)


class Terminal:
    """The demo's own output: the terminal the process started with
    (duplicated before file descriptors 1 and 2 go to the log)."""

    def __init__(self, out, err):
        self.out = out
        self.err = err
        self.tty = out.isatty()
        self._progress = False

    def width(self):
        try:
            return os.get_terminal_size(self.out.fileno()).columns or 80
        except (OSError, ValueError):
            return 80

    def say(self, fmt='', *args):
        text = fmt % args if args else fmt
        self._end_progress()
        self.out.write(text + '\n')
        self.out.flush()
        for line in text.splitlines():
            LOG.info('%s', line)

    def progress(self, text):
        """One updating line on a terminal (nothing otherwise)."""
        if not self.tty:
            return
        text = text[:max(self.width() - 1, 10)]
        self.out.write('\r\x1b[K' + text)
        self.out.flush()
        self._progress = True

    def _end_progress(self):
        if self._progress:
            self.out.write('\r\x1b[K')
            self._progress = False

    def error(self, text):
        self._end_progress()
        self.out.flush()
        self.err.write('error: %s\n' % text)
        self.err.flush()
        LOG.error('%s', text)


class _NotDemo(logging.Filter):
    def filter(self, record):
        return record.name != LOG.name


def redirect_output(log_path):
    """Send file descriptors 1 and 2 (Python's own stdout and stderr, and
    any child process's unless redirected) to the log file; return the
    terminal's streams, duplicated before."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    out = os.fdopen(os.dup(1), 'w', buffering=1, errors='replace')
    err = os.fdopen(os.dup(2), 'w', buffering=1, errors='replace')
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return Terminal(out, err)


def logging_handlers(log_path, verbose, term):
    """The root logger's handlers: the log file (everything, DEBUG), and
    with ``verbose`` the terminal too (INFO and above, not the demo's own
    lines, which it prints itself)."""
    fmt = logging.Formatter('%(asctime)s %(process)d %(levelname)s '
                            '%(name)s %(message)s')
    to_file = logging.FileHandler(log_path)
    to_file.setFormatter(fmt)
    to_file.setLevel(logging.DEBUG)
    handlers = [to_file]
    if verbose:
        to_term = logging.StreamHandler(term.err)
        to_term.setFormatter(fmt)
        to_term.setLevel(logging.INFO)
        to_term.addFilter(_NotDemo())
        handlers.append(to_term)
    return handlers


def install_handlers(handlers):
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(logging.DEBUG)


def quiet_warnings():
    """No warnings on the terminal: Eventlet's and deprecations are
    dropped, any other goes to the log (logging's py.warnings)."""
    warnings.filterwarnings('ignore', category=DeprecationWarning)
    warnings.filterwarnings('ignore', category=PendingDeprecationWarning)
    warnings.filterwarnings('ignore', message=r'\s*Eventlet is deprecated')
    logging.captureWarnings(True)


# -- running the harness -----------------------------------------------------

def run_case(case):
    """Run a testtools TestCase (setUp, the method, tearDown, cleanups) with
    a result that prints nothing; return the exceptions raised in any of
    them as exc_info tuples, in order. KeyboardInterrupt propagates, after
    the cleanups ran."""
    errors = []
    case.addOnException(errors.append)
    case.run(unittest.TestResult())
    # testtools re-raises an interrupt only if it was the last exception
    if any(issubclass(e[0], KeyboardInterrupt) for e in errors):
        raise KeyboardInterrupt
    return errors


def demo_case(term, handlers):
    """The demo as a test case of the harness (imports Nova: call after
    the output is redirected and warnings are quiet)."""
    sys.path[:0] = [TESTS, os.path.join(TESTS, 'functional')]
    from nova.conf import CONF
    from nova.tests import fixtures as nova_fixtures
    from nova.tests.functional.api import client as api_client

    import nova_harness

    class DemoLogging(nova_fixtures.StandardLogging):
        """Nova's test logging captures the root logger into memory; the
        demo's handlers are put back on top of it."""

        def setUp(self):
            super().setUp()
            root = logging.getLogger()
            for h in handlers:
                root.addHandler(h)
                self.addCleanup(root.removeHandler, h)

    nova_fixtures.StandardLogging = DemoLogging

    class Demo(nova_harness.BhyveFunctionalTestBase):
        # Casts stay casts, as in a deployment: POST /servers returns at
        # once and the server's state changes can be watched.
        CAST_AS_CALL = False

        def setUp(self):
            self.t0 = time.monotonic()
            term.say("Starting Nova (API, conductor, scheduler, compute in "
                     "this process; SQLite) and placement ...")
            super().setUp()
            hv = self.admin_api.api_get(
                'os-hypervisors/detail').body['hypervisors'][0]
            rp = hv['id']
            inv = self._get_provider_inventory(rp)
            term.say("  up in %.1f s: compute host %r, driver %s, hypervisor "
                     "%s %s", time.monotonic() - self.t0,
                     hv['service']['host'], CONF.compute_driver,
                     hv.get('hypervisor_type'),
                     version_string(hv.get('hypervisor_version')))
            term.say("  placement: resource provider %s, inventory %s", rp,
                     ', '.join('%s %s' % (rc, inv[rc]['total'])
                               for rc in sorted(inv)))

        def run_demo(self):
            m = self.manifest
            image = self.direct_boot_image('qcow2')
            term.say("Glance image %s: the test guest, a %.1f MiB qcow2 "
                     "root disk with kernel (Linux %s) and initrd images for "
                     "direct kernel boot", image['id'],
                     os.path.getsize(m['root_qcow2']) / 2 ** 20,
                     m['kernel']['version'])
            flavor = self.api.get_flavor(self.flavor_id)
            term.say("Flavor %s: %d vCPU, %d MiB RAM, %d GiB disk",
                     flavor['name'], flavor['vcpus'], flavor['ram'],
                     flavor['disk'])
            body = {'name': 'nova-bhyve-demo', 'imageRef': image['id'],
                    'flavorRef': self.flavor_id, 'networks': 'none'}
            term.say("POST /servers %s", json.dumps(body))
            t_post = time.monotonic()
            server = self.api.post_server({'server': body})
            try:
                self.watch_build(server, t_post)
                self.show_host(server)
                console = self.wait_for_boot(server, t_post)
                self.show_console(console)
            except BaseException:
                # The error is reported once the harness is done; the
                # server goes first (should deleting it fail too, the
                # harness's clean-up kills its VM by pid).
                try:
                    self.delete(server)
                except Exception:
                    LOG.exception('deleting server %s failed', server['id'])
                raise
            self.delete(server)

        # -- steps ---------------------------------------------------------

        def watch_build(self, server, t_post):
            term.say("Server %s:", server['id'])
            seen = None
            deadline = t_post + ACTIVE_TIMEOUT
            while True:
                server = self.api.get_server(server['id'])
                state = self.describe(server)
                if state != seen:
                    term.say("  %5.1f s  %s", time.monotonic() - t_post,
                             state)
                    seen = state
                if server['status'] == 'ACTIVE':
                    return server
                if server['status'] == 'ERROR':
                    fault = server.get('fault', {}).get('message', '?')
                    raise DemoError('server %s went to ERROR: %s' % (
                        server['id'], fault))
                if time.monotonic() > deadline:
                    raise DemoError('server %s still %s after %d s' % (
                        server['id'], server['status'], ACTIVE_TIMEOUT))
                time.sleep(0.1)

        @staticmethod
        def describe(server):
            task = server.get('OS-EXT-STS:task_state')
            power = server.get('OS-EXT-STS:power_state')
            host = server.get('OS-EXT-SRV-ATTR:host')
            return ('%-7s %-22s power %-8s%s' % (
                server['status'], '(%s)' % task if task else '',
                POWER_STATES.get(power, power),
                '  host %s' % host if host else '')).rstrip()

        def show_host(self, server):
            allocs = self._get_allocations_by_server_uuid(server['id'])
            for rp, alloc in allocs.items():
                term.say("  placement: allocation on %s: %s", rp, ', '.join(
                    '%s %s' % (rc, n)
                    for rc, n in sorted(alloc['resources'].items())))
            pid = self.vm_pid(server)
            if pid:
                term.say("  QEMU process %d (%s)", pid, self.qemu_accel(pid))

        @staticmethod
        def qemu_accel(pid):
            try:
                with open('/proc/%d/cmdline' % pid, 'rb') as f:
                    argv = f.read().decode(errors='replace').split('\0')
            except OSError:
                return 'gone?'
            for i, arg in enumerate(argv[:-1]):
                if arg in ('-accel', '-machine', '-M'):
                    m = re.search(r'(?:^|,|accel=)(kvm|tcg|hvf)\b',
                                  argv[i + 1])
                    if m:
                        return 'accelerator %s' % m.group(1).upper()
            return 'accelerator ?'

        def wait_for_boot(self, server, t_post):
            timeout = nova_harness.BOOT_TIMEOUT
            deadline = time.monotonic() + timeout
            next_note = time.monotonic() + 10
            if not term.tty:
                term.say("Booting the guest (waiting for %s on its console) "
                         "...", MARKER)
            while True:
                output = self.console(server)
                if MARKER in output:
                    term.say("Guest booted: %s on its console %.1f s after "
                             "POST", MARKER, time.monotonic() - t_post)
                    return output
                now = time.monotonic()
                if now > deadline:
                    LOG.error('console of %s after %d s:\n%s', server['id'],
                              timeout, output[-3000:])
                    raise DemoError(
                        'the guest did not reach %s within %d s (the console '
                        'so far is in the log)' % (MARKER, timeout))
                complete = output[:output.rfind('\n') + 1]
                lines = [ln for ln in clean_console(complete).splitlines()
                         if ln.strip()]
                last = lines[-1].strip() if lines else '(no output yet)'
                term.progress("Booting the guest: %3d s  console: %s" % (
                    now - t_post, last))
                if not term.tty and now > next_note:
                    term.say("  %d s, %d console lines", now - t_post,
                             len(lines))
                    next_note = now + 10
                time.sleep(0.5)

        def show_console(self, console):
            LOG.debug('the whole console:\n%s', console)
            term.say("Guest console (os-getConsoleOutput: %d lines; the "
                     "whole of it is in the log):",
                     len(console.rstrip().splitlines()))
            term.say('-' * 72)
            term.say('\n'.join(console_excerpt(console)))
            term.say('-' * 72)

        def delete(self, server):
            uuid = server['id']
            term.say("DELETE /servers/%s", uuid)
            t_del = time.monotonic()
            self.api.delete_server(uuid)
            seen = None
            while True:
                try:
                    server = self.api.get_server(uuid)
                except api_client.OpenStackApiNotFoundException:
                    break
                state = self.describe(server)
                if state != seen:
                    term.say("  %5.1f s  %s", time.monotonic() - t_del,
                             state)
                    seen = state
                if time.monotonic() - t_del > DELETE_TIMEOUT:
                    raise DemoError('server %s not deleted after %d s' % (
                        uuid, DELETE_TIMEOUT))
                time.sleep(0.1)
            term.say("  %5.1f s  gone (GET /servers/%s: 404)",
                     time.monotonic() - t_del, uuid)
            left = nova_harness.leftovers(uuid, [self.instances_path])
            allocs = self._get_allocations_by_server_uuid(uuid)
            if left:
                raise DemoError('server %s deleted, but on the host: %s' % (
                    uuid, '; '.join(left)))
            if allocs:
                raise DemoError('server %s deleted, but placement still has '
                                'its allocations' % uuid)
            term.say("  no QEMU process, instance directory removed, "
                     "placement allocation released")

        def id(self):
            # names Nova's thread pools, in the log
            return 'nova-bhyve-demo'

    return Demo('run_demo')


# -- main --------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(
        prog='tools/demo',
        description='Boot one real instance through Nova with nova-bhyve '
                    '(QEMU running the test guest), show its state and '
                    'console, delete it.')
    p.add_argument('-v', '--verbose', action='store_true',
                   help="show the services' logs on the terminal too "
                        "(they always go to the log file)")
    p.add_argument('--log', default=None, metavar='FILE',
                   help='the log file (default: $NOVA_BHYVE_DEMO_LOG, else '
                        '/tmp/nova-bhyve-demo-DATE-TIME.log)')
    # tools/demo has printed the log's path already
    p.add_argument('--log-shown', action='store_true', help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    log_path = os.path.abspath(args.log or default_log_path())
    try:
        term = redirect_output(log_path)
    except OSError as e:
        sys.stderr.write('error: cannot write the log file %s: %s\n' % (
            log_path, e.strerror))
        return 1
    handlers = logging_handlers(log_path, args.verbose, term)
    install_handlers(handlers)
    quiet_warnings()
    signal.signal(signal.SIGTERM, _sigterm)
    # a developer's test settings are not the demo's: no test time limit
    os.environ.pop('OS_TEST_TIMEOUT', None)
    if args.log_shown:
        LOG.info('Logs: %s', log_path)
    else:
        term.say("Logs: %s%s", log_path, ' (and here)' if args.verbose
                 else ' (--verbose: on the terminal too)')
    t0 = time.monotonic()
    try:
        case = demo_case(term, handlers)
        install_handlers(handlers)      # importing Nova added its own
        errors = run_case(case)
    except KeyboardInterrupt:
        term.error('interrupted; log: %s' % log_path)
        return 130
    except Exception as e:
        LOG.exception('the demo could not start')
        term.error('%s; log: %s' % (one_line(e), log_path))
        return 1
    if errors:
        for exc_info in errors:
            LOG.error('%s', ''.join(traceback.format_exception(*exc_info)))
        # the first one is the cause; later ones are usually its effects
        term.error('%s; log: %s' % (one_line(errors[0][1]), log_path))
        return 1
    term.say("Done in %.0f s.", time.monotonic() - t0)
    return 0


if __name__ == '__main__':
    sys.exit(main())
