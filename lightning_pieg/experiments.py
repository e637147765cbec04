"""Which runs each of the paper's experiments is made of: methods, ablation variants, tasks, seeds, evaluation modes.

An experiment is a few groups; a group crosses its methods and variants with its tasks and the seeds. Every
``Run`` has a deterministic checkpoint folder under the output root, ``<root>/<experiment>/<name>``, and MLflow
tags that identify it (``experiment``, ``method``, ``variant``, ``task``, ``seed``), so a restarted job finds what
is already done. Frame budgets are the task presets' (the paper's) unless a budget is given.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lightning_pieg.console import UserError

DEFAULT_SEEDS = (1, 2, 3, 4, 5)  # RL-ViGen's five
TABLE1_TASKS = ("cartpole_swingup", "walker_stand", "walker_walk", "cup_catch", "cheetah_run", "finger_spin")
TABLE3_TASKS = ("walker_walk", "cheetah_run", "walker_stand")
DEFAULT_VARIANT = "default"
REFERENCE_VARIANTS = (DEFAULT_VARIANT, "layer2", "bn_adaptive")  # the paper's own configuration in each ablation
# Environment steps per episode (the largest return, as every step's reward lies in [0, 1]); dm_control: 1000.
EPISODE_FRAMES = {"reach_duplo": 250, "drawer_close": 200}
SUITE_EPISODE_FRAMES = 1000


def episode_frames(task: str) -> int:
    return EPISODE_FRAMES.get(task, SUITE_EPISODE_FRAMES)


@dataclass(frozen=True)
class Method:
    """An algorithm preset (``method=<name>``): its name in the paper's tables and what its training needs."""

    name: str
    label: str
    imagenet: bool  # the frozen ImageNet ResNet trunk
    overlay: bool   # the strong overlay augmentation's image folder (Places365)


METHODS = {
    "pieg": Method("pieg", "PIE-G", imagenet=True, overlay=True),
    "drqv2": Method("drqv2", "DrQ-v2", imagenet=False, overlay=False),
    "svea": Method("svea", "SVEA", imagenet=False, overlay=True),
}


@dataclass(frozen=True)
class Variant:
    """A setting on top of a method's preset (an ablation); ``default`` changes nothing."""

    name: str = DEFAULT_VARIANT
    label: str = ""
    overrides: tuple[str, ...] = ()
    layer: int | None = None  # the ResNet layer it keeps (Table 3's rows)


@dataclass(frozen=True)
class Group:
    methods: tuple[str, ...]
    tasks: tuple[str, ...]
    modes: tuple[str, ...]
    variants: tuple[Variant, ...] = (Variant(),)


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    groups: tuple[Group, ...]
    table: str | None       # lightning_pieg.paper table with the published figures (None: the paper has none)
    score: str = "episode_reward"  # the evaluation metric the tables report
    notes: tuple[str, ...] = ()

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for g in self.groups for t in g.tasks))

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m for g in self.groups for m in g.methods))

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m for g in self.groups for m in g.modes))


@dataclass(frozen=True)
class Run:
    """One training run and the evaluation of its final checkpoint."""

    experiment: str
    method: str
    variant: Variant
    task: str
    seed: int
    modes: tuple[str, ...]
    checkpoint_dir: Path
    frames: int | None = None  # None: the task preset's budget

    @property
    def name(self) -> str:
        return run_name(self.method, self.variant, self.task, self.seed)

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return self.experiment, self.method, self.variant.name, self.task, str(self.seed)

    @property
    def label(self) -> str:
        """The method as the tables name it: ``PIE-G``, ``PIE-G layer 3``."""
        base = METHODS[self.method].label
        return f"{base} {self.variant.label}" if self.variant.label else base

    @property
    def tags(self) -> dict[str, str]:
        return dict(zip(TAG_KEYS, self.key)) | {"reproduce": "run"}


TAG_KEYS = ("experiment", "method", "variant", "task", "seed")


def run_name(method: str, variant: Variant, task: str, seed: int) -> str:
    """``pieg_walker_walk_s1``, ``pieg-layer3_walker_walk_s1``: the run's MLflow name and checkpoint folder."""
    prefix = method if variant.name == DEFAULT_VARIANT else f"{method}-{variant.name}"
    return f"{prefix}_{task}_s{seed}"


SVEA_NOTE = ("SVEA here is SVEA on the DrQ-v2 backbone (as RL-ViGen); the paper quotes the SAC-based SVEA's numbers "
             "from DMC-GB (conf/method/svea.yaml lists the differences).")


def _layers() -> tuple[Variant, ...]:
    return tuple(Variant(f"layer{n}", f"layer {n}", (f"encoder.layer={n}",), layer=n) for n in (1, 2, 3, 4))


EXPERIMENTS = {
    "table1": Experiment(
        "table1", "Table 1: DMControl Generalization Benchmark (episode return)",
        (Group(("pieg", "drqv2", "svea"), TABLE1_TASKS, ("train", "video_easy", "video_hard", "color_hard")),),
        table="table1_dmcgb",
        notes=("The paper reports video_easy and video_hard; train and color_hard are ours only.", SVEA_NOTE)),
    "table2": Experiment(
        "table2", "Table 2: Drawer World, drawer_close success rate",
        (Group(("pieg", "drqv2", "svea"), ("drawer_close",), ("train", "wood", "metal", "blanket")),),
        table="table2_drawerworld", score="success_rate",
        notes=(("Drawer World runs on Meta-World 3; success is Meta-World 3's own criterion (handle within "
                "0.065 m), not Drawer World's v1 criterion (|y| <= 0.06 m)."),
               ("Without the user's blanket.png the blanket mode is blanket_generated, our own texture, never "
                "compared with the paper's blanket column."), SVEA_NOTE)),
    "table3": Experiment(
        "table3", "Table 3: PIE-G with ResNet layers 1-4 (episode return)",
        (Group(("pieg",), TABLE3_TASKS, ("video_easy", "train"), variants=_layers()),),
        table="table3_layers",
        notes=(("The paper does not name Table 3's evaluation setting; its numbers fit its video_easy column, so "
                "ours are compared in video_easy."),)),
    "fig4": Experiment(
        "fig4", "Figure 4: deformed shapes (reach_duplo) and the BatchNorm ablation (episode return)",
        (Group(("pieg", "drqv2"), ("reach_duplo",), ("train", "deformed", "deformed_thin")),
         Group(("pieg",), TABLE3_TASKS, ("train", "video_hard", "color_hard"),
               variants=(Variant("bn_adaptive", "BN adaptive", ("encoder.bn=adaptive",)),
                         Variant("bn_frozen", "BN frozen", ("encoder.bn=frozen",))))),
        table=None,
        notes=("The paper gives Figure 4 as plots without numbers: nothing here is compared with published figures.",
               "The paper does not list the BatchNorm ablation's tasks; these are Table 3's.")),
}


def experiment(name: str) -> Experiment:
    try:
        return EXPERIMENTS[name]
    except KeyError:
        raise UserError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)} (or all).") from None


def check_seeds(seeds: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    if not seeds:
        raise UserError("--seeds is empty; pass e.g. --seeds 1 2 3 4 5.")
    bad = [s for s in seeds if s < 0]
    if bad:
        raise UserError(f"--seeds {bad[0]} is negative; seeds are integers >= 0.")
    repeated = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if repeated:
        raise UserError(f"--seeds repeats {repeated[0]}; each seed is one run, give it once.")
    return tuple(seeds)


def _subset(kind: str, chosen: list[str] | None, available: tuple[str, ...], name: str) -> set[str] | None:
    if not chosen:
        return None
    unknown = [c for c in chosen if c not in available]
    if unknown:
        raise UserError(f"--{kind} {unknown[0]} is not part of {name}; its {kind}: {', '.join(available)}.")
    return set(chosen)


def runs(exp: Experiment, root: Path, seeds: tuple[int, ...] = DEFAULT_SEEDS, frames: int | None = None, *,
         tasks: list[str] | None = None, methods: list[str] | None = None, modes: list[str] | None = None,
         blanket: bool = False) -> list[Run]:
    """Every run of ``exp`` (optionally only some tasks, methods or evaluation modes). ``blanket``: the user has
    Drawer World's blanket.png; without it the ``blanket`` mode is replaced by ``blanket_generated`` (ours)."""
    seeds = check_seeds(seeds)
    if frames is not None and frames <= 0:
        raise UserError(f"--frames {frames} must be a positive number of frames (default: the task presets').")
    only_tasks = _subset("tasks", tasks, exp.tasks, exp.name)
    only_methods = _subset("methods", methods, exp.methods, exp.name)
    only_modes = _subset("modes", modes, exp.modes + (("blanket_generated",) if "blanket" in exp.modes else ()),
                         exp.name)
    out = []
    for group in exp.groups:
        group_modes = tuple("blanket_generated" if m == "blanket" and not blanket else m for m in group.modes)
        if only_modes is not None:
            group_modes = tuple(m for m in group_modes if m in only_modes)
        for seed in seeds:  # seed by seed: an interrupted experiment has comparable results early
            for method in group.methods:
                for variant in group.variants:
                    for task in group.tasks:
                        if (only_tasks is not None and task not in only_tasks) or \
                                (only_methods is not None and method not in only_methods) or not group_modes:
                            continue
                        out.append(Run(exp.name, method, variant, task, seed, group_modes,
                                       Path(root) / exp.name / run_name(method, variant, task, seed), frames))
    if not out:
        raise UserError(f"{exp.name}: no run is left after --tasks/--methods/--modes; see `plan {exp.name}`.")
    return out
