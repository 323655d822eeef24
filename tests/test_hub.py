"""Hub folders (models.hub): save_pretrained / from_pretrained / push_to_hub, load_model and
demo/sample.py on a folder or an `hf-hub:` id, `python -m util.export`, and downloads
through huggingface_hub from a stand-in Hub on 127.0.0.1 (tests/hub_server.py): no test
touches the network."""
import argparse
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import models
from hub_server import COMMIT, FakeHub
from models import FractalGen, create_model, load_model
from models.hub import FOLDER_KEYS, WEIGHTS, folder_config
from util import export
from util.misc import UserInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ("fractalar_tiny", "fractalmar_tiny")
OFFICIAL = ("fractalar_in64", "fractalmar_in64", "fractalmar_base_in256", "fractalmar_large_in256",
            "fractalmar_huge_in256")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per test


def official_checkpoint(path, name, class_num=None, **state):
    """A checkpoint as the official code writes it (args Namespace, no configuration record),
    random weights."""
    torch.manual_seed(0)
    model = create_model(name, **({"class_num": class_num} if class_num else {}))
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model=name), "epoch": 3, **state}, path)
    return str(path)


def outputs(model, seed=0):
    """What a model computes: its NLL of fixed images (eval) and seeded samples."""
    g = torch.Generator().manual_seed(seed)
    size, labels = model.img_size, torch.arange(2) % model.class_num
    imgs = torch.randn(2, 3, size, size, generator=g)
    torch.manual_seed(seed)
    with torch.no_grad():
        nll = model.eval()(imgs, labels)
    torch.manual_seed(seed)
    return nll, model.generate(labels, num_iter_list=(4, 2))


def same_outputs(a, b):
    (nll_a, img_a), (nll_b, img_b) = outputs(a), outputs(b)
    return torch.equal(nll_a, nll_b) and torch.equal(img_a, img_b)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def one_line_error(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# ---------------------------------------------------------------------- the folder
@pytest.mark.parametrize("name", TINY)
def test_save_pretrained_writes_the_record_and_loads_back_strictly(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, class_num=3)
    model.sampling_defaults = dict(cfg=1.5, temperature=1.3)  # as a checkpoint's stored settings would be
    folder = tmp_path / "folder"
    model.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config == folder_config(model)
    # one format: the configuration record checkpoints store under 'config', with the settings generate() uses
    record = {k: v for k, v in config.items() if k not in FOLDER_KEYS}
    assert {k: v for k, v in record.items() if k != "sampling"} == \
        {k: v for k, v in model.config.items() if k != "sampling"}
    assert record["class_num"] == 3 and record["sampling"]["cfg"] == 1.5 and record["sampling"]["temperature"] == 1.3
    assert config["model_name"] == name and config["weights"] == "raw"
    assert create_model(record).config["embed_dim_list"] == model.config["embed_dim_list"]
    card = (folder / "README.md").read_text()
    assert "library_name: fractalgen" in card and "the trained weights" in card and "hf-hub:" in card
    assert set(load_file(folder / "model.safetensors")) == set(model.state_dict())
    for loaded in (FractalGen.from_pretrained(folder), load_model(str(folder))):
        assert same_weights(model, loaded) and same_outputs(model, loaded)
        assert loaded.model_name == name and loaded.weights == "raw"
        assert loaded.sampling_config() == model.sampling_config()


def test_a_folder_that_does_not_build_its_weights_is_refused_with_one_line(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "f"
    create_model("fractalar_tiny", class_num=3).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    cases = [({"class_num": 4}, "does not build the weights in model.safetensors (1 shape mismatch(es): "
                                "class_emb.weight checkpoint [3, 64] vs model [4, 64])"),
             ({"num_blocks_list": [3, 1, 1]}, "does not build the weights in model.safetensors"),
             ({"generator_type_list": ["mar", "mar", "ar"]}, "does not build the weights"),
             ({"embed_dim": 8}, "unknown key 'embed_dim'"),
             ({"weights": "best"}, "weights must be one of ema, raw"),
             ({"sampling": {"cfg": -1}}, "sampling cfg must be a finite number of 0 or more")]
    for change, message in cases:
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserInputError) as e:
            load_model(str(folder))
        assert message in one_line_error(e) and str(folder) in str(e.value)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserInputError, match="config.json is not valid JSON"):  # models.config's own check
        load_model(str(folder))
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match="its config.json says what model it is; leave out --model"):
        load_model(str(folder), model="fractalar_tiny")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(UserInputError, match="cannot read .*model.safetensors .truncated or not a safetensors"):
        load_model(str(folder))
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserInputError, match="has no model.safetensors"):
        load_model(str(folder))


@pytest.mark.parametrize("name", OFFICIAL)
def test_every_official_configuration_round_trips_its_record_on_meta(name):
    """config.json of each official model rebuilds exactly its tensors (names and shapes);
    the weights themselves: test_export_every_official_configuration (slow)."""
    from models.config import build, check_config
    with torch.device("meta"):
        model = create_model(name)
        config = json.loads(json.dumps(folder_config(model)))  # through JSON, as the file holds it
        rebuilt = build(check_config({k: v for k, v in config.items() if k not in FOLDER_KEYS}))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in rebuilt.state_dict().items()}


# ---------------------------------------------------------------------- util.export
@pytest.mark.parametrize("name", TINY)
def test_export_official_and_our_checkpoints_gives_the_same_model(name, tmp_path, capsys):
    ours = tmp_path / "ours.pth"
    torch.manual_seed(1)
    model = create_model(name, class_num=5)
    torch.save({"model": model.state_dict(), "config": model.config, "sampling": dict(cfg=2.5, temperature=1.7)},
               ours)
    for ckpt in (official_checkpoint(tmp_path / "official.pth", name, class_num=5), str(ours)):
        out = tmp_path / f"out-{os.path.basename(ckpt)}"
        export.main([ckpt, str(out)])
        assert f"wrote {out}" in capsys.readouterr().out
        original, exported = load_model(ckpt), load_model(str(out))
        assert same_weights(original, exported) and same_outputs(original, exported)
        assert exported.sampling_config() == original.sampling_config()
        # the record; config.json's 'sampling' holds the settings the checkpoint samples with
        assert {k: v for k, v in exported.config.items() if k != "sampling"} == \
            {k: v for k, v in original.config.items() if k != "sampling"}
    assert load_model(str(tmp_path / "out-ours.pth")).sampling_config()["cfg"] == 2.5
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # written beside, renamed into place


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", OFFICIAL)
def test_export_every_official_configuration(name, tmp_path):
    """An official checkpoint of random weights at its real size (up to 850M parameters,
    3.4 GB) exports to a folder that loads into the same weights and computes the same NLL.
    One model in memory at a time (the export maps the checkpoint instead of reading it)."""
    import gc
    torch.manual_seed(0)
    model = create_model(name)
    nll = outputs_nll(model)
    sample = {k: v.clone() for k, v in list(model.state_dict().items())[::25]}
    ckpt = tmp_path / "checkpoint-last.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model=name), "epoch": 799}, ckpt)
    del model
    gc.collect()
    export.main([str(ckpt), str(tmp_path / "out")])
    gc.collect()
    exported = load_model(str(tmp_path / "out"))
    assert exported.model_name == name and exported.config == load_model_config(name)
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in sample.items())
    assert torch.equal(outputs_nll(exported), nll)


def load_model_config(name):
    with torch.device("meta"):
        return create_model(name).config


def outputs_nll(model):
    """The eval NLL of one fixed random image."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(1, 3, model.img_size, model.img_size, generator=g)
    torch.manual_seed(0)
    with torch.no_grad():
        return model.eval()(imgs, torch.tensor([1]))


class RunsCode:
    """Unpickling this runs a shell command: what weights_only=True exists to refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_export_refuses_what_weights_only_does_not_allow_and_bad_flags(tmp_path):
    ckpt = tmp_path / "evil.pth"
    model = create_model("fractalar_tiny", class_num=2)
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model="fractalar_tiny"),
                "extra": RunsCode(tmp_path / "ran")}, ckpt)
    with pytest.raises(SystemExit, match="error: refusing to load checkpoint .*evil.pth: it holds objects other than tensors"):
        export.main([str(ckpt), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() and not (tmp_path / "ran").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    with pytest.raises(SystemExit, match="taken already exists; pass a new folder"):
        export.main([official_checkpoint(tmp_path / "ok.pth", "fractalar_tiny"), str(tmp_path / "taken")])
    with pytest.raises(SystemExit, match="--time_load must be at least 1"):
        export.main([str(tmp_path / "ok.pth"), str(tmp_path / "new"), "--time_load", "-1"])
    assert (tmp_path / "taken" / "x").read_text() == "mine" and not (tmp_path / "new").exists()


def test_export_takes_the_ema_weights_and_says_so(tmp_path):
    torch.manual_seed(0)
    raw, ema = create_model("fractalar_tiny", class_num=2), create_model("fractalar_tiny", class_num=2)
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"model": raw.state_dict(), "model_ema": ema.state_dict(), "config": raw.config}, ckpt)
    export.main([str(ckpt), str(tmp_path / "ema")])
    export.main([str(ckpt), str(tmp_path / "raw"), "--no_ema"])
    for kind, source in (("ema", ema), ("raw", raw)):
        folder = tmp_path / kind
        assert json.loads((folder / "config.json").read_text())["weights"] == kind
        assert WEIGHTS[kind] in (folder / "README.md").read_text()
        loaded = load_model(str(folder))
        assert loaded.weights == kind and same_weights(loaded, source)
    with pytest.raises(UserInputError, match="holds only EMA weights .*leave out --no_ema"):
        load_model(str(tmp_path / "ema"), ema=False)
    assert load_model(str(tmp_path / "raw"), ema=False).weights == "raw"


def test_export_time_load_prints_both_loads(tmp_path, capsys):
    export.main([official_checkpoint(tmp_path / "c.pth", "fractalar_tiny"), str(tmp_path / "o"), "--time_load", "2"])
    printed = capsys.readouterr().out
    assert "load_model, checkpoint (.pth): median" in printed and "over 2 loads" in printed
    assert "load_model, Hub folder (.safetensors): median" in printed


# ---------------------------------------------------------------------- the Hub, on 127.0.0.1
@pytest.fixture
def exported(tmp_path_factory):
    """An exported tiny folder and the model it holds."""
    folder = tmp_path_factory.mktemp("hub") / "tiny"
    torch.manual_seed(0)
    model = create_model("fractalmar_tiny", class_num=3)
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture
def hub(exported, tmp_path, monkeypatch):
    """A stand-in Hub serving the folder as user/tiny (and user/half without its weights);
    HF_ENDPOINT points at it, huggingface_hub's cache is a fresh folder."""
    from huggingface_hub import constants
    folder, _ = exported
    files = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    repos = {"user/tiny": files, "user/half": {"config.json": files["config.json"]}}
    with FakeHub(repos) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        yield server


def test_a_hub_id_downloads_through_huggingface_hub(hub, exported):
    _, model = exported
    for source in ("hf-hub:user/tiny", f"hf-hub:user/tiny@{COMMIT}"):
        loaded = load_model(source)
        assert same_weights(model, loaded) and loaded.model_name == "fractalmar_tiny"
    assert same_weights(model, FractalGen.from_pretrained("user/tiny"))
    assert ("GET", "/user/tiny/resolve/main/model.safetensors") in hub.requests
    cases = {"hf-hub:user/nope": "Hub repository user/nope was not found at http://127.0.0.1:",
             "hf-hub:user/half": "Hub repository user/half has no model.safetensors: it is not a FractalGen Hub folder",
             "hf-hub:user/tiny@v9": "Hub repository user/tiny has no revision 'v9'",
             "hf-hub:not a/valid id": "'not a/valid id' is not a Hub repository id"}
    for source, message in cases.items():
        with pytest.raises(UserInputError) as e:
            load_model(source)
        assert message in one_line_error(e)


def test_offline_a_cached_model_loads_and_an_uncached_one_fails_at_once(hub, exported, monkeypatch):
    from huggingface_hub import constants
    load_model("hf-hub:user/tiny")  # now in the cache
    hub.__exit__()  # the Hub goes away: connections to it are refused
    start = time.perf_counter()
    assert same_weights(exported[1], load_model("hf-hub:user/tiny"))
    with pytest.raises(UserInputError) as e:
        load_model("hf-hub:user/other")
    assert time.perf_counter() - start < 10  # huggingface_hub alone retries for ~25 s
    assert f"cannot reach the Hub at {hub.url} (Connection refused) and user/other is not in the local cache" in \
        one_line_error(e)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserInputError) as e:
        load_model("hf-hub:user/other")
    assert "HF_HUB_OFFLINE is set and user/other (config.json) is not in the local cache" in one_line_error(e)
    assert same_weights(exported[1], load_model("hf-hub:user/tiny"))


def test_sample_cli_takes_a_hub_id(hub, tmp_path, child_env):
    """The command line end to end: HF_ENDPOINT and HF_HOME from the environment, as a user sets them."""
    env = dict(child_env, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"))
    env.pop("HF_HUB_OFFLINE", None)
    out = tmp_path / "samples.png"
    run = subprocess.run([sys.executable, "demo/sample.py", "--ckpt", "hf-hub:user/tiny", "--labels", "0", "2",
                          "--num_iter_list", "2,2", "--output", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and out.is_file(), run.stderr
    assert ("GET", "/user/tiny/resolve/main/model.safetensors") in hub.requests
    run = subprocess.run([sys.executable, "demo/sample.py", "--ckpt", "hf-hub:user/nope", "--output", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"error: Hub repository user/nope was not found at {hub.url}; check the id")


def test_push_to_hub_uploads_the_folder(exported, monkeypatch, tmp_path, capsys):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl
    folder, model = exported
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.append((repo_id, {name: open(os.path.join(folder_path, name), "rb").read()
                                  for name in sorted(os.listdir(folder_path))}))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model.push_to_hub("user/pushed")
    repo_id, files = uploads[-1]
    assert repo_id == "user/pushed" and sorted(files) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads(files["config.json"]) == folder_config(model)
    # util.export --push_to_hub uploads the folder it wrote (the stand-in Hub answers the reachability check)
    with FakeHub({}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        ckpt = official_checkpoint(tmp_path / "c.pth", "fractalar_tiny")
        export.main([ckpt, str(tmp_path / "out"), "--push_to_hub", "user/exported"])
    repo_id, files = uploads[-1]
    assert repo_id == "user/exported" and files["config.json"] == (tmp_path / "out" / "config.json").read_bytes()
    assert "load it anywhere with models.load_model('hf-hub:user/exported')" in capsys.readouterr().out
