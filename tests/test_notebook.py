"""Execute demo/run_fractalgen.ipynb top to bottom on the CPU against a tiny local checkpoint
(FRACTALGEN_CKPT), so the notebook cannot silently rot and nothing is downloaded."""
import argparse
import os
import shutil
import subprocess
import sys

import pytest
import torch

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "demo", "run_fractalgen.ipynb")


def write_tiny_checkpoint(path, name="fractalar_tiny", class_num=4, sampling=None):
    from models import create_model
    torch.manual_seed(0)
    model = create_model(name, class_num=class_num)
    state = {"model": model.state_dict(), "epoch": 0,
             "args": argparse.Namespace(model=name, class_num=class_num, num_conds=None, guiding_pixel=None)}
    if sampling is not None:
        state["sampling"] = sampling
    torch.save(state, path)
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
    # the second checkpoint stores sampling settings, as the quick start's does
    stored = None if name_in_env else dict(num_iter_list=(16, 4), cfg=1.5, cfg_schedule="linear", temperature=1.25,
                                           filter_threshold=1e-4)
    ckpt = write_tiny_checkpoint(str(tmp_path / "checkpoint-last.pth"), name, sampling=stored)
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
    stderr = [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("name") == "stderr"]
    assert not stderr  # no warnings in a fresh notebook (e.g. tqdm's about missing ipywidgets)
    assert not os.path.exists(os.path.join(REPO, "pretrained_models", name))
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"{name}: " in text
    for task in ("inpaint", "outpaint", "uncrop", "edit"):
        assert task in text
    from models import DEFAULT_SAMPLING
    expected = stored or {**DEFAULT_SAMPLING[name], "num_iter_list": (16, 16)}
    assert f"'cfg': {expected['cfg']}" in text and f"'temperature': {expected['temperature']}" in text
    assert str(expected["num_iter_list"]) in text


def code_repo(dst):
    """A git repository of this working tree's code (committed or not): what the notebook
    clones when it runs outside a clone, without any network."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split("\n")
    for rel in listed:
        if rel and not rel.startswith("tests/") and os.path.isfile(os.path.join(REPO, rel)):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy2(os.path.join(REPO, rel), os.path.join(dst, rel))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "code"]):
        subprocess.run(git + args, cwd=dst, check=True, capture_output=True)
    return dst


def setup_cells(extra=()):
    """The notebook's setup cell (and its introduction) with `extra` code cells after it."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = nb.cells[:2] + [nbformat.v4.new_code_cell(code) for code in extra]
    return nb


def run_outside_a_clone(nb, folder, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip may only find the requirements installed already
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(folder)}})
    client.execute()
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.timeout(300)
def test_notebook_outside_a_clone_sets_itself_up(tmp_path, monkeypatch):
    if shutil.which("git") is None or not os.path.exists(os.path.join(REPO, ".git")):
        pytest.skip("needs git and a git checkout")
    repo = code_repo(str(tmp_path / "repo"))
    colab = tmp_path / "content"  # where Colab opens a notebook: no clone around it
    colab.mkdir()
    monkeypatch.setenv("FRACTALGEN_REPO_URL", "file://" + repo)
    nb = setup_cells(["import models; print('models from', models.__file__)"])
    text = run_outside_a_clone(nb, colab, monkeypatch)
    assert f"models from {colab / 'fractalgen' / 'models' / '__init__.py'}" in text
    assert (colab / "fractalgen" / ".git").is_dir()


@pytest.mark.timeout(300)
def test_notebook_outside_a_clone_without_url_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("FRACTALGEN_REPO_URL", raising=False)
    with pytest.raises(nbclient.exceptions.CellExecutionError) as e:
        run_outside_a_clone(setup_cells(), tmp_path, monkeypatch)
    assert "set REPO_URL in the first cell" in str(e.value)
    assert os.listdir(tmp_path) == []
