"""Rebuild the committed test data from the shared data folders (needs only Pillow).

* ``tests/data/clothing/<label>/``: the first 8 images (sorted file names) of each class of
  clothing-small/dev, orientation applied, downscaled so the longer side is at most 160 px,
  saved as JPEG quality 90 with the same file stem; plus LICENSE, PROVENANCE.md and README.md.
* ``tests/data/cases/``: a verbatim copy of cases/images/* and cases/README.md.

Usage: python tests/data/make_subset.py [--shared /work/shared]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image, ImageOps

PER_LABEL = 8
MAX_SIDE = 160
JPEG_QUALITY = 90
HERE = Path(__file__).resolve().parent

README = f"""# clothing test subset

The first {PER_LABEL} files (sorted by name) of each class folder of clothing-small/dev (see
PROVENANCE.md; licence CC0, see LICENSE), EXIF orientation applied, downscaled with LANCZOS so
the longer side is at most {MAX_SIDE} px, saved as RGB JPEG quality {JPEG_QUALITY} under the same
file stem. Rebuild with `python tests/data/make_subset.py`.
"""


def make_clothing(source: Path, dest: Path) -> int:
    """Write the downscaled subset of ``source/<label>/*.jpg`` into ``dest``; return the count."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    count = 0
    for label_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        out_dir = dest / label_dir.name
        out_dir.mkdir()
        files = sorted(p for p in label_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        for path in files[:PER_LABEL]:
            with Image.open(path) as im:
                image = ImageOps.exif_transpose(im).convert("RGB")
            image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
            image.save(out_dir / f"{path.stem}.jpg", "JPEG", quality=JPEG_QUALITY)
            count += 1
    for name in ("LICENSE", "PROVENANCE.md"):
        shutil.copyfile(source.parent / name, dest / name)
    (dest / "README.md").write_text(README, encoding="utf-8")
    return count


def copy_cases(cases: Path, dest: Path) -> int:
    """Copy ``cases/images/*`` and ``cases/README.md`` flat into ``dest``; return the count."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    sources = sorted(p for p in (cases / "images").iterdir() if p.is_file())
    sources.append(cases / "README.md")
    for path in sources:
        shutil.copyfile(path, dest / path.name)  # copyfile: no read-only bits carried over
    return len(sources)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("/work/shared"))
    args = parser.parse_args()
    n_images = make_clothing(args.shared / "data" / "clothing-small" / "dev", HERE / "clothing")
    n_cases = copy_cases(args.shared / "cases", HERE / "cases")
    print(f"wrote {n_images} clothing images and {n_cases} case files under {HERE}")


if __name__ == "__main__":
    main()
