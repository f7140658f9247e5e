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


def pyplot():
    """(matplotlib.pyplot drawing to files, None), or (None, why no plot is written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return None, f"not written: matplotlib does not import ({first_line(e)})"
    return plt, None


def save_figure(fig, path, title, dpi):
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)


class Progress:
    """One line on stderr, rewritten in place on a terminal, one line per update otherwise.

    `advance` moves the count by one (True) or by a fraction of an item; with `bar`, the line
    starts with a bar of the share done."""

    BAR = 20

    def __init__(self, total, bar=False):
        self.total, self.done, self.bar = total, 0, bar
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.width = 0

    def __call__(self, text, advance=False):
        self.done += advance
        msg = f"[{self.done:g}/{self.total} {time.perf_counter() - self.t0:5.0f}s] {text}"
        if self.bar:
            filled = round(self.BAR * min(1, self.done / max(1, self.total)))
            msg = "[" + "#" * filled + "-" * (self.BAR - filled) + "] " + msg
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
