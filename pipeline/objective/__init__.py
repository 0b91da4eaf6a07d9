"""The distillation objective: loss terms as registered components (`terms/`, each owning its `distill.<name>`
config section and its needs), combined by `loss` into the trainer's and the evaluator's objective."""
