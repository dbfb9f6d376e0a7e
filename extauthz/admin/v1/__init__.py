"""Generated messages and stubs of extauthz.admin.v1 (built from protos/ by setup.py)."""
