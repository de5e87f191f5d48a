"""Regenerate README's configuration table from the dataclasses (make readme)."""

import re
from pathlib import Path

from distnn.config import help_table

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
block = f"<!-- config-table -->\n{help_table()}\n<!-- /config-table -->"
readme.write_text(re.sub(r"<!-- config-table -->.*<!-- /config-table -->", block, text, flags=re.S))
