"""Bad input gets a ValueError/TypeError naming the argument, the value and what was expected."""
import pytest
import torch

import evalab as ev
from evalab import _checks
from conftest import make_qkv

ESTIMATORS = [ev.RFA(num_features=4), ev.EVA(window=4, chunk_size=2), ev.ControlVariates(num_features=4), ev.Softmax(),
              ev.RA(samples_per_query=2), ev.LARA(num_proposals=4)]
ESTIMATORS += [ev.Nystrom(num_landmarks=2), ev.LinearAttention(), ev.Scatterbrain(window=4, num_features=4),
               ev.LocalWindow(window=4)]


def _call(est, q, k, v):
    return est(q, k, v, est.draw(q, k, replicates=1, generator=0))


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: type(e).__name__)
def test_shape_and_type_errors(est):
    q, k, v = make_qkv(N=8, d=4, dv=3)
    with pytest.raises(ValueError, match="same feature size d"):
        _call(est, q, k[..., :3], v)
    with pytest.raises(ValueError, match=r"v must have shape \(\*batch, M, dv\)"):
        _call(est, q, k, v[:5])
    with pytest.raises(ValueError, match="same batch dimensions"):
        _call(est, q.unsqueeze(0).expand(2, 8, 4), k, v)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        _call(est, q.numpy(), k, v)
    with pytest.raises(TypeError, match="floating dtype"):
        _call(est, q.long(), k, v)
    with pytest.raises(ValueError, match=r"q must have shape \(\*batch, length, features\)"):
        _call(est, q[0], k, v)
    bad = k.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="k contains non-finite values"):
        _call(est, q, bad, v)
    bad = v.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="v contains non-finite values"):
        _call(est, q, k, bad)


def test_devices_must_match():
    """Devices are checked before any computation, so a meta tensor stands in for a second device."""
    q, k, v = make_qkv(N=8, d=4)
    with pytest.raises(ValueError, match="q and k must be on the same device, got q on cpu and k on meta"):
        ev.softmax_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="v must be on the same device as k"):
        ev.softmax_attention(q, k, v.to("meta"))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ev.RFA(num_features=0), "num_features must be >= 1, got 0"),
        (lambda: ev.RFA(num_features=2.5), "num_features must be an int"),
        (lambda: ev.RFA(feature_map="relu"), "feature_map='relu'.*'positive', 'hyperbolic', 'trig'"),
        (lambda: ev.RFA(sampler="sobol"), "sampler='sobol'.*'iid', 'orthogonal', 'qmc'"),
        (lambda: ev.RFA(eps=-1.0), "eps must be >= 0"),
        (lambda: ev.RFA(scale=0.0), "scale must be > 0"),
        (lambda: ev.RFA(feature_map="trig", eps=1e-3), "eps > 0 applies to positive-type"),
        (lambda: ev.ControlVariates(feature_map="trig"), "feature_map='trig'"),
    ],
)
def test_bad_options(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_draws():
    q, k, v = make_qkv(N=8, d=4)
    est = ev.RFA(num_features=4)
    with pytest.raises(ValueError, match="replicates must be >= 1"):
        est.draw(q, k, replicates=0)
    with pytest.raises(TypeError, match="generator must be"):
        est.draw(q, k, generator="seed")
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        ev.Draw([1, 2])


def test_large_finite_inputs_are_not_rejected():
    """Finiteness is checked through a sum first; a sum that overflows must not reject finite inputs."""
    q, k, v = make_qkv(N=8, d=4, dtype=torch.float32)
    big = torch.full_like(v, 3e38)  # finite, but its sum overflows float32
    assert torch.isinf(big.sum())
    _checks.qkv(q, k, big)
    half = torch.full((8, 3), 60000.0, dtype=torch.float16)  # its float16 sum would overflow too
    _checks.finite("v", half)
    for bad in (float("nan"), float("inf"), -float("inf")):
        worse = big.clone()
        worse[3, 1] = bad
        with pytest.raises(ValueError, match="v contains non-finite values"):
            _checks.qkv(q, k, worse)


def test_monte_carlo_rejects_non_finite_inputs():
    q, k, v = make_qkv(N=8, d=4)
    v[1, 0] = float("nan")
    with pytest.raises(ValueError, match="v contains non-finite values"):
        ev.monte_carlo(ev.RFA(num_features=4), q, k, v, replicates=4)


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: type(e).__name__)
def test_empty_inputs(est):
    q, k, v = make_qkv(N=6, d=4, dv=3)
    with pytest.raises(ValueError, match=r"empty inputs: N=0 \(q \(0, 4\)"):
        _call(est, q[:0], k, v)
    with pytest.raises(ValueError, match=r"empty inputs: M=0 .*k \(0, 4\)"):
        _call(est, q, k[:0], v[:0])
    with pytest.raises(ValueError, match="empty inputs: M=0"):
        ev.monte_carlo(est, q, k[:0], v[:0], replicates=2)



# --- one test per bad input: each is refused in one line, or (where the intent is clear) accepted ------------


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_monte_carlo_builds_a_registered_name():
    """A registered name, in any case, is the estimator with its defaults: the same numbers as the instance."""
    q, k, v = make_qkv(N=8, d=4)
    by_name = ev.monte_carlo("RFA", q, k, v, replicates=4, seed=2)
    built = ev.monte_carlo(ev.RFA(), q, k, v, replicates=4, seed=2)
    assert isinstance(by_name.estimator, ev.RFA)
    assert by_name.mse.value == pytest.approx(built.mse.value, rel=1e-12)
    assert isinstance(ev.monte_carlo("eva", q, k, v, replicates=4).estimator, ev.EVA)


def test_monte_carlo_refuses_an_unknown_name():
    q, k, v = make_qkv(N=8, d=4)
    with pytest.raises(ValueError, match=r"estimator='performer' is not a registered estimator; .*'rfa', 'eva'") as err:
        ev.monte_carlo("performer", q, k, v, replicates=4)
    _one_line(err)
    with pytest.raises(TypeError, match=r"estimator must be an estimator .* got 3 \(int\)"):
        ev.monte_carlo(3, q, k, v, replicates=4)


def test_monte_carlo_measures_inputs_that_require_grad():
    """Inputs with requires_grad are measured detached (gradients are gradient_gap's job): same numbers."""
    q, k, v = make_qkv(N=8, d=4)
    est = ev.RFA(num_features=4)
    plain = ev.monte_carlo(est, q, k, v, replicates=4)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    graded = ev.monte_carlo(est, *leaves, replicates=4)
    assert graded.mse.value == pytest.approx(plain.mse.value, rel=1e-12)
    pair = ev.compare({"a": est, "b": "RFA"}, *leaves, replicates=4)
    assert pair.results["a"].mse.value == pytest.approx(plain.mse.value, rel=1e-12)


def test_monte_carlo_refuses_a_non_finite_reference():
    q, k, v = make_qkv(N=8, d=4)
    reference = ev.softmax_attention(q, k, v)
    for bad in (float("nan"), float("inf")):
        broken = reference.clone()
        broken[3, 1] = bad
        with pytest.raises(ValueError, match="reference contains non-finite values") as err:
            ev.monte_carlo(ev.RFA(num_features=4), q, k, v, replicates=4, reference=broken)
        _one_line(err)
    with pytest.raises(TypeError, match="reference must be a torch.Tensor"):
        ev.monte_carlo(ev.RFA(num_features=4), q, k, v, replicates=4, reference=reference.numpy())


def test_draw_refuses_non_finite_noise():
    q, k, v = make_qkv(N=8, d=4)
    est = ev.RFA(num_features=4)
    noise = est.draw(q, k, replicates=2, generator=0).noise.clone()
    for bad in (float("nan"), -float("inf")):
        broken = noise.clone()
        broken[1, 2, 0] = bad
        with pytest.raises(ValueError, match="noise contains non-finite values") as err:
            est(q, k, v, ev.Draw(broken, "omega:iid"))
        _one_line(err)


def test_run_sweep_into_a_file(tmp_path):
    from evalab.sweep import run_sweep

    path = tmp_path / "results.txt"
    path.write_text("not a directory")
    spec = {"name": "t", "replicates": 2, "inputs": {"kind": "gaussian", "seq_len": 8, "d": 4},
            "estimators": [{"name": "rfa", "num_features": 2}]}
    with pytest.raises(ValueError, match=r"out='.*results.txt' is a file; expected a directory") as err:
        run_sweep(spec, path, progress=False)
    _one_line(err)
    assert path.read_text() == "not a directory"


@pytest.mark.parametrize("sizes,error,match", [
    (dict(N=-1), ValueError, "N must be >= 1, got -1"),
    (dict(d=0), ValueError, "d must be >= 1, got 0"),
    (dict(N="a"), TypeError, r"N must be an int, got 'a' \(str\)"),
    (dict(dv=2.5), TypeError, "dv must be an int, got 2.5"),
    (dict(itemsize=3), ValueError, "itemsize must be 2, 4 or 8"),
], ids=["N=-1", "d=0", "N='a'", "dv=2.5", "itemsize=3"])
def test_estimate_cost_refuses_bad_sizes(sizes, error, match):
    with pytest.raises(error, match=match) as err:
        ev.estimate_cost(ev.RFA(num_features=4), **{"N": 8, "M": 8, "d": 4, "dv": 3, **sizes})
    _one_line(err)


def test_estimate_cost_takes_numpy_integers():
    import numpy as np

    sizes = dict(N=np.int64(16), M=np.int32(16), d=np.int64(4), dv=np.int64(3))
    assert ev.estimate_cost(ev.RFA(num_features=4), **sizes) == ev.estimate_cost(ev.RFA(num_features=4), N=16, M=16, d=4, dv=3)


def test_gaussian_refuses_integer_dtypes_and_takes_dtype_names():
    with pytest.raises(TypeError, match=r"dtype=torch.int32 is not a floating dtype; expected one of float16, bfloat16, "
                                        r"float32, float64") as err:
        ev.inputs.gaussian(seq_len=8, d=4, dtype=torch.int32)
    _one_line(err)
    with pytest.raises(TypeError, match="dtype='int8' is not a floating dtype"):
        ev.inputs.gaussian(seq_len=8, d=4, dtype="int8")
    by_name = ev.inputs.gaussian(seq_len=8, d=4, dtype="float32")
    assert all(t.dtype == torch.float32 for t in by_name)
    assert torch.equal(by_name.q, ev.inputs.gaussian(seq_len=8, d=4, dtype=torch.float32).q)


def test_no_command_is_a_usage_error(capsys):
    from evalab.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: evalab")
    assert captured.err.strip().splitlines()[-1] == ("evalab: error: a command is required (sweep, bench, reproduce, notebooks, check); "
                                                     "evalab --help describes them")


def test_model_spec_with_an_unknown_model_is_a_spec_error(tmp_path, capsys):
    from evalab.cli import main
    from evalab.sweep import SpecError, parse_spec

    spec = {"name": "m", "replicates": 2, "inputs": {"kind": "model", "model": ["minilm", "gpt-17"]},
            "estimators": [{"name": "rfa"}]}
    with pytest.raises(SpecError, match=r"^inputs: model='gpt-17' is not supported; expected one of 'minilm'$"):
        parse_spec(spec)
    path = tmp_path / "m.toml"
    path.write_text('name = "m"\nreplicates = 2\n[inputs]\nkind = "model"\nmodel = "gpt-17"\n[[estimators]]\nname = "rfa"\n')
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "inputs: model='gpt-17' is not supported" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
