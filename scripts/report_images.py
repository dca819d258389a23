"""Write the figures embedded in a sparselm report.html as PNG files (docs screenshots without a browser).

    python scripts/report_images.py compressed/run/report.html docs/report_example
writes docs/report_example_1.png, _2.png, ... in the order the report shows them (their alt text printed),
and docs/report_example.png: all of them stacked, as the page shows them top to bottom.
"""
from __future__ import annotations

import base64
import io
import re
import sys
from pathlib import Path

import numpy as np
from matplotlib.image import imread, imsave


def main(report: str, prefix: str) -> None:
    text = Path(report).read_text(encoding="utf-8")
    images = []
    for i, (alt, data) in enumerate(re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)"', text), 1):
        raw = base64.b64decode(data)
        Path(f"{prefix}_{i}.png").write_bytes(raw)
        images.append(imread(io.BytesIO(raw))[..., :3])  # (h, w, 3) floats in [0, 1]
        print(f"{prefix}_{i}.png: {alt}")
    width = max(im.shape[1] for im in images)
    padded = [np.pad(im, ((0, 8), (0, width - im.shape[1]), (0, 0)), constant_values=1.0) for im in images]
    imsave(f"{prefix}.png", np.concatenate(padded))
    print(f"{prefix}.png: all {len(images)} stacked")


if __name__ == "__main__":
    main(*sys.argv[1:3])
