"""MLflow tracking, registry versions and aliases, the promotion policy."""
