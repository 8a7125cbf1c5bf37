"""AdamW's second moment at the end of a run, per parameter: what the early gradient spike left in it.

    python3 benchmarks/dino_parity/adam_state.py RUN [RUN ...]

RUN is a densessl run folder (reads checkpoints/latest, the fp32 AdamW state of DeepSpeed's optimizer) or an
official_dino.py run folder (reads optimizer.pth). Prints, per parameter, sqrt(v_hat) = sqrt(mean(exp_avg_sq) /
(1 - beta2^step)): the denominator of Adam's update. With beta2 = 0.999 and 468 steps, v_hat is close to the
plain mean of g^2 over all steps, so steps whose gradient was 40x the typical one (the first two here) set
it for the whole run; a clip that scales them down (global) or not (per parameter) changes every later step
size by the ratio of these figures.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def densessl_state(run: Path) -> dict[str, float]:
    from model import SSLModel
    from train.config import load_config
    from train.engine import parameter_groups

    cfg = load_config([str(run / "config.yaml")], [])
    groups, _ = parameter_groups(SSLModel(cfg.model, cfg.methods))
    model = SSLModel(cfg.model, cfg.methods)
    names = {id(p): n for n, p in model.named_parameters()}
    groups, _ = parameter_groups(model)
    order = [names[id(p)] for g in groups for p in g["params"]]
    latest = (run / "checkpoints" / "latest")
    target = latest.resolve() if latest.is_symlink() else run / "checkpoints" / latest.read_text().strip() if latest.is_file() else latest
    sd = torch.load(target / "engine" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    state = sd["optimizer"]["optimizer_state_dict"]["state"]
    beta2 = sd["optimizer"]["optimizer_state_dict"]["param_groups"][0]["betas"][1]
    return {order[i]: float((s["exp_avg_sq"].mean() / (1 - beta2 ** float(s["step"]))).sqrt()) for i, s in state.items()}


def official_state(run: Path) -> dict[str, float]:
    saved = torch.load(run / "optimizer.pth", map_location="cpu", weights_only=False)
    order = [n for g in saved["group_names"] for n in g]
    osd = saved["optimizer"]
    beta2 = osd["param_groups"][0]["betas"][1]
    out = {}
    for i, s in osd["state"].items():
        name = order[i].replace("last_layer.weight_v", "last_layer.weight").replace("last_layer.weight_g", "last_layer.scale")
        out[name] = float((s["exp_avg_sq"].mean() / (1 - beta2 ** float(s["step"]))).sqrt())
    return out


def main():
    runs = [Path(p) for p in sys.argv[1:]]
    tables = {str(r): (official_state(r) if (r / "optimizer.pth").exists() else densessl_state(r)) for r in runs}
    names = list(next(iter(tables.values())))
    print("sqrt(v_hat) at the end, per parameter")
    print("parameter".ljust(40) + "".join(Path(r).parent.name[:22].rjust(24) for r in tables))
    for n in names:
        print(n.ljust(40) + "".join(f"{t.get(n, float('nan')):24.3e}" for t in tables.values()))
    import math
    print("geometric mean".ljust(40) + "".join(
        f"{math.exp(sum(math.log(v) for v in t.values() if v > 0) / len(t)):24.3e}" for t in tables.values()))
    print(json.dumps({r: t for r, t in tables.items()})[:0])


if __name__ == "__main__":
    main()
