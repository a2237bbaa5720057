"""The sweep SPEC: which images, which models, which methods with which parameter grids, which
metrics, how to run. Written in TOML (``token-explorer sweep SPEC.toml``; every field is shown in
``docs/sweep-example.toml``), checked completely before any model loads: a wrong field fails with
its dotted path and the reason (:class:`SpecError`).

A method's *settings* are the cartesian product of its ``grid`` (parameter -> list of values) on
top of its fixed ``params``; each setting is validated by the method's own parameter model (the
same one that drives the window's form and ``--param``). The families decide what is measured:

* maps (``attention``, ``similarity``, ``attribution``): per image and target object (a COCO
  category, a synthetic object, or one of ``dataset.prompts``): ``pointing_game``,
  ``mass_inside``, ``deletion_auc`` (with ``random_deletion_auc``), and for label maps
  (``output = "labels"``) ``miou`` and ``pixel_accuracy`` against the categories;
* CLIP token reduction (``pruning``, ``merging``), executed: ``kept``, ``cosine``, ``top1_agree``,
  ``kl``, ``macs_ratio``, times, and with object masks ``object_share`` (next to ``object_chance``);
* VLM pruning (methods ``vlm.*`` of those families), on VQA items or a prompt: the pruned
  ``answer``, ``vqa_correct`` (and ``vqa_correct_full`` of the unpruned model), ``same_answer``,
  ``image_tokens_kept``, ``prefill_ratio``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["spec_reference", "SweepSpec", "DatasetSpec", "MethodSpec", "RunSpec", "SpecError", "load_spec", "MAP_FAMILIES",
           "REDUCTION_FAMILIES", "METRICS", "Setting"]

MAP_FAMILIES = ("attention", "similarity", "attribution")
REDUCTION_FAMILIES = ("pruning", "merging")
# what each task can measure; the spec's ``metrics`` picks among them (default: all but the costly ones)
METRICS = {
    "maps": ("pointing_game", "mass_inside", "deletion_auc", "miou", "pixel_accuracy"),
    "reduction": ("kept", "cosine", "top1_agree", "kl", "macs_ratio", "speedup", "object_share"),
    "vlm": ("vqa_correct", "same_answer", "image_tokens_kept", "prefill_ratio", "logprob_drop"),
}
COSTLY = {"deletion_auc", "speedup"}


class SpecError(ValueError):
    """A SPEC that cannot run: one line per problem, each ``field.path: reason``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Strict):
    """Where the images come from."""

    kind: Literal["folder", "coco", "vqa", "synthetic"] = Field(
        description="folder: images under path (recursive); coco: a COCO-format JSON (instances with masks or "
                    "boxes); vqa: a JSONL of {image, question, answers}; synthetic: seeded scenes with exact masks")
    path: str | None = Field(None, description="folder, COCO JSON or JSONL (relative to the SPEC file)")
    images: str | None = Field(None, description="coco, vqa: folder the image names are relative to "
                                                 "(default: the annotation file's folder)")
    count: int | None = Field(None, ge=1, description="synthetic: number of scenes; others: at most this many items")
    seed: int = Field(4_000_037, ge=0, description="synthetic: scene seed (scene i depends only on seed and i)")
    objects: int | list[int] = Field(2, description="synthetic: objects per scene, or [min, max]")
    size: list[int] = Field([224, 224], min_length=2, max_length=2, description="synthetic: [height, width]")
    prompts: list[str] = Field(default_factory=list,
                               description="folder: prompts for text-driven map methods (one row per prompt)")
    question: str = Field("<image> describe the scene",
                          description="folder, coco, synthetic with VLM methods: the prompt asked about every image")

    @model_validator(mode="after")
    def _needs(self) -> "DatasetSpec":
        if self.kind == "synthetic":
            if self.count is None:
                raise ValueError("count: a synthetic dataset needs count (the number of scenes)")
        elif not self.path:
            raise ValueError(f"path: a {self.kind} dataset needs path")
        if isinstance(self.objects, list) and (len(self.objects) != 2 or not 1 <= self.objects[0] <= self.objects[1]):
            raise ValueError("objects: give a count or [min, max] with 1 <= min <= max")
        if any(s < 16 for s in self.size):
            raise ValueError("size: each side must be at least 16 pixels")
        return self


class MethodSpec(_Strict):
    """One method and the parameter values it is swept over."""

    id: str = Field(description="method id, e.g. pruning.topk (token-explorer methods lists them)")
    params: dict[str, Any] = Field(default_factory=dict, description="fixed parameter values")
    grid: dict[str, list[Any]] = Field(default_factory=dict,
                                       description="parameter -> values; every combination is one setting")

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"{key}: an empty list of values")
        return grid


class RunSpec(_Strict):
    """How the sweep runs."""

    batch_size: int = Field(4, ge=1, le=4096, description="images per batch handed to a worker")
    actors: int = Field(1, ge=1, description="workers per model, each holding the model once")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs each worker asks Ray for")
    gpus_per_actor: float | Literal["auto"] = Field(
        "auto", description="GPUs each worker asks Ray for; auto: 1 when the model's device resolves to CUDA")
    deletion_steps: int = Field(16, ge=2, le=256, description="steps of the deletion curve (metric deletion_auc)")
    labels: Literal["auto", "imagenet", "scenes"] = Field(
        "auto", description="label set of the reduction top-1 agreement (auto: the model's own)")
    vary_seed: bool = Field(False, description="methods with a seed use the item's index as seed "
                                               "(random baselines then differ per image)")
    max_new_tokens: int = Field(16, ge=1, le=512, description="VLM: tokens generated per answer")
    reduction_layer: int | None = Field(None, description="CLIP reduction block for methods that do not set "
                                                          "layer (default: a third of the model's depth)")


class SweepSpec(_Strict):
    """See the module docstring."""

    dataset: DatasetSpec
    models: list[str] = Field(min_length=1, description="model specs, as --model takes them (demo, vlm:demo, …)")
    methods: list[MethodSpec] = Field(min_length=1)
    metrics: list[str] | None = Field(None, description="metrics to compute (default: every cheap one of each task)")
    run: RunSpec = Field(default_factory=RunSpec)
    base: str = Field("", exclude=True, description="folder relative paths are resolved against (the SPEC's)")

    def resolve(self, path: str | None) -> Path | None:
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() or not self.base else Path(self.base) / p

    def fingerprint(self) -> str:
        """A hash of everything that decides the results (not how they are computed in parallel):
        a results folder holds the rows of one fingerprint."""
        data = self.model_dump(mode="json", exclude={"base"})
        for key in ("batch_size", "actors", "cpus_per_actor", "gpus_per_actor"):
            data["run"].pop(key, None)
        for key in ("path", "images"):
            if data["dataset"].get(key):
                data["dataset"][key] = str(self.resolve(data["dataset"][key]).resolve())
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def wants(self, metric: str) -> bool:
        return metric in self.metrics if self.metrics is not None else metric not in COSTLY


class Setting(BaseModel):
    """One method at one point of its grid: ``key`` names it in the results (the grid values as
    sorted JSON), ``values`` are the parameters handed to the method (fixed + grid)."""

    model_config = ConfigDict(frozen=True)
    method: str
    key: str
    values: dict[str, Any]


def settings_of(method: MethodSpec) -> list[Setting]:
    """Every combination of the method's grid on top of its fixed parameters."""
    names = sorted(method.grid)
    out = []
    for combo in itertools.product(*(method.grid[n] for n in names)):
        point = dict(zip(names, combo))
        out.append(Setting(method=method.id, key=json.dumps(point, sort_keys=True), values={**method.params, **point}))
    return out


def spec_reference() -> str:
    """Every SPEC field with its type, default and meaning (``token-explorer sweep --help``)."""
    lines = []

    def describe(model: type[BaseModel], prefix: str, table: str | None) -> None:
        if table:
            lines.append(f"[{table}]")
        for name, f in model.model_fields.items():
            if f.exclude:
                continue
            ann = str(f.annotation).replace("typing.", "")
            if ann.startswith("<class '"):
                ann = f.annotation.__name__
            if f.is_required():
                default = "required"
            else:
                value = f.get_default(call_default_factory=True)
                default = "default " + (json.dumps(value) if not isinstance(value, BaseModel) else "{}")
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                continue
            if name == "methods":
                continue
            lines.append(f"  {prefix}{name} ({ann}; {default}): {f.description or ''}")

    describe(SweepSpec, "", None)
    describe(DatasetSpec, "", "dataset")
    lines.append("[[methods]]  (one table per method)")
    describe(MethodSpec, "", None)
    describe(RunSpec, "", "run")
    lines.append("metrics, by task (costly ones only when named: " + ", ".join(sorted(COSTLY)) + "):")
    for task, names in METRICS.items():
        lines.append(f"  {task}: {', '.join(names)}")
    return "\n".join(lines)


def _format(exc: ValidationError) -> list[str]:
    """``dotted.path: reason`` per error (a model check's ``field: reason`` joins its model's path)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        head, sep, rest = msg.partition(": ")
        if sep and head.isidentifier():  # "count: …" from a model validator
            loc, msg = (f"{loc}.{head}" if loc else head), rest
        lines.append(f"{loc}: {msg}" if loc else msg)
    return lines


def load_spec(source: str | Path | dict, host=None) -> SweepSpec:
    """Read and check a SPEC (a TOML file or its dict) without loading any model.

    Checks, beyond the field types: the dataset's files exist; every method id is known; every
    setting is valid for its method's parameter model; the metrics exist for the methods' tasks;
    VQA items meet VLM methods; label-map settings have categories to score against.
    ``host``: the plugin host to check methods with (default: a new one)."""
    base = ""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise SpecError(f"{path}: no such SPEC file")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SpecError(f"{path.name}: not valid TOML ({exc})") from None
        base = str(path.resolve().parent)
    else:
        data = dict(source)
    try:
        spec = SweepSpec.model_validate({**data, "base": data.get("base", base)})
    except ValidationError as exc:
        raise SpecError("\n".join(_format(exc))) from None
    problems = _check(spec, host)
    if problems:
        raise SpecError("\n".join(problems))
    return spec


def task_of(info) -> str:
    """'maps', 'reduction' or 'vlm' for a method's :class:`MethodInfo` ('' when not sweepable)."""
    if info.family in MAP_FAMILIES and "clip" in info.contribution.backends:
        return "maps"
    if info.family in REDUCTION_FAMILIES:
        if "clip" in info.contribution.backends:
            return "reduction"
        if "vlm" in info.contribution.backends:
            return "vlm"
    return ""


def _check(spec: SweepSpec, host) -> list[str]:
    from explorer.backends.registry import parse_model_spec
    from explorer.plugin_host.host import PluginError, PluginHost

    host = host or PluginHost()
    problems: list[str] = []
    d = spec.dataset
    if d.kind != "synthetic":
        p = spec.resolve(d.path)
        if d.kind == "folder" and not p.is_dir():
            problems.append(f"dataset.path: {p} is not a folder")
        elif d.kind != "folder" and not p.is_file():
            problems.append(f"dataset.path: {p}: no such file")
        if d.images is not None and not spec.resolve(d.images).is_dir():
            problems.append(f"dataset.images: {spec.resolve(d.images)} is not a folder")
    kinds = set()
    for i, m in enumerate(spec.models):
        try:
            kinds.add(parse_model_spec(m).kind)
        except ValueError as exc:
            problems.append(f"models[{i}]: {str(exc).splitlines()[0]}")
    tasks = set()
    for i, method in enumerate(spec.methods):
        where = f"methods[{i}]"
        try:
            info = host.method(method.id)
        except ValueError:
            problems.append(f"{where}.id: unknown method {method.id!r} (token-explorer methods lists them)")
            continue
        task = task_of(info)
        if not task:
            problems.append(f"{where}.id: {method.id} ({info.family}) cannot be swept: maps, CLIP token reduction "
                            "and VLM pruning can")
            continue
        tasks.add(task)
        need = "vlm" if task == "vlm" else "clip"
        if kinds and need not in kinds:
            problems.append(f"{where}.id: {method.id} needs a {need} model and models has none")
        try:
            fields = host.params_model(method.id).model_fields
        except PluginError as exc:
            problems.append(f"{where}.id: {method.id} cannot be loaded: {str(exc).splitlines()[0]}")
            continue
        for key in list(method.params) + list(method.grid):
            if key not in fields:
                part = "params" if key in method.params else "grid"
                problems.append(f"{where}.{part}.{key}: not a parameter of {method.id} "
                                f"(it has {', '.join(fields) or 'none'})")
        if any(k not in fields for k in list(method.params) + list(method.grid)):
            continue
        for s in settings_of(method):
            try:
                host.make_params(method.id, s.values)
            except ValueError as exc:
                problems.append(f"{where}: the setting {s.key} is not valid for {method.id}: "
                                f"{str(exc).splitlines()[0]}")
                break
        labels = [v for v in [method.params.get("output")] + list(method.grid.get("output", [])) if v == "labels"]
        if labels and d.kind == "folder" and len(d.prompts) < 2:
            problems.append(f"{where}: output = labels needs categories to score against (a coco or synthetic "
                            "dataset, or at least two dataset.prompts)")
        if task == "maps" and info.requires("text") and d.kind in ("folder", "vqa") and not d.prompts:
            problems.append(f"{where}.id: {method.id} needs a text prompt: give dataset.prompts")
    if d.kind == "vqa" and tasks - {"vlm"}:
        problems.append("dataset.kind: VQA items are scored with VLM pruning methods (vlm.*) only")
    if spec.metrics is not None:
        known = {m for t in tasks for m in METRICS[t]}
        for name in spec.metrics:
            if name not in known:
                problems.append(f"metrics: {name!r} is not measured for these methods (they measure "
                                f"{', '.join(sorted(known))})")
    return problems
