"""fxmem.shard.fsdp_peak: a pp x dp rank's step replayed over FSDP2's units (counted by hand here;
against measured peaks in tests/shard/test_stages.py's 4-process spawn)."""

from fxmem.shard.fsdp_peak import FSDPStage, Unit, order, replay, step_peak


def test_order_is_the_schedules_own():
    assert order("gpipe", 0, 2, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]
    # 1F1B warms up with min(M, S - s) forwards, then backward / forward pairs, then the backwards
    assert order("1f1b", 0, 2, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]
    assert order("1f1b", 1, 2, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    assert order("1f1b", 0, 2, 4) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2), ("B", 3)]


def test_two_blocks_one_microbatch_counted_by_hand():
    """Two blocks of U = 100 B (10 B of activations each), no root parameters, dp = 2, gloo.

    The peak is the copy-out of block 0 in the backward: block 1 still gathered (resharding after
    backward is off), its gradients whole (100), block 0's activations (10), and block 0's flat
    all-gather output beside its copied-out parameters (2 x 100) = 410. Before it, the prefetch of
    block 0 in block 1's pre-backward: both blocks' activations, block 1 gathered, and block 0's
    flat output plus gloo's copy of it = 20 + 100 + 200 = 320."""
    block = Unit(master=100, gathered=100, activations=10)
    none = Unit(0, 0, 0)
    events = dict(replay(none, [block, block], none, order("gpipe", 0, 1, 1), dp=2, collective_copy=True))
    assert events["F0 unit 1 forward"] == 100 + 20
    assert events["B0 unit 1 prefetch 0"] == 20 + 100 + 200
    assert events["B0 unit 0 copy-out"] == 100 + 10 + 100 + 200
    # the reduce: block 0's parameters freed, its gradients copied into the reduce-scatter's input
    assert events["reduce unit 0"] == 100 + 200 + 100
    assert step_peak(none, [block, block], none, order("gpipe", 0, 1, 1), 2, True) == 410
    # NCCL does not copy an all-gather's output: the prefetch holds the flat output alone
    nccl = dict(replay(none, [block, block], none, order("gpipe", 0, 1, 1), dp=2, collective_copy=False))
    assert nccl["B0 unit 1 prefetch 0"] == 20 + 100 + 100


def test_a_second_microbatch_finds_the_gradients_whole_and_the_blocks_regathered():
    """1F1B's last stage runs F0 B0 F1 B1: F1 reshards each block after its forward (they stayed
    gathered from B0), so B1 gathers them again, beside the whole gradients of B0."""
    block = Unit(100, 100, 10)
    none = Unit(0, 0, 0)
    stage = FSDPStage(none, (block, block), none, tuple(order("1f1b", 1, 2, 2)), 2, True)
    events = dict(stage.replay())
    # grads, both blocks (still gathered from B0), microbatch 1's activations so far
    assert events["F1 unit 0 forward"] == 200 + 200 + 10
    assert events["B1 unit 1 all-gather"] == 200 + 20 + 200  # grads, activations, flat output + gloo's copy
    # block 1 gathered again, block 0's prefetch (flat output + gloo's copy) beside it
    assert stage.peak() == events["B1 unit 1 prefetch 0"] == 200 + 20 + 100 + 200


def test_mixed_precision_gathers_low_and_keeps_its_gradients_beside_the_accumulators():
    """bf16 parameters gathered (half the bytes); each backward's bf16 gradients exist beside the
    float32 accumulators until the unit's post-backward adds them in; the all-gather's input is the
    rank's shard cast to bf16; the root's pre-backward prefetches the last block when the stage
    ends in the head."""
    block = Unit(master=100, gathered=50, activations=5)
    head = Unit(master=20, gathered=10, activations=2)
    none = Unit(0, 0, 0)
    events = dict(replay(none, [block], head, order("gpipe", 1, 2, 2), dp=2, collective_copy=True,
                         loss_activations=3))
    root = 10
    # F1 ends with both microbatches' activations: (5 + 2 + 3) x 2, the root gathered
    assert events["F1 end"] == root + 20
    # B0: the loss's activations go first, then the root prefetches the block: flat output, gloo's
    # copy, the shard cast to bf16 (50 / 2)
    assert events["B0 root prefetch 0"] == root + 17 + 50 + 50 + 25
    # B1: gradients whole (120 fp32), the block gathered (50), its bf16 gradients (50) beside its
    # activations (5) and microbatch 1's activations... freed from the head (2) and loss (3)
    assert events["B1 unit 0 gradients"] == root + 50 + 5 + 120 + 50
