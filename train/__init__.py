"""densessl's trainer: `deepspeed train/main.py --config configs/X.yaml [key=value ...]`.

Modules, one job each: `config` (the typed config and its YAML loader), `schedules` (per-step arrays),
`engine` (the only DeepSpeed import: init, student engine, teacher EMA), `step` (one training step),
`loop` (epochs, logging, checkpoints, signals), `checkpoint` (atomic save / exact resume),
`telemetry` (bar, metrics.jsonl, TensorBoard, throughput), `evaluate` (runs `evaluation/` at epoch ends
and at the end), `restore` (a run folder's teacher, for the CLIs), the thin CLIs on a run folder
`eval_knn` / `eval_linear` / `eval_dense` / `export` (timm-loadable safetensors), `main` (the entry point).
How a model is evaluated is `evaluation/`'s, which imports nothing of `train/`.
"""
