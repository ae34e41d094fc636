"""Packaging: what lands where when an operator installs nova-bhyve.

Nova loads drivers relative to ``nova.virt`` (``compute_driver =
bhyve.BhyveDriver`` imports ``nova.virt.bhyve``), so the package ships a
one-file shim, nova/virt/bhyve/__init__.py, that must end up inside the
installed Nova tree - and nothing else of ``nova``: a nova/__init__.py or
nova/virt/__init__.py in the wheel would overwrite Nova's own files.

* the wheel built from this tree has the shim, the compiled libvdsk and the
  oslo.config.opts entry point, and no other file under nova/;
* an sdist (MANIFEST.in) carries everything needed to build that wheel again
  (native/ sources, headers, Makefile, vdsk_build.py) plus tools/, etc/,
  devstack/; a wheel built from the unpacked sdist imports nova_bhyve._vdsk
  and libvdsk works;
* in the test environment (``pip install .``, as tools/setup-host does), the
  shim is inside Nova's installed nova/virt/, Nova's real loader
  (nova.virt.driver.load_compute_driver) builds a nova_bhyve BhyveDriver
  from ``bhyve.BhyveDriver``, and the entry point is discoverable. These
  tests skip, saying why, when nova-bhyve is not installed (a run from a
  source tree with PYTHONPATH); they never pass without checking.
* every third-party module nova_bhyve/ imports (an ast scan of its .py
  files, plus what the compiled cffi extension needs) is provided by a
  distribution named in setup.cfg's install_requires - not merely installed
  because Nova happens to pull it in.

Builds run on a copy of the tree, so they never write build/ or *.egg-info
into the working tree other people use.
"""
import ast
import collections
import configparser
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

SHIM = 'nova/virt/bhyve/__init__.py'
# Files the wheel must never carry: they belong to Nova.
NOVA_OWNED = ('nova/__init__.py', 'nova/virt/__init__.py')

_IGNORE = shutil.ignore_patterns(
    '.git', '.venv', '.tox', 'build', 'dist', '*.egg-info', '__pycache__',
    '_build', '.pytest_cache', '*.so', '*.o', '*.a', '*.pyc', 'bench')


def _copy_tree(dest):
    shutil.copytree(REPO, dest, ignore=_IGNORE, symlinks=True)
    return dest


def _run(cmd, cwd, timeout=900, env=None):
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, '%s failed (%d):\n%s' % (
        ' '.join(cmd), proc.returncode, proc.stdout[-6000:])
    return proc.stdout


def _can_build_without_isolation():
    """setuptools, cffi and a bdist_wheel (the wheel package, or setuptools
    >= 70.1 which has its own) are in this environment: build offline with
    them instead of fetching the build requirements into an isolated env."""
    have = importlib.util.find_spec
    if not (have('setuptools') and have('cffi')):
        return False
    if have('wheel'):
        return True
    try:
        return importlib.util.find_spec('setuptools.command.bdist_wheel')
    except ImportError:
        return False


def _pip_wheel(src, out):
    cmd = [sys.executable, '-m', 'pip', 'wheel', '--no-deps',
           '--disable-pip-version-check', '-w', out]
    if _can_build_without_isolation():
        cmd.append('--no-build-isolation')
    _run(cmd + [src], cwd=out)
    wheels = [f for f in os.listdir(out) if f.endswith('.whl')]
    assert len(wheels) == 1, wheels
    return os.path.join(out, wheels[0])


@pytest.fixture(scope='module')
def wheel_of_tree(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('wheel')
    src = _copy_tree(str(tmp / 'src'))
    out = str(tmp / 'out')
    os.mkdir(out)
    return _pip_wheel(src, out)


def _sdist(src, out):
    if importlib.util.find_spec('build'):
        cmd = [sys.executable, '-m', 'build', '--sdist', '--no-isolation',
               '--outdir', out, src]
    else:
        cmd = [sys.executable, 'setup.py', '-q', 'sdist', '--dist-dir', out]
    _run(cmd, cwd=src)
    sdists = [f for f in os.listdir(out) if f.endswith('.tar.gz')]
    assert len(sdists) == 1, sdists
    return os.path.join(out, sdists[0])


@pytest.fixture(scope='module')
def sdist_of_tree(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('sdist')
    src = _copy_tree(str(tmp / 'src'))
    out = str(tmp / 'out')
    os.mkdir(out)
    return _sdist(src, out)


# -- (a) the wheel ----------------------------------------------------------

def test_wheel_carries_the_shim_and_nothing_of_nova(wheel_of_tree):
    with zipfile.ZipFile(wheel_of_tree) as whl:
        names = whl.namelist()
    assert SHIM in names
    for owned in NOVA_OWNED:
        assert owned not in names, (
            '%s in the wheel would overwrite Nova\'s own file' % owned)
    under_nova = [n for n in names if n.startswith('nova/')]
    assert under_nova == [SHIM], (
        'only the shim may go into Nova\'s tree, the wheel has %s'
        % under_nova)


def test_wheel_carries_compiled_libvdsk_and_entry_point(wheel_of_tree):
    with zipfile.ZipFile(wheel_of_tree) as whl:
        names = whl.namelist()
        eps = [n for n in names if n.endswith('.dist-info/entry_points.txt')]
        assert len(eps) == 1, names
        entry_points = whl.read(eps[0]).decode()
    assert any(n.startswith('nova_bhyve/_vdsk') and n.endswith('.so')
               for n in names), names
    assert '[oslo.config.opts]' in entry_points
    assert 'nova_bhyve = nova_bhyve.conf:list_opts' in entry_points


LAUNCHER = 'nova_bhyve/sandbox/bin/nova-bhyve-launcher'
CONLOG = 'nova_bhyve/libexec/nova-bhyve-conlog'


def _assert_launcher_in(wheel):
    """The sandbox launcher and the console logger, compiled by setup.py's
    build_py, executable (the wheel keeps the mode pip installs with)."""
    with zipfile.ZipFile(wheel) as whl:
        for program in (LAUNCHER, CONLOG):
            info = whl.getinfo(program)
            head = whl.read(program)[:4]
            assert head == b'\x7fELF', program
            assert (info.external_attr >> 16) & 0o111 == 0o111, (
                program, oct(info.external_attr >> 16))


@pytest.mark.skipif(not sys.platform.startswith('linux'),
                    reason='the launcher is Linux only')
def test_wheel_carries_the_sandbox_launcher(wheel_of_tree):
    _assert_launcher_in(wheel_of_tree)


# -- the sdist (MANIFEST.in) ------------------------------------------------

SDIST_MUST_CARRY = (
    'native/vdsk_build.py', 'native/Makefile',
    'native/vdsk/include/vdsk.h', 'native/vdsk/vdsk_impl.h',
    'native/vdsk/vdsk.c', 'native/vdsk/raw.c', 'native/vdsk/qcow2.c',
    'native/vdsk/tools/vdsktool.c', 'native/vdsk/sources.list',
    'native/sandbox/launcher.c', 'native/sandbox/launcher.h',
    'native/conlog/conlog.c', 'tools/setup-host', 'tools/build-test-guest',
    'tools/guest/nbmem.c',
    'etc/nova-bhyve/nova-bhyve-config-generator.conf',
    'etc/nova-bhyve/nova-bhyve.conf.sample',
    'devstack/plugin.sh', 'devstack/settings', 'devstack/README.md',
    'nova/virt/bhyve/__init__.py', 'MANIFEST.in', 'setup.cfg',
)


def _sdist_members(sdist):
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    top = names[0].split('/')[0]
    return top, {n[len(top) + 1:] for n in names if n.startswith(top + '/')}


def test_sdist_carries_native_sources_tools_etc_devstack(sdist_of_tree):
    _, members = _sdist_members(sdist_of_tree)
    missing = [m for m in SDIST_MUST_CARRY if m not in members]
    assert not missing, 'the sdist lacks %s (see MANIFEST.in)' % missing
    # every C source and header of native/ in the repository
    for root, dirs, files in os.walk(os.path.join(REPO, 'native')):
        dirs[:] = [d for d in dirs if d != '_build']
        for f in files:
            if f.endswith(('.c', '.h')):
                rel = os.path.relpath(os.path.join(root, f), REPO)
                assert rel.replace(os.sep, '/') in members, rel
    built = [m for m in members
             if m.startswith('native/_build') or m.endswith(('.so', '.o'))
             or '__pycache__' in m]
    assert not built, 'build products in the sdist: %s' % built


def test_wheel_built_from_sdist_imports_libvdsk(sdist_of_tree, tmp_path):
    top, _ = _sdist_members(sdist_of_tree)
    with tarfile.open(sdist_of_tree) as tar:
        if hasattr(tarfile, 'data_filter'):
            tar.extractall(tmp_path / 'unpacked', filter='data')
        else:
            tar.extractall(tmp_path / 'unpacked')
    out = tmp_path / 'out'
    out.mkdir()
    wheel = _pip_wheel(str(tmp_path / 'unpacked' / top), str(out))
    if sys.platform.startswith('linux'):
        _assert_launcher_in(wheel)
    site = tmp_path / 'site'
    with zipfile.ZipFile(wheel) as whl:
        whl.extractall(site)
    img = tmp_path / 'probe.qcow2'
    probe = textwrap.dedent('''
        import sys
        import nova_bhyve._vdsk as m
        assert m.__file__.startswith(sys.argv[1]), m.__file__
        ffi, lib = m.ffi, m.lib
        path = sys.argv[2].encode()
        rc = lib.vdsk_create(path, b'qcow2', 1 << 20, ffi.NULL, ffi.NULL, 0)
        assert rc == 0, ffi.string(lib.vdsk_errmsg())
        d = lib.vdsk_open(path, ffi.NULL, 0)
        assert d != ffi.NULL, ffi.string(lib.vdsk_errmsg())
        assert lib.vdsk_size(d) == 1 << 20
        buf = ffi.new('char[]', b'nova-bhyve' * 100)
        assert lib.vdsk_write(d, buf, 4096, 1000) == 0
        back = ffi.new('char[]', 1000)
        assert lib.vdsk_read(d, back, 4096, 1000) == 0
        assert ffi.buffer(back)[:] == ffi.buffer(buf)[:1000]
        assert lib.vdsk_close(d) == 0
        print('ok', m.__file__)
    ''')
    env = dict(os.environ, PYTHONPATH=str(site))
    result = _run([sys.executable, '-c', probe, str(site), str(img)],
                  cwd=str(tmp_path), env=env)
    assert result.strip().startswith('ok ' + str(site))


# -- (b) the installed package, as nova-compute sees it ---------------------

def _installed_shim():
    """nova.virt.bhyve as installed, or skip when this is a source-tree run
    without nova-bhyve installed (nothing to check then)."""
    try:
        importlib.metadata.distribution('nova-bhyve')
    except importlib.metadata.PackageNotFoundError:
        pytest.skip('nova-bhyve is not installed in this environment '
                    '(source-tree run?): `pip install .` (not editable) '
                    'puts the nova.virt.bhyve shim into Nova\'s tree')
    try:
        import nova.virt.bhyve as shim
    except ImportError as e:
        pytest.skip('nova.virt.bhyve is not importable (%s): the shim is '
                    'not installed into Nova\'s tree; run `pip install .` '
                    '(not editable)' % e)
    return shim


def test_shim_is_inside_installed_nova_virt():
    shim = _installed_shim()
    import nova.virt
    nova_virt = os.path.realpath(os.path.dirname(nova.virt.__file__))
    shim_file = os.path.realpath(shim.__file__)
    assert os.path.dirname(os.path.dirname(shim_file)) == nova_virt, (
        'nova.virt.bhyve comes from %s, not from inside Nova\'s installed '
        'nova/virt (%s): an editable or source-tree install?'
        % (shim_file, nova_virt))
    # not the source tree's copy (the venv itself may live in the repo)
    assert not shim_file.startswith(
        os.path.join(os.path.realpath(REPO), 'nova') + os.sep)


@pytest.fixture
def driver_conf(tmp_path):
    import nova.conf

    from nova_bhyve import conf as bhyve_conf  # noqa: F401 ([bhyve] opts)
    CONF = nova.conf.CONF
    overrides = [('instances_path', str(tmp_path / 'instances'), None),
                 ('hypervisor', 'auto', 'bhyve'),
                 ('qemu_accel', 'tcg', 'bhyve')]
    for name, value, group in overrides:
        CONF.set_override(name, value, group=group)
    yield CONF
    for name, _, group in overrides:
        CONF.clear_override(name, group=group)


def test_nova_loader_builds_bhyve_driver(driver_conf):
    _installed_shim()
    from nova.virt import driver as nova_driver

    from nova_bhyve import driver as bhyve_driver
    try:
        drv = nova_driver.load_compute_driver(None, 'bhyve.BhyveDriver')
    except SystemExit:
        # Nova logs the ImportError / ValueError and exits
        pytest.fail("nova.virt.driver.load_compute_driver(None, "
                    "'bhyve.BhyveDriver') exited: the driver could not be "
                    "imported or is not a ComputeDriver (see the log)")
    assert isinstance(drv, bhyve_driver.BhyveDriver)
    assert isinstance(drv, nova_driver.ComputeDriver)
    assert type(drv).__module__ == 'nova_bhyve.driver'


def test_oslo_config_entry_point_is_discoverable():
    _installed_shim()
    eps = [ep for ep in importlib.metadata.entry_points(
        group='oslo.config.opts') if ep.name == 'nova_bhyve']
    assert len(eps) == 1, eps
    assert eps[0].value == 'nova_bhyve.conf:list_opts'
    assert eps[0].dist.name == 'nova-bhyve'
    groups = eps[0].load()()
    assert [getattr(g, 'name', g) for g, _ in groups] == [
        'bhyve', 'nova_bhyve_privileged']
    names = {o.name for _, opts in groups for o in opts}
    assert {'hypervisor', 'qemu_accel', 'qemu_binary',
            'bhyve_path', 'bhyve_bootrom'} <= names


# -- (c) install_requires covers every import -------------------------------

PACKAGE = os.path.join(REPO, 'nova_bhyve')
#: modules the compiled extensions import at run time, which no .py file
#: names: nova_bhyve._vdsk is a cffi (API mode) extension
EXTENSION_IMPORTS = {'_cffi_backend': 'nova_bhyve/_vdsk (cffi extension)'}


def _canonical(name):
    """PEP 503 name: oslo.log, oslo_log and Oslo-Log are one distribution."""
    return re.sub(r'[-_.]+', '-', name).lower()


def _install_requires():
    """Canonical distribution names of setup.cfg's install_requires."""
    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, 'setup.cfg'))
    names = set()
    for line in parser['options']['install_requires'].splitlines():
        line = line.split('#', 1)[0].strip()
        if line:
            names.add(_canonical(re.match(r'[A-Za-z0-9][A-Za-z0-9._-]*',
                                          line).group()))
    return names


def _top_level_imports(root):
    """{top-level module: [file:line, ...]} of every absolute import in the
    .py files under ``root`` (function-level and conditional ones too)."""
    found = collections.defaultdict(list)
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != '__pycache__']
        for name in files:
            if not name.endswith('.py'):
                continue
            path = os.path.join(dirpath, name)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            where = os.path.relpath(path, REPO)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    tops = [a.name.split('.')[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    tops = [node.module.split('.')[0]]
                else:
                    continue
                for top in tops:
                    found[top].append('%s:%d' % (where, node.lineno))
    return found


def _unrequired(imports, requires, providers):
    """{module: why} for each third-party module in ``imports`` that no
    distribution in ``requires`` provides (``providers``: module ->
    distributions, as importlib.metadata.packages_distributions())."""
    own = _canonical('nova-bhyve')
    problems = {}
    for module, where in sorted(imports.items()):
        if module in sys.stdlib_module_names or module == 'nova_bhyve':
            continue
        # nova-bhyve itself provides ``nova`` (the nova/virt/bhyve shim):
        # that is no reason to leave Nova out
        dists = {_canonical(d) for d in providers.get(module, ())} - {own}
        if not dists:
            problems[module] = ('imported at %s, provided by no installed '
                                'distribution' % ', '.join(where[:3]))
        elif not dists & requires:
            problems[module] = ('imported at %s, provided by %s, none of '
                                'them in install_requires' % (
                                    ', '.join(where[:3]),
                                    ' or '.join(sorted(dists))))
    return problems


def test_install_requires_lists_every_imported_distribution():
    imports = _top_level_imports(PACKAGE)
    # the scan sees the package: a broken walk must not pass vacuously
    assert {'nova', 'oslo_config', 'oslo_concurrency'} <= set(imports)
    for module, where in EXTENSION_IMPORTS.items():
        imports[module].append(where)
    problems = _unrequired(imports, _install_requires(),
                           importlib.metadata.packages_distributions())
    assert not problems, (
        'add to setup.cfg [options] install_requires:\n%s' % '\n'.join(
            '  %s: %s' % item for item in problems.items()))


def test_unrequired_import_is_reported(tmp_path):
    """The check above fails for an import whose distribution is missing."""
    src = tmp_path / 'pkg'
    src.mkdir()
    (src / 'mod.py').write_text(textwrap.dedent('''
        import os
        from nova_bhyve import conf
        from . import sibling
        import oslo_config.cfg


        def late():
            import psutil
            return psutil
    '''))
    imports = _top_level_imports(str(src))
    assert set(imports) == {'os', 'nova_bhyve', 'oslo_config', 'psutil'}
    providers = {'oslo_config': ['oslo.config'], 'psutil': ['psutil']}
    assert _unrequired(imports, {'oslo-config', 'psutil'}, providers) == {}
    problems = _unrequired(imports, {'oslo-config'}, providers)
    assert list(problems) == ['psutil']
    assert 'mod.py:9' in problems['psutil']
    # provided only by nova-bhyve itself (the nova shim) is not enough
    assert list(_unrequired({'nova': ['x.py:1']}, set(),
                            {'nova': ['nova-bhyve', 'nova']})) == ['nova']
    assert _unrequired({'nova': ['x.py:1']}, {'nova'},
                       {'nova': ['nova-bhyve', 'nova']}) == {}
    assert list(_unrequired({'gone': ['x.py:1']}, {'gone'}, {})) == ['gone']
    assert _canonical('oslo.config') in _install_requires()

@pytest.mark.skipif(not sys.platform.startswith('linux'),
                    reason='the launcher is Linux only')
def test_a_launcher_that_does_not_compile_fails_the_build(tmp_path):
    src = _copy_tree(str(tmp_path / 'src'))
    with open(os.path.join(src, 'native', 'sandbox', 'launcher.c'),
              'a') as f:
        f.write('\nthis is not C;\n')
    out = tmp_path / 'out'
    out.mkdir()
    with pytest.raises(AssertionError, match='did not compile'):
        _pip_wheel(src, str(out))
    assert [f for f in os.listdir(str(out)) if f.endswith('.whl')] == []
