"""Sampling settings stored with a checkpoint ('sampling') are what a loaded model samples
with: they win over the model's defaults key by key (a checkpoint main_fractalgen.py trained
takes neutral cfg 1 / temperature 1 instead of the defaults: tests/test_sampling_sources.py),
and explicit arguments win over them."""
import argparse

import pytest
import torch

from models import DEFAULT_SAMPLING, create_model, load_model

TINY = "fractalar_tiny"
KEYS = ("num_iter_list", "cfg", "cfg_schedule", "temperature", "filter_threshold")


def save(path, sampling=None, record=False):
    """A checkpoint of the tiny model: an official-style file (its args name the model) or,
    with `record`, one that stores the model's configuration record (as main_fractalgen.py
    writes them; the record holds the model's default sampling settings)."""
    torch.manual_seed(0)
    model = create_model(TINY, class_num=4)
    ckpt = {"model": model.state_dict(), "epoch": 0, "args": argparse.Namespace(model=TINY, class_num=4)}
    if record:
        ckpt["config"] = model.config
    if sampling is not None:
        ckpt["sampling"] = sampling
    torch.save(ckpt, path)
    return str(path)


def sampled_with(model, monkeypatch, **given):
    """The settings generate(**given) hands to the sampler."""
    seen = {}

    def sample(cond_list, num_iter_list, cfg, cfg_schedule, temperature, filter_threshold, **kwargs):
        seen.update(num_iter_list=tuple(num_iter_list), cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature,
                    filter_threshold=filter_threshold)
        return torch.zeros(cond_list[0].shape[0] // (2 if cfg != 1.0 else 1), 3, model.img_size, model.img_size)
    monkeypatch.setattr(model, "sample", sample)
    model.generate([0, 1], **given)
    return seen


DEFAULTS = {**DEFAULT_SAMPLING[TINY], "num_iter_list": tuple(DEFAULT_SAMPLING[TINY]["num_iter_list"])}
FULL = dict(num_iter_list=(3, 2), cfg=3.5, cfg_schedule="constant", temperature=0.8, filter_threshold=1e-3)


@pytest.mark.parametrize("stored, expected", [
    (None, DEFAULTS),                                                   # nothing stored: the defaults
    (FULL, FULL),                                                       # every key stored: all of them
    ({"cfg": 3.5}, {**DEFAULTS, "cfg": 3.5}),                           # some keys: those, the rest defaults
    ({"temperature": 0.8, "cfg": None}, {**DEFAULTS, "temperature": 0.8}),  # None: not stored
    ({"num_iter_list": [5, 1], "cfg_schedule": "constant"},
     {**DEFAULTS, "num_iter_list": (5, 1), "cfg_schedule": "constant"}),
], ids=["none", "all", "cfg", "none-value", "iters-schedule"])
@pytest.mark.parametrize("record", [False, True], ids=["args", "record"])
def test_loaded_model_samples_with_the_stored_settings(stored, expected, record, tmp_path, monkeypatch):
    assert set(DEFAULTS) == set(KEYS) and all(FULL[k] != DEFAULTS[k] for k in KEYS)  # each key can tell
    model = load_model(save(tmp_path / "checkpoint-last.pth", stored, record))
    if record:  # trained by main_fractalgen.py: cfg and temperature not stored are neutral, not the defaults
        expected = {**expected, **{k: 1.0 for k in ("cfg", "temperature") if not (stored or {}).get(k)}}
    assert model.sampling_config() == expected
    assert sampled_with(model, monkeypatch) == expected
    # explicit arguments win over stored settings and defaults alike
    override = dict(num_iter_list=(2, 2), cfg=1.5, cfg_schedule="linear", temperature=1.25, filter_threshold=0.0)
    assert sampled_with(model, monkeypatch, **override) == override
