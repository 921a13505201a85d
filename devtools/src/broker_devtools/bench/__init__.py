"""``broker bench``: GetAccessToken measured against the gRPC echo floor and an in-process
"no broker" loop. Entry points: ``broker_devtools.bench.cli.register`` (adds the
subcommand to ``broker``) and ``python -m broker_devtools.bench``; method in docs/benchmarks.md."""
