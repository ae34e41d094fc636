"""One uid per VM: allocation, release, exhaustion, persistence across a
new allocator (a restarted nova-compute), uids the host knows skipped."""
import os
import pwd

import pytest

from nova_bhyve.sandbox import uids


def test_parse_range():
    assert uids.parse_range('64000-64999') == (64000, 64999)
    assert uids.parse_range(' 7 - 7 ') == (7, 7)
    for bad in ('', '64000', '0-10', '10-5', 'a-b', '1-4294967295'):
        with pytest.raises(ValueError):
            uids.parse_range(bad)


def _free_range(n):
    """n consecutive uids no user or group of this host has."""
    first = 64900
    while any(uids._taken_by_the_system(u) for u in range(first, first + n)):
        first += n
    return first, first + n - 1


def test_allocate_release_and_reuse(tmp_path):
    lo, hi = _free_range(3)
    alloc = uids.UidAllocator(str(tmp_path), '%d-%d' % (lo, hi))
    a = alloc.allocate('vm-a')
    b = alloc.allocate('vm-b')
    assert (a, b) == (lo, lo + 1)
    assert alloc.allocate('vm-a') == a          # one per VM, idempotent
    assert alloc.allocated() == {a: 'vm-a', b: 'vm-b'}
    assert alloc.release('vm-a') == a
    assert alloc.release('vm-a') is None        # idempotent
    assert alloc.lookup('vm-a') is None
    assert alloc.allocate('vm-c') == a          # the freed one again
    assert sorted(os.listdir(str(tmp_path))) == [str(a), str(b)]


def test_exhaustion_is_a_clear_error(tmp_path):
    lo, hi = _free_range(2)
    alloc = uids.UidAllocator(str(tmp_path), (lo, hi))
    alloc.allocate('vm-1')
    alloc.allocate('vm-2')
    with pytest.raises(uids.NoFreeUid, match='sandbox_uid_range'):
        alloc.allocate('vm-3')
    assert [n for n in os.listdir(str(tmp_path)) if n.startswith('.')] == []


def test_persisted_across_a_new_allocator(tmp_path):
    lo, hi = _free_range(4)
    first = uids.UidAllocator(str(tmp_path), (lo, hi))
    a = first.allocate('vm-a')
    b = first.allocate('vm-b')
    again = uids.UidAllocator(str(tmp_path), (lo, hi))
    assert again.lookup('vm-a') == a and again.lookup('vm-b') == b
    c = again.allocate('vm-c')
    assert c not in (a, b)
    # two allocators at once never hand out one uid twice
    assert first.allocate('vm-d') not in (a, b, c)


def test_uids_of_the_host_are_skipped(tmp_path):
    nobody = pwd.getpwnam('nobody').pw_uid
    lo = nobody
    while uids._taken_by_the_system(lo + 1):
        lo += 1
    alloc = uids.UidAllocator(str(tmp_path), (nobody, lo + 1))
    assert alloc.allocate('vm') == lo + 1


def test_owner_names_are_checked(tmp_path):
    alloc = uids.UidAllocator(str(tmp_path), _free_range(1))
    for bad in ('', 'a/b', 'x\ny'):
        with pytest.raises(ValueError):
            alloc.allocate(bad)


def test_transfer_keeps_the_uid_under_a_new_owner(tmp_path):
    lo, hi = _free_range(2)
    alloc = uids.UidAllocator(str(tmp_path), '%d-%d' % (lo, hi))
    a = alloc.allocate('incoming-x')
    assert alloc.transfer('incoming-x', 'vm-x') == a
    assert alloc.allocated() == {a: 'vm-x'}
    assert alloc.transfer('incoming-x', 'vm-y') is None
    with pytest.raises(ValueError):
        alloc.transfer('vm-x', '../escape')
    assert sorted(os.listdir(str(tmp_path))) == [str(a)]
