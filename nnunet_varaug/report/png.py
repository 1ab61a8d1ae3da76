"""Figures as files and in pages: a matplotlib figure saved as PNG atomically, and a PNG embedded in HTML as
base64 so that every report.html is one self-contained file. Every figure of the package goes through here."""
from __future__ import annotations

import base64
import html as html_lib
import os

from nnunet_varaug.utilities.fileio import temporary_name


def save_figure(fig, path: str, dpi: int = 100) -> str:
    """Save a matplotlib figure as PNG atomically (temporary name, then rename) and close it; returns ``path``."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    tmp = temporary_name(path)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def embed_png(path: str, alt: str) -> str:
    """An ``<img>`` tag with the PNG inline (base64)."""
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<img alt="{html_lib.escape(alt)}" src="data:image/png;base64,{data}">'
