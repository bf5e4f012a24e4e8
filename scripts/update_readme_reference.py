"""Regenerate the config reference table in README.md from the dataclasses (tests/test_config.py checks it)."""

from pathlib import Path

from stainmil.config import config_reference_markdown

START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
head, rest = text.split(START)
_, tail = rest.split(END)
readme.write_text(head + START + config_reference_markdown() + END + tail)
print(f"updated {readme}")
