"""Where sampling settings come from (models.sampling): a sweep's or the quick start's stored
settings, a trained checkpoint's (the training run's flags, else neutral cfg 1 /
temperature 1, not the named model's defaults tuned on other data), the model's defaults;
sampling_origins() per value, the one-line note that a sweep picks better settings, what
--evaluate_gen / --online_eval sample with, and stored settings kept across training saves."""
import argparse
import os

import pytest
import torch

import engine_fractalgen
import main_fractalgen
from demo import sample
from models import DEFAULT_SAMPLING, create_model, load_model
from models import sampling as provenance
from util import checkpoint as ckpt_util

TINY = "fractalar_tiny"
SWEPT = {"cfg": 2.5, "temperature": 0.7, "num_iter_list": [2, 2], "cfg_schedule": "constant",
         "filter_threshold": 1e-4}


def sweep_source(epoch, step=0, fid=12.3456):
    return {"by": provenance.BY_SWEEP, "fid": fid, "num_images": 40, "epoch": epoch, "step": step}


def write_ckpt(path, model, **entries):
    """A checkpoint as main_fractalgen.py writes it (config record, train_state), or without
    them (official files) when entries say config=None."""
    state = {"model": model.state_dict(), "epoch": 4, "args": argparse.Namespace(model=TINY),
             "config": model.config, "train_state": {"epoch": 5, "step": 0}, **entries}
    ckpt_util.save_checkpoint({k: v for k, v in state.items() if v is not None}, str(path))
    return str(path)


def train_argv(data, out, *extra, epochs=1):
    """fractalar_tiny on the 12 tiny images, batch 4: 3 steps an epoch."""
    return ["--model", TINY, "--data_path", data, "--output_dir", out, "--resume", out, "--device", "cpu",
            "--batch_size", 4, "--epochs", epochs, "--warmup_epochs", 1, "--save_last_freq", 1, "--num_workers", 0,
            *extra]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model(TINY, class_num=2)


# ---------------------------------------------------------------------- where each value comes from
def test_an_official_checkpoint_samples_with_the_models_defaults_and_says_so(model, tmp_path):
    path = write_ckpt(tmp_path / "official.pth", model, config=None, train_state=None)
    loaded = load_model(path)
    defaults = {k: tuple(v) if isinstance(v, list) else v for k, v in DEFAULT_SAMPLING[TINY].items()}
    assert {k: loaded.sampling_config()[k] for k in defaults} == defaults
    origins = loaded.sampling_origins()
    assert origins["cfg"] == origins["temperature"] == {"by": "model", "model": TINY}
    assert f"({TINY}'s defaults)" in loaded.describe_sampling()
    assert loaded.sampling_note() is None  # the settings it was published with


def test_a_trained_checkpoint_gets_neutral_cfg_and_temperature_not_defaults_tuned_elsewhere(model, tmp_path):
    assert DEFAULT_SAMPLING[TINY]["cfg"] != 1.0 and DEFAULT_SAMPLING[TINY]["temperature"] != 1.0
    path = write_ckpt(tmp_path / "checkpoint-last.pth", model)
    loaded = load_model(path)
    settings, origins = loaded.sampling_config(), loaded.sampling_origins()
    assert (settings["cfg"], settings["temperature"]) == (1.0, 1.0)
    assert origins["cfg"]["by"] == origins["temperature"]["by"] == "neutral"
    # the rest (iterations, schedule, threshold) are not data-dependent: the model's
    assert settings["num_iter_list"] == tuple(DEFAULT_SAMPLING[TINY]["num_iter_list"])
    assert origins["num_iter_list"] == {"by": "model", "model": TINY}
    assert "cfg 1, temperature 1 (neutral: not tuned for this checkpoint)" in loaded.describe_sampling()
    note = loaded.sampling_note()
    assert f"python -m util.sweep --resume {path}" in note and "\n" not in note
    # a value the caller gives is the caller's, and needs no note when both tuned ones are given
    assert loaded.sampling_origins(cfg=3.0)["cfg"] == {"by": "caller"}
    assert "cfg 3 (given)" in loaded.describe_sampling(cfg=3.0)
    assert loaded.sampling_note(cfg=3.0) is not None and loaded.sampling_note(cfg=3.0, temperature=1.1) is None


def test_a_trained_checkpoint_samples_with_its_training_runs_own_flags(model, tmp_path):
    path = write_ckpt(tmp_path / "checkpoint-last.pth", model,
                      args=argparse.Namespace(model=TINY, cfg=3.0, temperature=None, num_iter_list="2,2"))
    loaded = load_model(path)
    assert loaded.sampling_config()["cfg"] == 3.0 and loaded.sampling_config()["num_iter_list"] == (2, 2)
    assert loaded.sampling_origins()["cfg"] == {"by": "training run"}
    assert loaded.sampling_origins()["temperature"]["by"] == "neutral"
    assert loaded.sampling_note() is not None


def test_stored_settings_come_first_with_their_source(model, tmp_path):
    path = write_ckpt(tmp_path / "checkpoint-last.pth", model,
                      args=argparse.Namespace(model=TINY, cfg=3.0), sampling=SWEPT,
                      sampling_source=sweep_source(epoch=4))
    loaded = load_model(path)
    assert loaded.sampling_config() == {**SWEPT, "num_iter_list": (2, 2)}
    assert all(source["by"] == "sweep" for source in loaded.sampling_origins().values())
    assert "(sweep, FID 12.35 on 40 images)" in loaded.describe_sampling()
    assert loaded.sampling_note() is None  # measured on these very weights (epoch 4, step 0)
    assert loaded.config["sampling"] == model.config["sampling"]  # the record's own defaults, as stored

    # the quick start's, and settings stored without a record of who chose them
    ckpt_util.store_sampling(path, {"cfg": 1.5, "temperature": 1.2}, {"by": provenance.BY_QUICKSTART})
    loaded = load_model(path)
    assert loaded.sampling_origins()["cfg"] == {"by": "quick start"} and loaded.sampling_note() is None
    ckpt_util.store_sampling(path, {"cfg": 1.5}, {"by": provenance.BY_QUICKSTART})
    loaded = load_model(path)
    assert loaded.sampling_origins()["temperature"]["by"] == "neutral"  # not stored: the next layer's
    assert loaded.sampling_note() is not None
    bare = write_ckpt(tmp_path / "bare.pth", model, sampling={"cfg": 1.5})
    assert load_model(bare).sampling_origins()["cfg"] == {"by": "checkpoint"}


def test_a_sweep_of_earlier_weights_is_kept_and_named(model, tmp_path):
    path = write_ckpt(tmp_path / "checkpoint-last.pth", model, sampling=SWEPT, sampling_source=sweep_source(epoch=2))
    loaded = load_model(path)
    assert loaded.sampling_config()["cfg"] == 2.5
    assert loaded.sampling_origins()["cfg"]["earlier_weights"] is True
    assert "measured on the weights of epoch 2" in loaded.describe_sampling()
    assert "measured the weights of epoch 2, not these" in loaded.sampling_note()


def test_a_users_own_configuration_keeps_its_sampling_settings(model, tmp_path):
    """A JSON file of the user's says what they chose: not replaced by neutral settings."""
    record = {**model.config, "sampling": {"cfg": 4.0, "temperature": 0.8}}
    path = write_ckpt(tmp_path / "checkpoint-last.pth", model, config=record,
                      args=argparse.Namespace(model=str(tmp_path / "mine.json")))
    loaded = load_model(path)
    assert (loaded.sampling_config()["cfg"], loaded.sampling_config()["temperature"]) == (4.0, 0.8)
    assert loaded.sampling_origins()["cfg"]["by"] == "model"


def test_layers_resolve_first_match_per_value():
    pairs = provenance.layers({"cfg": 2.0, "temperature": 2.0, "num_iter_list": [4, 4]}, "m",
                              stored={"temperature": 0.9}, stored_source={"by": "sweep"}, trained=True,
                              run_flags={"cfg": 3.0})
    settings, sources = provenance.resolve(pairs)
    assert settings == {"temperature": 0.9, "cfg": 3.0, "num_iter_list": (4, 4)}
    assert [sources[k]["by"] for k in ("temperature", "cfg", "num_iter_list")] == ["sweep", "training run", "model"]
    untrained = provenance.resolve(provenance.layers({"cfg": 2.0}, "m"))
    assert untrained == ({"cfg": 2.0}, {"cfg": {"by": "model", "model": "m"}})


def test_an_untrained_model_and_a_hub_folder_say_where_their_settings_come_from(model, tmp_path):
    assert set(s["by"] for s in model.sampling_origins().values()) == {"official API"}
    path = write_ckpt(tmp_path / "checkpoint-last.pth", model, sampling=SWEPT, sampling_source=sweep_source(epoch=4))
    loaded = load_model(path)
    loaded.save_pretrained(str(tmp_path / "hub"))
    again = load_model(str(tmp_path / "hub"))
    assert again.sampling_config() == loaded.sampling_config()
    assert again.sampling_origins() == loaded.sampling_origins()


# ---------------------------------------------------------------------- what generation samples with
@pytest.fixture
def recorded_generation(monkeypatch):
    """main_fractalgen's evaluate_gen replaced by a recorder of the settings it would
    generate with (engine_fractalgen.generation_args): returns the list it appends to."""
    def install():
        seen = []

        def recording_eval(model, args, *a, **k):
            seen.append(vars(engine_fractalgen.generation_args(model, args)))
            return {"folder": None}

        monkeypatch.setattr(main_fractalgen, "evaluate_gen", recording_eval)
        monkeypatch.setattr(main_fractalgen, "check_generation", lambda args, model: None)
        return seen
    return install


def test_evaluate_gen_uses_the_stored_settings_unless_a_flag_is_given(run_main, model, tmp_path, recorded_generation,
                                                                      capsys):
    path = write_ckpt(tmp_path / "checkpoint-last.pth", model, sampling=SWEPT, sampling_source=sweep_source(epoch=4))
    seen = recorded_generation()
    argv = ["--resume", path, "--device", "cpu", "--evaluate_gen", "--num_images", 2, "--output_dir", tmp_path]
    run_main(*argv)
    assert {k: seen[-1][k] for k in SWEPT} == {**SWEPT, "num_iter_list": (2, 2)}
    out = capsys.readouterr().out
    assert "sampling with cfg 2.5, temperature 0.7" in out and "(sweep, FID 12.35 on 40 images)" in out
    assert "python -m util.sweep" not in out

    run_main(*argv, "--cfg", 4, "--num_iter_list", "1,1")
    assert (seen[-1]["cfg"], seen[-1]["num_iter_list"], seen[-1]["temperature"]) == (4.0, (1, 1), 0.7)
    assert "cfg 4, num_iter_list 1,1 (given)" in capsys.readouterr().out

    # a trained checkpoint without stored settings: neutral ones, and the note, once
    os.makedirs(tmp_path / "bare")
    bare = write_ckpt(tmp_path / "bare" / "checkpoint-last.pth", model)
    run_main("--resume", bare, "--device", "cpu", "--evaluate_gen", "--num_images", 2, "--output_dir", tmp_path)
    assert (seen[-1]["cfg"], seen[-1]["temperature"]) == (1.0, 1.0)
    assert capsys.readouterr().out.count("python -m util.sweep --resume") == 1


def test_the_generation_folder_names_the_settings_used():
    model = create_model(TINY, class_num=2)
    model.sampling_defaults, model.sampling_sources = {"cfg": 2.5, "temperature": 0.7}, None
    args = argparse.Namespace(cfg=None, temperature=None, cfg_schedule=None, filter_threshold=None,
                              num_iter_list=None, num_images=4, output_dir="x")
    resolved = engine_fractalgen.generation_args(model, args)
    assert (resolved.cfg, resolved.temperature, resolved.num_iter_list) == (2.5, 0.7, model.default_num_iter_list())
    assert "-cfg2.5linear-temp0.7-" in engine_fractalgen.generation_folder(resolved, online=False)
    assert args.cfg is None  # the caller's args stay as given


def test_sample_py_says_where_the_settings_come_from_and_notes_once(model, tmp_path, capsys, one_thread):
    path = write_ckpt(tmp_path / "checkpoint-last.pth", model)
    sample.main(["--ckpt", path, "--labels", "0", "--num_iter_list", "1,1", "--output", str(tmp_path / "s.png"),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert "sampling settings: cfg 1, temperature 1 (neutral: not tuned for this checkpoint)" in err
    assert "num_iter_list 1,1 (given)" in err and err.count("python -m util.sweep --resume") == 1


# ---------------------------------------------------------------------- training keeps stored settings
def test_training_keeps_a_sweeps_settings_across_saves_resume_and_online_eval(run_main, tiny_data, tmp_path,
                                                                              recorded_generation, monkeypatch,
                                                                              capsys):
    out = str(tmp_path / "run")
    path = os.path.join(out, "checkpoint-last.pth")
    run_main(*train_argv(tiny_data, out))
    trained = ckpt_util.load_checkpoint(path)
    assert "sampling" not in trained  # nothing chosen for it: neutral at load time, with the note
    assert load_model(path).sampling_note() is not None

    # a sweep stores its winner; training goes on from it, online evaluation samples with it
    ckpt_util.store_sampling(path, SWEPT, sweep_source(epoch=0))
    seen = recorded_generation()
    run_main(*train_argv(tiny_data, out, "--online_eval", "--eval_freq", 1, epochs=2))
    assert seen and seen[-1]["cfg"] == 2.5 and seen[-1]["num_iter_list"] == (2, 2)
    resumed = ckpt_util.load_checkpoint(path)
    assert resumed["epoch"] == 1 and resumed["sampling"] == SWEPT
    assert resumed["sampling_source"] == sweep_source(epoch=0)
    loaded = load_model(path)
    assert loaded.sampling_config()["cfg"] == 2.5
    assert "measured the weights of epoch 0" in loaded.sampling_note()

    # settings stored into checkpoint-last.pth while a run trains are carried into its next saves
    real = main_fractalgen.train_one_epoch

    def store_then_train(*args, **kwargs):
        if kwargs.get("start_step", 0) == 0 and args[4] == 3:  # before epoch 3: a sweep of epoch 2's weights
            ckpt_util.store_sampling(path, {**SWEPT, "cfg": 3.5}, sweep_source(epoch=2))
        return real(*args, **kwargs)

    monkeypatch.setattr(main_fractalgen, "train_one_epoch", store_then_train)
    capsys.readouterr()
    run_main(*train_argv(tiny_data, out, epochs=4))
    final = ckpt_util.load_checkpoint(path)
    assert final["epoch"] == 3 and final["sampling"]["cfg"] == 3.5 and final["sampling_source"]["epoch"] == 2
    assert "holds sampling settings stored since the last save" in capsys.readouterr().out
