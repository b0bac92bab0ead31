"""The documentation a user owns: README.md is the front door (small, no links into files users never have), the
pages in docs/ build with MkDocs in strict mode (a broken link, a missing anchor or a page left out of the nav
fails), and every relative link in the README and the pages points at a file that exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 8 * 1024

# [text](target) and [text](target "title"); images too. Reference-style links are not used here.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))  # code blocks hold examples, not links
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


def _relative(target: str) -> bool:
    return not re.match(r"^([a-z][a-z0-9+.-]*:|#|/)", target, re.I)


def test_readme_is_a_small_front_door() -> None:
    data = README.read_bytes()
    assert len(data) < README_MAX_BYTES, f"README.md is {len(data)} bytes; keep it under {README_MAX_BYTES}"
    text = data.decode()
    for command in ("make serve", "make test"):
        assert command in text
    for client in ("InferenceClient", "@huggingface/inference", "from openai import OpenAI", "curl "):
        assert client in text, f"README.md has no first request with {client}"
    linked = {Path(t.split("#")[0]).as_posix() for t in _links(README) if _relative(t)}
    pages = "api configuration metering billing provider kubernetes benchmarking operations security"
    for page in pages.split():
        assert f"docs/{page}.md" in linked, f"README.md does not link docs/{page}.md"


@pytest.mark.parametrize("path", [README, *_pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_link_to_files_users_never_have(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    for bad in ("../shared", "/work/shared", "shared/spec", "shared/guide"):
        assert bad not in text, f"{path.relative_to(ROOT)} mentions {bad}: users never have it"


@pytest.mark.parametrize("path", [README, *_pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for target in _links(path):
        if not _relative(target):
            continue
        file_part = target.split("#", 1)[0]
        if file_part and not (path.parent / file_part).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files: {broken}"


def test_every_nav_page_exists_and_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def walk(items: list) -> list[str]:
        out: list[str] = []
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            out.extend(walk(value) if isinstance(value, list) else [value])
        return out

    nav = walk(config["nav"])
    assert sorted(nav) == sorted(p.relative_to(DOCS).as_posix() for p in _pages())


def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: `pip install -e .[test]` brings it")
    site = tmp_path / "site"
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    assert (site / "index.html").exists()
    assert (site / "metering.html").exists()
