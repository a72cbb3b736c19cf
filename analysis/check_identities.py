"""Print the max abs error of every identity of theory.md sections 4, 5 and 10 on random float64 inputs.

    python analysis/check_identities.py
"""
import torch

import evalab as ev


def main(seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    N, d, dv, S = 64, 16, 8, 32
    q, k, v = (torch.randn(2, N, n, generator=g, dtype=torch.float64) * 0.7 for n in (d, d, dv))
    rows = []
    for causal in (False, True):
        exact = ev.softmax_attention(q, k, v, causal=causal)
        for w, c in ((N, 8), (2 * N, 16)):
            est = ev.EVA(window=w, chunk_size=c, causal=causal)
            rows.append((f"EVA window {w} >= N -> softmax (causal={causal})", est(q, k, v, est.draw(q, k, replicates=4, generator=g)) - exact))
        est = ev.EVA(window=0, chunk_size=1, chunk_logit="exact", samples_per_chunk=3, causal=causal)
        rows.append((f"EVA w=0, c=1, exact logit -> softmax (causal={causal})", est(q, k, v, est.draw(q, k, replicates=4, generator=g)) - exact))
    exact = ev.softmax_attention(q, k, v)
    for fm in ("positive", "hyperbolic"):
        rfa = ev.RFA(num_features=S, feature_map=fm)
        draw = rfa.draw(q, k, replicates=4, generator=g)
        ref = rfa(q, k, v, draw)
        rows.append((f"CV shared -> RFA ({fm})", ev.ControlVariates(num_features=S, feature_map=fm)(q, k, v, draw) - ref))
        rows.append((f"CV chunked c=M -> RFA ({fm})", ev.ControlVariates(num_features=S, coefficient="chunked", chunk_size=N, feature_map=fm)(q, k, v, draw) - ref))
        rows.append((f"CV optimal -> softmax ({fm})", ev.ControlVariates(num_features=S, coefficient="optimal", feature_map=fm)(q, k, v, draw) - exact))
        rows.append((f"CV chunked c=1 -> softmax ({fm})", ev.ControlVariates(num_features=S, coefficient="chunked", chunk_size=1, feature_map=fm)(q, k, v, draw) - exact))
    rfa = ev.RFA(num_features=S)
    draw = rfa.draw(q, k, replicates=4, generator=g)
    eva = ev.EVA(window=0, chunk_size=N, samples_per_chunk=S, proposal="zero", chunk_logit="exact")
    rows.append(("EVA w=0, one chunk, zero proposal, exact logit -> RFA", eva(q, k, v, ev.Draw(draw.noise.unsqueeze(1))) - rfa(q, k, v, draw)))
    lara = ev.LARA(num_proposals=S, proposal="zero")
    draw = lara.draw(q, k, replicates=4, generator=g)
    rows.append(("LARA zero proposals, balance -> RFA (S = C)", lara(q, k, v, draw) - rfa(q, k, v, ev.Draw(draw.noise.squeeze(-2)))))
    balance = ev.LARA(num_proposals=8, samples_per_proposal=2)
    draw = balance.draw(q, k, replicates=4, generator=g)
    optimal = ev.LARA(num_proposals=8, samples_per_proposal=2, weights="optimal", alpha=0.0)
    rows.append(("LARA balance -> optimal with alpha = 0", balance(q, k, v, draw) - optimal(q, k, v, draw)))
    one = ev.LARA(num_proposals=1)
    out = one(q, k, v, one.draw(q, k, replicates=4, generator=g))
    rows.append(("LARA C = 1 -> the same output for every query", out - out[..., :1, :]))
    width = max(len(name) for name, _ in rows)
    print(f"{'identity':<{width}}  max abs error")
    for name, err in rows:
        print(f"{name:<{width}}  {err.abs().max().item():.2e}")


if __name__ == "__main__":
    main()
