"""Load and CPU benchmarks of extauthz; `make bench` runs them and writes docs/performance.md."""
