"""The README and docs/ as a user meets them: every command in them names flags that exist
and values that parse (each script's own parser reads it, with --help added so nothing
runs), every link resolves, what the commands write goes to git-ignored folders, the README
stays a short front door, and its training example is the quick start's command.

Commands are taken from ```bash blocks and from inline `python ...` / `torchrun ...` code
spans, so pages added later are checked the same way."""
import contextlib
import io
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import warnings

import pytest

from demo import quickstart

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs"))
                               if name.endswith(".md"))
README_MAX_LINES = 250
OUTPUT_FLAGS = ("--output_dir", "--output", "--out", "--gif", "--json", "--log_dir")
POSITIONAL_OUTPUTS = {"util.export": 1}  # script: index of the positional argument it writes
# launchers and tools that are not ours: their commands are not checked
FOREIGN = {"pip", "conda", "git", "jupyter", "tensorboard", "export", "srun", "scontrol", "cd", "ls"}


def read(page):
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        return f.read()


def command_lines(text, inline=True):
    """Shell command lines of a page: ```bash blocks (continuations joined, comments
    dropped, `&&` split) and, with `inline`, code spans that start with python or torchrun."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            lines += line.split("&&")
    if inline:
        lines += re.findall(r"(?<!`)`((?:python|torchrun)\s[^`]+)`", text)
    commands = []
    for line in lines:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote: shown as is
            words = line.split()
        if words:
            commands.append(words)
    return commands


def our_command(words):
    """(script or module, argv) for a command running one of our scripts, else None.
    `VAR=value` prefixes, `torchrun [its options]` and `python` are skipped."""
    words = [w for w in words if not re.match(r"^[A-Z_]+=", w)]
    if not words or words[0] in FOREIGN:
        return None
    if words[0] == "torchrun":
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        return (words[scripts[0]], words[scripts[0] + 1:]) if scripts else None
    if words[0] != "python":
        return None
    if words[1:2] == ["-m"]:
        return None if words[2] == "pytest" else (words[2], words[3:])
    return (words[1], words[2:]) if words[1].endswith(".py") else None


def all_commands():
    """(page, line, script, argv, whole): `whole` for the commands of ```bash blocks, which
    must parse as they are; inline mentions (often part of a command) must name real flags."""
    found = []
    for page in PAGES:
        text = read(page)
        blocks = {" ".join(words) for words in command_lines(text, inline=False)}
        for words in command_lines(text):
            ours = our_command(words)
            if ours is not None:
                found.append((page, " ".join(words), *ours, " ".join(words) in blocks))
    return found


COMMANDS = all_commands()


def run_help(script, argv):
    """The script's parser reads argv + --help in this process: (exit code, help text, errors)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv[:]
    # run as __main__, main_fractalgen.py installs its start-up signal handlers: put them back
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    sys.argv = [script, *argv, "--help"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is imported already
            if script.endswith(".py"):
                runpy.run_path(os.path.join(REPO, script), run_name="__main__")
            else:
                runpy.run_module(script, run_name="__main__", alter_sys=True)
        code = 0  # a script that ignores --help: it ran (must not happen for ours)
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = saved
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return code, out.getvalue(), err.getvalue()


def test_commands_are_found_on_every_page_that_has_them():
    pages = {page for page, *_ in COMMANDS}
    assert sum(whole for *_, whole in COMMANDS) > 30
    assert {"README.md", "docs/training.md", "docs/sampling.md", "docs/evaluation.md"} <= pages
    assert len(COMMANDS) > 30


@pytest.mark.parametrize("page, line, script, argv, whole", COMMANDS, ids=[f"{c[0]}:{c[1][:60]}" for c in COMMANDS])
def test_command_flags_exist_and_values_parse(page, line, script, argv, whole, monkeypatch):
    monkeypatch.chdir(REPO)
    code, help_text, errors = run_help(script, argv if whole else [])
    assert code == 0, f"{page}: `{line}` does not parse: {errors.strip()}"
    for word in argv:
        flag = word.split("=", 1)[0]
        if flag.startswith("--"):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), \
                f"{page}: `{line}` uses {flag}, which {script} does not have"


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page):
    text = read(page)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(REPO, os.path.dirname(page), path)) if path else os.path.join(REPO, page)
        assert os.path.exists(file), f"{page} links to {target}, which does not exist"
        if anchor and file.endswith(".md"):
            with open(file, encoding="utf-8") as f:
                headings = re.findall(r"^#+ (.*)$", f.read(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, f"{page} links to {target}: no such heading"


def test_what_the_commands_write_is_git_ignored():
    if subprocess.run(["git", "-C", REPO, "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    checked = 0
    for page, line, script, argv, _ in COMMANDS:
        written = [value for flag, value in zip(argv, argv[1:]) if flag in OUTPUT_FLAGS]
        positionals = argv[:next((i for i, w in enumerate(argv) if w.startswith("-")), len(argv))]
        if len(positionals) > POSITIONAL_OUTPUTS.get(script, len(argv)):
            written.append(positionals[POSITIONAL_OUTPUTS[script]])
        for value in written:
            if "$" not in value and not os.path.isabs(value):
                ignored = subprocess.run(["git", "-C", REPO, "check-ignore", "-q", "--no-index", value]).returncode == 0
                assert ignored, f"{page}: `{line}` writes {value}, which git does not ignore"
                checked += 1
    assert checked > 10


def test_readme_is_a_short_front_door():
    text = read("README.md")
    assert len(text.splitlines()) <= README_MAX_LINES
    first_screen = "\n".join(text.splitlines()[:40])
    assert "pip install -r requirements.txt" in first_screen or "## Install" in first_screen
    for page in PAGES[1:]:
        assert page in text, f"the README does not point to {page}"


def test_readme_training_example_is_the_quick_starts_command():
    """The README's one-process training command has the quick start's settings (only the
    output folder differs), so what the quick start prints and the README agree."""
    readme = [words for words in command_lines(read("README.md"))
              if our_command(words) and our_command(words)[0] == "main_fractalgen.py"
              and "quickstart_out/data" in words and "--evaluate_nll" not in words]
    assert len(readme) == 1
    args = quickstart.get_args_parser().parse_args([])
    printed = [str(w) for w in quickstart.train_args(args, os.path.abspath("quickstart_out/data"),
                                                     os.path.abspath("quickstart_out/train"))]

    def flags(words):
        pairs = dict(zip(words[::2], words[1::2]))
        return {k: v for k, v in pairs.items() if k not in ("--output_dir", "--resume")}

    assert flags(our_command(readme[0])[1]) == flags(printed)


def readme_cpu_path():
    """The README's commands a CPU runs in order, as written: the quick start, sampling its
    model, the training example, the bits/dim evaluation (downloads and GPUs left out)."""
    chosen = []
    for words in command_lines(read("README.md")):
        ours = our_command(words)
        if ours is None or words[0] != "python":
            continue
        script, argv = ours
        if script == "demo/quickstart.py" or "quickstart_out/train" in argv or "quickstart_out/data" in argv:
            chosen.append(words)
    return chosen


@pytest.mark.slow
def test_readme_cpu_path_runs_as_written_in_a_fresh_clone(tmp_path):
    """A fresh clone, the README's CPU commands in order, then its Python snippet (minutes:
    the quick start trains for real)."""
    clone = tmp_path / "fractalgen"
    subprocess.run(["git", "clone", "--quiet", REPO, str(clone)], check=True)
    commands = readme_cpu_path()
    assert [w[1] for w in commands[:2]] == ["demo/quickstart.py", "demo/sample.py"] and len(commands) >= 4
    for words in commands:
        result = subprocess.run([sys.executable, *words[1:]], cwd=clone, capture_output=True, text=True, timeout=3600)
        assert result.returncode == 0, f"`{' '.join(words)}` failed: {result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr
    snippet = re.search(r"```python\n(.*?)```", read("README.md"), re.S).group(1)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=clone, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (clone / "outputs" / "samples.png").exists() and (clone / "output_dir" / "tiny" / "checkpoint-last.pth").exists()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    assert status == "", f"the README's commands left files git does not ignore:\n{status}"
