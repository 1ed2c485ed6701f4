"""Rebuild the sample corpus: the documentation of ~40 Python standard-library modules.

The text is the docstrings that ship with CPython (module, public classes and functions),
read with ``inspect.getdoc``: real, offline, redistributable (PSF License Agreement, copied
next to the corpus), and it invites natural questions ("How do I parse a CSV file?").

    python examples/build_sample_corpus.py            # writes examples/sample_corpus/python_stdlib

One Markdown file per module, so that the corpus is an ordinary folder of documents: the
same input a user gives the chatbot or ``d2llm-rag distill --corpus``. Each file is capped
(``--max-chars``) to keep the corpus small enough to live in the repository (< 1 MB).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

MODULES = (
    "argparse", "asyncio", "base64", "collections", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "enum", "fractions", "functools", "glob", "gzip",
    "hashlib", "heapq", "itertools", "json", "logging", "math", "os", "pathlib", "pickle",
    "random", "re", "shutil", "sqlite3", "statistics", "string", "subprocess", "tempfile",
    "textwrap", "threading", "time", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "sample_corpus" / "python_stdlib"


def public_members(module: object) -> list[tuple[str, object]]:
    """Public classes and functions defined by ``module`` itself, in source order."""
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    members = []
    for name in names:
        obj = getattr(module, name, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        home = getattr(obj, "__module__", "") or ""
        if not (home == module.__name__ or home.lstrip("_") == module.__name__
                or home.startswith(module.__name__ + ".")):
            continue
        if inspect.getdoc(obj):
            members.append((name, obj))

    def source_line(item: tuple[str, object]) -> int:
        try:
            return inspect.getsourcelines(item[1])[1]
        except (OSError, TypeError):
            return 10**9  # C functions have no source: after the Python ones

    return sorted(members, key=source_line)


def signature(name: str, obj: object) -> str:
    try:
        text = f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return name
    # Sentinel defaults print with their memory address: drop it so rebuilds are identical.
    return re.sub(r" at 0x[0-9a-fA-F]+>", ">", text)


def module_markdown(module_name: str, max_chars: int) -> str:
    """The module docstring, then one section per public member, until ``max_chars``."""
    module = importlib.import_module(module_name)
    doc = inspect.getdoc(module) or ""
    parts = [f"# The {module_name} module (Python {sys.version_info.major}."
             f"{sys.version_info.minor} standard library)\n\n{doc.strip()}\n"]
    size = len(parts[0])
    for name, obj in public_members(module):
        kind = "class" if inspect.isclass(obj) else "function"
        sections = [f"\n## {module_name}.{signature(name, obj)} ({kind})\n\n"
                    f"{inspect.getdoc(obj).strip()}\n"]
        if inspect.isclass(obj):
            sections += [f"\n### {module_name}.{name}.{signature(method_name, method)}\n\n"
                         f"{method.__doc__.strip()}\n"
                         for method_name, method in own_methods(obj)]
        for section in sections:
            if size + len(section) > max_chars:
                break
            parts.append(section)
            size += len(section)
    return "".join(parts)


def own_methods(cls: type) -> list[tuple[str, object]]:
    """Public methods a class defines itself with a docstring of its own (not inherited)."""
    methods = []
    for method_name, method in vars(cls).items():
        if method_name.startswith("_") or not callable(method):
            continue
        if isinstance(method, (staticmethod, classmethod)):
            method = method.__func__
        if (getattr(method, "__doc__", None) or "").strip():
            methods.append((method_name, method))
    return methods


def build(output: Path, max_chars: int, modules: tuple[str, ...] = MODULES) -> list[Path]:
    """Write the corpus into a temporary folder, then swap it into place (never half-written)."""
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        for module_name in modules:
            text = module_markdown(module_name, max_chars)
            (work / f"{module_name}.md").write_text(text, encoding="utf-8")
        license_file = Path(inspect.getfile(inspect)).parent / "LICENSE.txt"
        if license_file.exists():
            shutil.copyfile(license_file, output.parent / "LICENSE-PSF.txt")
        work.chmod(0o755)  # mkdtemp makes it private
        if output.exists():
            shutil.rmtree(output)
        os.replace(work, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sorted(output.glob("*.md"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--max-chars", type=int, default=8_000,
                        help="cap per module file, so that the corpus stays small")
    args = parser.parse_args(argv)
    files = build(args.output, args.max_chars)
    total = sum(f.stat().st_size for f in files)
    print(f"wrote {len(files)} files, {total / 1024:.0f} KiB, into {args.output}")


if __name__ == "__main__":
    main()
