"""evalab.testing.check_estimator: every registered estimator passes it; estimators broken in one property each
fail it with an AssertionError that names that property."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import evalab as ev
from evalab import registry
from evalab.estimators.draw import make_generator
from evalab.testing import CHECKS, check_estimator, check_instances, check_property, parametrize_with_checks

INSTANCES = [(name, est) for name, cls in registry.ESTIMATORS.items() for est in check_instances(cls)]


@pytest.mark.parametrize("name, est", INSTANCES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(INSTANCES)])
def test_every_registered_estimator_passes(name, est):
    check_estimator(est)


@dataclasses.dataclass(frozen=True)
class Jitter:
    """A correct random estimator: exact attention with the logit of key m perturbed by size * noise_m, the same
    for every query; noise (R, M) shared by the batch elements, or (R, *b, M) with shared_noise=False."""

    size: float = 0.1
    shared_noise: bool = True

    noise_kind = "jitter"

    def noise_layout(self, q, k):
        return tuple(k.shape[-2:-1]) if self.shared_noise else tuple(k.shape[:-1])

    def draw(self, q, k, *, replicates=1, generator=None):
        noise = torch.randn(replicates, *self.noise_layout(q, k), generator=make_generator(generator), dtype=torch.float64)
        return ev.Draw(noise, self.noise_kind)

    def jitter(self, q, k, draw):
        """(R, *b or 1s, 1, M)."""
        eps = draw.as_tensor(self.noise_layout(q, k), self.noise_kind, device=q.device, dtype=torch.float64)
        if self.shared_noise:
            return eps.reshape(eps.shape[0], *[1] * (q.dim() - 2), 1, -1)
        return eps.unsqueeze(-2)

    def __call__(self, q, k, v, draw):
        eps = self.jitter(q, k, draw)
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        logits = (q.to(ct) @ k.to(ct).transpose(-1, -2)) * q.shape[-1] ** -0.5       # (*b, N, M)
        return (torch.softmax(logits + self.size * eps.to(ct), dim=-1) @ v.to(ct)).to(q.dtype)

    def cost(self, *, N, M, d, dv, batch=1, itemsize=4):
        return ev.Cost.per_element(2 * N * M * d, N * M * (2 * dv + 5), N * M, N * dv, batch=batch, itemsize=itemsize)


class GlobalRNG(Jitter):
    """Ignores its draw's values and reads torch's global random state."""

    def jitter(self, q, k, draw):
        return torch.randn_like(super().jitter(q, k, draw))


class NoRefusal(Jitter):
    """Uses whatever noise it is given, without checking kind or layout."""

    def jitter(self, q, k, draw):
        eps = draw.noise.reshape(draw.replicates, -1)[:, : k.shape[-2]].to(q.device)
        return eps.reshape(draw.replicates, *[1] * (q.dim() - 1), -1)


class SwappedNoise(Jitter):
    """With per-element noise, gives batch element (i, j) the noise of element (-1 - i, j)."""

    def jitter(self, q, k, draw):
        eps = super().jitter(q, k, draw)
        return eps.flip(1) if not self.shared_noise and q.dim() > 2 else eps


class FloatOut(Jitter):
    """Returns float32 for float16 inputs."""

    def __call__(self, q, k, v, draw):
        out = super().__call__(q, k, v, draw)
        return out.float() if q.dtype == torch.float16 else out


class MixesBatch(Jitter):
    """Normalises the logits over the whole batch instead of per batch element."""

    def __call__(self, q, k, v, draw):
        out = super().__call__(q, k, v, draw)
        return out - out.mean(dim=tuple(range(1, out.dim() - 2)), keepdim=True) + out.mean() if out.dim() > 3 else out


class MixesReplicates(Jitter):
    """Centres each output on the mean over replicates."""

    def __call__(self, q, k, v, draw):
        out = super().__call__(q, k, v, draw)
        return out - out.mean(0, keepdim=True)


class CostNotPerBatch(Jitter):
    """Reports the same cost whatever the batch."""

    def cost(self, *, N, M, d, dv, batch=1, itemsize=4):
        return super().cost(N=N, M=M, d=d, dv=dv, batch=1, itemsize=itemsize)


class Overflows(Jitter):
    """exp of ten times the logits without subtracting their maximum: overflows float32 at large norms."""

    def __call__(self, q, k, v, draw):
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.jitter(q, k, draw)
        w = torch.exp(10 * (q.to(ct) @ k.to(ct).transpose(-1, -2)) * q.shape[-1] ** -0.5)
        out = (w / w.sum(-1, keepdim=True)) @ v.to(ct)
        return out.to(q.dtype).expand(draw.replicates, *out.shape)


def test_a_correct_random_estimator_passes():
    check_estimator(Jitter())
    check_estimator(Jitter(shared_noise=False))
    check_estimator(SwappedNoise(shared_noise=True))  # the swap applies to per-element noise only
    check_estimator(Jitter(size=0.0))  # noise that changes nothing still passes: replicates are only required to differ in noise


@pytest.mark.parametrize("broken, prop, numbers", [
    (GlobalRNG(), "purity", r"two calls on the same draw \(global seed 1, then 2\) differ by \d"),
    (NoRefusal(), "refusal", r"a Draw of kind 'jitter:other' was accepted, expected ValueError"),
    (SwappedNoise(shared_noise=False), "batching", r"batch element \(0, 0\) differs from its own call on noise\[:, 0, 0\] by \d"),
    (FloatOut(), "dtypes", r"torch.float16 inputs gave a torch.float32 output"),
    (MixesBatch(), "batching", r"batch element \(0, 0\) differs from its own call on the whole \(shared\) draw by \d"),
    (MixesReplicates(), "replicates", r"replicates 1:3 of a draw give outputs \d.* away"),
    (CostNotPerBatch(), "cost", r"fixed_flops is 16384 at batch=1 and 16384 at batch=3, expected 3 x 16384 = 49152"),
    (Overflows(), "finiteness", r"\d+ of \d+ outputs are not finite at scaled norm"),
], ids=lambda x: x if isinstance(x, str) and x.isalpha() else None)
def test_a_broken_estimator_fails_naming_the_property(broken, prop, numbers):
    with pytest.raises(AssertionError, match=rf"check_estimator \[{prop}\] {type(broken).__name__}\(size=0.1, shared_noise=(True|False)\): {numbers}"):
        check_estimator(broken)


def test_check_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_estimator(Jitter())
    assert torch.equal(torch.rand(3), expected)


def test_check_instances_flips_boolean_options_or_asks_the_class():
    assert [e.causal for e in check_instances(ev.Softmax)] == [False, True]

    class Custom(Jitter):
        @classmethod
        def _check_instances(cls):
            return [cls(size=0.5), cls(size=2.0)]

    assert [e.size for e in check_instances(Custom)] == [0.5, 2.0]  # exact: constructor arguments, read back
    assert [(e.size, e.shared_noise) for e in check_instances(Jitter)] == [(0.1, True), (0.1, False)]  # exact: constructor arguments, read back



@dataclasses.dataclass(frozen=True)
class ImportanceKeys:
    """A correct importance sampler: ``samples`` keys drawn with replacement from the fixed proposal
    p_m = (m + 1) / sum (later keys likelier), the same keys for every query; self-normalised weights
    w_s = exp(l_{n m_s}) / p_{m_s}; the output sum_s w_s v_{m_s} / sum_s w_s tends to softmax attention as 1/samples.
    Noise: one uniform number per sample, (R, samples), mapped to keys by the proposal's inverse CDF."""

    samples: int = 8
    scale: float | None = None

    noise_kind = "uniform:importance"
    budget = "samples"

    def noise_layout(self, q, k):
        return (self.samples,)

    def draw(self, q, k, *, replicates=1, generator=None):
        noise = torch.rand(replicates, self.samples, generator=make_generator(generator), dtype=torch.float64)
        return ev.Draw(noise, self.noise_kind)

    def log_weights(self, logits, log_p):
        """(R, *b, N, S) log importance weights."""
        return logits - log_p

    def __call__(self, q, k, v, draw):
        u = draw.as_tensor(self.noise_layout(q, k), self.noise_kind, device=q.device, dtype=torch.float64)
        M = k.shape[-2]
        p = torch.arange(1, M + 1, dtype=torch.float64, device=q.device)
        p = p / p.sum()
        index = torch.searchsorted(p.cumsum(0), u.contiguous()).clamp(max=M - 1)     # (R, S) sampled keys
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        keys, values = k.to(ct)[..., index, :].movedim(-3, 0), v.to(ct)[..., index, :].movedim(-3, 0)  # (R, *b, S, .)
        logits = scale * q.to(ct) @ keys.transpose(-1, -2)                                             # (R, *b, N, S)
        log_p = p.log().to(ct)[index].reshape(index.shape[0], *[1] * (q.dim() - 1), -1)
        w = torch.softmax(self.log_weights(logits, log_p), dim=-1)
        out_dtype = torch.promote_types(q.dtype, v.dtype)
        return (w @ values).to(out_dtype)


class ForgetsImportanceWeight(ImportanceKeys):
    """Weights exp(l) without dividing by the proposal: converges to the attention of p_m exp(l_nm), not softmax."""

    def log_weights(self, logits, log_p):
        return logits


@dataclasses.dataclass(frozen=True)
class ScaledJitter(Jitter):
    """Jitter with a ``scale`` parameter (None: d**-0.5)."""

    scale: float | None = None

    def __call__(self, q, k, v, draw):
        eps = self.jitter(q, k, draw)
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        logits = (q.to(ct) @ k.to(ct).transpose(-1, -2)) * scale
        return (torch.softmax(logits + self.size * eps.to(ct), dim=-1) @ v.to(ct)).to(q.dtype)


class IgnoresScale(ScaledJitter):
    """Always uses d**-0.5, whatever its ``scale``."""

    def __call__(self, q, k, v, draw):
        return ScaledJitter(self.size, self.shared_noise)(q, k, v, draw)


class DropsReplicateAxis(Jitter):
    """Squeezes the output, so that R = 1 loses its replicate axis."""

    def __call__(self, q, k, v, draw):
        return super().__call__(q, k, v, draw).squeeze(0)


class BFloatOut(Jitter):
    """Returns float32 for bfloat16 inputs."""

    def __call__(self, q, k, v, draw):
        out = super().__call__(q, k, v, draw)
        return out.float() if q.dtype == torch.bfloat16 else out


class ChangesValuesInPlace(Jitter):
    """Centres v in place before using it."""

    def __call__(self, q, k, v, draw):
        v -= v.mean(dim=-2, keepdim=True)
        return super().__call__(q, k, v, draw)


class WrongExactLimit(Jitter):
    """Claims that size 0 is exact but keeps a fixed logit offset there."""

    def exact_limit(self, N, M):
        return OffsetJitter(size=0.0)


class OffsetJitter(Jitter):
    def __call__(self, q, k, v, draw):
        out = super().__call__(q, k, v, draw)
        return out + 0.01


def test_correct_estimators_with_hooks_pass():
    check_estimator(ImportanceKeys())
    check_estimator(ImportanceKeys(samples=2))
    check_estimator(ScaledJitter())
    check_estimator(ScaledJitter(scale=0.2))


@pytest.mark.parametrize("broken, prop, numbers", [
    (DropsReplicateAxis(), "replicates", r"draw\(replicates=1\) gave an output of shape \(32, 4\), expected \(R, N, dv\) = "
                                         r"\(1, 32, 4\): R = 1 must keep the replicate axis"),
    (BFloatOut(), "dtypes", r"torch.bfloat16 inputs gave a torch.float32 output, expected torch.bfloat16"),
    (IgnoresScale(), "scale", r"scale=0.2121 on \(q, k\) differs by \d.* from the default scale d\*\*-0.5 on \(c q, c k\), "
                              r"c = 0.7746, with the same draw: the scale is not honoured"),
    (ForgetsImportanceWeight(), "convergence", r"the mean of 32 replicates at samples=128 is \d.* \(rel_bias2\) from exact attention, more than rel_mse \d.* at "
                                               r"samples=8 / 64: it converges to something else than softmax attention"),
    (ChangesValuesInPlace(), "purity", r"the call modified its argument v in place \(max change \d"),
    (WrongExactLimit(), "exactness", r"its exact limit OffsetJitter\(size=0.0, shared_noise=True\) differs from float64 "
                                     r"softmax attention by 0.01 on N = 32, M = 32"),
], ids=lambda x: x if isinstance(x, str) and x.isalpha() else None)
def test_a_broken_estimator_fails_naming_what_it_broke(broken, prop, numbers):
    with pytest.raises(AssertionError, match=rf"check_estimator \[{prop}\] {type(broken).__name__}\(.*\): {numbers}"):
        check_estimator(broken)


def test_parametrize_with_checks_makes_one_test_per_property():
    mark = parametrize_with_checks([Jitter(), ImportanceKeys(samples=4)], seq_len=16)
    assert mark.args[0] == "estimator, check"
    params = mark.args[1]
    assert [p.id for p in params[: len(CHECKS)]] == [f"Jitter[0]-{prop}" for prop in CHECKS]
    assert len(params) == 2 * len(CHECKS) and params[-1].id == "ImportanceKeys[1]-convergence"
    for param in params:
        estimator, check = param.values
        check(estimator)
    estimator, check = parametrize_with_checks([ForgetsImportanceWeight()]).args[1][CHECKS.index("convergence")].values
    with pytest.raises(AssertionError, match=r"check_estimator \[convergence\]"):
        check(estimator)
    with pytest.raises(ValueError, match="prop='speed' is not a check; expected one of 'protocol'"):
        check_property(Jitter(), "speed")


@parametrize_with_checks([Jitter(shared_noise=False), ImportanceKeys(samples=4)])
def test_parametrize_with_checks_as_a_decorator(estimator, check):
    check(estimator)
