import numpy as np

from ferkit.data.samplers import EpochSampler, class_balanced_order, mrr_order


def _labels():
    return np.array([0] * 50 + [1] * 7 + [2] * 20)


def test_mrr_draws_smallest_class_size_per_class_and_covers_everything():
    labels = _labels()
    seen_large = set()
    for epoch in range(12):
        order = mrr_order(labels, seed=3, epoch=epoch)
        assert len(order) == 3 * 7
        assert len(set(order.tolist())) == len(order)  # no image repeats within an epoch
        assert np.all(np.bincount(labels[order], minlength=3) == 7)
        seen_large |= set(int(i) for i in order if labels[i] == 0)
    assert seen_large == set(range(50))  # every sample of the largest class is eventually seen (ceil(50/7)+1 epochs)
    assert not np.array_equal(mrr_order(labels, 3, 0), mrr_order(labels, 3, 1))  # fresh draws every epoch
    assert np.array_equal(mrr_order(labels, 3, 5), mrr_order(labels, 3, 5))  # a pure function of (seed, epoch)


def test_class_balanced_evens_out_classes():
    labels = _labels()
    counts = np.bincount(labels[np.concatenate([class_balanced_order(labels, 0, e) for e in range(40)])])
    assert counts.min() / counts.max() > 0.85


def test_rank_shards_partition_the_epoch_and_resume_position():
    labels = _labels()
    full = EpochSampler(labels, "random", seed=1)
    full.set_epoch(2)
    order = [i for _, i in full]
    shards = []
    for rank in range(2):
        s = EpochSampler(labels, "random", seed=1, rank=rank, world_size=2)
        s.set_epoch(2)
        shards.append([i for _, i in s])
    assert sorted(shards[0] + shards[1])[: len(labels)] == sorted(order + order[:1])[: len(labels)]
    assert len(shards[0]) == len(shards[1])
    resumed = EpochSampler(labels, "random", seed=1)
    resumed.set_epoch(2, start=30)
    assert [i for _, i in resumed] == order[30:]
