"""Real faults, not injected errors: a file system that fills up mid-write or is read-only
(a tmpfs mounted for the test), damaged checkpoint files really written, two runs on one
output folder, a claim left by a killed run."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import zipfile

import pytest
import torch
from conftest import main_in_one_thread

from util import checkpoint as ckpt_util
from util import claim, logs
from util.misc import OutputWriteError, UserInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_argv(data, out, *extra, epochs=2):
    return [str(a) for a in ["--model", "fractalmar_tiny", "--data_path", data, "--output_dir", out, "--resume", out,
                             "--device", "cpu", "--batch_size", 4, "--epochs", epochs, "--warmup_epochs", 1,
                             "--save_last_freq", 1, "--num_workers", 0, *extra]]


@pytest.fixture(scope="module")
def two_checkpoints(tiny_data, tmp_path_factory):
    """A folder after 2 epochs: checkpoint-last.pth (epoch 1) and checkpoint-prev.pth (epoch 0)."""
    out = str(tmp_path_factory.mktemp("two"))
    main_in_one_thread(train_argv(tiny_data, out))
    return out


# ---------------------------------------------------------------------- full and read-only disks
def test_a_file_system_filling_mid_checkpoint_keeps_the_last_one_and_says_so(small_filesystem):
    """torch's zip writer turns the failed write into RuntimeError('unexpected pos') when it
    closes the archive; the sentence must still say the disk is full, for the foreground and
    the background writer, and leave the last checkpoint whole and no temp file."""
    folder = small_filesystem("3m")
    path = os.path.join(folder, "checkpoint-last.pth")
    state = {"model": {"w": torch.arange(450_000, dtype=torch.float32)}, "epoch": 0}  # 1.8 MB: one fits, two do not
    ckpt_util.save_checkpoint(state, path, keep_previous=True)
    for background in (False, True):
        writer = ckpt_util.CheckpointWriter(background=background)
        with pytest.raises(OutputWriteError, match=r"^cannot write .*checkpoint-last\.pth: no space left on the "
                                                   r"device; free space there or pass --output_dir on another disk$"):
            writer.save(dict(state, epoch=1), path)
            writer.wait()
        assert os.listdir(folder) == ["checkpoint-last.pth"]
        loaded = ckpt_util.load_checkpoint(path)
        assert loaded["epoch"] == 0 and torch.equal(loaded["model"]["w"], state["model"]["w"])


def test_training_on_a_disk_that_fills_stops_with_one_line_and_loses_nothing(run_main, tiny_data, small_filesystem,
                                                                             capfd):
    out = os.path.join(small_filesystem("3m"), "run")  # one 1.8 MB checkpoint fits, the next one does not
    with pytest.raises(SystemExit) as stop:
        run_main(*train_argv(tiny_data, out, epochs=3))
    assert stop.value.code == (f"error: cannot write {out}/checkpoint-last.pth: no space left on the device; free "
                               f"space there or pass --output_dir on another disk")
    assert "Traceback" not in capfd.readouterr().err
    assert ckpt_util.load_checkpoint(os.path.join(out, "checkpoint-last.pth"))["epoch"] == 0
    assert sorted(f for f in os.listdir(out) if not f.startswith("events")) == ["checkpoint-last.pth", "log.txt"]


def test_read_only_output_folder_is_one_line_naming_the_flag_that_chose_it(run_main, tiny_data, small_filesystem,
                                                                          capfd, monkeypatch):
    import argparse
    from main_fractalgen import open_outputs
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)  # print as outside pytest
    out = small_filesystem("1m", readonly=True)
    with pytest.raises(SystemExit) as stop:
        run_main(*train_argv(tiny_data, out, epochs=1))
    assert stop.value.code == (f"error: cannot write {out}/{claim.LOCK_NAME}: the file system is read-only; pass "
                               f"--output_dir on a writable disk")
    # TensorBoard's folder is --output_dir unless --log_dir is given
    for log_dir, flag in ((None, "--output_dir"), (out, "--log_dir")):
        args = argparse.Namespace(output_dir=out, log_dir=log_dir)
        with pytest.raises(OutputWriteError, match=f"^cannot write {out}: the file system is read-only; pass "
                                                   f"{flag} on a writable disk$"):
            open_outputs(args, None, False, None)
    assert "Exception in thread" not in capfd.readouterr().err


def test_tensorboard_on_a_full_disk_raises_one_sentence_without_a_thread_traceback(small_filesystem, capfd,
                                                                                   monkeypatch):
    """TensorBoard writes from a thread; its failure must come back in the caller as one
    sentence naming the flag that chose the folder, and print nothing from the thread."""
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)  # pytest's own hook prints nothing
    folder = small_filesystem("8k")
    writer = logs.LogWriter(folder, "--output_dir")
    with pytest.raises(OutputWriteError, match=r"^cannot write .*: no space left on the device; free space there "
                                               r"or pass --output_dir on another disk$"):
        for step in range(5000):  # ~50 bytes an event, written by the thread: the 8 KB fill up
            writer.add_scalar("train_loss", 1.0, step)
    with pytest.raises(OutputWriteError):
        writer.close()
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    for thread in threading.enumerate():  # the failed writer thread has finished what it prints
        if isinstance(thread, _AsyncWriterThread) and thread.exception is not None:
            thread.join(10)
    assert "Exception in thread" not in capfd.readouterr().err


# ---------------------------------------------------------------------- damaged checkpoints
def flip_tensor_byte(path, record=3):
    """Flip one bit in the data of the record-th tensor of a torch.save zip file."""
    with zipfile.ZipFile(path) as archive:
        info = [i for i in archive.infolist() if "/data/" in i.filename][record]
    data = bytearray(open(path, "rb").read())
    header = info.header_offset
    start = header + 30 + int.from_bytes(data[header + 26:header + 28], "little") + \
        int.from_bytes(data[header + 28:header + 30], "little")
    data[start + info.compress_size // 2] ^= 0x10
    open(path, "wb").write(bytes(data))


DAMAGES = {
    "text": (lambda p: open(p, "wb").write(b"hello\n"), r"cannot read checkpoint .*: it is not a file torch.save "
                                                          r"wrote"),
    "random bytes": (lambda p: open(p, "wb").write(random.Random(0).randbytes(5000)),
                     r"cannot read checkpoint .*: it is not a file torch.save wrote"),
    "empty": (lambda p: open(p, "wb").close(), r"cannot read checkpoint .*: it is empty"),
    "truncated": (lambda p: os.truncate(p, os.path.getsize(p) // 2),
                  r"cannot read checkpoint .*: it is truncated, damaged or not a PyTorch file \(RuntimeError: "
                  r"PytorchStreamReader failed reading zip archive: failed finding central directory\)"),
    "flipped bit": (flip_tensor_byte, r"checkpoint .*checkpoint-last\.pth is damaged: its record \S+/data/\d+ does "
                                      r"not match the CRC-32 checksum stored with it \(a changed byte\)"),
    "missing": (os.remove, r".*checkpoint-last\.pth is missing \(a save was stopped between its two renames\)"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one_in_one_line(two_checkpoints, tmp_path, capsys,
                                                                             damage):
    out = str(tmp_path / "run")
    shutil.copytree(two_checkpoints, out)
    path = os.path.join(out, "checkpoint-last.pth")
    write, problem = DAMAGES[damage]
    write(path)
    ckpt, used = ckpt_util.load_latest_checkpoint(path, use_previous=True)
    assert used == os.path.join(out, "checkpoint-prev.pth") and ckpt["epoch"] == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "weights_only" not in lines[0], lines
    assert __import__("re").fullmatch(f"warning: {problem}; resuming from the previous checkpoint .*checkpoint-prev"
                                      r"\.pth instead \(one save earlier\)", lines[0]), lines[0]
    with pytest.raises(UserInputError, match=f"^{problem}; the previous checkpoint .*checkpoint-prev.pth is there: "
                                             f"pass --resume .*checkpoint-prev.pth to use it$"):
        ckpt_util.load_latest_checkpoint(path, use_previous=False)


def test_both_checkpoints_damaged_is_one_sentence(two_checkpoints, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(two_checkpoints, out)
    flip_tensor_byte(os.path.join(out, "checkpoint-last.pth"))
    open(os.path.join(out, "checkpoint-prev.pth"), "wb").write(b"hello\n")
    with pytest.raises(UserInputError, match=r"^checkpoint .*last\.pth is damaged: .*, and the previous checkpoint "
                                             r"cannot be used either: cannot read checkpoint .*prev\.pth: it is not a file torch.save wrote"):
        ckpt_util.load_latest_checkpoint(os.path.join(out, "checkpoint-last.pth"), use_previous=True)


def test_resume_with_a_flipped_bit_or_another_models_checkpoint_uses_the_previous_one(run_main, tiny_data,
                                                                                     two_checkpoints, tmp_path,
                                                                                     capsys):
    from models import create_model
    for case in ("flipped bit", "other model"):
        out = str(tmp_path / case.replace(" ", "_"))
        shutil.copytree(two_checkpoints, out)
        last = os.path.join(out, "checkpoint-last.pth")
        if case == "flipped bit":
            flip_tensor_byte(last)
            problem = "is damaged: its record"
        else:
            import argparse
            torch.save({"model": create_model("fractalar_tiny", class_num=2).state_dict(), "epoch": 1,
                        "args": argparse.Namespace(model="fractalar_tiny")}, last)
            problem = "does not fit --model fractalmar_tiny: it was saved by --model fractalar_tiny"
        run_main(*train_argv(tiny_data, out))
        text = capsys.readouterr().out
        assert problem in text and "resuming from the previous checkpoint" in text, text
        assert f"resumed {out}/checkpoint-prev.pth: epoch 0 done, continuing at epoch 1" in text


def test_verification_ignores_files_without_checksums(tmp_path):
    """torch.save with CRC computation off stores 0s; such files load unchecked."""
    path = str(tmp_path / "nocrc.pth")
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"model": {"w": torch.ones(10)}}, path)
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(ckpt_util.load_checkpoint(path)["model"]["w"], torch.ones(10))


# ---------------------------------------------------------------------- one writer per output folder
HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from util import claim
c = claim.claim(sys.argv[1])
if len(sys.argv) > 2:  # a forked child (a DataLoader worker) outlives the holder
    import os
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
print("claimed", flush=True)
time.sleep(60)
"""


def start_holder(folder, tmp_path, fork=False):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER.format(repo=REPO))
    proc = subprocess.Popen([sys.executable, str(script), folder, *(["fork"] if fork else [])], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "claimed"
    return proc


def test_a_second_run_on_a_claimed_folder_is_refused_naming_the_holder(run_main, tiny_data, tmp_path):
    import socket
    out = str(tmp_path / "run")
    holder = start_holder(out, tmp_path)
    try:
        with pytest.raises(SystemExit) as stop:
            run_main(*train_argv(tiny_data, out, epochs=1))
        assert stop.value.code.startswith(f"error: --output_dir {out} is in use by another run (host "
                                          f"{socket.gethostname()}, pid {holder.pid}, since ")
        assert stop.value.code.endswith("wait for it to end or stop it, or pass another --output_dir")
        assert os.listdir(out) == [claim.LOCK_NAME]  # nothing of ours written
    finally:
        holder.kill()
        holder.wait()


def test_the_claim_of_a_killed_run_is_taken_over_even_while_its_workers_live(run_main, tiny_data, tmp_path, capsys):
    """A SIGKILLed run leaves its claim file; the lock went with the process, also while a
    process it forked (as DataLoader workers are) lives on. The next run takes over, says
    so, and removes the claim at its end."""
    out = str(tmp_path / "run")
    holder = start_holder(out, tmp_path, fork=True)
    holder.kill()
    holder.wait()
    try:
        run_main(*train_argv(tiny_data, out, epochs=1))
        text = capsys.readouterr().out
        assert f"{out} was claimed by a run that ended without giving it up (host " in text
        assert f"pid {holder.pid}" in text and "taking it over" in text
        assert claim.LOCK_NAME not in os.listdir(out)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


def test_claims_exclude_each_other_and_clean_up(tmp_path):
    folder = str(tmp_path / "a" / "b")
    first = claim.claim(folder)
    assert json.load(open(os.path.join(folder, claim.LOCK_NAME)))["pid"] == os.getpid()
    first.release()
    first.release()  # idempotent
    assert not os.path.exists(str(tmp_path / "a"))  # folders the claim made are gone when left empty
    second = claim.claim(folder)
    open(os.path.join(folder, "keep.txt"), "w").close()
    second.release()
    assert os.listdir(folder) == ["keep.txt"]


# ---------------------------------------------------------------------- DataLoader workers of a killed run
WORKER_AND_MAIN = """
import os, signal, sys, time, multiprocessing as mp
from multiprocessing import connection, process, resource_sharer
sys.path.insert(0, {repo!r})
from util import preempt

def worker(queue):  # a DataLoader worker: shares a batch's memory by fd, as torch does on Linux
    preempt.ignore_in_worker()
    read, write = os.pipe()
    queue.put(resource_sharer.DupFd(read)._id)
    time.sleep(3)

def main_process(address):  # connects to fetch the fd, and is killed right then
    connection.Client(address, authkey=process.current_process().authkey)
    time.sleep(60)

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    w = ctx.Process(target=worker, args=(queue,))
    w.start()
    address, key = queue.get()
    m = ctx.Process(target=main_process, args=(address,))
    m.start()
    time.sleep(1)
    os.kill(m.pid, signal.SIGKILL)
    w.join()
"""


def test_a_worker_whose_main_process_was_killed_prints_no_traceback(tmp_path, child_env):
    """kill -9 of the main process while it fetches shared memory from a worker: the
    worker's fd-sharing thread meets a broken connection; it must not print it."""
    script = tmp_path / "workers.py"
    script.write_text(WORKER_AND_MAIN.format(repo=REPO))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=child_env)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]


FORKED_WORKER = """
import os, socket, sys, time
sys.path.insert(0, {repo!r})
from util import preempt
conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))  # as a rank's gloo connection
if os.fork() == 0:  # a DataLoader worker forked after the process group started
    preempt.worker_init()
    time.sleep(60)
    os._exit(0)
print("ready", flush=True)
time.sleep(60)
"""


def test_a_killed_rank_looks_dead_at_once_although_its_workers_live(tmp_path, child_env):
    """A rank's DataLoader workers are forked after its TCP connections to the other ranks
    exist; their copies must be closed, or a killed rank's connections stay open (and the
    other ranks wait) until its workers notice and exit."""
    import socket
    script = tmp_path / "rank.py"
    script.write_text(FORKED_WORKER.format(repo=REPO))
    with socket.create_server(("127.0.0.1", 0)) as server:
        rank = subprocess.Popen([sys.executable, str(script), str(server.getsockname()[1])], stdout=subprocess.PIPE,
                                text=True, env=child_env, start_new_session=True)
        try:
            peer, _ = server.accept()
            assert rank.stdout.readline().strip() == "ready"
            rank.kill()
            rank.wait()
            peer.settimeout(10)
            assert peer.recv(1) == b""  # the connection closed: the rank's death is visible
        finally:
            os.killpg(rank.pid, signal.SIGKILL)


# ---------------------------------------------------------------------- signals during start-up
SIGNAL_DURING_IMPORTS = """
import importlib.abc, os, runpy, signal, sys
sys.path.insert(0, {repo!r})

class SignalOnImport(importlib.abc.MetaPathFinder):  # the signal arrives inside `import torch`
    def find_spec(self, name, path, target=None):
        if name == "torch.nn":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.{signal})
        return None

sys.meta_path.insert(0, SignalOnImport())
sys.argv = ["main_fractalgen.py", *sys.argv[1:]]
runpy.run_path(os.path.join({repo!r}, "main_fractalgen.py"), run_name="__main__")
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_during_the_imports_stops_with_one_line_and_writes_nothing(tiny_data, tmp_path, child_env, sig):
    script = tmp_path / "launch.py"
    script.write_text(SIGNAL_DURING_IMPORTS.format(repo=REPO, signal=sig))
    out = str(tmp_path / "run")
    done = subprocess.run([sys.executable, str(script), *train_argv(tiny_data, out)], capture_output=True, text=True,
                          timeout=120, env=child_env, cwd=REPO)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
    assert done.stdout.strip().splitlines() == [f"rank 0: stopped by {sig} during start-up; nothing was trained or "
                                                f"saved. To go on, rerun the same command"]
    assert not os.path.exists(out)


def test_a_signal_while_the_run_starts_stops_before_the_first_step(run_main, tiny_data, tmp_path, monkeypatch,
                                                                  capsys):
    from util import data as data_util
    build = data_util.build_dataset

    def signalled_while_reading_the_data(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return build(*args, **kwargs)
    monkeypatch.setattr(data_util, "build_dataset", signalled_while_reading_the_data)
    out = str(tmp_path / "run")
    result = run_main(*train_argv(tiny_data, out))
    assert result["stopped"] == {"signal": "SIGTERM", "checkpoint": None}
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "rank 0: stopped by SIGTERM before the first training step; nothing was trained or saved. To go on, rerun "
        "the same command")
    assert not os.path.exists(os.path.join(out, "checkpoint-last.pth"))


# ---------------------------------------------------------------------- --evaluate_gen resumes
KILLED_MID_PNG = """
import contextlib, os, signal, sys
sys.path.insert(0, {repo!r})
from util import misc
replacing, written = misc.replacing, []

@contextlib.contextmanager
def killed_at_the_third_png(path, tmp=None):
    with replacing(path, tmp) as temp:
        yield temp
        if str(path).endswith(".png"):
            written.append(path)
            if len(written) == 3:  # its bytes are in the temp file, not yet under its name
                os.kill(os.getpid(), signal.SIGKILL)
misc.replacing = killed_at_the_third_png
from main_fractalgen import script_main
script_main(sys.argv[1:])
"""


@pytest.fixture
def features_instead_of_fid(monkeypatch):
    """FID's 2048x2048 eigendecomposition takes a minute on a busy CPU: keep the Inception
    features it would be computed from instead (equal features, equal FID and IS)."""
    import engine_fractalgen
    seen = []

    def keep(gathered, stats, real=None):
        seen.append({name: value.clone() for name, value in gathered.items()})
        return {"fid": float(len(seen)), "inception_score": 0.0}
    monkeypatch.setattr(engine_fractalgen.fid, "compute_metrics", keep)
    return seen


def test_evaluate_gen_killed_mid_write_resumes_to_the_folder_of_an_uninterrupted_run(run_main, fid_stats,
                                                                                    inception_weights, tmp_path,
                                                                                    child_env, capsys,
                                                                                    features_instead_of_fid):
    from models import create_model
    torch.manual_seed(0)
    weights = str(tmp_path / "weights.pth")
    torch.save({"model": create_model("fractalar_tiny", class_num=2).state_dict()}, weights)

    def argv(out):
        return [str(a) for a in ["--model", "fractalar_tiny", "--resume", weights, "--output_dir", out, "--device",
                                 "cpu", "--threads", 1, "--num_workers", 0, "--evaluate_gen", "--num_images", 6,
                                 "--gen_bsz", 2, "--class_num", 2, "--num_iter_list", "4,4", "--seed", 5,
                                 "--fid_stats_path", fid_stats, "--inception_weights", inception_weights]]
    straight = run_main(*argv(str(tmp_path / "straight")))["gen"]

    out = str(tmp_path / "resumed")
    script = tmp_path / "killed.py"
    script.write_text(KILLED_MID_PNG.format(repo=REPO))
    killed = subprocess.run([sys.executable, str(script), *argv(out)], capture_output=True, text=True, timeout=300,
                            env=child_env, cwd=REPO)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    folder = os.path.join(out, os.path.basename(straight["folder"]))
    names = sorted(os.listdir(folder))
    assert names[:3] == ["00000.png", "00001.png", "00002.png.tmp-" + names[2].rsplit("-", 1)[1]], names
    open(os.path.join(folder, "00005.png"), "wb").close()  # a 0-byte PNG, as earlier versions left
    first = os.stat(os.path.join(folder, "00000.png")).st_mtime_ns
    capsys.readouterr()

    run_main(*argv(out))
    text = capsys.readouterr().out
    assert f"{folder} holds 3 images of an interrupted run with the same settings and weights" in text, text
    assert "generated 6 images into" in text and "2 of them kept from an interrupted run" in text, text
    assert os.stat(os.path.join(folder, "00000.png")).st_mtime_ns == first  # kept, not generated again
    assert sorted(os.listdir(folder)) == [f"{i:05d}.png" for i in range(6)]  # no temp file left
    assert open(folder + ".json").read() == open(straight["folder"] + ".json").read()
    for name in os.listdir(folder):
        assert open(os.path.join(folder, name), "rb").read() == open(os.path.join(straight["folder"], name),
                                                                     "rb").read(), name
    first_run, second_run = features_instead_of_fid  # the features FID and IS are computed from
    assert first_run.keys() == second_run.keys()
    assert all(torch.equal(first_run[name], second_run[name]) for name in first_run)


def test_evaluate_gen_regenerates_a_folder_of_other_settings(run_main, fid_stats, inception_weights, tmp_path,
                                                             capsys, features_instead_of_fid):
    from models import create_model
    torch.manual_seed(0)
    weights = str(tmp_path / "weights.pth")
    torch.save({"model": create_model("fractalar_tiny", class_num=2).state_dict()}, weights)
    argv = ["--model", "fractalar_tiny", "--resume", weights, "--output_dir", str(tmp_path / "out"), "--device",
            "cpu", "--num_workers", 0, "--evaluate_gen", "--num_images", 2, "--gen_bsz", 2, "--class_num", 2,
            "--num_iter_list", "4,4", "--fid_stats_path", fid_stats, "--inception_weights", inception_weights]
    folder = run_main(*argv, "--seed", 1)["gen"]["folder"]
    before = open(os.path.join(folder, "00000.png"), "rb").read()
    capsys.readouterr()
    run_main(*argv, "--seed", 2)
    assert f"removed 2 images from {folder}: they were generated with other settings or weights" in \
        capsys.readouterr().out
    assert open(os.path.join(folder, "00000.png"), "rb").read() != before


# ---------------------------------------------------------------------- a resume with other settings
@pytest.fixture(scope="module")
def mid_epoch(tiny_data, tmp_path_factory):
    """A run stopped (SIGTERM) after step 2 of 3 in epoch 1, checkpointed there."""
    out = str(tmp_path_factory.mktemp("mid"))
    step, calls = torch.optim.AdamW.step, []

    def signal_at_step_4(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, *args, **kwargs)
    torch.optim.AdamW.step = signal_at_step_4
    try:
        result = main_in_one_thread(train_argv(tiny_data, out, "--seed", 3))
    finally:
        torch.optim.AdamW.step = step
    assert result["stopped"]["step"] == 2
    return out


@pytest.mark.parametrize("change", ["--seed", "data size", "--batch_size"])
def test_a_resume_with_another_data_order_says_so_and_restarts_the_epoch(run_main, tiny_data, mid_epoch, tmp_path,
                                                                         capsys, change):
    out = str(tmp_path / "run")
    shutil.copytree(mid_epoch, out)
    data, extra = tiny_data, ["--seed", 3]
    if change == "--seed":
        extra = ["--seed", 4]
    elif change == "data size":  # 13 images: still 3 steps of 4, so only the count tells
        data = str(tmp_path / "data")
        shutil.copytree(tiny_data, data)
        shutil.copy(os.path.join(data, "train", "class0", "000.png"), os.path.join(data, "train", "class0", "x.png"))
    else:  # the learning rate follows the batch from the same --blr: no change of recipe, said
        extra += ["--batch_size", 3]
    capsys.readouterr()
    run_main(*train_argv(data, out, *map(str, extra)))
    text = capsys.readouterr().out
    what = {"--seed": "--seed 3 -> 4", "data size": "training images 12 -> 13",
            "--batch_size": "--batch_size 4 -> 3"}[change]
    assert (f"warning: {out}/checkpoint-last.pth stopped after step 2 of epoch 1, but the data order differs now "
            f"({what}") in text, text
    assert "the rest of that epoch is not defined; restarting epoch 1 from its first step" in text
    assert "continuing at epoch 1" in text
    assert ("note: the learning rate follows the effective batch (--blr 5e-05 x 3 / 256): lr 7.8125e-07 -> "
            "5.85938e-07" in text) == (change == "--batch_size"), text
    lines = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    assert [line["epoch"] for line in lines] == [0, 1]


def test_a_resume_with_another_learning_rate_is_refused_unless_allowed(run_main, tiny_data, mid_epoch, tmp_path,
                                                                       capsys):
    out = str(tmp_path / "run")
    shutil.copytree(mid_epoch, out)
    before = open(os.path.join(out, "checkpoint-last.pth"), "rb").read()
    with pytest.raises(SystemExit) as stop:
        run_main(*train_argv(tiny_data, out, "--seed", 3, "--blr", 2e-4))
    assert stop.value.code == (f"error: {out}/checkpoint-last.pth was trained with another recipe (lr 7.8125e-07 -> "
                               f"3.125e-06): resuming would train on with other learning rates than the run it "
                               f"continues; rerun with its values, or pass --allow_recipe_change to go on with the "
                               f"new ones")
    assert open(os.path.join(out, "checkpoint-last.pth"), "rb").read() == before
    capsys.readouterr()
    run_main(*train_argv(tiny_data, out, "--seed", 3, "--blr", 2e-4, "--allow_recipe_change"))
    text = capsys.readouterr().out
    assert (f"warning: training on from {out}/checkpoint-last.pth with another recipe: lr 7.8125e-07 -> 3.125e-06"
            in text)
    assert "continuing at step 2 of epoch 1" in text


# ---------------------------------------------------------------------- odd data
def odd_dataset(tmp_path, kind):
    """The tiny ImageFolder (2 classes x 6, 20x24) plus one odd entry in class0."""
    import struct
    import zlib
    import numpy as np
    from PIL import Image
    from conftest import write_imagefolder
    root = str(tmp_path / kind)
    write_imagefolder(os.path.join(root, "train"), (6, 6), seed=0)
    folder = os.path.join(root, "train", "class0")
    if kind == "loop":
        os.symlink("..", os.path.join(folder, "loop"))  # class0/loop -> train/, which holds class0
    elif kind == "16-bit":
        Image.fromarray(np.full((20, 24), 60000, dtype=np.uint16)).save(os.path.join(folder, "grey16.png"))
    else:  # a PNG that declares 20000 x 20000 pixels (2.2x PIL's limit) in a few hundred bytes
        def chunk(tag, data):
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
        header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
        with open(os.path.join(folder, "bomb.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 20001))
                    + chunk(b"IEND", b""))
    return root


def check_data_output(root, capture):
    from util import check_data
    capture.readouterr()
    code = check_data.main([root, "--workers", "1"])
    return code, capture.readouterr().out


def test_a_symlink_loop_is_reported_by_check_data_and_refused_by_training(run_main, tmp_path, capsys):
    root = odd_dataset(tmp_path, "loop")
    link = os.path.join(root, "train", "class0", "loop")
    problem = (f"{link} is a symlink loop: it leads back to {os.path.join(root, 'train')}, which contains it, so the "
               f"images below it would be read again and again; remove the link")
    code, out = check_data_output(root, capsys)
    assert code == 1 and problem in out.splitlines(), out
    assert "checked 12 images" in out and "1 symlink loop(s)" in out
    with pytest.raises(SystemExit) as stop:
        run_main(*train_argv(root, str(tmp_path / "out"), epochs=1))
    assert stop.value.code == f"error: {problem}"


def test_a_16_bit_image_is_scaled_not_clipped_and_check_data_says_so(run_main, tmp_path, capsys):
    import numpy as np
    from util import data as data_util
    root = odd_dataset(tmp_path, "16-bit")
    path = os.path.join(root, "train", "class0", "grey16.png")
    image, note = data_util.read_rgb(path)
    assert np.asarray(image).max() == np.asarray(image).min() == 60000 >> 8  # 234, not 255
    assert note == "16-bit grey (I;16): scaled to 8 bits"
    assert data_util.load_rgb(path).tobytes() == image.tobytes()  # training reads the same pixels
    code, out = check_data_output(root, capsys)
    assert code == 0 and f"converted as training does: 1 image(s) of 16-bit grey (I;16): scaled to 8 bits, e.g. " \
                         f"{path}" in out, out


def test_a_decompression_bomb_is_one_line_in_check_data_and_in_training(run_main, tmp_path, capfd):
    root = odd_dataset(tmp_path, "bomb")
    path = os.path.join(root, "train", "class0", "bomb.png")
    code, out = check_data_output(root, capfd)
    line = next(line for line in out.splitlines() if line.startswith(f"cannot read image {path}"))
    assert code == 1 and "it is a decompression bomb" in line and line.endswith("remove it or make it smaller")
    with pytest.raises(SystemExit) as stop:
        run_main(*train_argv(root, str(tmp_path / "out"), "--num_workers", 1, "--batch_size", 13, epochs=1))
    assert stop.value.code == f"error: {line}"  # the same sentence, from a DataLoader worker
    assert "Traceback" not in capfd.readouterr().err


def test_the_online_evaluation_folder_of_a_killed_run_is_removed_at_start(run_main, tiny_data, tmp_path, capsys):
    out = str(tmp_path / "run")
    stale = os.path.join(out, "tmp-gen-iter16-16-cfg1.0linear-temp1.0-filter0.0001-image12")
    os.makedirs(stale)
    open(os.path.join(stale, "00000.png"), "wb").close()
    run_main(*train_argv(tiny_data, out, epochs=1))
    assert (f"removed {os.path.basename(stale)} from {out} (left by an online evaluation that was killed)"
            in capsys.readouterr().out)
    assert not os.path.exists(stale)
