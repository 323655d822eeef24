"""What the training loop reads: keyed random flips (left-right, new per epoch, the same
wherever and whenever a sample is loaded) and DataLoader workers that outlive the signals
a launcher sends to the whole process group."""
import os
import signal
import subprocess
import time

import pytest
import torch

from util import data as data_util
from util import preempt


def test_training_flips_mirror_left_right_at_random_and_anew_each_epoch(tiny_data):
    train = data_util.build_dataset(tiny_data, "train", 16, train=True, seed=0)
    plain = data_util.build_dataset(tiny_data, "train", 16, train=False)
    epochs, n = range(4), len(plain)
    flipped = torch.zeros(len(epochs), n, dtype=torch.bool)
    for epoch in epochs:
        for index in range(n):
            image, label = train[(epoch, index)]
            original, original_label = plain[index]
            assert label == original_label
            mirrored = original.flip(-1)  # (3, H, W): columns reversed
            assert torch.equal(image, original) or torch.equal(image, mirrored), (epoch, index)
            flipped[epoch, index] = not torch.equal(image, original)
    assert 0.2 < flipped.float().mean() < 0.8  # a fair coin
    assert (flipped != flipped[0]).any(dim=0).sum() >= n // 4  # many images change their flip between epochs
    again = data_util.build_dataset(tiny_data, "train", 16, train=True, seed=0)
    assert all(torch.equal(again[(3, i)][0], train[(3, i)][0]) for i in range(n))  # the key decides
    other_seed = data_util.build_dataset(tiny_data, "train", 16, train=True, seed=1)
    assert any(not torch.equal(other_seed[(0, i)][0], train[(0, i)][0]) for i in range(n))


class Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        return os.getpid()


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1") or not os.path.isdir("/proc"), reason="POSIX signals and /proc")
def test_dataloader_workers_outlive_stop_signals_but_not_their_parents_sigterm():
    """SLURM (--signal=USR1@90), torchrun and a terminal's Ctrl-C signal the whole process
    group: DataLoader workers must keep serving the main process, which finishes the step
    and checkpoints. SIGTERM from another process (e.g. `kill -TERM -PGID`) included; a
    SIGTERM from the parent (how multiprocessing ends leftover workers) still ends one."""
    loader = torch.utils.data.DataLoader(Pids(), batch_size=1, num_workers=1, worker_init_fn=preempt.ignore_in_worker,
                                         prefetch_factor=1, timeout=120)
    batches = iter(loader)
    worker = int(next(batches))
    try:
        assert worker != os.getpid()
        for name in ("SIGUSR1", "SIGINT"):
            os.kill(worker, getattr(signal, name))
        subprocess.run(["kill", "-TERM", str(worker)], check=True)  # a SIGTERM from elsewhere
        time.sleep(0.5)
        assert alive(worker)
        assert [int(next(batches)) for _ in range(5)] == [worker] * 5  # still serving
        os.kill(worker, signal.SIGTERM)  # from its parent
        deadline = time.monotonic() + 30
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(worker)
    finally:
        if alive(worker):  # a worker deaf to its parent would hang the interpreter's exit
            os.kill(worker, signal.SIGKILL)
        del batches
