"""extauthz: an Envoy external authorization service for Istio security policies."""

__version__ = "0.1.0"
