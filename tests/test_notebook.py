"""Execute demo/run_fractalgen.ipynb top to bottom on the CPU against a tiny local checkpoint
(FRACTALGEN_CKPT), so the notebook cannot silently rot and nothing is downloaded."""
import argparse
import os

import pytest
import torch

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "demo", "run_fractalgen.ipynb")


def write_tiny_checkpoint(path, name="fractalar_tiny", class_num=4):
    from models import create_model
    torch.manual_seed(0)
    model = create_model(name, class_num=class_num)
    torch.save({"model": model.state_dict(), "epoch": 0,
                "args": argparse.Namespace(model=name, class_num=class_num, num_conds=None, guiding_pixel=None)}, path)
    return path


def outputs_of(nb, mime):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
            if mime in o.get("data", {})]


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, name_in_env", [("fractalar_tiny", True), ("fractalmar_tiny", False)])
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch, name, name_in_env):
    ckpt = write_tiny_checkpoint(str(tmp_path / "checkpoint-last.pth"), name)
    monkeypatch.setenv("FRACTALGEN_CKPT", ckpt)
    if name_in_env:
        monkeypatch.setenv("FRACTALGEN_MODEL", name)
    else:  # the architecture is read from the checkpoint's args
        monkeypatch.delenv("FRACTALGEN_MODEL", raising=False)
    monkeypatch.setenv("FRACTALGEN_NUM_IMAGES", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the CPU path, as in CI
    # a download attempt would fail loudly instead of reaching the network
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.join(REPO, "demo")}})
    client.execute()  # raises CellExecutionError naming the failing cell
    assert len(outputs_of(nb, "image/png")) >= 2  # samples, conditional grid
    assert len(outputs_of(nb, "image/gif")) == 1  # the generation animation
    assert not os.path.exists(os.path.join(REPO, "pretrained_models", name))
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"{name}: " in text
    for task in ("inpaint", "outpaint", "uncrop", "edit"):
        assert task in text
