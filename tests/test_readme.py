"""The documentation against the code: every `python cat_diffusion.py COMMAND --option` that
README.md (and data/README.md, tests/benchmarks/RESULTS.md) shows in a ```bash or ```text block
must name a real command and options that its `--help` lists; the README keeps the design card's
REPL lines; relative links point at files that exist. The README stays short (at most 200 lines)
and quotes its figures once, in its Results table, whose every row is a row of RESULTS.md's
`## Current figures` table with the same label and numbers (so the two cannot drift apart).

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
# train, sample, eval, ...: the keys of cd.COMMANDS, and of cd.SATELLITES where the commands of
# cat_studio.py and cat_eval.py are listed apart
COMMANDS = tuple(dict.fromkeys([*cd.COMMANDS, *getattr(cd, "SATELLITES", {})]))
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


# ----------------------------------------------------------------------------------------------
# The README's length and its Results table against RESULTS.md's Current figures
# ----------------------------------------------------------------------------------------------

README_MAX_LINES = 200
NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")  # 25.1, 1.60 (of 1.60x), 10,065, 100 (of H100)
# A quoted figure: a ratio such as 1.60x, a speed in images/s, an SWD value.
FIGURE = re.compile(r"\b\d+(?:\.\d+)?x\b|\d[\d,.]* images/s|SWD (?:x 1e3 )?\d")


def section(text, heading):
    """The text under the `## heading` line up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(heading)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def first_table(text):
    """(the table's lines, its body rows as lists of cells) of the first Markdown table in `text`."""
    lines = FENCE.sub("", text).splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("|")), None)
    assert start is not None, "no table"
    end = next((i for i in range(start, len(lines)) if not lines[i].lstrip().startswith("|")), len(lines))
    table = lines[start:end]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table[2:]]
    return table, rows


def label(cell):
    return re.sub(r"[`*]", "", cell).strip()


def test_section_and_table_parsers_on_made_up_text():
    text = "## A\nx\n\n| h | v |\n| --- | --- |\n| **one** | 1.60x, 10,065 images/s |\n| `two` | 2 |\n\nafter\n## B\n| b |\n"
    table, rows = first_table(section(text, "A"))
    assert len(table) == 4 and rows == [["**one**", "1.60x, 10,065 images/s"], ["`two`", "2"]]
    assert [label(r[0]) for r in rows] == ["one", "two"]
    assert NUMBER.findall(rows[0][1]) == ["1.60", "10,065"]
    assert FIGURE.findall("1.60x the floor, 64x64, 91.4 images/s, SWD 25.1") == ["1.60x", "91.4 images/s", "SWD 2"]


def test_readme_is_at_most_200_lines():
    lines = doc_text("README.md").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it to {README_MAX_LINES}"


def test_readme_results_rows_are_current_figures_rows_of_results_md():
    readme_table, readme_rows = first_table(section(doc_text("README.md"), "Results"))
    current_table, current_rows = first_table(section(doc_text("tests/benchmarks/RESULTS.md"), "Current figures"))
    assert len(readme_rows) >= 5, "the README's Results table has too few rows to be the one meant"
    current = {label(row[0]): row for row in current_rows}
    problems = []
    for doc, table, rows in [("README.md", readme_table, readme_rows), ("RESULTS.md", current_table, current_rows)]:
        width = len(table[0].strip().strip("|").split("|"))  # a lost '|' merges two columns, and the row still renders
        problems += [f"'{label(row[0])}' in {doc}: {len(row)} cells under a header of {width}"
                     for row in rows if len(row) != width]
    for row in readme_rows:
        name = label(row[0])
        if name not in current:
            problems.append(f"'{name}': no row with that label under RESULTS.md's '## Current figures'")
            continue
        theirs = set(NUMBER.findall(" ".join(current[name])))
        missing = [n for n in NUMBER.findall(" ".join(row)) if n not in theirs]
        if missing:
            problems.append(f"'{name}': RESULTS.md's row lacks {missing}")
    assert not problems, "\n".join(problems)


def test_readme_quotes_figures_only_in_its_results_table():
    """A figure written twice drifts into two values: outside the Results table the README points
    there instead of quoting (ratios to the floor, images/s, SWD values)."""
    text = FENCE.sub("", doc_text("README.md"))
    table, _ = first_table(section(text, "Results"))
    outside = text.replace("\n".join(table), "")
    quoted = [line.strip() for line in outside.splitlines() if FIGURE.search(line)]
    assert not quoted, "figures outside the README's Results table:\n" + "\n".join(quoted)
