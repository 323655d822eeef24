"""Turn a checkpoint into a Hub folder: config.json + model.safetensors + README.md.

    python -m util.export pretrained_models/fractalmar_in64 hub/fractalmar_in64    # an official checkpoint
    python -m util.export quickstart_out/train hub/quickstart                      # one main_fractalgen.py wrote
    python -m util.export quickstart_out/train hub/quickstart --push_to_hub USER/NAME   # and upload it

The checkpoint is read as models.load_model reads it: torch.load with weights_only=True
(nothing but tensors, plain containers and argparse.Namespace is unpickled), its EMA
weights when it has them (--no_ema: the raw ones; config.json says which), the
architecture from its configuration record (official files: from their args or folder
name, or --model). The folder is written beside OUT and renamed into place only once it
is complete and checked: its configuration rebuilds the same record and its weights equal
the checkpoint's, tensor by tensor. --push_to_hub uploads it through huggingface_hub
(log in first: `hf auth login`); --time_load N times loading the checkpoint and the folder,
alternately, N times each.
"""
import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python util/export.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import load_model  # noqa: E402
from models.config import check_config, read_config_file  # noqa: E402
from models.hub import CONFIG_FILE, WEIGHTS_FILE, hub_endpoint, split_folder_config, unreachable  # noqa: E402
from models.zoo import DownloadError  # noqa: E402
from util.misc import UserInputError, one_line, write_error_message  # noqa: E402
from util.validation import positive_int  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description="Write a checkpoint as a Hub folder (config.json, model.safetensors, "
                                            "README.md), optionally upload it.")
    p.add_argument("ckpt", help="checkpoint file, folder holding checkpoint-last.pth, or an official model name")
    p.add_argument("out", help="the folder to write (must not exist yet, or be empty)")
    p.add_argument("--model", default=None,
                   help="architecture (a model name or a JSON configuration file), for an official checkpoint whose "
                        "args and folder do not say")
    p.add_argument("--download", action="store_true", help="fetch an official checkpoint named by CKPT if missing")
    p.add_argument("--no_ema", action="store_true",
                   help="export the raw weights of a checkpoint that has EMA weights (default: the EMA ones)")
    p.add_argument("--push_to_hub", default=None, metavar="USER/NAME",
                   help="also upload the folder to this Hub repository (created if missing; `hf auth login` first)")
    p.add_argument("--private", action="store_true", help="with --push_to_hub: create the repository private")
    p.add_argument("--time_load", type=int, default=0, metavar="N",
                   help="afterwards, load the checkpoint and the folder alternately N times each and print the times")
    return p


def check_out(out):
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserInputError(f"{out} already exists; pass a new folder for the export (or delete that one)")


def verify(model, folder):
    """The folder's config.json rebuilds model.config and its model.safetensors holds
    model's tensors exactly (read one at a time: no second model in memory)."""
    from safetensors import safe_open
    record, _, _ = split_folder_config(read_config_file(os.path.join(folder, CONFIG_FILE)), folder)
    rebuilt = check_config(record)
    expected = check_config(model.config)
    if {k: v for k, v in rebuilt.items() if k != "sampling"} != {k: v for k, v in expected.items() if k != "sampling"}:
        raise RuntimeError(f"{folder}/{CONFIG_FILE} does not rebuild the model's configuration")
    state = model.state_dict()
    with safe_open(os.path.join(folder, WEIGHTS_FILE), framework="pt") as f:
        if set(f.keys()) != set(state):
            raise RuntimeError(f"{folder}/{WEIGHTS_FILE} holds other tensors than the model")
        for key in f.keys():
            if not torch.equal(f.get_tensor(key), state[key].cpu()):
                raise RuntimeError(f"{folder}/{WEIGHTS_FILE}: {key} differs from the checkpoint's")


def export(model, out):
    """save_pretrained into a temporary folder beside `out`, check it, rename it to `out`."""
    tmp = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        verify(model, tmp)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (check_out)
        os.replace(tmp, out)
    except OSError as e:
        raise UserInputError(write_error_message(out, e, flag="OUT")) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def push(folder, repo_id, private=False):
    """Upload `folder` to the Hub repository `repo_id` through huggingface_hub; one sentence
    when it cannot."""
    from huggingface_hub import HfApi
    endpoint = hub_endpoint()
    reason = unreachable(endpoint)
    if reason:
        raise UserInputError(f"cannot reach the Hub at {endpoint} ({reason}); the folder {folder} is written: upload "
                             f"it later with `hf upload {repo_id} {folder}`")
    api = HfApi(endpoint=endpoint)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo.repo_id, folder_path=folder,
                                 commit_message="FractalGen model (python -m util.export)")
    except Exception as e:  # huggingface_hub's errors (token, HTTP, validation): one sentence each
        raise UserInputError(upload_error(e, repo_id, folder, endpoint)) from None


def upload_error(error, repo_id, folder, endpoint):
    from huggingface_hub import errors
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, errors.LocalTokenNotFoundError) or status in (401, 403):
        return (f"the Hub at {endpoint} needs a login with write access to create {repo_id}: run `hf auth login` "
                f"(or set HF_TOKEN), then `hf upload {repo_id} {folder}`")
    if isinstance(error, errors.HFValidationError):
        return f"{repo_id!r} is not a Hub repository id; use USER/NAME"
    if status is not None:
        return f"the Hub at {endpoint} answered {status} to the upload to {repo_id}: {first}"
    return f"cannot upload {folder} to {repo_id} at {endpoint}: {first}"


def time_loads(ckpt, folder, repeats, model_name=None):
    """{kind: [seconds, ...]} of load_model(ckpt) and load_model(folder), alternating
    (ABAB...) so that both see the same machine load and page cache."""
    times = {"checkpoint (.pth)": [], "Hub folder (.safetensors)": []}
    for i in range(repeats * 2):
        kind, source, name = (("checkpoint (.pth)", ckpt, model_name), ("Hub folder (.safetensors)", folder, None))[i % 2]
        start = time.perf_counter()
        model = load_model(source, name)
        times[kind].append(time.perf_counter() - start)
        del model
    return times


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except (UserInputError, DownloadError) as e:
        raise SystemExit(f"error: {one_line(e)}") from None


def run(args):
    check_out(args.out)
    if args.time_load:
        positive_int("--time_load", args.time_load)
    model = load_model(args.ckpt, args.model, download=args.download, ema=not args.no_ema)
    export(model, args.out)
    size = os.path.getsize(os.path.join(args.out, WEIGHTS_FILE)) / 2**20
    print(f"wrote {args.out}: {CONFIG_FILE}, {WEIGHTS_FILE} ({size:.1f} MB, {getattr(model, 'weights', None) or 'raw'} "
          f"weights of {model.model_name}), README.md; load it with models.load_model({args.out!r}) or "
          f"demo/sample.py --ckpt {args.out}")
    if args.push_to_hub:
        push(args.out, args.push_to_hub, args.private)
        print(f"uploaded to {hub_endpoint()}/{args.push_to_hub}: load it anywhere with "
              f"models.load_model('hf-hub:{args.push_to_hub}')")
    if args.time_load:
        del model
        for kind, seconds in time_loads(args.ckpt, args.out, args.time_load, args.model).items():
            print(f"load_model, {kind}: median {statistics.median(seconds):.2f}s, min {min(seconds):.2f}s "
                  f"over {len(seconds)} loads ({', '.join(f'{s:.2f}' for s in seconds)})")


if __name__ == "__main__":
    main()
