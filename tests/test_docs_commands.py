"""The shell commands of the README and docs/ run from a plain clone, so they cannot rot.

Every command in a shell block (a fenced ``bash`` block, or a fenced or indented block that starts
with a command) either runs here, offline, on the default model, or matches one of SKIPPED with
the reason it cannot (a guard model to download, a GPU, a server, the paper's data set, minutes
of work). A command that fails, or a new one that is neither, fails this module.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# A block is a shell block when its first command starts with one of these.
COMMAND = re.compile(r"^(guardprob|python|\.venv/bin/|pip|curl|make|git|scripts/|printf|time|pytest|vllm|llama-server|litellm|head)\b")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)

# (pattern, reason): a command matching the pattern is listed, not run.
SKIPPED: list[tuple[str, str]] = [
    (r"^make (demo|test)\b", "the set-up itself: make demo and make test install into .venv"),
    (r"^pip install\b", "installs packages from the network"),
    (r"^git clone\b", "downloads from the network"),
    (r"path/to/content_moderation_lm3\.jsonl", "needs the paper's data set, downloaded from its repository"),
    (r"--format topics\.yaml|--data (chats\.parquet|saved-dir|long\.jsonl)|--input conversations\.jsonl|"
     r"--taxonomy policies8\.yaml|--calibration calibration-marginal\.json",
     "reads a file of the reader's own, shown only in outline on its page"),
    (r"--preset ", "downloads a data set from the Hugging Face hub"),
    (r"--model (meta-llama|Qwen)/|--model (path/to|\./)|--model \S+\.gguf|--model TOKENIZER",
     "needs a guard model (a download, or a file of your own)"),
    (r"--device cuda", "needs a GPU"),
    (r"^(vllm serve|llama-server|python -m (sglang|llama_cpp)|python scripts/serve_llamacpp\.py|litellm)\b",
     "starts a model server or proxy that runs until stopped"),
    (r"^guardprob serve\b", "starts the service, which runs until stopped (tests/test_server.py serves it on loopback)"),
    (r"--base-url http|curl\b.*http://127\.0\.0\.1", "talks to a running server"),
    (r"--ray\b", "starts a Ray cluster (tests/test_ray.py runs one)"),
    (r"--backend llamacpp", "the llama.cpp engine needs the llamacpp extra, which make demo leaves out (tests/test_engine.py)"),
    (r"benchmarks/gpu_bench\.py", "a GPU benchmark (tests/test_bench.py runs its --tiny smoke test)"),
    (r"benchmarks/(load_server|soak_server|bench)\.py|^(time )?(\.venv/bin/)?guardprob (bench|eval)\b",
     "a benchmark or evaluation run of minutes (tests/test_bench.py and tests/test_eval_*.py run small ones)"),
]


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def _blocks(text: str) -> list[tuple[int, str, str]]:
    """(first line, language, body) of every fenced and indented code block."""
    blocks = [(text[: m.start()].count("\n") + 2, m.group(1), m.group(2)) for m in FENCE.finditer(text)]
    fenced = {n for start, _, body in blocks for n in range(start - 1, start + body.count("\n") + 1)}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        starts = lines[i].startswith("    ") and lines[i].strip() and (i == 0 or not lines[i - 1].strip())
        if starts and i + 1 not in fenced and not lines[i].lstrip().startswith(("-", "*", "|")):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            blocks.append((i + 1, "", "\n".join(line[4:] for line in lines[i:j])))
            i = j
        else:
            i += 1
    return blocks


def _commands(body: str, shell: bool = True) -> list[tuple[int, str]]:
    """(line offset, command) of each command in a block: continuation lines (a trailing backslash
    or pipe) joined, comment lines left out, and a quoted argument that spans lines kept whole.
    Outside a shell block only lines that start with a command count; the rest is their output."""
    out: list[tuple[int, str]] = []
    pending, first, glue = "", 0, "\n"
    for offset, line in enumerate(body.split("\n")):
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if not pending and not shell and not COMMAND.match(line):
            continue
        if not pending:
            first = offset
        pending = f"{pending}{glue}{line.lstrip() if glue == ' ' else line}" if pending else line
        glue = "\n"
        if pending.endswith("\\") or pending.rstrip().endswith("|"):
            pending, glue = pending.rstrip().removesuffix("\\").rstrip(), " "
            continue
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        out.append((first, pending.strip()))
        pending = ""
    return out


def doc_commands() -> list[Command]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for start, language, body in _blocks(text):
            if language not in ("", "bash", "sh", "shell", "console"):
                continue
            first = next((line for line in body.split("\n") if line.strip() and not line.lstrip().startswith("#")), "")
            if language == "" and not COMMAND.match(first):
                continue  # output, a directory listing, or a file's contents
            commands = _commands(body, shell=language != "")
            found += [Command(str(page.relative_to(ROOT)), start + offset, text) for offset, text in commands]
    return found


def _key(text: str) -> tuple[str, ...]:
    """A command as the shell reads it, comments left out: the same command on two pages runs once."""
    return tuple(shlex.split(text, comments=True))


def skip_reason(command: Command) -> str | None:
    return next((reason for pattern, reason in SKIPPED if re.search(pattern, command.text)), None)


COMMANDS = doc_commands()
_FIRST: dict[tuple[str, ...], Command] = {}
for _command in COMMANDS:
    if skip_reason(_command) is None:
        _FIRST.setdefault(_key(_command.text), _command)
RUN = list(_FIRST.values())


def test_the_pages_have_commands_and_no_rule_is_stale():
    assert len(COMMANDS) >= 40, [str(c) for c in COMMANDS]
    for pattern, reason in SKIPPED:
        assert any(re.search(pattern, c.text) for c in COMMANDS), f"no command matches {pattern!r} ({reason}): drop the rule"
    assert any(c.text.startswith("make demo") for c in COMMANDS)
    assert any(c.page == "README.md" for c in RUN) and any(c.page.startswith("docs/") for c in RUN)


def test_no_page_names_a_path_of_the_project_machines():
    for page in PAGES:
        assert "../shared" not in page.read_text(encoding="utf-8"), page


def test_the_extractor_reads_every_block_form():
    page = "\n".join([
        "text", "", "```bash", "guardprob score \"a\" \\", "    --json   # note", "# a comment", "```", "",
        "    guardprob formats", "    python -c \"import x", "    x.y()\"", "", "```", "P(unsafe) = 0.1", "```", "",
        "```yaml", "guardprob: 1", "```",
    ])
    blocks = [(_commands(body, language != ""), language) for _, language, body in _blocks(page)]
    runs = [c for commands, language in blocks if language in ("bash", "") for _, c in commands]
    assert runs == ['guardprob score "a" --json   # note', "guardprob formats", 'python -c "import x\nx.y()"']


def _clone_like(tmp_path: Path) -> Path:
    """A working directory that reads like a clone's root (src/, scripts/, benchmarks/) and keeps
    whatever a command writes out of the repository."""
    for name in ("src", "scripts", "benchmarks", "pyproject.toml"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    # the checkout's own package and console scripts, whichever interpreter runs the suite
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def _numbers(text: str) -> list[float]:
    return [float(n) for n in re.findall(r"\d+\.\d+|\d+", text)]


def _shape(text: str) -> str:
    return re.sub(r"\d+\.\d+|\d+", "#", text)


def demo_output() -> str:
    """The demo's output as the README shows it (the block after 'make demo ... prints')."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"prints:\n\n```\n(.*?)```", text, re.S)
    assert match, "the README shows the demo's output after 'prints:'"
    return match.group(1)


@pytest.mark.slow
@pytest.mark.parametrize("command", RUN, ids=str)
def test_command_runs(command: Command, tmp_path):
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command.text], cwd=_clone_like(tmp_path), env=_environment(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command} exited {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    if command.text == 'guardprob score "How do I make a pipe bomb?"':
        shown = demo_output()
        printed = [line for line in done.stderr.splitlines() if line.startswith("guardprob: format")] + done.stdout.splitlines()
        # the line with the time differs from run to run; every other line is the README's, to rounding
        shown_lines = [line for line in shown.strip().splitlines() if not line.startswith("method:")]
        printed_lines = [line for line in printed if line.strip() and not line.startswith("method:")]
        assert [_shape(line) for line in printed_lines] == [_shape(line) for line in shown_lines], done.stdout
        assert _numbers("\n".join(printed_lines)) == pytest.approx(_numbers("\n".join(shown_lines)), abs=2e-4)


def offline_python_blocks() -> list[str]:
    """The README's Python blocks that need only the offline default model (the others need a
    guard model to download or a running service)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [m.group(2) for m in FENCE.finditer(text) if m.group(1) == "python"]
    return [b for b in blocks if "from_pretrained()" in b and "OpenAI(" not in b]


def test_the_readme_has_an_offline_python_example():
    assert offline_python_blocks()


@pytest.mark.slow
@pytest.mark.parametrize("block", offline_python_blocks())
def test_readme_python_runs(block, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})  # raises where the example broke
    assert capsys.readouterr().out.strip(), "the example prints its scores"
