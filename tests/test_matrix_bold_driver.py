"""The bold-driver step of train_gd: grow after an accepted step, undo and halve a rejected one."""

import pytest
import torch


class _NoFittedTerms:
    """A problem with nothing fitted beside the parameters (the interface BoldDriver reads)."""

    def trained_state(self):
        return None


def test_bold_driver_undoes_a_step_that_raised_the_objective_and_halves_the_step():
    from torchlowrank.matrix.bold_driver import BoldDriver

    p = torch.tensor([1.0, -2.0], dtype=torch.float64)
    driver = BoldDriver([p], [1.0], _NoFittedTerms(), lr=0.1, grow=1.5, zero_loss=1.0)
    loss, grads = (p.square().sum(), [2 * p])
    assert driver.judge(loss, grads, wd=0.0)[0] is loss and driver.eta == 0.1  # the first point: accepted
    p.sub_(grads[0], alpha=driver.eta)  # a descent step: 5.0 -> 3.2
    loss2, grads2 = driver.judge(p.square().sum(), [2 * p], wd=0.0)
    assert float(loss2) == pytest.approx(3.2) and driver.eta == pytest.approx(0.15)  # accepted: grows
    kept = p.clone()
    p.add_(10.0)  # a step that raises the objective
    loss3, grads3 = driver.judge(p.square().sum(), [2 * p], wd=0.0)
    assert torch.equal(p, kept) and loss3 is loss2 and grads3 is grads2  # undone: the accepted point back
    assert driver.eta == pytest.approx(0.075) and driver.n_rejected == 1 and not driver.exhausted
    # weight decay counts in the objective: 3.2 + 0.5 * 1.0 * 3.2
    assert driver.objective(p.square().sum(), wd=1.0) == pytest.approx(4.8)
