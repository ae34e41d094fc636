"""Shared by every test directory: where the test guest lives.

Test directories have no __init__.py on purpose: pytest then puts the test
directories, not the repository root, on sys.path, so the tests exercise the
installed nova_bhyve (with its compiled libvdsk and the nova.virt shim), as an
operator would run it. Set PYTHONPATH to the repo for a quick in-tree run.
"""
import json
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_TOOL = os.path.join(REPO, 'tools', 'build-test-guest')


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
