"""Sweep specs: parsing, validation errors, grid expansion, cell ids and seeds."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from evalab.sweep import SpecError, load_spec, parse_spec
from evalab.sweep.spec import derive_seed, render_toml

SWEEPS = Path(__file__).resolve().parents[1] / "analysis" / "sweeps"

EXAMPLE = """
name = "gap_vs_features"
replicates = 200
seed = 0
device = "cpu"
dtype = "float32"

[inputs]
kind = "gaussian"
seq_len = 256
d = 64
norm = [0.5, 1.0, 1.5]

[[estimators]]
name = "rfa"
label = "RFA"
num_features = [16, 32, 64, 128]
sampler = ["iid", "orthogonal"]

[[estimators]]
name = "eva"
window = 32
chunk_size = [4, 8]
"""


def base() -> dict:
    return {
        "name": "t",
        "replicates": 4,
        "inputs": {"kind": "gaussian", "seq_len": 16, "d": 8, "norm": [0.5, 1.0]},
        "estimators": [{"name": "rfa", "num_features": [4, 8]}, {"name": "eva", "window": 8, "chunk_size": [2, 4]}],
    }


def test_example_expands_to_the_product_of_axes():
    spec = parse_spec(EXAMPLE)
    cells = spec.cells()
    assert len(cells) == 3 * (4 * 2) + 3 * 2
    rfa = [c for c in cells if c.estimator == "rfa"]
    assert {(c.params["num_features"], c.params["sampler"], c.inputs["norm"]) for c in rfa} == {
        (s, m, n) for s in (16, 32, 64, 128) for m in ("iid", "orthogonal") for n in (0.5, 1.0, 1.5)
    }
    assert all(c.label == "RFA" for c in rfa)
    eva = [c for c in cells if c.estimator == "eva"]
    assert all(c.label == "eva" for c in eva)  # default label: the registry name
    # defaults are filled in: every estimator parameter and every input parameter is in the key
    assert eva[0].params == {"window": 32, "chunk_size": eva[0].params["chunk_size"], "samples_per_chunk": 1,  # exact: spec defaults, filled in
                             "proposal": "mean", "chunk_logit": "mean", "partition": "disjoint",
                             "causal": False, "scale": None, "noise_scale": 1.0, "shared_noise": True}
    assert set(eva[0].inputs) == {"seq_len", "d", "dv", "batch", "norm", "key_len", "mode", "clusters", "spread", "scale"}
    assert eva[0].inputs["seq_len"] == 256 and eva[0].inputs["mode"] == "gaussian"
    assert all(c.error is None for c in cells)
    assert len({c.cell_id for c in cells}) == len(cells)
    # order: block by block, inputs axes outer, block axes inner
    assert [c.description for c in cells[:3]] == [
        "RFA num_features=16 sampler=iid norm=0.5",
        "RFA num_features=16 sampler=orthogonal norm=0.5",
        "RFA num_features=32 sampler=iid norm=0.5",
    ]
    assert spec.replicates == 200 and spec.device == "cpu" and spec.dtype == "float32" and spec.seed == 0


def test_seeds_are_shared_by_estimators_on_the_same_inputs():
    cells = parse_spec(base()).cells()
    by_norm = {}
    for c in cells:
        by_norm.setdefault(c.inputs["norm"], set()).add((c.input_seed, c.mc_seed))
    assert len(by_norm[0.5]) == 1 and len(by_norm[1.0]) == 1  # one (input, MC) seed pair per input
    assert by_norm[0.5] != by_norm[1.0]
    (seed_in, seed_mc), = by_norm[0.5]
    key = {"kind": "gaussian", "seq_len": 16, "d": 8, "dv": None, "batch": [], "norm": 0.5, "key_len": None,
           "mode": "gaussian", "clusters": 4, "spread": 0.3, "scale": None}
    assert seed_in == derive_seed(0, "inputs", key)
    assert seed_mc == derive_seed(0, "monte_carlo", {**key, "seed": seed_in})
    assert 0 <= seed_in < 2**63 and 0 <= seed_mc < 2**63


def test_explicit_input_seed_and_spec_seed():
    raw = base()
    raw["inputs"]["seed"] = [3, 4]
    cells = parse_spec(raw).cells()
    assert len(cells) == 2 * 2 * 4
    assert {c.input_seed for c in cells} == {3, 4}
    raw2 = base()
    raw2["seed"] = 1
    a, b = parse_spec(base()).cells(), parse_spec(raw2).cells()
    assert {c.cell_id for c in a}.isdisjoint(c.cell_id for c in b)
    assert {c.mc_seed for c in a}.isdisjoint(c.mc_seed for c in b)


def test_cell_ids_do_not_depend_on_order_or_other_cells():
    raw = base()
    shuffled = copy.deepcopy(raw)
    shuffled["estimators"].reverse()
    shuffled["estimators"][1]["num_features"] = [8, 4]
    shuffled["inputs"]["norm"] = [1.0, 0.5]
    shuffled["inputs"] = dict(reversed(list(shuffled["inputs"].items())))
    a = {c.cell_id: c for c in parse_spec(raw).cells()}
    b = {c.cell_id: c for c in parse_spec(shuffled).cells()}
    assert a.keys() == b.keys()
    assert all((a[i].mc_seed, a[i].input_seed, a[i].key) == (b[i].mc_seed, b[i].input_seed, b[i].key) for i in a)
    grown = copy.deepcopy(raw)
    grown["estimators"][0]["num_features"] = [4, 8, 16]
    grown["inputs"]["norm"] = [0.5, 1.0, 2.0]
    ids = {c.cell_id for c in parse_spec(grown).cells()}
    assert set(a) < ids and len(ids) == 3 * 3 + 3 * 2


def test_int_for_float_parameter_is_the_same_cell():
    a, b = base(), base()
    a["inputs"]["norm"], b["inputs"]["norm"] = 1, 1.0
    assert [c.cell_id for c in parse_spec(a).cells()] == [c.cell_id for c in parse_spec(b).cells()]
    assert parse_spec(a).cells()[0].inputs["norm"] == 1.0 and isinstance(parse_spec(a).cells()[0].inputs["norm"], float)  # exact: a spec value, coerced from int


def test_key_covers_label_dtype_replicates_and_matrix():
    ids = {c.cell_id for c in parse_spec(base()).cells()}
    for change in ({"replicates": 5}, {"dtype": "float64"}, {"matrix": False}):
        raw = {**base(), **change}
        assert ids.isdisjoint(c.cell_id for c in parse_spec(raw).cells()), change
    raw = base()
    raw["estimators"][0]["label"] = "RFA"
    assert len(ids & {c.cell_id for c in parse_spec(raw).cells()}) == 4  # only the EVA cells stay
    # device and memory budget do not change results, so they do not change the cells
    raw = {**base(), "device": "cuda", "max_memory_gb": 0.5}
    assert ids == {c.cell_id for c in parse_spec(raw).cells()}


def test_wrapped_list_is_one_value():
    raw = base()
    raw["inputs"]["batch"] = [[2], [1, 2]]
    cells = parse_spec(raw).cells()
    assert len(cells) == 2 * 2 * 4
    assert {c.inputs["batch"] for c in cells} == {(2,), (1, 2)}


def test_overlapping_blocks_run_shared_cells_once():
    raw = base()
    raw["estimators"] = [{"name": "eva", "window": [4, 8], "chunk_size": 4}, {"name": "eva", "window": 8, "chunk_size": [2, 4]}]
    cells = parse_spec(raw).cells()
    assert len(cells) == 2 * 3
    assert sorted((c.params["window"], c.params["chunk_size"]) for c in cells if c.inputs["norm"] == 0.5) == [(4, 4), (8, 2), (8, 4)]  # exact: spec values, filtered on


def test_invalid_combination_is_a_cell_error_not_a_spec_error():
    raw = base()
    raw["estimators"] = [{"name": "eva", "window": [6, 8], "chunk_size": 4}, {"name": "rfa", "sampler": ["iid", "sobol"]}]
    cells = parse_spec(raw).cells()
    bad = {(c.estimator, c.description): c.error for c in cells if c.error}
    assert len(cells) == 8 and len(bad) == 4
    assert bad["eva", "eva window=6 norm=0.5"].startswith("ValueError: window=6 must be a multiple of chunk_size=4")
    assert "sampler='sobol'" in bad["rfa", "rfa sampler=sobol norm=1.0"]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda r: r.pop("name"), r"^name: missing"),
        (lambda r: r.pop("replicates"), r"^replicates: missing"),
        (lambda r: r.pop("inputs"), r"^inputs: missing"),
        (lambda r: r.pop("estimators"), r"^estimators: missing"),
        (lambda r: r.update(name=""), r"^name: ''"),
        (lambda r: r.update(colour="red"), r"^colour: unknown top-level key; valid keys: name, description, replicates"),
        (lambda r: r.update(replicates=[4, 8]), r"^replicates: \[4, 8\] is a list"),
        (lambda r: r.update(replicates=1), r"^replicates: 1 must be an integer >= 2"),
        (lambda r: r.update(seed=[0, 1]), r"^seed: \[0, 1\] is a list"),
        (lambda r: r.update(seed=-1), r"^seed: -1 must be an integer >= 0"),
        (lambda r: r.update(dtype="float16"), r"^dtype: 'float16' is not supported; expected one of 'float32', 'float64'"),
        (lambda r: r.update(device="tpu"), r"^device: 'tpu' is not a supported device; expected one of 'cpu', 'cuda'"),
        (lambda r: r.update(max_memory_gb=0), r"^max_memory_gb: 0 must be a positive number"),
        (lambda r: r.update(matrix="yes"), r"^matrix: 'yes' must be true or false"),
        (lambda r: r["inputs"].pop("kind"), r"^inputs\.kind: missing \(required\); expected one of 'gaussian'"),
        (lambda r: r["inputs"].update(kind="imagenet"), r"^inputs\.kind: 'imagenet' is not a registered inputs kind; expected one of 'gaussian'"),
        (lambda r: r["inputs"].update(nrom=1.0), r"^inputs\.nrom: unknown parameter of inputs kind 'gaussian'; its parameters: seq_len, d, dv, batch, norm"),
        (lambda r: r["inputs"].update(dtype="float64"), r"^inputs\.dtype: 'float64'; set dtype at the top level"),
        (lambda r: r["inputs"].update(device="cpu"), r"^inputs\.device: 'cpu'; set device at the top level"),
        (lambda r: r["inputs"].update(norm=[]), r"^inputs\.norm: empty list \[\]"),
        (lambda r: r["inputs"].update(seed=[1, -2]), r"^inputs\.seed: -2 must be an integer >= 0"),
        (lambda r: r["inputs"].update(norm={"a": 1}), r"^inputs\.norm: \{'a': 1\} \(dict\) is not a supported value"),
        (lambda r: r.update(estimators=[]), r"^estimators: \[\] must be a non-empty array of tables"),
        (lambda r: r["estimators"][1].pop("name"), r"^estimators\[1\]\.name: missing \(required\); expected one of 'softmax', 'rfa', 'eva', 'control_variates'"),
        (lambda r: r["estimators"][0].update(name="rfx"), r"^estimators\[0\]\.name: 'rfx' is not a registered estimator; expected one of 'softmax', 'rfa', 'eva', 'control_variates'"),
        (lambda r: r["estimators"][1].update(chunk_size=[]), r"^estimators\[1\]\.chunk_size: empty list \[\]"),
        (lambda r: r["estimators"][0].update(num_feature=8), r"^estimators\[0\]\.num_feature: unknown parameter of estimator 'rfa'; its parameters: num_features, feature_map, sampler, causal, eps, scale"),
        (lambda r: r["estimators"][0].update(replicates=8), r"^estimators\[0\]\.replicates: unknown parameter of estimator 'rfa' \(replicates and seed are top-level keys\)"),
        (lambda r: r["estimators"][1].update(label=3), r"^estimators\[1\]\.label: 3 must be a non-empty string"),
    ],
)
def test_validation_errors_name_the_key_path(edit, match):
    raw = base()
    edit(raw)
    with pytest.raises(SpecError, match=match):
        parse_spec(raw)


def test_errors_from_files_name_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(EXAMPLE.replace('dtype = "float32"', 'dtype = "half"'))
    with pytest.raises(SpecError, match=r"bad\.toml: dtype: 'half' is not supported"):
        load_spec(path)
    path.write_text("name = ")
    with pytest.raises(SpecError, match=r"bad\.toml: not valid TOML"):
        load_spec(path)
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        load_spec(tmp_path / "missing.toml")
    assert issubclass(SpecError, ValueError)


def test_toml_rendering_round_trips():
    spec = parse_spec(base())
    again = parse_spec(render_toml(spec.to_dict()))
    assert again.hash == spec.hash
    assert [c.cell_id for c in again.cells()] == [c.cell_id for c in spec.cells()]
    # the hash ignores formatting and comments of the TOML text
    assert parse_spec(EXAMPLE).hash == parse_spec("# comment\n" + EXAMPLE.replace("seed = 0\n", "seed = 0   # again\n")).hash


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_specs_are_valid(path):
    spec = load_spec(path)
    cells = spec.cells()
    assert spec.name == path.stem
    assert all(c.error is None for c in cells), [c.description for c in cells if c.error]
    assert len(cells) <= 64


def test_shipped_spec_sizes():
    expected = {"smoke": 10, "gap_vs_features": 39, "gap_vs_seq_len": 24, "bias_variance": 39, "input_norm": 64,
                "eva_ablation": 26}
    assert {name: len(load_spec(SWEEPS / f"{name}.toml").cells()) for name in expected} == expected
