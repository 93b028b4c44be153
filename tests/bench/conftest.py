"""The small MDP instance every benchmark test enumerates."""

import pytest

from tokenratio.bench import task


@pytest.fixture(scope="module")
def tiny():
    return task.make_mdp(num_prompts=2, vocab_size=3, length=3, seed=7)
