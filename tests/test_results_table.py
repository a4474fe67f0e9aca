"""The README's results table against docs/results.yaml, the file that records each figure with its command,
split, commit and machine: a figure changed in one place and not the other fails here."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
START = "<!-- results table: checked against docs/results.yaml by tests/test_results_table.py -->"
END = "<!-- end of results table -->"
RECORDED = ("model", "command", "split", "mean_iou", "val_mean_iou", "commit", "cpu", "machine")


def figures() -> list[dict]:
    return yaml.safe_load((ROOT / "docs" / "results.yaml").read_text())["figures"]


def row(figure: dict) -> list[str]:
    """The README row a figure must have: Model | Command | Machine | test mean IoU | val mean IoU."""
    return [figure["model"], f"`{figure['command']}`", figure["cpu"],
            f"{figure['mean_iou']:.3f}", f"{figure['val_mean_iou']:.3f}"]


def readme_rows() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    assert START in text and END in text, "README.md lost the markers around its results table"
    table = text.split(START, 1)[1].split(END, 1)[0].strip().splitlines()
    assert table[0].startswith("| Model | Command | Machine |"), table[0]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table[2:]]


def test_every_figure_records_its_command_split_commit_and_machine():
    for figure in figures():
        missing = [key for key in RECORDED if figure.get(key) in (None, "")]
        assert not missing, f"{figure.get('id')}: no {missing}"
        assert figure["split"] == "test", "the README's table quotes the held-out split"
        assert figure["command"].startswith("dvc exp run -S experiment=quickstart"), figure["command"]


def test_readme_results_table_is_exactly_the_results_file():
    assert readme_rows() == [row(figure) for figure in figures()], (
        "README.md's results table differs from docs/results.yaml; its rows should read:\n"
        + "\n".join("| " + " | ".join(row(figure)) + " |" for figure in figures()))


def test_quickstart_page_quotes_the_same_test_figures():
    """docs/quickstart.md repeats the figures with more columns: each of its test mean IoUs is one of the file's."""
    page = (ROOT / "docs" / "quickstart.md").read_text()
    quoted = set(re.findall(r"\| \*\*(\d\.\d{3})\*\* \|", page))
    assert quoted == {f"{figure['mean_iou']:.3f}" for figure in figures()}
