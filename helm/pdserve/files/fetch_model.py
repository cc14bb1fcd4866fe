"""Copy a model folder into a pod's volume (the chart's init container for model.source=url).

    --source hf://org/name[@revision]      Hugging Face Hub (huggingface_hub; HF_TOKEN if gated)
    --source https://host/model.tar[.gz]   an archive, streamed and unpacked (never stored whole)

`--include` glob patterns keep only matching files (the router takes config and tokenizer files,
never weights). A finished copy leaves a marker naming its source and patterns, so a restarted
pod whose volume survived skips the download. Standard library only, besides huggingface_hub.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path, PurePosixPath

MARKER = ".pdserve-fetched"


def _wanted(name: str, patterns: list[str]) -> bool:
    base = PurePosixPath(name).name
    return not patterns or any(fnmatch.fnmatch(base, p) or fnmatch.fnmatch(name, p) for p in patterns)


def _strip(name: str, components: int) -> str | None:
    parts = PurePosixPath(name).parts[components:]
    return str(PurePosixPath(*parts)) if parts else None


def fetch_archive(url: str, dest: Path, patterns: list[str], strip_components: int) -> int:
    """Stream a tar archive from `url` into `dest`; returns the number of files written."""
    count = 0
    with urllib.request.urlopen(url, timeout=60) as response, tarfile.open(fileobj=response, mode="r|*") as archive:
        for member in archive:
            name = _strip(member.name, strip_components)
            if name is None or not member.isfile() or not _wanted(name, patterns):
                continue
            target = (dest / name).resolve()
            if dest.resolve() not in target.parents:
                raise ValueError(f"archive member {member.name!r} would land outside {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None  # a regular file always has content
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 16 << 20)
            count += 1
    return count


def fetch_hub(spec: str, dest: Path, patterns: list[str]) -> int:
    from huggingface_hub import snapshot_download

    repo_id, _, revision = spec.partition("@")
    snapshot_download(repo_id, revision=revision or None, local_dir=dest, allow_patterns=patterns or None)
    return sum(1 for p in dest.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--dest", required=True, type=Path)
    parser.add_argument("--include", action="append", default=[], help="glob of files to keep (repeatable)")
    parser.add_argument("--strip-components", type=int, default=0)
    args = parser.parse_args(argv)
    dest: Path = args.dest
    stamp = json.dumps({"source": args.source, "include": sorted(args.include)})
    marker = dest / MARKER
    if marker.is_file() and marker.read_text() == stamp:
        print(f"fetch_model: {dest} already holds {args.source}; nothing to do")
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    if args.source.startswith("hf://"):
        count = fetch_hub(args.source.removeprefix("hf://"), dest, args.include)
    elif args.source.startswith(("http://", "https://", "file://")):
        count = fetch_archive(args.source, dest, args.include, args.strip_components)
    else:
        print(f"fetch_model: source {args.source!r} must be hf://org/name or an http(s) archive URL", file=sys.stderr)
        return 2
    if count == 0:
        print(f"fetch_model: {args.source} gave no file matching {args.include or ['*']}", file=sys.stderr)
        return 1
    marker.write_text(stamp)
    print(f"fetch_model: {count} files from {args.source} in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
