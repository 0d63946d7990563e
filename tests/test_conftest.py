"""The suite's own guard (conftest ``_no_process_group_left``): a test may not leave torch.distributed
initialized, but a module-scoped fixture may hold one group across its tests (tests/gpu's parity
models load once under ``distributed(1, 1)``; on the first GPU run the guard ended that group after
the first test and the second test failed without it)."""

import pytest
import torch


@pytest.fixture(scope="module")
def group():
    from pare_nemo.parallel import distributed

    with distributed(1, 1):
        yield torch.distributed.get_world_size()


@pytest.mark.parametrize("n", [1, 2])
def test_a_module_fixture_keeps_its_group_across_tests(group, n):
    assert group == 1 and torch.distributed.is_initialized()
