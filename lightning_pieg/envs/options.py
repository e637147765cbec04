"""Options of ``envs.make``: which ones each task family takes, and data files found through an option or an
environment variable."""
from __future__ import annotations

import os
from pathlib import Path

# Every family takes these; a family's ``OPTIONS`` lists the rest.
COMMON_OPTIONS = frozenset({"frame_stack", "action_repeat", "image_size", "time_limit"})


def check_known(task: str, options: dict, known: frozenset[str]) -> None:
    """A ``ValueError`` naming the first option ``task``'s family does not take (a typo in ``+env.<key>``)."""
    unknown = sorted(set(options) - COMMON_OPTIONS - known)
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not an option of task {task}; its options are "
                         f"{', '.join(sorted(COMMON_OPTIONS | known))}.")


def data_path(options: dict, option: str, env_var: str, missing: str, fix: str, kind: str = "folder") -> Path:
    """The path from option ``option``, else ``$env_var``. Neither set: ``FileNotFoundError(missing)``; set but not
    there: a ``FileNotFoundError`` naming the path, where it came from and ``fix``."""
    configured = options.get(option) or os.environ.get(env_var)
    if not configured:
        raise FileNotFoundError(missing)
    path = Path(configured).expanduser()
    if not (path.is_dir() if kind == "folder" else path.is_file()):
        source = f"option {option}" if options.get(option) else f"environment variable {env_var}"
        raise FileNotFoundError(f"{kind.capitalize()} {str(path)!r} (from the {source}) does not exist. {fix}")
    return path
