"""Shapes: a synthetic detection dataset drawn on the fly (no files, deterministic by seed).

Each image shows 1..max_objects filled shapes of six classes in random colours, sizes (short side
from about 8% of the image side, long side up to 70%) and aspect ratios (1:2 to 2:1), on a textured
background (colour gradient, soft blotches, thin lines, pixel noise) that holds no class shapes.
Objects may overlap, but each keeps at least `MIN_VISIBLE` of its pixels and half of its pixels on
each side of its box visible, so every ground truth box is the exact tight box of what the image
shows.

Example `i` of a split is drawn from a NumPy generator seeded with (seed, split, i): the same
example comes back whatever the access order, and train and validation never share an image.
"""
import concurrent.futures
import multiprocessing
import operator
import os
import threading
import warnings

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

CLASS_NAMES = ("ellipse", "rectangle", "triangle", "diamond", "star", "cross")
NUM_CLASSES = len(CLASS_NAMES)
SPLIT_IDS = {"train": 0, "validation": 1}
DEFAULT_NUM_EXAMPLES = {"train": 50_000, "validation": 1_000}

MIN_SIDE = 0.08          # shortest object side, fraction of the image side ...
MIN_SIDE_PX = 10         # ... and never below this many pixels, so every silhouette stays readable
MAX_SIDE = 0.70          # longest object side, fraction of the image side
MEAN_SIDE = (0.09, 0.6)  # sqrt(width * height) drawn log-uniformly in this range (x image side)
MAX_ASPECT = 2.0         # width / height drawn log-uniformly in [1 / MAX_ASPECT, MAX_ASPECT]
MIN_VISIBLE = 0.6        # fraction of an object's pixels that later objects must leave visible
MIN_CONTRAST = 100.0     # RGB distance of an object's colour to the background and its neighbours
NOISE = 10               # pixel noise amplitude (uniform, per channel), on background and objects
PLACEMENT_TRIES = 20     # tries to place one object before giving up on it
# draw_ahead's worker processes take 2 to 3 s each to start (imports), the time of drawing
# about 2,000 images in this process: below that they do not pay.
WORKERS_PAY_FROM = 2_000


def _star(points=5, inner=0.45):
    angles = np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), -radii * np.sin(angles)], axis=1)


def _cross(arm=1 / 3):
    a, b = arm, 1 - arm
    return np.array([(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b),
                     (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)])


def _unit_square(vertices):
    """Stretches a polygon so it touches all four sides of the unit square."""
    vertices = np.asarray(vertices, np.float64)
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    return (vertices - low) / (high - low)


# Outlines in the unit square, one per class, in CLASS_NAMES order; None is the ellipse.
_OUTLINES = (
    None,
    _unit_square([(0, 0), (1, 0), (1, 1), (0, 1)]),
    _unit_square([(0.5, 0), (1, 1), (0, 1)]),
    _unit_square([(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]),
    _unit_square(_star()),
    _unit_square(_cross()),
)


def shape_mask(label: int, width: int, height: int) -> np.ndarray:
    """Rasterized silhouette of class `label` (1..C) stretched over a width x height patch.

    Returns: bool [h, w], cropped to the silhouette's tight box (h <= height, w <= width).
    """
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    outline = _OUTLINES[label - 1]
    if outline is None:
        draw.ellipse((0, 0, width - 1, height - 1), fill=1)
    else:
        draw.polygon([tuple(p) for p in outline * (width - 1, height - 1)], fill=1)
    mask = np.asarray(canvas, bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _background(rng, size, grid=5):
    """Gradient between two random colours, soft blotches and thin lines: uint8 [S, S, 3]."""
    # Gradient and blotches are drawn on a coarse grid; bilinear upsampling smooths them.
    coords = np.linspace(0, 1, grid)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    start, end = rng.uniform(0, 255, (2, 3))
    coarse = start + ramp[..., None] * (end - start) + rng.uniform(-32, 32, (grid, grid, 3))
    coarse = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
    canvas = coarse.resize((size, size), Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(2, 7)):  # thin strokes: texture that is never a class
        ends = rng.uniform(0, size, 4)
        draw.line(tuple(ends), fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
                  width=int(rng.integers(1, 3)))
    return np.asarray(canvas)


def _object_size(rng, size):
    """Width and height in pixels: log-uniform area and aspect ratio, clipped to the side limits."""
    side = size * np.exp(rng.uniform(*np.log(MEAN_SIDE)))
    aspect = np.exp(rng.uniform(-np.log(MAX_ASPECT), np.log(MAX_ASPECT)))
    low, high = max(MIN_SIDE * size, MIN_SIDE_PX), MAX_SIDE * size
    width, height = np.clip([side * np.sqrt(aspect), side / np.sqrt(aspect)], low, high)
    return int(np.ceil(width)), int(np.ceil(height))


def _edges(mask):
    """Pixel counts of a mask's top, bottom, left and right border lines."""
    return np.array([mask[0].sum(), mask[-1].sum(), mask[:, 0].sum(), mask[:, -1].sum()])


def _keeps_earlier_objects_visible(owner, new_owner, box_px, masks):
    """True if every earlier object the last one covers keeps MIN_VISIBLE of its pixels and at
    least half of its pixels on each side of its box, so its box stays the box of what is seen."""
    x0, y0, x1, y1 = box_px[-1]
    changed = new_owner[y0:y1, x0:x1] != owner[y0:y1, x0:x1]
    covered = np.unique(owner[y0:y1, x0:x1][changed])
    for j in covered[covered >= 0]:
        jx0, jy0, jx1, jy1 = box_px[j]
        visible = new_owner[jy0:jy1, jx0:jx1] == j
        if (visible.sum() < MIN_VISIBLE * masks[j].sum()
                or np.any(2 * _edges(visible) < _edges(masks[j]))):
            return False
    return True


def _pick_colour(rng, avoid):
    """First of a few random colours at least MIN_CONTRAST from every colour in `avoid`, else the
    farthest of them."""
    candidates = rng.integers(0, 256, (16, 3))
    distance = np.linalg.norm(candidates[:, None] - np.asarray(avoid)[None], axis=-1).min(axis=1)
    good = np.flatnonzero(distance >= MIN_CONTRAST)
    return candidates[good[0] if good.size else distance.argmax()]


def _intersects(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


class ShapesDataset:
    """Random-access synthetic detection dataset (see the module docstring).

    `dataset[i]` returns {"image": uint8 [S, S, 3], "boxes": float32 [G, 4] corners
    (xmin, ymin, xmax, ymax) in [0, 1] (pixel edges: a box covering pixel columns 3..9 has
    xmin = 3 / S, xmax = 10 / S), "labels": int32 [G] in 1..C, "difficult": bool [G] all False}
    with 1 <= G <= max_objects. With `cache=True` each example is drawn on its first read and
    the same read-only arrays are returned after that.
    """

    class_names = CLASS_NAMES
    num_classes = NUM_CLASSES

    def __init__(self, split: str = "train", num_examples: int | None = None,
                 image_size: int = 128, max_objects: int = 6, seed: int = 0,
                 cache: bool = False):
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
        if image_size * MAX_SIDE < MIN_SIDE_PX:
            raise ValueError(f"image_size must be at least {int(np.ceil(MIN_SIDE_PX / MAX_SIDE))}, "
                             f"got {image_size}")
        if max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {max_objects}")
        self.split = split
        self.image_size = image_size
        self.max_objects = max_objects
        self.seed = seed
        self.num_examples = DEFAULT_NUM_EXAMPLES[split] if num_examples is None else num_examples
        # cache: each example is drawn once and kept (read-only), for training runs of more
        # than one epoch: drawing costs ~1.7 ms of CPU per 128 x 128 image, a lookup nothing;
        # the memory is ~50 KB per 128 x 128 example (1 GB for 20,000).
        self._cache = {} if cache else None
        # draw_ahead's chunks on their way: first index -> (last index + 1, worker's future),
        # each chunk `_chunk` examples long
        self._drawing = {}
        self._chunk = 1
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index) -> dict:
        if self._cache is None:
            return self.render(index)[0]
        index = operator.index(index)
        if index not in self._cache:
            self._collect_drawn(index)
        if index not in self._cache:
            self._keep(index, self.render(index)[0])
        return self._cache[index]

    def _collect_drawn(self, index: int) -> None:
        """Waits for draw_ahead's workers to draw the chunk holding `index`, if they are at it."""
        with self._lock:  # one reader collects a chunk; the others wait, then find it cached
            start = index - index % self._chunk
            stop, future = self._drawing.pop(start, (None, None))
            if future is None:
                return
            try:
                examples = future.result()
            except concurrent.futures.process.BrokenProcessPool as error:
                # e.g. a __main__ that spawned workers cannot import (a script read from stdin)
                # (one message for every chunk, so Python shows it once)
                warnings.warn(f"drawing the shapes in this process: draw_ahead's worker "
                              f"processes failed ({error})")
                return
            for drawn_index, example in zip(range(start, stop), examples):
                if drawn_index not in self._cache:
                    self._keep(drawn_index, example)

    def __getstate__(self):
        # A lock and the workers' futures stay in this process; in another one (grain's
        # workers) the examples not drawn yet are drawn when read.
        return {**self.__dict__, "_lock": None, "_drawing": {}}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def _keep(self, index: int, example: dict) -> dict:
        for array in example.values():
            array.setflags(write=False)  # shared by every later read: never changed
        self._cache[index] = example
        return example

    def settings(self) -> dict:
        """The constructor arguments that fix the examples (all but `cache`)."""
        return dict(split=self.split, num_examples=self.num_examples,
                    image_size=self.image_size, max_objects=self.max_objects, seed=self.seed)

    def render(self, index) -> tuple[dict, np.ndarray]:
        """Example `index` and its owner map: int8 [S, S], the object visible at each pixel (its
        row in boxes/labels), -1 for background. The owner map is for tests and visualization."""
        index = operator.index(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        rng = np.random.default_rng((self.seed, SPLIT_IDS[self.split], index))
        size = self.image_size
        background = _background(rng, size)
        owner = np.full((size, size), -1, np.int8)
        box_px, labels, colours, masks = [], [], [], []
        for _ in range(rng.integers(1, self.max_objects + 1)):
            for _ in range(PLACEMENT_TRIES):
                label = int(rng.integers(1, NUM_CLASSES + 1))
                mask = shape_mask(label, *_object_size(rng, size))
                height, width = mask.shape
                x0 = int(rng.integers(0, size - width + 1))
                y0 = int(rng.integers(0, size - height + 1))
                new_owner = owner.copy()
                new_owner[y0:y0 + height, x0:x0 + width][mask] = len(labels)
                box = (x0, y0, x0 + width, y0 + height)
                if _keeps_earlier_objects_visible(owner, new_owner, box_px + [box], masks):
                    break
            else:
                continue  # no room left for this object: the image gets one fewer
            avoid = [background[y0:y0 + height, x0:x0 + width].mean(axis=(0, 1))]
            avoid += [c for c, b in zip(colours, box_px) if _intersects(b, box)]
            owner = new_owner
            box_px.append(box)
            labels.append(label)
            colours.append(_pick_colour(rng, avoid))
            masks.append(mask)
        image = background.astype(np.int16)
        drawn = owner >= 0
        image[drawn] = np.asarray(colours, np.int16)[owner[drawn]]
        image += rng.integers(-NOISE, NOISE + 1, image.shape, dtype=np.int16)
        example = {
            "image": np.clip(image, 0, 255).astype(np.uint8),
            "boxes": np.asarray(box_px, np.float32).reshape(-1, 4) / np.float32(size),
            "labels": np.asarray(labels, np.int32),
            "difficult": np.zeros(len(labels), bool),
        }
        return example, owner


def _draw_examples(settings: dict, start: int, stop: int) -> list[dict]:
    """Examples start..stop-1 of ShapesDataset(**settings), in a worker process."""
    dataset = ShapesDataset(**settings)
    return [dataset.render(index)[0] for index in range(start, stop)]


def draw_ahead(datasets, processes: int | None = None, chunk: int = 250) -> None:
    """Starts drawing every example of the cached `datasets` in `processes` worker processes
    (default: one per core the process may use) and returns; a read of an example waits for
    the chunk that holds it.

    Drawn on the fly, the main job's first epoch of 20,000 images drew ~1.5 ms of CPU per
    image in grain's threads, beside a train step that keeps both cores busy on two devices
    that wait for each other: each of the first 1250 steps took ~40 ms longer (BENCHMARKS.md,
    the main job). Drawn ahead on every core while the train step compiles, they cost about
    20 s once. The examples are the ones `dataset[i]` draws, whatever the number of processes.

    Args:
      datasets: ShapesDatasets made with cache=True.
      processes: worker processes; 1 draws in this process before returning; None: one per
        core, or 1 for fewer than WORKERS_PAY_FROM examples.
      chunk: examples per task handed to a worker.
    """
    if any(dataset._cache is None for dataset in datasets):
        raise ValueError("draw_ahead fills caches: make the datasets with cache=True")
    datasets = [dataset for dataset in datasets if not dataset._drawing]  # not already at it
    tasks = [(dataset, start, min(start + chunk, len(dataset)))
             for dataset in datasets for start in range(0, len(dataset), chunk)
             if not all(index in dataset._cache
                        for index in range(start, min(start + chunk, len(dataset))))]
    if processes is None:
        total = sum(stop - start for _, start, stop in tasks)
        processes = len(os.sched_getaffinity(0)) if total >= WORKERS_PAY_FROM else 1
    if not tasks:
        return
    if processes == 1:
        for dataset in datasets:
            for index in tqdm(range(len(dataset)), desc="draw shapes", unit="image",
                              leave=False):
                dataset[index]
        return
    # spawn, not fork: the parent runs JAX's threads, which a forked child would not have.
    pool = concurrent.futures.ProcessPoolExecutor(
        processes, mp_context=multiprocessing.get_context("spawn"))
    for dataset in datasets:
        with dataset._lock:
            dataset._chunk = chunk
    for dataset, start, stop in tasks:
        future = pool.submit(_draw_examples, dataset.settings(), start, stop)
        with dataset._lock:
            dataset._drawing[start] = (stop, future)
    pool.shutdown(wait=False)  # the workers finish the tasks, then exit
