"""`dmm-wrap`: fit and evaluate DeepMinMax from a YAML run file.

    dmm-wrap fit CONFIG [--output-dir DIR] [--max-steps N] [--resume | --overwrite] [--device D] [--set KEY=VALUE ...]
    torchrun --nproc-per-node N -m dmm_wrap fit CONFIG ...      (data-parallel; the same with --no-python dmm-wrap)
    dmm-wrap eval MODEL_DIR CONFIG [--output-dir DIR] [--device D] [--set KEY=VALUE ...]
    dmm-wrap audit MODEL CONFIG [--output-dir DIR] [--device D] [--set KEY=VALUE ...]
    dmm-wrap sweep CONFIG KEY=V1,V2,... [--output-dir DIR] [--max-steps N] [--device D] [--set KEY=VALUE ...]
    dmm-wrap push OUTPUT_DIR REPO_ID [--private] [--token-stdin] [--revision BRANCH] [--create-pr]

Every option is a config key (`--max-steps 5` is `--set fit.max_steps=5`; see `run_config.OPTION_KEYS`). A run
writes, under output_dir: metrics.json, report.md, tsne.png, training_curves.png, history.json, config.yaml (the
resolved config), model/ (save_pretrained) and checkpoints/ (SIGINT / SIGTERM write one and stop with status
128 + signal; `--resume` continues; a new run into a folder that holds checkpoints needs `--overwrite`). Text outputs
are written atomically, and metrics.json records the sha256 of the weights it evaluated. Under torchrun only rank 0
writes, evaluates and prints. `audit` writes audit.json and audit.md (into the model folder itself unless
--output-dir is given, so that its card shows the audit); `sweep` runs `fit` once per value, each in
OUTPUT_DIR/KEY=VALUE, and writes sweep.json and sweep.png. User errors (`ConfigError`: a bad config value, a
missing file, data that does not fit the config) print one line to stderr and exit with status 2 (set
DMM_WRAP_TRACEBACK=1 to see the traceback instead); any other error is a bug and shows its traceback (status 1).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.distributed import DistributedSampler

from . import distributed
from .backbones import create_backbone
from .checkpoint import TrainingInterrupted
from .config import Attribute, ConfigError, MissingFileError
from .evaluate import Metrics, check_targets, compare_methods, extract_features
from .hub import resolve_pretrained
from .inference import Preprocessing
from .leakage import audit
from .model import DebiasedEncoder
from .report import format_table, format_targets, plot_tsne, plot_training_curves, write_report
from .run_config import OPTION_KEYS, RunConfig, load_run_config, parse_override, write_run_config
from .serialization import CONFIG_NAME, WEIGHTS_NAME, file_sha256, read_config, write_text_atomically
from .sweep import Sweep, SweepRun, parse_sweep, run_folders
from .trainer import FitHistory

EXIT_ERROR = 2
"""Exit status of a run stopped by a user error (bad config, missing file), as argparse uses for bad arguments."""


class RunData(NamedTuple):
    """The loaders of one run and what they carry."""

    attributes: tuple[Attribute, ...]
    """Attributes in the column order of the batches."""
    train: DataLoader
    """Training batches (shuffled when the dataset is map-style)."""
    train_eval: DataLoader
    """The same training data in a fixed order, for fitting the evaluation probes."""
    test: DataLoader
    """Held-out batches the evaluation scores on."""
    label_name: str
    """What the task label is (for figure titles)."""
    vocabulary: dict[str, list[str]] | None = None
    """image_csv: the training split's string labels per column (`ImageCSVDataset.vocabulary`), which the held-out
    split was read with and the model records; None for data without text labels."""


# --------------------------------------------------------------------------- building blocks
def run_preprocessing(cfg: RunConfig) -> Preprocessing | None:
    """How images of an image_csv / camelyon17 run become tensors; saved with the model so that `model.preprocess`
    and `model.embed` see what training saw. Synthetic digits are generated as tensors: None."""
    d = cfg.data
    if d.kind == "synthetic_digits":
        return None
    size = cfg.input_size()
    return Preprocessing(input_size=(3, size, size), mean=tuple(d.mean), std=tuple(d.std), interpolation="bilinear",
                         crop_pct=1.0, crop_mode="squash")


def build_data(cfg: RunConfig, rank: int = 0, world_size: int = 1,
               vocabulary: dict[str, list[str]] | None = None) -> RunData:
    """Datasets and loaders described by `cfg.data` (imported lazily: only the chosen kind is loaded).

    With `world_size` > 1 the training loader reads this rank's shard (SyntheticDigits.shard, or a
    DistributedSampler seeded with data.seed); the evaluation loaders are never sharded. image_csv: the test CSV
    is read with the training CSV's vocabulary, or both with `vocabulary` (what a saved model recorded) when given.
    """
    words = None
    d = cfg.data
    size = cfg.input_size()
    if d.kind == "synthetic_digits":
        from .data import SyntheticDigits

        train = SyntheticDigits("train", d.num_train, image_size=size, num_sites=d.num_sites, seed=d.seed)
        test = SyntheticDigits("test", d.num_test, image_size=size, num_sites=d.num_sites, seed=d.seed)
        attributes = train.attributes
        label_name = "digit"
    elif d.kind == "image_csv":
        from .data import ImageCSVDataset

        transform = run_preprocessing(cfg).transform()
        options = dict(path_column=d.path_column, label_column=d.label_column, transform=transform)
        train = ImageCSVDataset(d.root, d.csv, d.attributes, vocabulary=vocabulary, **options)
        test = ImageCSVDataset(d.root, d.test_csv, d.attributes, vocabulary=train.vocabulary, **options)
        words = train.vocabulary
        attributes = tuple(d.attributes)
        label_name = d.label_column or "label"
    else:
        from .data import camelyon17

        transform = run_preprocessing(cfg).transform()
        train = camelyon17(d.root, split=d.train_split, transform=transform)
        test = camelyon17(d.root, split=d.test_split, transform=transform)
        attributes = train.attributes
        label_name = "tumor"

    # Page-locked batches let the host-to-GPU copies (non_blocking in the trainer) overlap with compute.
    pin = (cfg.fit.device or "").startswith("cuda") and torch.cuda.is_available()

    def loader(ds: Any, shuffle: bool) -> DataLoader:
        shuffle = shuffle and not isinstance(ds, IterableDataset)
        return DataLoader(ds, batch_size=d.batch_size, shuffle=shuffle, num_workers=d.num_workers, pin_memory=pin,
                          generator=torch.Generator().manual_seed(d.seed) if shuffle else None)

    def sharded(ds: Any) -> DataLoader:
        if world_size == 1:
            return loader(ds, True)
        if isinstance(ds, IterableDataset):
            return loader(ds.shard(world_size, rank), False)
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=d.seed)
        return DataLoader(ds, batch_size=d.batch_size, sampler=sampler, num_workers=d.num_workers, pin_memory=pin)

    return RunData(attributes, sharded(train), loader(train, False), loader(test, False), label_name, words)


def build_model(cfg: RunConfig, attributes: Sequence[Attribute]) -> DebiasedEncoder:
    """The DebiasedEncoder described by `cfg.model`, its feature width inferred by one dummy forward."""
    m = cfg.model
    if m.backbone == "digits":
        from .pretrained import DIGITS_ENCODER_LAYER, load_digits_encoder

        backbone = load_digits_encoder(m.weights)
        layer = m.layer if m.layer is not None else DIGITS_ENCODER_LAYER
    else:
        backbone = create_backbone(m.backbone, pretrained=m.pretrained)
        layer = m.layer
    size = cfg.input_size()
    preprocessing = run_preprocessing(cfg) if cfg.data.kind != "synthetic_digits" else "auto"
    return DebiasedEncoder(backbone, layer, attributes, pool=m.pool, input_size=(3, size, size),
                           preprocessing=preprocessing, **dataclasses.asdict(m.head))


def evaluate_run(cfg: RunConfig, model: DebiasedEncoder, data: RunData, out: Path, start: float,
                 history: FitHistory | None, weights: Path | None = None) -> Metrics:
    """Evaluate `model`, draw the figures, write metrics.json, report.md and config.yaml, print the table.
    `weights`: the model.safetensors `model` was saved to or loaded from, whose sha256 metrics.json records."""
    ecfg = cfg.eval
    cap = ecfg.sample_cap(cfg.fit.max_steps)
    train = extract_features(model, data.train_eval, cap)
    test = extract_features(model, data.test, cap)
    skipped = []
    if ecfg.leace and not _importable("concept_erasure"):
        _warn("LEACE skipped: it needs concept-erasure, pip install 'dmm-wrap[eval]' (or set eval.leace: false).")
        skipped.append("LEACE was skipped: concept-erasure is not installed (pip install 'dmm-wrap[eval]').")
        ecfg = dataclasses.replace(ecfg, leace=False)
    methods = compare_methods(train, test, data.attributes, ecfg)
    figures = [name for name, wanted in (("tsne.png", ecfg.tsne_samples > 0),
                                         ("training_curves.png", history is not None and bool(history.step))) if wanted]
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
    metrics = Metrics(methods, time.perf_counter() - start, file_sha256(weights) if weights is not None else None)
    targets = check_targets(metrics)
    notes = [f"Evaluated on {len(train.raw)} train and {len(test.raw)} test samples"
             + (" (smoke run: eval.smoke_samples cap)." if cap is not None and cap != ecfg.max_samples else ".")]
    notes += skipped
    if history is not None:
        notes.append(f"Trained for {history.steps_done} steps (lam={cfg.fit.lam}, lr={cfg.fit.lr}, "
                     f"estimator_steps={cfg.fit.estimator_steps}).")
    metrics.write(out / "metrics.json")
    write_report(out / "report.md", metrics, targets, figures, title=f"dmm_wrap run: {out.name}", notes=notes)
    write_run_config(cfg, out / "config.yaml")
    print(format_table(metrics))
    print()
    print(format_targets(targets).replace("**", ""))
    print(f"\nWall time {metrics.wall_seconds:.1f} s. Outputs in {out}/")
    return metrics


def _importable(module: str) -> bool:
    """Whether the optional package `module` is installed (it comes with one of the extras)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _warn(message: str) -> None:
    print(f"dmm-wrap: warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Limit torch and the OpenMP / BLAS thread pools to `n` threads inside the block (None: leave them)."""
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- commands
def _overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The config overrides of the dedicated options (in OPTION_KEYS) followed by each --set."""
    pairs = [(key, getattr(args, dest)) for dest, key in OPTION_KEYS.items()
             if getattr(args, dest, None) is not None]
    return pairs + [parse_override(text) for text in args.set]


def run_fit(args: argparse.Namespace) -> int:
    """Train, then (on rank 0 only) save, evaluate and report. Under torchrun every rank trains on its shard."""
    start = time.perf_counter()
    fit_and_evaluate(load_run_config(args.config, _overrides(args)), start)
    return 0


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
            history = model.fit(data.train, config=fit_cfg)
            # Every rank has finished training: leave the group together now, so that no rank waits (and times
            # out) in a collective while rank 0 evaluates, which needs no communication.
            distributed.shutdown(sync=True)
            if main_process:
                out.mkdir(parents=True, exist_ok=True)
                folder = model.save_pretrained(out / "model")
                write_text_atomically(out / "history.json", json.dumps(history.as_dict()) + "\n")
                metrics = evaluate_run(cfg, model, data, out, start, history, folder / WEIGHTS_NAME)
    finally:
        distributed.shutdown(sync=False)  # after an error (another rank may never arrive); no-op otherwise
    return metrics


def _check_attributes_match(model: DebiasedEncoder, data: RunData) -> None:
    if [a.name for a in model.attributes] != [a.name for a in data.attributes]:
        raise ConfigError(f"The model removes {[a.name for a in model.attributes]} but the config's data has "
                         f"{[a.name for a in data.attributes]}; use the config it was trained with.")


def _model_folder(name: str) -> Path:
    """The local folder of the model the user named (a folder or a Hub repo id); a missing one is a user error."""
    try:
        return resolve_pretrained(name)
    except FileNotFoundError as err:
        raise MissingFileError(str(err)) from err


def run_eval(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    cfg = load_run_config(args.config, _overrides(args))
    out = Path(cfg.output_dir)
    with cpu_threads(cfg.num_threads):
        folder = _model_folder(args.model_dir)
        model = DebiasedEncoder.from_pretrained(folder)
        if cfg.fit.device is not None:
            model.to(cfg.fit.device)
        data = build_data(cfg, vocabulary=model.vocabulary)
        _check_attributes_match(model, data)
        out.mkdir(parents=True, exist_ok=True)
        evaluate_run(cfg, model, data, out, start, None, folder / WEIGHTS_NAME)
    return 0


def run_audit(args: argparse.Namespace) -> int:
    """Audit a saved model's raw and debiased features on the config's data: probes fitted on the training data,
    scored on the test data; write audit.json and audit.md and print the table."""
    start = time.perf_counter()
    overrides = _overrides(args)
    cfg = load_run_config(args.config, overrides)
    folder = _model_folder(args.model)
    # A local model folder keeps its audit (its card then shows it); a Hub model's cached snapshot is not ours.
    into_model = Path(args.model).is_dir() and not any(key == "output_dir" for key, _ in overrides)
    out = folder if into_model else Path(cfg.output_dir)
    with cpu_threads(cfg.num_threads):
        model = DebiasedEncoder.from_pretrained(folder)
        if cfg.fit.device is not None:
            model.to(cfg.fit.device)
        data = build_data(cfg, vocabulary=model.vocabulary)
        _check_attributes_match(model, data)
        report = audit(model, data.train_eval, test_loader=data.test, config=cfg.audit, probes=cfg.eval)
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
    overrides = _overrides(args)
    if any(key == spec.key for key, _ in overrides):
        raise ConfigError(f"{spec.key}: both swept and set by an option; drop one of them.")
    out = Path(load_run_config(args.config, overrides).output_dir)
    folders = run_folders(spec)
    # Every run's config is checked before the first one starts: a bad value fails now, not after hours.
    configs = [load_run_config(args.config, [*overrides, (spec.key, value), ("output_dir", str(out / folder))])
               for value, folder in zip(spec.values, folders)]
    if configs[0].data.kind == "image_csv" and configs[0].data.label_column is None:
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


def _add_run_options(parser: argparse.ArgumentParser, max_steps: bool,
                     output_help: str = "folder of the outputs (config key output_dir)") -> None:
    parser.add_argument("config", help="YAML run file (see configs/)")
    parser.add_argument("--output-dir", metavar="DIR", help=output_help)
    if max_steps:
        parser.add_argument("--max-steps", type=int, metavar="N", help="stop training after N steps (fit.max_steps)")
        parser.add_argument("--resume", action="store_true", default=None,
                            help="continue from the newest checkpoint in OUTPUT_DIR/checkpoints (fit.resume)")
        parser.add_argument("--overwrite", action="store_true", default=None,
                            help="start a new run even though OUTPUT_DIR/checkpoints holds an earlier run's "
                                 "checkpoints, which are then removed (fit.overwrite_checkpoints)")
    parser.add_argument("--device", metavar="DEVICE", help="cpu, cuda, cuda:1, ... (fit.device)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set fit.lr=0.001 (repeatable)")


def _fit_arguments(parser: argparse.ArgumentParser) -> None:
    _add_run_options(parser, max_steps=True)


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="folder written by save_pretrained (e.g. OUTPUT/model)")
    _add_run_options(parser, max_steps=False)


def _audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="folder written by save_pretrained (e.g. OUTPUT/model), or a Hub repo id")
    _add_run_options(parser, max_steps=False,
                     output_help="folder of audit.json and audit.md (default: MODEL itself when it is a folder, so "
                                 "that its model card shows the audit; else the config's output_dir)")


def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run file (see configs/)")
    parser.add_argument("sweep", metavar="KEY=V1,V2,...",
                        help="the config key to vary and its values, e.g. fit.lam=0.2,0.5,0.8 (or a YAML list: "
                             "'eval.mlp_hidden=[[64], [128, 128]]')")
    parser.add_argument("--output-dir", metavar="DIR",
                        help="folder of sweep.json and sweep.png, with one run folder KEY=VALUE per value")
    parser.add_argument("--max-steps", type=int, metavar="N", help="stop each training after N steps (fit.max_steps)")
    parser.add_argument("--device", metavar="DEVICE", help="cpu, cuda, cuda:1, ... (fit.device)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any other config key in every run, e.g. --set fit.epochs=10 (repeatable)")


TOKEN_HELP = ("Set HF_TOKEN in the environment, log in once with `hf auth login` (the token is then read from the "
              "stored login), or pipe it in: `dmm-wrap push DIR REPO_ID --token-stdin < token-file`.")
"""How to hand `dmm-wrap push` a Hub token; never as a command-line value, which `ps` and shell history show."""


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
    from .hub import push_folder_to_hub
    from .serialization import read_metrics

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


def _push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", help="a run folder of `dmm-wrap fit` (its model/ is pushed) or a save_pretrained folder")
    parser.add_argument("repo_id", help="Hub repository, e.g. my-org/digits-debiased")
    parser.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    parser.add_argument("--token-stdin", action="store_true",
                        help="read the Hub token from one line of stdin (default: HF_TOKEN or the stored login)")
    parser.add_argument("--token", nargs="?", const="", default=None, help=argparse.SUPPRESS)  # refused: see TOKEN_HELP
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--commit-message", default="Upload DeepMinMax debiased encoder")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")


class Command(NamedTuple):
    """One subcommand: its name, one-line help, how it adds its arguments, and what it runs (the exit status)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = [
    Command("fit", "train the heads on a frozen backbone, evaluate, and write the report", _fit_arguments, run_fit),
    Command("eval", "evaluate a saved model against raw features and LEACE", _eval_arguments, run_eval),
    Command("audit", "measure how well each attribute can still be decoded from a saved model's features",
            _audit_arguments, run_audit),
    Command("sweep", "fit and evaluate once per value of one key; plot task accuracy against leakage",
            _sweep_arguments, run_sweep),
    Command("push", "push a trained model (and its metrics) to the Hugging Face Hub", _push_arguments, run_push),
]
"""The subcommands, in --help order; a new one is one more entry."""


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="dmm-wrap", description="DeepMinMax debiasing of frozen vision backbones.")
    parser.add_argument("--version", action="version", version=f"dmm-wrap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dmm-wrap` and `python -m dmm_wrap`; returns the exit status.

    Example:
        >>> main(["fit", "configs/synthetic_digits.yaml", "--max-steps", "5", "--output-dir", "/tmp/smoke"])
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as err:  # the user's input; anything else is a bug, whose traceback must show
        if os.environ.get("DMM_WRAP_TRACEBACK"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"dmm-wrap: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except TrainingInterrupted as stop:
        if stop.rank == 0:  # the process group is already shut down here: ask the exception
            where = f"checkpoint {stop.checkpoint}" if stop.checkpoint else "the last checkpoint"
            print(f"dmm-wrap: interrupted at step {stop.step}; {where} holds the run. Continue it with the same "
                  "command and --resume.", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("dmm-wrap: interrupted", file=sys.stderr)
        return 130


__all__ = ["main", "build_parser", "COMMANDS", "Command", "RunData", "build_data", "build_model", "evaluate_run",
           "fit_and_evaluate"]
