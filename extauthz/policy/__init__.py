"""Istio policy documents: reading, validation and the compiled model."""

from extauthz.policy.loader import compile_policy_files, load_policy_dir, read_policy_files, revision_of
from extauthz.policy.model import PolicySet

__all__ = ["PolicySet", "compile_policy_files", "load_policy_dir", "read_policy_files", "revision_of"]
