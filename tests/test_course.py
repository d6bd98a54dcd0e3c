"""The map of the course (qatlab.course): every notebook on it, and the README's table up to date."""

import re
from pathlib import Path

import pytest

from qatlab import course

ROOT = Path(__file__).resolve().parents[1]


def test_readme_map_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- course-map:begin -->\n(.*?)\n<!-- course-map:end -->", readme, re.S)
    assert block, "README.md has no course-map block"
    assert block.group(1) == course.format_markdown(course.course_map()), \
        "the README's map is stale: paste the output of `python -m qatlab.course`"


def test_core_path_comes_first_and_every_notebook_is_on_the_map():
    rows = course.course_map()
    paths = [r[2] for r in rows]
    assert paths == sorted(paths, key=lambda p: p != "core")
    assert {r[0] for r in rows} == {p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    assert all(r[3] % 5 == 0 and r[3] >= 5 for r in rows)


def test_a_notebook_missing_from_the_map_is_an_error(tmp_path):
    (tmp_path / "99_extra.ipynb").write_text('{"cells": [{"source": ["# 99 · extra"]}]}')
    with pytest.raises(ValueError, match=r"present but not on the map \['99_extra'\]"):
        course.course_map(tmp_path)



def test_the_capstone_ends_the_core_path():
    core = [r[0] for r in course.course_map() if r[2] == "core"]
    assert [stem[:2] for stem in core] == ["00", "01", "02", "03", "04", "05", "10"]
    assert core[-1] == "10_qat_your_own_model"
