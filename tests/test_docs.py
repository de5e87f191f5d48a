"""README stays the user's manual: its config table is the dataclasses' own."""

from pathlib import Path

from distnn.config import help_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_table_is_current():
    assert help_table() in README.read_text(), "run `make readme` to regenerate the table"


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
