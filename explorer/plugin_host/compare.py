"""Compare token-reduction methods on one image: selections, what they do to the output, sweeps.

Shared by the window's compare view and ``token-explorer compare``. Every method runs executed
(real removal) from one cached trace; the metrics compare each reduced embedding with the
unreduced one (:func:`~explorer.plugin_host.reduction.reduction_metrics`). Agreement between
methods is the IoU of their kept sets for two pruning methods and the normalised mutual
information of their groupings for two merging methods ("Which Tokens to Use?", Haurum et al.
2023); mixed pairs have no common measure (NaN).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel

from explorer.core.image_io import LoadedImage
from explorer.core.jobs import CancelToken, Job, Progress, sub_job
from explorer.core.metrics import kept_iou, normalized_mutual_information
from explorer.core.results import Metrics, TokenSelection
from explorer.core.target import Target

from .defaults import REDUCTION_FAMILIES, compare_layer
from .engine import Engine
from .reduction import label_set, reduction_metrics

__all__ = ["REDUCTION_FAMILIES", "ReductionComparison", "resolve_method_ids", "with_overrides", "compare_job",
           "sweep_job", "agreement_matrix", "throughput"]


@dataclass
class ReductionComparison:
    method_ids: list[str]
    selections: dict[str, TokenSelection] = field(default_factory=dict)
    metrics: dict[str, Metrics] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    agreement: np.ndarray | None = None
    agreement_kind: np.ndarray | None = None
    batch: int | None = None  # throughput mode: images per run
    throughput: dict[str, float] = field(default_factory=dict)  # images/s, 'unreduced' included
    layer: int | None = None  # the reduction block every method used (compare_layer)
    n_layers: int | None = None  # blocks of the model

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"methods": {}, "labels": len(self.labels), "layer": self.layer,
                               "n_layers": self.n_layers}
        for mid in self.method_ids:
            entry: dict[str, Any] = {}
            if mid in self.metrics:
                entry.update({k: float(v) for k, v in self.metrics[mid].values.items()})
                sel = self.selections[mid]
                entry["tokens_per_block"] = list(sel.meta.get("tokens_per_block", []))
                entry["stages"] = list(sel.meta.get("stages", []))
                stages = entry["stages"]
                entry["layer"] = int(stages[0]) if stages else self.layer
            if mid in self.errors:
                entry["error"] = self.errors[mid]
            if mid in self.throughput:
                entry["images_per_second"] = self.throughput[mid]
            out["methods"][mid] = entry
        if self.batch:
            out["throughput"] = {"batch": self.batch, "unreduced_images_per_second": self.throughput.get("unreduced")}
        if self.agreement is not None:
            out["agreement"] = {"methods": self.method_ids, "matrix": np.where(np.isfinite(self.agreement), self.agreement, None).tolist(),
                                "kind": self.agreement_kind.tolist()}
        return out


def resolve_method_ids(engine: Engine, names: Sequence[str], backend: str = "clip") -> list[str]:
    """Full method ids from names like ``topk`` or ``pruning.topk`` (reduction methods of the
    ``backend`` kind only, so that a short name such as ``divprune`` names one method).

    Raises ``ValueError`` for a name that names no such method (listing the full ids, each once)
    or several (listing those)."""
    reductions = [m for m in engine.host.methods() if m.family in REDUCTION_FAMILIES]
    known = sorted({m.id for m in reductions if backend in m.contribution.backends})
    out = []
    for name in names:
        name = name.strip()
        if not name:
            continue
        if name in known:
            out.append(name)
            continue
        hits = [k for k in known if k.split(".", 1)[-1] == name]
        if len(hits) > 1:
            raise ValueError(f"reduction method {name!r} is ambiguous: {', '.join(hits)}")
        if not hits:
            elsewhere = sorted({m.id for m in reductions if name in (m.id, m.id.split(".", 1)[-1])} - set(known))
            where = f" ({' and '.join(elsewhere)} {'is' if len(elsewhere) == 1 else 'are'} not for {backend} models)" \
                if elsewhere else ""
            raise ValueError(f"unknown {backend} reduction method {name!r}{where}; available: {', '.join(known)}")
        out.append(hits[0])
    if not out:
        raise ValueError("no method given")
    return out


def with_overrides(engine: Engine, method_id: str, params: BaseModel | None, **overrides: Any) -> BaseModel:
    """The method's parameters with ``keep``/``layer``/... set where the method has them."""
    model = engine.host.params_model(method_id)
    values = params.model_dump() if params is not None else {}
    for k, v in overrides.items():
        if v is not None and k in model.model_fields:
            values[k] = v
    return engine.host.make_params(method_id, values)


def agreement_matrix(method_ids: Sequence[str], selections: dict[str, TokenSelection]) -> tuple[np.ndarray, np.ndarray]:
    """``(values (M, M), kind (M, M))`` with kind 'iou', 'nmi' or '' (no common measure)."""
    M = len(method_ids)
    values = np.full((M, M), np.nan)
    kind = np.full((M, M), "", dtype=object)
    for i, a in enumerate(method_ids):
        for j, b in enumerate(method_ids):
            sa, sb = selections.get(a), selections.get(b)
            if sa is None or sb is None:
                continue
            ma, mb = sa.groups is not None, sb.groups is not None
            if not ma and not mb:
                values[i, j], kind[i, j] = kept_iou(sa.kept, sb.kept), "iou"
            elif ma and mb:
                values[i, j], kind[i, j] = normalized_mutual_information(sa.groups, sb.groups), "nmi"
    return values, kind


def compare_job(engine: Engine, spec: Any, image: LoadedImage, method_ids: Sequence[str],
                params: dict[str, BaseModel] | None = None, keep: float | None = None, layer: int | None = None,
                labels: str = "auto", custom_labels: Sequence[str] = (), cancel: CancelToken | None = None,
                batch: int | None = None) -> Job:
    """Job: every method executed on ``image`` (one shared trace), metrics and agreement.

    Every method reduces at one block, :func:`~explorer.plugin_host.defaults.compare_layer`:
    ``layer`` when given, else a third of the loaded model's depth (the model is loaded first to
    know it), overriding the block in ``params``; ``keep`` likewise when given.

    Times: each method's run and the unreduced tower over the same blocks are measured the same way
    (the device synchronised; ``speedup`` next to the MACs' ``ideal_speedup``). With ``batch`` the
    throughput mode also runs every method and the unreduced tower on a batch of ``batch`` copies
    of the image, from the image, and reports images per second (:func:`throughput`)."""
    cancel = cancel or CancelToken()
    ids = list(method_ids)
    loaded = yield from sub_job(engine.backend_job(spec), 0.0, 0.1)
    block = compare_layer(loaded.info, layer)
    plist = [with_overrides(engine, m, (params or {}).get(m), keep=keep, layer=block) for m in ids]
    backend, trace = yield from sub_job(engine.prepare_job(spec, image, ids, plist, Target(), cancel), 0.1, 0.3)
    yield Progress(0.3, "label set")
    names, T = label_set(backend, labels, custom_labels)
    out = ReductionComparison(method_ids=ids, labels=tuple(names), layer=block, n_layers=backend.info.n_layers)
    for i, (mid, p) in enumerate(zip(ids, plist)):
        cancel.raise_if_cancelled()
        yield Progress(0.3 + 0.7 * i / len(ids), engine.host.method(mid).title)
        try:
            start = time.perf_counter()
            sel = yield from engine.method_job(mid, trace, p, Target(), cancel, backend)
            elapsed = time.perf_counter() - start
        except (ValueError, RuntimeError) as exc:
            out.errors[mid] = str(exc).splitlines()[0]
            continue
        out.selections[mid] = sel
        # the reported time is a second, warm run, as the unreduced reference is (a first run also
        # pays for first-call allocations and imports)
        warm = engine.host.load(mid).executed(backend, trace, p, cancel=cancel)
        m = reduction_metrics(trace, sel, T, seconds=warm.seconds)
        out.metrics[mid] = Metrics(values={**m.values, "method_seconds": elapsed}, label=m.label)
    out.agreement, out.agreement_kind = agreement_matrix(ids, out.selections)
    if batch:
        yield Progress(0.95, f"throughput at batch {batch}")
        out.batch = int(batch)
        done = [m for m in ids if m in out.selections]
        out.throughput = throughput(engine, backend, image, done, [plist[ids.index(m)] for m in done], int(batch),
                                    cancel)
    yield Progress(1.0, "compared")
    return out


def throughput(engine: Engine, backend: Any, image: LoadedImage, method_ids: Sequence[str],
               params: Sequence[BaseModel], batch: int, cancel: CancelToken | None = None,
               runs: int = 3) -> dict[str, float]:
    """Images per second of the unreduced tower (``'unreduced'``) and of each method's executed
    reduction on a batch of ``batch`` copies of ``image``, from the image (every block), each the
    median of ``runs`` runs after one warm-up, the device synchronised (``ReducedRun.seconds``)."""
    if batch < 1:
        raise ValueError("the throughput batch must be at least 1")
    prepared = backend.prepare(image)
    pixels = prepared.pixels.expand(batch, *prepared.pixels.shape[1:]).contiguous()
    batched = type(prepared)(pixels, prepared.layout, prepared.sha256)

    def rate(fn) -> float:
        fn()
        secs = []
        for _ in range(runs):
            if cancel is not None:
                cancel.raise_if_cancelled()
            secs.append(fn().seconds)
        return batch / float(np.median(secs))

    out = {"unreduced": rate(lambda: backend.run_reduced(batched, (), cancel=cancel))}
    for mid, p in zip(method_ids, params):
        method = engine.host.load(mid)
        out[mid] = rate(lambda m=method, p=p: m.executed(backend, batched, p, cancel=cancel))
    return out


def sweep_job(engine: Engine, spec: Any, image: LoadedImage, method_ids: Sequence[str],
              keeps: Sequence[float] = (0.75, 0.5, 0.25, 0.1), params: dict[str, BaseModel] | None = None,
              layer: int | None = None, labels: str = "auto", custom_labels: Sequence[str] = (),
              cancel: CancelToken | None = None) -> Job:
    """Job: ``{method_id: [Metrics at each keep ratio]}`` (executed runs, one shared trace), every
    method at one block (``layer``, else a third of the model's depth; see :func:`compare_job`)."""
    cancel = cancel or CancelToken()
    ids = list(method_ids)
    results: dict[str, list[Metrics | None]] = {m: [] for m in ids}
    total = len(ids) * len(keeps)
    done = 0
    for keep in keeps:
        cmp = yield from sub_job(compare_job(engine, spec, image, ids, params, keep, layer, labels, custom_labels, cancel),
                                 done / total, (done + len(ids)) / total, prefix=f"keep {keep}: ")
        done += len(ids)
        for m in ids:
            results[m].append(cmp.metrics.get(m))
    return results
