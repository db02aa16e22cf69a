"""User-facing errors of the `rayft` command: one base class with an exit code, caught once in `main`.

Each package raises its own error types (a `data` source error cannot depend on the CLI: see the design's import
table); `user_errors()` lists those whose message already says what to fix, and `main` prints them as one line with
exit code 2, like a `UserError`. Anything else is a bug or an outage: exit code 1 with its traceback.
"""
from __future__ import annotations

EXIT_USAGE = 2


class UserError(Exception):
    """An error the user can fix; printed as `error: MESSAGE` without a traceback."""

    exit_code = EXIT_USAGE


def user_errors() -> tuple[type[BaseException], ...]:
    """Every package's error types whose message names the field, the value and the fix."""
    from rayft.data.chat import TemplateError
    from rayft.data.formats import SourceError
    from rayft.models.architectures import LoraTargetError
    from rayft.registry.versions import RegistryError
    from rayft.security.access import AccessDenied, PolicyError
    from rayft.security.artifacts import ArtifactError
    from rayft.security.config import ArtifactKeyError
    from rayft.serve.config import ServeStartError
    from rayft.train.export import ExportError
    from rayft.train.trainer import USER_ERRORS
    from rayft.tune.space import SearchSpaceError

    from ..cluster_yaml import ClusterYamlError
    from ..config import ConfigError
    from ..jobs import JobError
    from ..plan import PlanError

    return (UserError, ConfigError, SourceError, TemplateError, AccessDenied, PolicyError, ArtifactKeyError,
            ArtifactError, RegistryError, ExportError, LoraTargetError, SearchSpaceError, ClusterYamlError, JobError,
            PlanError, ServeStartError, *USER_ERRORS)
