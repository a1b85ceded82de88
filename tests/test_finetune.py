"""Distillation fine-tuning: the loss goes down, resume reproduces the uninterrupted run, DDP on 2 CPU processes
matches 1 process, and bad situations give a clear result or error."""

from __future__ import annotations

import copy
import inspect
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import separify
from separify.errors import SeparifyError
from separify.tuning.finetune import distillation_loss, finetune


def _teacher(dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(16, 5),
    ).eval()
    with torch.no_grad():
        model[8].weight.mul_(30)  # confident logits, as a trained network has
    return model


def _student(teacher: nn.Module) -> nn.Module:
    x = torch.randn(1, 3, 8, 8)
    # the FLOPs objective explicitly: DDP workers are fresh processes, outside the tests' default (conftest)
    return separify.convert(teacher, example_inputs=x, method="dw-pw", rank=1, objective="flops").model


def _data(n_batches: int = 6, batch: int = 8, labels: bool = True, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, 3, 8, 8, generator=g)
        out.append((x, torch.randint(0, 5, (batch,), generator=g)) if labels else x)
    return out


def _params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _mean_kd(model: nn.Module, teacher: nn.Module, data) -> float:
    """The distillation loss of ``model`` against ``teacher``, averaged over the (input, label) batches of ``data``."""
    with torch.no_grad():
        return sum(float(distillation_loss(model.eval()(x), teacher(x))) for x, _ in data) / len(data)


def test_loss_decreases_and_bn_statistics_stay_frozen():
    teacher = _teacher()
    student = _student(teacher)
    bn_before = {k: v.clone() for k, v in student.state_dict().items() if "running" in k}
    data = _data()
    before = _mean_kd(student, teacher, data)
    inputs = [x for x, _ in data]  # distillation only: random labels would pull half of the loss away from it
    res = finetune(student, teacher, inputs, epochs=8, lr=5e-3, seed=0)
    assert res.steps == 48 and res.stopped is None and len(res.losses) == 48
    assert _mean_kd(student, teacher, data) < 0.5 * before
    assert all(torch.equal(student.state_dict()[k], v) for k, v in bn_before.items())


def test_bfloat16_autocast_trains_and_keeps_float32_weights():
    """``amp=True`` (the default on CUDA) runs the forward passes under bfloat16 autocast; exercised here on the CPU,
    where autocast works the same way: the loss still falls and the weights stay float32."""
    teacher = _teacher()
    student = _student(teacher)
    data = _data()
    before = _mean_kd(student, teacher, data)
    res = finetune(student, teacher, [x for x, _ in data], epochs=8, lr=5e-3, seed=0, amp=True)
    assert res.stopped is None and all(torch.isfinite(torch.tensor(res.losses)))
    assert _mean_kd(student, teacher, data) < 0.5 * before
    assert all(p.dtype == torch.float32 for p in student.parameters())


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    teacher, data = _teacher(), _data()
    full = _student(teacher)
    uninterrupted = finetune(full, teacher, data, steps=20, seed=3, checkpoint=tmp_path / "full.ckpt",
                             checkpoint_every=5)

    resumed = _student(teacher)
    ckpt = tmp_path / "run.ckpt"

    def interrupt(step, _loss):
        if step == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(resumed, teacher, data, steps=20, seed=3, checkpoint=ckpt, checkpoint_every=5, callback=interrupt)
    fresh = _student(teacher)  # a new process would start from the converted model again
    res = finetune(fresh, teacher, data, steps=20, seed=3, checkpoint=ckpt, checkpoint_every=5)
    assert res.resumed_from == 10 and res.steps == 20 and len(res.losses) == 10
    torch.testing.assert_close(_params(fresh), _params(full), rtol=0, atol=0)
    # the kept state and the agreement checks carry across the interruption
    assert (res.kept_step, res.scores) == (uninterrupted.kept_step, uninterrupted.scores)


def test_keep_best_ends_with_the_state_that_scored_best():
    """A metric that only falls as training moves the weights: the run ends with the state it started from."""
    teacher = _teacher(dropout=0.0)
    student = _student(teacher)
    start = _params(student).clone()
    res = finetune(student, teacher, _data(), steps=10, lr=1e-2, seed=0,
                   evaluate=lambda m: -float((_params(m) - start).abs().sum()))
    assert res.steps == 10 and [s for s, _ in res.scores] == list(range(11))
    assert res.kept_step == 0 and res.scores[0][1] == 0.0 and all(v < 0 for _, v in res.scores[1:])
    assert res.check == "metric"
    torch.testing.assert_close(_params(student), start, rtol=0, atol=0)


def test_default_guard_keeps_the_end_unless_it_agrees_less_than_the_start():
    """Without ``evaluate``, the score is the fraction of samples whose largest class is the teacher's, on the first
    four batches (then the fraction of positions), and only the end of the run is compared with its start: a run
    at a far too large learning rate ends where it started, a good one where it ended."""
    teacher = _teacher(dropout=0.0)
    data = _data(labels=False)
    for lr, kept in ((0.5, 0), (5e-3, 12)):
        student = _student(teacher)
        start = _params(student).clone()
        res = finetune(student, teacher, data, steps=12, lr=lr, warmup=0.0, seed=0)
        assert [s for s, _ in res.scores] == [0, 12] and res.stopped is None and res.kept_step == kept, lr
        assert res.check == "agreement"
        assert (res.scores[1][1] < res.scores[0][1]) == (kept == 0), lr
        with torch.no_grad():
            hits = sum(int((student.eval()(x).argmax(1) == teacher(x).argmax(1)).sum()) for x in data[:4])
        assert hits / 32 == pytest.approx(dict(res.scores)[kept])
        assert torch.equal(_params(student), start) == (kept == 0), lr
    off = finetune(_student(teacher), teacher, data, steps=12, lr=0.5, warmup=0.0, seed=0, keep_best=False)
    assert off.kept_step is None and off.scores == []


@pytest.mark.usefixtures("few_held_samples")
def test_default_guard_scores_labelled_batches_by_the_loss_on_their_labels():
    """Where the check's batches carry labels, the score is minus the mean loss on those labels: a run that learns
    labels the teacher never gives ends agreeing far less with the teacher, and is kept, because the loss on the
    labels fell (the agreement alone would keep the start)."""
    teacher = _teacher(dropout=0.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        data = [(x, (teacher(x).argmax(1) + 1) % 5) for x in (torch.randn(8, 3, 8, 8, generator=g) for _ in range(6))]
    student = _student(teacher)
    res = finetune(student, teacher, data, steps=30, lr=1e-2, alpha=0.0, warmup=0.0, seed=0)
    assert [s for s, _ in res.scores] == [0, 30] and res.kept_step == 30
    with torch.no_grad():
        loss = sum(float(F.cross_entropy(student.eval()(x), y)) for x, y in data[:4]) / 4
        agree = sum(int((student(x).argmax(1) == teacher(x).argmax(1)).sum()) for x, _ in data[:4]) / 32
    assert res.scores[1][1] == pytest.approx(-loss) and res.scores[1][1] > res.scores[0][1]
    assert agree < 0.5 and res.check == "label loss"


def test_pseudo_labels_label_the_batches_that_carry_none():
    """``pseudo_labels(teacher_logits)`` gives label-free batches their labels: the run equals one on the same
    batches labelled so beforehand, its check scores the loss on them, and real labels take precedence."""
    teacher = _teacher(dropout=0.0)
    plain = _data(labels=False)
    with torch.no_grad():
        labelled = [(x, teacher(x).argmax(1)) for x in plain]
    runs = {}
    for name, data, kw in (("pseudo", plain, {"pseudo_labels": lambda t: t.argmax(1)}), ("given", labelled, {}),
                           ("real labels first", labelled, {"pseudo_labels": lambda t: torch.zeros_like(t[:, 0])})):
        student = _student(teacher)
        res = finetune(student, teacher, data, steps=6, lr=1e-2, alpha=0.0, warmup=0.0, seed=0, **kw)
        runs[name] = (_params(student), res)
    for name in ("given", "real labels first"):
        torch.testing.assert_close(runs["pseudo"][0], runs[name][0], rtol=0, atol=0)
        assert runs[name][1].check == "label loss" and runs[name][1].scores == runs["pseudo"][1].scores
    assert runs["pseudo"][1].check == "label loss"


def test_ctc_greedy_targets_and_loss():
    """Greedy CTC decoding merges repeats and drops blanks (a blank between two equal classes keeps both), pads
    with the blank; the CTC loss of logits against their own decoding is near zero, against another sequence large."""
    steps = [[1, 1, 0, 2, 2, 0, 2], [0, 0, 0, 0, 0, 0, 0], [3, 0, 0, 0, 0, 0, 0]]
    logits = torch.full((3, 7, 5), -6.0)
    for b, row in enumerate(steps):
        logits[b, torch.arange(7), torch.tensor(row)] = 6.0
    targets = separify.ctc_greedy_targets(logits)
    assert targets.tolist() == [[1, 2, 2], [0, 0, 0], [3, 0, 0]]
    assert float(separify.ctc_loss(logits, targets)) < 0.01
    assert float(separify.ctc_loss(logits, torch.tensor([[4, 4, 1], [1, 0, 0], [2, 0, 0]]))) > 10
    assert separify.ctc_greedy_targets(torch.zeros(2, 4, 3)).tolist() == [[0], [0]]  # all blank: one padded column
    with pytest.raises(SeparifyError, match="blank among the C classes"):
        separify.ctc_greedy_targets(logits, blank=5)
    with pytest.raises(SeparifyError, match=r"logits \(B, T, C\)"):
        separify.ctc_loss(logits[:, 0], targets)


def test_sequence_accuracy_compares_greedy_decodings_with_padded_targets():
    """A sample counts where its greedy decoding equals its target; padding of either width does not matter."""
    from separify.tuning.ctc import sequence_accuracy

    logits = torch.full((3, 5, 4), -5.0)
    for b, row in enumerate([[1, 1, 0, 2, 0], [3, 0, 0, 0, 0], [0, 0, 0, 0, 0]]):
        logits[b, torch.arange(5), torch.tensor(row)] = 5.0
    model = _Plus(torch.zeros(3, 5, 4))
    targets = torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0], [2, 0, 0, 0]])  # wider than the decodings; the last wrong
    assert sequence_accuracy(model, logits, targets, batch_size=2) == pytest.approx(2 / 3)
    assert sequence_accuracy(model, logits, torch.tensor([[1, 2], [3, 0], [0, 0]])) == 1.0
    with pytest.raises(ValueError, match="targets must be of shape"):
        sequence_accuracy(model, logits, targets[:, 0])


@pytest.mark.usefixtures("few_held_samples")
def test_default_guard_scores_batches_that_training_never_sees(tmp_path):
    """With enough data (five times the first batches or more) the default check's first batches (here four of 2
    samples) are held out of training at every epoch, also when the run resumes; with ``evaluate=``,
    ``validation=`` or less data nothing is held out."""
    teacher = _teacher(dropout=0.0)
    data = _data(20, batch=2, labels=False)
    index = {x.data_ptr(): i for i, x in enumerate(data)}  # training runs on these very tensors (same device)
    trained: list[int] = []

    def record(module, args):
        if module.training:
            trained.append(index[args[0].data_ptr()])

    student = _student(teacher)
    handle = student.register_forward_pre_hook(record)
    start = _params(student).clone()
    res = finetune(student, teacher, data, epochs=2, lr=1e-3, seed=0)
    assert not torch.equal(_params(student), start) and res.held_out == 4 and res.steps == 32
    assert sorted(set(trained)) == list(range(4, 20))
    assert trained.count(4) == 2  # each epoch trains on every batch after the held-out ones
    handle.remove()
    ckpt, resumed = tmp_path / "run.ckpt", _student(teacher)

    def interrupt(step, _loss):
        if step == 21:  # after the checkpoint of step 20, in the second epoch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(resumed, teacher, data, epochs=2, lr=1e-3, seed=0, checkpoint=ckpt, checkpoint_every=10,
                 callback=interrupt)
    again = finetune(resumed, teacher, data, epochs=2, lr=1e-3, seed=0, checkpoint=ckpt, checkpoint_every=10)
    assert again.resumed_from == 20 and again.steps == 32
    torch.testing.assert_close(_params(resumed), _params(student), rtol=0, atol=0)
    for kw in ({"evaluate": lambda m: 0.0}, {"validation": data[:2]}, {"keep_best": False}):
        assert finetune(_student(teacher), teacher, data, epochs=1, lr=1e-3, **kw).held_out == 0
    few = finetune(_student(teacher), teacher, data[:19], epochs=1, lr=1e-3)
    assert few.held_out == 0 and few.steps == 19


@pytest.mark.usefixtures("few_held_samples")
def test_held_out_batches_are_those_a_shuffling_loader_yields_first():
    """A shuffling DataLoader: the check scores the first four batches of training's first epoch (torch seeded as
    training seeds it), so no sample it scores is trained on in that epoch."""
    teacher = _teacher(dropout=0.0)
    x = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x[:, 0, 0, 0] = torch.arange(40.0) + 1000  # a marker per sample
    loader = torch.utils.data.DataLoader(x, batch_size=2, shuffle=True)
    trained: set[int] = set()
    checked: set[int] = set()  # the student runs in eval mode only for the check

    def record(module, args):
        (trained if module.training else checked).update(int(v) - 1000 for v in args[0][:, 0, 0, 0])

    student = _student(teacher)
    student.register_forward_pre_hook(record)
    torch.manual_seed(123)  # whatever the state before the call: the check reads as epoch 0 does
    res = finetune(student, teacher, loader, epochs=1, lr=1e-3, seed=5)
    torch.manual_seed(5)  # training's epoch 0: seed + 0
    scored = {int(v) - 1000 for _, batch in zip(range(4), loader) for v in batch[:, 0, 0, 0]}
    assert res.held_out == 4 and res.steps == 16 and len(scored) == 8
    assert checked == scored and trained == set(range(40)) - scored


@pytest.mark.parametrize("batch, held", [(16, 16), (32, 8), (128, 4)], ids=["batch-16", "batch-32", "batch-128"])
def test_the_check_holds_out_a_fixed_number_of_samples(batch, held):
    """The default check's first batches hold at least 256 samples and 4 batches, whatever the batch size, so that a
    smaller batch does not make its scores noisier; training skips them."""
    teacher = _teacher(dropout=0.0)
    data = [x for x in (torch.randn(batch, 3, 4, 4) for _ in range(5 * held))]
    res = finetune(_student(teacher), teacher, data, epochs=1, lr=1e-3, temperature=1.0, hard=0.0)
    assert res.held_out == held and res.steps == 4 * held
    assert finetune(_student(teacher), teacher, data[:-1], steps=1, lr=1e-3).held_out == 0  # too few to hold out


@pytest.mark.usefixtures("few_held_samples")
def test_a_checkpoint_keeps_the_held_out_count_it_was_saved_with(tmp_path):
    """Resuming adopts the checkpoint's count (0 for a checkpoint without one), so the run's length and the
    batches it skips do not change under it."""
    teacher = _teacher(dropout=0.0)
    data, ckpt = _data(20, batch=2, labels=False), tmp_path / "run.ckpt"
    finetune(_student(teacher), teacher, data, steps=4, lr=1e-3, checkpoint=ckpt, checkpoint_every=2)
    state = torch.load(ckpt, weights_only=True)
    assert state["hold"] == 4
    del state["hold"]  # as written before the count was saved
    state["step"] = 2
    torch.save(state, ckpt)
    res = finetune(_student(teacher), teacher, data, epochs=1, lr=1e-3, checkpoint=ckpt, checkpoint_every=2)
    assert res.held_out == 0 and res.resumed_from == 2 and res.steps == 20


def test_guard_validation_data_and_metric_errors():
    teacher = _teacher(dropout=0.0)
    student = _student(teacher)
    with pytest.raises(SeparifyError, match="the validation data is empty"):
        finetune(student, teacher, _data(2), steps=2, validation=[])
    with pytest.raises(SeparifyError, match="metric returned nan at step 0"):
        finetune(student, teacher, _data(2), steps=2, evaluate=lambda m: float("nan"))
    held_out = _data(3, seed=9)  # scored on these instead of the first batches of the training data
    res = finetune(student, teacher, _data(2), steps=2, validation=held_out)
    assert [s for s, _ in res.scores] == [0, 2]


def test_checkpoint_of_another_model_is_refused(tmp_path):
    teacher, data = _teacher(), _data(2)
    finetune(_student(teacher), teacher, data, steps=2, checkpoint=tmp_path / "c.ckpt", checkpoint_every=1)
    other = separify.convert(teacher, example_inputs=torch.randn(1, 3, 8, 8), method="pw-dw-pw", rank=4).model
    with pytest.raises(SeparifyError, match="another model"):
        finetune(other, teacher, data, steps=4, checkpoint=tmp_path / "c.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(SeparifyError, match="cannot read the checkpoint"):
        finetune(other, teacher, data, steps=4, checkpoint=tmp_path / "junk.ckpt")


def test_non_finite_loss_stops_and_restores_last_good_state():
    teacher = _teacher()
    student = _student(teacher)
    data = _data(4)
    data[3] = (torch.full_like(data[3][0], float("nan")), data[3][1])
    res = finetune(student, teacher, data, steps=8, checkpoint_every=2)
    assert res.steps == 3 and "restored the last good state (step 2)" in res.stopped
    assert torch.isfinite(_params(student)).all()
    assert [s for s, _ in res.scores] == [0, 2]  # the restored state is scored against the start


def test_bad_arguments_and_labels():
    teacher = _teacher()
    student = _student(teacher)
    with pytest.raises(SeparifyError, match="exactly one of steps and epochs"):
        finetune(student, teacher, _data(), steps=2, epochs=1)
    with pytest.raises(SeparifyError, match="empty"):
        finetune(student, teacher, [], epochs=1)
    for bad_t in (0.0, -1.0, float("nan")):
        with pytest.raises(SeparifyError, match="temperature must be a positive number"):
            finetune(student, teacher, _data(), steps=1, temperature=bad_t)
    bad = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 7, 2]))]
    with pytest.raises(SeparifyError, match=r"labels must be in \[0, 4\]"):
        finetune(student, teacher, bad, steps=1)
    with pytest.raises(SeparifyError, match=r"labels must be in \[0, 4\]"):  # read first by the held-out range test
        finetune(student, teacher, bad * 24, steps=1)


def test_feature_distillation_pulls_converted_layers_to_the_original():
    teacher = _teacher(dropout=0.0)
    res = separify.convert(teacher, example_inputs=torch.randn(1, 3, 8, 8), method="dw-pw", rank=1)
    pairs = res.feature_pairs()
    assert pairs == {"0": "1", "3": "3"}  # converted conv -> the module it reproduces (its folded BatchNorm "1")
    data = _data(labels=False)

    def feat_err(model):
        errs = []
        with torch.no_grad():
            for x in data:
                store = {}
                hs = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: store.__setitem__(n, o))
                      for n in pairs]
                ht = [teacher.get_submodule(t).register_forward_hook(lambda m, a, o, t=t: store.__setitem__("t" + t, o))
                      for t in pairs.values()]
                model.eval()(x)
                teacher(x)
                for h in hs + ht:
                    h.remove()
                errs.append(float(separify.feature_loss([store[n] for n in pairs], [store["t" + t] for t in pairs.values()])))
        return sum(errs) / len(errs)

    plain = copy.deepcopy(res.model)
    with_features = copy.deepcopy(res.model)
    finetune(plain, teacher, data, steps=24, lr=5e-3, seed=0)
    out = finetune(with_features, teacher, data, steps=24, lr=5e-3, seed=0, features=pairs, feature_weight=10.0)
    assert out.steps == 24 and out.stopped is None
    assert feat_err(with_features) < feat_err(plain)
    with pytest.raises(SeparifyError, match="no module named 'nope'"):
        finetune(copy.deepcopy(res.model), teacher, data, steps=1, features={"nope": "3"}, feature_weight=1.0)


def test_a_callback_that_evaluates_does_not_change_the_run():
    """Evaluating inside the callback (other batch size, eval then train mode, teacher run too) neither feeds the
    feature loss stale outputs nor unfreezes BatchNorm statistics: the run equals one without the evaluations."""
    teacher = _teacher(dropout=0.0)
    res = separify.convert(teacher, example_inputs=torch.randn(1, 3, 8, 8), method="dw-pw", rank=1)
    data = _data(labels=False)
    quiet, busy = copy.deepcopy(res.model), copy.deepcopy(res.model)

    def evaluate(step, _loss):
        with torch.no_grad():
            busy.eval()(torch.randn(3, 3, 8, 8))
            teacher(torch.randn(3, 3, 8, 8))
        busy.train()  # as an evaluation helper might leave it: BatchNorm in training mode

    kw = dict(steps=12, lr=5e-3, seed=0, features=res.feature_pairs(), feature_weight=1.0)
    finetune(quiet, teacher, data, **kw)
    out = finetune(busy, teacher, data, callback=evaluate, **kw)
    assert out.steps == 12 and out.stopped is None
    for (k, a), b in zip(quiet.state_dict().items(), busy.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=k)


def test_labels_weigh_half_of_the_loss_by_default():
    s, t, y = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    ce = torch.nn.functional.cross_entropy(s, y)
    assert float(distillation_loss(s, t, y)) == pytest.approx(0.5 * float(distillation_loss(s, t)) + 0.5 * float(ce),
                                                              rel=1e-6)
    assert inspect.signature(finetune).parameters["alpha"].default == 0.5


def test_a_label_loss_replaces_the_cross_entropy():
    """Labels of another kind (here: target logits, scored by MSE) reach the loss through ``label_loss``: the
    formula holds, the class-range check does not apply to them, and training on labels only (alpha 0) moves the
    student towards them."""
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5) * 9
    mse = torch.nn.functional.mse_loss
    got = distillation_loss(s, t, y, alpha=0.25, label_loss=mse)
    assert float(got) == pytest.approx(0.25 * float(distillation_loss(s, t)) + 0.75 * float(mse(s, y)), rel=1e-6)
    teacher = _teacher(dropout=0.0)
    student = _student(teacher)
    g = torch.Generator().manual_seed(3)
    target = torch.randn(1, 5, generator=g) * 9  # far outside any class range
    data = [(x, target.expand(len(x), 5)) for x, _ in _data()]

    def dist(model):
        with torch.no_grad():
            return sum(float(mse(model.eval()(x), y)) for x, y in data) / len(data)

    before = dist(student)
    out = finetune(student, teacher, data, steps=30, lr=5e-3, alpha=0.0, label_loss=mse, seed=0)
    assert out.stopped is None and dist(student) < 0.5 * before


def test_sequence_logits_use_class_dim():
    s, t = torch.randn(4, 7, 11), torch.randn(4, 7, 11)
    per_step = sum(float(distillation_loss(s[:, i], t[:, i])) for i in range(7))
    assert float(distillation_loss(s, t, class_dim=-1)) == pytest.approx(per_step, rel=1e-5)
    assert float(distillation_loss(s, t)) == pytest.approx(per_step, rel=1e-5)  # the default: the last axis


@pytest.mark.parametrize("shape, axis", [((4, 6), 1), ((4, 7, 6), 2), ((4, 6, 3, 5), 1)],
                         ids=["(N, C)", "(B, T, C)", "(N, C, H, W)"])
def test_the_default_class_axis_follows_the_output_rank(shape, axis):
    """``class_dim=None`` reads classes along the last axis of (N, C) and (B, T, C) outputs and axis 1 of
    (N, C, H, W) ones, in the distillation loss and the report's agreement alike; a given axis is kept."""
    from separify.config import class_axis
    from separify.core.measure import agreement

    assert class_axis(None, len(shape)) % len(shape) == axis and class_axis(0, len(shape)) == 0
    s, t = torch.randn(shape), torch.randn(shape)
    assert float(distillation_loss(s, t)) == pytest.approx(float(distillation_loss(s, t, class_dim=axis)), rel=1e-6)
    other = 1 if axis != 1 else len(shape) - 1
    if other != axis:  # a wrong axis gives another loss: the test can tell them apart
        assert float(distillation_loss(s, t, class_dim=other)) != pytest.approx(float(distillation_loss(s, t)))
    ref, cand = nn.Identity(), _Plus(torch.randn(shape) * 0.5)
    x = torch.randn(shape)
    assert agreement(ref, cand, x) == agreement(ref, cand, x, class_dim=axis)


class _Plus(nn.Module):
    def __init__(self, noise: torch.Tensor) -> None:
        super().__init__()
        self.noise = noise

    def forward(self, x):
        return x + self.noise[: len(x)]


def test_finetune_on_sequence_logits_defaults_to_the_class_axis():
    """A (B, T, C) model fine-tuned without ``class_dim`` takes the same steps as with ``class_dim=-1``, not those
    of the time axis (``class_dim=1``)."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))  # (B, T, 5) -> (B, T, 4)
    data = [torch.randn(8, 7, 5) for _ in range(3)]
    noise = 0.3 * torch.randn_like(teacher[0].weight)
    runs = []
    for kw in ({}, {"class_dim": -1}, {"class_dim": 1}):
        student = copy.deepcopy(teacher)
        with torch.no_grad():
            student[0].weight.add_(noise)
        runs.append(finetune(student, teacher, data, steps=3, lr=1e-2, seed=0, keep_best=False, **kw).losses)
    assert runs[0] == runs[1] != runs[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    teacher = _teacher(dropout=0.0)
    student = _student(teacher)
    finetune(student, teacher, _data(labels=True), steps=10, seed=5, lr=5e-3)
    if rank == 0:
        torch.save(_params(student), out)
    torch.distributed.destroy_process_group()


def test_ddp_two_cpu_processes_match_one(tmp_path):
    teacher = _teacher(dropout=0.0)  # dropout draws differ between processes by design
    single = _student(teacher)
    finetune(single, teacher, _data(labels=True), steps=10, seed=5, lr=5e-3)
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    torch.testing.assert_close(torch.load(out), _params(single), rtol=1e-4, atol=1e-5)


def test_feature_taps_keep_outputs_as_returned_despite_later_inplace_ops():
    """torchvision's blocks add the shortcut and apply ReLU in place on a BN's output; a feature term must compare
    the output the module returned, for the teacher (detached) and the student (with gradients)."""
    from separify.tuning.finetune import _Taps

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            out = self.conv(x)
            out += x
            return torch.relu_(out)

    model = Block()
    x = torch.randn(2, 3, 6, 6)
    for detach in (True, False):
        taps = _Taps(model, ["conv"], detach=detach)
        with taps.recording():
            model(x)
        (feature,) = taps.take()
        taps.remove()
        expected = model.conv(x)
        assert (expected < 0).any()
        torch.testing.assert_close(feature, expected, rtol=0, atol=0)
        assert feature.requires_grad is not detach


@pytest.mark.parametrize("class_dim, shape", [(1, (6, 5)), (-1, (6, 7, 5))], ids=["classes", "sequence"])
def test_hard_term_is_the_cross_entropy_against_the_teachers_decisions(class_dim, shape):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    soft = distillation_loss(s, t, temperature=2.0, class_dim=class_dim)
    decisions = t.argmax(class_dim)
    ce = F.cross_entropy(s.movedim(class_dim, 1), decisions, reduction="sum") / shape[0]  # per sample, like the KL
    got = distillation_loss(s, t, temperature=2.0, class_dim=class_dim, hard=0.3)
    assert float(got) == pytest.approx(0.7 * float(soft) + 0.3 * float(ce), rel=1e-6)


def test_train_converted_trains_only_the_separable_replacements():
    teacher = _teacher(dropout=0.0)
    data = _data(labels=False)
    frozen = {n for n, _ in teacher.named_parameters()} - {"0.weight", "0.bias", "3.weight", "3.bias"}
    for train, moved in (("converted", False), ("all", True), (None, True)):
        student = _student(teacher)
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        kw = {"train": train} if train else {}
        finetune(student, teacher, data, steps=6, lr=1e-2, seed=0, keep_best=False, **kw)
        after = dict(student.named_parameters())
        others = [n for n in after if not n.startswith(("0.", "3."))]  # BatchNorm's affine and the linear head
        assert others and set(others) <= frozen
        assert any(not torch.equal(after[n], before[n]) for n in others) == moved, train
        assert any(not torch.equal(after[n], before[n]) for n in after if n.startswith(("0.", "3."))), train
        assert all(p.requires_grad for p in student.parameters())  # the flags are restored
    with pytest.raises(SeparifyError, match="train must be 'converted' or 'all'"):
        finetune(_student(teacher), teacher, data, steps=1, train="head")
    for bad in (-0.1, 1.5, True):
        with pytest.raises(SeparifyError, match=r"hard must be a weight in \[0, 1\]"):
            finetune(_student(teacher), teacher, data, steps=1, hard=bad)


def test_agreement_counts_whole_sequences_first():
    """For ``(B, T, C)`` logits a sample agrees only where every step does; positions only break ties. A student
    right on one whole sequence beats one right on two thirds of the steps of both."""
    from separify.tuning.finetune import _agreement

    class Fixed(nn.Module):
        def __init__(self, decisions):
            super().__init__()
            self.logits = F.one_hot(torch.tensor(decisions), 4).float()  # (B, T, 4)

        def forward(self, x):
            return self.logits

    inputs = [torch.zeros(2, 1)]
    score = _agreement(inputs, [Fixed([[0, 1, 2], [3, 3, 3]])(x) for x in inputs], class_dim=-1)
    one_whole = score(Fixed([[0, 1, 2], [0, 0, 0]]))
    most_steps = score(Fixed([[0, 1, 0], [3, 3, 0]]))
    assert one_whole == (0.5, 0.5) and most_steps == (0.0, pytest.approx(4 / 6)) and one_whole > most_steps
