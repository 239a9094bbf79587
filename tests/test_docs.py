"""The prose: every relative link of the README, DEVELOPERS.md, docs/ and results/README.md points
at a file that exists and, with an anchor, at a heading that file has (GitHub's heading ids)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def heading_id(title: str) -> str:
    """GitHub's id of a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def heading_ids(text: str) -> set[str]:
    ids, seen = set(), {}
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", FENCE.sub("", text), re.M):
        base = heading_id(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        ids.add(base if n == 0 else f"{base}-{n}")  # a repeated heading gets -1, -2, ...
    return ids


def broken_links(md: Path) -> list[str]:
    out = []
    for target in LINK.findall(FENCE.sub("", md.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path) if path else md
        if not dest.exists():
            out.append(f"{md.name}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in heading_ids(dest.read_text()):
            out.append(f"{md.name}: {target}: {dest.name} has no heading with that id")
    return out


def prose() -> list[Path]:
    return [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").glob("*.md")),
            ROOT / "results" / "README.md"]


def test_every_relative_link_of_the_prose_resolves():
    files = prose()
    assert all(f.is_file() for f in files)
    assert sum(len(LINK.findall(f.read_text())) for f in files) > 50  # the pattern does find the links
    problems = [p for f in files for p in broken_links(f)]
    assert not problems, "\n".join(problems)


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Step 2: run it\n\n## Step 2: run it\n")
    page = tmp_path / "page.md"
    page.write_text("[a](other.md#step-2-run-it) [b](other.md#step-2-run-it-1) [c](other.md#nowhere) "
                    "[d](gone.md) [e](https://example.org/x) [f](#top)\n\n# Top\n\n```\n[g](not-checked.md)\n```\n")
    assert broken_links(page) == ["page.md: other.md#nowhere: other.md has no heading with that id",
                                  "page.md: gone.md: no such file"]
