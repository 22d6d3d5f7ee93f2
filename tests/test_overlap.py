"""The overlap counts (stand.lab.overlap) on hand-made samples whose answers can be read off."""

import pytest

from stand.lab.overlap import main, seen


def test_counts_by_source():
    prompt = [1, 2]
    a = [3, 4, 5, 6]  # bigrams ending at t = 0..3: (2,3) (3,4) (4,5) (5,6)
    b = [9, 1, 2, 5]  # (2,9) (9,1) (1,2) (2,5); (1,2) is the prompt's: own
    c = [8, 4, 5, 7]  # (2,8) (8,4) (4,5) (5,7); (4,5) at t=2: a wrote it at t=2 too (not before), a is earlier
    s = seen(prompt, [a, b, c], 2)
    assert s.total == 12
    assert s.own == 1
    assert s.lockstep == 1  # only b's (1,2): a's and c's (4,5) end at the same position
    assert s.earlier == 2  # and c's (4,5), from a, which came first
    assert s.any == 3  # and a's (4,5), which c wrote


def test_repeats_within_a_sample_are_own():
    s = seen([7], [[1, 2, 1, 2, 1, 2]], 2)
    assert (s.total, s.own) == (6, 3)  # (7,1) (1,2) (2,1) new; (1,2) (2,1) (1,2) again


def test_bad_orders_name_the_flag(capsys):
    with pytest.raises(SystemExit, match="--orders"):
        main(["--orders", "two"])
