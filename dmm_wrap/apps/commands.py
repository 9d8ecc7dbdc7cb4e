"""What each `dmm-wrap` subcommand does (fit, eval, audit, sweep, push); `dmm_wrap.apps.cli` parses the command line
and calls them. Each takes the parsed arguments and returns the exit status."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, MissingFileError
from ..io.hub import resolve_pretrained
from ..io.serialization import CONFIG_NAME, WEIGHTS_NAME, file_sha256, read_config, write_text_atomically
from ..model import DebiasedEncoder
from ..train import distributed
from ..train.loop import FitHistory
from .build import RunData, build_data, build_model, cpu_threads
from .evaluate import Metrics, compare_all, extract_features
from .leakage import audit
from .report import (format_table, format_targets, format_transfer, plot_training_curves, plot_transfer, plot_tsne,
                     write_report)
from .run_config import OPTION_KEYS, RunConfig, load_run_config, parse_override, write_run_config
from .sweep import Sweep, SweepRun, parse_sweep, run_folders
from .targets import check_targets

TOKEN_HELP = ("Set HF_TOKEN in the environment, log in once with `hf auth login` (the token is then read from the "
              "stored login), or pipe it in: `dmm-wrap push DIR REPO_ID --token-stdin < token-file`.")
"""How to hand `dmm-wrap push` a Hub token; never as a command-line value, which `ps` and shell history show."""


# --------------------------------------------------------------------------- shared steps
def _importable(module: str) -> bool:
    """Whether the optional package `module` is installed (it comes with one of the extras)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _warn(message: str) -> None:
    print(f"dmm-wrap: warning: {message}", file=sys.stderr)


def evaluate_run(cfg: RunConfig, model: DebiasedEncoder, data: RunData, out: Path, start: float,
                 history: FitHistory | None, weights: Path | None = None) -> Metrics:
    """Evaluate `model`, draw the figures, write metrics.json, report.md and config.yaml, print the table.
    `weights`: the model.safetensors `model` was saved to or loaded from, whose sha256 metrics.json records."""
    ecfg = cfg.eval
    cap = ecfg.sample_cap(cfg.fit.max_steps)
    train = extract_features(model, data.train_eval, cap)
    test = extract_features(model, data.test, cap)
    probe = None if data.probe is None else extract_features(model, data.probe, cap)
    skipped = []
    if ecfg.leace and not _importable("concept_erasure"):
        _warn("LEACE skipped: it needs concept-erasure, pip install 'dmm-wrap[eval]' (or set eval.leace: false).")
        skipped.append("LEACE was skipped: concept-erasure is not installed (pip install 'dmm-wrap[eval]').")
        ecfg = dataclasses.replace(ecfg, leace=False)
    methods, transfer = compare_all(train, test, data.attributes, ecfg, probe)
    figures = [name for name, wanted in (("tsne.png", ecfg.tsne_samples > 0),
                                         ("training_curves.png", history is not None and bool(history.step)),
                                         ("transfer.png", bool(transfer))) if wanted]
    if figures and not _importable("matplotlib"):
        _warn(f"figures skipped ({', '.join(figures)}): they need matplotlib, pip install 'dmm-wrap[report]'.")
        skipped.append(f"Figures skipped ({', '.join(figures)}): matplotlib is not installed "
                       "(pip install 'dmm-wrap[report]').")
        figures = []
    if "tsne.png" in figures:
        plot_tsne(test, data.attributes, out / "tsne.png", ecfg.tsne_samples, ecfg.seed, data.label_name)
    if "training_curves.png" in figures:
        assert history is not None
        plot_training_curves(history, out / "training_curves.png")
    metrics = Metrics(methods, time.perf_counter() - start, file_sha256(weights) if weights is not None else None,
                      transfer, "train" if probe is None else "probe")
    if "transfer.png" in figures:
        plot_transfer(metrics, out / "transfer.png")
    targets = check_targets(metrics)
    notes = [f"Evaluated on {len(train.raw)} train and {len(test.raw)} test samples"
             + (" (smoke run: eval.smoke_samples cap)." if cap is not None and cap != ecfg.max_samples else ".")]
    if probe is None:
        notes.append("The leakage probes were trained on the training samples h_theta was fitted on (in-sample), "
                     "which can understate the leakage: set data.num_probe (generated digits), data.probe_csv or "
                     "data.probe_split to train them on samples nothing was fitted on.")
    else:
        notes.append(f"The leakage probes were trained on {len(probe.raw)} held-out probe samples that neither fit "
                     "nor model selection saw; the task classifier and LEACE on the train samples.")
    notes += skipped
    if history is None and model.head_config.align_head_pieces is not None:
        head = model.head_config
        notes.append(f"h_theta is the alignment head (`fit_alignment_head`): {head.align_head_pieces} pieces per "
                     f"group of {head.align_head_groups or [a.num_classes for a in data.attributes]} groups, each "
                     "group predicted from Z; no training loop"
                     + ("; a row beyond its piece's outlier radius keeps its features."
                        if any(torch.isfinite(st.radius).any() for st in model.heads.h.alignment.stages)
                        else "; every row is mapped."))
    if history is not None:
        notes.append(f"Trained for {history.steps_done} steps (lam={cfg.fit.lam}, lr={cfg.fit.lr}, "
                     f"estimator_steps={cfg.fit.estimator_steps})"
                     + (f"; h_theta is the moving average of its weights (ema_decay={cfg.fit.ema_decay})."
                        if cfg.fit.ema_decay is not None else "."))
        if history.selected_step is not None:
            checks = ", ".join(f"{step}: {leak:.3f}" for step, leak in zip(history.select_step, history.select_leak))
            notes.append(f"Model selection kept h_theta from step {history.selected_step}: a fresh probe on the "
                         f"validation sample read the attributes least there (leakage above chance by step: "
                         f"{checks}).")
    metrics.write(out / "metrics.json")
    write_report(out / "report.md", metrics, targets, figures, title=f"dmm_wrap run: {out.name}", notes=notes)
    write_run_config(cfg, out / "config.yaml")
    print(format_table(metrics))
    print()
    if metrics.transfer:
        print(format_transfer(metrics))
        print()
    print(format_targets(targets).replace("**", ""))
    print(f"\nWall time {metrics.wall_seconds:.1f} s. Outputs in {out}/")
    return metrics


def config_overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The config overrides of the dedicated options (in OPTION_KEYS) followed by each --set."""
    pairs = [(key, getattr(args, dest)) for dest, key in OPTION_KEYS.items()
             if getattr(args, dest, None) is not None]
    return pairs + [parse_override(text) for text in args.set]


def fit_and_evaluate(cfg: RunConfig, start: float) -> Metrics | None:
    """The run of `dmm-wrap fit`: train, then on rank 0 save the model, evaluate, and write the report into
    cfg.output_dir. Returns the metrics on rank 0, None on the other ranks of a torchrun job."""
    out = Path(cfg.output_dir)
    device = distributed.init_from_env(cfg.fit.device)
    main_process = distributed.is_main_process()
    fit_cfg = dataclasses.replace(cfg.fit, device=device, progress=cfg.fit.progress and main_process,
                                  checkpoint_dir=cfg.fit.checkpoint_dir or str(out / "checkpoints"))
    metrics = None
    try:
        with cpu_threads(cfg.num_threads):
            data = build_data(cfg, distributed.rank(), distributed.world_size())
            if cfg.seed is not None:
                torch.manual_seed(cfg.seed)
            model = build_model(cfg, data.attributes)
            model.vocabulary = data.vocabulary  # saved with the model: eval reads its data with the same ids
            history = _fit_model(cfg, model, data, fit_cfg)
            # Every rank has finished training: leave the group together now, so that no rank waits (and times
            # out) in a collective while rank 0 evaluates, which needs no communication.
            distributed.shutdown(sync=True)
            if main_process:
                out.mkdir(parents=True, exist_ok=True)
                folder = model.save_pretrained(out / "model")
                if history is not None:
                    write_text_atomically(out / "history.json", json.dumps(history.as_dict()) + "\n")
                metrics = evaluate_run(cfg, model, data, out, start, history, folder / WEIGHTS_NAME)
    finally:
        distributed.shutdown(sync=False)  # after an error (another rank may never arrive); no-op otherwise
    return metrics


def _fit_model(cfg: RunConfig, model: DebiasedEncoder, data: RunData, fit_cfg: Any) -> FitHistory | None:
    """Train DeepMinMax (its history), or fit the alignment head in one pass (no history), as cfg.method says."""
    if cfg.method == "deepminmax":
        return model.fit(data.train, config=fit_cfg, val_loader=data.val)
    if distributed.world_size() > 1:
        raise ConfigError("method: alignment_head is fitted in one process (one pass over the loader); run it "
                          "without torchrun.")
    if fit_cfg.device is not None:
        model.to(fit_cfg.device)
    a, loader, samples = cfg.alignment_head, data.train, cfg.alignment_head.samples
    if cfg.fit.max_steps is not None:  # a smoke run: read at most max_steps batches, as training would
        loader = itertools.islice(data.train, cfg.fit.max_steps)
        samples = min(samples, cfg.fit.max_steps * cfg.data.batch_size)
    model.fit_alignment_head(loader, clusters=a.clusters, samples=samples, maps=a.maps, seed=cfg.seed or 0,
                             stream=a.stream, shrinkage=a.shrinkage, joint=a.joint, bins=a.bins,
                             outliers=a.outliers, target=a.target)
    return None


def _model_folder(name: str) -> Path:
    """The local folder of the model the user named (a folder or a Hub repo id); a missing one is a user error."""
    try:
        return resolve_pretrained(name)
    except FileNotFoundError as err:
        raise MissingFileError(str(err)) from err


def _saved_model_and_data(cfg: RunConfig, folder: Path) -> tuple[DebiasedEncoder, RunData]:
    """The model saved in `folder` (moved to fit.device when set) and the config's data, read with the vocabulary
    the model records; the two must name the same attributes."""
    model = DebiasedEncoder.from_pretrained(folder)
    if cfg.fit.device is not None:
        model.to(cfg.fit.device)
    data = build_data(cfg, vocabulary=model.vocabulary, with_val=False)  # selection is fit's alone
    if [a.name for a in model.attributes] != [a.name for a in data.attributes]:
        raise ConfigError(f"The model removes {[a.name for a in model.attributes]} but the config's data has "
                          f"{[a.name for a in data.attributes]}; use the config it was trained with.")
    return model, data


# --------------------------------------------------------------------------- commands
def run_fit(args: argparse.Namespace) -> int:
    """Train, then (on rank 0 only) save, evaluate and report. Under torchrun every rank trains on its shard."""
    start = time.perf_counter()
    fit_and_evaluate(load_run_config(args.config, config_overrides(args)), start)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate a saved model on the config's data and write the run's report into its output_dir."""
    start = time.perf_counter()
    cfg = load_run_config(args.config, config_overrides(args))
    out = Path(cfg.output_dir)
    with cpu_threads(cfg.num_threads):
        folder = _model_folder(args.model_dir)
        model, data = _saved_model_and_data(cfg, folder)
        out.mkdir(parents=True, exist_ok=True)
        evaluate_run(cfg, model, data, out, start, None, folder / WEIGHTS_NAME)
    return 0


def run_audit(args: argparse.Namespace) -> int:
    """Audit a saved model's raw and debiased features on the config's data: probes fitted on the probe split (the
    training data when none is configured), scored on the test data; write audit.json and audit.md and print the
    table."""
    start = time.perf_counter()
    overrides = config_overrides(args)
    cfg = load_run_config(args.config, overrides)
    folder = _model_folder(args.model)
    # A local model folder keeps its audit (its card then shows it); a Hub model's cached snapshot is not ours.
    into_model = Path(args.model).is_dir() and not any(key == "output_dir" for key, _ in overrides)
    out = folder if into_model else Path(cfg.output_dir)
    with cpu_threads(cfg.num_threads):
        model, data = _saved_model_and_data(cfg, folder)
        fit_on = data.probe if data.probe is not None else data.train_eval
        report = audit(model, fit_on, test_loader=data.test, config=cfg.audit, probes=cfg.eval)
        source = {"source": str(args.model), "weights_sha256": read_config(folder / CONFIG_NAME).get("weights_sha256")}
        report = dataclasses.replace(report, model=source, wall_seconds=time.perf_counter() - start)
        report.write(out)
    print(report.format_table())
    print()
    for name, verdict in report.verdicts().items():
        print(f"{name}: {verdict}")
    print(f"\nWall time {report.wall_seconds:.1f} s. audit.json and audit.md in {out}/")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    """Run `fit` (training, evaluation, report) once per value of one key, then write sweep.json and sweep.png."""
    start = time.perf_counter()
    if distributed.launched_by_torchrun():
        raise ConfigError("dmm-wrap sweep runs its fits one after the other in one process; under torchrun, launch "
                          "one `dmm-wrap fit --set KEY=VALUE` job per value instead.")
    spec = parse_sweep(args.sweep)
    overrides = config_overrides(args)
    if any(key == spec.key for key, _ in overrides):
        raise ConfigError(f"{spec.key}: both swept and set by an option; drop one of them.")
    out = Path(load_run_config(args.config, overrides).output_dir)
    folders = run_folders(spec)
    # Every run's config is checked before the first one starts: a bad value fails now, not after hours.
    configs = [load_run_config(args.config, [*overrides, (spec.key, value), ("output_dir", str(out / folder))])
               for value, folder in zip(spec.values, folders)]
    if configs[0].method == "alignment_head" and spec.key.startswith("fit.") and spec.key != "fit.device":
        raise ConfigError(f"{spec.key}: this config fits the alignment head (method: alignment_head), which reads no "
                          f"training option of fit; add --set method=deepminmax to sweep DeepMinMax's {spec.key}.")
    if configs[0].data.kind in ("image_csv", "hf_dataset") and configs[0].data.label_column is None:
        raise ConfigError("data.label_column: the sweep's figure puts task accuracy on x, which needs task labels.")
    sweep = Sweep(spec.key, spec.values)
    for i, (value, cfg) in enumerate(zip(spec.values, configs)):
        print(f"== sweep {i + 1}/{len(configs)}: {spec.key}={value!r} -> {cfg.output_dir}", flush=True)
        metrics = fit_and_evaluate(cfg, time.perf_counter())
        assert metrics is not None  # one process: it is rank 0
        sweep.runs.append(SweepRun(value, cfg.output_dir, metrics))
        sweep.wall_seconds = time.perf_counter() - start
        sweep.write(out)  # after every run, so that an interrupted sweep keeps the runs it finished
        print()
    print(f"Sweep of {spec.key}: task accuracy and MLP-probe leakage of DeepMinMax Z~ (raw Z and LEACE: first run)")
    print(sweep.format_table())
    print(f"\nWall time {sweep.wall_seconds:.1f} s. sweep.json and sweep.png in {out}/")
    return 0


def _push_token(args: argparse.Namespace) -> str | None:
    """The Hub token: one line of stdin with --token-stdin, else None (huggingface_hub then reads HF_TOKEN or the
    stored login). A value given with --token is refused without being echoed."""
    if args.token is not None:
        raise ConfigError(f"--token is not accepted: a token on the command line shows in `ps` and in the shell "
                          f"history. {TOKEN_HELP}")
    if not args.token_stdin:
        return None
    token = sys.stdin.readline().strip()
    if not token:
        raise ConfigError(f"--token-stdin read an empty line from stdin. {TOKEN_HELP}")
    return token


def run_push(args: argparse.Namespace) -> int:
    """Push a run's model folder (and its metrics) to the Hub; the token is never written anywhere."""
    from ..io.hub import push_folder_to_hub
    from ..io.serialization import read_metrics

    token = _push_token(args)
    run_dir = Path(args.output_dir)
    if not run_dir.is_dir():
        raise MissingFileError(f"{str(run_dir)!r} is not a folder: pass a run folder of `dmm-wrap fit` or a folder "
                               "written by save_pretrained.")
    folder = run_dir / "model" if (run_dir / "model").is_dir() else run_dir
    metrics_file = run_dir / "metrics.json"
    metrics = read_metrics(metrics_file) if metrics_file.is_file() else None
    info = push_folder_to_hub(folder, args.repo_id, private=args.private, token=token, revision=args.revision,
                              commit_message=args.commit_message, create_pr=args.create_pr, metrics=metrics)
    print(f"pushed {folder} to {getattr(info, 'commit_url', None) or args.repo_id}")
    return 0


__all__ = ["TOKEN_HELP", "config_overrides", "evaluate_run", "fit_and_evaluate", "run_fit", "run_eval", "run_audit",
           "run_sweep", "run_push"]
