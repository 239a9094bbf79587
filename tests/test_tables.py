"""Tables sized to their content (comigs_dist.tables) and the commands that print them."""
import re

import numpy as np
import pytest

from comigs_dist.tables import display_width, format_markdown, format_table


def _spans(rule: str) -> list[tuple[int, int]]:
    """Column spans (start, end) read off a table's line of dashes."""
    return [(m.start(), m.end()) for m in re.finditer(r"-+", rule)]


def test_a_25_character_category_lines_up_in_the_dataset_summary(tmp_path):
    """`python -m comigs_dist.data info` (the summary `prepare` prints) on categories up to 25
    characters: every cell sits inside its column, numbers flush right, text flush left."""
    from comigs_dist.data import write_dataset
    from comigs_dist.data.__main__ import describe
    categories = ["comp.graphics", "talk.politics.mideast.all", "sci.med"]
    assert len(categories[1]) == 25
    rng = np.random.default_rng(0)
    sizes = [(1200, 80, 90), (35, 123456, 7), (999999, 5, 12345)]
    users = [{"train": rng.integers(0, 50, a), "valid": rng.integers(0, 50, b), "test": rng.integers(0, 50, c)}
             for a, b, c in sizes]
    write_dataset(tmp_path / "d", users, 50, meta_extra={"dataset": "text", "scenario": "in"},
                  user_extra=[{"category": c} for c in categories])
    lines = describe(str(tmp_path / "d")).splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("user"))
    header, rule, rows = lines[head], lines[head + 1], lines[head + 2:]
    spans = _spans(rule)
    assert [header[a:b].strip() for a, b in spans[:-1]] == ["user", "category", "train", "valid", "test"]
    assert len(rows) == 3
    for user, (row, category, (a, b, c)) in enumerate(zip(rows, categories, sizes)):
        cells = [row[s:e] for s, e in spans[:-1]] + [row[spans[-1][0]:]]
        assert [x.strip() for x in cells] == [str(user), category, str(a), str(b), str(c), "own category"]
        for i in (0, 2, 3, 4):  # numbers end at their column's right edge
            assert cells[i] == cells[i].rjust(spans[i][1] - spans[i][0]), (row, i)
        assert cells[1].startswith(category) and row[spans[1][0] - 1] == " "
    assert spans[1][1] - spans[1][0] == 25  # the category column is as wide as its widest name
    assert all(line == line.rstrip() for line in lines)


def test_format_table_sizes_columns_and_aligns_by_content():
    """Widths are the widest cell; numeric columns (with '-' for missing) align right, text left;
    the footer follows a second rule; wide characters count as two columns."""
    text = format_table(("name", "ppl", "note"),
                        [("a", "1.5", "x"), ("日本語", "-", "longer note"), ("bb", "12.25", "")],
                        footer=[("mean", "6.875", "")])
    lines = text.splitlines()
    assert lines == ["name      ppl  note",
                     "------  -----  -----------",
                     "a         1.5  x",
                     "日本語      -  longer note",
                     "bb      12.25",
                     "------  -----  -----------",
                     "mean    6.875"]
    assert display_width("日本語") == 6 and display_width("e\u0301") == 1
    # every row's ppl cell ends at the same terminal column
    ends = {display_width(line[:line.index(cell) + len(cell)]) for line, cell in zip(lines[2:5], ("1.5", "-", "12.25"))}
    assert ends == {13}
    assert format_table(None, [("x", 1), ("yyy", 22)]) == "x     1\nyyy  22"
    with pytest.raises(ValueError, match=r"align \('<'\) needs one '<' or '>' per column \(2\)"):
        format_table(("a", "b"), [], "<")


def test_format_markdown_is_valid_and_aligned():
    """A Markdown table whose cells are padded: every line has the same width, the alignment row
    marks right-aligned columns with ':', and the cells read back unchanged."""
    md = format_markdown(("method", "agnews"), [("comigs_1g1s", "**34.17 (1.26)**"), ("local", "41.70")], "<>")
    lines = md.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[1] == "|-------------|-----------------:|"
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["method", "agnews"] and cells[2:] == [["comigs_1g1s", "**34.17 (1.26)**"], ["local", "41.70"]]
    assert lines[3].endswith("            41.70 |")


def test_methods_listing_lines_up(capsys):
    """`main --methods`: every description starts in one column, the widest name's plus two spaces."""
    from comigs_dist.main import main
    from comigs_dist.methods import known_methods
    assert main(["--methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    col = max(len(n) for n in known_methods()) + 2
    named = [line for line in lines if not line.startswith(" ")]
    assert [line.split()[0] for line in named] == list(known_methods())
    assert all(line[col - 2:col] == "  " and line[col] != " " for line in named)
    assert all(line[:col].strip() == "" and "=" in line for line in lines if line.startswith(" "))
