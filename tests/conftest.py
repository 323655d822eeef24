"""Shared fixtures for the engine tests: a tiny ImageFolder, random Inception weights (the
real architecture, so FID/IS run end to end offline) and FID statistics of the tiny data."""
import os
import signal
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

TRAIN_PER_CLASS = (6, 6)   # 12 train images: 3 steps of 2 x 2 processes
VAL_PER_CLASS = (3, 2)     # 5 val images: an odd count, so 2 ranks would need padding


def write_imagefolder(root, per_class, seed, size=(20, 24)):
    """Random RGB images root/<class>/<i>.png (H, W) = size, one class per entry of per_class."""
    rng = np.random.default_rng(seed)
    for c, n in enumerate(per_class):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, f"class{c}", f"{i:03d}.png"))
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """DATA/train (2 classes x 6) and DATA/val (3 + 2) of 20x24 images (the ADM crop makes 16x16)."""
    root = tmp_path_factory.mktemp("data")
    write_imagefolder(os.path.join(root, "train"), TRAIN_PER_CLASS, seed=0)
    write_imagefolder(os.path.join(root, "val"), VAL_PER_CLASS, seed=1)
    return str(root)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A weights file for torch-fidelity's FeatureExtractorInceptionV3, randomly initialised
    (He-normal convolutions keep activations at a usable scale) instead of downloaded."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe
    cls = fe.FeatureExtractorInceptionV3
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(cls, "load_state_dict", lambda self, *a, **k: None):
        model = cls("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, (2 / fan_in) ** 0.5, generator=g)
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def fid_stats(tiny_data, inception_weights, tmp_path_factory):
    """Reference statistics of the tiny train images (16x16 crops), written by util.fid."""
    from util import fid
    inception = fid.build_inception(torch.device("cpu"), inception_weights)
    files = fid.list_images(os.path.join(tiny_data, "train"))
    mu, sigma = fid.mean_and_cov(fid.extract_features(files, inception, torch.device("cpu"), img_size=16)["2048"])
    path = str(tmp_path_factory.mktemp("fid") / "tiny_stats.npz")
    fid.save_stats(path, mu, sigma)
    return path


@pytest.fixture(scope="session")
def imagenet_tiny_ckpt(tmp_path_factory):
    """A checkpoint of fractalar_tiny with the 1,000 ImageNet classes (random weights, seed 0):
    the web demo names its classes."""
    import argparse
    from models import create_model
    torch.manual_seed(0)
    model = create_model("fractalar_tiny", class_num=1000)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-last.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model="fractalar_tiny")}, path)
    return str(path)


@pytest.fixture
def one_thread():
    """CPU tests run one intra-op thread: on a busy 2-core machine more threads thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def main_in_one_thread(argv):
    """main_fractalgen.main on command-line style arguments with one intra-op thread, for
    module-scoped fixtures (which cannot use the one_thread fixture)."""
    from main_fractalgen import get_args_parser, main
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(get_args_parser().parse_args([str(a) for a in argv]))
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def run_main(one_thread):
    """Call main_fractalgen.main in-process with command-line style arguments."""
    from main_fractalgen import get_args_parser, main

    def run(*argv):
        return main(get_args_parser().parse_args([str(a) for a in argv]))
    return run


@pytest.fixture
def child_env():
    """Environment for child processes: the repo importable, one thread per process."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def process_state():
    """Process-wide settings a test could change and leave behind for the tests after it
    (whose results would then depend on the order the tests run in)."""
    import torch._dynamo  # noqa: F401 -- loaded by torch.compile anyway; the configs below need it
    state = {
        "torch threads": torch.get_num_threads(),
        "torch default dtype": torch.get_default_dtype(),
        "torch default device": torch.get_default_device(),
        "grad mode": torch.is_grad_enabled(),
        "CPU autocast": torch.is_autocast_enabled("cpu"),
        "inductor freezing": torch._inductor.config.freezing,
        "torch.distributed initialised": torch.distributed.is_available() and torch.distributed.is_initialized(),
        "working directory": os.getcwd(),
        "environment": {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"},
    }
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            state[f"{name} handler"] = signal.getsignal(getattr(signal, name))
    return state


@pytest.fixture(autouse=True)
def no_leaked_process_state():
    """Each test leaves the process as it found it: a changed setting fails the test that
    changed it (tests run in random order, pytest-randomly), and is put back."""
    before = process_state()
    yield
    after = process_state()
    changed = sorted(key for key in before if before[key] != after[key])
    if not changed:
        return
    torch.set_num_threads(before["torch threads"])
    torch.set_default_dtype(before["torch default dtype"])
    torch.set_default_device(before["torch default device"])
    torch.set_grad_enabled(before["grad mode"])
    torch._inductor.config.freezing = before["inductor freezing"]
    os.chdir(before["working directory"])
    for name in set(os.environ) - set(before["environment"]) - {"PYTEST_CURRENT_TEST"}:
        del os.environ[name]
    os.environ.update(before["environment"])
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        if f"{name} handler" in before:
            signal.signal(getattr(signal, name), before[f"{name} handler"])
    if "environment" in changed:  # name the variables, not the whole environment
        variables = sorted({k for k, _ in set(before["environment"].items()) ^ set(after["environment"].items())})
        before["environment"] = {k: before["environment"].get(k) for k in variables}
        after["environment"] = {k: after["environment"].get(k) for k in variables}
    pytest.fail("the test left process-wide state changed for the tests after it: " + "; ".join(
        f"{key}: {before[key]!r} -> {after[key]!r}" for key in changed))


@pytest.fixture
def small_filesystem(tmp_path):
    """mount(size, readonly=False) -> a folder on a tmpfs of `size` (e.g. "3m") that really
    fills up (or refuses writes): the real fault, not an injected error. Mounting needs
    root; elsewhere the test is skipped, saying why. Unmounted after the test."""
    import subprocess
    mounted = []

    def mount(size, readonly=False):
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root (run the tests as root, e.g. in a container)")
        path = tmp_path / f"fs{len(mounted)}"
        path.mkdir()
        options = f"size={size}" + (",ro" if readonly else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return str(path)

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
