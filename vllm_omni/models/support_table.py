"""The README's model table, rendered from the adapters (the one source of truth).

    python -m vllm_omni.models.support_table          # print the table
    python -m vllm_omni.models.support_table --write  # replace it in README.md

The table sits between two HTML comments in README.md; a test fails when it is out of date.
"""

from __future__ import annotations

import argparse
import os
import re

from vllm_omni.models.base import FEATURES
from vllm_omni.models.registry import ADAPTERS

BEGIN, END = "<!-- models:begin -->", "<!-- models:end -->"
TASKS = {"text-to-image": "text → image", "image-edit": "image edit (`/v1/images/edits`)",
         "image-generate-edit": "text → image, image edit (`/v1/images/edits`)",
         "image-layers": "image → RGBA layers (`/v1/images/edits`)",
         "text-to-video": "text → video (`/v1/videos`)",
         "image-to-video": "image → video (`/v1/videos`, `input_reference`)",
         "text-to-audio": "text → audio (`/v1/audio/generate`)"}


def render() -> str:
    head = ["model", "hub id", "pipeline", "task", *FEATURES.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + ":-:|" * len(FEATURES)]
    rows = []
    for a in ADAPTERS:
        for display, hub_id in a.models:
            inputs = a.image_inputs[1]
            task = TASKS[a.task] + (f", up to {inputs} images" if inputs > 1 else "")
            cells = ["✅" if f in a.features else "❌" for f in FEATURES]
            rows.append(f"| {display} | `{hub_id}` | `{a.pipeline_classes[0]}` | {task} | "
                        + " | ".join(cells) + " |")
    return "\n".join(lines + sorted(rows, key=str.lower))


def readme_path() -> str:
    return os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def replace_in(text: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"README.md has no {BEGIN} ... {END} block")
    return pattern.sub(lambda _: f"{BEGIN}\n{render()}\n{END}", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    args = parser.parse_args()
    if not args.write:
        print(render())
        return
    path = readme_path()
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(replace_in(text))


if __name__ == "__main__":
    main()
