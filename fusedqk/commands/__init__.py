"""The subcommands, by what they do; ``fusedqk.cli`` builds the parser from them and dispatches.

- ``setup``: env, build-ext, models, export
- ``measuring``: generate, bench, identity, blockbench
- ``results``: decide, aggregate, report, compare, failures, verify
- ``flags``: what several commands share (ranges, model and output flags, the one-line parser)

Each module's ``add_parsers(sub)`` declares its commands' flags; each ``cmd_*`` parses nothing,
calls one library function and prints what it returns.
"""
