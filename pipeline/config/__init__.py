"""One typed config tree, loaded from YAML, overridden from the command line, validated once.

Every stage receives the same `Config`. Unknown keys and impossible values are rejected here, with the dotted key,
the value found and what is allowed, so that no stage has to re-check its inputs. `schema` holds the sections,
`loader` reads files and overrides, `validation` checks ranges and cross-field rules, `reference` documents it all.
"""

from pipeline.config.loader import (
    config_from_dict,
    load_config,
    load_yaml,
    parse_override,
    read_yaml_file,
    variant,
)
from pipeline.config.reference import reference_markdown
from pipeline.config.schema import (
    CacheConfig,
    CarveSection,
    Config,
    DataConfig,
    DistillConfig,
    LoraSection,
    MLflowConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)
from pipeline.config.validation import SCRATCH_STUDENT
from pipeline.errors import ConfigError

__all__ = [
    "SCRATCH_STUDENT",
    "CacheConfig",
    "CarveSection",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "LoraSection",
    "MLflowConfig",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "config_from_dict",
    "load_config",
    "load_yaml",
    "parse_override",
    "read_yaml_file",
    "reference_markdown",
    "variant",
]
