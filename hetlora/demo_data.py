"""The bundled demo data set: BANKING77 (PolyAI, CC BY 4.0), shipped inside the hetlora package.

It lies in hetlora/data/banking77/ in a checkout and in site-packages after `pip install`, so the
defaults of `hetlora demo` and `hetlora serve --labels` work from any install.
"""

from __future__ import annotations

from pathlib import Path

from hetlora.errors import UserError

BANKING77 = Path(__file__).resolve().parent / "data" / "banking77"


def banking77(name: str, flag: str) -> Path:
    """The bundled file `name` (train.csv, test.csv, categories.json); a UserError naming `flag` if absent."""
    path = BANKING77 / name
    if not path.is_file():
        raise UserError(f"the bundled BANKING77 file {name} is not in this install ({path}); pass {flag} FILE")
    return path
