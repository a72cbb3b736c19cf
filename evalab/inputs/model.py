"""The sweep inputs kind ``"model"``: a pretrained model run end to end with the cell's estimator in place of
its attention (evalab.model_gap). Its parameters name the model and the texts; the sweep runner sends cells of
this kind to ``evalab.model_gap.sweep_row`` instead of the Monte-Carlo engine."""
from __future__ import annotations

from .. import _checks

MODELS = ("minilm",)
SPLITS = ("train", "heldout")


def model_inputs(model: str = "minilm", texts: int = 16, layers="all", call_replicates: int = 0,
                 seq_len: int | None = None, split: str = "heldout") -> dict:
    """Checked settings of a "model" cell: ``model`` by name ("minilm": all-MiniLM-L6-v2, offline), ``texts`` the
    number of shipped sentences, or with ``seq_len`` the number of passages of exactly seq_len tokens of
    ``split`` ("train" or "heldout", evalab.inputs.passages), ``layers`` "all" or one attention layer index,
    ``call_replicates`` > 0 adds the per-call rel_mse on the model's own q, k, v (see evalab.model_gap.model_gap)."""
    _checks.choice("model", model, MODELS)
    _checks.integer("texts", texts, minimum=3)
    if layers != "all":
        _checks.integer("layers", layers, minimum=0)
    _checks.integer("call_replicates", call_replicates, minimum=0)
    if seq_len is not None:
        _checks.integer("seq_len", seq_len, minimum=3)
    _checks.choice("split", split, SPLITS)
    return {"model": model, "texts": texts, "layers": layers, "call_replicates": call_replicates,
            "seq_len": seq_len, "split": split}
