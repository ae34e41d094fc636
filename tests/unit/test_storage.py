"""storage.py: checksum verification, the format check of downloaded data,
and instance root disks, on real image files made with nova_bhyve.storage.vdsk
(libvdsk). Nothing is mocked."""
import hashlib
import os
import shutil
import tempfile

from nova import exception
from oslo_utils import units
import pytest

from nova_bhyve.storage import disks
from nova_bhyve.storage import image_cache as storage
from nova_bhyve.storage import vdsk

IMAGE_ID = '0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0'


@pytest.fixture
def tmp_dir():
    path = tempfile.mkdtemp(prefix='nb-storage-')
    yield path
    shutil.rmtree(path)


# -- _verify_checksum ---------------------------------------------------------

@pytest.fixture
def blob(tmp_dir):
    """A file larger than one hash chunk, so chunking is exercised."""
    path = os.path.join(tmp_dir, 'image.part')
    data = os.urandom(storage._HASH_CHUNK * 2 + 12345)
    with open(path, 'wb') as f:
        f.write(data)
    return path, data


def test_checksum_sha512_matches(blob):
    path, data = blob
    meta = {'os_hash_algo': 'sha512',
            'os_hash_value': hashlib.sha512(data).hexdigest(),
            'checksum': 'not-looked-at'}
    assert storage._verify_checksum(IMAGE_ID, meta, path) is None


def test_checksum_sha512_mismatch(blob):
    path, data = blob
    meta = {'os_hash_algo': 'sha512',
            'os_hash_value': hashlib.sha512(data[:-1]).hexdigest(),
            'checksum': hashlib.md5(data).hexdigest()}
    with pytest.raises(exception.ImageUnacceptable) as e:
        storage._verify_checksum(IMAGE_ID, meta, path)
    assert 'does not match its sha512 checksum' in str(e.value)
    assert IMAGE_ID in str(e.value)


def test_checksum_md5_fallback_matches(blob):
    path, data = blob
    meta = {'checksum': hashlib.md5(data).hexdigest()}
    assert storage._verify_checksum(IMAGE_ID, meta, path) is None


def test_checksum_md5_fallback_mismatch(blob):
    path, _ = blob
    meta = {'checksum': hashlib.md5(b'other').hexdigest()}
    with pytest.raises(exception.ImageUnacceptable) as e:
        storage._verify_checksum(IMAGE_ID, meta, path)
    assert 'md5 checksum' in str(e.value)


@pytest.mark.parametrize('algo,value', [('sha512', None), (None, 'abc'),
                                        ('sha512', '')])
def test_checksum_incomplete_multihash_falls_back_to_md5(blob, algo, value):
    path, _ = blob
    meta = {'os_hash_algo': algo, 'os_hash_value': value,
            'checksum': hashlib.md5(b'other').hexdigest()}
    with pytest.raises(exception.ImageUnacceptable) as e:
        storage._verify_checksum(IMAGE_ID, meta, path)
    assert 'md5 checksum' in str(e.value)


def test_checksum_sha256(blob):
    path, data = blob
    meta = {'os_hash_algo': 'sha256',
            'os_hash_value': hashlib.sha256(data).hexdigest()}
    assert storage._verify_checksum(IMAGE_ID, meta, path) is None
    meta['os_hash_value'] = hashlib.sha256(b'').hexdigest()
    with pytest.raises(exception.ImageUnacceptable):
        storage._verify_checksum(IMAGE_ID, meta, path)


def test_checksum_none_recorded(blob):
    path, _ = blob
    assert storage._verify_checksum(IMAGE_ID, {}, path) is None
    assert storage._verify_checksum(IMAGE_ID, {'checksum': None}, path) \
        is None


def test_checksum_unknown_algorithm_not_verified(blob):
    # Documented behaviour: logged, not verified (even a wrong value passes)
    path, _ = blob
    meta = {'os_hash_algo': 'no-such-hash', 'os_hash_value': 'deadbeef',
            'checksum': hashlib.md5(b'other').hexdigest()}
    assert storage._verify_checksum(IMAGE_ID, meta, path) is None


def test_checksum_missing_file(tmp_dir):
    with pytest.raises(FileNotFoundError):
        storage._verify_checksum(IMAGE_ID, {'checksum': 'x'},
                                 os.path.join(tmp_dir, 'absent'))


# -- images made with libvdsk -------------------------------------------------

PATTERN = b'nova-bhyve!' * 400


def raw_image(tmp_dir, size, name='base.raw'):
    path = os.path.join(tmp_dir, name)
    vdsk.create(path, 'raw', size)
    with vdsk.open(path) as img:
        img.write(0, PATTERN)
        img.write(size - len(PATTERN), PATTERN)
    return path


def qcow2_image(tmp_dir, size, name='base.qcow2', backing=None,
                backing_fmt=None):
    path = os.path.join(tmp_dir, name)
    vdsk.create(path, 'qcow2', size, backing=backing,
                backing_fmt=backing_fmt)
    if backing is None:
        with vdsk.open(path) as img:
            img.write(0, PATTERN)
            if size >= 2 * units.Mi:
                img.write(units.Mi, PATTERN)
    return path


# -- _check_format ------------------------------------------------------------

def test_check_format_accepts_matching(tmp_dir):
    assert storage._check_format(IMAGE_ID, 'raw',
                                 raw_image(tmp_dir, units.Mi)) is None
    assert storage._check_format(IMAGE_ID, 'qcow2',
                                 qcow2_image(tmp_dir, units.Mi)) is None


@pytest.mark.parametrize('maker,claimed,probed', [
    (raw_image, 'qcow2', 'raw'), (qcow2_image, 'raw', 'qcow2')])
def test_check_format_refuses_mismatch(tmp_dir, maker, claimed, probed):
    path = maker(tmp_dir, units.Mi)
    with pytest.raises(exception.ImageUnacceptable) as e:
        storage._check_format(IMAGE_ID, claimed, path)
    assert 'image data is %s but its disk_format is %s' % (
        probed, claimed) in str(e.value)


def test_check_format_refuses_data_of_another_format(tmp_dir):
    with pytest.raises(exception.ImageUnacceptable,
                       match='disk_format is iso'):
        storage._check_format(IMAGE_ID, 'iso', raw_image(tmp_dir, units.Mi))


def test_check_format_unreadable(tmp_dir):
    with pytest.raises(exception.ImageUnacceptable):
        storage._check_format(IMAGE_ID, 'raw',
                              os.path.join(tmp_dir, 'absent'))


# -- create_root_disk: qcow2 overlay ------------------------------------------

def test_overlay_sized_to_root_gb(tmp_dir):
    base = raw_image(tmp_dir, 64 * units.Mi)
    disk = os.path.join(tmp_dir, 'disk')
    assert disks.create_root_disk(base, 'raw', disk, 1, IMAGE_ID) == \
        units.Gi
    info = vdsk.info(disk)
    assert info['format'] == 'qcow2'
    assert info['virtual_size'] == units.Gi
    assert info['backing_file'] == base
    assert info['backing_format'] == 'raw'
    # copy-on-write: the overlay is small and reads the base's data
    assert os.path.getsize(disk) < 2 * units.Mi
    with vdsk.open(disk, readonly=True) as img:
        assert img.read(0, len(PATTERN)) == PATTERN
        assert img.read(64 * units.Mi - len(PATTERN), len(PATTERN)) == \
            PATTERN
        assert img.read(units.Gi - 4096, 4096) == bytes(4096)


def test_overlay_root_gb_zero_takes_image_size(tmp_dir):
    base = qcow2_image(tmp_dir, 3 * units.Gi + 5 * units.Mi)
    disk = os.path.join(tmp_dir, 'disk')
    size = disks.create_root_disk(base, 'qcow2', disk, 0, IMAGE_ID)
    assert size == 3 * units.Gi + 5 * units.Mi
    info = vdsk.info(disk)
    assert info['virtual_size'] == size
    assert info['backing_format'] == 'qcow2'
    with vdsk.open(disk, readonly=True) as img:
        assert img.read(units.Mi, len(PATTERN)) == PATTERN


def test_overlay_root_gb_equal_to_image(tmp_dir):
    base = raw_image(tmp_dir, units.Gi)
    disk = os.path.join(tmp_dir, 'disk')
    assert disks.create_root_disk(base, 'raw', disk, 1, IMAGE_ID) == \
        units.Gi


def test_root_gb_smaller_than_image(tmp_dir):
    base = raw_image(tmp_dir, 2 * units.Gi + units.Mi)
    disk = os.path.join(tmp_dir, 'disk')
    with pytest.raises(exception.FlavorDiskSmallerThanImage) as e:
        disks.create_root_disk(base, 'raw', disk, 2, IMAGE_ID)
    assert e.value.kwargs['flavor_size'] == 2 * units.Gi
    assert e.value.kwargs['image_size'] == 2 * units.Gi + units.Mi
    assert not os.path.exists(disk)


def test_base_with_backing_file_refused(tmp_dir):
    lower = raw_image(tmp_dir, units.Mi, name='lower.raw')
    base = qcow2_image(tmp_dir, units.Mi, backing=lower, backing_fmt='raw')
    disk = os.path.join(tmp_dir, 'disk')
    with pytest.raises(exception.ImageUnacceptable) as e:
        disks.create_root_disk(base, 'qcow2', disk, 1, IMAGE_ID)
    assert 'backing file' in str(e.value)
    assert not os.path.exists(disk)


@pytest.mark.parametrize('maker,claimed', [(raw_image, 'qcow2'),
                                           (qcow2_image, 'raw')])
@pytest.mark.parametrize('disk_format', ['qcow2', 'raw'])
def test_format_mismatch_refused(tmp_dir, maker, claimed, disk_format):
    base = maker(tmp_dir, units.Mi)
    disk = os.path.join(tmp_dir, 'disk')
    with pytest.raises(exception.ImageUnacceptable) as e:
        disks.create_root_disk(base, claimed, disk, 1, IMAGE_ID,
                                 disk_format=disk_format)
    assert 'not %s' % claimed in str(e.value)
    assert not os.path.exists(disk)


def test_missing_base_refused(tmp_dir):
    disk = os.path.join(tmp_dir, 'disk')
    with pytest.raises(exception.ImageUnacceptable):
        disks.create_root_disk(os.path.join(tmp_dir, 'absent'), 'raw',
                                 disk, 1, IMAGE_ID)
    assert not os.path.exists(disk)


# -- create_root_disk: sparse raw copy (bhyve) --------------------------------

@pytest.mark.parametrize('maker,fmt', [(raw_image, 'raw'),
                                       (qcow2_image, 'qcow2')])
def test_raw_copy(tmp_dir, maker, fmt):
    base = maker(tmp_dir, 32 * units.Mi)
    disk = os.path.join(tmp_dir, 'disk')
    size = disks.create_root_disk(base, fmt, disk, 1, IMAGE_ID,
                                    disk_format='raw')
    assert size == units.Gi
    assert vdsk.info(disk)['format'] == 'raw'
    assert vdsk.info(disk)['backing_file'] is None
    assert os.path.getsize(disk) == units.Gi
    # sparse: only the chunks holding data were written
    assert os.stat(disk).st_blocks * 512 <= 4 * units.Mi
    with vdsk.open(base, fmt=fmt, readonly=True) as src, \
            open(disk, 'rb') as out:
        for off in range(0, 32 * units.Mi, units.Mi):
            out.seek(off)
            assert out.read(units.Mi) == src.read(off, units.Mi), off
        out.seek(32 * units.Mi)
        assert out.read(units.Mi) == bytes(units.Mi)


def test_raw_copy_root_gb_zero_and_odd_size(tmp_dir):
    size = 5 * units.Mi + 4096           # not a multiple of the copy chunk
    base = raw_image(tmp_dir, size)
    disk = os.path.join(tmp_dir, 'disk')
    assert disks.create_root_disk(base, 'raw', disk, 0, IMAGE_ID,
                                    disk_format='raw') == size
    with open(base, 'rb') as a, open(disk, 'rb') as b:
        assert a.read() == b.read()


def test_raw_copy_too_small_creates_nothing(tmp_dir):
    base = raw_image(tmp_dir, units.Gi + 512)
    disk = os.path.join(tmp_dir, 'disk')
    with pytest.raises(exception.FlavorDiskSmallerThanImage):
        disks.create_root_disk(base, 'raw', disk, 1, IMAGE_ID,
                                 disk_format='raw')
    assert not os.path.exists(disk)
