"""`distill study`: which objective pays for a teacher and student? A seeded grid of objective variants × student
settings, the attention hyper-parameters tuned greedily on the validation split first, every run evaluated on the
held-out test split, reported as mean ± std over seeds and paired differences from a baseline, logged to MLflow.
Resumable: a killed study continues where it stopped. Laid out by a config's `study:` section
(`configs/quality.yaml`).

- `layout`: the `study:` section, checked (errors name the key)
- `workspace`: work and report directories, the base config, timings, provenance
- `grid`: run names and the overrides that make each run
- `inputs`: the teacher, data, cache and carved students every run reads, made once
- `runner`: train, score and record one run; run a list of them, skipping finished ones
- `results`: one JSON per finished run, the study's commit point
- `search`: the greedy search and its frozen choice
- `stats`: mean ± std, paired differences, run timings
- `plan`: what would run and how long it takes
- `tables`, `figures`, `report`: the report and its MLflow summary run
- `stage`: the driver
"""
