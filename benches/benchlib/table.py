"""A plain-text table: a head line, an optional rule, one line per row.

A column with a `width` pads its cells to it as a format spec does (a wider
cell pushes the rest of its line right, as the scripts' f-strings did); one
without is as wide as its head and its widest cell. Cells are right-aligned
unless the column says "<".
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    head: str
    width: int = 0  # 0: as wide as the widest cell or the head
    align: str = ">"  # ">" right, "<" left


def fmt(value, spec=".2f", none="-"):
    """`value` formatted with `spec`, or `none` for a missing value."""
    return none if value is None else format(value, spec)


def format_table(columns, rows, sep=" ", rule=False):
    """The lines of the table of `rows` (lists of cell strings, one per column), trailing spaces removed."""
    widths = [column.width or max(len(column.head), *(len(row[i]) for row in rows))
              for i, column in enumerate(columns)]

    def line(cells, aligns):
        return sep.join(f"{cell:{align}{width}}" for cell, align, width in zip(cells, aligns, widths)).rstrip()

    aligns = [column.align for column in columns]
    lines = [line([column.head for column in columns], aligns)]
    if rule:
        lines.append(line(["-" * width for width in widths], aligns))
    lines += [line(row, aligns) for row in rows]
    return lines


def print_table(columns, rows, sep=" ", rule=False):
    for line in format_table(columns, rows, sep, rule):
        print(line)
