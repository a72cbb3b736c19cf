"""check_estimator: does an object follow the estimator protocol (evalab.estimators.base)? Modelled on
scikit-learn's ``check_estimator``: one call runs every check on a concrete instance and raises an
AssertionError naming the first property that fails and showing the numbers.

    from evalab.testing import check_estimator
    check_estimator(MyEstimator(num_keys=8))

The properties, in order:
- protocol:      the members exist; ``noise_kind`` is a string, ``noise_layout`` a tuple of ints.
- draw:          ``draw`` returns a Draw of noise (R, *noise_layout) and kind ``noise_kind``.
- purity:        the same draw gives the same output; torch's global seed changes neither the draw of a seeded
                 generator nor the output; inputs and noise are not modified; an untagged ``Draw(noise)`` of the
                 right layout is accepted.
- shapes:        q (*b, N, d), k (*b, M, d), v (*b, M, dv) -> (R, *b, N, dv).
- dtypes:        float64 and float32 in give the same dtype out; float16 in gives float16 out; all three agree.
- devices:       the output lives on the inputs' device; on CUDA (when available) it matches the CPU output.
- batching:      a call on batch dims (2, 3) equals the per-element calls on the matching noise: the whole draw
                 when the layout has no batch axes (shared noise), else the slice ``noise[:, i, j]``.
- replicates:    replicate r of an output depends on replicate r of the noise only (a slice of a draw gives the
                 slice of the output); the replicates of a random estimator's draw differ, and so do draws of
                 two seeds; deterministic ones draw empty noise (and then every replicate is the same).
- refusal:       a Draw of another kind or another layout raises ValueError.
- finiteness:    outputs are finite at scaled norms up to ``max_norm`` in float32 and float64.
- cost:          when defined, ``cost`` returns a Cost of finite non-negative numbers, linear in ``batch``.

Sizes are small (N = M = ``seq_len``, d, dv), so a check takes well under a second for the built-ins.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .estimators.base import Cost, Estimator
from .estimators.draw import Draw

__all__ = ["check_estimator", "check_instances"]

REPLICATES = 3
BATCH = (2, 3)
#: Largest |difference| allowed relative to the output's scale, per input dtype, against the float64 output.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-2}


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
    """Run every check of the module docstring on ``est``; raise AssertionError at the first failure.

    seq_len: N = M of the test inputs (estimators with size constraints, e.g. windows, choose it).
    max_norm: the largest scaled norm |x| = |y| at which outputs must be finite.
    """
    checker = _Checker(est, seq_len=seq_len, d=d, dv=dv, max_norm=max_norm, seed=seed)
    with torch.random.fork_rng(devices=[]):  # the purity check moves the global seed; leave it as it was
        for check in (checker.protocol, checker.draw, checker.purity, checker.shapes_and_dtypes, checker.devices,
                      checker.batching, checker.replicates, checker.refusal, checker.finiteness, checker.cost):
            check()


def _fail(prop: str, est, message: str) -> None:
    raise AssertionError(f"check_estimator [{prop}] {est!r}: {message}")


def _inputs(batch: tuple, N: int, d: int, dv: int, norm: float, seed: int, dtype=torch.float64):
    """q, k, v with scaled rows of norm ``norm`` (scale d**-0.5), from a private generator."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(*batch, N, d, generator=g, dtype=torch.float64) for _ in range(2))
    q, k = (t / t.norm(dim=-1, keepdim=True) * norm * d**0.25 for t in (q, k))
    v = torch.randn(*batch, N, dv, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (absolute below 1)."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max())) if b.numel() else 0.0


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

    def shapes_and_dtypes(self) -> None:
        draw = self.sample("shapes", self.q, self.k)
        reference = self.call("shapes", self.q, self.k, self.v, draw)
        expected = (REPLICATES, self.N, self.dv)
        if not isinstance(reference, torch.Tensor) or tuple(reference.shape) != expected:
            shape = tuple(reference.shape) if isinstance(reference, torch.Tensor) else type(reference).__name__
            self.fail("shapes", f"q {tuple(self.q.shape)}, v {tuple(self.v.shape)}, R = {REPLICATES} gave {shape}, "
                                f"expected (R, N, dv) = {expected}")
        for dtype, tol in TOLERANCE.items():
            out = self.call("dtypes", self.q.to(dtype), self.k.to(dtype), self.v.to(dtype), draw)
            if out.dtype != dtype:
                self.fail("dtypes", f"{dtype} inputs gave a {out.dtype} output, expected {dtype}")
            gap = _gap(out, reference)
            if not gap <= tol:
                self.fail("dtypes", f"the {dtype} output differs from the float64 output by {gap:.3g} "
                                    f"(relative to its scale), more than {tol:g}")

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
        for name, t, original in (("q", q, self.q), ("k", k, self.k), ("v", v, self.v), ("draw.noise", draw.noise, noise)):
            if not torch.equal(t, original):
                self.fail("purity", f"the call modified {name} in place (max change {_gap(t, original):.3g})")
        untagged = self.call("purity", q, k, v, Draw(noise))
        gap = _gap(untagged, first)
        if gap != 0.0:
            self.fail("purity", f"Draw(noise) without a kind gave an output {gap:.3g} away from the tagged draw's")

    def replicates(self) -> None:
        draw = self.sample("replicates", self.q, self.k)
        out = self.call("replicates", self.q, self.k, self.v, draw)
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
