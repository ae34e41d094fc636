"""Shared by the benchmarks that run through Nova's functional harness.

Puts tests/ and tests/functional on sys.path (as tools/demo.py does), and
offers: host facts for the records, summary statistics, a finely polled
POST /servers -> ACTIVE timer, a console-log marker waiter and a runner that
executes one harness test case and returns what it recorded.
"""
import os
import platform
import statistics
import subprocess
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for _p in (os.path.join(REPO, 'tests', 'functional'),
           os.path.join(REPO, 'tests'), HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

ERR = sys.__stderr__


def claim_stdout():
    """Keep the real stdout for the JSON result only: returns a file on a
    duplicate of fd 1 and points fd 1 (where Nova's test fixtures send
    their log) at stderr."""
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), 'w')
    os.dup2(2, 1)
    return out

#: how often the benchmarks poll (API status, console log), seconds
POLL = 0.01


def say(fmt, *args):
    ERR.write((fmt % args if args else fmt) + '\n')
    ERR.flush()


def loadavg():
    with open('/proc/loadavg') as f:
        return ' '.join(f.read().split()[:3])


def host_facts():
    model = 'unknown'
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                model = line.split(':', 1)[1].strip()
                break
    qemu = subprocess.run(['qemu-system-x86_64', '--version'],
                          capture_output=True, text=True).stdout
    return {'nproc': os.cpu_count(), 'cpu_model': model,
            'platform': platform.platform(),
            'qemu': qemu.splitlines()[0] if qemu else None,
            'date_utc': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}


def summary(samples):
    """median, min, max, spread (max - min), stdev of a list of seconds."""
    samples = list(samples)
    return {'median': round(statistics.median(samples), 3),
            'min': round(min(samples), 3), 'max': round(max(samples), 3),
            'spread': round(max(samples) - min(samples), 3),
            'stdev': round(statistics.stdev(samples), 3)
            if len(samples) > 1 else 0.0,
            'n': len(samples)}


def post_until_active(test, image_id, flavor_id, host=None, timeout=300,
                      on_posted=None):
    """POST /servers, then GET it every POLL s until ACTIVE.

    Returns (server, t_post_returned, t_active), both seconds after the POST
    was sent, measured the way the harness's client sees them. ``on_posted``
    (optional) is called right after the POST returns, with (server, t0).
    """
    body = test._build_server(image_uuid=image_id, flavor_id=flavor_id,
                              networks='none', host=host)
    t0 = time.monotonic()
    server = test.api.post_server({'server': body})
    t_posted = time.monotonic() - t0
    if on_posted:
        on_posted(server, t0)
    deadline = t0 + timeout
    while True:
        server = test.api.get_server(server['id'])
        if server['status'] == 'ACTIVE':
            return server, t_posted, time.monotonic() - t0
        if server['status'] == 'ERROR' or time.monotonic() > deadline:
            test.fail('server %s: %s %s' % (server['id'], server['status'],
                                            server.get('fault')))
        time.sleep(POLL)


def wait_console_marker(path, marker, t0, timeout=300, poll=POLL):
    """Seconds after ``t0`` at which ``marker`` first appears in the file
    ``path`` (polled every ``poll`` s, reading only the new bytes)."""
    return wait_console_markers(path, [('m', marker)], t0, timeout,
                                poll)['m']


def wait_console_markers(path, markers, t0, timeout=300, poll=POLL):
    """{name: seconds after ``t0``} at which each of ``markers`` (a list of
    (name, text), in the order they appear) first shows in the file
    ``path``, polled every ``poll`` s, reading only the new bytes."""
    pending = [(n, m.encode()) for n, m in markers]
    found = {}
    buf = bytearray()
    pos = 0
    deadline = t0 + timeout
    while pending:
        try:
            with open(path, 'rb') as f:
                f.seek(pos)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b''
        now = time.monotonic()
        if chunk:
            pos += len(chunk)
            buf += chunk
            while pending and pending[0][1] in buf:
                found[pending.pop(0)[0]] = now - t0
            continue
        if now > deadline:
            raise RuntimeError('%r not in %s within %ss' % (
                pending[0][1], path, timeout))
        time.sleep(poll)
    return found


def delete_and_wait(test, server):
    """DELETE the server and wait until it is gone (fine polling)."""
    from nova.tests.functional.api import client as api_client
    test.api.delete_server(server['id'])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            test.api.get_server(server['id'])
        except api_client.OpenStackApiNotFoundException:
            return
        time.sleep(POLL)
    test.fail('server %s not deleted' % server['id'])


#: the benchmark's parsed command line, set by bench_main()
ARGS = None


def bench_main(case_class, result, doc, add_arguments=None):
    """The entry point every harness benchmark shares: parse ``--runs``
    (plus what ``add_arguments(parser)`` adds) into ``ARGS``, run the
    ``case_class`` test case (it fills ``result``), and write ``result``
    with the host facts and the load before/after as JSON on the real
    stdout."""
    global ARGS
    import argparse
    import json
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument('--runs', type=int, default=5)
    if add_arguments:
        add_arguments(ap)
    ARGS = ap.parse_args()
    out = claim_stdout()
    facts = host_facts()
    load_before = loadavg()
    run_case(case_class)
    result['host'] = facts
    result['loadavg_before'] = load_before
    result['loadavg_after'] = loadavg()
    out.write(json.dumps(result, indent=2) + '\n')
    out.flush()


def run_case(case_class):
    """Run every test of ``case_class``; exit 1 if one fails."""
    result = unittest.TextTestRunner(stream=ERR, verbosity=1).run(
        unittest.defaultTestLoader.loadTestsFromTestCase(case_class))
    if not result.wasSuccessful():
        sys.exit(1)


class Timings:
    """Wall time of selected driver steps, recorded per call (observes
    only: each wrapper calls the real function). ``take()`` returns and
    clears what was recorded since the last call."""

    def __init__(self, test):
        from nova_bhyve.devices import consoles
        from nova_bhyve.storage import disks
        from nova_bhyve.storage import image_cache
        self._calls = {}
        #: (monotonic start, end) of every call, per label; never cleared
        self.marks = {}
        driver = test.compute.manager.driver
        self._wrap(test, driver, 'spawn', 'driver.spawn')
        self._wrap(test, driver, 'get_info', 'driver.get_info')
        self._wrap(test, driver.hypervisor, 'start', 'hypervisor.start')
        self._wrap(test, image_cache, 'fetch_image', 'storage.fetch_image')
        self._wrap(test, disks, 'create_root_disk',
                   'storage.create_root_disk')
        self._wrap(test, consoles, 'rotate_log', 'rotate_console_log')

    def _wrap(self, test, obj, name, label):
        real = getattr(obj, name)
        calls = self._calls.setdefault(label, [])

        marks = self.marks.setdefault(label, [])

        def timed(*args, **kwargs):
            t = time.monotonic()
            try:
                return real(*args, **kwargs)
            finally:
                end = time.monotonic()
                calls.append(end - t)
                marks.append((t, end))

        setattr(obj, name, timed)
        if isinstance(obj, type(os)):      # a module: put the real one back
            test.addCleanup(setattr, obj, name, real)

    def take(self):
        out = {k: round(sum(v), 4) for k, v in self._calls.items() if v}
        out.update({k + '.calls': len(v) for k, v in self._calls.items()
                    if len(v) > 1})
        for v in self._calls.values():
            del v[:]
        return out


#: The driver's KVM calibration run (at compute start, not in the measured
#: path) takes ~11 s here when the host is loaded, longer than the default
#: accel_calibration_timeout of 10 s; in the harness that timeout escaped
#: as subprocess.TimeoutExpired and the compute service failed to start.
#: The benchmarks give the calibration more time (the choice, TCG, is the
#: same; the result records it).
CALIBRATION_TIMEOUT = 60.0


def give_calibration_time(test):
    test.flags(accel_calibration_timeout=CALIBRATION_TIMEOUT, group='bhyve')
