"""Benchmarks that print ratios against TRL and against naive code, one `bench: <name> <value> <unit>` line each.

Each module is runnable on its own (`python -m bench.<stem> [--quick]`); `python -m bench` runs every module in
`bench.__main__.MODULES`.
"""
