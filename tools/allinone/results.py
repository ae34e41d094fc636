"""Tempest's console output as a summary, and two summaries side by side
(docs/tempest.md: this driver against Nova's fake driver)."""
import json
import re

_LINE = re.compile(
    r'^\{\d+\} (?:setUpClass \((?P<cls>[\w.]+)\)|(?P<test>[\w.]+))'
    r'(?: \[[\d.]+s\])? \.\.\. (?P<status>ok|FAILED|SKIPPED)'
    r'(?:: (?P<reason>.*))?$')
STATUS = {'ok': 'passed', 'FAILED': 'failed', 'SKIPPED': 'skipped'}


def parse(lines):
    """{test or class id: {'status': passed|failed|skipped, 'reason'}}."""
    tests = {}
    for line in lines:
        m = _LINE.match(line.rstrip('\n'))
        if m:
            tests[m.group('test') or m.group('cls')] = {
                'status': STATUS[m.group('status')],
                'reason': (m.group('reason') or '').strip()}
    return tests


def summary(tests):
    counts = {s: 0 for s in STATUS.values()}
    for t in tests.values():
        counts[t['status']] += 1
    return dict(counts, ran=len(tests))


def save(path, tests, **facts):
    with open(path, 'w') as f:
        json.dump(dict(facts, summary=summary(tests), tests=tests), f,
                  indent=1, sort_keys=True)


def compare(ours, theirs):
    """Tests that pass with ``theirs`` (the fake driver) and not with
    ``ours``, with what ours said."""
    return {t: ours.get(t, {'status': 'not run', 'reason': ''})
            for t, r in sorted(theirs.items())
            if r['status'] == 'passed' and
            ours.get(t, {}).get('status') != 'passed'}
