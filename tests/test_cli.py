"""The dsv3 command line: generate and chat run end to end, keep the chat history, and every failure ends
with one `error:` line and a non-zero exit code, never a traceback (in-process and as `python -m dsv3`)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv3.generation.generate as generate_module
from dsv3.cli import main
from dsv3.tokenizer import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained()   # the one --preset tiny uses


def record_prompts(monkeypatch: pytest.MonkeyPatch, tokenizer, fail: dict[str, BaseException] | None = None,
                   fake: bool = False) -> list[str]:
    """Replace generate() by a wrapper that records each prompt (decoded); `fail` maps a word in the prompt's
    last user turn to an exception to raise instead; `fake` answers "ok" without running the model."""
    prompts: list[str] = []
    real = generate_module.generate

    def wrapper(model, input_ids, *args, **kwargs):
        text = tokenizer.decode(input_ids[0].tolist())
        prompts.append(text)
        last_turn = text.rsplit("<｜User｜>", 1)[-1]
        for word, exc in (fail or {}).items():
            if word in last_turn:
                raise exc
        if fake:
            return torch.cat([input_ids, torch.tensor([tokenizer.encode("ok", add_special_tokens=False)])], 1)
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(generate_module, "generate", wrapper)
    return prompts


def test_generate_streams_a_completion(capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", *TINY, "Hello", "--max-new-tokens", "6", "--greedy"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Hello") and len(out) > len("Hello")
    assert "6 tokens in" in err and "tokens/s" in err


def test_generate_follows_the_seed(capsys: pytest.CaptureFixture) -> None:
    """Same seed, same text (whatever the global RNG did in between); another seed, other text."""
    texts = []
    for seed, global_seed in (("3", 100), ("3", 200), ("4", 100)):
        torch.manual_seed(global_seed)
        assert main(["generate", *TINY, "Once", "--max-new-tokens", "24", "--temperature", "1.0",
                     "--seed", seed]) == 0
        texts.append(capsys.readouterr().out)
    assert len(texts[0]) > len("Once") + 10
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_chat_keeps_history_and_resets(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                       tokenizer) -> None:
    prompts = record_prompts(monkeypatch, tokenizer)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\nand again\n/reset\nfresh\n/exit\nignored\n"))
    assert main(["chat", *TINY, "--max-new-tokens", "4", "--greedy"]) == 0
    out, err = capsys.readouterr()
    assert err.count("4 tokens in") == 3 and "[history cleared]" in err
    assert len(prompts) == 3
    first_reply = prompts[1].split("hello there", 1)[1].split("<｜User｜>")[0]   # assistant turn 1 as rendered
    assert "hello there" not in prompts[0].split("hello there", 1)[1]
    assert prompts[1].count("hello there") == 1 and "and again" in prompts[1]
    assert prompts[1].startswith(prompts[0]) and len(first_reply) > len("<｜Assistant｜>")   # turn 1 + its reply
    assert "hello" not in prompts[2] and "and again" not in prompts[2] and "fresh" in prompts[2]


def test_chat_survives_errors_and_ctrl_c_during_a_reply(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture, tokenizer) -> None:
    prompts = record_prompts(monkeypatch, tokenizer, fake=True,
                             fail={"boom": KeyboardInterrupt(), "bad": ValueError("temperature=-1: must be > 0")})
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nboom\nbad\nsecond\n"))
    assert main(["chat", *TINY, "--max-new-tokens", "4"]) == 1     # a reply failed: the exit code says so
    err = capsys.readouterr().err
    assert "[interrupted: reply discarded, history kept]" in err
    assert "error: temperature=-1: must be > 0" in err and "Traceback" not in err
    last = prompts[-1]
    assert "first" in last and "second" in last and "boom" not in last and "bad" not in last


def test_chat_drops_the_oldest_turns_when_the_context_is_full(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture, tokenizer) -> None:
    """--preset tiny has a 2048-token context; with 48 new tokens a prompt may have 2000."""
    prompts = record_prompts(monkeypatch, tokenizer, fake=True)
    turns = ["alpha " * 700, "one " * 700, "three " * 700, "delta " * 2500, "echo"]   # 700 tokens each
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(t + "\n" for t in turns)))
    assert main(["chat", *TINY, "--max-new-tokens", "48"]) == 1
    err = capsys.readouterr().err
    assert len(prompts) == 4                    # the delta message alone does not fit: no reply, an error
    assert [len(tokenizer.encode(p, add_special_tokens=False)) <= 2000 for p in prompts] == [True] * 4
    assert "alpha" in prompts[1] and "one" in prompts[1]
    assert "alpha" not in prompts[2] and "one" in prompts[2] and "three" in prompts[2]
    assert err.count("[context full: dropped the 1 oldest exchange(s) from the history]") == 1
    assert "error: the message is" in err and "tokens with the chat template" in err
    assert "one" in prompts[3] and "three" in prompts[3] and "echo" in prompts[3] and "delta" not in prompts[3]


def test_cli_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit, match="not a checkpoint directory"):
        main(["generate", "--model", str(tmp_path), "hi"])
    assert main(["generate", *TINY, "hi", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    # --threads: argparse names the flag (exit 2)
    for bad in ("0", "-3", "two"):
        with pytest.raises(SystemExit) as info:
            main(["generate", *TINY, "hi", "--threads", bad])
        assert info.value.code == 2 and "argument --threads" in capsys.readouterr().err
    # config files that are not JSON objects, a directory where a file is expected
    for name, content in (("config.json", "[1, 2]"), ("generation_config.json", '"greedy"'),
                          ("config.json", "{not json")):
        model = tmp_path / name.replace(".", "_")
        model.mkdir(exist_ok=True)
        (model / "config.json").write_text("{}")
        (model / name).write_text(content)
        assert main(["generate", "--model", str(model), "hi"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {model / name}") and err.count("\n") == 1, err
    as_dir = tmp_path / "gen_dir"
    as_dir.mkdir()
    (as_dir / "config.json").write_text("{}")
    (as_dir / "generation_config.json").mkdir()
    assert main(["generate", "--model", str(as_dir), "hi"]) == 2
    assert "generation_config.json is a directory" in capsys.readouterr().err
    # text that is not UTF-8: an argument (argv decodes undecodable bytes to surrogates) and stdin
    assert main(["generate", *TINY, "ab\udcff"]) == 2
    assert "the prompt is not valid UTF-8 (byte 0xff at position 2)" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok \xc3\x28"), encoding="utf-8"))
    assert main(["generate", *TINY]) == 2
    assert "stdin is not valid UTF-8 (byte 0xc3 at offset 3)" in capsys.readouterr().err
    # chat: a bad line is reported and the chat goes on
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\nhi\n"), encoding="utf-8"))
    assert main(["chat", *TINY, "--max-new-tokens", "2", "--greedy"]) == 1
    err = capsys.readouterr().err
    assert "error: the input line is not valid UTF-8" in err and "2 tokens in" in err
    # training: binary data names the file; the output directory is a file
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"\x00\x01\xfe\xff" * 8)
    assert main(["train", str(binary), "--tokenizer", "bytes", "--output-dir", str(tmp_path / "run"),
                 "--steps", "1"]) == 2
    assert f"error: {binary} is not UTF-8 text (byte 0xfe at offset 2)" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text("abc " * 100)
    assert main(["train", str(text), "--tokenizer", "bytes", "--output-dir", str(binary), "--steps", "1"]) == 2
    assert f"error: output directory {binary} is a file" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- python -m dsv3
def run_dsv3(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dsv3", *args], env=env, capture_output=True, timeout=300,
                          **kwargs)


def assert_one_error_line(err: bytes, *needles: str) -> None:
    text = err.decode()
    assert "Traceback" not in text and "Exception ignored" not in text, text
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(n in last for n in needles), text


def test_python_m_dsv3_runs_the_cli() -> None:
    done = run_dsv3("generate", *TINY, "Hello", "--max-new-tokens", "3", "--greedy")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().startswith("Hello") and "3 tokens in" in done.stderr.decode()
    # closed stdin (no prompt) and closed stdout: one line each, before any model is loaded
    shell = f"{sys.executable} -m dsv3 generate --preset tiny"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for redirect, needle in (("<&-", "stdin is closed"), ("hi >&-", "stdout is closed")):
        done = subprocess.run(["bash", "-c", f"{shell} {redirect}"], env=env, capture_output=True, timeout=300)
        assert done.returncode == 2
        assert_one_error_line(done.stderr, needle)
    done = run_dsv3("generate", *TINY, b"\xffbad".decode("utf-8", "surrogateescape"))
    assert done.returncode == 2
    assert_one_error_line(done.stderr, "not valid UTF-8", "0xff")


def _default_sigint() -> None:
    # A runner started in the background (`cmd &` in a non-interactive shell) ignores SIGINT, children inherit
    # that, and Python then leaves it ignored: give the child the default a person's terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "dsv3", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=_default_sigint)


def test_output_closed_early_is_one_line_not_a_traceback() -> None:
    """`python -m dsv3 generate ... | head -c 10`: the reader goes away while tokens are still coming."""
    proc = _start("generate", *TINY, "Hello", "--max-new-tokens", "1500", "--greedy")
    assert proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141
    assert_one_error_line(err, "broken pipe")


def test_sigint_while_generating_exits_130_with_one_line() -> None:
    proc = _start("generate", *TINY, "Hello", "--max-new-tokens", "1500", "--greedy")
    assert proc.stdout.read(5) == b"Hello"          # the model is loaded and generating
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert_one_error_line(err, "interrupted")
