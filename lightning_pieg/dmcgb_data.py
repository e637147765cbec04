"""Fetch and verify the DMC-GB evaluation data (colour sets and background videos).

    python -m lightning_pieg.dmcgb_data fetch --dir DIR    # download upstream's src/env/data into DIR, then verify
    python -m lightning_pieg.dmcgb_data verify --dir DIR   # check the file counts and that every file decodes

``--dir`` defaults to ``$DMCGB_DIR``. Point the ``dmcgb_dir`` option (or ``DMCGB_DIR``) at DIR afterwards.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import av

from lightning_pieg.envs.dmcgb import COLOR_FILES, DIR_ENV_VAR, VIDEO_COUNTS, load_color_sets, video_paths

UPSTREAM_REPO = "nicklashansen/dmcontrol-generalization-benchmark"
UPSTREAM_REF = "main"
RAW_URL = "https://raw.githubusercontent.com/{repo}/{ref}/src/env/data/{name}"
DOWNLOAD_TIMEOUT_S = 60
LFS_POINTER_PREFIX = b"version https://git-lfs"

Download = Callable[[str, Path], None]


def expected_files() -> list[str]:
    """Every file of the data directory, relative to it, in upstream's layout."""
    colors = list(COLOR_FILES.values())
    videos = [str(path) for mode in VIDEO_COUNTS for path in video_paths(Path(), mode)]
    return colors + videos


@dataclass
class Report:
    """What ``verify`` found: a line per checked group, and every problem (empty when the data is complete)."""

    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _is_lfs_pointer(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX


def count_frames(path: Path) -> tuple[int, int, int]:
    """Decode every frame of a video; returns (frames, width, height). Raises on undecodable data."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.codec_context.width, stream.codec_context.height


def verify(directory: str | os.PathLike) -> Report:
    """Check that ``directory`` holds all of upstream's files and that each one loads or decodes."""
    directory = Path(directory)
    report = Report()
    if not directory.is_dir():
        report.problems.append(f"{directory} does not exist or is not a directory")
        return report
    for name in COLOR_FILES.values():
        path = directory / name
        if not path.is_file():
            report.problems.append(f"missing: {path}")
        elif _is_lfs_pointer(path):
            report.problems.append(f"{path} is a Git LFS pointer, not the data")
        else:
            try:
                color_sets = load_color_sets(path)
            except Exception as error:  # any failure to load is a finding to report, not a crash
                report.problems.append(f"{path} does not load: {error}")
            else:
                report.checked.append(f"{name}: {len(color_sets)} colour sets")
    for mode, count in VIDEO_COUNTS.items():
        decoded: list[int] = []
        for path in video_paths(directory, mode):
            if not path.is_file():
                report.problems.append(f"missing: {path}")
                continue
            if _is_lfs_pointer(path):
                report.problems.append(f"{path} is a Git LFS pointer, not the data")
                continue
            try:
                frames, _, _ = count_frames(path)
            except Exception as error:  # PyAV raises several error types for broken files
                report.problems.append(f"{path} does not decode: {error}")
                continue
            if frames == 0:
                report.problems.append(f"{path} has no frames")
                continue
            decoded.append(frames)
        frames_range = f", {min(decoded)}-{max(decoded)} frames each" if decoded else ""
        report.checked.append(f"{mode}: {len(decoded)}/{count} videos decode{frames_range}")
    return report


def download_file(url: str, destination: Path) -> None:
    """Download ``url`` to ``destination`` through a temporary file, so an interrupted download leaves nothing."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=destination.parent, delete=False, suffix=".part") as part:
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                shutil.copyfileobj(response, part)
        except BaseException:
            os.unlink(part.name)
            raise
    os.replace(part.name, destination)


def fetch(directory: str | os.PathLike, ref: str = UPSTREAM_REF, overwrite: bool = False,
          download: Download = download_file, log: Callable[[str], None] = print) -> Report:
    """Download the files ``directory`` lacks (all with ``overwrite``) from upstream at ``ref``, then verify."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = expected_files()
    for number, name in enumerate(names, start=1):
        destination = directory / name
        if destination.is_file() and not overwrite:
            continue
        url = RAW_URL.format(repo=UPSTREAM_REPO, ref=ref, name=name)
        log(f"[{number}/{len(names)}] {url}")
        download(url, destination)
    return verify(directory)


def _print_report(report: Report, directory: Path) -> None:
    for line in report.checked:
        print(f"  {line}")
    if report.ok:
        print(f"OK: {directory} holds the complete DMC-GB data. Use it with dmcgb_dir={directory} or "
              f"{DIR_ENV_VAR}={directory}.")
        return
    print(f"{len(report.problems)} problem(s) in {directory}:", file=sys.stderr)
    for problem in report.problems:
        print(f"  {problem}", file=sys.stderr)
    print(f"Fix: python -m lightning_pieg.dmcgb_data fetch --dir {directory} (add --overwrite to replace broken "
          "files).", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_pieg.dmcgb_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("fetch", "download upstream's files, then verify"), ("verify", "check the files")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--dir", default=os.environ.get(DIR_ENV_VAR),
                             help=f"data directory (default: ${DIR_ENV_VAR})")
        if name == "fetch":
            command.add_argument("--ref", default=UPSTREAM_REF, help=f"upstream branch, tag or commit ({UPSTREAM_REF})")
            command.add_argument("--overwrite", action="store_true", help="download files that already exist too")
    args = parser.parse_args(argv)
    if not args.dir:
        parser.error(f"give --dir DIR or set {DIR_ENV_VAR}")
    directory = Path(args.dir).expanduser()
    if args.command == "fetch":
        print(f"Fetching DMC-GB data from github.com/{UPSTREAM_REPO}@{args.ref} into {directory}")
        report = fetch(directory, ref=args.ref, overwrite=args.overwrite)
    else:
        print(f"Verifying {directory}")
        report = verify(directory)
    _print_report(report, directory)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
