"""scripts/mutations.py stays runnable: each deliberate bug's text is in the
tree exactly once, and each bug's tests exist. (Running the bugs is too slow
for the suite: see README, "The mutation check".)"""

from pathlib import Path

import mutations

ROOT = Path(__file__).resolve().parent.parent


def test_every_bug_of_the_mutation_check_still_applies_to_the_tree():
    for name, (path, before, after, tests) in mutations.MUTATIONS.items():
        assert (ROOT / path).read_text().count(before) == 1, \
            f'{name}: its text is not in {path} exactly once: update scripts/mutations.py'
        assert before != after, name
        for test in tests:
            assert (ROOT / test.split('::')[0]).is_file(), f'{name}: {test} does not exist'
