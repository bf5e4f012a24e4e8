"""Case labels from a CSV: configurable columns and label words, every problem counted and named."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from stainmil.config import DataConfig
from stainmil.errors import DataError


def normalize_case_id(value: object) -> str:
    """Case ids are text; purely numeric ids lose leading zeros so ``007`` in a file name meets ``7``."""
    text = str(value).strip()
    if text.endswith(".0") and text[:-2].isdigit():  # 42.0 from a spreadsheet
        text = text[:-2]
    return str(int(text)) if text.isdigit() else text


@dataclass
class Labels:
    """Case id -> class index, plus the problems met while reading the CSV."""

    by_case: dict[str, int]
    blank_case_rows: list[int] = field(default_factory=list)        # 1-based CSV data rows
    unknown_words: dict[str, str] = field(default_factory=dict)     # case -> word
    conflicting: dict[str, list[str]] = field(default_factory=dict)  # case -> words


def read_user_csv(path: Path) -> pd.DataFrame:
    """A CSV as people save it: UTF-8 with or without Excel's byte-order mark (else Windows-1252), separated by
    commas, semicolons (Excel in many locales), tabs or bars, header names stripped; every cell text."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    try:
        sep = csv.Sniffer().sniff(text[:65536], delimiters=",;\t|").delimiter
    except csv.Error:
        sep = ","
    table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, sep=sep)
    table.columns = [str(c).strip() for c in table.columns]
    return table


def read_labels(config: DataConfig) -> Labels:
    """Read ``config.labels_csv``; a missing file or column is fatal, row problems are recorded."""
    path = Path(config.labels_csv)
    if not config.labels_csv or not path.is_file():
        raise DataError(f"labels CSV '{config.labels_csv}' does not exist; set data.labels_csv to the file "
                        "with one row per case.")
    table = read_user_csv(path)
    columns = {}
    for key, column in (("data.case_column", config.case_column), ("data.label_column", config.label_column)):
        found = [c for c in table.columns if c == column] or \
            [c for c in table.columns if c.strip().lower() == column.strip().lower()]
        if not found:
            raise DataError(f"labels CSV {path} has no column '{column}' ({key}); its columns are "
                            f"{list(table.columns)}.")
        columns[key] = found[0]
    words = {word.strip().lower(): index for word, index in config.label_values.items()}
    labels = Labels(by_case={})
    seen: dict[str, list[str]] = {}
    for row_number, (raw_case, raw_word) in enumerate(zip(table[columns["data.case_column"]],
                                                          table[columns["data.label_column"]]), start=1):
        if not str(raw_case).strip():
            labels.blank_case_rows.append(row_number)
            continue
        case = normalize_case_id(raw_case)
        word = str(raw_word).strip()
        seen.setdefault(case, []).append(word)
    for case, case_words in seen.items():
        indices = {words.get(w.lower()) for w in case_words}
        if len(indices) > 1:
            labels.conflicting[case] = case_words
        elif None in indices:
            labels.unknown_words[case] = case_words[0]
        else:
            labels.by_case[case] = indices.pop()
    return labels
