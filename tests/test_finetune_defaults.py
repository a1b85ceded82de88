"""Fine-tuning settings chosen from the model and the data: temperature, range-test learning rate, warm-up."""

from __future__ import annotations

import math

import pytest
import torch

from separify.tuning import defaults
from separify.tuning.finetune import finetune

from test_finetune import _data, _params, _student, _teacher


def _logits(classes: int, margin: float, positions: int = 64) -> torch.Tensor:
    """``(positions, classes)`` logits whose top class leads every other by ``margin``."""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(positions, classes, generator=g) * 0.1
    out[torch.arange(positions), torch.randint(0, classes, (positions,), generator=g)] += margin
    return out


@pytest.mark.parametrize("classes, margin, expected", [
    pytest.param(10, 20.0, 4.0, id="10-classes-very-confident"),
    pytest.param(10, 12.0, 2.0, id="10-classes-confident"),
    pytest.param(8210, 26.0, 2.0, id="8210-classes-very-confident"),
    pytest.param(8210, 20.0, 1.0, id="8210-classes-confident"),
    pytest.param(10, 0.0, 1.0, id="undecided-falls-back-to-1"),
])
def test_temperature_keeps_the_top_class_on_top(classes, margin, expected):
    logits = _logits(classes, margin)
    chosen = defaults.choose_temperature([logits[:32], logits[32:]], class_dim=-1)
    assert chosen == expected
    top = torch.softmax(logits.double() / chosen, -1).amax(-1).mean()
    assert top >= defaults.TOP_MASS or chosen == defaults.TEMPERATURES[-1]
    higher = [t for t in defaults.TEMPERATURES if t > chosen]
    for t in higher:  # every higher candidate gives the top class less than TOP_MASS
        assert torch.softmax(logits.double() / t, -1).amax(-1).mean() < defaults.TOP_MASS


def test_temperature_reads_the_class_dim_of_sequence_logits():
    seq = _logits(8210, 26.0).reshape(4, 16, 8210).transpose(1, 2)  # (B, C, T): classes along dim 1
    assert defaults.choose_temperature([seq], class_dim=1) == 2.0


def test_range_test_picks_a_tenth_of_the_rate_that_made_the_loss_diverge():
    """A converted model's range test: a flat, noisy loss (a dip included, which must not decide) until the rate
    reaches 1e-3, then a loss ten times higher."""
    steps = 40
    lrs = [defaults.range_lr(i, steps) for i in range(steps)]
    assert lrs[0] == pytest.approx(defaults.RANGE_LOW) and lrs[-1] == pytest.approx(defaults.RANGE_HIGH)
    g = torch.Generator().manual_seed(0)
    losses = [10.0 + float(torch.rand((), generator=g)) * 3 for _ in range(steps)]
    losses[5] = 4.0  # a lucky batch early on
    first_bad = next(i for i, lr in enumerate(lrs) if lr >= 1e-3)  # the update that hurts
    for i in range(first_bad + 1, steps):
        losses[i] = 100.0
    assert defaults.lr_from_losses(losses, steps) == pytest.approx(lrs[first_bad] / 10)
    assert defaults.diverged(losses[: first_bad + 2]) and not defaults.diverged(losses[: first_bad + 1])


def test_range_test_stops_at_a_sustained_rise_that_no_single_batch_shows(monkeypatch):
    """Past 1e-3 every loss is 2.5× the flat stretch's, never 4× its lowest smoothed value: the smoothed loss
    doubling stops the test within a few steps of the rise, where the single-batch rule alone ran to the end."""
    steps = 40
    lrs = [defaults.range_lr(i, steps) for i in range(steps)]
    g = torch.Generator().manual_seed(1)
    losses = [10.0 + float(torch.rand((), generator=g)) * 3 for _ in range(steps)]
    first_bad = next(i for i, lr in enumerate(lrs) if lr >= 1e-3)
    for i in range(first_bad + 1, steps):
        losses[i] = 30.0
    chosen = defaults.lr_from_losses(losses, steps)
    assert lrs[first_bad] / 10 <= chosen <= lrs[first_bad + 4] / 10
    monkeypatch.setattr(defaults, "DIVERGED_SMOOTH", math.inf)
    assert defaults.lr_from_losses(losses, steps) == pytest.approx(defaults.RANGE_HIGH / 10)


def test_range_test_does_not_stop_on_a_flat_noisy_loss(monkeypatch):
    """A flat loss does not diverge: not after a lucky first batch (the first smoothed losses average too few
    batches to set the minimum), not for a two-batch bump that lifts the smoothed loss past 2× for one step only,
    and rarely by noise (30% per batch over 64 steps: about 3 tests in 100)."""
    lucky_start = [2.0] + [5.0] * 63
    bump = [5.0] * 20 + [16.0, 16.0] + [5.0] * 20
    assert not defaults.diverged(lucky_start) and not defaults.diverged(bump)
    g = torch.Generator().manual_seed(0)
    noisy = [(5 * torch.exp(0.3 * torch.randn(64, generator=g))).tolist() for _ in range(100)]
    assert sum(defaults.diverged(losses) for losses in noisy) <= 8
    monkeypatch.setattr(defaults, "_SMOOTH_FROM", 0)  # the minimum from the first batch on
    assert defaults.diverged(lucky_start)


def test_range_test_bounds_and_non_finite_losses():
    assert defaults.lr_from_losses([float("nan")], 20) is None
    assert defaults.lr_from_losses([1.0] * 5 + [float("inf")], 20) == defaults.LR_BOUNDS[0]  # 1e-7, clipped
    falling = [1.0 / (i + 1) for i in range(64)]  # never diverges: a tenth of the last rate
    assert defaults.lr_from_losses(falling, 64) == pytest.approx(defaults.RANGE_HIGH / 10)
    assert defaults.lr_from_losses(falling, 64) <= defaults.LR_BOUNDS[1]
    assert defaults.range_steps(10) == 16 and defaults.range_steps(300) == 30 and defaults.range_steps(10_000) == 64


def test_held_out_range_test_picks_a_tenth_of_the_first_rate_that_hurts():
    """The held-out loss after each update of a range test: it falls (training helps), then stays above 1.05× its
    start from the update at 1e-4 on: a tenth of that rate. One value above it alone is noise, not a trend."""
    steps, start = 30, 2.0
    lrs = [defaults.range_lr(i, steps) for i in range(steps)]
    first_bad = next(i for i, lr in enumerate(lrs) if lr >= 1e-4)
    held = [start * (0.8 if i < first_bad else 1.2 + i) for i in range(steps)]
    held[3] = 1.1 * start  # one noisy value above the bar
    assert defaults.hurts(held, start) == first_bad
    assert defaults.lr_from_held_out(held, start, steps) == pytest.approx(lrs[first_bad] / 10)
    assert defaults.hurts(held[: first_bad + 1], start) is None  # the rise must last two updates


def test_held_out_range_test_bounds_and_non_finite_losses():
    steps = 30
    helps = [1.0 - 0.01 * i for i in range(steps)]  # never hurts: a tenth of the last rate
    assert defaults.lr_from_held_out(helps, 1.0, steps) == pytest.approx(defaults.RANGE_HIGH / 10)
    assert defaults.hurts([0.9, float("nan")], 1.0) == 1
    assert defaults.lr_from_held_out([1e-9, 1e-9], 0.0, steps) == defaults.LR_BOUNDS[0]  # at the teacher: clipped


def test_held_out_range_test_gives_a_student_with_much_to_win_the_far_rate_capped_below_harm():
    """With the held-out agreement with the teacher: where the best agreement before training hurt beats the start
    by at least 0.03, the rate is 1e-3, at most 5 times the rate of the first update that hurt; harm is the loss
    rising or the agreement falling 0.02 below its start, two updates in a row, whichever comes first."""
    steps, start, agree0 = 30, 2.0, 0.80
    lrs = [defaults.range_lr(i, steps) for i in range(steps)]
    assert defaults.FAR_LR == 1e-3 and defaults.ABOVE_HARM == 5.0
    late = next(i for i, lr in enumerate(lrs) if lr >= 1e-3)  # harm at a rate at or above 1e-3: 1e-3 itself
    loss = [start * (0.9 if i < late else 2.0) for i in range(steps)]
    agreement = [agree0 + 0.004 * min(i, 12) for i in range(steps)]  # rises to update 12 (+0.048), then flat
    assert defaults.harmed(loss, start, agreement, agree0) == late
    assert defaults.lr_from_held_out(loss, start, steps, agreement, agree0) == pytest.approx(1e-3)
    rising = [agree0 + 0.004 * i for i in range(10)]  # +0.036, then falls from update 10, before the loss hurts:
    falling = rising + [agree0 - 0.05] * (steps - 10)  # capped at 5 times the rate of update 10
    assert defaults.falls(falling, agree0) == 10 and defaults.harmed(loss, start, falling, agree0) == 10
    assert lrs[10] * 5 < 1e-3
    assert defaults.lr_from_held_out(loss, start, steps, falling, agree0) == pytest.approx(5 * lrs[10])
    never = [start * 0.9] * steps  # no harm over the whole sweep: 1e-3
    assert defaults.lr_from_held_out(never, start, steps, agreement, agree0) == pytest.approx(1e-3)
    gain_after_harm = [agree0] * 15 + [agree0 + 0.1] * (steps - 15)  # a gain only after the loss hurt counts not
    assert defaults.lr_from_held_out(loss[:15] + [2 * start] * (steps - 15), start, steps, gain_after_harm,
                                     agree0) == defaults.LR_BOUNDS[0]
    one_dip = list(agreement)
    one_dip[5] = agree0 - 0.05  # one value below the bar alone is noise
    assert defaults.falls(one_dip, agree0) is None


@pytest.mark.parametrize("gain", [0.0, 0.02, 0.029], ids=lambda g: f"gain-{g}")
def test_held_out_range_test_takes_the_lowest_rate_without_a_clear_gain(gain):
    """A student whose best held-out agreement beats its start by less than 0.03 (on the OCR benchmark: the one
    1.4 points from its teacher, +0.008 to +0.020) gets the lowest rate, wherever that best came."""
    steps, start, agree0 = 30, 2.0, 0.90
    loss = [start * 0.9] * steps
    agreement = [agree0 + gain * min(i, 10) / 10 for i in range(steps)]
    assert not defaults.much_to_win(agreement, agree0)
    assert defaults.lr_from_held_out(loss, start, steps, agreement, agree0) == defaults.LR_BOUNDS[0]


def test_range_test_agreement_compares_whole_decodings():
    """The range test's agreement counts a sample where the student's pseudo labels (a CTC decoding) equal the
    teacher's, made of both at once so that decodings of different lengths are padded alike; without pseudo labels,
    where its largest class is the teacher's at every position."""
    from separify.tuning.ctc import ctc_greedy_targets
    from separify.tuning.finetune import _Objective, _same_decisions

    def logits(*paths):  # (B, T, 4): one-hot paths of classes, 0 the blank
        return torch.nn.functional.one_hot(torch.tensor(paths), 4).float()

    teacher = logits([1, 1, 0, 2], [3, 0, 0, 0], [1, 2, 3, 1])
    student = logits([1, 0, 2, 2], [3, 3, 0, 0], [1, 2, 3, 0])  # the same words, but the third; other alignments
    objective = _Objective(1.0, 0.5, None, None, True, 0.0, pseudo_labels=ctc_greedy_targets)
    assert _same_decisions(student, teacher, objective).tolist() == [True, True, False]
    per_step = _Objective(1.0, 0.5, None, None, True, 0.0)
    assert _same_decisions(student, teacher, per_step).tolist() == [False, False, False]
    assert _same_decisions(teacher, teacher, per_step).tolist() == [True, True, True]


def _recording_inputs(model: torch.nn.Module, seen: list[int]) -> None:
    """Record the storage of every input ``model`` (and any deep copy of it) trains on."""
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].data_ptr()) if torch.is_grad_enabled()
                                    else None)


@pytest.mark.usefixtures("few_held_samples")
@pytest.mark.parametrize("held_out", [True, False], ids=["batches-held-out", "none-held-out"])
def test_the_range_test_scores_the_held_out_batches(monkeypatch, held_out):
    """With batches held out (the default check on data of five times its first batches or more), the range test
    scores the loss on them after each of its steps, and neither it nor the run trains on them; without, it reads
    the training losses. A student that is its teacher can only get worse: the lowest rate."""
    import copy

    teacher, data = _teacher(dropout=0.0), _data(n_batches=24, labels=False)
    calls: list[str] = []
    for name in ("lr_from_held_out", "lr_from_losses"):
        monkeypatch.setattr(defaults, name, lambda *a, _f=getattr(defaults, name), _n=name: calls.append(_n) or _f(*a))
    student, trained = copy.deepcopy(teacher), []
    _recording_inputs(student, trained)
    res = finetune(student, teacher, data, epochs=1, seed=0, temperature=1.0, hard=0.0, keep_best=held_out)
    assert ("lr_from_held_out" in calls) == held_out and res.held_out == (4 if held_out else 0)
    held = {x.data_ptr() for x in data[: res.held_out]}
    assert trained and not held & set(trained)
    if held_out:
        assert res.lr == defaults.LR_BOUNDS[0]


def test_schedule_warms_up_then_decays_to_zero():
    f = defaults.schedule(100, warmup=0.1)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.04)))
    assert max(f(s) for s in range(100)) == pytest.approx(f(9)) and f(100) == pytest.approx(0.0)
    no_warmup = defaults.schedule(100, warmup=0.0)
    assert no_warmup(0) == pytest.approx(1.0)


def test_finetune_at_defaults_chooses_and_reports_its_settings(tmp_path):
    teacher, data = _teacher(), _data()
    student = _student(teacher)
    start = _params(student).clone()
    res = finetune(student, teacher, data, steps=12, seed=0, checkpoint=tmp_path / "c.ckpt", keep_best=False)
    assert res.chosen == ("lr", "temperature", "hard") and res.hard in (0.0, defaults.HARD)
    assert defaults.LR_BOUNDS[0] <= res.lr <= defaults.LR_BOUNDS[1] and res.temperature in defaults.TEMPERATURES
    assert not torch.equal(_params(student), start)
    # resuming keeps the settings the run started with (no new range test), even if the data changed
    state = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert (state["lr"], state["temperature"], state["hard"]) == (res.lr, res.temperature, res.hard)
    again = finetune(_student(teacher), teacher, _data(seed=9), steps=16, seed=0, checkpoint=tmp_path / "c.ckpt",
                     keep_best=False)
    assert again.resumed_from == 12
    assert (again.lr, again.temperature, again.hard) == (res.lr, res.temperature, res.hard)


@pytest.mark.parametrize("scale, expected", [(20.0, defaults.HARD), (0.5, 0.0)], ids=["confident", "unsure"])
def test_hard_targets_only_from_a_confident_teacher(scale, expected):
    """The teacher's decisions become targets only where its top class holds 90% of the probability on average."""
    logits = torch.randn(64, 7, 10, generator=torch.Generator().manual_seed(0)) * scale  # (B, T, classes)
    assert defaults.choose_hard([logits[:32], logits[32:]], class_dim=-1) == expected


def test_the_range_test_leaves_the_student_as_it_was():
    teacher, data = _teacher(), _data()
    b = _student(teacher)
    res = finetune(b, teacher, data, steps=6, seed=0, lr=None, temperature=4.0, hard=0.5)
    assert res.chosen == ("lr",)
    again = _student(teacher)
    finetune(again, teacher, data, steps=6, seed=0, lr=res.lr, temperature=4.0, hard=0.5)
    torch.testing.assert_close(_params(again), _params(b), rtol=0, atol=0)  # the same run as with that lr given


def test_bad_warmup_is_refused():
    from separify.errors import SeparifyError

    teacher = _teacher()
    for bad in (-0.1, 1.5, True):
        with pytest.raises(SeparifyError, match="warmup"):
            finetune(_student(teacher), teacher, _data(), steps=2, warmup=bad)
