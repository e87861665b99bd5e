"""Model cards (``README.md`` with diffusers' YAML front matter) for the folders a PeRFlow export writes:
the student pipeline, its LoRA, and the official-format delta."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rectflow.engine.io import atomic_path
from rectflow.version import __version__

__all__ = ["write_model_card"]

_KINDS = {
    "pipeline": "the PeRFlow student as a complete diffusers pipeline",
    "transformer": "the PeRFlow student's transformer and its schedulers",
    "unet": "the PeRFlow student's UNet and its schedulers",
    "lora": "the PeRFlow weight delta as a LoRA (diffusers / peft format)",
    "official": "the PeRFlow weight delta in the official repository's format (UNet folder with delta_weights.safetensors)",
}

_USAGE = {
    "pipeline": """```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{name}", trust_remote_code=True)  # scheduler/ holds PeRFlowScheduler's code
image = pipe("{prompt}", num_inference_steps={k}, guidance_scale={w}).images[0]  # any num_inference_steps >= {k}
```
A stock scheduler exact at K steps, where one exists, is in `scheduler_ddim/` or `scheduler_flowmatch/`.""",
    "stock": """```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{name}")  # a stock {stock} in scheduler/: no custom code to trust
image = pipe("{prompt}", num_inference_steps={k}, guidance_scale={w}).images[0]
```
The stock {stock} is exact at num_inference_steps={k} only: other counts sample wrong without an error.
`scheduler_perflow/` holds PeRFlowScheduler (any count >= {k}; load the folder with its code, trust_remote_code=True).""",
    "lora": """```python
from diffusers import DiffusionPipeline
student = DiffusionPipeline.from_pretrained("{pipeline_folder}", trust_remote_code=True)  # the exported pipeline, for its scheduler
pipe = DiffusionPipeline.from_pretrained("{base}")       # the base model, or a fine-tune of it
pipe.load_lora_weights("{name}")
pipe.scheduler = student.scheduler
image = pipe("{prompt}", num_inference_steps={k}, guidance_scale={w}).images[0]
```""",
    "official": """With the official repository (magic-research/piecewise-rectified-flow):

```python
pipe = load_delta_weights_into_unet(pipe, model_path="{name}")   # reads delta_weights.safetensors
pipe.scheduler = PeRFlowScheduler.from_config(pipe.scheduler.config, prediction_type="ddim_eps", num_time_windows={k})
```

rectflow reads it back with `rectflow.perflow.official.load_official_delta` + `rectflow.perflow.delta.apply_delta`.
Its scheduler feeds the UNet N tau where this student was trained on N tau - 1 (one of N = 1000 steps): the
pipeline export is exact, this format is for the official tools.""",
}


def write_model_card(folder: str | Path, kind: str, *, base_model: str, windows: int, pipeline: str | None = None, guidance: float = 1.0,
                     command: str | None = None, measured: dict[str, Any] | None = None, stock_scheduler: str | None = None,
                     prompt: str = "a photo of a cat", name: str | None = None, pipeline_folder: str = "diffusers") -> Path:
    """Write ``folder/README.md`` (atomic): YAML front matter (base model, library, tags, pipeline tag), what the folder
    is, how to load it, the number of windows K, the command that made it and the measured numbers given."""
    folder = Path(folder)
    tags = ["perflow", "rectflow", "piecewise-rectified-flow", "text-to-image", "few-step"]
    lines = ["---", f"base_model: {json.dumps(base_model)}", "library_name: diffusers", "pipeline_tag: text-to-image", "tags:"]
    lines += [f"- {t}" for t in tags] + ["---", "", f"# PeRFlow K = {windows}: {_KINDS[kind]}", ""]
    lines += [f"Made by rectflow {__version__} from `{base_model}`{f' ({pipeline})' if pipeline else ''}: piecewise rectified flow with "
              f"{windows} time windows, so {windows} sampling steps (one per window"
              f"{'' if stock_scheduler else '; more steps also work'}).", ""]
    name = name or folder.name  # the folder's name as the user will see it (an export is written under a staging name)
    fill = {"name": name, "prompt": prompt, "k": windows, "w": guidance, "stock": stock_scheduler, "base": base_model, "pipeline_folder": pipeline_folder}
    if kind in ("pipeline", "transformer", "unet"):
        lines += [_USAGE["stock" if stock_scheduler else "pipeline"].format(**fill)]
    else:
        lines += [_USAGE[kind].format(**fill)]
    if command:
        lines += ["", "Command:", "", f"```bash\n{command}\n```"]
    if measured:
        lines += ["", "Measured at export:", "", "| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in measured.items()]
    text = "\n".join(lines) + "\n"
    path = folder / "README.md"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return path
