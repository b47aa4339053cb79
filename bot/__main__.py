"""``python -m bot``: run the Telegram bot, or use the model store from the command line.

Subcommands:

* ``run``: start the bot (long polling or webhook, from the config).
* ``retrain``: retrain.py successor: import ``--image_dir`` (one folder per label) into the store,
  retrain the final layer, promote the new version if it passes the gate.
* ``classify IMAGE...``: label_image.py successor: top-k labels for each image.
* ``status``: the serving version, its accuracy, images per label.
* ``rollback``: serve the previous version again.

Flag names follow retrain.py / label_image.py (``--image_dir``, ``--how_many_training_steps``,
``--learning_rate``, ``--testing_percentage``, ``--validation_percentage``, ``--train_batch_size``,
``--bottleneck_dir``, ``--output_labels``, ``--output_graph``, ``--summaries_dir``,
``--architecture``, ``--flip_left_right``, ``--print_misclassified_test_images``, ``--top_k``).
The training flags are named after their setting (a ``TrainConfig`` field, ``--backbone``,
``--backbone_weights``), which is also the config file's ``[training]`` key; retrain.py's
``--architecture`` and ``--weights`` are aliases of the last two.

Why this module is long: it is the command line of five subcommands (their flags, and turning each
library result into the lines, JSON and exit codes a script reads); each ``cmd_*`` function is
short and uses only the library's public API, and one file keeps the flags next to their help.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot import quiet_start

if TYPE_CHECKING:
    from bot.config import TrainingConfig
    from model_store.training import TrainConfig

# TensorFlow's C++ start-up chatter is noise for an operator: TF_CPP_MIN_LOG_LEVEL hides what TensorFlow
# logs once it runs (INFO and WARNING); bot.quiet_start the lines its libraries print while loading.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
quiet_start.install()


def _store_dir(args: argparse.Namespace) -> Path:
    """--store_dir, else the config's store_dir (--config / LABELGRAM_CONFIG), else ./store."""
    if getattr(args, "store_dir", None):
        return Path(args.store_dir)
    config_path = getattr(args, "config", None) or os.environ.get("LABELGRAM_CONFIG")
    if config_path or any(k.startswith("LABELGRAM_") for k in os.environ):
        from bot.config import load_config

        return Path(load_config(config_path).store_dir)
    return Path("store")


def _add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store_dir",
        help="store folder (images, bottlenecks, models); default: config's store_dir or ./store",
    )
    p.add_argument("--config", help="config.toml (default: $LABELGRAM_CONFIG)")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        choices=("litert", "tensorflow"),
        default=None,
        help="how the frozen model runs: litert (LiteRT/XNNPACK, default; falls back to tensorflow "
        "for a model it cannot convert) or tensorflow (config: engine.engine)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for LiteRT; 0 = all cores (config: engine.threads)"
    )


def _engine_settings(args: argparse.Namespace):
    """EngineSettings from --engine / --threads, else the config's [engine] section, else the defaults."""
    from model_store.engine import EngineSettings

    engine, threads = args.engine, args.threads
    config_path = getattr(args, "config", None) or os.environ.get("LABELGRAM_CONFIG")
    if (engine is None or threads is None) and (config_path or any(k.startswith("LABELGRAM_") for k in os.environ)):
        from bot.config import load_config

        section = load_config(config_path).engine
        engine = section.engine if engine is None else engine
        threads = section.threads if threads is None else threads
    if threads is not None and threads < 0:
        from model_store.errors import LabelgramError

        raise LabelgramError("--threads must be 0 (all cores) or more.")
    return EngineSettings(engine or "litert", threads or 0)


def _add_training_args(p: argparse.ArgumentParser) -> None:
    """The retrain flags. Each is named after its setting: a ``TrainConfig`` field, ``backbone`` or
    ``backbone_weights`` (also the ``[training]`` keys of the config file); retrain.py's
    ``--architecture`` and ``--weights`` are aliases. A flag not given is absent from the parsed
    arguments (no defaults here: they come from the config file or ``TrainConfig``)."""
    group = p.add_argument_group("training settings (default: the config's [training] section, else TrainConfig's)")
    group.add_argument(
        "--backbone",
        "--architecture",
        dest="backbone",
        default=argparse.SUPPRESS,
        help="backbone: efficientnet_lite1 (default, shipped), efficientnet_lite0 (shipped, faster), "
        "mobilenet_v2, mobilenet_v3_small, "
        "mobilenet_v3_large, efficientnet_b0, inception_v3, xception, mobilenet_<alpha>_<size>, "
        "or a path to a .keras / SavedModel feature extractor",
    )
    group.add_argument(
        "--backbone_weights",
        "--weights",
        dest="backbone_weights",
        default=argparse.SUPPRESS,
        help="weights for a keras.applications backbone: imagenet (downloaded once) or a local file",
    )
    flags: list[tuple[str, dict]] = [
        ("how_many_training_steps", {"type": int, "help": "gradient steps (overrides --epochs)"}),
        ("epochs", {"type": int, "help": "maximum epochs (early stopping on validation loss)"}),
        ("learning_rate", {"type": float}),
        ("testing_percentage", {"type": float}),
        ("validation_percentage", {"type": float}),
        ("train_batch_size", {"type": int}),
        ("min_images_per_label", {"type": int}),
        ("hidden_units", {"type": int, "help": "0 for a single softmax layer as in retrain.py"}),
        (
            "flip_left_right",
            {
                "action": argparse.BooleanOptionalAction,
                "help": "also train on mirrored images (cached bottlenecks); off by default",
            },
        ),
        ("accuracy_floor", {"type": float}),
        ("max_accuracy_drop", {"type": float}),
        ("keep_versions", {"type": int}),
        ("summaries_dir", {"help": "TensorBoard summaries folder"}),
        ("export_savedmodel", {"action": "store_true", "help": "also write a SavedModel for TensorFlow Serving"}),
        ("export_tflite", {"action": "store_true", "help": "also write model.tflite"}),
        ("print_misclassified_test_images", {"action": "store_true"}),
    ]
    for name, kwargs in flags:
        group.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="start the Telegram bot")
    p.add_argument("--config", help="config.toml (default: $LABELGRAM_CONFIG or ./config.toml if present)")

    p = sub.add_parser("retrain", help="retrain the final layer (retrain.py successor)")
    _add_store_args(p)
    p.add_argument("--image_dir", help="folder of labelled subfolders to import first (retrain.py layout)")
    _add_training_args(p)
    p.add_argument(
        "--bottleneck_dir", default=None, help="bottleneck cache folder (default: <store_dir>/bottlenecks)"
    )
    p.add_argument("--output_labels", default=None, help="also copy labels.txt of the new version here")
    p.add_argument("--output_graph", default=None, help="also copy model.keras of the new version here")
    _add_engine_args(p)
    p.add_argument(
        "--json", action="store_true", help="JSON lines on stdout: progress events, then the result"
    )

    p = sub.add_parser("classify", help="top-k labels for images (label_image.py successor)")
    _add_store_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top_k", type=int, default=5)
    _add_engine_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object per image")

    p = sub.add_parser("status", help="serving model version, accuracy, images per label")
    _add_store_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("rollback", help="serve the previous model version again")
    _add_store_args(p)

    p = sub.add_parser("doctor", help="check config, token, store, disk, backbone, engine and model; say the fixes")
    p.add_argument("--config", help="config.toml (default: $LABELGRAM_CONFIG or ./config.toml if present)")
    p.add_argument("--json", action="store_true", help="one JSON object: ok, checks [{name, status, summary, fix}]")
    return parser


def _training_section(args: argparse.Namespace) -> TrainingConfig | None:
    """The config file's ``[training]`` section (``--config`` / ``$LABELGRAM_CONFIG``), or None without one."""
    config_path = getattr(args, "config", None) or os.environ.get("LABELGRAM_CONFIG")
    if not config_path:
        return None
    from bot.config import load_config

    return load_config(config_path).training


def _training_settings(args: argparse.Namespace) -> tuple[TrainConfig, str | None, str]:
    """``(TrainConfig, backbone, weights)`` of a retrain run: the flags given, else the config
    file's ``[training]`` settings, else the library's defaults (``TrainConfig()``, the default
    backbone (None), ``"imagenet"``). Each flag is named after its setting."""
    from dataclasses import fields, replace

    from model_store.training import TrainConfig

    section = _training_section(args)
    base = section.train_config() if section is not None else TrainConfig()
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    backbone = getattr(args, "backbone", section.backbone if section is not None else None)
    weights = getattr(args, "backbone_weights", section.backbone_weights if section is not None else "imagenet")
    return replace(base, **given), backbone, weights


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The run's ``TrainConfig`` (see :func:`_training_settings`)."""
    return _training_settings(args)[0]


def _backbone(args: argparse.Namespace) -> tuple[str | None, str]:
    """The run's ``(backbone, weights)`` for ``retrain()`` (see :func:`_training_settings`)."""
    _, backbone, weights = _training_settings(args)
    return backbone, weights


def cmd_retrain(args: argparse.Namespace) -> int:
    """``retrain``: import ``--image_dir`` (if given), retrain, print the report (or JSON lines).

    Returns:
        The exit code: 0 promoted or refused by the gate, 1 failed (``--json`` still ends with a
        ``{"event": "result", ...}`` line).
    """
    from model_store.contract import (
        Event,
        ImportEvent,
        ProgressEvent,
        ResultEvent,
        RetrainReport,
        SkippedFile,
        TrainingStatus,
    )
    from model_store.pipeline import DISK_FULL_MESSAGE, is_disk_full, retrain
    from model_store.workspace import Workspace

    ws = Workspace(_store_dir(args))
    if args.bottleneck_dir:
        ws.bottleneck_dir = Path(args.bottleneck_dir)

    def print_event(event: Event) -> None:
        print(event.to_line(), flush=True)

    emit = print_event if args.json else None
    if args.image_dir:
        imported = ws.store.import_tree(args.image_dir)
        if emit:
            emit(
                ImportEvent(
                    added=imported.added,
                    duplicates=imported.duplicates,
                    skipped=[SkippedFile(file=str(f), reason=r) for f, r in imported.skipped],
                )
            )
        else:
            print(
                f"Imported {args.image_dir}: {imported.added} added, {imported.duplicates} already present, "
                f"{len(imported.skipped)} skipped",
                file=sys.stderr,
            )
            for f, r in imported.skipped:
                print(f"  skipped {f}: {r}", file=sys.stderr)

    from bot.retrain_progress import progress_for

    # a live bar on a terminal, a few plain lines in a log (bot.retrain_progress); JSON events with --json
    shown = None if emit else progress_for(sys.stderr)
    last_emit = 0.0

    def progress(stage: str, done: int, total: int) -> None:
        nonlocal last_emit
        if emit:
            now = time.monotonic()
            if stage != "bottlenecks" or done in (0, total) or now - last_emit >= 0.5:
                last_emit = now
                emit(ProgressEvent(stage=stage, done=done, total=total))
            return
        if shown is not None:
            shown(stage, done, total)

    try:
        train_config, backbone, weights = _training_settings(args)
        report = retrain(
            ws,
            train_config,
            backbone=backbone,
            weights=weights,
            progress=progress,
            engine=_engine_settings(args),
        )
    except Exception as exc:
        if shown is not None:
            shown.close()
        # Unexpected: log the traceback on stderr, and still give a JSON reader its result line.
        # A full disk is no crash: say so (the operator's fix is to free space, not to read code).
        disk_full = is_disk_full(exc)
        if disk_full:
            logging.getLogger("bot.retrain").error("retrain stopped: the disk is full (%s)", exc)
        else:
            logging.getLogger("bot.retrain").exception("retrain crashed")
        if not emit:
            print(DISK_FULL_MESSAGE if disk_full else "The training crashed.", file=sys.stderr)
        else:
            message = DISK_FULL_MESSAGE if disk_full else "The training crashed; see the bot's log."
            emit(ResultEvent(report=RetrainReport(TrainingStatus.FAILED, message)))
        return 1
    if shown is not None:
        shown.close()
    if report.version and report.completed:
        vdir = ws.registry.root / report.version
        if args.output_labels:
            shutil.copyfile(vdir / "labels.txt", args.output_labels)
        if args.output_graph:
            shutil.copyfile(vdir / "model.keras", args.output_graph)
    if emit:
        emit(ResultEvent(report=report))
    else:
        print(report.message)
        m = report.metrics
        if m:
            print(
                f"test accuracy {m['accuracy']:.4f} on {m['test_images']} images; per label (precision / recall):"
            )
            for label, s in m["per_label"].items():
                print(f"  {label:20s} {s['precision']:.3f} / {s['recall']:.3f}  (n={s['support']})")
            print(f"backbone: {m['backbone']['name']}; engine: {(m.get('engine') or {}).get('serving')}")
            print(f"version folder: {ws.registry.root / (report.version or '')}")
    return 1 if report.status == TrainingStatus.FAILED else 0


def cmd_classify(args: argparse.Namespace) -> int:
    """``classify``: top-k labels of each image with the serving model.

    With ``--json`` each image's object also has ``"unknown"`` (true when the photo looks like none
    of the labels: its open-set score is above the version's calibrated threshold,
    ``model_store.openset``) and ``"unknown_score"`` (float); both are null for a version trained
    without open-set data.

    Returns:
        The exit code: 0 when every image was classified, 1 when there is no model or any image
        could not be read (its line says why).
    """
    from model_store.classifier import Classifier
    from model_store.errors import LabelgramError
    from model_store.images import decode_image
    from model_store.registry import ModelRegistry

    clf = Classifier(ModelRegistry(_store_dir(args) / "models"), engine=_engine_settings(args))
    failures = 0
    try:
        clf.reload_if_changed()
    except LabelgramError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    if clf.version is None:
        print("No trained model yet: run `python -m bot retrain --image_dir DIR` first.", file=sys.stderr)
        return 1
    for path in args.images:
        try:
            rgb = decode_image(Path(path).read_bytes())
            (labels,) = clf.classify([rgb], top_k=args.top_k)
        except (OSError, LabelgramError) as exc:
            failures += 1
            msg = exc.message if isinstance(exc, LabelgramError) else f"cannot read the file ({exc.strerror})"
            if args.json:
                print(json.dumps({"file": path, "error": msg}, ensure_ascii=False))
            else:
                print(f"{path}: error: {msg}")
            continue
        if args.json:
            print(
                json.dumps(
                    {
                        "file": path,
                        "version": clf.version,
                        "labels": [{"label": lab, "probability": round(p, 6)} for lab, p in labels],
                        "unknown": labels.unknown,
                        "unknown_score": None if labels.unknown_score is None else round(labels.unknown_score, 6),
                    },
                    ensure_ascii=False,
                )
            )
        else:
            print(path)
            for lab, p in labels:
                print(f"  {lab} ({p:.5f})")
            if labels.unknown:
                print(
                    f"  unknown: looks like none of these labels (score {labels.unknown_score:.4f} "
                    f"above the threshold {labels.threshold:.4f})"
                )
    return 1 if failures else 0


def cmd_status(args: argparse.Namespace) -> int:
    """``status``: serving version, its test accuracy, images per label, images added since. Returns 0."""
    from model_store.workspace import Workspace

    ws = Workspace(_store_dir(args))
    cur = ws.registry.current()
    info: dict[str, Any] = {
        "version": cur.name if cur else None,
        "accuracy": cur.metrics.get("accuracy") if cur else None,
        "backbone": (cur.metrics.get("backbone") or {}).get("name") if cur else None,
        "engine": (cur.metrics.get("engine") or {}).get("serving") if cur else None,
        "labels": {li.name: li.count for li in ws.store.labels()},
        "images_added_since_training": ws.store.count_added_since(cur.created_at)
        if cur
        else ws.store.image_count(),
    }
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
        return 0
    print(f"serving version: {info['version'] or 'none (not trained yet)'}")
    if info["accuracy"] is not None:
        print(f"test accuracy: {info['accuracy']:.4f}")
    if info["backbone"]:
        print(f"backbone: {info['backbone']}; engine when trained: {info['engine'] or 'TensorFlow'}")
    for label, n in info["labels"].items():
        print(f"  {label}: {n} images")
    print(f"images added since the last training: {info['images_added_since_training']}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """``rollback``: serve the previous version. Returns 0, or 1 when there is none to go back to or
    a training holds the store's training lock (it may be about to promote)."""
    from model_store.errors import NoModelError, TrainingError
    from model_store.pipeline import training_lock
    from model_store.workspace import Workspace

    ws = Workspace(_store_dir(args))
    try:
        # CURRENT is rewritten only under the store's training lock (a running retrain holds it)
        with training_lock(ws):
            v = ws.registry.rollback()
    except (NoModelError, TrainingError) as exc:
        print(exc.message, file=sys.stderr)
        return 1
    print(f"now serving {v.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bot`` / the ``labelgram`` script. Returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        from bot.app import run

        return run(args.config)
    if args.command == "doctor":
        from bot.doctor import main as doctor

        return doctor(args.config, as_json=args.json)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handler = {
        "retrain": cmd_retrain,
        "classify": cmd_classify,
        "status": cmd_status,
        "rollback": cmd_rollback,
    }
    from model_store.errors import LabelgramError

    try:
        return handler[args.command](args)
    except LabelgramError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
