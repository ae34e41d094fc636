"""The binding is built from the library files that vdsk/sources.list
names (native/vdsk_build.py, as native/Makefile): the list names every
library C file."""
import os

VDSK = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'native', 'vdsk')


def test_sources_list_names_every_library_file():
    with open(os.path.join(VDSK, 'sources.list')) as f:
        listed = f.read().split()
    on_disk = sorted(n for n in os.listdir(VDSK) if n.endswith('.c'))
    assert sorted(listed) == on_disk
