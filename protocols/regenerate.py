#!/usr/bin/env python3
"""Regenerate the Wayland protocol XML in ``protocols/`` from the Debian packages.

This script is the only way the ``*.xml`` files next to it are meant to change.
It reads

* ``wayland.xml`` from the Debian package ``libwayland-dev``
  (``/usr/share/wayland/wayland.xml``), and
* from the Debian package ``wayland-protocols`` (``/usr/share/wayland-protocols/``)
  every XML file under ``stable/`` and ``staging/``, plus every XML file in the
  every ``unstable/`` protocol but those in :data:`EXCLUDED_UNSTABLE`,

and writes each of them, flattened, as ``<output>/<basename>.xml``.

Only the facts the proxy needs (and the copyright notice, which the licences ask
to be kept) survive; the upstream authors' prose does not:

* every ``<description>`` element and every ``summary`` attribute is removed;
* XML comments and processing instructions are removed;
* ``<copyright>`` text is kept verbatim;
* any element or attribute not listed in :data:`KEPT_ATTRIBUTES` makes the script
  fail, so that a new upstream fact is never dropped silently.

The output is deterministic: UTF-8, an XML declaration, a comment naming the
source package, its version (``dpkg-query``) and the source file, then the
elements in source order, indented by two spaces, with the attributes of each
element in the fixed order given by :data:`KEPT_ATTRIBUTES` (which is the order
of the Wayland DTD).

Usage::

    python3 protocols/regenerate.py [--output DIR] [--check]

Without ``--check`` the files are (re)written into DIR (default: the directory
holding this script) and ``*.xml`` files in DIR that are no longer generated are
deleted; other files are never touched. With ``--check`` nothing is written to
DIR: the files are generated into a temporary directory and compared with DIR;
the exit status is 1, with the differing, missing and extra files listed, when
they differ.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

WAYLAND_PACKAGE = "libwayland-dev"
WAYLAND_XML = Path("/usr/share/wayland/wayland.xml")

PROTOCOLS_PACKAGE = "wayland-protocols"
PROTOCOLS_ROOT = Path("/usr/share/wayland-protocols")

#: Subdirectories of PROTOCOLS_ROOT taken whole (every XML file, recursively).
WHOLE_DIRS: tuple[str, ...] = ("stable", "staging")

#: Unstable protocol files left out, with why: their interface names are those of a
#: stable protocol with other definitions, and one proxy can only know one of them.
EXCLUDED_UNSTABLE: dict[str, str] = {
    "xdg-shell-unstable-v5.xml": "its xdg_surface and xdg_popup clash with stable "
    "xdg-shell's; no current compositor offers it (xdg_shell v5 was replaced by "
    "xdg_wm_base)",
}

#: Elements kept, each with the attributes kept, in the order they are written.
KEPT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "protocol": ("name",),
    "copyright": (),
    "interface": ("name", "version"),
    "request": ("name", "type", "since", "deprecated-since"),
    "event": ("name", "type", "since", "deprecated-since"),
    "arg": ("name", "type", "interface", "allow-null", "enum"),
    "enum": ("name", "since", "bitfield"),
    "entry": ("name", "value", "since", "deprecated-since"),
}

#: Elements removed with everything inside them.
DROPPED_ELEMENTS = frozenset({"description"})

#: Attributes removed wherever they appear.
DROPPED_ATTRIBUTES = frozenset({"summary"})

#: The only element whose text content is kept (verbatim).
TEXT_ELEMENT = "copyright"

INDENT = "  "
SCRIPT_NAME = "protocols/regenerate.py"


class RegenerateError(Exception):
    """The sources are missing, ambiguous or hold something this script does not know."""


@dataclass(frozen=True)
class Source:
    """One upstream protocol file and the Debian package it comes from."""

    path: Path
    package: str

    @property
    def basename(self) -> str:
        return self.path.name


def package_version(package: str) -> str:
    """The installed version of a Debian package, as reported by dpkg-query."""
    if shutil.which("dpkg-query") is None:
        raise RegenerateError(
            "dpkg-query not found: this script must run on a Debian-based system "
            f"with {WAYLAND_PACKAGE} and {PROTOCOLS_PACKAGE} installed"
        )
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    version = result.stdout.strip()
    if result.returncode != 0 or not version:
        detail = result.stderr.strip() or "no version reported"
        raise RegenerateError(f"Debian package {package} is not installed ({detail})")
    return version


def find_sources() -> list[Source]:
    """Every upstream file to convert, in a stable order; fails on duplicate basenames."""
    if not WAYLAND_XML.is_file():
        raise RegenerateError(f"{WAYLAND_XML} not found: install {WAYLAND_PACKAGE}")
    if not PROTOCOLS_ROOT.is_dir():
        raise RegenerateError(f"{PROTOCOLS_ROOT} not found: install {PROTOCOLS_PACKAGE}")

    sources = [Source(WAYLAND_XML, WAYLAND_PACKAGE)]
    for name in WHOLE_DIRS:
        directory = PROTOCOLS_ROOT / name
        if not directory.is_dir():
            raise RegenerateError(f"{directory} not found in {PROTOCOLS_PACKAGE}")
        found = sorted(directory.rglob("*.xml"))
        if not found:
            raise RegenerateError(f"{directory} holds no XML file")
        sources.extend(Source(path, PROTOCOLS_PACKAGE) for path in found)
    unstable = PROTOCOLS_ROOT / "unstable"
    if not unstable.is_dir():
        raise RegenerateError(f"{unstable} not found in {PROTOCOLS_PACKAGE}")
    found = sorted(p for p in unstable.rglob("*.xml") if p.name not in EXCLUDED_UNSTABLE)
    if not found:
        raise RegenerateError(f"{unstable} holds no XML file")
    sources.extend(Source(path, PROTOCOLS_PACKAGE) for path in found)

    seen: dict[str, Source] = {}
    for source in sources:
        earlier = seen.get(source.basename)
        if earlier is not None:
            raise RegenerateError(
                f"two sources give {source.basename}: {earlier.path} and {source.path}"
            )
        seen[source.basename] = source
    return sources


def _check_whitespace(text: str | None, where: str) -> None:
    if text is not None and text.strip():
        raise RegenerateError(f"unexpected text {text.strip()[:40]!r} {where}")


def _attributes(element: ET.Element, where: str) -> str:
    """The kept attributes of ``element``, in the fixed order, as XML text."""
    kept = KEPT_ATTRIBUTES[element.tag]
    unknown = set(element.attrib) - set(kept) - DROPPED_ATTRIBUTES
    if unknown:
        raise RegenerateError(
            f"unknown attribute(s) {', '.join(sorted(unknown))} on <{element.tag}> {where}; "
            "add them to KEPT_ATTRIBUTES or DROPPED_ATTRIBUTES"
        )
    return "".join(
        f" {name}={quoteattr(element.attrib[name])}" for name in kept if name in element.attrib
    )


def _render(element: ET.Element, depth: int, where: str, lines: list[str]) -> None:
    """Append the stripped, indented XML of ``element`` to ``lines``."""
    if element.tag not in KEPT_ATTRIBUTES:
        raise RegenerateError(
            f"unknown element <{element.tag}> {where}; "
            "add it to KEPT_ATTRIBUTES or DROPPED_ELEMENTS"
        )
    name = element.attrib.get("name")
    here = f"{where}/{element.tag}" + (f"[@name={name!r}]" if name else "")
    pad = INDENT * depth
    attrs = _attributes(element, f"at {here}")

    if element.tag == TEXT_ELEMENT:
        if len(element):
            raise RegenerateError(f"unexpected child element in {here}")
        text = element.text or ""
        lines.append(f"{pad}<{element.tag}{attrs}>{escape(text)}</{element.tag}>")
        return

    _check_whitespace(element.text, f"inside {here}")
    children = []
    for child in element:
        _check_whitespace(child.tail, f"after a child of {here}")
        if child.tag not in DROPPED_ELEMENTS:
            children.append(child)
    if not children:
        lines.append(f"{pad}<{element.tag}{attrs}/>")
        return
    lines.append(f"{pad}<{element.tag}{attrs}>")
    for child in children:
        _render(child, depth + 1, here, lines)
    lines.append(f"{pad}</{element.tag}>")


def header_comment(source: Source, version: str) -> str:
    """The comment placed after the XML declaration of every generated file."""
    text = (
        f"Generated by {SCRIPT_NAME} from Debian package {source.package} "
        f"version {version} ({source.path}). Do not edit: rerun the script. "
        "Descriptions and summaries were stripped on purpose."
    )
    if "--" in text or text.endswith("-"):
        raise RegenerateError(f"cannot put {text!r} in an XML comment")
    return f"<!-- {text} -->"


def convert(source: Source, version: str) -> str:
    """The stripped XML text generated from one upstream file."""
    # The default TreeBuilder drops comments and processing instructions.
    try:
        root = ET.parse(source.path).getroot()
    except ET.ParseError as error:
        raise RegenerateError(f"cannot parse {source.path}: {error}") from error
    if root.tag != "protocol":
        raise RegenerateError(f"{source.path}: root element is <{root.tag}>, not <protocol>")
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', header_comment(source, version)]
    _render(root, 0, str(source.path), lines)
    return "\n".join(lines) + "\n"


def _interface_names(text: str) -> list[str]:
    return [iface.attrib["name"] for iface in ET.fromstring(text).iter("interface")]


def generate() -> dict[str, str]:
    """Every generated file, as basename -> XML text."""
    versions = {
        package: package_version(package) for package in (WAYLAND_PACKAGE, PROTOCOLS_PACKAGE)
    }
    files: dict[str, str] = {}
    defined_in: dict[str, str] = {}
    for source in find_sources():
        text = convert(source, versions[source.package])
        for interface in _interface_names(text):
            if interface in defined_in:
                raise RegenerateError(
                    f"interface {interface} is defined in both {defined_in[interface]} "
                    f"and {source.basename}"
                )
            defined_in[interface] = source.basename
        files[source.basename] = text
    return files


def write(files: dict[str, str], output: Path) -> list[str]:
    """Write ``files`` into ``output``, delete stale ``*.xml``; return what changed."""
    output.mkdir(parents=True, exist_ok=True)
    changes: list[str] = []
    for name, text in sorted(files.items()):
        path = output / name
        data = text.encode("utf-8")
        if path.is_file() and path.read_bytes() == data:
            continue
        changes.append(f"{'updated' if path.exists() else 'created'} {name}")
        path.write_bytes(data)
    for path in sorted(output.glob("*.xml")):
        if path.name not in files and path.is_file():
            path.unlink()
            changes.append(f"removed {path.name}")
    return changes


def check(files: dict[str, str], output: Path) -> list[str]:
    """The problems found comparing ``output`` with freshly generated ``files``."""
    with tempfile.TemporaryDirectory(prefix="qubesshm-protocols-") as tmp:
        fresh = Path(tmp)
        write(files, fresh)
        expected = {path.name for path in fresh.glob("*.xml")}
        present = {path.name for path in output.glob("*.xml")} if output.is_dir() else set()
        problems = [f"missing: {name}" for name in sorted(expected - present)]
        problems += [f"extra: {name}" for name in sorted(present - expected)]
        problems += [
            f"differs: {name}"
            for name in sorted(expected & present)
            if not filecmp.cmp(fresh / name, output / name, shallow=False)
        ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Regenerate the stripped Wayland protocol XML from the Debian packages "
        f"{WAYLAND_PACKAGE} and {PROTOCOLS_PACKAGE}."
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="directory to write (or check) the XML files in (default: %(default)s)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the files in the output directory are not up to date",
    )
    args = parser.parse_args(argv)
    output: Path = args.output

    try:
        files = generate()
    except RegenerateError as error:
        print(f"regenerate.py: error: {error}", file=sys.stderr)
        return 2

    if args.check:
        problems = check(files, output)
        if problems:
            print(f"{output} is not up to date; run python3 {SCRIPT_NAME}:", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            return 1
        print(f"{output}: {len(files)} protocol files up to date")
        return 0

    changes = write(files, output)
    for change in changes:
        print(change)
    print(f"{output}: {len(files)} protocol files, {len(changes)} change(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
