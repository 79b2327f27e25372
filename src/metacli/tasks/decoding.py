"""Decoding image files into raw pixels, apart from torch: the worker processes of
``metacli.tasks.images.decode_many`` import this module alone, so they start in a fraction
of a second instead of loading torch."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metacli.errors import MetacliError


def decode_pixels(
    data: bytes,
    size: int,
    channels: int,
    name: str,
    resample: str = "lanczos",
    crop: float = 1.0,
    swap: bool = False,
    box: tuple[float, float, float, float] | None = None,
) -> bytes:
    """Image bytes -> channel-first uint8 pixels, resized with LANCZOS (antialiased) or
    NEAREST (what PIL does to a 1-bit image whatever it is asked: MAML's binary Omniglot).

    ``crop`` < 1: resized to size / crop, then the centre size x size kept
    (CloserLookFewShot's test transform: Resize(1.15 x size), CenterCrop(size)).
    ``swap``: the channels reversed, as ``cv2.imdecode`` returns a colour image (the
    tieredImageNet PNG pickles were written by ``cv2.imencode``). ``box`` (x, y, width,
    height): the region kept before resizing (CUB's bounding boxes). Torch-free, so that
    the processes of ``decode_many`` start light."""
    import io

    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data)).convert("L" if channels == 1 else "RGB")
        if box is not None:
            x, y, w, h = box
            image = image.crop((int(x), int(y), int(x + max(w, 1)), int(y + max(h, 1))))
        method = Image.Resampling.NEAREST if resample == "nearest" else Image.Resampling.LANCZOS
        outer = size if crop >= 1 else int(size / crop)
        if image.size != (outer, outer):
            image = image.resize((outer, outer), method)
        if outer != size:
            left = (outer - size) // 2
            image = image.crop((left, left, left + size, left + size))
    except Exception as err:
        # (PIL names the in-memory buffer it read from, not the file: say what it found)
        reason = (
            re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err)) or type(err).__name__
        )
        raise MetacliError(
            f"Cannot read the image {name}: {reason}. Replace or remove that file."
        ) from None
    pixels = image.tobytes()  # [size, size, channels], row-major
    if channels == 1:
        return pixels
    planes = [pixels[c::channels] for c in range(channels)]
    return b"".join(reversed(planes) if swap else planes)


# A source is the image's bytes or the path of its file; a name says it in messages; a
# box (x, y, width, height), where given, is the region kept.
Source = bytes | Path
Item = tuple[Source, str] | tuple[Source, str, tuple[float, float, float, float] | None]


def decode_chunk(chunk: Sequence[Item], options: dict[str, Any]) -> list[bytes]:
    out = []
    for source, name, *box in chunk:
        try:
            data = source.read_bytes() if isinstance(source, Path) else source
        except OSError as err:
            raise MetacliError(f"Cannot read the image {name}: {err.strerror or err}.") from None
        out.append(decode_pixels(data, name=name, box=box[0] if box else None, **options))
    return out


# What the forked workers of ``decode_many`` read and write: set before the pool forks,
# inherited by every worker, so that neither the sources nor the pixels cross a pipe.
FORKED: dict[str, Any] = {}


def decode_into(start: int, stop: int, options: dict[str, Any]) -> int:
    """Decode sources start..stop-1 into the shared buffer (a forked worker's share)."""
    sources, target = FORKED["sources"], FORKED["target"]
    width = len(target) // len(sources)
    for i, pixels in enumerate(decode_chunk(sources[start:stop], options), start):
        target[i * width : (i + 1) * width] = pixels
    return stop - start
