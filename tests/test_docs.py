"""The documentation stays true: links resolve, named commands exist, the error catalogue is the code's.

Checked in README.md, docs/**/*.md, bench/README.md, loadtests/*.md and deploy/**/*.md:

- every relative link (and image) names an existing file or directory, and a ``#anchor`` into a
  markdown file names one of its headings (GitHub's slugs);
- README.md is at most 200 lines;
- every command a doc names (lines of ``bash``/``sh``/unlabelled fenced blocks, and inline code that
  starts with ``framewise``, ``make``, ``python`` or a ``scripts/`` path) is valid: ``make`` targets
  exist in the Makefile (and flags passed in a make variable suit the command it feeds),
  ``framewise <subcommand>`` exists (its ``--help`` exits 0) and takes every ``--flag`` the line uses
  (``serve``/``worker`` list vLLM's engine options too), ``python -m <module>`` / ``python <file>``
  exist and a repository script's ``--help`` lists the flags, locust takes them (its own or the
  locustfile's), shell scripts exist and handle their flags, and repository paths on command lines
  exist;
- the error catalogue in docs/api.md lists exactly the error codes the server's source can return.

Fast: no engine, no network. Each help text is fetched once, in parallel. The CLI's are those of its
own parser (``build_parser``), all in one interpreter; only a flag it does not list on ``serve``/``worker``
is looked up in the full ``--help`` (``server.cli.main([sub, "--help"])``), which imports vLLM to list
vLLM's engine options.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

from framewise.server.cli import ENGINE_COMMANDS

ROOT = Path(__file__).resolve().parents[1]
TOP_DIRS = {"bench", "deploy", "docs", "loadtests", "model_plugins", "scripts", "server", "tests"}
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}
HELP_TIMEOUT_S = 240


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "bench" / "README.md"]
    files += sorted((ROOT / "docs").rglob("*.md"))
    files += sorted((ROOT / "loadtests").glob("*.md"))
    files += sorted((ROOT / "deploy").rglob("*.md"))
    return [f for f in dict.fromkeys(files) if f.is_file()]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ------------------------------------------------------------------------------------------ markdown

class Doc:
    """A markdown file split into prose lines and fenced code blocks."""

    def __init__(self, path: Path):
        self.path = path
        self.prose: list[tuple[int, str]] = []  # (line number, text) outside fences
        self.blocks: list[tuple[str, list[tuple[int, str]]]] = []  # (language, lines)
        fence = None
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            m = re.match(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)", line)
            if fence is None and m:
                fence = m.group(1)
                self.blocks.append((m.group(2).lower(), []))
            elif fence is not None and line.strip().startswith(fence) and not line.strip()[len(fence):].strip():
                fence = None
            elif fence is not None:
                self.blocks[-1][1].append((n, line))
            else:
                self.prose.append((n, line))

    def prose_text(self) -> str:
        return "\n".join(line for _, line in self.prose)

    def anchors(self) -> set[str]:
        seen: dict[str, int] = {}
        out = set()
        for _, line in self.prose:
            m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
            if not m:
                continue
            base = github_slug(m.group(1))
            k = seen.get(base, 0)
            seen[base] = k + 1
            out.add(base if k == 0 else f"{base}-{k}")
        return out


def github_slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # punctuation goes; letters, digits, _ and - stay
    return text.replace(" ", "-")


@cache
def parsed(path: Path) -> Doc:
    return Doc(path)


def inline_code(text: str) -> list[tuple[int, str]]:
    """(offset, text) of each code span."""
    return [(m.start(), m.group(1)) for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text)]


# ------------------------------------------------------------------------------------------ links

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)


def relative_links(doc: Doc) -> list[str]:
    text = re.sub(r"(?<!`)`[^`]+`(?!`)", "``", doc.prose_text())  # code spans hold no links
    links = LINK.findall(text) + REF_LINK.findall(text)
    return [u for u in links if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", u)]  # http:, mailto:, ...


@pytest.mark.parametrize("path", doc_files(), ids=rel)
def test_relative_links_resolve(path: Path):
    doc = parsed(path)
    problems = []
    for url in relative_links(doc):
        target, _, anchor = url.partition("#")
        dest = (path.parent / target).resolve() if target else path
        if not dest.exists():
            problems.append(f"{url}: {rel(dest) if dest.is_relative_to(ROOT) else dest} does not exist")
            continue
        if anchor and dest.suffix == ".md" and anchor not in parsed(dest).anchors():
            problems.append(f"{url}: no heading with the anchor #{anchor} in {rel(dest)}")
    assert not problems, f"{rel(path)}:\n" + "\n".join(problems)


def test_readme_is_at_most_200_lines():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 200, f"README.md has {n} lines; the rest belongs in docs/"


def test_docs_link_every_page():
    """Every page under docs/ is reachable from the README (directly or through another page)."""
    seen, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        for url in relative_links(parsed(page)):
            dest = (page.parent / url.partition("#")[0]).resolve()
            if dest.suffix == ".md" and dest.is_file():
                todo.append(dest)
    unreachable = [rel(p) for p in sorted((ROOT / "docs").rglob("*.md")) if p.resolve() not in seen]
    assert not unreachable, f"not linked from README.md: {unreachable}"


# ------------------------------------------------------------------------------------------ commands

def strip_comment(line: str) -> str:
    """Drop a shell comment (a ``#`` at a word start, outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def block_commands(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Logical command lines of a shell block: continuations joined, comments and heredoc bodies dropped."""
    out: list[tuple[int, str]] = []
    heredoc = None
    pending, start = "", 0
    for n, raw in lines:
        if heredoc is not None:
            if raw.strip() == heredoc:
                heredoc = None
            continue
        line = strip_comment(raw).rstrip()
        if not pending:
            start = n
            line = re.sub(r"^\s*\$\s+", "", line)  # a console prompt
        m = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if m:
            heredoc = m.group(1)
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            out.append((start, full))
    if pending.strip():
        out.append((start, pending.strip()))
    return out


def segments(command: str) -> list[list[str]]:
    """The simple commands of a line (split at ``&&``, ``||``, ``|``, ``;``), each as words."""
    out = []
    for part in re.split(r"\s+(?:&&|\|\||\|)\s+|;\s+|\s*;$", command):
        if not part.strip():
            continue
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        out.append(unwrap(words))
    return [w for w in out if w]


def unwrap(words: list[str]) -> list[str]:
    """Drop leading ``VAR=value`` assignments and wrappers (nice, taskset, time, sudo, env, exec)."""
    words = list(words)
    while words:
        w = words[0]
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w):
            words.pop(0)
        elif w == "nice":
            words.pop(0)
            if words and words[0] == "-n":
                words = words[2:]
            elif words and re.match(r"^-\d+$", words[0]):
                words.pop(0)
        elif w == "taskset":
            words.pop(0)
            words = words[2:] if words and words[0].startswith("-") else words[1:]  # -c LIST | MASK
        elif w in ("time", "sudo", "env", "exec", "command"):
            words.pop(0)
        else:
            break
    return words


def flags(words: list[str]) -> list[str]:
    out = []
    for w in words:
        m = re.match(r"^\[?(--[A-Za-z][\w-]*)", w)
        if m:
            out.append(m.group(1))
    return out


def is_python(word: str) -> bool:
    return re.fullmatch(r"(?:.*/)?python(?:3(?:\.\d+)?)?", word) is not None


def is_framewise(word: str) -> bool:
    return re.fullmatch(r"(?:.*/)?framewise", word) is not None


def is_locust(word: str) -> bool:
    return re.fullmatch(r"(?:.*/)?locust", word) is not None


def is_repo_path(word: str) -> bool:
    return "/" in word and word.split("/", 1)[0] in TOP_DIRS and not re.search(r"[<>*$?{}]", word)


def named_commands(doc: Doc) -> list[tuple[int, str, list[str]]]:
    """(line, text, words) of every command the doc names."""
    out = []
    for lang, lines in doc.blocks:
        if lang in SHELL_LANGS:
            for n, cmd in block_commands(lines):
                out += [(n, cmd, words) for words in segments(cmd)]
    prose = doc.prose_text()
    for offset, span in inline_code(prose):
        span = " ".join(span.split())
        line = doc.prose[prose.count("\n", 0, offset)][0]
        for words in segments(span):
            head = words[0]
            if is_framewise(head) or head == "make" or is_python(head) or (
                    head.startswith("scripts/") and head.endswith(".sh")):
                out.append((line, span, words))
    return out


@cache
def makefile_targets() -> tuple[frozenset[str], str]:
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M))
    return frozenset(targets), text


def recipe_using(var: str) -> list[str] | None:
    """The words of the Makefile recipe line that passes ``$(var)`` on (make's own syntax dropped)."""
    for line in makefile_targets()[1].splitlines():
        if line.startswith("\t") and f"$({var})" in line:
            line = line.strip().lstrip("@-").replace("$(BIN)/", ".venv/bin/")
            return unwrap([w for w in line.split() if "$(" not in w and not w.endswith(")")])
    return None


@cache
def help_text(argv: tuple[str, ...]) -> tuple[int, str]:
    """Exit status and output of a ``--help`` run (cached: each is run once per session)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "COLUMNS": "200"}
    try:
        p = subprocess.run(list(argv), cwd=ROOT, env=env, capture_output=True, text=True, timeout=HELP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {HELP_TIMEOUT_S}s"
    return p.returncode, p.stdout + p.stderr


CLI_HELPS = r"""
import contextlib, io, json, sys
from framewise.server.cli import build_parser, main
engine, out = sys.argv[1] == "engine", {}
for sub in sys.argv[2:]:
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = main([sub, "--help"]) if engine else build_parser(engine_options=False).parse_args([sub, "--help"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else int(e.code is not None)
    out[sub] = [rc, buf.getvalue()]
print("\n" + json.dumps(out))
"""
_cli_helps: dict[tuple[str, bool], tuple[int, str]] = {}


def framewise_help(*subs: str, engine: bool = False) -> tuple[int, str]:
    """``framewise <sub> --help``: exit status and output, for the first of ``subs`` (all of them are run,
    in one interpreter). ``engine``: exactly as the CLI runs it (``server.cli.main([sub, "--help"])``; for
    ``serve``/``worker`` that imports vLLM and lists its engine options); otherwise the CLI's own parser
    without vLLM's options (``build_parser(engine_options=False)``), which is fast."""
    todo = [s for s in dict.fromkeys(subs) if (s, engine) not in _cli_helps]
    if todo:
        rc, out = help_text((sys.executable, "-c", CLI_HELPS, "engine" if engine else "own", *todo))
        try:
            results = json.loads(out.rstrip().rsplit("\n", 1)[-1])
        except ValueError:
            results = {s: (rc or 1, out[-2000:]) for s in todo}
        _cli_helps.update({(s, engine): tuple(v) for s, v in results.items()})
    return _cli_helps[(subs[0], engine)]


def repo_module_file(module: str) -> Path | None:
    base = ROOT / module.replace(".", "/")
    for cand in (base.with_suffix(".py"), base / "__main__.py"):
        if cand.is_file():
            return cand
    return None


def installed_module_exists(module: str) -> bool:
    top, _, rest = module.partition(".")
    spec = importlib.util.find_spec(top)
    if spec is None:
        return False
    if not rest:
        return True
    for loc in spec.submodule_search_locations or ():
        base = Path(loc) / rest.replace(".", "/")
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return True
    return False


def python_help_argvs(words: list[str]) -> list[tuple[str, ...]]:
    """``--help`` command lines for a repository Python command (the script's, then its subcommand's)."""
    if len(words) < 2:
        return []
    if words[1] == "-m" and len(words) > 2 and repo_module_file(words[2]):
        base, rest = (sys.executable, "-m", words[2]), words[3:]
    elif words[1].endswith(".py") and (ROOT / words[1]).is_file():
        base, rest = (sys.executable, words[1]), words[2:]
    else:
        return []
    argvs = [base + ("--help",)]
    if rest and re.fullmatch(r"[a-z][\w-]*", rest[0]):
        argvs.append(base + (rest[0], "--help"))
    return argvs


def locust_help_argv(words: list[str]) -> tuple[str, ...] | None:
    exe = Path(sys.executable).parent / "locust"
    exe = str(exe) if exe.is_file() else shutil.which("locust")
    if exe and "-f" in words and words.index("-f") + 1 < len(words):
        return (exe, "-f", words[words.index("-f") + 1], "--help")
    return None


def check_command(words: list[str]) -> list[str]:
    problems = []
    head = words[0]
    for w in words:
        p = w.rstrip(",;:)]").lstrip("[(")
        if is_repo_path(p) and not (ROOT / p).exists():
            problems.append(f"{p} does not exist")
    if is_framewise(head):
        sub = words[1] if len(words) > 1 else ""
        if not re.fullmatch(r"[a-z][\w-]*", sub):
            return problems
        rc, out = framewise_help(sub)
        if rc != 0:
            return problems + [f"`framewise {sub}` is not a subcommand (--help exit {rc}): {out[-300:]}"]
        missing = [f for f in flags(words[2:]) if not mentions(out, f)]
        if missing and sub in ENGINE_COMMANDS:  # maybe one of vLLM's engine options: ask the full --help
            rc, out = framewise_help(sub, engine=True)
            missing = [f for f in missing if rc != 0 or not mentions(out, f)]
        problems += [f"`framewise {sub}` has no option {f}" for f in missing]
    elif head == "make":
        targets, text = makefile_targets()
        for w in words[1:]:
            if w.startswith("-"):
                continue
            if "=" in w:
                var, value = w.split("=", 1)
                if not re.search(rf"\$[({{]{re.escape(var)}[)}}]|^{re.escape(var)}\s*[?:+]?=", text, re.M):
                    problems.append(f"the Makefile does not use the variable {var}")
                recipe = recipe_using(var)
                if recipe and flags(value.split()):  # flags handed on, e.g. LOADTEST_ARGS="--clips ..."
                    problems += [f"{var}: {p}" for p in check_command(recipe + shlex.split(value))]
            elif w not in targets:
                problems.append(f"no Makefile target {w!r}")
    elif is_python(head):
        if len(words) < 2 or words[1] in ("-", "-c"):
            return problems
        if words[1] == "-m":
            module = words[2] if len(words) > 2 else ""
            if not (repo_module_file(module) or installed_module_exists(module)):
                return problems + [f"no module {module!r}"]
        elif not words[1].startswith("-") and not (ROOT / words[1]).is_file():
            return problems + [f"no script {words[1]!r}"]
        argvs = python_help_argvs(words)
        if argvs:
            rc, out = help_text(argvs[0])
            if rc != 0:
                return problems + [f"`{' '.join(argvs[0][1:])}` exits {rc}: {out[-300:]}"]
            if len(argvs) > 1:
                rc2, out2 = help_text(argvs[1])
                out += out2 if rc2 == 0 else ""
            problems += [f"`{' '.join(words[:3])}` has no option {f}" for f in flags(words[2:]) if not mentions(out, f)]
    elif is_locust(head):
        argv = locust_help_argv(words)
        if argv:
            rc, out = help_text(argv)
            if rc != 0:
                return problems + [f"`{' '.join(argv)}` exits {rc}: {out[-300:]}"]
            out += (ROOT / argv[2]).read_text() if (ROOT / argv[2]).is_file() else ""  # its custom options
            problems += [f"locust has no option {f}" for f in flags(words[1:]) if not mentions(out, f)]
    elif head.endswith(".sh") and is_repo_path(head):
        script = ROOT / head
        if script.is_file():
            text = script.read_text()
            problems += [f"{head} does not handle {f}" for f in flags(words[1:]) if not mentions(text, f)]
    return problems


def mentions(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def needed_helps() -> tuple[list[str], set[tuple[str, ...]]]:
    """The framewise subcommands and the other ``--help`` command lines the docs' commands need."""
    subs, argvs = [], set()
    for path in doc_files():
        for _, _, words in named_commands(parsed(path)):
            if is_framewise(words[0]) and len(words) > 1 and re.fullmatch(r"[a-z][\w-]*", words[1]):
                subs.append(words[1])
            elif is_python(words[0]):
                argvs.update(python_help_argvs(words))
            elif is_locust(words[0]) and locust_help_argv(words):
                argvs.add(locust_help_argv(words))
    return list(dict.fromkeys(subs)), argvs


@pytest.fixture(scope="module")
def help_texts_in_parallel():
    """Fetch every help text the docs need at once (the CLI's in one process)."""
    subs, argvs = needed_helps()
    jobs = [lambda: subs and framewise_help(*subs)] + [lambda a=a: help_text(a) for a in sorted(argvs)]
    workers = max(1, min(len(jobs), len(os.sched_getaffinity(0)) * 2, 8))
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda job: job(), jobs))


@pytest.mark.parametrize("path", doc_files(), ids=rel)
def test_named_commands_are_valid(path: Path, help_texts_in_parallel):
    problems = []
    for line, text, words in named_commands(parsed(path)):
        problems += [f"line {line}: {text!r}: {p}" for p in check_command(words)]
    assert not problems, f"{rel(path)}:\n" + "\n".join(problems)


def test_the_command_check_sees_the_docs_commands():
    """Guard against a parser that silently finds nothing."""
    found = {(w[0].rsplit("/", 1)[-1], w[1] if len(w) > 1 else "") for p in doc_files()
             for _, _, w in named_commands(parsed(p))}
    for expected in [("make", "serve"), ("make", "test"), ("make", "test-fast"), ("make", "loadtest"),
                     ("framewise", "serve"), ("framewise", "worker"), ("framewise", "convert-llava"),
                     ("framewise", "convert-checkpoint"), ("framewise", "convert-qwen2vl"),
                     ("framewise", "convert-qwen-vl"), ("framewise", "demo-model"),
                     ("python", "bench/serve_e2e.py"), ("locust", "-f"), ("gpu_check.sh", "[--out")]:
        assert expected in found, f"{expected} not found among the docs' commands"


# ------------------------------------------------------------------------------------------ errors

def source_error_codes() -> dict[str, set[str]]:
    """Every error code the server's source can return, with the statuses stated next to it."""
    codes: dict[str, set[str]] = {}

    def add(code: str, *statuses: str):
        codes.setdefault(code, set()).update(statuses)

    for f in sorted((ROOT / "server").rglob("*.py")):
        src = f.read_text()
        # a call with a literal status and code: APIError(413, "code", ...), error_response(503, "code", ...),
        # send_error(send, 431, "code", ...), Refusal(408, "code", ...); the status may be `400 if c else 504`
        for m in re.finditer(r"\b\w+\(\s*(?:[A-Za-z_]\w*,\s*)?(\d{3}(?:\s+if\s+[^,()]+?\s+else\s+\d{3})?),\s*"
                             r"\"([a-z][a-z_]*)\"", src):
            add(m.group(2), *re.findall(r"\b\d{3}\b", m.group(1)))
        for m in re.finditer(r"\bMediaError\(\s*\"([a-z_]+)\"", src):  # MediaError("code", msg, status=400)
            call, depth = src[m.end():], 1
            for i, c in enumerate(call):
                depth += (c == "(") - (c == ")")
                if depth == 0:
                    call = call[:i]
                    break
            status = re.search(r"\bstatus\s*=\s*(\d{3})", call)
            add(m.group(1), status.group(1) if status else "400")
        for m in re.finditer(r"\"code\":\s*\"([a-z_]+)\"(?:,\s*\"status\":\s*(\d{3}))?", src):  # job errors
            add(m.group(1), *([m.group(2)] if m.group(2) else []))
        for m in re.finditer(r"return self\.\w+,\s*\"([a-z_]+)\"", src):  # http_limits: (limit, code)
            add(m.group(1))
        for m in re.finditer(r"\{((?:\s*\d{3}:\s*\"[a-z_]+\",?)+)\s*\}\.get\(\w+(?:\.\w+)*,\s*\"([a-z_]+)\"\)", src):
            for status, code in re.findall(r"(\d{3}):\s*\"([a-z_]+)\"", m.group(1)):  # status -> code maps
                add(code, status)
            add(m.group(2))
    return codes


def catalogue() -> dict[str, str]:
    """code -> status cell of the table under docs/api.md's "Error catalogue" heading."""
    doc = parsed(ROOT / "docs" / "api.md")
    rows, inside = {}, False
    for _, line in doc.prose:
        if re.match(r"^#{1,6}\s", line):
            inside = github_slug(line.lstrip("#")) == "error-catalogue"
            continue
        if inside and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            code = re.fullmatch(r"`([a-z_]+)`", cells[1]) if len(cells) > 2 else None
            if code:
                assert code.group(1) not in rows, f"{code.group(1)} is listed twice"
                rows[code.group(1)] = cells[0]
    return rows


def test_error_catalogue_is_the_codes_catalogue_and_covers_the_source():
    """docs/api.md's table is ``server.error_codes.CODES`` (``python -m framewise.server.error_codes`` prints it), and every
    code the source returns is in it, with its statuses."""
    from framewise.server.error_codes import CODES, markdown_table

    doc = (ROOT / "docs" / "api.md").read_text()
    assert markdown_table() in doc, "docs/api.md's error catalogue differs from `python -m framewise.server.error_codes`"
    source, listed = source_error_codes(), catalogue()
    assert len(source) > 30 and set(listed) == set(CODES), (sorted(source), listed)
    missing = sorted(set(source) - set(CODES))
    assert not missing, f"codes the server returns but server/error_codes.py does not list: {missing}"
    wrong = {code: (sorted(statuses), CODES[code][0]) for code, statuses in source.items()
             if CODES[code][0] and not {int(s) for s in statuses} <= set(CODES[code][0])}
    assert not wrong, f"statuses in the source vs the catalogue: {wrong}"
