"""The extauthz admin API."""
