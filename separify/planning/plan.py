"""Rank selection for every candidate layer, written once for every backend.

A :class:`Candidate` is a conv that passed the checks: its record, the rule that matched it, the (BatchNorm-folded)
kernel as an ``nn.Conv2d`` and the input shape(s) it runs at. :func:`choose_ranks` sets each candidate's
``plan.rank`` (or skips it with a :class:`~separify.records.Reason`): a fixed rank or energy per layer, or a global
allocation of FLOPs or measured time (:func:`separify.planning.ranks.allocate_options`) minimising
``Σ w · relative error²``, where the error is the kernel's or, with calibration data, the predicted output error on
it, and ``w`` the candidate's loss-aware weight (its output error's effect on the model's output; 1 without it).
:func:`meet_latency` then checks a latency plan on the whole model and re-plans with a corrected budget.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from separify.calibration import als_runs, scarce
from separify.config import ConvertConfig, LayerRule
from separify.core import measure
from separify.core.modules import FORMS
from separify.planning import forms, latency, ranks
from separify.records import LayerRecord, NoteCode, Plan, Reason

__all__ = ["Candidate", "choose_ranks", "meet_latency", "keep_faster", "from_conv_options"]

#: a whole-model check: (original ms, planned ms) of the planned model with untrained factors at these replacements
TrialTimes = Callable[[dict[str, nn.Module]], tuple[float, float]]


@dataclass
class Candidate:
    """A conv that passed the checks: what planning and decomposition need of it."""

    record: LayerRecord
    rule: LayerRule | None
    method: str  # the form asked for (a rule's or the config's; "auto": chosen by the allocation)
    kernel: nn.Conv2d  # the conv to decompose (BatchNorm folded in), unpadded for ONNX
    shapes: list[tuple[int, ...]]  # input shape(s) of its calls on the example input (padded for ONNX)
    curves: dict[str, Any] = field(default_factory=dict)  # method="auto": predicted error curve per form
    weight: float | None = None  # loss-aware allocation: how much its output error moves the model's output

    @property
    def auto(self) -> bool:
        return self.method == "auto"

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def plan(self) -> Plan:
        return self.record.plan


def _layer_cost(c: Candidate, whitened: dict[str, torch.Tensor], method: str | None = None) -> ranks.LayerCost:
    """FLOPs and error curve of one form (``method``, default the plan's) of a candidate."""
    method = method or c.plan.method
    cls = FORMS[method]
    weight = whitened.get(c.name, c.kernel.weight)
    curve = c.curves.get(method) or (lambda r, _m=method, _w=weight: ranks.error_curve(_m, _w, r))
    return ranks.LayerCost(
        c.name, c.record.flops_before,
        measure.affine_flops(lambda rank: cls.like(c.kernel, rank, device="meta"), c.shapes), cls.max_rank(c.kernel),
        curve,
    )


def _form_costs(cfg: ConvertConfig, c: Candidate, whitened, patches) -> dict[str, ranks.LayerCost]:
    """Per form, its costs; for ``method="auto"`` both forms, with the predicted error curves of
    :mod:`~separify.planning.forms` (measured once per candidate); else the plan's form."""
    if not c.auto:
        cost = _layer_cost(c, whitened)
        c.plan.exact_rank = cost.max_rank
        return {c.plan.method: cost}
    out = {}
    for method in forms.AUTO_FORMS:
        cost = _layer_cost(c, {}, method)
        if method not in c.curves:
            stats = patches.get(c.name)
            c.curves[method] = forms.form_curve(
                c.kernel, method, cost.saving_ranks() if len(cost.saving_ranks()) else np.array([1]), stats,
                options=lambda m, r: _decompose_options(cfg, m, r, refitted=stats is not None),
                iters=cfg.calibration.als, ridge=cfg.calibration.ridge)
        out[method] = _layer_cost(c, {}, method)
    return out


def _decompose_options(cfg: ConvertConfig, method: str, rank: int, *, refitted: bool) -> dict[str, Any]:
    if method != "pw-dw-pw":
        return {}
    return dict(max_iter=cfg.cp_sweeps(refitted), tol=cfg.cp.tol, seed=cfg.seed)


def _fixed_rank(cfg: ConvertConfig, c: Candidate) -> tuple[int | None, str]:
    """The rank a rule or the config fixes for this layer (``None``: allocated), and what fixed it."""
    rule, method = c.rule, c.plan.method
    if rule is not None and rule.rank is not None:
        return rule.rank, f"rule {rule.pattern!r}"
    if rule is not None and rule.energy is not None:
        return ranks.rank_for_energy(method, c.kernel.weight, rule.energy), f"rule {rule.pattern!r}"
    if cfg.ranks.rank is not None:
        return cfg.ranks.rank, cfg.selection
    if cfg.ranks.energy is not None:
        return ranks.rank_for_energy(method, c.kernel.weight, cfg.ranks.energy), cfg.selection
    return None, cfg.selection


def _width_ok(cfg: ConvertConfig, c: Candidate, cost: ranks.LayerCost):
    """Which padded widths a layer may run at: none beyond its rank under a FLOPs target (the target counts the
    rank's FLOPs), and, with ``require_saving``, none that costs the dense conv's FLOPs or more."""
    if cfg.selection == "flops":
        return lambda width: False
    if cfg.ranks.require_saving:
        return lambda width: cost.flops(width) < c.record.flops_before
    return None


def _set_fixed(cfg: ConvertConfig, c: Candidate, rank: int, cost: ranks.LayerCost, planner) -> None:
    """A fixed rank: clamped to the exact rank, refused where it saves no FLOPs or (latency) no time."""
    rec, plan = c.record, c.plan
    if rank > plan.exact_rank:
        rec.add_note(NoteCode.RANK_CLAMPED, f"rank {rank} clamped to the exact rank {plan.exact_rank}")
        rank = plan.exact_rank
    flops = cost.flops(rank)
    if flops >= rec.flops_before and cfg.ranks.require_saving:
        rec.skip_with(Reason.NO_SAVING, f"no FLOPs saved at rank {rank} ({flops:,} ≥ {rec.flops_before:,} dense)")
    elif planner is None:
        plan.rank = rank
    else:
        allowed = planner.options(rec, c.kernel, c.shapes, [rank], _width_ok(cfg, c, cost))
        if rank in allowed:
            plan.rank = rank
            plan.layout, plan.time_after_ms = allowed[rank]


def _timed(planner, c: Candidate, method: str, grid, width_ok, refusals: list[str]) -> dict[int, tuple[str, float]]:
    """``{rank: (layout, ms)}`` measured faster for one form; for ``method="auto"`` a form with none faster does
    not skip the layer (the other form may be faster): what was measured goes to ``refusals``."""
    if not c.auto:
        return planner.options(c.record, c.kernel, c.shapes, grid, width_ok)
    return planner.options(c.record, c.kernel, c.shapes, grid, width_ok, method=method, refused=refusals.append)


def _options(cfg: ConvertConfig, c: Candidate, fcosts: dict[str, ranks.LayerCost], planner):
    """The allocation's options for one layer, ``(choices, costs, err²)`` with choices ``(method, rank)`` and
    ``None`` = dense, and the measured ``{(method, rank): (layout, ms)}`` under the latency objective; ``None`` where
    the layer has no option (then skipped with the reason)."""
    choices, costs, err2, timed, refusals = [], [], [], {}, []
    for method, cost in fcosts.items():
        saving = cost.saving_ranks()
        if planner is None:
            rs = [int(r) for r in saving]
        else:
            grid = latency.rank_grid(method, saving)
            allowed = _timed(planner, c, method, grid, _width_ok(cfg, c, cost), refusals) if grid else {}
            if c.record.plan is None:  # skipped by the planner (one form)
                return None, {}
            rs = sorted(allowed)
            timed.update({(method, r): allowed[r] for r in rs})
        choices += [(method, r) for r in rs]
        costs += [timed[(method, r)][1] for r in rs] if planner is not None and cfg.selection == "latency" \
            else [cost.flops(r) for r in rs]
        err2.append((c.weight or 1.0) * cost.errors(np.array(rs)) ** 2 if rs else np.zeros(0))
    if not choices:
        if planner is None or not any(len(cost.saving_ranks()) for cost in fcosts.values()):
            c.record.skip_with(Reason.NO_SAVING, "no FLOPs saved at any rank")
        else:
            c.record.skip_with(Reason.NOT_FASTER, "neither form: " + refusals[-1])
        return None, {}
    dense = c.plan.time_before_ms if planner is not None and cfg.selection == "latency" else c.record.flops_before
    return (choices + [None], costs + [dense], np.concatenate(err2 + [np.zeros(1)])), timed


def choose_ranks(cfg: ConvertConfig, cands: Sequence[Candidate], flops_before: int,
                 whitened: dict[str, torch.Tensor], planner: "latency.LatencyPlanner | None" = None,
                 patches: dict | None = None) -> tuple[int | None, list[str]]:
    """Set ``plan.rank`` of every candidate, or skip it with its reason; returns the FLOPs budget and warnings.

    ``flops_before`` is the whole model's FLOPs; ``whitened`` maps layer names to kernels whitened by their
    calibration inputs, whose error curves (predicted relative output error) then replace the weight error. With a
    ``planner`` (``objective="latency"``) every candidate is timed on the target: a fixed rank not measured faster
    than the dense conv (by the margin) is dropped, and the allocation (FLOPs or time budget) only chooses among
    the ranks of :func:`~separify.planning.latency.rank_grid` measured faster; layouts and times are set. A
    candidate with ``method="auto"`` offers both forms to the allocation, with the error curves of
    :mod:`~separify.planning.forms` (on ``patches``, its patch statistics, where calibration gathered them); the
    form chosen is set in its plan.
    """
    costs = {c.name: _form_costs(cfg, c, whitened, patches or {}) for c in cands}
    planned_here = []
    for c in cands:
        rank, source = _fixed_rank(cfg, c)
        c.plan.rank_source = source
        if rank is not None:
            _set_fixed(cfg, c, rank, costs[c.name][c.plan.method], planner)
            continue
        weighted = f", × {c.weight:.3g} its effect on the model's output" if c.weight is not None else ""
        if c.auto:
            c.plan.rank_source = f"{cfg.selection}, form chosen by method='auto' (predicted output error " + \
                ("after calibration" if c.name in (patches or {}) else "of the weights") + f"{weighted})"
        elif c.name in whitened:
            c.plan.rank_source = f"{cfg.selection} (output error on calibration data{weighted})"
        planned_here.append(c)
    options, timed, in_alloc = {}, {}, []
    for c in planned_here:
        opts, allowed = _options(cfg, c, costs[c.name], planner)
        if opts is not None:
            in_alloc.append(c)
            options[c.name], timed[c.name] = opts, allowed
    if not in_alloc:
        return None, []
    fixed = [c for c in cands if c.record.plan is not None and c.plan.rank is not None]
    alloc, budget, msgs = _allocate(cfg, in_alloc, fixed, costs, options, flops_before, planner)
    for c in in_alloc:
        choice = alloc.ranks.get(c.name)
        if choice is not None:
            method, rank = choice
            c.plan.method, c.plan.rank = method, rank
            c.plan.exact_rank = costs[c.name][method].max_rank
            if timed[c.name]:
                c.plan.layout, c.plan.time_after_ms = timed[c.name][choice]
        else:
            by = "the latency allocation" if cfg.selection == "latency" else "the global FLOPs allocation"
            c.record.skip_with(Reason.ALLOCATION, f"kept dense by {by}")
    return budget, msgs


def _allocate(cfg, in_alloc, fixed, costs, options, flops_before, planner):
    """The global allocation over ``in_alloc`` (FLOPs or measured ms), around the ``fixed``-rank layers."""
    msgs: list[str] = []
    if cfg.selection == "latency":
        # time outside the allocation: the model's other ops, dense layers, and the fixed-rank layers' dense time
        layers_ms = sum(c.plan.time_before_ms for c in in_alloc) + sum(c.plan.time_before_ms for c in fixed)
        if layers_ms > 1.05 * planner.original_ms:  # isolated layers timed slower than inside the model
            msgs.append(f"the measured layer times add up to more than the whole model's time "
                        f"({planner.original_ms:.3g} ms); the latency budget is applied to the layer times alone")
        total = max(planner.original_ms, layers_ms)  # in the layer times' unit
        rest = total - layers_ms
        fixed_after = sum(c.plan.time_after_ms for c in fixed)
        budget = cfg.ranks.latency * total * planner.budget_scale
    else:
        total = flops_before
        fixed_after = sum(costs[c.name][c.plan.method].flops(c.plan.rank) for c in fixed)
        # FLOPs outside the allocation: non-conv ops, skipped convs, and the fixed-rank layers' dense cost
        rest = flops_before - sum(c.record.flops_before for c in in_alloc) - sum(c.record.flops_before for c in fixed)
        budget = int(cfg.ranks.flops * flops_before)
    alloc = ranks.allocate_options(options, budget - rest - fixed_after)
    if not alloc.feasible:
        lowest = (rest + fixed_after + alloc.flops) / total
        if cfg.selection == "latency":
            msgs.append(f"the latency target {cfg.ranks.latency:g} cannot be reached: with every layer at its "
                        f"fastest measured replacement the layer times add up to {lowest:.3f} of the original's")
        else:
            msgs.append(f"the FLOPs target {cfg.ranks.flops:g} cannot be reached: with every convertible layer at "
                        f"{'its cheapest allowed rank' if planner else 'rank 1'} the model keeps {lowest:.3f} of its "
                        "FLOPs")
    return alloc, (int(budget) if cfg.selection == "flops" else None), msgs


def _snapshot(cands: Sequence[Candidate]) -> dict[str, tuple]:
    return {c.name: (copy.copy(c.record.plan), c.record.skip, c.record._time_before_ms) for c in cands}


def _restore(cands: Sequence[Candidate], saved: dict[str, tuple]) -> None:
    for c in cands:
        plan, skip, dense_ms = saved[c.name]
        c.record.plan, c.record.skip, c.record._time_before_ms = copy.copy(plan), skip, dense_ms


def meet_latency(cfg: ConvertConfig, cands: Sequence[Candidate], flops_before: int, whitened, planner,
                 first: tuple, trial_times: TrialTimes, *, attempts: int = 3, tolerance: float = 0.02,
                 patches: dict | None = None):
    """Check a latency plan on the whole model and re-plan until the measured time meets the budget.

    The layer times are measured one layer at a time; inside the model the separable layers may gain less (a plan
    predicted at 0.41 of a network's time can measure 0.60). So the planned model is built with untrained factors
    at the chosen ranks and layouts (speed does not depend on the weights) and ``trial_times(replacements)`` times
    it against the original; the layer-time budget is scaled by target / measured before planning again (the layer
    times are cached). The plan that met the budget, or else the fastest, is kept. ``first`` is
    :func:`choose_ranks`' first answer.
    """
    target = cfg.ranks.latency
    plans, result = [], first
    for _ in range(attempts):
        replacements = trial_modules(cands)
        if not replacements:
            break
        before, after = trial_times(replacements)
        ratio = after / before
        plans.append((ratio, _snapshot(cands), result))
        if ratio <= target * (1 + tolerance) or len(plans) == attempts:
            break
        planner.budget_scale *= target / ratio
        for c in cands:  # planned afresh (the layer times come from the cache)
            c.record.plan, c.record.skip, c.record._time_before_ms = Plan(c.method), None, None
        result = choose_ranks(cfg, cands, flops_before, whitened, planner, patches)
    if not plans:
        return result
    met = [p for p in plans if p[0] <= target * (1 + tolerance)]
    ratio, saved, result = met[0] if met else min(plans, key=lambda p: p[0])
    _restore(cands, saved)
    budget, msgs = result[0], list(result[1])
    if not met:
        msgs.append(f"the latency target {target:g} was not met on {planner.where}: the fastest plan measured "
                    f"{ratio:.3f} of the original's time after {len(plans)} attempts")
    return budget, msgs


def planned(cands: Sequence[Candidate]) -> list[Candidate]:
    """The candidates that have a rank (to be replaced)."""
    return [c for c in cands if c.record.plan is not None and c.plan.rank is not None]


def trial_modules(cands: Sequence[Candidate]) -> dict[str, nn.Module]:
    """The planned replacements with untrained factors, in their chosen layouts (speed does not depend on the
    weights)."""
    return {c.name: FORMS[c.plan.method].like(c.kernel, c.plan.rank).set_layout(c.plan.layout)
            for c in planned(cands)}


def keep_faster(cands: Sequence[Candidate], trial_times: TrialTimes, where: str, *, attempts: int = 3) -> list[str]:
    """Never slower: time the planned whole model against the original and, while it is not faster, drop the
    half of the replacements with the smallest measured saving (``time_before_ms - time_after_ms``) and time
    again; after ``attempts`` drops, or with one replacement left that does not pay, keep every layer dense.

    A layer's measured saving alone does not guarantee the model's: inside the network a separable block may
    gain less, or cost more in memory traffic than it saves. Dropped layers are skipped with
    :attr:`~separify.records.Reason.NOT_FASTER` and the whole-model figures. Returns the warnings.
    """
    ratio = None
    for attempt in range(attempts + 1):
        todo = planned(cands)
        if not todo:
            break
        before, after = trial_times(trial_modules(todo))
        if after < before:
            return []
        ratio = after / before
        todo.sort(key=lambda c: (c.plan.time_before_ms or 0.0) - (c.plan.time_after_ms or 0.0))
        drop = todo if attempt == attempts or len(todo) == 1 else todo[: (len(todo) + 1) // 2]
        for c in drop:
            c.record.skip_with(Reason.NOT_FASTER, f"the whole model with this layer's replacement (and "
                               f"{len(todo) - 1} other(s)) measured {ratio:.3f}× the original's time on {where}; "
                               "kept dense, as the layers that saved least")
    if ratio is None:
        return []
    return [f"no plan was faster than the original on {where} as a whole model (the fastest measured "
            f"{ratio:.3f}× its time): the original is kept. Try --objective flops for other hardware, a larger "
            "input or batch (--batch-size), or another --target"]


def from_conv_options(cfg: ConvertConfig, c: Candidate, calibrated: bool, covs: dict,
                      pixels: int | None = None) -> dict[str, Any]:
    """Keyword arguments of ``from_conv`` for one layer: for pw-dw-pw the CP solver's controls, with the fewer
    sweeps where calibration's alternating least squares will refit the layer (its depthwise conv reads
    ``R·kh·kw`` values per pixel, and the layer's ``pixels`` calibration pixels are not scarce for the ``R``
    inputs of its last 1×1 conv); with ``calibration.whiten``, the layer's input moments."""
    extra: dict[str, Any] = {}
    rank = c.plan.rank
    if c.plan.method == "pw-dw-pw":
        refitted = (calibrated and als_runs(rank * math.prod(c.kernel.kernel_size))
                    and not (pixels is not None and scarce(pixels, rank)))
        extra.update(max_iter=cfg.cp_sweeps(refitted), tol=cfg.cp.tol, seed=cfg.seed)
    if cfg.calibration.whiten and c.name in covs:
        extra.update(cov=covs[c.name], damp=cfg.calibration.damp)
    return extra
