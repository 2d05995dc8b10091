"""Writing a study's outputs: the PNG, the JSON of its numbers and one line saying where they went."""
from __future__ import annotations

from collections.abc import Callable
import json
import os
import time
from typing import Any


def write_study(study: dict[str, Any], plot: Callable[[dict[str, Any]], Any], out_dir: str, stem: str,
                start: float) -> None:
  """Writes `out_dir/stem.png` (the figure `plot(study)` returns) and `out_dir/stem.json`, then prints both names."""
  import matplotlib.pyplot as plt
  os.makedirs(out_dir, exist_ok=True)
  fig = plot(study)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, f"{stem}.png"), dpi=110)
  plt.close(fig)
  with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
    json.dump(study, f, indent=1, default=float)
  print(f"wrote {out_dir}/{stem}.png and {stem}.json in {time.time() - start:.1f} s")
