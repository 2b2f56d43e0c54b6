"""The parts train_gd stops with: early stopping on validation (patience counted after the escape,
the best state restored with the problem's fitted terms) and the polish hand-off (a polished
solution kept only when the trainer's own loss reaches the target, otherwise everything restored)."""

import torch

from torchlowrank.matrix.early_stopping import EarlyStopping
from torchlowrank.matrix.polish_handoff import attempt_polish


class _Problem:
    """A problem with one fitted term beside the parameters (a bias)."""

    def __init__(self):
        self.bias = torch.tensor([0.0])

    def trained_state(self):
        return self.bias.clone()

    def load_trained_state(self, state):
        self.bias = state.clone()


class _Model:
    """loss = ||p||^2 + bias^2."""

    def __init__(self, problem):
        self.p = torch.tensor([1.0, 2.0], dtype=torch.float64)
        self.problem = problem

    def factor_parameters(self):
        return [self.p]

    def loss_and_grads(self, problem):
        return self.p.square().sum() + problem.bias.square().sum(), [2 * self.p]


def test_patience_counts_only_after_the_escape_and_restore_brings_back_the_best_state():
    problem = _Problem()
    p = torch.tensor([1.0])
    early = EarlyStopping([p], problem, patience=2)
    assert not early.update(0, 1.0, escaped=False)
    p.fill_(5.0)
    problem.bias.fill_(3.0)
    assert not early.update(10, 2.0, escaped=False) and not early.update(20, 2.0, escaped=False)  # plateau
    early.escaped()
    assert not early.update(30, 1.5, escaped=True)
    assert early.update(40, 1.2, escaped=True)  # two evaluations worse than the best (1.0)
    early.restore()
    assert early.best_iteration == 0 and float(p) == 1.0 and float(problem.bias) == 0.0


def test_a_polish_that_misses_the_target_is_rejected_and_everything_restored():
    problem = _Problem()
    model = _Model(problem)

    def bad_polish(t, model, problem, target):
        model.p.zero_()
        problem.bias.fill_(1.0)  # loss 1.0
        return "polished to rank 1"

    out = attempt_polish(bad_polish, 7, model, problem, target_loss=0.5, deadline=None)
    assert not out.accepted and "rejected" in out.info
    assert model.p.tolist() == [1.0, 2.0] and float(problem.bias) == 0.0 and float(out.loss) == 5.0

    def good_polish(t, model, problem, target):
        model.p.zero_()
        return "polished to rank 0"

    out = attempt_polish(good_polish, 8, model, problem, target_loss=0.5, deadline=None)
    assert out.accepted and out.info == "polished to rank 0" and float(out.loss) == 0.0


def test_a_polish_that_declines_leaves_the_parameters_alone_and_reports_its_attempts():
    problem = _Problem()
    model = _Model(problem)

    class Declines:
        deadline = None
        attempts = [(5, 2, 0.3)]

        def __call__(self, t, model, problem, target):
            return None

    polish = Declines()
    out = attempt_polish(polish, 5, model, problem, target_loss=0.5, deadline=123.0)
    assert not out.accepted and out.loss is None and "(5, 2, 0.3)" in out.info and polish.deadline == 123.0
