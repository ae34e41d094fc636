"""The shape of nova_bhyve, checked on its source (docs/architecture.md):
no import cycles, no import of a nova_bhyve module inside a function, the
two backends meet only through hypervisor/base.py, generic code reaches a
backend only through that interface, and no module touches the driver's
private members."""
import ast
import os
import re

import pytest

import nova_bhyve

PKG = os.path.dirname(os.path.abspath(nova_bhyve.__file__))


def _modules():
    found = {}
    for root, _, files in os.walk(PKG):
        for name in files:
            if not name.endswith('.py'):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, os.path.dirname(PKG))[:-3]
            mod = rel.replace(os.sep, '.')
            if mod.endswith('.__init__'):
                mod = mod[:-len('.__init__')]
            with open(path) as f:
                found[mod] = ast.parse(f.read(), path)
    return found


MODULES = _modules()


def _imports(tree, top_level_only=False):
    """(module imported, node) for every nova_bhyve import in ``tree``."""
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith('nova_bhyve'):
            for alias in node.names:
                sub = node.module + '.' + alias.name
                yield (sub if sub in MODULES else node.module), node
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith('nova_bhyve'):
                    yield alias.name, node


def _graph():
    graph = {}
    for mod, tree in MODULES.items():
        deps = set()
        for target, _ in _imports(tree):
            # importing a.b.c runs a and a.b too
            parts = target.split('.')
            for i in range(2, len(parts) + 1):
                name = '.'.join(parts[:i])
                if name in MODULES and name != mod:
                    deps.add(name)
        graph[mod] = deps
    return graph


def test_the_tree_was_found():
    assert 'nova_bhyve.driver' in MODULES
    assert 'nova_bhyve.hypervisor.qemu.backend' in MODULES
    assert len(MODULES) > 40


def test_no_import_inside_a_function():
    inside = []
    for mod, tree in MODULES.items():
        top = {id(n) for _, n in _imports(tree, top_level_only=True)}
        inside += ['%s:%d' % (mod, n.lineno) for _, n in _imports(tree)
                   if id(n) not in top]
    assert inside == []


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(mod, path):
        state[mod] = 'open'
        for dep in sorted(graph[mod]):
            if state.get(dep) == 'open':
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep, path + [dep])
                if found:
                    return found
        state[mod] = 'done'
        return None

    for mod in sorted(graph):
        if mod not in state:
            found = visit(mod, [mod])
            if found:
                return found
    return None


def test_no_import_cycle():
    assert _cycle(_graph()) is None


def test_the_cycle_check_finds_a_cycle():
    graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}
    assert _cycle(graph) == ['a', 'b', 'c', 'a']


@pytest.mark.parametrize('backend,other', [('qemu', 'bhyve'),
                                           ('bhyve', 'qemu')])
def test_backends_do_not_import_each_other(backend, other):
    prefix = 'nova_bhyve.hypervisor.%s' % backend
    wrong = 'nova_bhyve.hypervisor.%s' % other
    for mod, deps in _graph().items():
        if mod == prefix or mod.startswith(prefix + '.'):
            assert not [d for d in deps if d.startswith(wrong)], mod


def test_generic_code_reaches_backends_only_through_base():
    """Outside hypervisor/ only backends.get (which picks one) names a
    backend module; everything else uses hypervisor.base."""
    for mod, deps in _graph().items():
        if mod.startswith('nova_bhyve.hypervisor'):
            continue
        backend_deps = [d for d in deps
                        if d.startswith(('nova_bhyve.hypervisor.qemu',
                                         'nova_bhyve.hypervisor.bhyve'))]
        assert backend_deps == [], mod


def test_no_module_touches_the_drivers_private_members():
    pattern = re.compile(r'\b(drv|driver|self\.drv)\._[a-z]')
    for root, _, files in os.walk(PKG):
        for name in files:
            if name.endswith('.py'):
                with open(os.path.join(root, name)) as f:
                    text = f.read()
                assert not pattern.search(text), name


def test_no_module_touches_another_modules_private_names():
    touched = []
    for mod, tree in MODULES.items():
        aliases = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith('nova_bhyve'):
                aliases.update(a.asname or a.name for a in node.names)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and \
                    isinstance(node.value, ast.Name) and \
                    node.value.id in aliases and \
                    node.attr.startswith('_') and \
                    not node.attr.startswith('__'):
                touched.append('%s:%d %s.%s' % (mod, node.lineno,
                                                node.value.id, node.attr))
    assert touched == []


def test_unit_and_interop_tests_never_import_conftest():
    """They run in one pytest process, which loads tests/conftest.py and
    tests/unit/conftest.py: ``import conftest`` then finds whichever came
    last (it broke CI once). The test guest is the ``test_guest`` fixture."""
    tests = os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    found = []
    for sub in ('unit', 'interop'):
        for name in sorted(os.listdir(os.path.join(tests, sub))):
            if not name.endswith('.py'):
                continue
            with open(os.path.join(tests, sub, name)) as f:
                for n, line in enumerate(f, 1):
                    if re.match(r'\s*(import conftest|from conftest )',
                                line):
                        found.append('%s/%s:%d' % (sub, name, n))
    assert found == []
