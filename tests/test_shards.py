"""split_shards: every id once, in order, no shard over shard_size, a count that divides over the workers."""
import pytest

from tasks.per_image import split_shards


@pytest.mark.parametrize("n,size,workers", [(400, 64, 2), (1600, 64, 2), (7, 64, 2), (1, 4, 3), (10, 3, 1),
                                            (100, 32, 3), (5, 1, 2), (0, 8, 2)])
def test_split_shards(n, size, workers):
    ids = [f"i{k}" for k in range(n)]
    shards = split_shards(ids, size, workers)
    assert [i for s in shards for i in s] == ids
    assert all(0 < len(s) <= size for s in shards)
    if shards:
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        rounded_up = -(-(-(-n // size)) // workers) * workers
        if rounded_up <= n:  # else shards of one id each: the size bound wins
            assert len(shards) % workers == 0
        assert len(shards) >= -(-n // size)


def test_split_shards_balances_the_last_round():
    shards = split_shards([str(k) for k in range(400)], 64, 2)
    assert [len(s) for s in shards] == [50] * 8
