"""Artifact manifests and encryption, the access policy, the audit log. Imports nothing of rayft's."""
