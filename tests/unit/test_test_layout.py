"""The test directories are not packages: pytest imports each test module
by its basename, so two files with one name in different directories break
collection of whichever comes second (it happened: test_qemu_postcopy.py in
unit/ and interop/)."""
import collections
import os

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_test_module_basenames_are_unique():
    seen = collections.defaultdict(list)
    for root, _, files in os.walk(TESTS):
        for name in files:
            if name.startswith('test_') and name.endswith('.py'):
                seen[name].append(os.path.relpath(root, TESTS))
    assert {n: d for n, d in seen.items() if len(d) > 1} == {}
