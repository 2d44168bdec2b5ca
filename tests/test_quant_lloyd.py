import pytest
import torch

from qvg_compile.quant.lloyd import assign, kmeans


def blobs(seed, sets=3, n=600, d=32, k=12, spread=0.3):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(sets, k, d, generator=gen) * 3
    labels = torch.randint(0, k, (sets, n), generator=gen)
    x = torch.gather(centres, 1, labels.unsqueeze(-1).expand(sets, n, d))
    return x + spread * torch.randn(sets, n, d, generator=gen)


@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_objective_never_increases(init):
    r = kmeans(blobs(0), 16, iters=12, init=init, seed=3)
    for before, after in zip(r.inertia, r.inertia[1:]):
        assert after <= before * (1 + 1e-6)


def test_assignment_equals_brute_force():
    x = blobs(1)
    c = torch.randn(3, 20, 32, generator=torch.Generator().manual_seed(2)) * 3
    idx, dist = assign(x, c)
    brute = torch.cdist(x.double(), c.double()).pow(2)
    assert torch.equal(idx, brute.argmin(-1))
    torch.testing.assert_close(dist.double(), brute.amin(-1), rtol=1e-4, atol=1e-3)


def test_same_seed_is_bit_identical_and_seed_matters():
    x = blobs(2)
    a, b = kmeans(x, 16, 5, seed=7), kmeans(x, 16, 5, seed=7)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.assignments, b.assignments)
    assert not torch.equal(a.centroids, kmeans(x, 16, 5, seed=8).centroids)


def test_empty_clusters_keep_their_centroid():
    x = torch.zeros(1, 10, 4)
    far = torch.full((1, 2, 4), 100.0)
    far[0, 0] = 0.0
    r = kmeans(x, 2, iters=3, centroids=far)
    assert torch.equal(r.centroids[0, 1], far[0, 1])
    assert (r.assignments == 0).all()


def test_early_stop():
    r = kmeans(blobs(3, spread=0.01), 12, iters=50, tol=1e-3, init="kmeans++", seed=0)
    assert r.iterations < 50


def test_warm_start_reaches_cold_objective_in_fewer_iterations():
    """Consecutive chunks of a video share their clusters: start chunk t+1 from chunk t."""
    gen = torch.Generator().manual_seed(4)
    centres = torch.randn(2, 32, 32, generator=gen) * 3

    def chunk(drift):
        labels = torch.randint(0, 32, (2, 1500), generator=gen)
        pts = torch.gather(centres + drift, 1, labels.unsqueeze(-1).expand(2, 1500, 32))
        return pts + 0.5 * torch.randn(2, 1500, 32, generator=gen)

    first, second = chunk(0.0), chunk(0.05)
    prev = kmeans(first, 32, iters=10, seed=0)
    cold = kmeans(second, 32, iters=10, seed=1)
    warm = kmeans(second, 32, iters=10, centroids=prev.centroids)
    target = cold.inertia[-1]
    steps = next(i for i, v in enumerate(warm.inertia) if v <= target * (1 + 1e-4))
    assert steps < 10
    assert warm.inertia[0] < cold.inertia[0]


def test_bad_inputs():
    with pytest.raises(ValueError, match="at most as many centroids as tokens"):
        kmeans(torch.randn(1, 8, 4), 9, 2)
    with pytest.raises(ValueError, match="rank 3"):
        kmeans(torch.randn(8, 4), 2, 2)
    with pytest.raises(TypeError, match="floating"):
        kmeans(torch.ones(1, 8, 4, dtype=torch.int64), 2, 2)
    with pytest.raises(ValueError, match="centroids"):
        kmeans(torch.randn(1, 8, 4), 2, 2, centroids=torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="init"):
        kmeans(torch.randn(1, 8, 4), 2, 2, init="nope")
