"""Every command in the README's shell blocks is one a user can type: Python commands parse with
their own parsers, Slurm submissions resolve (a dry run), and the short CPU generations run."""
import argparse
import importlib
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def readme_commands() -> list[list[str]]:
    """The commands of the README's ```bash blocks, continuations joined, comments dropped, and
    `a && b` split into a and b."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1:]
    return commands


COMMANDS = readme_commands()


class Parsed(Exception):
    """Raised once a script's parser has accepted its arguments: nothing runs."""


def python_target(words: list[str]):
    """("generate.py" | "scripts.x", argv) of a python/torchrun command, or None."""
    if words[0] in ("python", "python3") and words[1] == "-m":
        return words[2], words[3:]
    if words[0] in ("python", "python3"):
        return words[1], words[2:]
    if words[0] == "torchrun":
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        return words[script], words[script + 1:]
    return None


def test_the_readme_has_commands():
    names = [" ".join(c[:3]) for c in COMMANDS]
    assert any("generate.py" in n for n in names) and any("pytest" in n for n in names)
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("words", [c for c in COMMANDS if python_target(c) and "pytest" not in c],
                         ids=lambda c: " ".join(c)[:80])
def test_python_command_parses(words, monkeypatch):
    target, argv = python_target(words)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [target, *argv])
    monkeypatch.chdir(ROOT)
    with pytest.raises(Parsed):
        if target.endswith(".py"):
            runpy.run_path(str(ROOT / target), run_name="__main__")
        else:
            importlib.import_module(target).main()


@pytest.mark.parametrize("words", [c for c in COMMANDS if c[0] == "scripts/slurm/submit.sh"], ids=lambda c: " ".join(c)[:80])
def test_slurm_submission_resolves(words):
    r = subprocess.run(["bash", *words], cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, DRY_RUN="1"))
    assert r.returncode == 0 and r.stdout.startswith("sbatch "), r.stderr


def is_short_cpu_run(words: list[str]) -> bool:
    """A generate.py command that runs on the CPU with the default model in seconds."""
    if words[:2] != ["python", "generate.py"] or {"--compile", "--checkpoint_path"} & set(words):
        return False
    if "cuda" in words or "..." in words:
        return False
    n = int(words[words.index("--max_new_tokens") + 1]) if "--max_new_tokens" in words else 200
    return n <= 100


@pytest.mark.slow
@pytest.mark.parametrize("words", [c for c in COMMANDS if is_short_cpu_run(c)], ids=lambda c: " ".join(c)[:80])
def test_short_cpu_command_runs(words, default_checkpoint, tmp_path):
    r = subprocess.run([sys.executable, *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, ENGINE_OUTPUTS=str(tmp_path)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tokens/s" in r.stderr
