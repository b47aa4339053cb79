"""One store folder holding everything the bot keeps: images, bottleneck cache and model versions.

Layout::

    <store_dir>/images/<label>/<sha256>.<ext>   labelled training images (model_store.dataset)
    <store_dir>/catalog.sqlite                  who added what, when; answers, feedback, review queue
    <store_dir>/bottlenecks/<backbone id>/...   cached bottlenecks (model_store.bottlenecks)
    <store_dir>/models/<version>/, CURRENT      model versions (model_store.registry)
"""

from __future__ import annotations

from pathlib import Path

from model_store.dataset import ImageStore
from model_store.registry import ModelRegistry
from model_store.review import ReviewSettings, ReviewStore


class Workspace:
    """The store folder and its parts.

    Args:
        store_dir: folder (created if missing).
        min_free_bytes: free-disk floor for adding images (see ``ImageStore``).
        max_pixels: largest image accepted when adding (None: the decoder's default).
        review: bounds and thresholds of the review store (None: ``ReviewSettings()``'s defaults).

    Attributes:
        root: ``store_dir`` as a Path.
        store: the labelled images (``ImageStore``).
        registry: the model versions (``ModelRegistry``).
        review: the bot's answers, users' feedback and the admins' review queue (``ReviewStore``,
            tables in ``catalog.sqlite``).
        bottleneck_dir: root of the bottleneck cache.
    """

    def __init__(
        self,
        store_dir: Path | str,
        *,
        min_free_bytes: int = 0,
        max_pixels: int | None = None,
        review: ReviewSettings | None = None,
    ):
        self.root = Path(store_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = ImageStore(self.root, min_free_bytes=min_free_bytes, max_pixels=max_pixels)
        self.registry = ModelRegistry(self.root / "models")
        self.review = ReviewStore(self.store, review)
        self.bottleneck_dir = self.root / "bottlenecks"
