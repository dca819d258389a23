"""Write the figures embedded in a sparselm report.html as PNG files (docs screenshots without a browser).

    python scripts/report_images.py compressed/run/report.html docs/report_example
writes docs/report_example_1.png, _2.png, ... in the order the report shows them (their alt text printed).
"""
from __future__ import annotations

import base64
import re
import sys
from pathlib import Path


def main(report: str, prefix: str) -> None:
    text = Path(report).read_text(encoding="utf-8")
    for i, (alt, data) in enumerate(re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)"', text), 1):
        path = Path(f"{prefix}_{i}.png")
        path.write_bytes(base64.b64decode(data))
        print(f"{path}: {alt}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
