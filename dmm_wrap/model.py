"""`DebiasedEncoder`: a frozen backbone, a hooked layer, and the DeepMinMax heads, as one nn.Module."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import __version__
from .backbones import (BackboneSpec, build_backbone, check_rebuild_spec, create_backbone, describe_backbone,
                        freeze)
from .config import Attribute, FitConfig, HeadConfig, Pooling, _known_keys, build_dataclass
from .hooks import FeatureExtractor, first_tensor
from .hooks import pool as pool_features
from .hub import (DEFAULT_COMMIT_MESSAGE, card_was_edited, load_audit, load_metrics, model_card, push_folder_to_hub,
                  resolve_pretrained)
from .inference import (GRAPH_OUTPUT, InferenceModule, Preprocessing, as_preprocessing, default_preprocessing,
                        export_onnx, truncate_backbone)
from .objective import DeepMinMax
from .serialization import (CONFIG_NAME, FORMAT_VERSION, METRICS_NAME, MODEL_TYPE, README_NAME, WEIGHTS_NAME,
                            WEIGHTS_SHA_KEY, records_other_weights,
                            check_keys, check_weights_match_config, file_sha256, load_weights, plain_metrics,
                            read_config, require_keys, save_weights, write_atomically, write_config, write_metrics)
from .trainer import FitHistory, PrePass, TrainingInterrupted, train

_HEADS_PREFIX = "heads."
_DUPLICATE_PREFIX = "extractor._target."
_CONFIG_KEYS = ("model_type", "format_version", "dmm_wrap_version", "weights_sha256", "backbone", "layer", "pool", "input_size",
                "feature_dim", "out_dim", "attributes", "head", "weights", "preprocessing", "vocabulary",
                "channels_last")
_REQUIRED_KEYS = ("backbone", "layer", "feature_dim", "attributes")


def _as_attributes(attributes: Sequence[Attribute | dict[str, Any]]) -> tuple[Attribute, ...]:
    if isinstance(attributes, (Attribute, dict, str)) or not isinstance(attributes, Sequence):
        raise TypeError("attributes must be a list of Attribute(name, kind, num_classes=None).")
    out = tuple(a if isinstance(a, Attribute) else Attribute(**a) for a in attributes)
    if not out:
        raise ValueError("Declare at least one attribute to remove, e.g. [Attribute('site', 'categorical', 3)].")
    names = [a.name for a in out]
    if len(set(names)) != len(names):
        raise ValueError(f"Attribute names must be unique, got {names}.")
    return out


class DebiasedEncoder(nn.Module):
    """A frozen backbone whose features at `layer` are debiased by DeepMinMax.

    Args:
        backbone: any nn.Module, or a name "timm:ARCH" / "torchvision:ARCH" built with random weights.
        layer: a name from `backbone.named_modules()` whose output is hooked; None uses the backbone's output.
        attributes: the sensitive attributes B to remove, in the column order of the attribute tensors.
        pool: how a hooked 4-D map or 3-D token sequence becomes [N, D]: "avg" (default: mean over space or
            tokens), "max", "cls" (token 0) or "flatten".
        input_size: shape of one input without batch, e.g. (3, 224, 224). When given, one dummy forward infers the
            feature width now; otherwise the heads are built on the first batch `fit` sees.
        preprocessing: how PIL images become inputs (`Preprocessing` or a dict of its fields), saved in config.json
            and used by `preprocess` / `embed`. "auto" derives it from the backbone (timm data config, torchvision
            weights transforms, ImageNet defaults for an untagged torchvision model, None for a custom module).
        channels_last: whether the hooked layer gives channels-last maps [N, H, W, C] (timm's Swin stages), so that
            pooling averages over H and W rather than over W and C. None (default) detects it from the hooked module
            and the backbone (timm's `output_fmt` "NHWC"); saved in config.json.
        **head_options: fields of `HeadConfig` (h_layers, h_hidden, out_dim, m_layers, ...).

    Under torch.compile and torch.export the forward runs a hook-free graph of the backbone truncated at `layer`
    (see `inference_module`), so `torch.export.export(enc, (x,))` and `torch.compile(enc, fullgraph=True)` work.

    Example:
        >>> enc = DebiasedEncoder("torchvision:resnet18", "avgpool", [Attribute("site", "categorical", 3)])
        >>> history = enc.fit(loader, epochs=5)
        >>> z_tilde = enc(images)
    """

    def __init__(self, backbone: nn.Module | str, layer: str | None, attributes: Sequence[Attribute | dict[str, Any]],
                 *, pool: Pooling = "avg", input_size: Sequence[int] | None = None,
                 preprocessing: Preprocessing | dict[str, Any] | None | Literal["auto"] = "auto",
                 channels_last: bool | None = None, **head_options: Any) -> None:
        super().__init__()
        if isinstance(backbone, str):
            backbone = create_backbone(backbone)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module or a 'timm:ARCH' / 'torchvision:ARCH' name, got {type(backbone).__name__}.")
        if pool not in ("avg", "max", "cls", "flatten"):
            raise ValueError(f"pool must be one of ['avg', 'max', 'cls', 'flatten'], got {pool!r}.")
        feature_dim = head_options.pop("_feature_dim", None)
        self.backbone_spec: BackboneSpec = describe_backbone(backbone)
        self.attributes = _as_attributes(attributes)
        self.head_config = build_dataclass(HeadConfig, head_options, "head")
        self.extractor = FeatureExtractor(freeze(backbone), layer, pool, channels_last)
        self.input_size = tuple(input_size) if input_size is not None else None
        self.heads: DeepMinMax | None = None
        self.vocabulary: dict[str, list[str]] | None = None
        """String labels of the training data's text columns ({column: labels}, class id k = labels[k]; see
        `ImageCSVDataset.vocabulary`), saved in config.json so that held-out data is read with the same ids; None
        when unknown."""
        self._transform: Callable[[Any], Tensor] | None = None
        self._preprocessing: Preprocessing | None = None
        self.preprocessing = (default_preprocessing(backbone, self.backbone_spec, self.input_size)
                              if isinstance(preprocessing, str) and preprocessing == "auto" else preprocessing)
        if feature_dim is None and self.input_size is not None:
            feature_dim = self._infer_feature_dim(torch.zeros(2, *self.input_size))
        if feature_dim is not None:
            self._build_heads(feature_dim)

    # ----------------------------------------------------------------- structure
    @property
    def backbone(self) -> nn.Module:
        return self.extractor.backbone

    @property
    def layer(self) -> str | None:
        return self.extractor.layer

    @property
    def channels_last(self) -> bool:
        """Whether the hooked layer's maps are [N, H, W, C] (pooled over axes 1 and 2); saved in config.json."""
        return self.extractor.channels_last

    @property
    def feature_dim(self) -> int | None:
        """Width D of the hooked, pooled features (None until inferred)."""
        return self.heads.feature_dim if self.heads is not None else None

    @property
    def preprocessing(self) -> Preprocessing | None:
        """How PIL images become inputs (saved in config.json); None when unknown. Assign a Preprocessing or a dict."""
        return self._preprocessing

    @preprocessing.setter
    def preprocessing(self, value: Preprocessing | dict[str, Any] | None) -> None:
        self._preprocessing = as_preprocessing(value)
        self._transform = None

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter or buffer (CPU for a model that has none)."""
        tensor = next(itertools.chain(self.parameters(), self.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def _infer_feature_dim(self, example: Tensor) -> int:
        param = next(self.backbone.parameters(), None)
        if param is not None:
            example = example.to(param.device, param.dtype)
        with torch.no_grad():
            return int(self.extractor(example).shape[1])

    def _build_heads(self, feature_dim: int) -> None:
        device = self.device
        self.heads = DeepMinMax(feature_dim, self.attributes, self.head_config).to(device)
        self._prepare_graph()

    def _prepare_graph(self) -> None:
        """Trace the hook-free graph that compile / export run, now: it cannot be built while dynamo traces forward.

        Kept out of the module tree (not a submodule), so it adds no state_dict keys; its leaf modules are the
        backbone's own, so it follows the backbone's weights and devices. Tracing runs the forward hooks of the
        backbone's traced-through modules once, on torch.fx proxies (so that hooks which change outputs are in the
        graph). A backbone torch.fx cannot trace still works in eager mode; compile / export then raise the reason.
        """
        try:
            with warnings.catch_warnings():  # torch.fx's notes concern inference_module() users, not every model
                warnings.simplefilter("ignore")
                trunk, truncated = truncate_backbone(self.backbone, self.layer, self.backbone_spec)
        except ValueError as err:
            self.__dict__["_graph"] = err
        else:
            self.__dict__["_graph"] = (trunk.eval(), truncated)

    def train(self, mode: bool = True) -> DebiasedEncoder:
        super().train(mode)
        self.extractor.train(False)  # the backbone stays in eval mode
        return self

    # ----------------------------------------------------------------- inference
    def _require_heads(self) -> DeepMinMax:
        if self.heads is None:
            raise RuntimeError("The heads are not built yet: call fit(...) first, pass input_size=, or load with from_pretrained.")
        return self.heads

    def features(self, inputs: Tensor) -> Tensor:
        """Raw hooked, pooled features Z [N, D] (float32), computed without gradients.

        Under torch.compile / torch.export they come from the hook-free graph instead of the hook (same values).
        """
        if _compiling():
            return self._graph_features(inputs)
        with torch.no_grad():
            return self.extractor(inputs).float()

    def debias(self, features: Tensor) -> Tensor:
        """Map raw features Z [N, D] (from `features`) to debiased features Z~."""
        return self._require_heads().debias(features.float())

    def forward(self, inputs: Tensor) -> Tensor:
        """Debiased features Z~ [N, out_dim] of a batch of inputs."""
        return self.debias(self.features(inputs))

    def _graph_features(self, inputs: Tensor) -> Tensor:
        """`features` through the hook-free graph: what torch.compile and torch.export trace."""
        graph = self.__dict__.get("_graph")
        if isinstance(graph, ValueError):
            raise RuntimeError(f"torch.compile / torch.export need a hook-free graph of the backbone. {graph}"
                               ) from graph
        if graph is None:
            raise RuntimeError("The heads are not built yet: call fit(...) first, pass input_size=, or load with "
                               "from_pretrained, then compile or export.")
        trunk, truncated = graph
        with torch.no_grad():
            out = trunk(inputs)
            if truncated:
                out = out[GRAPH_OUTPUT]
            return pool_features(first_tensor(out), self.extractor.pool, self.channels_last).float()

    @property
    def preprocess(self) -> Callable[[Any], Tensor]:
        """The eval transform of `preprocessing` (resize, crop, to tensor, normalise) for one PIL image.

        Example:
            >>> x = torch.stack([enc.preprocess(img) for img in pil_images])
        """
        if self._transform is None:
            if self._preprocessing is None:
                raise ValueError(
                    "This model records no preprocessing (custom backbone or non-image inputs). Set it, e.g. "
                    "model.preprocessing = dict(input_size=(3, 224, 224), mean=(0.485, 0.456, 0.406), "
                    "std=(0.229, 0.224, 0.225)), or pass tensors that are already preprocessed."
                )
            self._transform = self._preprocessing.transform()
        return self._transform

    def embed(self, images: Tensor | Iterable[Any], batch_size: int = 64, *,
              device: str | torch.device | None = None) -> Tensor:
        """Debiased features Z~ [N, out_dim] on CPU, computed in batches under torch.inference_mode.

        Args:
            images: a tensor [N, ...] of preprocessed inputs, or an iterable of PIL images (run through
                `preprocess`) and/or preprocessed tensors [C, H, W].
            batch_size: inputs per forward pass.
            device: where to run; None uses the model's device.

        Example:
            >>> z_tilde = enc.embed([Image.open(p).convert("RGB") for p in paths], batch_size=32)
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
        heads = self._require_heads()
        if device is None:
            device = self.device
        if isinstance(images, Tensor):
            batches: Iterable[Tensor] = images.split(batch_size)
        else:
            items = iter(images)
            batches = (torch.stack([x if isinstance(x, Tensor) else self.preprocess(x) for x in chunk])
                       for chunk in iter(lambda: list(itertools.islice(items, batch_size)), []))
        out: list[Tensor] = []
        with torch.inference_mode():
            for batch in batches:
                out.append(self(batch.to(device)).float().cpu())
        return torch.cat(out) if out else torch.empty(0, heads.out_dim)

    def inference_module(self, *, check: bool = True) -> InferenceModule:
        """`forward` as a plain hook-free nn.Module for torch.compile(fullgraph=True), torch.export and ONNX.

        The backbone is truncated at the hooked layer with torch.fx (later layers are removed), followed by
        pooling, standardisation and h_theta. It shares weights with this model; build a new one after `fit`.

        Args:
            check: when `input_size` is known, compare the module with the hooked forward on a random batch and
                raise if they differ (torch.fx froze a different control-flow path).

        Example:
            >>> program = torch.export.export(enc.inference_module(), (x,))
        """
        heads = self._require_heads()
        trunk, truncated = truncate_backbone(self.backbone, self.layer, self.backbone_spec)
        module = InferenceModule(trunk, self.extractor.pool, heads, truncated, self.channels_last)
        if check and self.input_size is not None:
            param = next(itertools.chain(self.backbone.parameters(), heads.parameters()))
            x = torch.randn(2, *self.input_size, generator=torch.Generator().manual_seed(0))
            x = x.to(param.device, param.dtype if param.is_floating_point() else None)
            with torch.no_grad():
                expected, got = self(x), module(x)
            if not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
                raise RuntimeError(
                    f"The hook-free graph of {type(self.backbone).__name__} differs from the hooked forward (max abs "
                    f"diff {(expected - got).abs().max().item():.3g}); torch.fx traced a different path. Use the "
                    "eager model, or hook another layer."
                )
        return module

    def export_onnx(self, path: str | os.PathLike, example: Tensor, *, dynamic_batch: bool = True,
                    opset_version: int | None = None) -> Path:
        """Export the hook-free `inference_module()` to an ONNX file (input "inputs", output "z_tilde").

        Example:
            >>> enc.export_onnx("debiased.onnx", torch.randn(2, 3, 224, 224))
        """
        return export_onnx(self.inference_module(), path, example, dynamic_batch=dynamic_batch,
                           opset_version=opset_version)

    # ----------------------------------------------------------------- training
    def fit(self, loader: Iterable, epochs: int | None = None, *, config: FitConfig | None = None,
            **options: Any) -> FitHistory:
        """Train the heads on a stream of `(inputs, attrs)` batches; the backbone is never updated.

        Args:
            loader: an iterable of batches (inputs [N, ...], attrs [N, num_attributes] float with class ids in
                categorical columns) or (inputs, {name: tensor}). Re-iterated once per epoch; a one-pass
                iterator (a generator) trains one epoch, and is refused up front when fit would read it twice
                (epochs > 1, stats_batches=None, resume). Each batch goes through the backbone once: the first
                `stats_batches` give the standardisation statistics and are kept for training (see PrePass).
            epochs: passes over the loader; overrides `config.epochs`.
            config: a FitConfig; **options override its fields (lr, lam, max_steps, device, amp_dtype,
                checkpoint_dir, checkpoint_every, resume, ...).

        Inside an initialised torch.distributed process group, call it on every rank with a loader of that rank's
        shard (e.g. a DistributedSampler): the heads train data-parallel (see `trainer.train`).

        Returns:
            The FitHistory of the loss terms. If fit raises, the heads are restored to their state before the call,
            except on SIGINT / SIGTERM (Ctrl-C): training then stops at a step boundary and raises
            TrainingInterrupted, whose `.history` and `.step` describe the steps taken; the model keeps the heads
            of the last complete step (save them with save_pretrained), and with checkpoint_dir a checkpoint of
            that step is written, which `resume=True` continues from.
        """
        base = dataclasses.asdict(config) if config is not None else {}
        base.update(options)
        if epochs is not None:
            base["epochs"] = epochs
        cfg = build_dataclass(FitConfig, base, "fit")
        device = torch.device(cfg.device) if cfg.device is not None else self.device
        if cfg.align_weight > 0 and not self.head_config.residual:
            warnings.warn("align_weight > 0 with a non-residual h_theta: the alignment target starts from h_theta's "
                          "random initial output rather than from Z. Use HeadConfig(residual=True) (see "
                          "HeadConfig.aligned()).", stacklevel=2)
        prepass = PrePass(loader, self.attributes, self.extractor, cfg, device, self.head_config.standardize)
        if cfg.device is not None:
            self.to(cfg.device)
        if self.heads is not None:
            self.heads.to(device)
        snapshot = copy.deepcopy(self.heads.state_dict()) if self.heads is not None else None
        try:
            if self.heads is None:
                self._build_heads_from(prepass)
            assert self.heads is not None
            self.heads.train()
            return train(self.heads, loader, self.extractor, cfg, device, prepass)
        except TrainingInterrupted:
            raise  # stopped between two steps: the heads of the steps taken are kept
        except BaseException:
            if snapshot is None:
                self.heads = None
            else:
                self.heads.load_state_dict(snapshot)
            raise
        finally:
            prepass.close()
            if self.heads is not None:
                self.heads.eval()

    def _build_heads_from(self, prepass: PrePass) -> None:
        width = prepass.feature_dim()  # epoch 0's first batch, kept: the statistics and training reuse its features
        with torch.random.fork_rng(devices=[]):  # initialising the heads must not shift the data's random draws,
            self._build_heads(width)  # which a run resumed in epoch 0 replays without it

    # ----------------------------------------------------------------- saving
    def config_dict(self, *, heads_only: bool = False) -> dict[str, Any]:
        """Everything needed to rebuild this model, as saved in config.json.

        "weights" says what model.safetensors holds: "full" (backbone and heads) or "heads_only" (the backbone is
        rebuilt from "backbone", whose pretrained_tag pins its weights). "preprocessing" is null when unknown.
        """
        heads = self._require_heads()
        return {
            "model_type": MODEL_TYPE,
            "format_version": FORMAT_VERSION,
            "dmm_wrap_version": __version__,
            "backbone": self.backbone_spec.to_dict(),
            "layer": self.layer,
            "pool": self.extractor.pool,
            "channels_last": self.channels_last,
            "input_size": list(self.input_size) if self.input_size is not None else None,
            "feature_dim": heads.feature_dim,
            "out_dim": heads.out_dim,
            "attributes": [a.to_dict() for a in self.attributes],
            "head": dataclasses.asdict(self.head_config),
            "weights": "heads_only" if heads_only else "full",
            "preprocessing": self._preprocessing.to_dict() if self._preprocessing is not None else None,
            "vocabulary": self.vocabulary,
        }

    def save_pretrained(self, save_directory: str | os.PathLike, *, heads_only: bool = False,
                        metrics: Mapping[str, Any] | None = None) -> Path:
        """Write config.json, model.safetensors and a model card README.md to `save_directory`, atomically.

        Args:
            save_directory: the folder to write (created if needed); files of an earlier save are replaced whole.
            heads_only: save only the trained heads (`heads.*` tensors), as peft saves adapters. The backbone is
                then rebuilt from its spec when loading, so it must be a timm / torchvision backbone with a
                pretrained tag, or a custom module that you pass back with `from_pretrained(..., backbone=)`.
            metrics: {name: value} written to metrics.json, with the sha256 of the weights they describe
                (`weights_sha256`), and shown in the card; None uses the metrics.json already in `save_directory`
                unless it records other weights (then it is left out of the card, with a warning).

        An audit.json already in `save_directory` (`dmm_wrap.audit`) is shown in the card while it audits the weights
        written now (same sha256), and left out otherwise. The card README.md is regenerated only when it is absent
        or is one dmm_wrap generated and nobody edited (recognised by its last line, a marker with its sha256); an
        edited or foreign README.md is kept as it is, with a warning.

        Example:
            >>> enc.save_pretrained("runs/debiased-resnet18", metrics={"site_probe_accuracy": 0.35})
        """
        config = self.config_dict(heads_only=heads_only)
        if heads_only:
            self._check_heads_only()
        state = self.state_dict()
        if heads_only:
            state = {k: v for k, v in state.items() if k.startswith(_HEADS_PREFIX)}
        new_metrics = plain_metrics(metrics) if metrics is not None else None
        folder = Path(save_directory)
        keep_card = card_was_edited(folder)
        if keep_card:
            warnings.warn(f"{folder / README_NAME} was edited (or not written by dmm_wrap): it is kept as it is, so "
                          "its metrics and usage may be stale. Delete it to get a regenerated card.", stacklevel=2)

        def writer(tmp: Path) -> None:
            save_weights(state, tmp / WEIGHTS_NAME, metadata={"format": "pt", "weights": config["weights"]})
            saved = {**config, "weights_sha256": file_sha256(tmp / WEIGHTS_NAME)}
            if new_metrics is not None:
                card_metrics = {**new_metrics, WEIGHTS_SHA_KEY: saved["weights_sha256"]}
                write_metrics(card_metrics, tmp / METRICS_NAME)
            else:
                card_metrics = load_metrics(folder)
                if records_other_weights(card_metrics, saved["weights_sha256"]):
                    warnings.warn(f"{folder / METRICS_NAME} records other weights than the ones saved now; it is left "
                                  "out of the model card. Pass metrics= to record those of these weights.",
                                  stacklevel=4)
                    card_metrics = None
            audit = load_audit(folder, saved)  # shown only if it audits these very weights
            if not keep_card:
                (tmp / README_NAME).write_text(model_card(saved, card_metrics, audit=audit))
            write_config(saved, tmp / CONFIG_NAME)

        return write_atomically(save_directory, writer)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    revision: str | None = None, commit_message: str = DEFAULT_COMMIT_MESSAGE,
                    commit_description: str | None = None, create_pr: bool = False, heads_only: bool = False,
                    metrics: Mapping[str, Any] | None = None, api: Any = None) -> Any:
        """Save into a temporary folder and upload it to the Hub repo `repo_id` in one commit.

        The repo is created if needed (`exist_ok=True`). Nothing is created or uploaded when saving fails. The token
        goes to huggingface_hub only; it is never written into the files.

        Args:
            repo_id: "org/name".
            private: visibility of a newly created repo; None keeps the Hub default.
            token: a Hub token; None uses the logged-in one.
            revision: branch to commit to (created if missing); None is main.
            commit_message, commit_description: of the commit (or pull request).
            create_pr: open a pull request instead of committing.
            heads_only, metrics: as in `save_pretrained`.
            api: an `huggingface_hub.HfApi` to use; None makes one.

        Returns:
            The `huggingface_hub.CommitInfo` (`.commit_url`, `.pr_url`).

        Example:
            >>> enc.push_to_hub("my-org/debiased-resnet18", private=True)
        """
        with tempfile.TemporaryDirectory(prefix="dmm_wrap-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", heads_only=heads_only, metrics=metrics)
            return push_folder_to_hub(folder, repo_id, private=private, token=token, revision=revision,
                                      commit_message=commit_message, commit_description=commit_description,
                                      create_pr=create_pr, api=api)

    def _check_heads_only(self) -> None:
        spec = self.backbone_spec
        if spec.source != "custom" and not spec.pretrained_tag:
            raise ValueError(
                f"heads_only=True needs a backbone that can be rebuilt with the same weights, but this "
                f"{spec.source}:{spec.name} backbone has no pretrained tag (random init, or weights loaded by hand): "
                "its weights exist only in this model. Save the full weights (heads_only=False), or build the "
                f"backbone with create_backbone('{spec.source}:{spec.name}', pretrained=TAG)."
            )

    @classmethod
    def from_pretrained(cls, repo_id_or_dir: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                        token: str | bool | None = None, backbone: nn.Module | None = None,
                        map_location: str | torch.device = "cpu") -> DebiasedEncoder:
        """Load a model written by `save_pretrained`, from a folder or a Hugging Face Hub repo.

        A path-like object or an existing folder loads directly. Any other string is a repo id, downloaded with
        huggingface_hub (config.json, model.safetensors, README.md, metrics.json, audit.json) into its cache; offline
        (HF_HUB_OFFLINE=1 or local_files_only=True) only the cache is read. timm and torchvision backbones are
        rebuilt by name; a custom backbone must be passed as `backbone=`. A heads-only save rebuilds the backbone
        with its pinned pretrained weights (a download) unless `backbone=` is given. Weights are read from
        safetensors only (never unpickled), with strict key and shape checks.

        Args:
            repo_id_or_dir: a folder, or "org/name" on the Hub.
            revision: branch, tag or commit of the repo; None is main.
            cache_dir: the Hugging Face cache to use; None is the default (HF_HUB_CACHE).
            local_files_only: never touch the network.
            token: for private or gated repos; never stored.
            backbone: the backbone module (required for custom backbones; its weights are overwritten by a full save).
            map_location: device of the returned model.

        Example:
            >>> enc = DebiasedEncoder.from_pretrained("my-org/debiased-resnet18", revision="v1.0")
        """
        directory = resolve_pretrained(repo_id_or_dir, revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only, token=token)
        weights_path = directory / WEIGHTS_NAME
        if not weights_path.is_file():
            load_weights(weights_path)  # raises: missing, or a pickle checkpoint that is refused
        config = read_config(directory / CONFIG_NAME)
        state = load_weights(weights_path)
        # Full saves of earlier versions held the hooked layer's tensors a second time, under this prefix.
        state = {k: v for k, v in state.items() if not k.startswith(_DUPLICATE_PREFIX)}
        model = cls._from_config(config, backbone, directory / CONFIG_NAME)
        heads_only = config.get("weights", "full") == "heads_only"
        expected = model.state_dict()
        if heads_only:
            expected = {k: v for k, v in expected.items() if k.startswith(_HEADS_PREFIX)}
        check_keys(expected, state, weights_path)
        check_weights_match_config(config, weights_path)  # after the key checks, whose messages say more
        model.load_state_dict(state, strict=not heads_only)
        return model.to(map_location).eval()

    @classmethod
    def _from_config(cls, config: dict[str, Any], backbone: nn.Module | None,
                     path: Path = Path(CONFIG_NAME)) -> DebiasedEncoder:
        unknown = sorted(set(config) - set(_CONFIG_KEYS))
        if unknown:
            warnings.warn(f"Ignoring unknown config keys {unknown} (written by a newer dmm_wrap?).", stacklevel=3)
        require_keys(config, _REQUIRED_KEYS, path)
        weights = config.get("weights", "full")
        if weights not in ("full", "heads_only"):
            raise ValueError(f"{path}: 'weights' must be 'full' or 'heads_only', got {weights!r}.")
        try:
            spec = BackboneSpec.from_dict(config["backbone"])
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: 'backbone' must be a mapping with 'source' and 'name', got "
                             f"{config['backbone']!r}.") from err
        if backbone is None:
            check_rebuild_spec(spec, str(path))  # before anything reaches timm / torchvision
            backbone = build_backbone(spec) if weights == "full" else _pretrained_backbone(spec)
        elif weights == "heads_only":
            _warn_if_other_backbone(backbone, spec)
        head = _known_keys(HeadConfig, config.get("head", {}), "head config")
        model = cls(backbone, config["layer"], [Attribute.from_dict(a) for a in config["attributes"]],
                    pool=config.get("pool", "avg"), input_size=None, preprocessing=config.get("preprocessing", "auto"),
                    channels_last=config.get("channels_last"),
                    _feature_dim=int(config["feature_dim"]), **head)
        model.input_size = tuple(config["input_size"]) if config.get("input_size") else None
        model.vocabulary = _vocabulary(config.get("vocabulary"), path)
        if spec.source != "custom":
            model.backbone_spec = spec
        return model


def _vocabulary(value: Any, path: Path) -> dict[str, list[str]] | None:
    """The "vocabulary" of a config.json: None, or {column: [label, ...]}."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, list)
                                              and all(isinstance(x, str) for x in v) for k, v in value.items()):
        raise ValueError(f"{path}: 'vocabulary' must be null or a mapping of column names to lists of labels, got "
                         f"{value!r}.")
    return {k: list(v) for k, v in value.items()}


def _compiling() -> bool:
    """Whether torch.compile (dynamo) or torch.export is tracing the current call."""
    check = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3; it is also True under torch.export
    return bool(check()) if check is not None else bool(torch._dynamo.is_compiling())


def _pretrained_backbone(spec: BackboneSpec) -> nn.Module:
    """Rebuild the pinned backbone of a heads-only save, with its pretrained weights (a download)."""
    if spec.source == "custom":
        raise ValueError(
            f"This save holds only the heads, and its backbone is a custom {spec.name} module: rebuild it with the "
            "weights it was trained with and pass it as from_pretrained(..., backbone=module)."
        )
    from .pretrained import DIGITS_ENCODER_TAG, load_digits_encoder

    if spec.pretrained_tag == DIGITS_ENCODER_TAG:
        return load_digits_encoder()  # shipped with the package, nothing to download
    if not spec.pretrained_tag:
        raise ValueError(
            f"This save holds only the heads, but its {spec.source}:{spec.name} backbone has no pretrained tag to "
            "rebuild it from; pass the backbone it was trained with as from_pretrained(..., backbone=module)."
        )
    try:
        return create_backbone(f"{spec.source}:{spec.name}", pretrained=spec.pretrained_tag, **spec.kwargs)
    except Exception as err:  # noqa: BLE001 - download errors come from timm, torch.hub, urllib, huggingface_hub
        raise OSError(
            f"This save holds only the heads; rebuilding its backbone {spec.source}:{spec.name} with the pretrained "
            f"weights {spec.pretrained_tag!r} needs network access (or those weights in the timm / torch cache) and "
            f"failed ({type(err).__name__}: {err}). Pass the backbone yourself: from_pretrained(..., "
            f"backbone=create_backbone('{spec.source}:{spec.name}', pretrained='{spec.pretrained_tag}'))."
        ) from err


def _warn_if_other_backbone(backbone: nn.Module, spec: BackboneSpec) -> None:
    found = describe_backbone(backbone)
    if spec.source != "custom" and found.source != "custom" and (found.source, found.name) != (spec.source, spec.name):
        warnings.warn(
            f"The heads were trained on {spec.source}:{spec.name} ({spec.pretrained_tag}) but backbone= is "
            f"{found.source}:{found.name}; the debiased features are only meaningful on the original backbone.",
            stacklevel=4,
        )


__all__ = ["DebiasedEncoder"]
