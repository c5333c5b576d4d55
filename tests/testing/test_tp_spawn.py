"""fxmem.testing.tp.spawn: a rank that raises ends the spawn with its error instead of hanging."""

import datetime

import pytest
import torch
import torch.distributed as dist

from fxmem.testing import tp


def _rank_one_fails(rank, world):
    if rank == 1:
        raise ValueError("rank 1 fails before sending")
    # rank 0 waits on rank 1 as a pipeline stage does; bounded, so that a regression fails the test
    # (it would have hung: the failing rank used to wait at a barrier first)
    dist.irecv(torch.zeros(1), src=1).wait(timeout=datetime.timedelta(seconds=120))
    return {}


@pytest.mark.distributed
def test_a_failing_rank_ends_the_spawn_with_its_traceback():
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="rank 1 fails before sending"):
        tp.spawn(_rank_one_fails, 2)
