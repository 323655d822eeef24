"""util.validation: the shared checks every entry point uses (one sentence, naming the flag)."""
import numpy as np
import pytest
import torch

from util import fid, validation
from util.misc import UserInputError


@pytest.mark.parametrize("value", ["nan", float("nan"), float("inf"), "-inf", 0, -1e-9, "abc", None])
def test_finite_positive_rejects(value):
    with pytest.raises(UserInputError, match=r"^--lr must be (a finite number above 0|a number), got"):
        validation.finite_positive("--lr", value)


def test_finite_checks_accept_and_convert():
    assert validation.finite_positive("--lr", "1e-4") == 1e-4
    assert validation.finite_nonnegative("--cfg", 0) == 0.0
    with pytest.raises(UserInputError, match=r"--cfg must be a finite number of 0 or more, got -3"):
        validation.finite_nonnegative("--cfg", -3)
    with pytest.raises(UserInputError, match=r"--cfg must be a finite number of 0 or more, got nan"):
        validation.finite_nonnegative("--cfg", float("nan"))


def test_sampling_args():
    assert validation.check_sampling_args(1.1, 4, 1e-4) == (1.1, 4.0, 1e-4)
    assert validation.check_sampling_args() == (None, None, None)
    with pytest.raises(UserInputError, match=r"^temperature must be a finite number above 0, got 0"):
        validation.check_sampling_args(temperature=0, prefix="")
    with pytest.raises(UserInputError, match=r"--filter_threshold must be below 1"):
        validation.check_sampling_args(filter_threshold=1)


def test_integers_and_iteration_lists():
    assert validation.positive_int("--batch_size", "8") == 8
    assert validation.positive_int("--num_workers", 0, minimum=0) == 0
    for bad, message in [(0, "at least 1, got 0"), (2.5, "a whole number"), (True, "a whole number")]:
        with pytest.raises(UserInputError, match=message):
            validation.positive_int("--batch_size", bad)
    assert validation.parse_num_iter_list("64,16") == (64, 16)
    with pytest.raises(UserInputError, match="positive integers"):
        validation.parse_num_iter_list("64,0")


def test_devices():
    assert validation.check_device("cpu") == torch.device("cpu")
    assert validation.check_device(None).type in ("cpu", "cuda")
    with pytest.raises(UserInputError, match=r"--device 'tpu9' is not a device name; use cpu, cuda or cuda:N"):
        validation.check_device("tpu9")
    with pytest.raises(UserInputError, match=r"--device meta: only cpu and cuda devices are supported"):
        validation.check_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match=r"--device cuda:1 was requested but CUDA is not available"):
            validation.check_device("cuda:1")


def test_fid_files_are_loaded_and_checked(tmp_path, fid_stats, inception_weights):
    mu, sigma = fid.load_stats(fid_stats)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and mu.dtype == np.float64
    np.savez(tmp_path / "inf.npz", mu=np.full(2048, np.inf), sigma=np.eye(2048))
    with pytest.raises(UserInputError, match=r"inf\.npz: mu or sigma holds NaN or infinite values"):
        fid.load_stats(str(tmp_path / "inf.npz"))
    np.savez(tmp_path / "objects.npz", mu=np.array([object()] * 3), sigma=np.eye(3))
    with pytest.raises(UserInputError, match=r"cannot read FID statistics .*objects\.npz"):
        fid.load_stats(str(tmp_path / "objects.npz"))

    fid.check_inception_weights(inception_weights)  # the right file passes
    state = torch.load(inception_weights, weights_only=True)
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "missing-key.pth")
    with pytest.raises(UserInputError, match=r"missing-key\.pth does not fit torch-fidelity's Inception-v3 "
                                             r"\(Missing key\(s\).*Mixed_7c\.branch_pool\.conv\.weight"):
        fid.check_inception_weights(str(tmp_path / "missing-key.pth"))
    (tmp_path / "cut.pth").write_bytes(open(inception_weights, "rb").read()[:1000])
    with pytest.raises(UserInputError, match=r"cannot read Inception weights .*cut\.pth"):
        fid.check_inception_weights(str(tmp_path / "cut.pth"))
