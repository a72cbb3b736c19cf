"""check_estimator: does an object follow the estimator protocol (evalab.estimators.base)? Modelled on
scikit-learn's ``check_estimator``: one call runs every check on a concrete instance and raises an
AssertionError naming the first property that fails and showing the numbers.

    from evalab.testing import check_estimator
    check_estimator(MyEstimator(num_keys=8))

In a pytest suite, ``parametrize_with_checks`` makes one test per (estimator, property):

    @parametrize_with_checks([MyEstimator(num_keys=8), MyEstimator(num_keys=2)])
    def test_my_estimator(estimator, check):
        check(estimator)

The properties (``CHECKS``), in order:
- protocol:      the members exist; ``noise_kind`` is a string, ``noise_layout`` a tuple of ints.
- draw:          ``draw`` returns a Draw of noise (R, *noise_layout) and kind ``noise_kind``.
- purity:        the call modifies none of q, k, v and the noise (the message names the one it changed); the
                 same draw gives the same output; torch's global seed changes neither the draw of a seeded
                 generator nor the output; an untagged ``Draw(noise)`` of the right layout is accepted.
- shapes:        q (*b, N, d), k (*b, M, d), v (*b, M, dv) -> (R, *b, N, dv), with N = M and with N != M (an
                 estimator that needs N == M may refuse N != M with a ValueError).
- dtypes:        float64 and float32 in give the same dtype out; float16 and bfloat16 in give their own dtype
                 out; all agree with the float64 output within the input dtype's precision.
- scale:         a non-default ``scale`` s is honoured: s on (q, k) equals the default scale d**-0.5 on
                 (c q, c k) with c = sqrt(s / d**-0.5), on the same draw (for estimators with a ``scale`` parameter).
- devices:       the output lives on the inputs' device; on CUDA (when available) it matches the CPU output.
- batching:      a call on batch dims (2, 3) equals the per-element calls on the matching noise: the whole draw
                 when the layout has no batch axes (shared noise), else the slice ``noise[:, i, j]``.
- replicates:    R = 1 keeps the replicate axis; replicate r of an output depends on replicate r of the noise
                 only (a slice of a draw gives the slice of the output); the replicates of a random estimator's
                 draw differ, and so do draws of two seeds; deterministic ones draw empty noise (and then every
                 replicate is the same).
- refusal:       a Draw of another kind or another layout raises ValueError.
- finiteness:    outputs are finite at scaled norms up to ``max_norm`` in float32 and float64.
- cost:          when defined, ``cost`` returns a Cost of finite non-negative numbers, linear in ``batch``.
- exactness:     when the estimator defines ``exact_limit(N, M)`` (the variant of itself that computes exact
                 softmax attention on N queries and M keys, or None), that variant matches float64 softmax
                 attention (same scale, same causal mask) within ``EXACT_TOLERANCE``, for N = M and N != M.
- convergence:   when the estimator names a ``budget`` (an int parameter such as num_features along which it
                 converges to softmax attention), growing it ``BUDGET_GROWTH`` = 16 times must (1) cut the relative
                 MSE against exact attention at least ``CONVERGENCE_FACTOR`` = 4 times and (2) leave the mean of the
                 ``CONVERGENCE_REPLICATES`` = 32 replicates within rel_bias2 <= rel_mse(budget) / ``BIAS_FACTOR`` = 64
                 of exact attention (one seeded draw each). An estimator whose error falls as 1/budget cuts the MSE
                 about 16 times and its squared bias at 16x the budget is about rel_mse(budget) / 512 (the variance
                 of the mean of 32 replicates, plus a self-normalisation bias of order 1/budget squared): margins
                 of 4x and 8x against false alarms (RFA, ControlVariates, RA, LARA and Scatterbrain at small
                 budgets, 20 seeds of inputs and noise: at most 0.55 of either threshold). One that converges to something else (an importance sampler
                 that forgets its weights) keeps its bias and fails (2) once that bias exceeds 1/64 of its error.
Sizes are small (N = M = ``seq_len``, d, dv), so a check takes well under a second for the built-ins.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from .estimators.base import Cost, Estimator
from .estimators.draw import Draw
from .estimators.registry import estimator_parameters
from .estimators.softmax import softmax_attention

__all__ = ["CHECKS", "check_estimator", "check_instances", "check_property", "parametrize_with_checks"]

CHECKS = ("protocol", "draw", "purity", "shapes", "dtypes", "scale", "devices", "batching", "replicates", "refusal",
          "finiteness", "cost", "exactness", "convergence")
REPLICATES = 3
BATCH = (2, 3)
#: Largest |difference| allowed relative to the output's scale, per input dtype, against the float64 output.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}
#: Largest relative |difference| of an exact limit from float64 softmax attention (float64 inputs).
EXACT_TOLERANCE = 1e-8
BUDGET_GROWTH = 16
CONVERGENCE_FACTOR = 4.0
CONVERGENCE_REPLICATES = 32
BIAS_FACTOR = 64.0


def check_instances(cls: type) -> list:
    """Small instances of an estimator class for the checks: ``cls._check_instances()`` when the class
    defines it; otherwise ``cls()`` and, for each boolean option ``shared_noise`` / ``causal`` it has, the
    instance with that option flipped (where the class accepts it)."""
    custom = getattr(cls, "_check_instances", None)
    if custom is not None:
        return list(custom())
    base = cls()
    out = [base]
    if dataclasses.is_dataclass(cls):
        for name in ("shared_noise", "causal"):
            value = getattr(base, name, None)
            if isinstance(value, bool):
                try:
                    out.append(dataclasses.replace(base, **{name: not value}))
                except (ValueError, TypeError):  # an option the class refuses (e.g. causal=True without support)
                    continue
    return out


def check_estimator(est, *, seq_len: int = 32, d: int = 8, dv: int = 4, max_norm: float = 4.0, seed: int = 0) -> None:
    """Run every check of ``CHECKS`` (the module docstring) on ``est``; raise AssertionError at the first failure.

    seq_len: N = M of the test inputs (estimators with size constraints, e.g. windows, choose it).
    max_norm: the largest scaled norm |x| = |y| at which outputs must be finite.
    """
    for prop in CHECKS:
        check_property(est, prop, seq_len=seq_len, d=d, dv=dv, max_norm=max_norm, seed=seed)


def check_property(est, prop: str, *, seq_len: int = 32, d: int = 8, dv: int = 4, max_norm: float = 4.0,
                   seed: int = 0) -> None:
    """Run the check of one property ``prop`` (one of ``CHECKS``) on ``est``; AssertionError when it fails."""
    if prop not in CHECKS:
        raise ValueError(f"prop={prop!r} is not a check; expected one of {', '.join(map(repr, CHECKS))}")
    checker = _Checker(est, seq_len=seq_len, d=d, dv=dv, max_norm=max_norm, seed=seed)
    with torch.random.fork_rng(devices=[]):  # the purity check moves the global seed; leave it as it was
        getattr(checker, prop)()


def parametrize_with_checks(estimators, **sizes):
    """A pytest decorator: one test per (estimator, property), with arguments ``estimator`` and ``check``
    (call ``check(estimator)``); ids ``ClassName[i]-property``. ``sizes``: check_estimator's keywords."""
    import pytest

    params = [
        pytest.param(est, functools.partial(check_property, prop=prop, **sizes), id=f"{type(est).__name__}[{i}]-{prop}")
        for i, est in enumerate(estimators) for prop in CHECKS
    ]
    return pytest.mark.parametrize("estimator, check", params)


def _fail(prop: str, est, message: str) -> None:
    raise AssertionError(f"check_estimator [{prop}] {est!r}: {message}")


def _inputs(batch: tuple, N: int, d: int, dv: int, norm: float, seed: int, dtype=torch.float64, M: int | None = None):
    """q (*batch, N, d), k (*batch, M, d), v (*batch, M, dv) with scaled rows of norm ``norm`` (scale d**-0.5),
    from a private generator; M = N by default."""
    M = N if M is None else M
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(*batch, n, d, generator=g, dtype=torch.float64) for n in (N, M))
    q, k = (t / t.norm(dim=-1, keepdim=True) * norm * d**0.25 for t in (q, k))
    v = torch.randn(*batch, M, dv, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (absolute below 1)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()  # outputs of learned maps carry gradients
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max())) if b.numel() else 0.0


def _variant(est, **changes):
    """``est`` with some parameters changed (a dataclass, or a class whose constructor parameters are attributes
    of its instances), or None when it cannot be rebuilt."""
    if dataclasses.is_dataclass(est):
        return dataclasses.replace(est, **changes)
    params = estimator_parameters(type(est))
    if not set(changes) <= set(params) or not all(hasattr(est, name) for name in params):
        return None
    return type(est)(**{**{name: getattr(est, name) for name in params}, **changes})


def _rel_mse(out: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over replicates of |out_r - exact|^2 / |exact|^2 (Frobenius norms), in float64."""
    out, exact = out.double().cpu(), exact.double().cpu()
    return float(((out - exact) ** 2).flatten(1).sum(1).mean() / (exact**2).sum())


class _Checker:
    def __init__(self, est, *, seq_len: int, d: int, dv: int, max_norm: float, seed: int):
        self.est, self.N, self.d, self.dv, self.max_norm, self.seed = est, seq_len, d, dv, max_norm, seed
        self.q, self.k, self.v = _inputs((), seq_len, d, dv, 0.8, seed)

    def fail(self, prop: str, message: str) -> None:
        _fail(prop, self.est, message)

    def call(self, prop: str, q, k, v, draw):
        try:
            return self.est(q, k, v, draw)
        except Exception as err:
            self.fail(prop, f"the call on q {tuple(q.shape)} {q.dtype} {q.device} raised {type(err).__name__}: {err}")

    def sample(self, prop: str, q, k, replicates: int = REPLICATES, generator=0) -> Draw:
        try:
            return self.est.draw(q, k, replicates=replicates, generator=generator)
        except Exception as err:
            self.fail(prop, f"draw(q {tuple(q.shape)}, replicates={replicates}, generator={generator!r}) raised "
                            f"{type(err).__name__}: {err}")

    def protocol(self) -> None:
        if not isinstance(self.est, Estimator):
            missing = [m for m in ("noise_kind", "noise_layout", "draw", "__call__") if not hasattr(self.est, m)]
            self.fail("protocol", f"missing members {missing}")
        if not isinstance(self.est.noise_kind, str):
            self.fail("protocol", f"noise_kind must be a str, got {self.est.noise_kind!r}")
        try:
            layout = self.est.noise_layout(self.q, self.k)
        except Exception as err:
            self.fail("protocol", f"noise_layout(q {tuple(self.q.shape)}, k {tuple(self.k.shape)}) raised "
                                  f"{type(err).__name__}: {err}")
        if not isinstance(layout, tuple) or not all(isinstance(n, int) and n >= 0 for n in layout):
            self.fail("protocol", f"noise_layout(q, k) must be a tuple of non-negative ints, got {layout!r}")

    def draw(self) -> None:
        draw = self.sample("draw", self.q, self.k)
        layout = self.est.noise_layout(self.q, self.k)
        if not isinstance(draw, Draw):
            self.fail("draw", f"draw() must return an evalab.Draw, got {type(draw).__name__}")
        if tuple(draw.noise.shape) != (REPLICATES, *layout):
            self.fail("draw", f"noise has shape {tuple(draw.noise.shape)}, expected (R, *noise_layout) = "
                              f"{(REPLICATES, *layout)}")
        if draw.kind != self.est.noise_kind:
            self.fail("draw", f"the draw's kind is {draw.kind!r}, expected noise_kind {self.est.noise_kind!r}")

    def shapes(self) -> None:
        draw = self.sample("shapes", self.q, self.k)
        reference = self.call("shapes", self.q, self.k, self.v, draw)
        expected = (REPLICATES, self.N, self.dv)
        if not isinstance(reference, torch.Tensor) or tuple(reference.shape) != expected:
            shape = tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__
            self.fail("shapes", f"q {tuple(self.q.shape)}, v {tuple(self.v.shape)}, R = {REPLICATES} gave {shape}, "
                                f"expected (R, N, dv) = {expected}")
        if getattr(self.est, "causal", False):  # a causal mask needs N == M
            return
        N = self.N // 2 + 1
        q, k, v = _inputs((), N, self.d, self.dv, 0.8, self.seed + 3, M=self.N)
        try:
            draw = self.est.draw(q, k, replicates=REPLICATES, generator=0)
            out = self.est(q, k, v, draw)
        except ValueError:  # an estimator that needs N == M refuses the others
            return
        except Exception as err:
            self.fail("shapes", f"the call on N = {N} queries and M = {self.N} keys raised {type(err).__name__}: {err}")
        expected = (REPLICATES, N, self.dv)
        if tuple(out.shape) != expected:
            self.fail("shapes", f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, R = {REPLICATES} gave "
                                f"{tuple(out.shape)}, expected (R, N, dv) = {expected}")

    def dtypes(self) -> None:
        draw = self.sample("dtypes", self.q, self.k)
        reference = self.call("dtypes", self.q, self.k, self.v, draw)
        for dtype, tol in TOLERANCE.items():
            out = self.call("dtypes", self.q.to(dtype), self.k.to(dtype), self.v.to(dtype), draw)
            if out.dtype != dtype:
                self.fail("dtypes", f"{dtype} inputs gave a {out.dtype} output, expected {dtype}")
            gap = _gap(out, reference)
            if not gap <= tol:
                self.fail("dtypes", f"the {dtype} output differs from the float64 output by {gap:.3g} "
                                    f"(relative to its scale), more than {tol:g}")

    def scale(self) -> None:
        if "scale" not in estimator_parameters(type(self.est)):
            return
        default = self.d**-0.5
        scale = 0.6 * default
        scaled, plain = _variant(self.est, scale=scale), _variant(self.est, scale=None)
        if scaled is None or plain is None:
            return
        c = math.sqrt(scale / default)
        draw = self.sample("scale", self.q, self.k)
        try:
            out = scaled(self.q, self.k, self.v, draw)
            rescaled = plain(c * self.q, c * self.k, self.v, draw)
        except Exception as err:
            self.fail("scale", f"the call with scale={scale:.4g} or on rescaled inputs raised {type(err).__name__}: {err}")
        gap = _gap(out, rescaled)
        if not gap <= TOLERANCE[torch.float64]:
            self.fail("scale", f"scale={scale:.4g} on (q, k) differs by {gap:.3g} from the default scale d**-0.5 on "
                               f"(c q, c k), c = {c:.4g}, with the same draw: the scale is not honoured")

    def devices(self) -> None:
        draw = self.sample("devices", self.q, self.k)
        cpu = self.call("devices", self.q.float(), self.k.float(), self.v.float(), draw)
        if cpu.device.type != "cpu":
            self.fail("devices", f"CPU inputs gave an output on {cpu.device}")
        if not torch.cuda.is_available():
            return
        q, k, v = (t.float().cuda() for t in (self.q, self.k, self.v))
        out = self.call("devices", q, k, v, draw)
        if out.device != q.device:
            self.fail("devices", f"inputs on {q.device} gave an output on {out.device}")
        gap = _gap(out, cpu)
        if not gap <= TOLERANCE[torch.float32]:
            self.fail("devices", f"the CUDA output differs from the CPU output of the same draw by {gap:.3g}")

    def batching(self) -> None:
        q, k, v = _inputs(BATCH, self.N, self.d, self.dv, 0.8, self.seed + 1)
        draw = self.sample("batching", q, k)
        out = self.call("batching", q, k, v, draw)
        expected = (REPLICATES, *BATCH, self.N, self.dv)
        if tuple(out.shape) != expected:
            self.fail("batching", f"batch dims {BATCH} gave shape {tuple(out.shape)}, expected {expected}")
        whole, one = tuple(self.est.noise_layout(q, k)), tuple(self.est.noise_layout(q[0, 0], k[0, 0]))
        if whole not in (one, BATCH + one):
            self.fail("batching", f"noise layout {whole} on batch dims {BATCH} is neither one element's layout {one} "
                                  f"(shared noise) nor the batch axes followed by it {BATCH + one}")
        for index in ((0, 0), (1, 2)):
            noise = draw.noise if whole == one else draw.noise[(slice(None), *index)]
            single = self.call("batching", q[index], k[index], v[index], Draw(noise, draw.kind))
            gap = _gap(out[(slice(None), *index)], single)
            if not gap <= TOLERANCE[torch.float64]:
                kind = "the whole (shared) draw" if whole == one else f"noise[:, {index[0]}, {index[1]}]"
                self.fail("batching", f"batch element {index} differs from its own call on {kind} by {gap:.3g}")

    def purity(self) -> None:
        q, k, v = (t.clone() for t in (self.q, self.k, self.v))
        torch.manual_seed(1)
        draw = self.sample("purity", q, k, generator=7)
        noise = draw.noise.clone()
        first = self.call("purity", q, k, v, draw)
        for name, t, original in (("q", q, self.q), ("k", k, self.k), ("v", v, self.v), ("draw.noise", draw.noise, noise)):
            if t.shape != original.shape or not torch.equal(t, original):
                change = (f"max change {_gap(t, original):.3g}" if t.shape == original.shape
                          else f"shape now {tuple(t.shape)}")
                self.fail("purity", f"the call modified its argument {name} in place ({change})")
        torch.manual_seed(2)
        again = self.sample("purity", q, k, generator=7)
        if again.noise.shape != noise.shape or not torch.equal(again.noise, noise):
            self.fail("purity", "draw(generator=7) gave different noise after torch.manual_seed changed: "
                                f"max |difference| {_gap(again.noise, noise) if again.noise.shape == noise.shape else 'shape'}")
        second = self.call("purity", q, k, v, draw)
        gap = _gap(second, first)
        if gap != 0.0:
            self.fail("purity", f"two calls on the same draw (global seed 1, then 2) differ by {gap:.3g}: the call "
                                "reads state besides its arguments (the global random state?)")
        untagged = self.call("purity", q, k, v, Draw(noise))
        gap = _gap(untagged, first)
        if gap != 0.0:
            self.fail("purity", f"Draw(noise) without a kind gave an output {gap:.3g} away from the tagged draw's")

    def replicates(self) -> None:
        draw = self.sample("replicates", self.q, self.k)
        out = self.call("replicates", self.q, self.k, self.v, draw)
        for what, one in (("draw(replicates=1)", self.sample("replicates", self.q, self.k, replicates=1)),
                          ("draw[:1]", draw[:1])):
            single = self.call("replicates", self.q, self.k, self.v, one)
            if tuple(single.shape) != (1, self.N, self.dv):
                self.fail("replicates", f"{what} gave an output of shape {tuple(single.shape)}, expected "
                                        f"(R, N, dv) = {(1, self.N, self.dv)}: R = 1 must keep the replicate axis")
        part = self.call("replicates", self.q, self.k, self.v, draw[1:3])
        gap = _gap(part, out[1:3])
        if not gap <= TOLERANCE[torch.float64]:
            self.fail("replicates", f"replicates 1:3 of a draw give outputs {gap:.3g} away from replicates 1:3 of the "
                                    "whole draw's output: replicates are not computed independently")
        per_replicate = draw.noise[0].numel()
        if per_replicate == 0:  # deterministic: every replicate the same
            gap = _gap(out, out[:1].expand_as(out))
            if gap != 0.0:
                self.fail("replicates", f"empty noise but the replicates differ by {gap:.3g}")
            return
        flat = draw.noise.reshape(REPLICATES, -1)
        for i in range(REPLICATES):
            for j in range(i + 1, REPLICATES):
                if torch.equal(flat[i], flat[j]):
                    self.fail("replicates", f"replicates {i} and {j} of one draw have identical noise")
        other = self.sample("replicates", self.q, self.k, generator=1)
        if torch.equal(other.noise, draw.noise):
            self.fail("replicates", "generator seeds 0 and 1 gave identical noise")

    def refusal(self) -> None:
        draw = self.sample("refusal", self.q, self.k)
        layout = tuple(draw.noise.shape[1:])
        wrong_layout = (REPLICATES, *layout[:-1], layout[-1] + 1) if layout else (REPLICATES, 1)
        cases = {
            f"kind {draw.kind + ':other'!r}": Draw(draw.noise, draw.kind + ":other"),
            f"layout {wrong_layout[1:]} instead of {layout}": Draw(torch.zeros(wrong_layout, dtype=torch.float64), draw.kind),
        }
        for what, bad in cases.items():
            try:
                self.est(self.q, self.k, self.v, bad)
            except ValueError:
                continue
            except Exception as err:
                self.fail("refusal", f"a Draw of {what} raised {type(err).__name__} ({err}), expected ValueError")
            self.fail("refusal", f"a Draw of {what} was accepted, expected ValueError")

    def finiteness(self) -> None:
        norms = sorted({0.5, self.max_norm / 2, self.max_norm})
        for norm in norms:
            q, k, v = _inputs((), self.N, self.d, self.dv, norm, self.seed + 2)
            draw = self.sample("finiteness", q, k)
            for dtype in (torch.float32, torch.float64):
                out = self.call("finiteness", q.to(dtype), k.to(dtype), v.to(dtype), draw)
                bad = int((~torch.isfinite(out)).sum())
                if bad:
                    self.fail("finiteness", f"{bad} of {out.numel()} outputs are not finite at scaled norm {norm:g} "
                                            f"in {dtype}")

    def cost(self) -> None:
        model = getattr(self.est, "cost", None)
        if model is None:
            return
        sizes = dict(N=self.N, M=self.N, d=self.d, dv=self.dv)
        try:
            one, three = model(**sizes, batch=1), model(**sizes, batch=3)
        except Exception as err:
            self.fail("cost", f"cost({sizes}) raised {type(err).__name__}: {err}")
        for name, c in (("batch=1", one), ("batch=3", three)):
            if not isinstance(c, Cost):
                self.fail("cost", f"cost({name}) must return an evalab.Cost, got {type(c).__name__}")
        values = dataclasses.asdict(one)
        bad = {f: x for f, x in values.items() if not (math.isfinite(x) and x >= 0)}
        if bad:
            self.fail("cost", f"cost({sizes}) has non-finite or negative terms {bad}")
        if not one.flops() > 0:
            self.fail("cost", f"cost({sizes}) counts no FLOPs: {one}")
        for name, x in values.items():
            y = getattr(three, name)
            if not math.isclose(y, 3 * x, rel_tol=1e-9, abs_tol=1e-9):
                self.fail("cost", f"{name} is {x:g} at batch=1 and {y:g} at batch=3, expected 3 x {x:g} = {3 * x:g}")

    def exactness(self) -> None:
        limit = getattr(self.est, "exact_limit", None)
        if limit is None:
            return
        causal = bool(getattr(self.est, "causal", False))
        for N, M in ((self.N, self.N), (self.N // 2 + 1, self.N)):
            if causal and N != M:
                continue
            try:
                exact = limit(N, M)
            except Exception as err:
                self.fail("exactness", f"exact_limit({N}, {M}) raised {type(err).__name__}: {err}")
            if exact is None:
                continue
            q, k, v = _inputs((), N, self.d, self.dv, 0.8, self.seed + 4, M=M)
            try:
                out = exact(q, k, v, exact.draw(q, k, replicates=REPLICATES, generator=0))
            except Exception as err:
                self.fail("exactness", f"its exact limit {exact!r} raised {type(err).__name__} on N = {N}, M = {M}: {err}")
            reference = softmax_attention(q, k, v, scale=getattr(exact, "scale", None), causal=causal)
            gap = _gap(out, reference.expand_as(out))
            if not gap <= EXACT_TOLERANCE:
                self.fail("exactness", f"its exact limit {exact!r} differs from float64 softmax attention by {gap:.3g} "
                                       f"on N = {N}, M = {M} (tolerance {EXACT_TOLERANCE:g})")

    def convergence(self) -> None:
        budget = getattr(self.est, "budget", None)
        if budget is None:
            return
        value = getattr(self.est, budget, None)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail("convergence", f"budget names {budget!r}, which must be an int parameter, got {value!r}")
        grown = _variant(self.est, **{budget: BUDGET_GROWTH * value})
        if grown is None:
            self.fail("convergence", f"cannot rebuild it with {budget}={BUDGET_GROWTH * value}")
        q, k, v = _inputs((), self.N, self.d, self.dv, 0.8, self.seed + 5)
        causal = bool(getattr(self.est, "causal", False))
        exact = softmax_attention(q, k, v, scale=getattr(self.est, "scale", None), causal=causal)
        outputs = []
        for est in (self.est, grown):
            try:
                outputs.append(est(q, k, v, est.draw(q, k, replicates=CONVERGENCE_REPLICATES, generator=self.seed)))
            except Exception as err:
                self.fail("convergence", f"{est!r} raised {type(err).__name__}: {err}")
        small, large = (_rel_mse(out, exact) for out in outputs)
        bias2 = _rel_mse(outputs[1].double().mean(0, keepdim=True), exact)
        if small <= 1e-24:  # exact already at this budget
            return
        grown_value = BUDGET_GROWTH * value
        if not large * CONVERGENCE_FACTOR <= small:
            self.fail("convergence", f"rel_mse against exact attention is {small:.3g} at {budget}={value} and "
                                     f"{large:.3g} at {budget}={grown_value}: {BUDGET_GROWTH}x the budget must "
                                     f"cut it at least {CONVERGENCE_FACTOR:g}x (a biased limit, e.g. a forgotten "
                                     "importance weight?)")
        if not bias2 * BIAS_FACTOR <= small:
            self.fail("convergence", f"the mean of {CONVERGENCE_REPLICATES} replicates at {budget}={grown_value} is "
                                     f"{bias2:.3g} (rel_bias2) from exact attention, more than rel_mse {small:.3g} at "
                                     f"{budget}={value} / {BIAS_FACTOR:g}: it converges to something else than softmax "
                                     "attention (a forgotten importance weight?)")
