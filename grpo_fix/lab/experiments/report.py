"""Writers shared by the experiments and the demo: JSON, a markdown table, a PNG plot."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}"
    import os

    return f"CPU ({os.cpu_count()} cores, {platform.machine()}), torch {torch.__version__}"


def markdown_table(rows: list[dict[str, Any]], columns: list[str], floatfmt: str = ".4g") -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns``."""

    def fmt(v: object) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(
    out_dir: str | Path,
    name: str,
    *,
    title: str,
    table: str,
    payload: dict,
    plot: Callable[[object], None] | None = None,
    notes: str = "",
) -> dict[str, Path]:
    """Write ``name.json``, ``name.md`` and (with ``plot``) ``name.png`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    payload = {"machine": machine(), **payload}
    paths["json"].write_text(json.dumps(payload, indent=1, default=float))
    md = f"# {title}\n\nMeasured on: {payload['machine']}\n\n{table}\n"
    if notes:
        md += f"\n{notes.strip()}\n"
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(11, 4))
        plot(fig)
        fig.tight_layout()
        paths["png"] = out / f"{name}.png"
        fig.savefig(paths["png"], dpi=110)
        plt.close(fig)
        md += f"\n![{name}]({name}.png)\n"
    paths["md"].write_text(md)
    return paths
