"""What a sweep worker does with one batch of items: the same engine, backends and plugins as the
window and the CLI, one model loaded once per worker.

:class:`SweepWorker` is a plain callable (Ray Data builds one per actor and calls it on batches;
the tests and the plain-loop benchmark call it directly). For each item it reads the image, traces
it once for all the item's map and reduction settings (the engine's trace cache), then runs every
pending setting and returns one row per setting and target (:func:`~explorer.sweep.results.empty_row`).
A failure of one item or one setting becomes that row's ``error``; the sweep goes on.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from explorer.core.jobs import run_sync
from explorer.core.metrics import mass_inside, pointing_game
from explorer.core.results import Heatmap, LabelMap
from explorer.core.target import Target

from .datasets import Sample, load_item, vqa_correct
from .results import empty_row, rows_of
from .spec import Setting, SweepSpec, settings_of, task_of

__all__ = ["SweepWorker", "object_tokens"]


def object_tokens(layout, instance_map: np.ndarray) -> np.ndarray:
    """Per image token of the first grid: does its cell's centre pixel lie on an object
    (``instance_map (H, W) > 0``)?"""
    seg = layout.segments[0]
    out = np.zeros(layout.n_image_tokens, dtype=bool)
    H, W = instance_map.shape
    for t in range(min(layout.n_image_tokens, seg.rows * seg.cols)):
        r, c = divmod(t, seg.cols)
        b = seg.cell_box(r, c)
        x, y = int((b.x0 + b.x1) / 2), int((b.y0 + b.y1) / 2)
        if 0 <= x < W and 0 <= y < H:
            out[t] = instance_map[y, x] > 0
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:500]


class SweepWorker:
    """Runs the settings of one model on batches of items (see the module docstring).

    Parameters
    ----------
    spec : dict
        The SPEC (``SweepSpec.model_dump()``: plain data, so that Ray can ship it).
    model : str
        The model spec this worker loads.
    categories : list of str
        The dataset's category names (the label set of label maps).
    """

    def __init__(self, spec: dict, model: str, categories: list[str] | None = None) -> None:
        from explorer.plugin_host.engine import Engine

        self.spec = SweepSpec.model_validate(spec)
        self.model = model
        self.categories = list(categories or [])
        self.engine = Engine()
        self.backend = run_sync(self.engine.backend_job(model))
        self.kind = self.backend.info.kind
        host = self.engine.host
        self.settings: dict[tuple[str, str], Setting] = {}
        self.tasks: dict[str, str] = {}
        for m in self.spec.methods:
            task = task_of(host.method(m.id))
            if (task == "vlm") != (self.kind == "vlm"):
                continue  # another model kind's method
            self.tasks[m.id] = task
            for s in settings_of(m):
                self.settings[(s.method, s.key)] = s
        self._labels = None  # the reduction's zero-shot label set, encoded once
        self._label_texts = None

    # -- the batch interface --------------------------------------------------------------------
    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """Ray Data's ``map_batches`` call: items in (columns), result rows out (columns)."""
        rows: list[dict[str, Any]] = []
        for item in rows_of(batch):
            rows.extend(self.run_item(item))
        from .results import COLUMNS

        return {c: [r[c] for r in rows] for c in COLUMNS}

    def pending(self, item: dict[str, Any]) -> list[Setting]:
        keys = json.loads(item.get("pending") or "null")
        if keys is None:
            return list(self.settings.values())
        return [self.settings[(m, k)] for m, k in keys if (m, k) in self.settings]

    def run_item(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """All pending settings of one item: rows (a failed read gives one error row per setting)."""
        settings = self.pending(item)
        base = {"item_id": str(item["item_id"]), "index": int(item["index"]),
                "image": str(item.get("path") or item["item_id"]), "model": self.model}
        try:
            sample = load_item(item, self.spec)
        except (ValueError, OSError) as exc:
            return [empty_row(**base, method=s.method, setting=s.key, task=self.tasks[s.method],
                              params=json.dumps(s.values, sort_keys=True), error=_first_line(exc)) for s in settings]
        rows = []
        for task in ("maps", "reduction", "vlm"):
            mine = [s for s in settings if self.tasks[s.method] == task]
            if mine:
                rows.extend(getattr(self, f"_{task}")(sample, item, mine, base))
        return rows

    # -- helpers ----------------------------------------------------------------------------------
    def _params(self, setting: Setting, item: dict[str, Any]):
        from explorer.plugin_host.defaults import default_params, is_clip_reduction

        values = dict(setting.values)
        host = self.engine.host
        fields = host.params_model(setting.method).model_fields
        if self.spec.run.vary_seed and "seed" in fields and "seed" not in values:
            values["seed"] = int(item["index"])
        if ("layer" not in values and self.spec.run.reduction_layer is not None
                and is_clip_reduction(host, setting.method) and "layer" in fields):
            values["layer"] = self.spec.run.reduction_layer
        if self.kind == "vlm" and "max_new_tokens" in fields and "max_new_tokens" not in values:
            values["max_new_tokens"] = self.spec.run.max_new_tokens
        params = default_params(host, setting.method, self.backend.info, values)
        L = self.backend.info.n_layers
        if self.kind == "vlm" and "layer" not in values and getattr(params, "layer", 0) >= L:
            params = host.make_params(setting.method, {**params.model_dump(), "layer": L - 1})  # a shallow LLM
        return params

    def _row(self, base: dict, setting: Setting, params, **values) -> dict[str, Any]:
        return empty_row(**base, method=setting.method, setting=setting.key, task=self.tasks[setting.method],
                         params=json.dumps(params.model_dump(mode="json") if params is not None else setting.values,
                                           sort_keys=True), **values)

    def _traced(self, sample: Sample, item: dict, settings: list[Setting], base: dict):
        """Each setting's parameters and one trace of the image covering them all: ``(error rows,
        settings, their parameters, (backend, trace) or None when nothing can run)``."""
        rows, ok, params = [], [], []
        for s in settings:
            try:
                params.append(self._params(s, item))
                ok.append(s)
            except ValueError as exc:
                rows.append(self._row(base, s, None, error=_first_line(exc)))
        if not ok:
            return rows, ok, params, None
        try:
            traced = run_sync(self.engine.prepare_job(self.backend.info.spec, sample.image, [s.method for s in ok],
                                                      params, Target()))
        except (ValueError, RuntimeError) as exc:
            return rows + [self._row(base, s, p, error=_first_line(exc)) for s, p in zip(ok, params)], ok, params, None
        return rows, ok, params, traced

    # -- maps -------------------------------------------------------------------------------------
    def _maps(self, sample: Sample, item: dict, settings: list[Setting], base: dict) -> list[dict]:
        from explorer.plugin_host.faithfulness import deletion_insertion_job

        rows, ok, params, traced = self._traced(sample, item, settings, base)
        if traced is None:
            return rows
        backend, trace = traced
        size = sample.image.size
        steps = self.spec.run.deletion_steps
        deletion = self.spec.wants("deletion_auc")
        targets = sample.targets or [None]
        random_auc: dict[int, float] = {}
        instance = None
        for s, p in zip(ok, params):
            labels_mode = getattr(p, "output", None) == "labels"
            # a softmax map is the target's probability against the other categories (over one prompt
            # it would be 1 everywhere): every category is a prompt, the target's is the one shown
            softmax = getattr(p, "mode", None) == "softmax" and "prompt_index" in type(p).model_fields
            if labels_mode:
                runs = [(None, self.categories, p)]
            elif softmax:
                runs = [(t, tuple(self.categories), p.model_copy(update={"prompt_index": list(self.categories).index(t.name)}))
                        if t is not None and t.name in self.categories else (t, (), p) for t in targets]
            else:
                runs = [(t, (t.name,) if t is not None else (), p) for t in targets]
            for k, (target, prompts, pr) in enumerate(runs):
                info = self.engine.host.method(s.method)
                if info.requires("text") and not prompts:
                    rows.append(self._row(base, s, p, target=target.name if target else "",
                                          error="this method needs a text prompt (dataset.prompts)"))
                    continue
                text = self.engine.text_encoding(backend, tuple(prompts))
                t = trace.with_text(text) if text is not None else trace
                try:
                    result, seconds = run_sync(self.engine.timed_method_job(s.method, t, pr, Target(prompts=tuple(prompts)),
                                                                            backend=backend))
                except (ValueError, RuntimeError) as exc:
                    rows.append(self._row(base, s, p, target=target.name if target else "", error=_first_line(exc)))
                    continue
                values: dict[str, Any] = {"seconds": seconds, "target": target.name if target else ""}
                if isinstance(result, LabelMap):
                    if instance is None:
                        instance = self._category_map(sample, size)
                    values.update(self._label_scores(result, instance, size))
                elif isinstance(result, Heatmap) and target is not None:
                    if target.mask is not None:
                        raster = result.to_image(size)
                        if self.spec.wants("pointing_game"):
                            values["pointing_game"] = float(pointing_game(raster, target.mask))
                        if self.spec.wants("mass_inside"):
                            values["mass_inside"] = mass_inside(raster, target.mask)
                    if deletion and result.token_values is not None and text is not None:
                        values["deletion_auc"] = run_sync(deletion_insertion_job(
                            backend, sample.image, result.token_values, text.embeddings[0], steps=steps, n_random=0,
                            insertion=False)).metrics.values["deletion_auc"]
                        if k not in random_auc:  # one random order per item and target, shared by every method
                            order = np.random.default_rng([self.spec.dataset.seed, int(item["index"]), k]).random(
                                trace.layout.n_image_tokens)
                            random_auc[k] = run_sync(deletion_insertion_job(
                                backend, sample.image, order, text.embeddings[0], steps=steps, n_random=0,
                                insertion=False)).metrics.values["deletion_auc"]
                        values["random_deletion_auc"] = random_auc[k]
                rows.append(self._row(base, s, p, **values))
        return rows

    def _category_map(self, sample: Sample, size: tuple[int, int]) -> np.ndarray:
        """``(H, W)`` index into :attr:`categories` of every pixel's object (-1: background)."""
        out = np.full(size, -1, dtype=np.int64)
        for t in sample.targets:
            if t.mask is not None and t.name in self.categories:
                out[t.mask] = self.categories.index(t.name)
        return out

    def _label_scores(self, result: LabelMap, truth: np.ndarray, size: tuple[int, int]) -> dict[str, float]:
        """mIoU over the categories present in the truth or the prediction, and pixel accuracy
        over the pixels the model saw (label maps drawn with their token cells)."""
        if result.per_pixel:
            from explorer.core.render import resize_nearest

            pred = resize_nearest(np.asarray(result.labels), size).astype(np.float64)
        else:
            pred = result.layout.to_image(np.asarray(result.labels, dtype=np.float64), size, mode="nearest")
        seen = np.isfinite(pred)
        pred = np.where(seen, pred, -1).astype(np.int64)
        names = list(result.class_names)
        # the map's classes are its prompts: put them on the dataset's category numbers
        lookup = np.array([self.categories.index(n) if n in self.categories else -1 for n in names] + [-1])
        pred = np.where(pred >= 0, lookup[np.clip(pred, 0, len(names))], -1)
        classes = sorted(set(np.unique(truth[seen])) | set(np.unique(pred[seen])) - {-1})
        ious = []
        for c in classes:
            if c < 0:
                continue
            inter = np.sum((pred == c) & (truth == c) & seen)
            union = np.sum(((pred == c) | (truth == c)) & seen)
            if union:
                ious.append(inter / union)
        return {"miou": float(np.mean(ious)) if ious else float("nan"),
                "pixel_accuracy": float(np.mean(pred[seen] == truth[seen])) if seen.any() else float("nan")}

    # -- CLIP token reduction ------------------------------------------------------------------------
    def _reduction(self, sample: Sample, item: dict, settings: list[Setting], base: dict) -> list[dict]:
        from explorer.plugin_host.reduction import label_set, reduction_metrics

        rows, ok, params, traced = self._traced(sample, item, settings, base)
        if traced is None:
            return rows
        backend, trace = traced
        try:
            if self._labels is None:
                self._label_texts, self._labels = label_set(backend, self.spec.run.labels)
        except (ValueError, RuntimeError) as exc:
            return rows + [self._row(base, s, p, error=_first_line(exc)) for s, p in zip(ok, params)]
        on_object = None
        masks = [t.mask for t in sample.targets if t.mask is not None]
        if masks and self.spec.wants("object_share"):
            instance = np.zeros(sample.image.size, dtype=np.int16)
            for k, m in enumerate(masks, start=1):
                instance[m] = k
            on_object = object_tokens(trace.layout, instance)
        for s, p in zip(ok, params):
            try:
                sel, elapsed = run_sync(self.engine.timed_method_job(s.method, trace, p, Target(), backend=backend))
                warm = None
                if self.spec.wants("speedup"):  # a second, warm run, timed as the unreduced reference is
                    warm = self.engine.host.load(s.method).executed(backend, trace, p).seconds
                m = reduction_metrics(trace, sel, self._labels, seconds=warm).values
            except (ValueError, RuntimeError) as exc:
                rows.append(self._row(base, s, p, error=_first_line(exc)))
                continue
            values = {k: float(m[k]) for k in ("kept", "cosine", "top1_agree", "kl", "macs_ratio") if self.spec.wants(k)}
            values["seconds"] = float(m["seconds"])
            if "speedup" in m and self.spec.wants("speedup"):
                values.update(speedup=float(m["speedup"]), ideal_speedup=float(m["ideal_speedup"]))
            if on_object is not None:
                values["object_chance"] = float(on_object.mean())
                if sel.groups is None:  # a kept set: the share of kept tokens on objects
                    if sel.kept.any():
                        values["object_share"] = float(on_object[sel.kept].mean())
                        values["object_share_groups"] = 0.0
                else:  # merging: the share of merged tokens that are pure (only object or only background)
                    groups = np.unique(sel.groups[sel.groups >= 0])
                    values["object_share"] = float(np.mean([len(set(on_object[sel.groups == g])) == 1 for g in groups]))
                    values["object_share_groups"] = 1.0
            rows.append(self._row(base, s, p, **values))
        return rows

    # -- VLM pruning ------------------------------------------------------------------------------------
    def _vlm(self, sample: Sample, item: dict, settings: list[Setting], base: dict) -> list[dict]:
        from explorer.plugin_host.vlm import generate_trace_job

        question = sample.question or self.spec.dataset.question
        rows = []
        try:
            trace = run_sync(generate_trace_job(self.backend, sample.image, question, self.spec.run.max_new_tokens,
                                                attention=False))
        except (ValueError, RuntimeError) as exc:
            return [self._row(base, s, None, error=_first_line(exc)) for s in settings]
        full = trace.extras["generation"].text
        for s in settings:
            try:
                p = self._params(s, item)
                start = time.perf_counter()
                sel = run_sync(self.engine.method_job(s.method, trace, p, Target(prompts=(question,)),
                                                      backend=self.backend))
                seconds = time.perf_counter() - start
            except (ValueError, RuntimeError) as exc:
                rows.append(self._row(base, s, None, error=_first_line(exc)))
                continue
            meta = sel.meta
            values = {"answer": str(meta["answer"]), "answer_full": full, "seconds": seconds, "target": question}
            if self.spec.wants("vqa_correct"):
                values["vqa_correct"] = vqa_correct(meta["answer"], sample)
                values["vqa_correct_full"] = vqa_correct(full, sample)
            if self.spec.wants("same_answer"):
                values["same_answer"] = float(meta["answer"] == full)
            if self.spec.wants("image_tokens_kept"):
                values["image_tokens_kept"] = float(meta["image_tokens_kept"])
                values["image_tokens"] = float(meta["image_tokens"])  # the prompt's, before any reduction
            if self.spec.wants("prefill_ratio"):
                values["prefill_ratio"] = float(meta["prefill_ratio"])
            if self.spec.wants("logprob_drop"):
                values["logprob_drop"] = float(meta["logprob_full_answer"] - meta["logprob_full_answer_pruned"])
            rows.append(self._row(base, s, p, **values))
        return rows
