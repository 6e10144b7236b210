"""The Help > About model text: what the loaded checkpoint is and how well it does."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from ..core.checkpoint import held_out_measures

if TYPE_CHECKING:
    from ..core.checkpoint import CrystalModel

__all__ = ["about_model_html"]


def about_model_html(model: CrystalModel | None) -> str:
    """HTML description of ``model``: checkpoint, grid, training data, held-out metrics (its
    test evaluation beside the file where there is one,
    :func:`~crystalstudio.core.checkpoint.held_out_measures`, else its metadata's).

    Args:
        model: the loaded :class:`~crystalstudio.core.checkpoint.CrystalModel`, or None
            when none is loaded (the text then says how to open a checkpoint).
    """
    if model is None:
        return "<p>No model is loaded. Use <i>File &gt; Open checkpoint…</i>.</p>"
    info = model.info
    esc = lambda v: html.escape(str(v))  # noqa: E731
    g = model.grid
    rows = [("Checkpoint", model.path if model.path else "(in memory)"),
            ("Representation", info.get("representation")),
            ("Grid", f"{g.n}³ voxels, {g.length:g} Å cube, σ = {g.sigma:g} Å"),
            ("Latent size", model.latent),
            ("Species classes", len(info.get("classes", [])))]
    for k in ("beta", "gamma"):
        if k in info:
            rows.append((k, info[k]))
    tr = info.get("training") or {}
    counts = [f"{tr[k]} {k[2:]}" for k in ("n_train", "n_val", "n_test") if k in tr]
    if counts:
        rows.append(("Training data", ", ".join(counts) + " crystals"))
    if tr.get("sources"):
        src = tr["sources"]
        rows.append(("Sources", ", ".join(map(str, src)) if isinstance(src, (list, tuple)) else src))
    for k, label in (("steps", "Steps"), ("samples", "Samples seen"), ("seconds", "Training time (s)"),
                     ("device", "Device"), ("note", "Note")):
        if k in tr:
            rows.append((label, tr[k]))
    text = "<table>" + "".join(f"<tr><td><b>{esc(k)}</b>&nbsp;&nbsp;</td><td>{esc(v)}</td></tr>"
                               for k, v in rows) + "</table>"
    metrics = held_out_measures(model.path, info) if model.path else info.get("metrics")
    if metrics:
        split = metrics.get("split", "held-out")
        text += f"<p><b>Held-out metrics ({esc(split)})</b></p><table>"
        for k, v in metrics.items():
            if k == "split" or isinstance(v, (dict, list)):
                continue
            val = f"{v:.4g}" if isinstance(v, float) else v
            text += f"<tr><td>{esc(k)}&nbsp;&nbsp;</td><td>{esc(val)}</td></tr>"
        text += "</table>"
    else:
        text += "<p><i>No held-out metrics in this checkpoint (untrained or unevaluated model).</i></p>"
    return text
