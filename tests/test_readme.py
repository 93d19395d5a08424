"""The documentation against the code: every `python cat_diffusion.py COMMAND --option` that
README.md (and data/README.md, tests/benchmarks/RESULTS.md) shows in a ```bash or ```text block
must name a real command and options that its `--help` lists; the README keeps the design card's
REPL lines; relative links point at files that exist.

Only `--help` runs, for all commands in one subprocess (importing torch once instead of eight
times: 4 s instead of about 20 on two cores), so this takes a few seconds."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

import cat_diffusion as cd
from helpers import ROOT

DOCS = ("README.md", "data/README.md", "tests/benchmarks/RESULTS.md")
COMMANDS = tuple(cd.COMMANDS)  # train, sample, eval, ...
DESIGN_CARD = ("from cat_diffusion import DiffusionModel, load_model",
               'loaded_model = load_model(DiffusionModel(), "DiffusionModel")')
FENCE = re.compile(r"^[ \t]*```(\w*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
OPTION = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


def fenced_blocks(text, languages):
    """(language, body) of every fenced block whose language is in `languages`."""
    return [(lang, body) for lang, body in FENCE.findall(text) if lang in languages]


def logical_lines(block):
    """A block's commands, one string each: backslash continuations and indented continuation
    lines (as in a synopsis) are joined, comments dropped."""
    lines = []
    for raw in textwrap.dedent(block).splitlines():  # a block inside a list item is indented
        line = re.sub(r"(^|\s)#.*", "", raw).rstrip()
        if not line.strip():
            continue
        if lines and (lines[-1].endswith("\\") or raw[:1].isspace()):
            lines[-1] = lines[-1].rstrip("\\").rstrip() + " " + line.strip()
        else:
            lines.append(line.strip())
    return lines


def invocations(text):
    """(command, options, source line) for every `python cat_diffusion.py ...` and
    `torchrun ... cat_diffusion.py ...` in the ```bash and ```text blocks of `text`, and in inline
    code spans that start with `python cat_diffusion.py`. With no command word the script runs
    `train`."""
    found = []
    inline = re.findall(r"`(python cat_diffusion\.py[^`]*)`", FENCE.sub("", text))
    for lang, block in fenced_blocks(text, ("bash", "text")) + [("bash", span) for span in inline]:
        for line in logical_lines(block):
            # shell pipelines and chains hold several commands; a synopsis uses | for "or"
            parts = re.split(r"&&|\|\||;|\|", line) if lang == "bash" else [line]
            for part in parts:
                words = part.split()
                script = next((i for i, w in enumerate(words) if w.endswith("cat_diffusion.py")), None)
                if script is None or not any(w in ("python", "python3", "torchrun") for w in words[:script]):
                    continue
                rest = words[script + 1:]
                first = rest[0].strip("[]") if rest else ""
                command = first if first and not first.startswith("-") else "train"
                options = sorted({m.split("=")[0] for m in OPTION.findall(" ".join(rest))})
                found.append((command, options, part.strip()))
    return found


def doc_text(name):
    return (ROOT / name).read_text(encoding="utf-8")


def all_invocations():
    return [(doc, *inv) for doc in DOCS for inv in invocations(doc_text(doc))]


# Runs `cat_diffusion.py COMMAND --help` as __main__ (the script's own entry point, with exactly
# that argv) for each COMMAND, in one fresh interpreter, and records each exit code and output.
HELP_DRIVER = """
import contextlib, io, json, runpy, sys
result_path, commands = sys.argv[1], sys.argv[2:]
out = {}
for command in commands:
    sys.argv, buffer, code = ["cat_diffusion.py", command, "--help"], io.StringIO(), 0
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            runpy.run_path("cat_diffusion.py", run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:
            code = 1
            buffer.write(f"{type(e).__name__}: {e}")
    out[command] = [code, buffer.getvalue()]
with open(result_path, "w") as f:
    json.dump(out, f)
"""


@pytest.fixture(scope="module")
def help_texts(tmp_path_factory):
    """{command: (exit code, output of `python cat_diffusion.py COMMAND --help`)}."""
    result = tmp_path_factory.mktemp("help") / "help.json"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", COLUMNS="100")
    proc = subprocess.run([sys.executable, "-c", HELP_DRIVER, str(result), *COMMANDS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and result.is_file(), f"the --help driver failed:\n{proc.stdout}{proc.stderr}"
    return {command: tuple(v) for command, v in json.loads(result.read_text()).items()}


# ----------------------------------------------------------------------------------------------
# The parser itself, on made-up text (fast, no subprocess)
# ----------------------------------------------------------------------------------------------

def test_invocations_are_found_in_chains_continuations_and_synopses():
    text = "\n".join([
        "1. Check:",
        "   ```bash",
        "   python cat_diffusion.py sample --steps 5",
        "   python cat_diffusion.py eval --json x.json",
        "   ```",
        "```bash",
        "python -m pip install -r requirements.txt && python cat_diffusion.py",
        "python cat_diffusion.py sample --model LM.pth --like PHOTO -n 16   # a --comment",
        "torchrun --nnodes=2 --rdzv-endpoint=HOST:29500 \\",
        "    cat_diffusion.py train --data DIR --batch-size=512",
        'python -c "import cat_diffusion as cd; cd.CatDataset(\'data\')"',
        "```",
        "```text",
        "python cat_diffusion.py [train] [--data DIR]",
        "                        [--resume [PATH] | --overwrite]",
        "python cat_diffusion.py inpaint PHOTO --region eyes|ears [-n 8]",
        "```",
        "```python",
        "python cat_diffusion.py bench --not-checked",
        "```",
        "Resume with `python cat_diffusion.py --resume [PATH]`; `bench --json` is not an invocation.",
    ])
    got = [(c, o) for c, o, _ in invocations(text)]
    assert got == [("sample", ["--steps"]), ("eval", ["--json"]),  # the indented block
                   ("train", []), ("sample", ["--like", "--model"]), ("train", ["--batch-size", "--data"]),
                   ("train", ["--data", "--overwrite", "--resume"]), ("inpaint", ["--region"]),
                   ("train", ["--resume"])]


# ----------------------------------------------------------------------------------------------
# The documents against the command line
# ----------------------------------------------------------------------------------------------

def test_readme_shows_the_commands_it_promises():
    """Guards the parser: if it found nothing, the option checks below would pass vacuously."""
    commands = {command for doc, command, _, _ in all_invocations() if doc == "README.md"}
    assert set(COMMANDS) <= commands, f"README shows no invocation of {set(COMMANDS) - commands}"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_the_docs_write_is_in_the_commands_help(command, help_texts):
    returncode, text = help_texts[command]
    assert returncode == 0, f"`python cat_diffusion.py {command} --help` exited {returncode}:\n{text}"
    listed = set(OPTION.findall(text))
    missing = [f"{doc}: {option} in `{line}`"
               for doc, cmd, options, line in all_invocations() if cmd == command
               for option in options if option not in listed]
    assert not missing, f"options not in `{command} --help`:\n" + "\n".join(missing)


def test_docs_name_only_real_commands():
    unknown = [f"{doc}: `{line}`" for doc, command, _, line in all_invocations() if command not in COMMANDS]
    assert not unknown, "unknown commands:\n" + "\n".join(unknown)


# ----------------------------------------------------------------------------------------------
# The REPL snippet and links
# ----------------------------------------------------------------------------------------------

def test_readme_repl_snippet_has_the_design_card_lines_verbatim():
    python_lines = [line.strip() for _, body in fenced_blocks(doc_text("README.md"), ("python",))
                    for line in body.splitlines()]
    for line in DESIGN_CARD:
        assert line in python_lines, f"README's python block lacks the line: {line}"


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_and_pictures_exist(doc):
    text = FENCE.sub("", doc_text(doc))
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    missing = [t for t in targets if not re.match(r"[a-z]+:|#", t)
               and not ((ROOT / doc).parent / t.split("#")[0]).exists()]
    assert not missing, f"{doc} links to missing files: {missing}"
