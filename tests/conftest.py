"""Shared by every test directory: where the test guest lives.

Test directories have no __init__.py on purpose: pytest then puts the test
directories, not the repository root, on sys.path, so the tests exercise the
installed nova_bhyve (with its compiled libvdsk and the nova.virt shim), as an
operator would run it. Set PYTHONPATH to the repo for a quick in-tree run.
"""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_TOOL = os.path.join(REPO, 'tools', 'build-test-guest')


def _load_sanitized_vdsk():
    """tools/run-tests' sanitizer pass: NOVA_BHYVE_SANITIZED_VDSK names a
    directory with an ASan+UBSan build of nova_bhyve._vdsk (built by
    VDSK_SANITIZE=1 native/vdsk_build.py), which is loaded here in place of
    the installed module before any test imports it.  The sanitizer
    runtimes are LD_PRELOADed into this process only: child processes
    (qemu-img, make, Python subprocesses using the installed module) must
    not inherit them, so LD_PRELOAD is dropped from the environment."""
    where = os.environ.get('NOVA_BHYVE_SANITIZED_VDSK')
    if not where:
        return
    os.environ.pop('LD_PRELOAD', None)
    found = glob.glob(os.path.join(where, 'nova_bhyve', '_vdsk*.so'))
    if len(found) != 1:
        raise RuntimeError('NOVA_BHYVE_SANITIZED_VDSK=%s: expected one '
                           'nova_bhyve/_vdsk*.so, found %r' % (where, found))
    if 'nova_bhyve._vdsk' in sys.modules:
        raise RuntimeError('nova_bhyve._vdsk was imported before the '
                           'sanitizer build could replace it')
    import nova_bhyve  # noqa: F401 - the package the module goes into
    spec = importlib.util.spec_from_file_location('nova_bhyve._vdsk',
                                                  found[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules['nova_bhyve._vdsk'] = mod


_load_sanitized_vdsk()


def guest_dir():
    cache = os.environ.get('NOVA_BHYVE_CACHE', '/var/cache/nova-bhyve')
    return os.path.join(cache, 'test-guest')


def guest_manifest():
    """The test guest's manifest, building the guest if needed (cached)."""
    out = guest_dir()
    path = os.path.join(out, 'manifest.json')
    if not os.path.exists(path):
        proc = subprocess.run([BUILD_TOOL, out], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=1800)
        if proc.returncode:
            raise RuntimeError('building the test guest failed:\n' +
                               proc.stdout.decode(errors='replace')[-4000:])
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope='session')
def test_guest():
    """The test guest's manifest (a fixture: ``import conftest`` in a test
    module finds whichever conftest.py pytest loaded last)."""
    return guest_manifest()
