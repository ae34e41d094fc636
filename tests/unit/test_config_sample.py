"""The committed sample config is what oslo-config-generator makes today.

etc/nova-bhyve/nova-bhyve.conf.sample is generated from nova_bhyve/conf.py by
oslo-config-generator (etc/nova-bhyve/nova-bhyve-config-generator.conf). This
test regenerates it into a temporary file with the interpreter running the
tests and fails, with the command to run, when the committed file differs:
an option added, removed or reworded in conf.py without regenerating the
sample is caught here.

The options are read from this source tree's nova_bhyve/conf.py (the source
tree is put first on PYTHONPATH of the generator), not from an installed copy
that may be older: the sample documents the code it is committed with. The
generator finds the ``nova_bhyve`` namespace through the oslo.config.opts
entry point; if the package is not installed at all, the test provides the
same entry point from a throw-away dist-info directory.
"""
import difflib
import importlib.metadata
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
GEN_CONF = os.path.join('etc', 'nova-bhyve',
                        'nova-bhyve-config-generator.conf')
SAMPLE = os.path.join('etc', 'nova-bhyve', 'nova-bhyve.conf.sample')
NAMESPACE = 'nova_bhyve'
REGENERATE = ('PYTHONPATH=. python -m oslo_config.generator '
              '--config-file ' + GEN_CONF)


def _entry_point_installed():
    eps = importlib.metadata.entry_points(group='oslo.config.opts')
    return any(ep.name == NAMESPACE for ep in eps)


def _fake_dist_info(root):
    """A dist-info directory declaring only the oslo.config.opts entry point
    (the one in setup.cfg), for a run from an uninstalled source tree."""
    d = os.path.join(root, 'nova_bhyve_sample_check-0.dist-info')
    os.makedirs(d)
    with open(os.path.join(d, 'METADATA'), 'w') as f:
        f.write('Metadata-Version: 2.1\nName: nova-bhyve-sample-check\n'
                'Version: 0\n')
    with open(os.path.join(d, 'entry_points.txt'), 'w') as f:
        f.write('[oslo.config.opts]\n'
                '%s = nova_bhyve.conf:list_opts\n' % NAMESPACE)
    return root


def _generate(tmp_path):
    out = tmp_path / 'nova-bhyve.conf.sample'
    env = dict(os.environ)
    path = [REPO]
    if not _entry_point_installed():
        path.append(_fake_dist_info(str(tmp_path / 'ep')))
    if env.get('PYTHONPATH'):
        path.append(env['PYTHONPATH'])
    env['PYTHONPATH'] = os.pathsep.join(path)
    # stevedore caches entry points under $XDG_CACHE_HOME; keep ours apart.
    env['XDG_CACHE_HOME'] = str(tmp_path / 'cache')
    proc = subprocess.run(
        [sys.executable, '-m', 'oslo_config.generator',
         '--config-file', GEN_CONF, '--output-file', str(out)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=300)
    assert proc.returncode == 0, (
        'oslo-config-generator failed (%d):\n%s' % (proc.returncode,
                                                    proc.stdout[-4000:]))
    return out.read_text()


def test_generator_config_names_namespace_output_and_width():
    with open(os.path.join(REPO, GEN_CONF)) as f:
        lines = [line.split('=', 1) for line in f.read().splitlines()
                 if '=' in line and not line.lstrip().startswith('#')]
    settings = {k.strip(): v.strip() for k, v in lines}
    assert settings == {'output_file': SAMPLE.replace(os.sep, '/'),
                        'wrap_width': '79',
                        'namespace': NAMESPACE}


def test_sample_config_is_up_to_date(tmp_path):
    generated = _generate(tmp_path)
    # The generator really found the options (an unknown namespace would
    # give an almost empty file, which must not be taken for a sample).
    assert '[bhyve]' in generated and '#hypervisor = auto' in generated, (
        'the generator did not produce the [bhyve] options:\n' + generated)

    with open(os.path.join(REPO, SAMPLE)) as f:
        committed = f.read()
    if committed != generated:
        diff = ''.join(difflib.unified_diff(
            committed.splitlines(True), generated.splitlines(True),
            fromfile=SAMPLE + ' (committed)',
            tofile=SAMPLE + ' (generated from nova_bhyve/conf.py)'))
        raise AssertionError(
            '%s is stale: nova_bhyve/conf.py changed but the sample was not '
            'regenerated. From the repository root run\n\n    %s\n\nand '
            'commit the result.\n\n%s' % (SAMPLE, REGENERATE, diff[:6000]))

