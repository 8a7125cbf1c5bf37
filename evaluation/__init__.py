"""densessl's evaluation: frozen features of a model -> figures. Imports preprocess, pipeline and model, never train.

Each function takes a feature function (or a model) and data, and returns figures; none reads a run folder
(`train.restore` does, for the CLIs `python -m train.eval_knn | eval_linear | eval_dense`).

- `config`: `EvalConfig` (the k-NN, when to evaluate, baselines) and `DenseEvalConfig`, the run config's `eval` section.
- `knn`: DINO's weighted k-NN (`knn_accuracy`, `compare_knn`, `format_comparison`), the features it reads.
- `linear`: a linear probe on cached frozen features (`linear_probe_accuracy`).
- `dense_data`, `dense`: mosaic sets and patch features; Hummingbird retrieval and the linear patch probe
  (`dense_scores`, `compare_dense`, `format_dense_table`).
- `baselines`: the random-init and raw-pixel rows beside a trained teacher (`knn_sources`, `dense_sources`).
"""
