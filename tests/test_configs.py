"""Configurations as data: the table of named models, JSON files of your own (any level
structure whose sizes divide), one-line errors for bad records, checkpoints that carry
their record, and the import layering (models/ imports nothing from util/; util/ has no
import cycle)."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from models import CONFIGS, DEFAULT_SAMPLING, MODELS, UserInputError, create_model, get_config, load_model
from models.config import CONFIG_KEYS

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = ["fractalar_in64", "fractalmar_in64", "fractalmar_base_in256", "fractalmar_large_in256",
            "fractalmar_huge_in256"]


def tiny_record(**overrides):
    record = dict(img_size_list=[16, 4, 1], embed_dim_list=[32, 16, 8], num_blocks_list=[1, 1, 1],
                  num_heads_list=[2, 2, 2], generator_type_list=["mar", "mar", "ar"], num_conds=5, class_num=3)
    record.update(overrides)
    return record


def write_json(path, record):
    path.write_text(json.dumps(record, indent=1))
    return str(path)


# ---------------------------------------------------------------- the table
def test_named_models_are_rows_of_one_table():
    assert list(MODELS) == list(CONFIGS) and set(OFFICIAL) <= set(CONFIGS)
    for name, factory in MODELS.items():
        assert factory.__name__ == name and getattr(models, name) is factory
        record = CONFIGS[name]
        assert set(record) <= set(CONFIG_KEYS) | {"sampling"}
        assert DEFAULT_SAMPLING[name] == dict(record["sampling"], num_iter_list=tuple(record["sampling"]["num_iter_list"]))
        with torch.device("meta"):
            model = factory(class_num=7)
        assert model.model_name == name
        config = model.config
        assert set(config) == set(CONFIG_KEYS) | {"sampling"}  # complete: every keyword
        assert {k: config[k] for k in record} == get_config(name)
        assert config["class_num"] == 7 and config["sampling"] == record["sampling"]
    # a keyword overrides the row; the row itself is untouched
    with torch.device("meta"):
        assert models.fractalmar_in64(num_conds=1).config["num_conds"] == 1
    assert CONFIGS["fractalmar_in64"]["num_conds"] == 5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trips_through_a_json_file(name, tmp_path):
    with torch.device("meta"):
        model = create_model(name, class_num=11, r_weight=5.0)
        path = write_json(tmp_path / "cfg.json", model.config)
        again = create_model(path)
    assert again.config == model.config and again.model_name == "cfg"
    assert [(k, v.shape) for k, v in again.state_dict().items()] == [(k, v.shape) for k, v in model.state_dict().items()]


def test_create_model_of_a_record_builds_the_same_weights_as_the_factory():
    torch.manual_seed(0)
    a = models.fractalmar_tiny(class_num=3)
    torch.manual_seed(0)
    b = create_model(dict(a.config))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


# ---------------------------------------------------------------- any level structure
STRUCTURES = {
    "28-4-1 ar/ar": dict(img_size_list=[28, 4, 1], generator_type_list=["ar", "ar", "ar"], num_conds=1),
    "28-4-1 ar over mar": dict(img_size_list=[28, 4, 1], generator_type_list=["ar", "mar", "ar"], num_conds=1),
    "32-8-1 mar over ar": dict(img_size_list=[32, 8, 1], generator_type_list=["mar", "ar", "ar"]),
    "12-6-2-1 mar/mar/ar": dict(img_size_list=[12, 6, 2, 1], embed_dim_list=[32, 16, 16, 8],
                                num_blocks_list=[1, 1, 1, 1], num_heads_list=[2, 2, 2, 2],
                                generator_type_list=["mar", "mar", "ar", "ar"], num_conds=5),
}


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_other_level_structures_train_and_sample(name, tmp_path, one_thread):
    path = write_json(tmp_path / "structure.json", tiny_record(**STRUCTURES[name]))
    torch.manual_seed(0)
    model = create_model(path).train()
    size = model.img_size
    images = models.from_uint8(torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8))
    loss = model(images, torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    out = model.generate([1], num_iter_list=[2] * (model.num_fractal_levels - 1), cfg=2.0)
    assert out.shape == (1, 3, size, size) and out.dtype == torch.uint8


def test_a_large_three_level_structure_builds():
    with torch.device("meta"):
        model = create_model(dict(img_size_list=[128, 16, 4, 1], embed_dim_list=[512, 256, 128, 64],
                                  num_blocks_list=[8, 4, 2, 1], num_heads_list=[8, 4, 4, 4],
                                  generator_type_list=["mar", "mar", "mar", "ar"], num_conds=5, guiding_pixel=True))
    assert [level.generator.seq_len for level in model.levels()] == [64, 16, 16]


# ---------------------------------------------------------------- bad records
BAD = {
    "sizes do not divide": (dict(img_size_list=[16, 5, 1]), r"img_size_list\[1\]=5 does not divide img_size_list\[0\]=16"),
    "last size not 1": (dict(img_size_list=[16, 4, 2]), r"the last entry must be 1"),
    "heads do not divide": (dict(num_heads_list=[3, 2, 2]), r"num_heads_list\[0\]=3 does not divide embed_dim_list\[0\]=32"),
    "pixel head heads": (dict(num_heads_list=[2, 2, 3]), r"num_heads_list\[2\]=3 .*the pixel head"),
    "unknown generator": (dict(generator_type_list=["mar", "gpt", "ar"]), r"generator_type_list\[1\] 'gpt' is not a generator type; use one of ar, mar"),
    "lists of different lengths": (dict(num_blocks_list=[1, 1]), r"num_blocks_list has 2 entries but img_size_list has 3; give one per level"),
    "unknown key": (dict(embed_dims=[32, 16, 8]), r"unknown key 'embed_dims'; did you mean 'embed_dim_list'\?"),
    "missing list": (dict(num_heads_list=None), r"num_heads_list is missing; a configuration needs"),
    "string for an int": (dict(num_conds="5"), r"num_conds must be a whole number, got '5'"),
    "string for a list": (dict(img_size_list="16,4,1"), r"img_size_list must be a list with one entry per level"),
    "float in a list": (dict(embed_dim_list=[32, 16.5, 8]), r"embed_dim_list\[1\] must be a whole number, got 16.5"),
    "bool for an int": (dict(class_num=True), r"class_num must be a whole number, got True"),
    "zero width": (dict(embed_dim_list=[32, 0, 8]), r"embed_dim_list\[1\] must be at least 1, got 0"),
    "string for a flag": (dict(guiding_pixel="yes"), r"guiding_pixel must be true or false"),
    "dropout out of range": (dict(attn_dropout=1.5), r"attn_dropout must be a number in \[0, 1\)"),
    "num_conds too many": (dict(num_conds=6), r"num_conds must be between 1 and 5"),
    "mar under ar": (dict(generator_type_list=["ar", "mar", "ar"]), r"MAR level with num_conds=5 cannot sit below an AR"),
    "ar head size": (dict(generator_type_list=["ar", "ar", "ar"], num_conds=1, num_heads_list=[16, 2, 2]), r"head size divisible by 4"),
    "sampling key": (dict(sampling=dict(tempreature=1.0)), r"sampling key\(s\) 'tempreature' unknown"),
    "sampling iterations": (dict(sampling=dict(num_iter_list=[4])), r"sampling num_iter_list \[4\] has 1 entries but the model has 2"),
    "sampling temperature": (dict(sampling=dict(temperature=-1)), r"sampling temperature must be a finite number above 0"),
    "sampling schedule": (dict(sampling=dict(cfg_schedule="cosine")), r"sampling cfg_schedule must be one of linear, constant"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_record_is_one_sentence_naming_the_field(case, tmp_path):
    overrides, message = BAD[case]
    record = {k: v for k, v in tiny_record(**overrides).items() if v is not None}
    path = write_json(tmp_path / "bad.json", record)
    with pytest.raises(UserInputError, match=message) as err:
        create_model(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: ")
    with pytest.raises(UserInputError, match=message):  # the same check for a dict
        create_model(record)


def test_files_that_are_not_records(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"img_size_list": [16, 4, 1],')
    with pytest.raises(UserInputError, match=r"broken.json is not valid JSON \(line 1"):
        create_model(str(broken))
    listed = tmp_path / "list.json"
    listed.write_text("[16, 4, 1]")
    with pytest.raises(UserInputError, match=r"must hold a JSON object of FractalGen keywords"):
        create_model(str(listed))
    with pytest.raises(UserInputError, match=r"configuration file .*missing.json does not exist"):
        create_model(str(tmp_path / "missing.json"))
    with pytest.raises(UserInputError, match=r"unknown model 'fractal_nope'; choose one of: fractalar_in64"):
        create_model("fractal_nope")


def test_every_entry_point_refuses_a_bad_file_before_writing(run_main, tiny_data, tmp_path, capsys):
    bad = write_json(tmp_path / "bad.json", tiny_record(num_heads_list=[3, 2, 2]))
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"^error: --model .*bad.json: num_heads_list\[0\]=3 does not divide"):
        run_main("--model", bad, "--data_path", tiny_data, "--output_dir", out, "--device", "cpu")
    assert not out.exists()
    from demo import sample
    with pytest.raises(SystemExit, match=r"^error: --model .*bad.json: num_heads_list\[0\]=3"):
        sample.main(["--ckpt", str(tmp_path / "none"), "--model", bad, "--output", str(out / "x.png")])
    from util import benchmark
    with pytest.raises(SystemExit, match=r"--configs .*bad.json: num_heads_list\[0\]=3"):
        benchmark.main(["--configs", bad, "--phases", "eval"])
    with pytest.raises(SystemExit, match=r"neither a model name .* nor a JSON configuration file"):
        run_main("--model", "fractalmar_inn64", "--data_path", tiny_data, "--output_dir", out, "--device", "cpu")
    assert not out.exists()


def test_benchmark_takes_a_json_configuration(tmp_path, one_thread):
    from util import benchmark
    path = write_json(tmp_path / "small.json", tiny_record(img_size_list=[8, 4, 1], class_num=10,
                                                            sampling=dict(num_iter_list=[2, 2], cfg=1.5)))
    report = benchmark.main(["--configs", path, "--phases", "eval", "sample", "--steps", "1", "--warmup", "0",
                             "--eval_batch", "2", "--sample_batch", "1", "--no_flops"])
    row = report["results"][0]
    assert row["config"] == path and row["sampling"]["num_iter_list"] == [2, 2] and row["sampling"]["cfg"] == 1.5


# ---------------------------------------------------------------- checkpoints carry their record
def test_official_checkpoints_without_a_record_load_as_before(tmp_path):
    import argparse
    path = tmp_path / "fractalmar_tiny" / "checkpoint-last.pth"
    path.parent.mkdir()
    state = create_model("fractalmar_tiny", class_num=5).state_dict()
    torch.save({"model": state, "args": argparse.Namespace(model="fractalmar_tiny", num_conds=5)}, path)
    model = load_model(str(path.parent))
    assert model.model_name == "fractalmar_tiny" and model.class_num == 5
    assert model.config == create_model("fractalmar_tiny", class_num=5).config


def test_a_stored_record_is_checked_like_a_file(tmp_path):
    model = create_model(tiny_record())
    config = dict(model.config, num_heads_list=[3, 2, 2])
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": model.state_dict(), "config": config}, path)
    with pytest.raises(UserInputError, match=r"its 'config' entry: num_heads_list\[0\]=3 does not divide"):
        load_model(str(path))
    torch.save({"model": model.state_dict(), "config": model.config}, path)
    assert load_model(str(path)).config == model.config  # no args, no JSON: the record alone


# ---------------------------------------------------------------- import layering
def imports_of(path):
    """Top-level module names each import statement of a file reaches (lazy ones included)."""
    tree = ast.parse(Path(path).read_text(), filename=str(path))
    package = Path(path).parent.name
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the file's own package
                base = package if not node.module else f"{package}.{node.module}"
                found += [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                found += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def util_graph():
    """util module -> the util modules it imports."""
    names = {p.stem for p in (REPO / "util").glob("*.py")} - {"__init__"}
    graph = {}
    for name in names:
        reached = set()
        for target in imports_of(REPO / "util" / f"{name}.py"):
            parts = target.split(".")
            if parts[0] == "util" and len(parts) > 1 and parts[1] in names:
                reached.add(parts[1])
        graph[name] = reached - {name}
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_models_import_nothing_from_util():
    offenders = [f"{path.name}: {target}" for path in sorted((REPO / "models").glob("*.py"))
                 for target in imports_of(path) if target.split(".")[0] == "util"]
    assert offenders == []


def test_util_has_no_import_cycle():
    assert find_cycle(util_graph()) is None
    # the checker sees the cycle there was
    assert find_cycle({"misc": {"validation"}, "validation": {"fid"}, "fid": {"misc"}}) == \
        ["fid", "misc", "validation", "fid"]


def test_importing_models_loads_no_util_module(child_env):
    code = "import sys, models; print(sorted(m for m in sys.modules if m == 'util' or m.startswith('util.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- end to end
def test_a_json_structure_trains_resumes_evaluates_samples_and_reloads_without_its_file(run_main, tiny_data,
                                                                                        tmp_path, capsys):
    """28 -> 4 -> 1 with AR over MAR, a structure none of the named models has, through
    every entry point; after the first epoch the JSON file is deleted: the checkpoint alone
    rebuilds the model for resuming, NLL, sampling and models.load_model."""
    from demo import sample
    from util.checkpoint import load_checkpoint
    cfg = write_json(tmp_path / "digits28.json", dict(
        img_size_list=[28, 4, 1], embed_dim_list=[32, 16, 16], num_blocks_list=[1, 1, 1], num_heads_list=[4, 2, 2],
        generator_type_list=["ar", "mar", "ar"], num_conds=1, sampling=dict(num_iter_list=[49, 4], cfg=1.5)))
    out = tmp_path / "run"
    common = ["--data_path", tiny_data, "--output_dir", out, "--device", "cpu", "--batch_size", 4,
              "--warmup_epochs", 1, "--num_workers", 0, "--blr", "1e-3"]
    first = run_main("--model", cfg, "--epochs", 1, *common)
    record = first["model"].config
    ckpt = load_checkpoint(str(out / "checkpoint-last.pth"))
    assert ckpt["config"] == record and record["img_size_list"] == [28, 4, 1] and record["r_weight"] == 5.0
    os.remove(cfg)

    resumed = run_main("--resume", out, "--epochs", 2, *common)  # no --model: the checkpoint's record
    assert resumed["model"].config == record and resumed["model"].model_name == "digits28"
    assert load_checkpoint(str(out / "checkpoint-last.pth"))["epoch"] == 1
    assert "resumed" in capsys.readouterr().out

    nll = run_main("--resume", out, "--evaluate_nll", "--nll_bsz", 5, *common)["nll"]
    assert nll["images"] == 5 and 0 < nll["bpd"] < 8.5  # 8 bits/dim: a uniform guess
    print(f"\nbits/dim digits28 (28-4-1, AR over MAR, 2 epochs): {nll['bpd']:.4f}")

    png = tmp_path / "samples.png"
    sample.main(["--ckpt", str(out), "--labels", "0", "1", "--output", str(png), "--device", "cpu"])
    assert png.is_file()
    model = load_model(str(out))
    assert model.config == record and model.model_name == "digits28"
    assert model.sampling_config() == dict(num_iter_list=(49, 4), cfg=1.5, cfg_schedule="linear", temperature=1.0,
                                           filter_threshold=1e-4)
    weights = resumed["model"].state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert model.generate([0]).shape == (1, 3, 28, 28)
