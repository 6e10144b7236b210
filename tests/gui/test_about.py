"""Help > About model: the held-out numbers shown are the shipped checkpoint's test evaluation."""

from __future__ import annotations

import json

from crystalstudio.core.checkpoint import load_checkpoint
from crystalstudio.gui.about import about_model_html
from crystalstudio.session import ASSETS


def test_about_shows_the_test_evaluation_beside_the_default():
    model = load_checkpoint(ASSETS / "unit_cell.safetensors")
    shipped = json.loads((ASSETS / "unit_cell.metrics.json").read_text())
    text = about_model_html(model)
    assert "Held-out metrics (test)" in text
    assert f"<td>atoms_within_tol&nbsp;&nbsp;</td><td>{shipped['atoms_within_tol']:.4g}</td>" in text
    assert f"<td>exact_count&nbsp;&nbsp;</td><td>{shipped['exact_count']:.4g}</td>" in text
    model.path = None  # an in-memory model has only its metadata's measures
    own = model.info["metrics"]
    text = about_model_html(model)
    assert f"Held-out metrics ({own['split']})" in text
    assert f"<td>atoms_within_tol&nbsp;&nbsp;</td><td>{own['atoms_within_tol']:.4g}</td>" in text
