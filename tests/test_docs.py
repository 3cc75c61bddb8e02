"""The README and the docs: every repository path they name exists, every relative link
resolves (anchors included), and the repository speaks of nothing but the project.

No JAX is imported: this reads text files only.
"""
import glob
import os
import re
import subprocess

import pytest

from helpers import REPO_ROOT

# The pages a reader follows; docs/study/study.md is a generated report, its own links are
# checked where it is written.
PAGES = ["README.md", "CONTRIBUTING.md", "BENCHMARKS.md"] + sorted(
    os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))

# A repository path inside code or a link: starts with one of the top-level folders, and is
# not the tail of a longer path (``~/.cache/l2t_jax/xla``, ``runs/docs/...``).
PATH = re.compile(r"(?<![\w/.~$-])((?:l2t_jax|configs|experiments|docs|tests)/[\w./*-]*[\w*/])")
MODULE = re.compile(r"python -m (l2t_jax(?:\.\w+)+)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def read(page):
    with open(os.path.join(REPO_ROOT, page), encoding="utf-8") as f:
        return f.read()


def code_spans(text):
    """Fenced blocks, then inline code outside them."""
    fences = FENCE.findall(text)
    rest = FENCE.sub("", text)
    return fences + INLINE.findall(rest)


def slug(heading):
    """GitHub's anchor for a heading: its text in lower case, punctuation but hyphens and
    underscores dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)     # a link's text
    text = re.sub(r"[`*]", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text):
    """Every heading's anchor in a markdown text (repeats get -1, -2, ... as on GitHub)."""
    seen, found = {}, set()
    for _, heading in HEADING.findall(FENCE.sub("", text)):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def named_paths(text):
    """Repository paths named in code (inline or fenced) and in link targets."""
    found = set()
    for span in code_spans(text) + LINK.findall(text):
        for match in PATH.finditer(span):
            if span[match.end():match.end() + 1] in ("<", "{"):
                continue                                       # a pattern: tests/test_<module>.py
            found.add(match.group(1).rstrip("."))
    return found


def exists(path):
    full = os.path.join(REPO_ROOT, path)
    return bool(glob.glob(full)) if "*" in path else os.path.exists(full)


@pytest.mark.parametrize("page", PAGES)
def test_every_path_a_page_names_exists(page):
    text = read(page)
    missing = sorted(p for p in named_paths(text) if not exists(p))
    for module in sorted(set(MODULE.findall(text))):
        base = os.path.join(REPO_ROOT, *module.split("."))
        if not (os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base,
                                                                            "__init__.py"))):
            missing.append(f"python -m {module}")
    assert not missing, f"{page} names what the repository does not have: {missing}"


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    text = read(page)
    here = os.path.dirname(os.path.join(REPO_ROOT, page))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):       # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(here, path)) if path else os.path.join(
            REPO_ROOT, page)
        if not os.path.exists(full):
            broken.append(target)
        elif anchor and full.endswith(".md"):
            with open(full, encoding="utf-8") as f:
                if anchor not in anchors(f.read()):
                    broken.append(target)
    assert not broken, f"{page} has links that do not resolve: {broken}"


def test_the_checks_see_what_they_should():
    """The path and anchor rules on examples, so the checks above cannot pass vacuously."""
    sample = ("Run `python experiments/run_table.py` and see [x](docs/x.md#a-b), "
              "`~/.cache/l2t_jax/xla`, `--config=configs/cifar100.py:tiny`, "
              "`tests/test_<module>.py`.\n"
              "```bash\npython -m l2t_jax.main --workdir=runs/docs/a\n```\n")
    assert named_paths(sample) == {"experiments/run_table.py", "docs/x.md",
                                   "configs/cifar100.py"}
    assert anchors("# Several devices, and faults\n## What `remat` does\n## Data\n## Data\n"
                   ) == {"several-devices-and-faults", "what-remat-does", "data", "data-1"}
    assert len(PAGES) > 5 and "README.md" in PAGES


# ------------------------------------------------------- what the repository speaks of
LEAKS = {
    "a path outside the repository": re.compile(r"\.\./shared"),
    "an issue number": re.compile(r"\b[Ii]ssues? #?\d+|(?<![\w/&\"'-])#\d{1,5}\b"),
    "words about how the work was organised": re.compile(
        r"\b(session|sessions|lent|drawn)\b", re.I),
    "the working note": re.compile(r"\bSPEC\.md\b"),
}
# The machinery of CI and the tests may name the assets' directory outside the repository.
OUTSIDE = (".ci/", "tests/")


def tracked_files():
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [p for p in listed.decode().split("\0") if p and not p.startswith(OUTSIDE)]


def leaks(pattern):
    found = []
    for path in tracked_files():
        try:
            with open(os.path.join(REPO_ROOT, path), "rb") as f:
                data = f.read()
        except OSError:
            continue
        if b"\0" in data:
            continue                                            # pictures, binaries
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path}:{number}: {line.strip()[:100]}")
    return found


@pytest.mark.parametrize("what", LEAKS)
def test_the_repository_speaks_only_of_the_project(what):
    found = leaks(LEAKS[what])
    assert not found, f"tracked files name {what}:\n" + "\n".join(found)


def test_the_leak_patterns_on_examples():
    assert LEAKS["an issue number"].search("as issue 20 asked")
    assert LEAKS["an issue number"].search("see #12")
    assert not LEAKS["an issue number"].search("the authors' answer (alinlab/L2T-ww#4)")
    assert not LEAKS["an issue number"].search("color='#1f77b4', color=\"#666666\"")
    words = LEAKS["words about how the work was organised"]
    assert words.search("what the session fit") and words.search("Not drawn")
    assert not words.search("sampled with the seed; a silent run; drawings")
