"""evalab.testing.check_estimator: every registered estimator passes it; estimators broken in one property each
fail it with an AssertionError that names that property."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import evalab as ev
from evalab import registry
from evalab.estimators.draw import make_generator
from evalab.testing import check_estimator, check_instances

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
