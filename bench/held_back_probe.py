"""Where a built low-precision artifact flips and loses cosine, by how sure the fp32 model is of each image.

    .venv/bin/python bench/held_back_probe.py resnet50                       # its int8 artifacts, latest build
    .venv/bin/python bench/held_back_probe.py resnet50 --artifacts-named openvino-int8 --images 1000

On `--images` test images and as many training images (the first of the build's seed, so its calibration images
are among them): each artifact's flips and worst cosine with the build's reference, overall and among the eighth of
the images with the smallest fp32 top-1 margin and the eighth with the smallest logit norm. The measurement behind
`exporter.build_inputs.HELD_BACK_POOL` (an int8 build judges itself on the hardest training images of a pool).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def logits(runner, images: np.ndarray, batch: int = 1) -> np.ndarray:
    """The runner's logits for `images`, `batch` at a time (1: what a build's held-back check does)."""
    return np.concatenate([runner.infer(images[i:i + batch]) for i in range(0, len(images), batch)])


def where_it_fails(reference: np.ndarray, output: np.ndarray) -> dict:
    """Flips and worst cosine overall and among the least-sure eighth by margin and by logit norm."""
    from exporter.judge import row_cosines

    cosine = row_cosines(reference.astype(np.float64), output.astype(np.float64))
    flipped = reference.argmax(1) != output.argmax(1)
    top_two = np.sort(reference, axis=1)[:, -2:]
    eighth = max(len(reference) // 8, 1)
    row = {"images": len(reference), "flips": int(flipped.sum()), "min_cosine": float(cosine.min())}
    for name, key in (("margin", top_two[:, 1] - top_two[:, 0]), ("norm", np.linalg.norm(reference, axis=1))):
        least = np.argsort(key, kind="stable")[:eighth]
        row[f"least_{name}"] = {"images": eighth, "flips": int(flipped[least].sum()),
                                "min_cosine": float(cosine[least].min())}
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a built model (its latest build) or a build directory")
    parser.add_argument("--artifacts", type=Path, default=None, help="the artifacts directory (default: artifacts/)")
    parser.add_argument("--artifacts-named", default=None,
                        help="comma-separated artifact names (default: every int8 artifact)")
    parser.add_argument("--images", type=int, default=1000, help="test images, and as many training images")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)

    from exporter.backends import runner_for
    from exporter.data import sample_images
    from exporter.manifest import load_build

    build = load_build(args.model, args.artifacts)
    seed = build.manifest["options"].get("seed", 0)
    names = args.artifacts_named.split(",") if args.artifacts_named else [
        a.name for a in build.artifacts if a.precision == "int8" and a.device == "cpu"]
    reference_runner = runner_for(build.reference, build.dir).activate()
    rows = []
    for split in ("test", "train"):
        images, _, _ = sample_images(build.dataset, split, build.input_shape, args.images, seed=seed)
        reference = logits(reference_runner, images, batch=32)
        for name in names:
            runner = runner_for(build.artifact(name), build.dir).activate()
            rows.append({"artifact": name, "split": split, **where_it_fails(reference, logits(runner, images))})
            runner.deactivate()
    reference_runner.deactivate()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        m, n = r["least_margin"], r["least_norm"]
        print(f"{r['artifact']:<16} {r['split']:<5} {r['images']} images: {r['flips']} flips, worst cosine "
              f"{r['min_cosine']:.4f} | least-sure {m['images']} by margin: {m['flips']} flips, {m['min_cosine']:.4f}"
              f" | by norm: {n['flips']} flips, {n['min_cosine']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
