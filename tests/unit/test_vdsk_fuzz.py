"""Bounded libFuzzer run of every libvdsk fuzz target (native/fuzz):
built with clang -fsanitize=fuzzer,address,undefined, seeded with
qemu-img-made images, FUZZ_SECONDS per target one after the other.  Any
crash, leak, per-input timeout, out-of-memory or harness contract
violation fails the test with the reproducer path and the sanitizer
report.  Longer runs: bench/fuzz.py."""
import os
import pathlib
import shutil
import sys

import pytest

NATIVE = pathlib.Path(__file__).resolve().parents[2] / 'native'
sys.path.insert(0, str(NATIVE / 'fuzz'))
import fuzzrun  # noqa: E402

FUZZ_SECONDS = int(os.environ.get('VDSK_FUZZ_SECONDS', '15'))


def _missing():
    for tool in ('clang', 'make', 'qemu-img', 'qemu-io'):
        if shutil.which(tool) is None:
            return tool
    return None


pytestmark = pytest.mark.skipif(
    _missing() is not None,
    reason='libFuzzer targets need %s (tools/setup-host installs it)' %
    _missing())


@pytest.fixture(scope='module')
def fuzz_env(tmp_path_factory):
    work = tmp_path_factory.mktemp('vdsk-fuzz')
    fuzzrun.build()
    seeds = fuzzrun.make_corpus(work / 'seeds')
    return work, seeds


def test_seed_corpus_covers_every_target(fuzz_env):
    work, seeds = fuzz_env
    for t in fuzzrun.TARGETS:
        files = list((seeds / t).iterdir())
        assert len(files) >= 3, (t, files)
        assert max(f.stat().st_size for f in files) <= 2200 * 1024


@pytest.mark.parametrize('target', fuzzrun.TARGETS)
def test_fuzz_target(fuzz_env, target):
    work, seeds = fuzz_env
    res = fuzzrun.run_target(target, seeds, work, FUZZ_SECONDS)
    assert not res.findings, '\n\n'.join(str(f) for f in res.findings)
    # the run really fuzzed: more inputs executed than there are seeds,
    # and libFuzzer's closing line was read
    assert res.runs > len(list((seeds / target).iterdir())), res.log[-3000:]
    assert res.cov > 0 and res.ft >= res.seed_ft > 0, res.log[-3000:]
