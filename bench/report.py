"""Text output shared by the benchmarks: error lines, aligned tables, a progress line."""
import sys
import time


def first_line(e, limit=160):
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def text_table(cols, body, right):
    """Aligned text columns: `body` holds (group, cells) rows, a blank line between groups;
    the columns numbered in `right` are right-aligned."""
    widths = [max(len(c), *(len(cells[i]) for _, cells in body)) if body else len(c)
              for i, c in enumerate(cols)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [line(cols), "  ".join("-" * w for w in widths)]
    prev = None
    for group, cells in body:
        if prev is not None and group != prev:
            lines.append("")
        prev = group
        lines.append(line(cells))
    return "\n".join(lines)


class Progress:
    """One line on stderr, rewritten in place on a terminal, one line per update otherwise."""

    def __init__(self, total):
        self.total, self.done = total, 0
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.width = 0

    def __call__(self, text, advance=False):
        if advance:
            self.done += 1
        msg = f"[{self.done}/{self.total} {time.perf_counter() - self.t0:5.0f}s] {text}"
        if self.tty:
            pad = max(0, self.width - len(msg))
            sys.stderr.write("\r" + msg + " " * pad)
            self.width = len(msg)
        elif not advance:  # a log, not a terminal: one line per item started
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    def close(self):
        if self.tty and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
