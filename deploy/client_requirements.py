"""Print what the edge client needs from pip, one requirement per line, minus named packages.

Reads the metadata of the installed `hetlora-edge` distribution (install it first with
`pip install --no-deps .`): the core requirements plus those of one extra (`client` unless
--extra names another, e.g. `executorch`).
Use it where a package must come from elsewhere: on Termux torch comes from
`pkg install python-torch`, on a Jetson from NVIDIA's JetPack wheel.

    pip install --no-deps . && pip install $(python deploy/client_requirements.py --without torch)

Standard library only, Python >= 3.10.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys

DISTRIBUTION = "hetlora-edge"


def requirement_name(requirement: str) -> str:
    """The normalised project name a requirement string starts with (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def select(requirements: list[str], extra: str, without: set[str]) -> list[str]:
    """Requirements without a marker or with exactly `extra == "<extra>"`, minus `without`.

    Requirements of other extras are skipped; `python_version < "X.Y"` / `>= "X.Y"` markers are
    evaluated for this Python. Any other marker on a wanted requirement is refused rather than
    guessed, so a new platform-specific pin is noticed.
    """
    excluded = {requirement_name(name) for name in without}
    chosen = []
    for line in requirements:
        requirement, _, marker = (part.strip() for part in line.partition(";"))
        extras = re.findall(r"extra\s*==\s*[\"']([^\"']+)[\"']", marker)
        if extras and extra not in extras:
            continue
        version_test = re.fullmatch(r"python_version\s*(<|>=)\s*[\"'](\d+)\.(\d+)[\"']", marker)
        if version_test:
            op, major, minor = version_test.groups()
            if (sys.version_info[:2] < (int(major), int(minor))) != (op == "<"):
                continue
        elif marker and re.fullmatch(r"extra\s*==\s*[\"'][^\"']+[\"']", marker) is None:
            raise ValueError(f"cannot evaluate marker {marker!r} of {requirement!r}")
        if requirement_name(requirement) not in excluded:
            chosen.append(requirement)
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--without", action="append", default=[], metavar="NAME",
                        help="leave this package out (repeatable)")
    parser.add_argument("--extra", default="client", help="the extra to add to the core requirements (default client)")
    args = parser.parse_args(argv)
    try:
        requirements = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        print(f"client_requirements: {DISTRIBUTION} is not installed in this Python; "
              "run `pip install --no-deps .` in the project folder first", file=sys.stderr)
        return 2
    try:
        print("\n".join(select(requirements, args.extra, set(args.without))))
    except ValueError as exc:
        print(f"client_requirements: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
