import itertools
import math

import pytest
import torch

from cot2cli.metrics import majority_at_k, majority_vote, parallelism_diagnostics, pass_at_k


def brute_force_pass_at_k(correct: list[bool], k: int) -> float:
    """Share of all k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_pass_at_k_matches_enumeration_over_subsets(n: int) -> None:
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            estimate = pass_at_k(torch.tensor([c]), n, k)
            assert estimate.item() == pytest.approx(brute_force_pass_at_k(correct, k), abs=1e-12)
            assert estimate.item() == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_is_batched_and_checks_k() -> None:
    counts = torch.tensor([[0, 3], [6, 1]])
    batched = pass_at_k(counts, 6, 2)
    assert batched.shape == (2, 2)
    assert batched[0, 0] == 0 and batched[1, 0] == 1
    assert batched[0, 1].item() == pytest.approx(1 - math.comb(3, 2) / math.comb(6, 2))
    with pytest.raises(ValueError):
        pass_at_k(counts, 6, 7)
    with pytest.raises(ValueError):
        pass_at_k(torch.tensor([7]), 6, 1)


def test_majority_vote_breaks_ties_to_smallest_id() -> None:
    samples = torch.tensor([
        [4, 2, 4, 2],  # tie 2/4 -> 2
        [9, 9, 1, 3],  # clear winner 9
        [7, 5, 3, 1],  # all once -> 1
        [0, 8, 8, 0],  # tie 0/8 -> 0
    ])
    assert majority_vote(samples, vocab_size=10).tolist() == [2, 9, 1, 0]
    # Order of the samples does not matter.
    assert majority_vote(samples.flip(-1), vocab_size=10).tolist() == [2, 9, 1, 0]


def test_majority_at_k_averages_disjoint_groups() -> None:
    samples = torch.tensor([[3, 3, 1, 2, 2, 2, 5]])  # k=2: groups (3,3) (1,2) (2,2); the 7th is left out
    answer = torch.tensor([2])
    assert majority_at_k(samples, answer, 2, vocab_size=6).item() == pytest.approx(1 / 3)  # votes 3, 1, 2
    assert majority_at_k(samples, answer, 1, vocab_size=6).item() == pytest.approx(3 / 7)
    assert majority_at_k(samples, answer, 7, vocab_size=6).item() == 1.0  # 2 appears three times


def test_diagnostics_on_a_hand_built_distribution() -> None:
    # One instance, two steps, vocabulary of 5; reachable: {1, 2} at step 1, {0, 3, 4} at step 2.
    probs = torch.tensor([[[0.0, 0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.0, 0.495, 0.005]]], dtype=torch.float64)
    valid = torch.tensor([[[False, True, True, False, False], [True, False, False, True, True]]])
    found = parallelism_diagnostics(probs, valid, threshold=0.01)

    entropy_2 = -sum(p * math.log(p) for p in (0.25, 0.25, 0.495, 0.005))
    torch.testing.assert_close(found["entropy"], torch.tensor([[math.log(2), entropy_2]], dtype=torch.float64))
    torch.testing.assert_close(found["effective_support"], torch.tensor([[2.0, math.exp(entropy_2)]],
                                                                        dtype=torch.float64))
    torch.testing.assert_close(found["valid_mass"], torch.tensor([[1.0, 0.75]], dtype=torch.float64))
    # Step 2: S0 (0.25) and S3 (0.495) count; S4 (0.005) is below the threshold; S1 is not reachable.
    assert found["valid_states_above_threshold"].tolist() == [[2.0, 2.0]]
    assert found["valid_states"].tolist() == [[2.0, 3.0]]


def test_diagnostics_of_a_one_hot_token() -> None:
    probs = torch.zeros(3, 1, 4)
    probs[:, 0, 2] = 1.0
    valid = torch.zeros(3, 1, 4, dtype=torch.bool)
    valid[:, 0, 2] = True
    found = parallelism_diagnostics(probs, valid, threshold=0.01)
    assert found["entropy"].abs().max() == 0
    assert found["effective_support"].tolist() == [[1.0]] * 3
    assert found["valid_mass"].tolist() == [[1.0]] * 3
