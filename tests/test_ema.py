"""--ema_rate: an fp32 moving average of the weights, updated after every optimizer step,
stored as model_ema, continued on resume, and evaluated instead of the raw weights (unless
--no_ema). Exact resume with an EMA on 1 and 2 processes: tests/test_resilience.py."""
import os

import pytest
import torch

import main_fractalgen
from demo import sample
from models import create_model, load_model
from util.checkpoint import load_checkpoint
from util.ema import EMA

RATE = 0.8


def train_argv(data, out, *extra, epochs=1):
    """fractalar_tiny on the 12 tiny images, batch 4: 3 steps an epoch."""
    return ["--model", "fractalar_tiny", "--data_path", data, "--output_dir", out, "--resume", out, "--device", "cpu",
            "--batch_size", 4, "--epochs", epochs, "--warmup_epochs", 1, "--blr", 1e-1, "--save_last_freq", 1,
            "--num_workers", 0, *extra]


def checkpoint(out):
    return load_checkpoint(os.path.join(out, "checkpoint-last.pth"))


def test_the_average_follows_each_update_in_fp32_under_the_model_keys():
    torch.manual_seed(0)
    model = create_model("fractalar_tiny", class_num=2)
    ema = EMA(model, RATE)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        expected = {k: RATE * e + (1 - RATE) * model.state_dict()[k] for k, e in expected.items()}
    state = ema.state_dict()
    assert list(state) == list(model.state_dict())
    for key, value in state.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-6)
    copy = EMA(create_model("fractalar_tiny", class_num=2), RATE)
    copy.load_state_dict(state)
    assert all(torch.equal(v, state[k]) for k, v in copy.state_dict().items())
    with pytest.raises(ValueError, match="checkpoint does not match"):
        copy.load_state_dict({k: v for k, v in state.items() if k != "fake_latent"})


def test_the_average_is_updated_after_each_optimizer_step(run_main, tiny_data, tmp_path, monkeypatch):
    """The weights before training and after each of the 3 steps, recorded at AdamW.step:
    model_ema must be p0 averaged with p1, p2, p3 in turn (not with the weights before a step)."""
    weights, step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        params = [p for group in self.param_groups for p in group["params"]]
        if not weights:
            weights.append([p.detach().clone() for p in params])
        result = step(self, *args, **kwargs)
        weights.append([p.detach().clone() for p in params])
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    out = str(tmp_path / "run")
    result = run_main(*train_argv(tiny_data, out, "--ema_rate", RATE))
    assert len(weights) == 4
    expected = weights[0]
    for after in weights[1:]:
        expected = [RATE * e + (1 - RATE) * p for e, p in zip(expected, after)]
    model = result["model"]
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in main_fractalgen.param_groups(model, 0.05) for p in group["params"]]
    stored = checkpoint(out)["model_ema"]
    for name, value in zip(order, expected):
        torch.testing.assert_close(stored[name], value, rtol=1e-6, atol=1e-7, msg=name)
        assert torch.equal(result["model_ema"][name], stored[name])
    assert not torch.equal(stored["class_emb.weight"], checkpoint(out)["model"]["class_emb.weight"])


def test_evaluation_uses_the_ema_weights_unless_no_ema(run_main, tiny_data, tmp_path, capsys):
    out = str(tmp_path / "run")
    run_main(*train_argv(tiny_data, out, "--ema_rate", RATE))
    ckpt = checkpoint(out)
    assert set(ckpt) >= {"model", "optimizer", "epoch", "scaler", "args", "model_ema"}  # official keys kept
    evaluate = ["--model", "fractalar_tiny", "--data_path", tiny_data, "--output_dir", out, "--resume", out,
                "--device", "cpu", "--num_workers", 0, "--evaluate_nll", "--nll_bsz", 5]
    bpd = {}
    for flags, weights in (([], "ema"), (["--no_ema"], "raw")):
        result = run_main(*evaluate, *flags)
        text = capsys.readouterr().out
        key = "model_ema" if weights == "ema" else "model"
        assert result["model"].weights == weights
        assert all(torch.equal(v, ckpt[key][k]) for k, v in result["model"].state_dict().items())
        path = os.path.join(out, "checkpoint-last.pth")
        assert (f"evaluating the EMA weights of {path} (--no_ema: the raw ones)" if weights == "ema" else
                f"evaluating the raw weights of {path} (--no_ema), not its EMA weights") in text
        bpd[weights] = result["nll"]["bpd"]
    assert bpd["ema"] != bpd["raw"]

    for kwargs, weights in (({}, "ema"), ({"ema": False}, "raw")):
        model = load_model(out, **kwargs)
        key = "model_ema" if weights == "ema" else "model"
        assert model.weights == weights and all(torch.equal(v, ckpt[key][k]) for k, v in model.state_dict().items())
    grid = str(tmp_path / "grid.png")
    for flags, weights in (([], "ema"), (["--no_ema"], "raw")):
        sample.main(["--ckpt", out, "--labels", "0", "--output", grid, "--device", "cpu", *flags])
        assert f"fractalar_tiny ({weights} weights): sample for labels [0]" in capsys.readouterr().err


def test_a_checkpoint_without_ema_weights_loads_its_raw_weights(tmp_path):
    model = create_model("fractalar_tiny", class_num=2)
    assert model.weights == "raw"
    torch.save({"model": model.state_dict(), "config": model.config}, tmp_path / "checkpoint-last.pth")
    assert load_model(str(tmp_path)).weights == "raw"


def test_online_eval_sees_the_ema_weights_and_training_goes_on_with_its_own(run_main, tiny_data, tmp_path,
                                                                             monkeypatch):
    seen = []

    def recording_eval(model, args, epoch, log_writer=None, online=False):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"folder": None}

    monkeypatch.setattr(main_fractalgen, "evaluate_gen", recording_eval)
    monkeypatch.setattr(main_fractalgen, "check_generation", lambda args, model: None)
    for flags, key in (([], "model_ema"), (["--no_ema"], "model")):
        out = str(tmp_path / key)
        result = run_main(*train_argv(tiny_data, out, "--ema_rate", RATE, "--online_eval", "--precision", "bf16",
                                      *flags))
        ckpt = checkpoint(out)
        assert all(torch.equal(v, ckpt[key][k]) for k, v in seen.pop().items())
        assert all(torch.equal(v, ckpt["model"][k]) for k, v in result["model"].state_dict().items())
        assert all(v.dtype == torch.float32 for v in ckpt["model_ema"].values())  # bf16 autocast: fp32 EMA


def test_resume_starts_continues_or_changes_the_ema_and_says_so(run_main, tiny_data, tmp_path, capsys):
    out = str(tmp_path / "run")
    path = os.path.join(out, "checkpoint-last.pth")
    run_main(*train_argv(tiny_data, out))
    assert "model_ema" not in checkpoint(out)  # off by default: the official recipe

    run_main(*train_argv(tiny_data, out, "--ema_rate", RATE, epochs=2))
    assert f"{path} has no EMA weights: the EMA (--ema_rate 0.8) starts from its weights" in capsys.readouterr().out
    assert "model_ema" in checkpoint(out)

    run_main(*train_argv(tiny_data, out, epochs=3))
    assert f"{path} holds EMA weights: keeping them up to date at its rate 0.8 (--ema_rate sets another)" in \
        capsys.readouterr().out
    assert checkpoint(out)["args"].ema_rate == RATE

    run_main(*train_argv(tiny_data, out, "--ema_rate", 0.5, epochs=4))
    assert f"--ema_rate 0.5 replaces the rate 0.8 of {path}: its EMA weights go on from here at the new rate" in \
        capsys.readouterr().out
    assert checkpoint(out)["args"].ema_rate == 0.5


def test_an_ema_started_on_resume_starts_from_the_resumed_weights():
    import argparse
    torch.manual_seed(0)
    trained = create_model("fractalar_tiny", class_num=2).state_dict()
    model = create_model("fractalar_tiny", class_num=2)
    model.load_state_dict(trained)
    args = argparse.Namespace(ema_rate=RATE, model="fractalar_tiny")
    ema = main_fractalgen.start_ema(model, {"model": trained}, "ckpt.pth", args)
    assert all(torch.equal(v, trained[k]) for k, v in ema.state_dict().items())
    assert main_fractalgen.start_ema(model, None, None, argparse.Namespace(ema_rate=None)) is None


@pytest.mark.parametrize("rate", ["0", "1", "1.5", "-0.1", "nan"])
def test_bad_ema_rate_is_one_line_before_anything_is_written(run_main, tiny_data, tmp_path, rate):
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as err:
        run_main(*train_argv(tiny_data, out, "--ema_rate", rate))
    assert err.value.code == (f"error: --ema_rate must be a number strictly between 0 and 1 (the share of the "
                              f"average kept at each step, e.g. 0.9999), got {float(rate)}")
    assert not os.path.exists(out)
