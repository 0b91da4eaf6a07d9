"""Stage drivers: one module per `distill` command, each a short function that wires library pieces together.

Every driver takes the validated `Config`, skips work whose output is already complete and valid, and logs what it
does; `train`, `eval` and `cache` start from one shared context (`context.open_run`). Multi-process stages are
started by the DeepSpeed launcher; a driver only asks `infra.dist` for its rank. The modules are imported one by one
(`pipeline.stages.prepare` …) so that a light command never pays for DeepSpeed's and MLflow's imports.
"""
