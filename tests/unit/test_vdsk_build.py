"""The binding is built from vdsk.h and vdsk/sources.list
(native/vdsk_build.py): every function and constant of the header reaches
nova_bhyve._vdsk (the cffi cdef markers enclose all of it), and the source
list names every library C file."""
import os
import re

from nova_bhyve import _vdsk

VDSK = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'native', 'vdsk')


def _header():
    with open(os.path.join(VDSK, 'include', 'vdsk.h')) as f:
        return re.sub(r'/\*.*?\*/', '', f.read(), flags=re.S)


def test_every_function_of_vdsk_h_is_bound():
    names = set(re.findall(r'\b(vdsk_\w+)\(', _header()))
    assert 'vdsk_open' in names and 'vdsk_bench' in names
    missing = sorted(n for n in names if not hasattr(_vdsk.lib, n))
    assert not missing, 'outside the cffi cdef markers: %s' % missing


def test_every_constant_of_vdsk_h_is_bound():
    names = set(re.findall(r'#define[ \t]+(VDSK_\w+)[ \t]+\S', _header()))
    assert 'VDSK_RDONLY' in names
    missing = sorted(n for n in names if not hasattr(_vdsk.lib, n))
    assert not missing, 'outside the cffi cdef markers: %s' % missing


def test_sources_list_names_every_library_file():
    with open(os.path.join(VDSK, 'sources.list')) as f:
        listed = f.read().split()
    on_disk = sorted(n for n in os.listdir(VDSK) if n.endswith('.c'))
    assert sorted(listed) == on_disk
